"""Reference selective scan (Mamba-1, arXiv 2312.00752 Algorithm 2): a plain fp32 loop over time.

For every channel ``d`` and state index ``n``, with Δ already positive (after softplus and bias)::

    h_t[d, n] = exp(Δ_t[d] · A[d, n]) · h_{t-1}[d, n] + Δ_t[d] · B_t[n] · u_t[d]
    y_t[d]    = Σ_n C_t[n] · h_t[d, n] + D[d] · u_t[d]

This file is the ground truth the fast path (``chunk.py``) is tested against: same signature, same outputs,
same final state, same ΣΔ, same gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from statelab.ops.scan_output import ScanOutput, check_positions

__all__ = ["ScanOutput", "selective_scan_naive", "check_scan_args"]


def check_scan_args(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D_skip: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    return_states_at: Sequence[int] | None,
) -> list[int] | None:
    """Validate shapes; return the positions as a list of ints (each in ``[0, T]``)."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [B, T, D], got {tuple(u.shape)}")
    Bsz, T, D = u.shape
    if tuple(delta.shape) != (Bsz, T, D):
        raise ValueError(f"selective_scan: delta must be [B, T, D]={(Bsz, T, D)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != D:
        raise ValueError(f"selective_scan: A must be [D={D}, N], got {tuple(A.shape)}")
    N = A.shape[1]
    for name, m in (("Bm", Bm), ("Cm", Cm)):
        if tuple(m.shape) != (Bsz, T, N):
            raise ValueError(f"selective_scan: {name} must be [B, T, N]={(Bsz, T, N)}, got {tuple(m.shape)}")
    if D_skip is not None and tuple(D_skip.shape) != (D,):
        raise ValueError(f"selective_scan: D_skip must be [D={D}], got {tuple(D_skip.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (Bsz, D, N):
        raise ValueError(
            f"selective_scan: initial_state must be [B, D, N]={(Bsz, D, N)}, got {tuple(initial_state.shape)}"
        )
    return check_positions("selective_scan", return_states_at, T)


def selective_scan_naive(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D_skip: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states_at: Sequence[int] | None = None,
) -> ScanOutput:
    """Selective scan, one token at a time, everything in fp32 (differentiable through autograd).

    Args:
        u: ``[B, T, D]`` inputs (after the conv).
        delta: ``[B, T, D]`` step sizes Δ, positive (softplus already applied).
        A: ``[D, N]`` continuous-time decay, negative.
        Bm, Cm: ``[B, T, N]`` input and output projections.
        D_skip: ``[D]`` skip connection or ``None``.
        initial_state: ``[B, D, N]`` state before ``u[:, 0]``; ``None`` = zeros.
        output_final_state: return the state after the last token.
        return_states_at: positions ``p`` in ``[0, T]``; the state after ``u[:, :p]`` is returned for each.
    """
    pos = check_scan_args(u, delta, A, Bm, Cm, D_skip, initial_state, return_states_at)
    Bsz, T, D = u.shape
    N = A.shape[1]
    uf, df, Af, Bf, Cf = u.float(), delta.float(), A.float(), Bm.float(), Cm.float()
    h = u.new_zeros(Bsz, D, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    states = [h]
    ys = []
    for t in range(T):
        a = torch.exp(df[:, t, :, None] * Af)  # [B, D, N]
        b = (df[:, t] * uf[:, t])[:, :, None] * Bf[:, t, None, :]
        h = a * h + b
        states.append(h)
        y = (h * Cf[:, t, None, :]).sum(-1)
        if D_skip is not None:
            y = y + D_skip.float() * uf[:, t]
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else uf.new_zeros(Bsz, 0, D)
    csum = torch.cat([df.new_zeros(Bsz, 1, D), df.cumsum(1)], dim=1)  # [B, T + 1, D]
    return ScanOutput(
        y=y.to(u.dtype),
        final_state=(h if T > 0 else h.clone()) if output_final_state else None,
        sum_delta=csum[:, T],
        states_at=None if pos is None else torch.stack([states[p] for p in pos], dim=1),
        sum_delta_at=None if pos is None else csum[:, pos],
    )
