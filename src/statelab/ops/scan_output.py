"""The one result type of every scan in :mod:`statelab.ops`, and the one way positions are read.

See the :mod:`statelab.ops` docstring for the convention; this module only holds the type and the position check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["ScanOutput", "check_positions", "stack_at"]


class ScanOutput(NamedTuple):
    """Result of a scan (selective scan, SSD, diagonal scan, linear scan).

    Attributes:
        y: ``[B, T, ...]``, the per-token output of the op (in the input dtype unless the op says otherwise).
        final_state: ``[B, *S]``, the state after the last token of the call, or ``None`` unless asked for
            (``output_final_state=True``).
        sum_delta: ``[B, ...]`` fp32, ΣΔ over the call's tokens, for the scans that have a step size Δ (selective
            scan, SSD); ``None`` for the others.
        states_at: ``[B, P, *S]``, one state per requested position, stacked on axis 1 in the order asked; the
            entry for position ``p`` is the state after the first ``p`` tokens of this call (``p = 0``: the
            initial state). ``None`` when no positions were requested.
        sum_delta_at: ``[B, P, ...]`` fp32, ΣΔ over the first ``p`` tokens for each position (``None`` when there
            are no positions or the op has no Δ).
    """

    y: torch.Tensor
    final_state: torch.Tensor | None
    sum_delta: torch.Tensor | None = None
    states_at: torch.Tensor | None = None
    sum_delta_at: torch.Tensor | None = None


def check_positions(op: str, positions: Sequence[int] | None, T: int) -> list[int] | None:
    """``positions`` as a list of ints, each in ``[0, T]``; a ``ValueError`` naming ``op`` and the range otherwise."""
    if positions is None:
        return None
    pos = [int(p) for p in positions]
    bad = [p for p in pos if p < 0 or p > T]
    if bad:
        raise ValueError(
            f"{op}: return_states_at must lie in [0, T={T}] (positions must lie in that range: 0 is the initial "
            f"state, T the state after the last token), got {bad}"
        )
    return pos


def stack_at(states: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """States at positions (each ``[B, *S]``) stacked on axis 1 as ``[B, P, *S]``; no states give ``P = 0``, shaped
    and typed like ``like [B, *S]``."""
    if not states:
        return like.new_empty(like.shape[0], 0, *like.shape[1:])
    return torch.stack(list(states), dim=1)
