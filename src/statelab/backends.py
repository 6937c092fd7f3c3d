"""Optional GPU kernels behind one capability check; the pure-torch paths always work.

``available_backends()`` says which SSD backends this process can run:

* ``"naive"`` and ``"chunk"``: always (pure torch, any device; ``"chunk"`` is the default everywhere);
* ``"cuda"``: when a CUDA device is present and the ``fla`` package (flash-linear-attention, Triton kernels) is
  importable.

The ``"cuda"`` SSD path maps the Mamba-2 scan onto fla's chunked simple-GLA kernel (a scalar per-head decay in log
space, arXiv 2312.06635 for GLA, 2405.21060 §3 for the SSD correspondence):

    q = C (per head), k = B (per head), v = Δ·x, log-decay g = Δ·A, scale 1, state [B, H, P, N] (V-first)
    y = o + D·x

which is exactly ``h_t = exp(Δ_t A) h_{t-1} + (Δ_t x_t) ⊗ B_t``, ``y_t = h_t C_t + D x_t``, with an initial state
and a final state, and gradients for all of them (including the initial state). States at intermediate
positions (``return_states_at``) are produced by splitting the call at those positions and continuing from each
state, which is exact. Nothing is imported from ``fla`` until a ``"cuda"`` scan runs.

Gradients: fla's backward of the gated kernel refuses to run (it would be wrong) with Triton in
``[3.4, 3.7.1)`` on Hopper GPUs (fla issue #640). There, a ``"cuda"`` call that needs gradients runs the
pure-torch chunked scan instead (:func:`kernel_backward_problem` says when); inference always uses the kernel.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from statelab.ops.scan_output import ScanOutput, stack_at
from statelab.ops.ssd.naive import check_ssd_inputs

__all__ = ["available_backends", "cuda_backend_problem", "kernel_backward_problem", "ssd_scan_cuda"]


def cuda_backend_problem() -> str | None:
    """Why the ``"cuda"`` backend cannot run here, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if importlib.util.find_spec("fla") is None:
        return "the fla package (flash-linear-attention) is not installed"
    return None


def kernel_backward_problem() -> str | None:
    """Why fla's backward cannot be used here, or ``None`` when it can (call only where the backend is available)."""
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    if IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1:
        return "fla's gated backward is incorrect with Triton >= 3.4, < 3.7.1 on Hopper GPUs (fla issue #640)"
    return None


def available_backends() -> tuple[str, ...]:
    """SSD backends usable in this process: ``("naive", "chunk")`` plus ``"cuda"`` when CUDA and fla are present."""
    return ("naive", "chunk") + (("cuda",) if cuda_backend_problem() is None else ())


def _kernel_segment(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    h0: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fla call: ``(y without the D skip [B, T, H, P] in x's dtype, final state [B, H, P, N] fp32)``."""
    from fla.ops.simple_gla import chunk_simple_gla

    Bsz, T, H, P = x.shape
    G, N = Bm.shape[2:]
    R = H // G
    # the kernel wants q/k/v in one dtype; fp32 inputs stay fp32, half inputs stay half
    cdt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    q = Cm[:, :, :, None].expand(Bsz, T, G, R, N).reshape(Bsz, T, H, N).to(cdt)
    k = Bm[:, :, :, None].expand(Bsz, T, G, R, N).reshape(Bsz, T, H, N).to(cdt)
    v = (x.float() * dt.float()[..., None]).to(cdt)
    g = dt.float() * A.float()  # log-decay per token and head, <= 0
    init = None if h0 is None else h0.float().contiguous()
    o, hT = chunk_simple_gla(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        g=g.contiguous(),
        scale=1.0,
        initial_state=init,
        output_final_state=True,
        state_v_first=True,
    )
    return o, hT.float()


def ssd_scan_cuda(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states_at: Sequence[int] | None = None,
    chunk_size: int = 64,
) -> ScanOutput:
    """Mamba-2 SSD scan with fla's Triton kernel; same arguments and result as ``ssd_scan_naive``.

    ``chunk_size`` is accepted for signature compatibility; the kernel uses its own tile size (results do not
    depend on it). Raises ``RuntimeError`` naming the reason when the backend is unavailable or the inputs are not
    on a CUDA device.
    """
    pos = check_ssd_inputs(x, dt, A, Bm, Cm, D, initial_state, return_states_at)
    problem = cuda_backend_problem()
    if problem is not None:
        raise RuntimeError(f"SSD backend 'cuda' is unavailable: {problem}; use backend='chunk'")
    if not x.is_cuda:
        raise RuntimeError(f"SSD backend 'cuda' needs CUDA tensors, got x on {x.device}")
    inputs = (x, dt, A, Bm, Cm, D, initial_state)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if wants_grad and kernel_backward_problem() is not None:
        from statelab.ops.ssd.chunk import ssd_scan_chunk

        return ssd_scan_chunk(*inputs, output_final_state, return_states_at, chunk_size=chunk_size)
    Bsz, T, H, P = x.shape
    cums = torch.cumsum(dt.float(), dim=1)
    cuts = sorted(set(pos or ())) + ([T] if not pos or max(pos) < T else [])
    h = initial_state
    ys, at = [], {}
    start = 0
    for end in cuts:
        if end == start:  # position 0 (the initial state, filled in below) or T == 0
            continue
        sl = slice(start, end)
        y, h = _kernel_segment(x[:, sl], dt[:, sl], A, Bm[:, sl], Cm[:, sl], h)
        ys.append(y)
        at[end] = h
        start = end
    if ys:
        y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]
        final = h.float()
    else:
        y = x.float()[:, :0].reshape(Bsz, 0, H, P)
        final = (
            initial_state.float()
            if initial_state is not None
            else x.new_zeros(Bsz, H, P, Bm.shape[-1], dtype=torch.float32)
        )
    y = y.float()
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    if pos is not None and 0 in pos:
        at[0] = (
            initial_state.float().clone()
            if initial_state is not None
            else x.new_zeros(Bsz, H, P, Bm.shape[-1], dtype=torch.float32)
        )
    cums = torch.cat([cums.new_zeros(Bsz, 1, H), cums], dim=1)  # [B, T + 1, H]
    return ScanOutput(
        y=y.to(x.dtype),
        final_state=final if output_final_state else None,
        sum_delta=cums[:, T],
        states_at=None if pos is None else stack_at([at[p].float() for p in pos], final),
        sum_delta_at=None if pos is None else cums[:, pos],
    )
