"""The Mamba-1 mixer (arXiv 2312.00752, Fig. 3 and Algorithm 2) with explicit state in and out.

One layer, for ``x [B, T, M]`` (after the block's RMSNorm)::

    [u' ; z]   = in_proj(x)                              u', z: [B, T, D]
    u          = silu(causal_conv1d(u'))                 conv state = last K - 1 values of u'
    [δ ; B ; C] = x_proj(u)                              δ: [B, T, R], B, C: [B, T, N]
    Δ          = softplus(dt_proj(δ))                    dt_proj has the Δ bias, [B, T, D]
    y          = selective_scan(u, Δ, A = -exp(A_log), B, C, D)
    out        = out_proj(y ⊙ silu(z))

Parameter names follow the reference implementation (``in_proj``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``,
``out_proj``) except the conv, stored as ``conv_weight [D, K]`` and ``conv_bias [D]`` (``conv1d.weight
[D, 1, K]`` in checkpoints). Initialisation follows mamba_ssm ``Mamba.__init__``: S4D-real ``A``, Δ bias the
inverse softplus of log-uniform values in ``[dt_min, dt_max]``, ``D = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from statelab.layers.decode import Matvec, matvec
from statelab.layers.protocol import Mixer, Segments
from statelab.ops.conv1d import causal_conv1d, conv_state_after, conv_states_at
from statelab.ops.selective_scan import selective_scan

__all__ = ["Mamba1Mixer", "MixerState", "StepWeights"]


class MixerState(NamedTuple):
    """One layer's state after some tokens: ``conv [B, D, K - 1]``, ``ssm [B, D, N]`` (fp32), ``sum_delta [B, D]``.

    ``at``: the states after the ``positions`` a call asked for, each part stacked on axis 1 (``conv [B, P, D,
    K - 1]``, ``ssm [B, P, D, N]``, ``sum_delta [B, P, D]``), or ``None`` (:mod:`statelab.layers.protocol`).
    """

    conv: torch.Tensor
    ssm: torch.Tensor
    sum_delta: torch.Tensor
    at: MixerState | None = None


class StepWeights(NamedTuple):
    """What one decode step of a mixer reads (:meth:`Mamba1Mixer.step_weights`): the four projections as
    :class:`~statelab.layers.decode.Matvec` (``dt_proj`` in fp32), ``A [D, N]`` and ``D [D]`` fp32, the conv taps
    ``[D, K]`` and bias ``[D]`` (or ``None``) in the input projection's dtype."""

    in_proj: Matvec
    x_proj: Matvec
    dt_proj: Matvec
    out_proj: Matvec
    A: torch.Tensor
    D: torch.Tensor
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None


class Mamba1Mixer(Mixer):
    """Mamba-1 mixer. ``forward(x [B, T, M], state=None, *, positions=None, lengths=None) -> (y, MixerState)``.

    Args:
        d_model: M. d_inner: D. d_state: N. d_conv: K. dt_rank: R.
        conv_bias, bias: biases of the conv and of ``in_proj``/``out_proj``.
        dt_min, dt_max, dt_init_floor, dt_scale, dt_init: initialisation of the Δ projection.
        backend: selective-scan backend (``"chunk"`` or ``"naive"``), validated here.
    """

    BACKENDS = ("chunk", "naive")  # the first is the default; both are selective_scan backends
    SUPPORTS = frozenset({"positions", "lengths"})

    def __init__(
        self,
        d_model: int,
        d_inner: int,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: int = 1,
        conv_bias: bool = True,
        bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        dt_init: str = "random",
        backend: str = "chunk",
    ) -> None:
        super().__init__(backend)
        self.d_model, self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_model, d_inner, d_state, d_conv, dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv_weight = nn.Parameter(torch.empty(d_inner, d_conv))
        self.conv_bias = nn.Parameter(torch.empty(d_inner)) if conv_bias else None
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        if self.A_log.device.type != "meta":
            self.reset_parameters(dt_min, dt_max, dt_init_floor, dt_scale, dt_init)

    @torch.no_grad()
    def reset_parameters(
        self, dt_min: float, dt_max: float, dt_init_floor: float, dt_scale: float, dt_init: str
    ) -> None:
        """mamba_ssm's initialisation of the SSM parameters (the linears keep PyTorch's default)."""
        bound = 1.0 / math.sqrt(self.d_conv)  # kaiming-uniform of a depthwise conv with fan-in K
        self.conv_weight.uniform_(-bound, bound)
        if self.conv_bias is not None:
            self.conv_bias.uniform_(-bound, bound)
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            self.dt_proj.weight.fill_(std)
        elif dt_init == "random":
            self.dt_proj.weight.uniform_(-std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)

    def A(self) -> torch.Tensor:
        """``A = -exp(A_log)``, ``[D, N]`` fp32."""
        return -torch.exp(self.A_log.float())

    def zero_state(self, batch_size: int, dtype: torch.dtype, device: torch.device | str | None) -> MixerState:
        return MixerState(
            conv=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, dtype=dtype, device=device),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, dtype=torch.float32, device=device),
            sum_delta=torch.zeros(batch_size, self.d_inner, dtype=torch.float32, device=device),
        )

    def forward(
        self,
        x: torch.Tensor,
        state: MixerState | None = None,
        *,
        positions: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> tuple[torch.Tensor, MixerState]:
        """``x [B, T, M]`` continuing from ``state`` (``None`` = zeros) -> ``(y [B, T, M], state after the last
        token)``.

        ``positions`` (each in ``[0, T]``) asks for the states after ``x[:, :p]`` as well, from this one pass: they
        come back in the returned state's ``at`` field (parts ``[B, P, ...]``). ``segments`` is refused.
        ``lengths [B]`` (right padding, ``0 <= lengths[b] <= T``): only ``x[b, :lengths[b]]`` is real; Δ is zero at
        the padded positions, so the SSM state and ΣΔ stop at each row's last real token, and the conv state is
        each row's own last ``K - 1`` real inputs. Outputs at padded positions are unspecified.
        The returned states are new tensors; ``state`` is not modified.
        """
        self.refuse_unsupported(segments=segments)
        Bsz, T, _ = x.shape
        xz = self.in_proj(x)
        u_pre, z = xz[..., : self.d_inner], xz[..., self.d_inner :]
        conv0 = None if state is None else state.conv
        u, conv_final = causal_conv1d(u_pre, self.conv_weight, self.conv_bias, conv0, "silu", True)
        dbc = self.x_proj(u)
        dt_low = dbc[..., : self.dt_rank]
        Bm = dbc[..., self.dt_rank : self.dt_rank + self.d_state]
        Cm = dbc[..., self.dt_rank + self.d_state :]
        # Δ in fp32: projection and bias in fp32 before softplus, as the reference kernels do
        delta = F.softplus(F.linear(dt_low.float(), self.dt_proj.weight.float(), self.dt_proj.bias.float()))
        if lengths is not None:
            # Δ = 0 at padding: exp(Δ·A) = 1 and Δ·B·u = 0, so the state and ΣΔ pass through unchanged
            real = torch.arange(T, device=x.device) < lengths[:, None]
            delta = torch.where(real[..., None], delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
        scan = selective_scan(
            u,
            delta,
            self.A(),
            Bm,
            Cm,
            self.D.float(),
            None if state is None else state.ssm,
            True,
            positions,
            backend=self.backend,
        )
        y = F.silu(z).mul_(scan.y)
        out = self.out_proj(y.to(x.dtype))
        if lengths is not None:
            conv_final = conv_state_after(u_pre, self.d_conv, lengths, conv0)
        sd0 = 0.0 if state is None else state.sum_delta
        states_at = None
        if positions is not None:
            pos = list(positions)
            conv_at = conv_states_at(u_pre, self.d_conv, pos, conv0)
            sd_at = scan.sum_delta_at if state is None else scan.sum_delta_at + state.sum_delta[:, None]
            states_at = MixerState(conv=conv_at, ssm=scan.states_at, sum_delta=sd_at)
        return out, MixerState(conv_final, scan.final_state, sd0 + scan.sum_delta, states_at)

    def step_weights(self, transposed: bool) -> StepWeights:
        """The weights of :meth:`step`, with the matrices transposed when ``transposed`` (see
        :mod:`statelab.layers.decode`)."""
        wdt = self.in_proj.weight.dtype
        return StepWeights(
            in_proj=matvec(self.in_proj.weight, self.in_proj.bias, transposed),
            x_proj=matvec(self.x_proj.weight, None, transposed),
            dt_proj=matvec(self.dt_proj.weight, self.dt_proj.bias, transposed, torch.float32),
            out_proj=matvec(self.out_proj.weight, self.out_proj.bias, transposed),
            A=self.A().detach(),
            D=self.D.detach().float(),
            conv_weight=self.conv_weight.detach().to(wdt),
            conv_bias=None if self.conv_bias is None else self.conv_bias.detach().to(wdt),
        )

    @torch.no_grad()
    def step(
        self, x: torch.Tensor, state: MixerState, out: MixerState, w: StepWeights, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One token for every row: ``x [B, M]`` from ``state`` -> ``y [B, M]``; the new state is written into ``out``.

        The same computation as ``forward`` on ``x[:, None]`` (equal to fp32 round-off), without its generality:
        no positions, no concatenation of the conv window (its taps are applied to the state and the new input
        directly), the recurrence updated in place in ``out.ssm``. ``out``'s tensors must not overlap ``state``'s
        (``state`` is only read). ``active [B]`` bool (or ``None`` = every row): a row that is not active reads
        nothing (Δ = 0 and its conv window kept), so its state in ``out`` equals its state in ``state``; its ``y``
        is unspecified. ``w`` comes from :meth:`step_weights`.
        """
        D, K = self.d_inner, self.d_conv
        xz = w.in_proj(x)  # [B, 2D]
        u_pre, z = xz[:, :D], xz[:, D:]
        conv = state.conv
        # the causal conv at the newest position: taps over the K - 1 stored inputs, then the new one
        cw = w.conv_weight
        u = u_pre * cw[:, K - 1]
        for k in range(K - 1):
            u.addcmul_(conv[:, :, k].to(u.dtype), cw[:, k])
        if w.conv_bias is not None:
            u.add_(w.conv_bias)
        F.silu(u, inplace=True)
        if K > 1:
            out.conv[:, :, : K - 2].copy_(conv[:, :, 1:])
            out.conv[:, :, K - 2].copy_(u_pre)
            if active is not None:
                out.conv.copy_(torch.where(active[:, None, None], out.conv, conv))
        dbc = w.x_proj(u)
        R, N = self.dt_rank, self.d_state
        delta = F.softplus(w.dt_proj(dbc[:, :R]))  # [B, D] fp32, as forward computes Δ
        if active is not None:
            delta.masked_fill_(~active[:, None], 0.0)  # Δ = 0: exp(ΔA) = 1 and ΔBu = 0, the state passes unchanged
        uf = u.float()
        Bm = dbc[:, R : R + N].float()
        Cm = dbc[:, R + N :].float()
        h = out.ssm if out.ssm.dtype == torch.float32 else torch.empty(out.ssm.shape, device=x.device)
        torch.mul(delta[:, :, None], w.A, out=h)
        h.exp_().mul_(state.ssm)
        h.addcmul_((delta * uf)[:, :, None], Bm[:, None, :])
        y = torch.bmm(h, Cm[:, :, None])[:, :, 0].addcmul_(uf, w.D)
        if h is not out.ssm:
            out.ssm.copy_(h)
        torch.add(state.sum_delta, delta, out=out.sum_delta)
        y = F.silu(z).mul_(y.to(u.dtype))
        return w.out_proj(y.to(x.dtype))
