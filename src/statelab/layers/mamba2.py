"""The Mamba-2 mixer with the state API: ``y, state = mixer(x, state=None)``.

One mixer (Dao & Gu, arXiv 2405.21060 §7, "Mamba-2 architecture"), with the semantics of transformers'
``Mamba2Mixer`` and mamba_ssm's ``Mamba2`` (so their checkpoints give the same numbers):

    [z ; xBC ; dt] = W_in u                          z ∈ R^D, xBC ∈ R^C (C = D + 2·G·N), dt ∈ R^H
    xBC  = SiLU(causal_depthwise_conv_K(xBC))        conv state = the last K - 1 pre-conv xBC, oldest first
    x, B, C = split(xBC, [D, G·N, G·N])
    Δ    = clamp(softplus(dt + dt_bias), time_step_limit)
    y    = SSD(x, Δ, A = -exp(A_log), B, C, D_skip)  (statelab.ops.ssd)
    out  = W_out · RMSNorm_G(y, gate=z)               norm of y ⊙ SiLU(z), per group of D / G channels

State of one layer (:class:`Mamba2LayerState`): conv ``[B, C, K - 1]``, ssm ``[B, H, P, N]`` and ΣΔ ``[B, H]``
(fp32), all "after the last token read". Nothing here writes into a state it was given.

The time-step limits are applied on every path, one token or many, so a continuation is exact; transformers'
single-token path skips them (it only matters for checkpoints with a non-default ``time_step_limit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from statelab.layers.decode import Matvec, matvec
from statelab.layers.norm import RMSNorm, rms_norm
from statelab.layers.protocol import Mixer, Segments
from statelab.ops.conv1d import causal_conv1d, conv_state_after, conv_states_at
from statelab.ops.ssd import ssd_scan, ssd_step
from statelab.ops.ssd.chunk import DEFAULT_CHUNK_SIZE

__all__ = ["Mamba2LayerState", "Mamba2Mixer", "StepWeights"]


class Mamba2LayerState(NamedTuple):
    """State of one Mamba-2 mixer after some token: conv ``[B, C, K-1]``, ssm ``[B, H, P, N]``, ΣΔ ``[B, H]``.

    ``at``: the states after the ``positions`` a call asked for, each part stacked on axis 1 (``conv [B, P', C,
    K-1]``, ``ssm [B, P', H, P, N]``, ``sum_delta [B, P', H]``), or ``None`` (:mod:`statelab.layers.protocol`).
    """

    conv: torch.Tensor
    ssm: torch.Tensor
    sum_delta: torch.Tensor
    at: Mamba2LayerState | None = None


class StepWeights(NamedTuple):
    """What one decode step of a mixer reads (:meth:`Mamba2Mixer.step_weights`): the two projections as
    :class:`~statelab.layers.decode.Matvec`, ``A``, ``D`` and ``dt_bias`` ``[H]`` fp32, the conv taps ``[C, K]`` and
    bias ``[C]`` (or ``None``) in the input projection's dtype, and the gated norm's weight."""

    in_proj: Matvec
    out_proj: Matvec
    A: torch.Tensor
    D: torch.Tensor
    dt_bias: torch.Tensor
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    norm_weight: torch.Tensor


class Mamba2Mixer(Mixer):
    """Mamba-2 mixer. ``forward(x [B, T, M], state=None, *, positions=None, lengths=None) -> (y [B, T, M],
    Mamba2LayerState)``.

    Args:
        d_model: M. d_inner: D = H · P. d_state: N. n_groups: G. head_dim: P. d_conv: K.
        use_bias: bias in ``in_proj`` / ``out_proj``. use_conv_bias: bias in the conv.
        time_step_limit: ``(lo, hi)`` clamp of Δ after softplus. norm_eps: epsilon of the gated RMSNorm.
        backend: ``"chunk" | "naive" | "cuda"``, the SSD implementation (see :func:`statelab.ops.ssd.ssd_scan`),
            validated here.
        chunk_size: chunk length of the chunked scan.
    """

    BACKENDS = ("chunk", "naive", "cuda")  # the first is the default
    SUPPORTS = frozenset({"positions", "lengths"})

    def __init__(
        self,
        d_model: int,
        d_inner: int,
        d_state: int,
        n_groups: int,
        head_dim: int,
        d_conv: int = 4,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        time_step_limit: tuple[float, float] = (0.0, float("inf")),
        norm_eps: float = 1e-5,
        backend: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(backend)
        if d_inner % head_dim:
            raise ValueError(f"d_inner={d_inner} must be a multiple of head_dim={head_dim}")
        self.d_model, self.d_inner, self.d_state = d_model, d_inner, d_state
        self.n_groups, self.head_dim, self.d_conv = n_groups, head_dim, d_conv
        self.n_heads = d_inner // head_dim
        if self.n_heads % n_groups or d_inner % n_groups:
            raise ValueError(f"heads H={self.n_heads} and d_inner={d_inner} must be multiples of n_groups={n_groups}")
        self.conv_dim = d_inner + 2 * n_groups * d_state
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + self.n_heads, bias=use_bias)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, d_conv))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim)) if use_conv_bias else None
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = RMSNorm(d_inner, eps=norm_eps, group_size=d_inner // n_groups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=use_bias)
        self.chunk_size = chunk_size
        if self.A_log.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba-2 initialisation: ``A = 1..H``, ``D = 1``, Δ log-uniform in ``[1e-3, 1e-1]`` through ``dt_bias``."""
        H = self.n_heads
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        lo, hi = torch.log(torch.tensor(1e-3)), torch.log(torch.tensor(1e-1))
        dt = torch.exp(torch.rand(H) * (hi - lo) + lo).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        nn.init.kaiming_uniform_(self.conv_weight, a=5**0.5)
        if self.conv_bias is not None:
            self.conv_bias.zero_()

    def zero_state(
        self, batch_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Mamba2LayerState:
        """The state before any token: zeros, ``sum_delta`` fp32."""
        return Mamba2LayerState(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, dtype=dtype, device=device),
            ssm=torch.zeros(batch_size, self.n_heads, self.head_dim, self.d_state, dtype=dtype, device=device),
            sum_delta=torch.zeros(batch_size, self.n_heads, dtype=torch.float32, device=device),
        )

    def _delta(self, dt: torch.Tensor) -> torch.Tensor:
        """``dt [..., H]`` (raw projection) -> Δ in fp32: softplus of ``dt + dt_bias``, clamped to the limits."""
        delta = F.softplus(dt.float() + self.dt_bias.float())
        lo, hi = self.time_step_limit
        if lo > 0.0 or hi != float("inf"):
            delta = delta.clamp(min=lo, max=hi)
        return delta

    def forward(
        self,
        x: torch.Tensor,
        state: Mamba2LayerState | None = None,
        *,
        positions: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
        ssm_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Mamba2LayerState]:
        """``x [B, T, M]`` from ``state`` (``None`` = zeros) -> ``(y [B, T, M], state after the last token)``.

        ``positions`` (each ``t`` in ``[0, T]``): the states after the first ``t`` tokens as well, from one pass, in
        the returned state's ``at`` field (parts ``[B, P', ...]``). ``segments`` is refused (packed samples need
        :class:`statelab.layers.bidirectional.BidirectionalMamba2Mixer`).

        Returned states have the dtype of ``state`` (fp32 when ``state`` is ``None``); ΣΔ accumulates on top of
        the given state's. ``ssm_out``: optional fresh ``[B, H, P, N]`` buffer (the state's dtype) that receives
        the new SSM state, so that a model can stack its layers without a copy; used only without autograd.

        ``lengths [B]`` (right padding, ``0 <= lengths[b] <= T``): only ``x[b, :lengths[b]]`` is real. Δ is zero at
        padded positions (the SSM state and ΣΔ pass through them unchanged) and each row's conv state is its own
        last ``K - 1`` real inputs. Outputs at padded positions are unspecified.
        """
        self.refuse_unsupported(segments=segments)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2Mixer expects x [B, T, {self.d_model}], got {tuple(x.shape)}")
        Bsz, T, _ = x.shape
        if state is None:
            state = self.zero_state(Bsz, dtype=torch.float32, device=x.device)
        sdtype = state.ssm.dtype
        D, C, H, P, G, N = self.d_inner, self.conv_dim, self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xBC, dt = self.in_proj(x).split([D, C, H], dim=-1)
        A = -torch.exp(self.A_log.float())
        delta = self._delta(dt)  # [B, T, H] fp32
        if lengths is not None:
            # Δ = 0 at padding: exp(Δ·A) = 1 and Δ·B·x = 0, so the state and ΣΔ pass through unchanged
            real = torch.arange(T, device=x.device) < lengths[:, None]
            delta = torch.where(real[..., None], delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
        conv_in = state.conv.to(xBC.dtype)

        xBC_c, conv_new = causal_conv1d(xBC, self.conv_weight, self.conv_bias, conv_in, "silu", True)
        if lengths is not None:
            conv_new = conv_state_after(xBC, self.d_conv, lengths, conv_in)
        xs, Bm, Cm = xBC_c.split([D, G * N, G * N], dim=-1)
        if T == 1 and positions is None and self.backend != "naive":
            # decode: one step of the recurrence, no chunk machinery
            direct = ssm_out is not None and ssm_out.dtype == torch.float32 and not torch.is_grad_enabled()
            y1, ssm_new = ssd_step(
                xs.reshape(Bsz, H, P),
                delta[:, 0],
                A,
                Bm.reshape(Bsz, G, N),
                Cm.reshape(Bsz, G, N),
                self.D,
                state.ssm,
                out=ssm_out if direct else None,
            )
            if ssm_out is not None and not direct:
                ssm_new = ssm_out.copy_(ssm_new)
            new_state = Mamba2LayerState(conv_new.to(sdtype), ssm_new.to(sdtype), state.sum_delta + delta[:, 0])
            return self.out_proj(self.norm(y1.reshape(Bsz, 1, D), z).to(x.dtype)), new_state

        scan = ssd_scan(
            xs.reshape(Bsz, T, H, P),
            delta,
            A,
            Bm.reshape(Bsz, T, G, N),
            Cm.reshape(Bsz, T, G, N),
            self.D,
            initial_state=state.ssm,
            output_final_state=True,
            return_states_at=positions,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        y = self.out_proj(self.norm(scan.y.reshape(Bsz, T, D), z).to(x.dtype))
        assert scan.final_state is not None
        ssm_new = scan.final_state.to(sdtype)
        if ssm_out is not None:
            ssm_new = ssm_out.copy_(ssm_new)
        states_at = None
        if positions is not None:
            assert scan.states_at is not None and scan.sum_delta_at is not None
            conv_at = conv_states_at(xBC, self.d_conv, positions, conv_in)  # [B, n_pos, C, K-1]
            states_at = Mamba2LayerState(
                conv_at.to(sdtype), scan.states_at.to(sdtype), state.sum_delta[:, None] + scan.sum_delta_at
            )
        return y, Mamba2LayerState(conv_new.to(sdtype), ssm_new, state.sum_delta + scan.sum_delta, states_at)

    def step_weights(self, transposed: bool) -> StepWeights:
        """The weights of :meth:`step`, with the matrices transposed when ``transposed`` (see
        :mod:`statelab.layers.decode`)."""
        wdt = self.in_proj.weight.dtype
        return StepWeights(
            in_proj=matvec(self.in_proj.weight, self.in_proj.bias, transposed),
            out_proj=matvec(self.out_proj.weight, self.out_proj.bias, transposed),
            A=-torch.exp(self.A_log.detach().float()),
            D=self.D.detach().float(),
            dt_bias=self.dt_bias.detach().float(),
            conv_weight=self.conv_weight.detach().to(wdt),
            conv_bias=None if self.conv_bias is None else self.conv_bias.detach().to(wdt),
            norm_weight=self.norm.weight.detach(),
        )

    @torch.no_grad()
    def step(
        self,
        x: torch.Tensor,
        state: Mamba2LayerState,
        out: Mamba2LayerState,
        w: StepWeights,
        active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token for every row: ``x [B, M]`` from ``state`` -> ``y [B, M]``; the new state is written into ``out``.

        The computation of ``forward`` on ``x[:, None]`` (equal to fp32 round-off) without the
        concatenated conv window (taps applied to the stored inputs and the new one) and with the SSM state
        written in place into ``out.ssm`` (:func:`statelab.ops.ssd.ssd_step`). ``out``'s tensors must not overlap
        ``state``'s. ``active [B]`` bool (``None`` = every row): an inactive row reads nothing (Δ = 0, conv window
        kept), so its state in ``out`` equals its state in ``state``; its ``y`` is unspecified.
        """
        Bsz = x.shape[0]
        D, C, H, P, G, N, K = (
            self.d_inner, self.conv_dim, self.n_heads, self.head_dim, self.n_groups, self.d_state, self.d_conv
        )  # fmt: skip
        zxbcdt = w.in_proj(x)  # [B, D + C + H]
        z, xBC, dt = zxbcdt[:, :D], zxbcdt[:, D : D + C], zxbcdt[:, D + C :]
        conv = state.conv
        cw = w.conv_weight
        xc = xBC * cw[:, K - 1]
        for k in range(K - 1):
            xc.addcmul_(conv[:, :, k].to(xc.dtype), cw[:, k])
        if w.conv_bias is not None:
            xc.add_(w.conv_bias)
        F.silu(xc, inplace=True)
        if K > 1:
            out.conv[:, :, : K - 2].copy_(conv[:, :, 1:])
            out.conv[:, :, K - 2].copy_(xBC)
            if active is not None:
                out.conv.copy_(torch.where(active[:, None, None], out.conv, conv))
        delta = F.softplus(dt.float() + w.dt_bias)  # [B, H]
        lo, hi = self.time_step_limit
        if lo > 0.0 or hi != float("inf"):
            delta = delta.clamp(min=lo, max=hi)
        if active is not None:
            delta.masked_fill_(~active[:, None], 0.0)  # Δ = 0: the state passes unchanged
        xs = xc[:, :D].reshape(Bsz, H, P)
        Bm = xc[:, D : D + G * N].reshape(Bsz, G, N)
        Cm = xc[:, D + G * N :].reshape(Bsz, G, N)
        direct = out.ssm.dtype == torch.float32
        y, ssm_new = ssd_step(xs, delta, w.A, Bm, Cm, w.D, state.ssm, out=out.ssm if direct else None)
        if not direct:
            out.ssm.copy_(ssm_new)
        torch.add(state.sum_delta, delta, out=out.sum_delta)
        normed = rms_norm(y.reshape(Bsz, D), w.norm_weight, self.norm.eps, gate=z, group_size=self.norm.group_size)
        return w.out_proj(normed.to(x.dtype))
