"""RMS normalisation, plain (Mamba-1 and Mamba-2 blocks) and gated (the Mamba-2 mixer output).

RMSNorm (arXiv 1910.07467): ``y = w ⊙ x / sqrt(mean(x²) + eps)``, statistics computed in fp32 whatever the
input dtype, the weight applied after casting back (as in transformers' ``MambaRMSNorm`` and mamba_ssm's
``RMSNorm``, so checkpoints give the same numbers).

Gated RMSNorm (Mamba-2, arXiv 2405.21060 §7): ``y = w ⊙ norm_g(x ⊙ silu(z))`` where ``norm_g`` normalises each
group of ``group_size`` consecutive channels separately (``group_size = D / n_groups``). This is the
"norm before gate = False" form used by Mamba-2 checkpoints and transformers' ``MambaRMSNormGated``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "GatedRMSNorm", "rms_norm", "gated_rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., M]`` -> ``weight ⊙ x / rms(x)``; statistics in fp32, result in ``x.dtype`` times ``weight``."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def gated_rms_norm(
    x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int
) -> torch.Tensor:
    """``x, z [..., D]`` -> ``weight ⊙ norm_g(x ⊙ silu(z))`` with per-group statistics over ``group_size`` channels."""
    dtype = x.dtype
    xf = x.float()
    if z is not None:
        xf = xf * F.silu(z.float())
    *lead, d = xf.shape
    if d % group_size:
        raise ValueError(f"gated_rms_norm: channels {d} are not a multiple of group_size {group_size}")
    g = xf.reshape(*lead, d // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight * g.reshape(*lead, d).to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. ``x [..., M] -> [..., M]``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """Gated, grouped RMSNorm of Mamba-2. ``forward(x [..., D], z [..., D] | None) -> [..., D]``.

    ``group_size`` defaults to ``D`` (one group); Mamba-2 uses ``D / n_groups``.
    """

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None) -> None:
        super().__init__()
        group_size = dim if group_size is None else group_size
        if group_size < 1 or dim % group_size:
            raise ValueError(f"GatedRMSNorm: dim {dim} must be a positive multiple of group_size {group_size}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}"
