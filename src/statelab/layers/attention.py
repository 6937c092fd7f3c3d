"""Causal softmax self-attention with a key/value cache as its state: ``y, (k, v) = attn(x, state=None)``.

Multi-head scaled dot-product attention (Vaswani et al., arXiv 1706.03762) restricted to the past. The state is
the cache of keys and values of every token read so far, ``([B, H, t, Dh], [B, H, t, Dh])`` "after token t"; a
continuation attends to the cache and returns a longer one (new tensors; the given cache is not modified).

``backend="parallel"`` (default): one masked softmax; ``"naive"``: one query at a time over its visible keys (fp32);
chosen when the layer is built.

Letters: B batch, T time, M d_model, H heads, Dh = M / H.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from statelab.errors import ConfigError, StateMismatchError
from statelab.layers.protocol import Mixer, Segments

__all__ = ["CausalSelfAttention"]

KVCache = tuple[torch.Tensor, torch.Tensor]


class CausalSelfAttention(Mixer):
    """``forward(x [B, T, M], state=None) -> (y [B, T, M], (k, v) [B, H, t + T, Dh] each)``.

    Of the protocol's keywords (:mod:`statelab.layers.protocol`) it honours none: its state is a cache.
    """

    BACKENDS = ("parallel", "naive")  # the first is the default

    def __init__(self, d_model: int, n_heads: int = 2, backend: str = "parallel") -> None:
        super().__init__(backend)
        if d_model % n_heads:
            raise ConfigError(f"d_model {d_model} must be a multiple of n_heads {n_heads}")
        self.h, self.dh = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def zero_state(self, batch_size: int, dtype: torch.dtype = torch.float32) -> KVCache:
        empty = torch.zeros(batch_size, self.h, 0, self.dh, dtype=dtype, device=self.out.weight.device)
        return empty, empty.clone()

    def forward(
        self,
        x: torch.Tensor,
        state: KVCache | None = None,
        *,
        positions: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        self.refuse_unsupported(positions=positions, lengths=lengths, segments=segments)
        backend = self.backend
        B, T, M = x.shape
        if state is None:
            state = self.zero_state(B, x.dtype)
        k0, v0 = state
        if k0.shape[:2] != (B, self.h) or k0.shape[3] != self.dh or k0.shape != v0.shape:
            raise StateMismatchError(f"KV cache must be [B={B}, H={self.h}, t, {self.dh}], got {tuple(k0.shape)}")
        q, k, v = (self.qkv(x).view(B, T, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)).unbind(0)
        k_all, v_all = torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)
        past = k0.shape[2]
        scale = 1.0 / math.sqrt(self.dh)
        if backend == "parallel":
            visible = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            scores = (q @ k_all.transpose(-1, -2)) * scale
            o = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v_all
        elif backend == "naive":
            acc = torch.promote_types(x.dtype, torch.float32)
            rows = []
            for t in range(T):
                kk, vv = k_all[:, :, : past + t + 1].to(acc), v_all[:, :, : past + t + 1].to(acc)
                w = (torch.einsum("bhd,bhsd->bhs", q[:, :, t].to(acc), kk) * scale).softmax(-1)
                rows.append(torch.einsum("bhs,bhsd->bhd", w, vv).to(x.dtype))
            o = torch.stack(rows, dim=2) if rows else q
        else:
            raise ConfigError(f"backend must be 'naive' or 'parallel', got {backend!r}")
        return self.out(o.transpose(1, 2).reshape(B, T, M)), (k_all, v_all)
