"""Mamba-2 SSD scan: naive fp32 loop (ground truth), chunked CPU/GPU path, single-token step, optional kernel.

``ssd_scan(..., backend=...)`` picks the implementation explicitly:

* ``"naive"``: :func:`~statelab.ops.ssd.naive.ssd_scan_naive`, one token at a time;
* ``"chunk"`` (default): :func:`~statelab.ops.ssd.chunk.ssd_scan_chunk`, pure torch, any device;
* ``"cuda"``: a Triton kernel through :mod:`statelab.backends` (needs CUDA and ``fla``; see
  :func:`statelab.backends.available_backends`).

All three take the same arguments and return the same :class:`ScanOutput`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from statelab.ops.ssd.chunk import DEFAULT_CHUNK_SIZE, ssd_scan_chunk
from statelab.ops.ssd.naive import ScanOutput, ssd_scan_naive
from statelab.ops.ssd.recurrent import ssd_step

__all__ = ["BACKENDS", "ScanOutput", "ssd_scan", "ssd_scan_chunk", "ssd_scan_naive", "ssd_step"]

BACKENDS = ("naive", "chunk", "cuda")


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states_at: Sequence[int] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "chunk",
) -> ScanOutput:
    """Mamba-2 SSD scan with an explicit ``backend``; arguments as in :func:`ssd_scan_naive`.

    ``chunk_size`` is used by ``"chunk"`` (and by ``"cuda"``, which rounds it to a power of two).
    """
    if backend == "naive":
        return ssd_scan_naive(x, dt, A, Bm, Cm, D, initial_state, output_final_state, return_states_at)
    if backend == "chunk":
        return ssd_scan_chunk(x, dt, A, Bm, Cm, D, initial_state, output_final_state, return_states_at, chunk_size)
    if backend == "cuda":
        from statelab.backends import ssd_scan_cuda

        return ssd_scan_cuda(x, dt, A, Bm, Cm, D, initial_state, output_final_state, return_states_at, chunk_size)
    raise ValueError(f"unknown SSD backend {backend!r}; expected one of {BACKENDS}")
