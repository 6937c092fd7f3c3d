"""Mamba-1 selective scan: ``naive`` (fp32 reference loop) and ``chunk`` (fast CPU path), one signature.

``selective_scan(u, delta, A, Bm, Cm, D_skip, initial_state, output_final_state, return_states_at, backend=...)``
returns a ``ScanOutput(y, final_state, sum_delta, states_at, sum_delta_at)``; see ``naive.py`` for the
recurrence and shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from statelab.ops.selective_scan.chunk import selective_scan_chunk
from statelab.ops.selective_scan.naive import ScanOutput, selective_scan_naive

__all__ = ["ScanOutput", "selective_scan", "selective_scan_naive", "selective_scan_chunk", "BACKENDS"]

BACKENDS = {"naive": selective_scan_naive, "chunk": selective_scan_chunk}


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D_skip: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states_at: Sequence[int] | None = None,
    backend: str = "chunk",
) -> ScanOutput:
    """Selective scan with the chosen ``backend`` (``"chunk"`` by default, ``"naive"`` for the reference)."""
    fn = BACKENDS.get(backend)
    if fn is None:
        raise ValueError(f"selective_scan: unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return fn(u, delta, A, Bm, Cm, D_skip, initial_state, output_final_state, return_states_at)
