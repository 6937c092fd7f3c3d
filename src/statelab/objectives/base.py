"""What every Birdie objective shares: the vocabulary of control tokens, the example type, typed configs.

Birdie (arXiv 2411.01030) trains on a mixture of objectives. Each objective is a pure function

    objective(tokens, config, rng) -> Example(input, target, ...)

of a chunk of text ``tokens`` (1-D int64 numpy array, byte ids 0..255), a typed frozen config and a numpy
``Generator`` (all randomness comes from it). The packer (:mod:`statelab.objectives.packing`) turns an example into
``tokens = input ++ [BEGIN] ++ target[:-1]`` with labels ``[-100] * len(input) ++ target``: the input is the
prefix (never in the loss, bidirectional where the model allows), ``[BEGIN]`` and the target are the causal suffix.

Control tokens are dedicated ids above the 256 byte values, so no text byte can be mistaken for a control.

The copying objectives are :class:`CopyingObjectiveConfig` and :class:`SelectiveCopyingObjectiveConfig`: text
corruptions of a chunk, not the token-level tasks ``statelab.tasks.CopyingConfig`` / ``SelectiveCopyingConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from statelab.config import from_dict
from statelab.errors import ConfigError

__all__ = [
    "VOCAB",
    "Vocab",
    "Example",
    "ObjectiveConfig",
    "NextTokenConfig",
    "PrefixLMConfig",
    "InfillingConfig",
    "AutoencodingConfig",
    "CopyingObjectiveConfig",
    "DeshufflingConfig",
    "SelectiveCopyingObjectiveConfig",
    "CONFIG_CLASSES",
    "config_from_dict",
]


@dataclass(frozen=True)
class Vocab:
    """Token ids of the byte-level Birdie vocabulary: bytes, control tokens, paradigm tokens, sentinels.

    | ids                     | meaning                                                            |
    |-------------------------|--------------------------------------------------------------------|
    | 0..255                  | UTF-8 bytes of the text                                            |
    | 256 ``pad``             | padding of packed rows (never in the loss)                         |
    | 257 ``begin``           | first token of every causal suffix                                 |
    | 258 ``eos``             | end of a target                                                    |
    | 259..264                | selective copying: ``context copy start end sep done``             |
    | 265..272                | one paradigm token per objective class (UL2-style, optional)       |
    | 273..273+n_sentinels-1  | sentinels, unique and ordered within a sample                      |
    """

    n_sentinels: int = 128

    pad: ClassVar[int] = 256
    begin: ClassVar[int] = 257
    eos: ClassVar[int] = 258
    context: ClassVar[int] = 259
    copy: ClassVar[int] = 260
    start: ClassVar[int] = 261
    end: ClassVar[int] = 262
    sep: ClassVar[int] = 263
    done: ClassVar[int] = 264
    paradigm_base: ClassVar[int] = 265
    sentinel_base: ClassVar[int] = 273

    def sentinel(self, i: int) -> int:
        """Id of the ``i``-th sentinel (0-based) of a sample."""
        if not 0 <= i < self.n_sentinels:
            raise ValueError(f"sentinel index must lie in [0, {self.n_sentinels}), got {i}")
        return self.sentinel_base + i

    def paradigm(self, class_name: str) -> int:
        """Id of the paradigm token of an objective class."""
        return self.paradigm_base + CLASS_NAMES.index(class_name)

    def is_sentinel(self, ids: np.ndarray) -> np.ndarray:
        return (ids >= self.sentinel_base) & (ids < self.sentinel_base + self.n_sentinels)

    @property
    def size(self) -> int:
        """Number of ids, rounded up to a multiple of 8."""
        n = self.sentinel_base + self.n_sentinels
        return (n + 7) // 8 * 8


VOCAB = Vocab()

CLASS_NAMES: tuple[str, ...] = (
    "next_token",
    "prefix_lm",
    "infilling",
    "autoencoding",
    "copying",
    "deshuffling",
    "selective_copying",
)


@dataclass(frozen=True)
class Example:
    """One objective sample before packing.

    Attributes:
        input: ``[n]`` int64, the prefix (may be empty: next-token has no prefix).
        target: ``[m]`` int64, ``m >= 1``, what the model must produce after ``[BEGIN]``.
        masked_fraction: fraction of the chunk's tokens hidden from the input (infilling, autoencoding,
            deshuffling: fraction of moved tokens), ``None`` where the notion does not apply.
        n_spans: number of corrupted spans (or copied spans), 0 where it does not apply.
    """

    input: np.ndarray
    target: np.ndarray
    masked_fraction: float | None = None
    n_spans: int = 0

    @property
    def packed_length(self) -> int:
        """Tokens this example takes in a packed row: ``len(input) + len(target)``."""
        return int(self.input.shape[0] + self.target.shape[0])


def _check_range(name: str, value: tuple[int, int], low: int = 1) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ConfigError(f"{name} must be (lo, hi) with {low} <= lo <= hi, got {value}")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Base of the objective configs. ``length`` is the range ``[lo, hi]`` of the chunk length drawn uniformly."""

    class_name: ClassVar[str] = ""
    length: tuple[int, int] = (64, 256)

    def __post_init__(self) -> None:
        object.__setattr__(self, "length", tuple(int(v) for v in self.length))
        _check_range(f"{self.class_name}.length", self.length, low=2)

    def name(self) -> str:
        """A short unique name of the config, e.g. ``infilling/L64-128/r0.15/s3``."""
        raise NotImplementedError

    def min_length(self) -> int:
        """The shortest chunk for which the objective is well defined."""
        return 2

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["class"] = self.class_name
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _len_tag(length: tuple[int, int]) -> str:
    return f"L{length[0]}-{length[1]}"


@dataclass(frozen=True)
class NextTokenConfig(ObjectiveConfig):
    """Next-token prediction: the whole chunk is the causal suffix."""

    class_name: ClassVar[str] = "next_token"

    def name(self) -> str:
        return f"next_token/{_len_tag(self.length)}"


@dataclass(frozen=True)
class PrefixLMConfig(ObjectiveConfig):
    """Prefix-LM (UL2 "S"): split uniformly in ``[split[0]·L, split[1]·L]``, both parts >= ``min_part`` tokens."""

    class_name: ClassVar[str] = "prefix_lm"
    split: tuple[float, float] = (0.5, 1.0)
    min_part: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "split", tuple(float(v) for v in self.split))
        if not 0.0 < self.split[0] <= self.split[1] <= 1.0:
            raise ConfigError(f"prefix_lm.split must satisfy 0 < lo <= hi <= 1, got {self.split}")

    def min_length(self) -> int:
        return 2 * self.min_part

    def name(self) -> str:
        return f"prefix_lm/{_len_tag(self.length)}/s{self.split[0]:g}-{self.split[1]:g}"


@dataclass(frozen=True)
class InfillingConfig(ObjectiveConfig):
    """Span corruption (T5 order: each target span is written after its sentinel).

    ``rate`` is the fraction of the chunk that is hidden (realised exactly up to rounding), ``mean_span`` the mean
    span length.
    """

    class_name: ClassVar[str] = "infilling"
    rate: float = 0.15
    mean_span: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.rate < 1.0:
            raise ConfigError(f"{self.class_name}.rate must lie in (0, 1), got {self.rate}")
        if self.mean_span < 1:
            raise ConfigError(f"{self.class_name}.mean_span must be >= 1, got {self.mean_span}")

    def min_length(self) -> int:
        return 4

    def name(self) -> str:
        return f"{self.class_name}/{_len_tag(self.length)}/r{self.rate:g}/s{self.mean_span:g}"


@dataclass(frozen=True)
class AutoencodingConfig(InfillingConfig):
    """BART-style: spans replaced by sentinels, the target is the whole original chunk.

    With ``shuffle`` the corrupted input is cut into chunks (the head, then one chunk per sentinel) which are
    permuted (AE + deshuffling).
    """

    class_name: ClassVar[str] = "autoencoding"
    shuffle: bool = False

    def name(self) -> str:
        return super().name() + ("/shuf" if self.shuffle else "")


@dataclass(frozen=True)
class CopyingObjectiveConfig(ObjectiveConfig):
    """Copying: input ``x``, target ``x``."""

    class_name: ClassVar[str] = "copying"

    def name(self) -> str:
        return f"copying/{_len_tag(self.length)}"


@dataclass(frozen=True)
class DeshufflingConfig(ObjectiveConfig):
    """Deshuffling: the tokens at ``floor(fraction · L)`` random positions are permuted; the target is ``x``."""

    class_name: ClassVar[str] = "deshuffling"
    fraction: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"deshuffling.fraction must lie in (0, 1], got {self.fraction}")

    def name(self) -> str:
        return f"deshuffling/{_len_tag(self.length)}/p{self.fraction:g}"


@dataclass(frozen=True)
class SelectiveCopyingObjectiveConfig(ObjectiveConfig):
    """Selective copying (paper A.5): copy ``n_spans`` spans of the context located by their delimiters.

    ``length`` is the context length, ``span_length`` the range of a span, ``delimiter`` the range of the
    delimiters before and after it; ``query_first`` puts the query before the context.
    """

    class_name: ClassVar[str] = "selective_copying"
    n_spans: int = 1
    query_first: bool = False
    span_length: tuple[int, int] = (4, 32)
    delimiter: tuple[int, int] = (1, 8)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "span_length", tuple(int(v) for v in self.span_length))
        object.__setattr__(self, "delimiter", tuple(int(v) for v in self.delimiter))
        _check_range("selective_copying.span_length", self.span_length)
        _check_range("selective_copying.delimiter", self.delimiter)
        if self.n_spans < 1:
            raise ConfigError(f"selective_copying.n_spans must be >= 1, got {self.n_spans}")
        if self.length[0] < self.min_length():
            raise ConfigError(
                f"selective_copying.length {self.length} is too short for {self.n_spans} spans of up to "
                f"{self.span_length[1]} tokens with delimiters of up to {self.delimiter[1]}; "
                f"need >= {self.min_length()}"
            )

    def min_length(self) -> int:
        return self.n_spans * (self.span_length[1] + 2 * self.delimiter[1])

    def name(self) -> str:
        q = "qfirst" if self.query_first else "qlast"
        return f"selective_copying/{_len_tag(self.length)}/k{self.n_spans}/{q}"


CONFIG_CLASSES: dict[str, type[ObjectiveConfig]] = {
    c.class_name: c
    for c in (
        NextTokenConfig,
        PrefixLMConfig,
        InfillingConfig,
        AutoencodingConfig,
        CopyingObjectiveConfig,
        DeshufflingConfig,
        SelectiveCopyingObjectiveConfig,
    )
}


def config_from_dict(data: dict[str, Any]) -> ObjectiveConfig:
    """Build a typed objective config from ``{"class": name, **fields}``; unknown classes or keys raise."""
    data = dict(data)
    cls_name = data.pop("class", None)
    if cls_name not in CONFIG_CLASSES:
        raise ConfigError(f"objective class must be one of {sorted(CONFIG_CLASSES)}, got {cls_name!r}")
    return from_dict(CONFIG_CLASSES[cls_name], data, where=f"objective {cls_name}")
