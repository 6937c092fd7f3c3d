"""Mamba-2 SSD scan, naive reference: a plain fp32 loop over tokens (the ground truth for every fast path).

Structured state-space duality (Dao & Gu, "Transformers are SSMs", arXiv 2405.21060, §3 and §6): per head h
the state is a ``[P, N]`` matrix with a scalar decay per token,

    h_t = exp(Δ_t · A_h) · h_{t-1} + (Δ_t · x_t) ⊗ B_t        h_t ∈ R^{P×N}
    y_t = h_t · C_t + D_h · x_t

where ``B_t, C_t ∈ R^N`` are shared by the ``H / G`` heads of one group. Δ here is already the step size the
mixer uses (softplus of the projection plus ``dt_bias``, clamped to the time-step limits).

Shapes (letters from :mod:`statelab.glossary`):
    x ``[B, T, H, P]``, dt ``[B, T, H]``, A ``[H]``, Bm and Cm ``[B, T, G, N]``, D ``[H]``,
    states ``[B, H, P, N]``, ΣΔ ``[B, H]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from statelab.ops.scan_output import ScanOutput, check_positions, stack_at

__all__ = ["ScanOutput", "check_ssd_inputs", "ssd_scan_naive"]


def check_ssd_inputs(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    return_states_at: Sequence[int] | None,
) -> list[int] | None:
    """Validate shapes of an SSD call; returns the positions as a list of ints (or ``None``).

    Raises ``ValueError`` naming the expected shape when an input does not fit.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, P], got shape {tuple(x.shape)}")
    Bsz, T, H, P = x.shape
    if tuple(dt.shape) != (Bsz, T, H):
        raise ValueError(f"dt must be [B, T, H] = {(Bsz, T, H)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (H,):
        raise ValueError(f"A must be [H] = ({H},), got {tuple(A.shape)}")
    if Bm.dim() != 4 or tuple(Bm.shape[:2]) != (Bsz, T):
        raise ValueError(f"Bm must be [B, T, G, N] with B, T = {(Bsz, T)}, got {tuple(Bm.shape)}")
    if Cm.shape != Bm.shape:
        raise ValueError(f"Cm must have the shape of Bm {tuple(Bm.shape)}, got {tuple(Cm.shape)}")
    G, N = Bm.shape[2:]
    if G < 1 or H % G:
        raise ValueError(f"the number of heads H={H} must be a multiple of the number of groups G={G}")
    if D is not None and tuple(D.shape) != (H,):
        raise ValueError(f"D must be [H] = ({H},), got {tuple(D.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (Bsz, H, P, N):
        raise ValueError(f"initial_state must be [B, H, P, N] = {(Bsz, H, P, N)}, got {tuple(initial_state.shape)}")
    return check_positions("ssd_scan", return_states_at, T)


def ssd_scan_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states_at: Sequence[int] | None = None,
) -> ScanOutput:
    """Mamba-2 SSD scan, one token at a time in fp32.

    Args:
        x: ``[B, T, H, P]`` inputs (after the conv and its activation).
        dt: ``[B, T, H]`` step sizes Δ, already softplus-ed, biased and clamped.
        A: ``[H]``, negative (``-exp(A_log)``).
        Bm: ``[B, T, G, N]`` input projections, shared by the ``H / G`` heads of each group.
        Cm: ``[B, T, G, N]`` output projections.
        D: ``[H]`` skip weights, or ``None`` for no skip.
        initial_state: ``[B, H, P, N]``, the state before token 0 (``None`` = zeros).
        output_final_state: return the state after the last token.
        return_states_at: positions ``t`` in ``[0, T]``; the state after the first ``t`` tokens is returned for
            each (``0``: the initial state).

    Returns:
        :class:`~statelab.ops.ScanOutput` (``y`` in the dtype of ``x``; states and ΣΔ in fp32; ``states_at``
        ``[B, n_pos, H, P, N]``, ``sum_delta_at`` ``[B, n_pos, H]``).
    """
    pos = check_ssd_inputs(x, dt, A, Bm, Cm, D, initial_state, return_states_at)
    Bsz, T, H, P = x.shape
    G, N = Bm.shape[2:]
    rep = H // G
    xf, dtf, Af = x.float(), dt.float(), A.float()
    # group g serves heads [g * rep, (g + 1) * rep)
    Bh = Bm.float().repeat_interleave(rep, dim=2)  # [B, T, H, N]
    Ch = Cm.float().repeat_interleave(rep, dim=2)
    h = (
        initial_state.float()
        if initial_state is not None
        else torch.zeros(Bsz, H, P, N, dtype=torch.float32, device=x.device)
    )
    want = set(pos or ())
    captured: dict[int, torch.Tensor] = {0: h.clone()} if 0 in want else {}
    ys = []
    for t in range(T):
        decay = torch.exp(dtf[:, t] * Af)  # [B, H]
        u = dtf[:, t, :, None] * xf[:, t]  # [B, H, P]
        h = decay[:, :, None, None] * h + u[..., None] * Bh[:, t, :, None, :]
        y = (h * Ch[:, t, :, None, :]).sum(-1)  # [B, H, P]
        if D is not None:
            y = y + D.float()[:, None] * xf[:, t]
        ys.append(y)
        if t + 1 in want:
            captured[t + 1] = h.clone()
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(Bsz, 0, H, P)
    cums = torch.cat([dtf.new_zeros(Bsz, 1, H), torch.cumsum(dtf, dim=1)], dim=1)  # [B, T + 1, H]
    return ScanOutput(
        y=y.to(x.dtype),
        final_state=h if output_final_state else None,
        sum_delta=cums[:, T],
        states_at=None if pos is None else stack_at([captured[p] for p in pos], h),
        sum_delta_at=None if pos is None else cums[:, pos],
    )
