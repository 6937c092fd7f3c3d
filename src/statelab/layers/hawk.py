"""Hawk's temporal block: a causal conv and the Real-Gated Linear Recurrent Unit (RG-LRU, arXiv 2402.19427 §2.4),
causal or with a bidirectional prefix (Birdie, arXiv 2411.01030 A.4).

With ``x [B, T, M]`` and ``D`` recurrent channels::

    b = W_b x,  g = GeLU(W_g x)                       (recurrent branch and gate branch)
    c = Conv1D_K(b)                                   (causal, window cut at sample starts)
    r = σ(W_a c),  i = σ(W_x c)
    log a_t = κ · r_t · log σ(Λ)        (a_t = σ(Λ)^{κ r_t}, κ = 8)
    h_t = a_t ⊙ h_{t-1} + √(1 - a_t²) ⊙ (i_t ⊙ c_t)
    y = W_out(g ⊙ h)

The gradient of the square root is clipped at 1000 (the paper reports the model untrainable without it).
State: ``(h [B, D or D // 2] fp32, conv [B, D, K - 1])`` after the last token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from statelab.errors import StateMismatchError
from statelab.layers.bidirectional import segment_causal_conv, split_scan
from statelab.layers.protocol import Mixer, Segments

__all__ = ["HawkLayer", "bounded_sqrt"]

KAPPA = 8.0


class _BoundedSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * torch.clamp(0.5 / y, max=1000.0)


def bounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` whose derivative is clipped at 1000 (finite at ``x = 0``)."""
    return _BoundedSqrt.apply(x)


class HawkLayer(Mixer):
    """``y, (h, conv) = layer(x [B, T, M], state=None, *, lengths=None, segments=None)``.

    ``backend``: the linear scan, ``"parallel"`` (default) or ``"naive"`` (:mod:`statelab.ops.linear_scan`).
    ``positions`` is refused (the state is a tuple, not a record).
    """

    BACKENDS = ("parallel", "naive")  # the first is the default
    SUPPORTS = frozenset({"lengths", "segments"})

    def __init__(
        self,
        d_model: int,
        d_state: int,
        conv_kernel: int = 4,
        bidirectional: bool = False,
        backend: str = "parallel",
    ) -> None:
        super().__init__(backend)
        if bidirectional and d_state % 2:
            raise ValueError(f"a bidirectional Hawk layer needs an even d_state, got {d_state}")
        self.d_model, self.d_state, self.K, self.bidirectional = d_model, d_state, conv_kernel, bidirectional
        self.in_proj = nn.Linear(d_model, 2 * d_state)
        self.conv_weight = nn.Parameter(torch.randn(d_state, conv_kernel) / math.sqrt(conv_kernel))
        self.conv_bias = nn.Parameter(torch.zeros(d_state))
        self.gate_proj = nn.Linear(d_state, 2 * d_state)
        # σ(Λ)^κ spans [0.9, 0.999]: Λ = logit(a^(1/κ))
        a = torch.empty(d_state).uniform_(0.9, 0.999)
        self.Lambda = nn.Parameter(torch.logit(a ** (1.0 / KAPPA)))
        self.out_proj = nn.Linear(d_state, d_model)

    @property
    def state_dim(self) -> int:
        return self.d_state // 2 if self.bidirectional else self.d_state

    def zero_state(self, batch_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.zeros(batch_size, self.state_dim, device=device),
            torch.zeros(batch_size, self.d_state, self.K - 1, device=device),
        )

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        positions: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [B, T, M]`` and the state after the token before ``x[:, 0]`` -> ``(y [B, T, M], new state)`` (after
        each row's last real token); ``lengths`` and ``segments`` as in :mod:`statelab.layers.protocol`."""
        self.refuse_unsupported(positions=positions)
        seq_start, is_prefix = (None, None) if segments is None else segments
        B = x.shape[0]
        h0, conv0 = (None, None) if state is None else state
        if h0 is not None and (h0.shape != (B, self.state_dim) or conv0.shape != (B, self.d_state, self.K - 1)):
            raise StateMismatchError(
                f"Hawk state must be ([{B}, {self.state_dim}], [{B}, {self.d_state}, {self.K - 1}]), got "
                f"({tuple(h0.shape)}, {tuple(conv0.shape)})"
            )
        b, g = self.in_proj(x).chunk(2, dim=-1)
        c, conv = segment_causal_conv(b, self.conv_weight, self.conv_bias, conv0, seq_start, lengths)
        r, i = torch.sigmoid(self.gate_proj(c)).chunk(2, dim=-1)
        log_a = KAPPA * r.float() * F.logsigmoid(self.Lambda.float())
        mult = bounded_sqrt((1.0 - torch.exp(2.0 * log_a)).clamp_min(0.0))
        u = mult * (i * c).float()
        h, new_h = split_scan(log_a, u, h0, seq_start, is_prefix, self.bidirectional, self.backend, lengths)
        y = self.out_proj(F.gelu(g) * h.to(x.dtype))
        return y, (new_h, conv)
