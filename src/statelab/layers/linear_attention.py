"""Causal linear self-attention (LSA) with the state API: ``y, state = lsa(x, state=None)``.

The mixer of von Oswald et al. (arXiv 2212.07677), made causal: per head,

    o_t = Σ_{j≤t} v_j (k_jᵀ q_t) = S_t q_t,      S_t = S_{t-1} + v_t k_tᵀ,      y_t = W_O [o_t]_heads

with ``q, k, v`` linear maps of the input, no softmax and no normalisation. The state ``S: [B, H, Dv, Dk]`` is the
fast-weight memory Σ v kᵀ "after token t". ``backend="parallel"`` (default) is the masked matmul form
``O = (Q Kᵀ ⊙ M) V + Q S_0ᵀ``; ``"naive"`` the fp32 loop it is tested equal to; chosen when the layer is built.

Letters: B batch, T time, M d_model, H heads, Dk key width, Dv value width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from statelab.errors import ConfigError, StateMismatchError
from statelab.layers.protocol import Mixer, Segments

__all__ = ["LinearSelfAttention"]


class LinearSelfAttention(Mixer):
    """Causal linear self-attention. ``forward(x [B, T, M], state=None) -> (y [B, T, M], S [B, H, Dv, Dk])``.

    Of the protocol's keywords (:mod:`statelab.layers.protocol`) it honours none: its state is one tensor.
    """

    BACKENDS = ("parallel", "naive")  # the first is the default

    def __init__(
        self,
        d_model: int,
        n_heads: int = 1,
        d_key: int | None = None,
        d_value: int | None = None,
        init_scale: float = 1.0,
        backend: str = "parallel",
    ) -> None:
        super().__init__(backend)
        if d_model < 1 or n_heads < 1:
            raise ConfigError(f"d_model and n_heads must be >= 1, got {d_model}, {n_heads}")
        self.h = n_heads
        self.dk = d_key or d_model
        self.dv = d_value or d_model
        std = init_scale / math.sqrt(d_model)
        self.q = nn.Parameter(torch.randn(n_heads * self.dk, d_model) * std)
        self.k = nn.Parameter(torch.randn(n_heads * self.dk, d_model) * std)
        self.v = nn.Parameter(torch.randn(n_heads * self.dv, d_model) * std)
        self.o = nn.Parameter(torch.randn(d_model, n_heads * self.dv) * init_scale / math.sqrt(n_heads * self.dv))

    def zero_state(self, batch_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(batch_size, self.h, self.dv, self.dk, dtype=dtype, device=self.q.device)

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        *,
        positions: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.refuse_unsupported(positions=positions, lengths=lengths, segments=segments)
        backend = self.backend
        B, T, M = x.shape
        if state is None:
            state = self.zero_state(B, x.dtype)
        if tuple(state.shape) != (B, self.h, self.dv, self.dk):
            raise StateMismatchError(f"LSA state must be {(B, self.h, self.dv, self.dk)}, got {tuple(state.shape)}")
        q = (x @ self.q.T).view(B, T, self.h, self.dk)
        k = (x @ self.k.T).view(B, T, self.h, self.dk)
        v = (x @ self.v.T).view(B, T, self.h, self.dv)
        if backend == "naive":
            acc = torch.promote_types(x.dtype, torch.float32)
            s = state.to(acc)
            outs = []
            for t in range(T):
                s = s + torch.einsum("bhv,bhk->bhvk", v[:, t].to(acc), k[:, t].to(acc))
                outs.append(torch.einsum("bhvk,bhk->bhv", s, q[:, t].to(acc)))
            o = torch.stack(outs, dim=1).to(x.dtype) if outs else x.new_zeros(B, 0, self.h, self.dv)
            new = s.to(x.dtype)
        elif backend == "parallel":
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = torch.einsum("bthk,bjhk->bhtj", q, k).masked_fill(~mask, 0.0)
            o = torch.einsum("bhtj,bjhv->bthv", scores, v) + torch.einsum("bhvk,bthk->bthv", state, q)
            new = state + torch.einsum("bthv,bthk->bhvk", v, k)
        else:
            raise ConfigError(f"backend must be 'naive' or 'parallel', got {backend!r}")
        return o.reshape(B, T, self.h * self.dv) @ self.o.T, new
