"""Metrics the studies share: cosines of predictions and Jacobians, accuracy on scored positions.

Pure functions of tensors and arrays, computed in float64 (predictions of small fp32 models compared to fp64
references). ``experiments/gdssm.py`` compares a model with gradient descent by :func:`cosine` and
:func:`row_cosine`; ``experiments/birdie.py`` scores teacher-forced and generated answers by
:func:`masked_accuracy`.

Example:
    >>> import numpy as np, torch
    >>> cosine(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))
    1.0
    >>> masked_accuracy([np.array([5, 7, 9])], [np.array([5, 8, 9])], [np.array([True, True, False])])
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["cosine", "row_cosine", "masked_accuracy"]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors of the same size, read as flat vectors (0 when one of them is 0)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine along the last axis: ``a, b [..., n]`` (rows of Jacobians or predictions)."""
    a, b = a.double(), b.double()
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)).mean())


def masked_accuracy(
    predicted: Sequence[np.ndarray], targets: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> float:
    """Share of scored positions where the prediction equals the target, pooled over items.

    Item ``i`` compares ``predicted[i][:len(targets[i])]`` with ``targets[i]`` at the positions where ``masks[i]``
    (the same length as ``targets[i]``) is true; a prediction shorter than its target counts the missing positions
    as wrong. NaN when no position is scored.
    """
    hits = []
    for p, t, m in zip(predicted, targets, masks, strict=True):
        p, t, m = np.asarray(p), np.asarray(t), np.asarray(m, dtype=bool)
        if m.shape != t.shape:
            raise ValueError(f"a mask of shape {m.shape} for a target of shape {t.shape}")
        got = np.full(t.shape, False)
        n = min(p.shape[0], t.shape[0])
        got[:n] = p[:n] == t[:n]
        hits.append(got[m])
    scored = np.concatenate(hits) if hits else np.zeros(0, dtype=bool)
    return float(scored.mean()) if scored.size else float("nan")
