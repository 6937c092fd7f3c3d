"""One sampler for every mixture: a probability vector over objective configs, drawn per sample.

The Birdie controller, a fixed mixture (UL2-style ratios or uniform over classes) and plain next-token training all
feed :class:`ObjectiveSampler`; only who sets the probabilities differs. Sample ``i`` is a pure function of
``(seed, i, probabilities)``: it draws its config, its length and its place in the text from its own generator.
A failing objective is skipped and counted instead of stopping training (the public code aborted on one error).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from statelab.objectives.base import VOCAB, Example, ObjectiveConfig, Vocab
from statelab.objectives.corruption import apply_objective
from statelab.objectives.grid import class_uniform_probs
from statelab.objectives.packing import IGNORE, PackedBatch, Packer, pack_rows

__all__ = ["ObjectiveSampler", "SamplerStats", "validation_batch", "per_config_loss"]


@dataclass
class SamplerStats:
    """Per-config counters: samples drawn, tokens packed, realised masked fractions, skipped failures."""

    n: int
    samples: np.ndarray = field(init=False)
    tokens: np.ndarray = field(init=False)
    masked_sum: np.ndarray = field(init=False)
    masked_n: np.ndarray = field(init=False)
    failures: int = 0

    def __post_init__(self) -> None:
        self.samples = np.zeros(self.n, dtype=np.int64)
        self.tokens = np.zeros(self.n, dtype=np.int64)
        self.masked_sum = np.zeros(self.n)
        self.masked_n = np.zeros(self.n, dtype=np.int64)

    def realised_masked_fraction(self) -> np.ndarray:
        """Mean realised masked fraction per config (NaN where the notion does not apply or nothing was drawn)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.masked_n > 0, self.masked_sum / np.maximum(self.masked_n, 1), np.nan)


def _draw(text: np.ndarray, cfg: ObjectiveConfig, rng: np.random.Generator, seq_len: int, vocab: Vocab) -> Example:
    lo, hi = cfg.length
    lo = max(lo, cfg.min_length())
    hi = min(max(hi, lo), text.shape[0])
    L = int(rng.integers(lo, hi + 1))
    off = int(rng.integers(0, text.shape[0] - L + 1))
    ex = apply_objective(text[off : off + L], cfg, rng, vocab)
    if ex.packed_length > seq_len:
        raise ValueError(f"{cfg.name()} made an example of {ex.packed_length} tokens for rows of {seq_len}")
    return ex


class ObjectiveSampler:
    """Streams ``(example, config_id)`` from ``text`` with probabilities ``probs`` over ``configs``.

    Args:
        configs: the objective configurations (the arms).
        text: ``[n]`` int64 token ids of the training text.
        seq_len: row length the examples are packed into.
        seed: seed of the stream.
        probs: initial probabilities (default: uniform over classes, even within each).
    """

    def __init__(
        self,
        configs: Sequence[ObjectiveConfig],
        text: np.ndarray,
        seq_len: int,
        seed: int = 0,
        probs: np.ndarray | None = None,
        vocab: Vocab = VOCAB,
    ) -> None:
        if not configs:
            raise ValueError("ObjectiveSampler needs at least one objective config")
        self.configs = list(configs)
        self.text = np.asarray(text, dtype=np.int64)
        self.seq_len = seq_len
        self.seed = seed
        self.vocab = vocab
        self.stats = SamplerStats(len(self.configs))
        self._i = 0
        self.set_probs(class_uniform_probs(self.configs) if probs is None else probs)
        self._packer = Packer(self._stream(), seq_len, vocab)

    def set_probs(self, probs: np.ndarray) -> None:
        """Use ``probs [N]`` (non-negative, renormalised) for every sample drawn from now on."""
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != (len(self.configs),) or not np.all(np.isfinite(p)) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"probs must be {len(self.configs)} finite non-negative numbers with a positive sum")
        self.probs = p / p.sum()
        self._cdf = np.cumsum(self.probs)

    def _stream(self) -> Iterator[tuple[Example, int]]:
        while True:
            rng = np.random.default_rng([self.seed, self._i])
            self._i += 1
            cid = int(min(np.searchsorted(self._cdf, rng.random() * self._cdf[-1], side="right"), len(self._cdf) - 1))
            try:
                ex = _draw(self.text, self.configs[cid], rng, self.seq_len, self.vocab)
            except ValueError:
                self.stats.failures += 1
                continue
            self.stats.samples[cid] += 1
            self.stats.tokens[cid] += ex.packed_length
            if ex.masked_fraction is not None:
                self.stats.masked_sum[cid] += ex.masked_fraction
                self.stats.masked_n[cid] += 1
            yield ex, cid

    def next_batch(self, batch_size: int) -> PackedBatch:
        """``batch_size`` packed rows of ``seq_len``."""
        return self._packer.next_batch(batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the next sample index, the probabilities, the counters and the example the last
        batch could not fit (numpy arrays and plain data; see :mod:`statelab.train.state_tree`)."""
        st = self.stats
        return {
            "i": self._i,
            "probs": self.probs.copy(),
            "cdf": self._cdf.copy(),
            "stats": {
                "samples": st.samples.copy(),
                "tokens": st.tokens.copy(),
                "masked_sum": st.masked_sum.copy(),
                "masked_n": st.masked_n.copy(),
                "failures": st.failures,
            },
            "carry": [(dataclasses.asdict(ex), cid) for ex, cid in self._packer._carry],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where :meth:`state_dict` was taken (same configs, text and seed)."""
        if np.asarray(state["probs"]).shape != (len(self.configs),):
            raise ValueError(
                f"sampler state is for {len(state['probs'])} configs, this sampler has {len(self.configs)}"
            )
        self._i = int(state["i"])
        self.probs = np.array(state["probs"], dtype=np.float64)
        self._cdf = np.array(state["cdf"], dtype=np.float64)
        st = state["stats"]
        self.stats.samples[:] = st["samples"]
        self.stats.tokens[:] = st["tokens"]
        self.stats.masked_sum[:] = st["masked_sum"]
        self.stats.masked_n[:] = st["masked_n"]
        self.stats.failures = int(st["failures"])
        self._packer._carry = [(Example(**ex), int(cid)) for ex, cid in state["carry"]]


def validation_batch(
    configs: Sequence[ObjectiveConfig],
    text: np.ndarray,
    seq_len: int,
    n_per_config: int = 8,
    seed: int = 1234,
    vocab: Vocab = VOCAB,
) -> PackedBatch:
    """Fixed held-out samples, ``n_per_config`` per config, built and packed exactly like training rows."""
    text = np.asarray(text, dtype=np.int64)

    def gen():
        for cid, cfg in enumerate(configs):
            for j in range(n_per_config):
                yield _draw(text, cfg, np.random.default_rng([seed, cid, j]), seq_len, vocab), cid

    batch, _ = pack_rows(gen(), seq_len, vocab)
    return batch


def per_config_loss(token_loss: torch.Tensor, batch: PackedBatch, n_configs: int) -> torch.Tensor:
    """Mean loss per config ``[N]`` from per-position losses ``[B, T]`` (NaN for a config with no target)."""
    mask = batch.labels != IGNORE
    cid = batch.config_ids[mask]
    loss = token_loss[mask].double()
    total = torch.zeros(n_configs, dtype=torch.float64).index_add_(0, cid, loss)
    count = torch.zeros(n_configs, dtype=torch.float64).index_add_(0, cid, torch.ones_like(loss))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
