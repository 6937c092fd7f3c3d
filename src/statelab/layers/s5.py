"""An S5-style diagonal linear SSM with the state API: ``y, h = s5(u, state=None)``.

Smith, Warrington, Linderman, "Simplified state space layers for sequence modeling" (arXiv 2208.04933): one
multi-input multi-output SSM with a complex diagonal state matrix, zero-order-hold discretisation,

    Λ̄ = exp(Λ Δ),  B̄ = (Λ̄ − 1)/Λ · B,  h_t = Λ̄ ⊙ h_{t-1} + B̄ u_t,  y_t = Re(C h_t) + D ⊙ u_t

with ``Λ = −exp(log_neg_re) + i·im`` initialised as S4D-Lin (−½ + iπn) and ``Δ = exp(log_step)``. This is the
model the GD-SSM layer is built from, without the windowed bilinear input and the gated readout.

The recurrence runs through :func:`statelab.ops.diag_scan.diag_scan` (``backend="naive"``: the loop; ``"chunk"``:
chunks of Q steps through a table of ``Λ̄^{t-j}``), chosen when the layer is built.

Letters: B batch, T time, M d_model, P state size (complex). The state ``h: [B, P]`` (complex64) is "after token t".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from statelab.errors import ConfigError, StateMismatchError
from statelab.layers.protocol import Mixer, Segments
from statelab.ops.diag_scan import diag_scan

__all__ = ["S5Layer"]


class S5Layer(Mixer):
    """S5 SSM. ``forward(u [B, T, M], state=None) -> (y [B, T, M], h [B, P] complex64)``.

    ``backend``: ``"chunk"`` (default) or ``"naive"`` (:mod:`statelab.ops.diag_scan`); ``chunk_size``: steps per
    chunk. Of the protocol's keywords (:mod:`statelab.layers.protocol`) it honours none: its state is one tensor.
    """

    BACKENDS = ("chunk", "naive")  # the first is the default

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        backend: str = "chunk",
        chunk_size: int = 32,
    ) -> None:
        super().__init__(backend)
        self.chunk_size = chunk_size
        if d_model < 1 or d_state < 1:
            raise ConfigError(f"d_model and d_state must be >= 1, got {d_model}, {d_state}")
        self.m, self.p = d_model, d_state
        self.log_neg_re = nn.Parameter(torch.full((d_state,), math.log(0.5)))
        self.im = nn.Parameter(math.pi * torch.arange(d_state, dtype=torch.float32))
        self.log_step = nn.Parameter(torch.empty(d_state).uniform_(math.log(dt_min), math.log(dt_max)))
        self.B_re = nn.Parameter(torch.randn(d_state, d_model) / math.sqrt(2 * d_model))
        self.B_im = nn.Parameter(torch.randn(d_state, d_model) / math.sqrt(2 * d_model))
        self.C_re = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(2 * d_state))
        self.C_im = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(2 * d_state))
        self.D = nn.Parameter(torch.ones(d_model))

    def zero_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, self.p, dtype=torch.complex64, device=self.D.device)

    def discretise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``log Λ̄ = ΛΔ: [P]`` and ``B̄: [P, M]`` (complex, zero-order hold)."""
        lam = torch.complex(-self.log_neg_re.exp(), self.im)
        log_decay = lam * self.log_step.exp()
        b_bar = ((log_decay.exp() - 1) / lam)[:, None] * torch.complex(self.B_re, self.B_im)
        return log_decay, b_bar

    def forward(
        self,
        u: torch.Tensor,
        state: torch.Tensor | None = None,
        *,
        positions: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``u [B, T, M]`` after ``state [B, P]`` complex64 (the state after the token before ``u[:, 0]``) ->
        ``(y [B, T, M], the state after the last token)``."""
        self.refuse_unsupported(positions=positions, lengths=lengths, segments=segments)
        if u.dim() != 3 or u.shape[2] != self.m:
            raise ConfigError(f"input must be [B, T, {self.m}], got {tuple(u.shape)}")
        if state is None:
            state = self.zero_state(u.shape[0])
        if tuple(state.shape) != (u.shape[0], self.p) or not state.is_complex():
            raise StateMismatchError(f"S5 state must be complex [B, P] = {(u.shape[0], self.p)}, got {state.shape}")
        log_decay, b_bar = self.discretise()
        bu = torch.einsum("pm,btm->btp", b_bar, u.to(b_bar.dtype))
        scan = diag_scan(bu, log_decay, None, state.to(b_bar.dtype), backend=self.backend, chunk_size=self.chunk_size)
        hs = scan.y
        y = torch.einsum("mp,btp->btm", torch.complex(self.C_re, self.C_im), hs).real + self.D * u
        new = hs[:, -1] if hs.shape[1] else state
        return y.to(u.dtype), new.to(torch.complex64)
