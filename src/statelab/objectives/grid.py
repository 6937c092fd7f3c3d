"""The paper's control grids (Birdie A.2, 96 configurations) and the fixed mixtures (UL2, decoder-only UL2).

Length ranges are the paper's values for a 2,048-token context, multiplied by ``seq_len / 2048`` (rates, mean
spans and the number of configurations are kept). A range whose packed example could not fit one row
(copying and deshuffling pack to about twice their length) is capped to fit, and selective copying's span and
delimiter lengths scale with a floor so that four spans still fit its context.

| class              | controls                                                         | configs |
|--------------------|------------------------------------------------------------------|---------|
| next-token         | —                                                                | 1       |
| prefix-LM          | split uniform in [0.5 L, L]                                      | 1       |
| infilling          | length {128-256, ..., 1024-2048} × rate {5,15,50}% × span {3,8,32} | 36    |
| autoencoding       | length {192-384, 384-768, 768-1536} × {15,85}% × span {3,8,32} × shuffle | 36 |
| copying            | length {64-256, 256-2048}                                        | 2       |
| deshuffling        | length {128-256, 512-1024} × shuffled {50,100}%                  | 4       |
| selective copying  | spans {1..4} × query {first, last} × context {384-768, 768-1536}  | 16      |
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from statelab.objectives.base import (
    AutoencodingConfig,
    CopyingObjectiveConfig,
    DeshufflingConfig,
    InfillingConfig,
    NextTokenConfig,
    ObjectiveConfig,
    PrefixLMConfig,
    SelectiveCopyingObjectiveConfig,
)

__all__ = ["birdie_grid", "ul2_configs", "ul2_probs", "class_uniform_probs", "decoder_ul2_probs", "grid_summary"]


def _scale(rng: tuple[int, int], s: float, cap: int, floor: int = 4) -> tuple[int, int]:
    lo = max(floor, round(rng[0] * s))
    hi = max(lo, min(cap, round(rng[1] * s)))
    lo = min(lo, hi)
    return (lo, hi)


def birdie_grid(seq_len: int = 2048) -> list[ObjectiveConfig]:
    """The 96 Birdie configurations scaled to rows of ``seq_len`` tokens (order: the table above)."""
    if seq_len < 64:
        raise ValueError(f"the Birdie grid needs rows of at least 64 tokens, got {seq_len}")
    s = seq_len / 2048
    full = seq_len - 1  # next-token and prefix-LM pack to L (+1 for prefix-LM's [BEGIN])
    infill = 3 * (seq_len - 1) // 4  # infilling packs to L + 2 S + 1 <= 4 L / 3 + 1 (S <= L / 6 in this grid)
    half = (seq_len - 2) // 2  # copying and the denoisers pack to 2 L + 2
    out: list[ObjectiveConfig] = [NextTokenConfig(length=_scale((1024, 2048), s, seq_len))]
    out.append(PrefixLMConfig(length=_scale((1024, 2048), s, full, floor=8)))
    for length in ((128, 256), (256, 512), (512, 1024), (1024, 2048)):
        for rate in (0.05, 0.15, 0.5):
            for span in (3.0, 8.0, 32.0):
                out.append(InfillingConfig(length=_scale(length, s, infill), rate=rate, mean_span=span))
    for shuffle in (False, True):
        for length in ((192, 384), (384, 768), (768, 1536)):
            for rate in (0.15, 0.85):
                for span in (3.0, 8.0, 32.0):
                    out.append(
                        AutoencodingConfig(length=_scale(length, s, half), rate=rate, mean_span=span, shuffle=shuffle)
                    )
    for length in ((64, 256), (256, 2048)):
        out.append(CopyingObjectiveConfig(length=_scale(length, s, half)))
    for length in ((128, 256), (512, 1024)):
        for frac in (0.5, 1.0):
            out.append(DeshufflingConfig(length=_scale(length, s, half), fraction=frac))
    span_hi = max(8, round(32 * s))
    delim_hi = max(4, round(8 * s))
    span_len = (min(4, span_hi), span_hi)
    delim = (1, delim_hi)
    for k in (1, 2, 3, 4):
        for query_first in (True, False):
            for length in ((384, 768), (768, 1536)):
                need = k * (span_len[1] + 2 * delim[1])
                room = seq_len - 1 - k * (span_len[1] + 2 * delim[1] + 3) - 4  # context + query + answer
                lo, hi = _scale(length, s, room)
                lo = max(lo, need)
                hi = max(hi, lo)
                out.append(
                    SelectiveCopyingObjectiveConfig(
                        length=(lo, hi), n_spans=k, query_first=query_first, span_length=span_len, delimiter=delim
                    )
                )
    return out


def ul2_configs(seq_len: int = 2048) -> list[ObjectiveConfig]:
    """UL2's denoisers (paper A.6, Table 5): R = (3, 15%), (8, 15%); X = (3, 50%), (8, 50%), (64, 15%),
    (64, 50%); S = prefix-LM at split 0.75. Lengths span the row."""
    length = (max(8, seq_len // 4), (seq_len * 2) // 3)  # packs to <= 4 L / 3 + 1 with spans >= 3
    out: list[ObjectiveConfig] = [
        InfillingConfig(length=length, rate=r, mean_span=m)
        for (m, r) in ((3, 0.15), (8, 0.15), (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5))
    ]
    out.append(PrefixLMConfig(length=(max(8, seq_len // 2), seq_len - 1), split=(0.75, 0.75)))
    return out


def ul2_probs(configs: Sequence[ObjectiveConfig]) -> np.ndarray:
    """UL2's S:R:X = 1:1:1 over :func:`ul2_configs` (the public code's ratio; the paper's is unpublished), even
    within each denoiser family. R = infilling at 15% with mean span <= 8, X = the other infillings, S = prefix-LM."""

    def family(c: ObjectiveConfig) -> str:
        if c.class_name == "prefix_lm":
            return "S"
        if c.class_name == "infilling":
            return "R" if c.rate <= 0.15 and c.mean_span <= 8 else "X"
        raise ValueError(f"ul2_probs expects infilling and prefix-LM configs, got {c.class_name}")

    fam = [family(c) for c in configs]
    counts = Counter(fam)
    p = np.array([1.0 / (len(counts) * counts[f]) for f in fam])
    return p / p.sum()


def class_uniform_probs(configs: Sequence[ObjectiveConfig]) -> np.ndarray:
    """Uniform over the classes present, even within each class (the spec's stand-in for "Fixed Ratio")."""
    counts = Counter(c.class_name for c in configs)
    p = np.array([1.0 / (len(counts) * counts[c.class_name]) for c in configs])
    return p / p.sum()


def decoder_ul2_probs(configs: Sequence[ObjectiveConfig]) -> np.ndarray:
    """Decoder-only UL2 (paper Table 6) over ``[next_token, prefix_lm, infill(3, 15%), infill(32, 50%)]`` style
    lists: 60% next-token, 20% prefix-LM, the rest split evenly over the infilling configs."""
    w = {"next_token": 0.6, "prefix_lm": 0.2, "infilling": 0.2}
    counts = Counter(c.class_name for c in configs)
    if set(counts) - set(w):
        raise ValueError(f"decoder_ul2_probs expects next_token, prefix_lm and infilling configs, got {sorted(counts)}")
    p = np.array([w[c.class_name] / counts[c.class_name] for c in configs])
    return p / p.sum()


def grid_summary(configs: Sequence[ObjectiveConfig]) -> dict[str, int]:
    """Configurations per class."""
    return dict(Counter(c.class_name for c in configs))
