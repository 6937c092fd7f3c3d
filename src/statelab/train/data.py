"""Training data as pure functions of ``(seed, index)``: sequence ``i`` of a stream never depends on what was read
before it, so the data position of a run is just a count, resuming is exact, and every process of a distributed
run can take its own rows of a global batch without talking to the others.

A data source has ``seq_len`` and ``sequence(index) -> (input_ids [T], labels [T])`` where ``labels[t]`` is the
token to predict at position ``t`` (the next token) or ``-100`` where there is no loss. Sources are registered in
:data:`DATA_SOURCES` by name with a typed options class, built from a config by :func:`build_source`.

Global batch ``s`` (optimizer step ``s``) holds sequences ``s * G .. s * G + G - 1`` (``G`` = global batch
size); :func:`step_rows` says which of them one process reads in one micro-step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from statelab.errors import ConfigError
from statelab.train.config import DataSection, from_dict

__all__ = [
    "IGNORE_INDEX",
    "DataSource",
    "TextSource",
    "TextOptions",
    "DATA_SOURCES",
    "register_source",
    "build_source",
    "step_rows",
    "make_batch",
    "index_rng",
    "resolve_tokenizer",
]

IGNORE_INDEX = -100


class DataSource(Protocol):
    """What the training loop reads: fixed-length sequences addressed by index."""

    seq_len: int

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [T], labels [T])`` of sequence ``index``, both int64; ``labels`` -100 where no loss."""
        ...


def index_rng(seed: int, index: int) -> np.random.Generator:
    """A generator owned by sequence ``index`` of stream ``seed`` (independent streams, no global state)."""
    if index < 0:
        raise ValueError(f"sequence index must be >= 0, got {index}")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])


# name -> (options dataclass, factory(options, seq_len, seed) -> DataSource)
DATA_SOURCES: dict[str, tuple[type, Callable[[Any, int, int], DataSource]]] = {}


def register_source(name: str, options_cls: type) -> Callable:
    """Decorator registering a data source factory ``f(options, seq_len, seed) -> DataSource`` under ``name``."""

    def deco(factory: Callable[[Any, int, int], DataSource]) -> Callable[[Any, int, int], DataSource]:
        DATA_SOURCES[name] = (options_cls, factory)
        return factory

    return deco


def build_source(section: DataSection) -> DataSource:
    """The data source a ``[data]`` config section names, with its options checked."""
    if section.source == "tasks" and "tasks" not in DATA_SOURCES:
        import statelab.train.mixture  # noqa: F401  (registers the "tasks" source)
    if section.source not in DATA_SOURCES:
        raise ConfigError(f"data.source={section.source!r} is unknown; known: {', '.join(sorted(DATA_SOURCES))}")
    options_cls, factory = DATA_SOURCES[section.source]
    options = from_dict(options_cls, section.options, "data.options")
    return factory(options, section.seq_len, section.seed)


def step_rows(step: int, micro: int, rank: int, global_batch: int, micro_batch: int, world: int) -> list[int]:
    """Sequence indices read by process ``rank`` in micro-step ``micro`` of optimizer step ``step``.

    The global batch of a step is split into ``global_batch / (micro_batch * world)`` micro-steps; micro-step
    ``m`` covers ``micro_batch * world`` consecutive sequences and process ``r`` takes its ``r``-th slice. The
    union over micro-steps and processes is always ``step * global_batch + [0, global_batch)``, whatever the
    number of processes, which is why 1 process and N processes see the same data.
    """
    base = step * global_batch + micro * micro_batch * world + rank * micro_batch
    return list(range(base, base + micro_batch))


def make_batch(source: DataSource, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack sequences ``rows`` into ``(input_ids [B, T], labels [B, T])``."""
    seqs = [source.sequence(i) for i in rows]
    return torch.stack([s[0] for s in seqs]), torch.stack([s[1] for s in seqs])


@dataclass(frozen=True)
class TextOptions:
    """Options of the ``text`` source.

    Attributes:
        path: a UTF-8 text file; its bytes are the token stream.
        tokenizer: ``"byte"`` (statelab's byte tokenizer) or a tokenizer directory / ``tokenizer.json``.
    """

    path: str = ""
    tokenizer: str = "byte"


class TextSource:
    """Random windows of one tokenized text file: sequence ``i`` starts at an offset drawn from ``(seed, i)``.

    Example:
        >>> src = TextSource(list(range(100)), seq_len=8, seed=0)
        >>> x, y = src.sequence(3)
        >>> bool((y[:-1] == x[1:]).all())
        True
    """

    def __init__(self, tokens: list[int] | torch.Tensor, seq_len: int, seed: int, tokenizer: Any = None) -> None:
        self.tokens = torch.as_tensor(tokens, dtype=torch.long)
        if self.tokens.dim() != 1 or self.tokens.numel() < seq_len + 1:
            raise ConfigError(
                f"the text has {self.tokens.numel()} tokens; a sequence of seq_len={seq_len} needs {seq_len + 1}"
            )
        self.seq_len = seq_len
        self.seed = seed
        self.tokenizer = tokenizer  # saved beside the trained model

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(index_rng(self.seed, index).integers(0, self.tokens.numel() - self.seq_len))
        window = self.tokens[start : start + self.seq_len + 1]
        return window[:-1].clone(), window[1:].clone()


@register_source("text", TextOptions)
def _text_source(options: TextOptions, seq_len: int, seed: int) -> TextSource:
    if not options.path:
        raise ConfigError("data.options.path must name a text file for data.source='text'")
    p = Path(options.path)
    if not p.is_file():
        raise ConfigError(f"data.options.path={options.path!r} does not exist")
    tok = resolve_tokenizer(options.tokenizer)
    return TextSource(tok.encode(p.read_text(encoding="utf-8")), seq_len, seed, tokenizer=tok)


def resolve_tokenizer(name: str) -> Any:
    """``"byte"`` -> statelab's :class:`ByteTokenizer`; anything else -> ``load_tokenizer(name)``."""
    from statelab.models.tokenizer import ByteTokenizer, load_tokenizer

    return ByteTokenizer() if name == "byte" else load_tokenizer(name)
