"""The Gated SSM layer of Birdie (arXiv 2411.01030, A.3), causal or with a bidirectional prefix.

Per token, with ``x [B, T, M]`` and ``D`` recurrent channels::

    i = σ(W_i x),  z = W_z x,  o = GeLU(W_o x),  f = σ(W_f x)
    h_t = f_t ⊙ h_{t-1} + i_t ⊙ z_t
    y = W_out(o ⊙ h)

With ``bidirectional=True`` the ``D`` channels are split in half (:mod:`statelab.layers.bidirectional`): the
first half runs forward over prefix and suffix, the second backward over the prefix only; no parameters are added.

State: the forward channels after the last token, ``[B, D]`` (causal) or ``[B, D // 2]`` (bidirectional), fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from statelab.errors import StateMismatchError
from statelab.layers.bidirectional import split_scan
from statelab.layers.protocol import Mixer, Segments

__all__ = ["GatedSSMLayer"]


class GatedSSMLayer(Mixer):
    """``y, state = layer(x [B, T, M], state=None, *, lengths=None, segments=None)``.

    ``backend``: the linear scan, ``"parallel"`` (default) or ``"naive"`` (:mod:`statelab.ops.linear_scan`).
    ``positions`` is refused (the state is one tensor, not a record).
    """

    BACKENDS = ("parallel", "naive")  # the first is the default
    SUPPORTS = frozenset({"lengths", "segments"})

    def __init__(self, d_model: int, d_state: int, bidirectional: bool = False, backend: str = "parallel") -> None:
        super().__init__(backend)
        if bidirectional and d_state % 2:
            raise ValueError(f"a bidirectional gated SSM needs an even d_state, got {d_state}")
        self.d_model, self.d_state, self.bidirectional = d_model, d_state, bidirectional
        self.in_proj = nn.Linear(d_model, 4 * d_state)
        self.out_proj = nn.Linear(d_state, d_model)
        with torch.no_grad():  # forget gates start near 0.9-0.99: memory from the first step
            self.in_proj.bias[3 * d_state :].uniform_(2.0, 4.5)
        # W_f (rows 3D..4D of the fused projection) is a decay: no weight decay on it (Birdie A.8); the training
        # loop's param_groups reads this map of parameter name -> [start, stop) rows exempt from decay
        self.no_weight_decay_rows = {"in_proj.weight": (3 * d_state, 4 * d_state)}

    @property
    def state_dim(self) -> int:
        return self.d_state // 2 if self.bidirectional else self.d_state

    def zero_state(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(batch_size, self.state_dim, device=device)

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        *,
        positions: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, M]``, ``state [B, state_dim]`` (after the token before ``x[:, 0]``) -> ``(y [B, T, M],
        state after the last real token)``; ``lengths`` and ``segments`` as in :mod:`statelab.layers.protocol`."""
        self.refuse_unsupported(positions=positions)
        seq_start, is_prefix = (None, None) if segments is None else segments
        if state is not None and state.shape != (x.shape[0], self.state_dim):
            raise StateMismatchError(
                f"gated SSM state must be {(x.shape[0], self.state_dim)}, got {tuple(state.shape)}"
            )
        i, z, o, f = self.in_proj(x).chunk(4, dim=-1)
        log_f = F.logsigmoid(f.float())  # decays in fp32
        u = torch.sigmoid(i) * z
        h, new = split_scan(log_f, u, state, seq_start, is_prefix, self.bidirectional, self.backend, lengths)
        y = self.out_proj(F.gelu(o) * h.to(x.dtype))
        return y, new
