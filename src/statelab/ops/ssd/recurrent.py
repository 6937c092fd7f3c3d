"""Mamba-2 SSD, one token: the decode step (same recurrence as the naive loop, batched over heads, no loop).

Shapes: x ``[B, H, P]``, dt ``[B, H]``, A ``[H]``, Bm and Cm ``[B, G, N]``, D ``[H]``, state ``[B, H, P, N]``.
"""

from __future__ import annotations

import torch

__all__ = ["ssd_step"]


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    D: torch.Tensor | None,
    state: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of ``h = exp(Δ A) h + (Δ x) ⊗ B``, ``y = h C + D x`` (arXiv 2405.21060, eq. for the SSM).

    Args:
        x: ``[B, H, P]``; dt: ``[B, H]`` (post-softplus, clamped); A: ``[H]``; Bm, Cm: ``[B, G, N]``;
        D: ``[H]`` or ``None``; state: ``[B, H, P, N]``, the state before this token (not modified).
        out: optional fp32 ``[B, H, P, N]`` buffer that receives the new state (a fresh buffer of the caller's,
            never ``state`` itself; not differentiable). Saves one copy per layer when a model stacks layers.

    Returns:
        ``(y [B, H, P] in x's dtype, new_state [B, H, P, N] fp32)`` (``new_state`` is ``out`` when given).
    """
    Bsz, H, P = x.shape
    G, N = Bm.shape[1:]
    if tuple(state.shape) != (Bsz, H, P, N):
        raise ValueError(f"state must be [B, H, P, N] = {(Bsz, H, P, N)}, got {tuple(state.shape)}")
    if H % G:
        raise ValueError(f"the number of heads H={H} must be a multiple of the number of groups G={G}")
    R = H // G
    xf, dtf = x.float(), dt.float()
    decay = torch.exp(dtf * A.float())  # [B, H]
    Bh = Bm.float()[:, :, None].expand(Bsz, G, R, N).reshape(Bsz, H, 1, N)
    Ch = Cm.float()[:, :, None].expand(Bsz, G, R, N).reshape(Bsz, H, N, 1)
    u = (xf * dtf[..., None])[..., None]  # [B, H, P, 1]
    if out is not None:
        if out.dtype != torch.float32 or out.shape != state.shape or out.data_ptr() == state.data_ptr():
            raise ValueError("ssd_step: out must be a separate fp32 buffer shaped like state")
        new = torch.mul(state, decay[..., None, None], out=out).addcmul_(u, Bh)
    else:
        new = torch.addcmul(state.float() * decay[..., None, None], u, Bh)
    y = (new @ Ch).squeeze(-1)  # [B, H, P]
    if D is not None:
        y = y + xf * D.float()[:, None]
    return y.to(x.dtype), new
