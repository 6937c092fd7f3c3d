"""RMS normalisation: the one RMSNorm of statelab, plain, grouped and gated.

RMSNorm (arXiv 1910.07467): ``y = w ⊙ x / sqrt(mean(x²) + eps)``.

Gated, grouped (Mamba-2, arXiv 2405.21060 §7): ``y = w ⊙ norm_g(x ⊙ silu(z))`` where ``norm_g`` normalises each
group of ``group_size`` consecutive channels separately (``group_size = D / n_groups``). This is the
"norm before gate = False" form used by Mamba-2 checkpoints and transformers' ``MambaRMSNormGated``.

Two rounding conventions (``style``), each kept bit for bit because checkpoints were trained with it:

* ``"mamba"`` (default; Mamba-1 and Mamba-2 blocks and mixers): statistics in fp32 whatever the input dtype, the
  weight applied after casting back to the input dtype (transformers' ``MambaRMSNorm``, mamba_ssm's ``RMSNorm``).
* ``"torch"`` (the Birdie stacks, the GD-SSM baselines, the Birdie reward model): statistics in the input dtype or
  fp32 if that is narrower, the weight applied before the one cast back (``torch.nn.RMSNorm``).

``eps=None`` is the machine epsilon of the dtype the statistics are computed in (``torch.nn.RMSNorm``'s default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "rms_norm", "NORM_STYLES"]

NORM_STYLES = ("mamba", "torch")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float | None = 1e-5,
    *,
    gate: torch.Tensor | None = None,
    group_size: int | None = None,
    style: str = "mamba",
) -> torch.Tensor:
    """``x [..., D]`` -> ``weight ⊙ norm(x ⊙ silu(gate))``, in ``x.dtype`` (times ``weight`` for ``"mamba"``).

    Args:
        x: the input ``[..., D]``.
        weight: the gain ``[D]``.
        eps: added to the mean square; ``None``: the machine epsilon of the statistics' dtype.
        gate: ``z [..., D]`` or None; the input is multiplied by ``silu(z)`` (in the statistics' dtype) before
            the norm.
        group_size: normalise each group of this many consecutive channels on its own (``D`` must be a multiple);
            None: all ``D`` channels together.
        style: ``"mamba"`` or ``"torch"``, the rounding convention (see the module doc).
    """
    if style == "mamba":
        compute = torch.float32
    elif style == "torch":
        compute = torch.promote_types(x.dtype, torch.float32)
    else:
        raise ValueError(f"rms_norm: unknown style {style!r}; choose one of {list(NORM_STYLES)}")
    if eps is None:
        eps = torch.finfo(compute).eps
    xc = x.to(compute)
    if gate is not None:
        xc = xc * F.silu(gate.to(compute))
    if group_size is None:
        y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    else:
        *lead, d = xc.shape
        if d % group_size:
            raise ValueError(f"rms_norm: channels {d} are not a multiple of group_size {group_size}")
        g = xc.reshape(*lead, d // group_size, group_size)
        y = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).reshape(*lead, d)
    if style == "mamba":
        return weight * y.to(x.dtype)
    return (y * weight.to(compute)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis: ``forward(x [..., D], gate [..., D] | None = None) -> [..., D]``.

    Args:
        dim: ``D``, the normalised axis.
        eps: see :func:`rms_norm` (``None``: the machine epsilon).
        group_size: per-group statistics over this many channels (Mamba-2's gated norm uses ``D / n_groups``);
            None: one group.
        style: ``"mamba"`` or ``"torch"`` (see the module doc).
        init: the initial value of every weight.
    """

    def __init__(
        self,
        dim: int,
        eps: float | None = 1e-5,
        *,
        group_size: int | None = None,
        style: str = "mamba",
        init: float = 1.0,
    ) -> None:
        super().__init__()
        if group_size is not None and (group_size < 1 or dim % group_size):
            raise ValueError(f"RMSNorm: dim {dim} must be a positive multiple of group_size {group_size}")
        if style not in NORM_STYLES:
            raise ValueError(f"RMSNorm: unknown style {style!r}; choose one of {list(NORM_STYLES)}")
        self.weight = nn.Parameter(torch.full((dim,), float(init)))
        self.eps = eps
        self.group_size = group_size
        self.style = style

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, gate=gate, group_size=self.group_size, style=self.style)

    def extra_repr(self) -> str:
        extra = "" if self.group_size is None else f", group_size={self.group_size}"
        extra += "" if self.style == "mamba" else f", style={self.style!r}"
        return f"{self.weight.shape[0]}, eps={self.eps}{extra}"
