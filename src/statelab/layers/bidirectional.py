"""Gated linear recurrences with a bidirectional prefix (Birdie, arXiv 2411.01030 §3.1 and A.3-A.4).

The recurrence shared by the gated SSM and Hawk (RG-LRU) layers, per channel::

    h_t = a_t ⊙ h_{t-1} + u_t,        a_t = exp(log_a_t) in [0, 1]

computed by :func:`statelab.ops.linear_scan.linear_scan` (a log-depth scan, tested against its fp32 loop).

A **bidirectional-prefix** layer splits the recurrent channels in half without adding parameters:

* forward half ``[:D/2]``: a causal scan over prefix and suffix; the decay is zeroed at each sample's first token
  (``seq_start``), so packed samples never see each other. Its final value is the layer's state.
* reverse half ``[D/2:]``: ``h_t = a_t ⊙ h_{t+1} + u_t`` run right to left (flip, scan, flip back), with the decay
  zeroed on every suffix position and on the last prefix token of each sample. So a prefix position reads the
  prefix from itself to the prefix end, and a suffix position gets ``h_t = u_t``: it sees no later token.

Masks: ``seq_start [B, T]`` bool (True at each sample's first token), ``is_prefix [B, T]`` bool (True on the
input part; False on the suffix and padding). Decoding continues the forward halves from the state; the reverse
half of a new token is its own input (the prompt cannot be streamed: a call's reverse scan covers that call only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from statelab.layers.mamba2 import Mamba2Mixer
from statelab.layers.protocol import Segments
from statelab.ops.linear_scan import linear_scan
from statelab.ops.ssd.segmented import DEFAULT_CHUNK_SIZE, ssd_scan_segmented

__all__ = [
    "BidirectionalMamba2Mixer",
    "reverse_reset",
    "split_scan",
    "split_scan_naive",
    "segment_causal_conv",
]


def reverse_reset(seq_start: torch.Tensor, is_prefix: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: where the reverse half's decay is zeroed (position ``t`` must not read ``t + 1``).

    Zeroed unless ``t`` and ``t + 1`` are both prefix tokens of the same sample: on the suffix, on padding, on the
    last token of the row and on each sample's last prefix token.
    """
    nxt_prefix = torch.zeros_like(is_prefix)
    nxt_prefix[:, :-1] = is_prefix[:, 1:] & ~seq_start[:, 1:]
    return ~(is_prefix & nxt_prefix)


def _masks(u: torch.Tensor, seq_start: torch.Tensor | None, is_prefix: torch.Tensor | None):
    B, T = u.shape[:2]
    if seq_start is None:
        seq_start = torch.zeros(B, T, dtype=torch.bool, device=u.device)
    if is_prefix is None:
        is_prefix = torch.zeros(B, T, dtype=torch.bool, device=u.device)
    if seq_start.shape != (B, T) or is_prefix.shape != (B, T):
        raise ValueError(
            f"seq_start and is_prefix must be [B, T] = {(B, T)}, got {tuple(seq_start.shape)}, {tuple(is_prefix.shape)}"
        )
    return seq_start.bool(), is_prefix.bool()


def split_scan(
    log_a: torch.Tensor,
    u: torch.Tensor,
    h0: torch.Tensor | None,
    seq_start: torch.Tensor | None = None,
    is_prefix: torch.Tensor | None = None,
    bidirectional: bool = False,
    backend: str = "parallel",
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan of a (possibly bidirectional) layer with segment resets.

    Args:
        log_a, u: ``[B, T, D]``; the log decay (``<= 0``) and the input of the recurrence.
        h0: the forward state before token 0, ``[B, D]`` (causal) or ``[B, D // 2]`` (bidirectional), or None.
        seq_start, is_prefix: ``[B, T]`` masks (module docstring); None means one continuing sample, all suffix.
        bidirectional: split the channels into forward and reverse halves.
        backend: the :func:`~statelab.ops.linear_scan.linear_scan` backend, ``"parallel"`` or ``"naive"``.
        lengths: ``[B]`` right padding (row ``b`` is real up to ``lengths[b]``) or None. Padded positions get decay 1
            and input 0, so the forward state passes through them; they count as suffix (no reverse reading).
    Returns:
        ``h [B, T, D]`` fp32 (forward half then reverse half) and the forward state after the last token.
    """
    seq_start, is_prefix = _masks(u, seq_start, is_prefix)

    def scan(la: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = linear_scan(la, x, h, output_final_state=True, backend=backend)
        return out.y, out.final_state

    la = log_a.float().masked_fill(seq_start[..., None], float("-inf"))
    if lengths is not None:
        pad = torch.arange(u.shape[1], device=u.device) >= lengths.to(u.device)[:, None]  # [B, T]
        la = la.masked_fill(pad[..., None], 0.0)
        u = u.masked_fill(pad[..., None], 0.0)
        is_prefix = is_prefix & ~pad
    if not bidirectional:
        return scan(la, u, h0)
    D = u.shape[-1]
    if D % 2:
        raise ValueError(f"a bidirectional layer needs an even number of recurrent channels, got {D}")
    half = D // 2
    hf, h_last = scan(la[..., :half], u[..., :half], h0)
    lr = log_a.float()[..., half:].masked_fill(reverse_reset(seq_start, is_prefix)[..., None], float("-inf"))
    hr, _ = scan(lr.flip(1), u[..., half:].flip(1), None)
    return torch.cat([hf, hr.flip(1)], dim=-1), h_last


def split_scan_naive(
    log_a: torch.Tensor,
    u: torch.Tensor,
    h0: torch.Tensor | None,
    seq_start: torch.Tensor | None = None,
    is_prefix: torch.Tensor | None = None,
    bidirectional: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`split_scan`: explicit loops with the reset rules written out per position."""
    seq_start, is_prefix = _masks(u, seq_start, is_prefix)
    B, T, D = u.shape
    half = D // 2 if bidirectional else D
    a = torch.exp(log_a.float())
    h = torch.zeros(B, half) if h0 is None else h0.float()
    fwd = []
    for t in range(T):
        keep = (~seq_start[:, t]).float()[:, None]
        h = keep * a[:, t, :half] * h + u[:, t, :half].float()
        fwd.append(h)
    hf = torch.stack(fwd, 1)
    if not bidirectional:
        return hf, h
    rev = [None] * T
    g = torch.zeros(B, D - half)
    for t in reversed(range(T)):
        same = torch.zeros(B, dtype=torch.bool)
        if t + 1 < T:
            same = is_prefix[:, t] & is_prefix[:, t + 1] & ~seq_start[:, t + 1]
        g = same.float()[:, None] * a[:, t, half:] * g + u[:, t, half:].float()
        rev[t] = g
    return torch.cat([hf, torch.stack(rev, 1)], -1), h


def segment_causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None,
    seq_start: torch.Tensor | None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv whose window never crosses a sample boundary.

    Args:
        x: ``[B, T, C]``; weight: ``[C, K]`` (tap ``K - 1`` multiplies the current token); bias ``[C]``.
        conv_state: the last ``K - 1`` inputs before token 0, ``[B, C, K - 1]`` oldest first, or None (zeros).
        seq_start: ``[B, T]`` bool or None; inputs before the latest ``seq_start <= t`` are masked out.
        lengths: ``[B]`` right padding or None; the conv state is then taken after each row's ``lengths[b]`` tokens
            (padded inputs are never read into it).
    Returns:
        ``y [B, T, C]`` and the new conv state ``[B, C, K - 1]`` (the last ``K - 1`` inputs of the sample in
        progress, zeros before its start).
    """
    B, T, C = x.shape
    K = weight.shape[1]
    prev = x.new_zeros(B, C, K - 1) if conv_state is None else conv_state.to(x.dtype)
    full = torch.cat([prev.transpose(1, 2), x], dim=1)  # [B, K-1+T, C]
    if seq_start is None:
        seq_start = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    # age[t] = tokens since the latest sample start at or before t (large when none in this call)
    pos = torch.arange(T, device=x.device)[None].expand(B, T)
    last_start = torch.where(seq_start, pos, torch.full_like(pos, -(10**9))).cummax(dim=1).values
    age = pos - last_start  # [B, T]
    y = 0
    for k in range(K):
        lag = K - 1 - k
        tap = full[:, k : k + T]  # input at t - lag
        valid = (age >= lag).to(x.dtype)[..., None]
        y = y + tap * valid * weight[:, k]
    if bias is not None:
        y = y + bias
    if lengths is not None and K > 1:
        # the K - 1 inputs before each row's token lengths[b] (full index L + i is time L - (K - 1) + i), zeroed
        # where they precede the latest start at or before the row's last real token
        L = lengths.to(device=x.device, dtype=torch.long)
        idx = L[:, None] + torch.arange(K - 1, device=x.device)  # [B, K - 1]
        tail = full.gather(1, idx[..., None].expand(B, K - 1, C))
        start_at_end = last_start.gather(1, (L - 1).clamp(min=0)[:, None])[:, 0] if T else L - 10**9
        start_at_end = torch.where(L > 0, start_at_end, torch.full_like(L, -(10**9)))
        keep = (idx - (K - 1) >= start_at_end[:, None]).to(x.dtype)[..., None]
        return y, (tail * keep).transpose(1, 2).contiguous()
    # state: last K-1 inputs, zeroed where they precede the latest start
    tail = full[:, -(K - 1) :] if K > 1 else full[:, :0]
    if K > 1:
        age_end = (T - 1) - last_start[:, -1]  # tokens since the last start, at the end of the call
        lags = torch.arange(K - 2, -1, -1, device=x.device)  # lag of each tail entry relative to the last token
        keep = (lags[None] <= age_end[:, None]).to(x.dtype)[..., None]
        tail = tail * keep
    return y, tail.transpose(1, 2).contiguous()


class BidirectionalMamba2Mixer(Mamba2Mixer):
    """The Mamba-2 mixer (:class:`statelab.layers.mamba2.Mamba2Mixer`, same parameters) with Birdie's split: heads
    ``[:H/2]`` run forward over prefix and suffix, heads ``[H/2:]`` backward over the prefix only.

    ``forward(x [B, T, M], state=None, *, lengths=None, segments=None) -> (y, (ssm [B, H', P, N], conv [B, C,
    K-1]))`` with ``H' = H / 2`` (bidirectional) or ``H`` (``bidirectional=False``: the plain causal mixer, with
    segment resets). The per-head recurrence is ``h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ``, ``y_t = h_t C_t + D
    x_t``, with the decay zeroed where :func:`split_scan` zeroes it; the conv window is cut at sample starts.
    ``positions`` is refused (its state is a tuple, not a record).

    ``backend``:

    * ``"chunk"`` (default): the chunked SSD scan with resets
      (:func:`statelab.ops.ssd.segmented.ssd_scan_segmented`, chunks of ``chunk_size`` tokens, default
      :data:`statelab.ops.ssd.segmented.DEFAULT_CHUNK_SIZE`); the reverse heads run in the same call as the
      forward ones, time-flipped, as extra batch rows;
    * ``"parallel"`` / ``"naive"``: :func:`split_scan` (with that linear-scan backend) on the flattened
      ``[H · P · N]`` state, which is materialised at every step (``T · H · P · N`` per row): the references.
    """

    BACKENDS = ("chunk", "parallel", "naive")  # the first is the default
    SUPPORTS = frozenset({"lengths", "segments"})

    def __init__(self, *args, bidirectional: bool = True, **kwargs) -> None:
        kwargs.setdefault("chunk_size", DEFAULT_CHUNK_SIZE)
        super().__init__(*args, **kwargs)
        if bidirectional and self.n_heads % 2:
            raise ValueError(f"a bidirectional Mamba-2 mixer needs an even number of heads, got {self.n_heads}")
        self.bidirectional = bidirectional

    @property
    def state_heads(self) -> int:
        return self.n_heads // 2 if self.bidirectional else self.n_heads

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        positions: Sequence[int] | None = None,
        lengths: torch.Tensor | None = None,
        segments: Segments | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [B, T, M]`` after ``state = (ssm, conv)`` -> ``(y [B, T, M], (ssm, conv) after the last real token)``."""
        self.refuse_unsupported(positions=positions)
        seq_start, is_prefix = (None, None) if segments is None else segments
        Bsz, T, _ = x.shape
        D, C, H, P, G, N = self.d_inner, self.conv_dim, self.n_heads, self.head_dim, self.n_groups, self.d_state
        h0, conv0 = (None, None) if state is None else state
        if h0 is not None and h0.shape != (Bsz, self.state_heads, P, N):
            raise ValueError(f"Mamba-2 split state must be {(Bsz, self.state_heads, P, N)}, got {tuple(h0.shape)}")
        z, xBC, dt = self.in_proj(x).split([D, C, H], dim=-1)
        xBC, conv_new = segment_causal_conv(xBC, self.conv_weight, self.conv_bias, conv0, seq_start, lengths)
        xs, Bm, Cm = F.silu(xBC).split([D, G * N, G * N], dim=-1)
        delta = self._delta(dt)  # [B, T, H] fp32
        A = -torch.exp(self.A_log.float())
        xs = xs.reshape(Bsz, T, H, P).float()
        if self.backend == "chunk":
            y, h_last = self._chunk_scan(
                xs, delta, A, Bm.reshape(Bsz, T, G, N), Cm.reshape(Bsz, T, G, N), h0, seq_start, is_prefix, lengths
            )
            y = y + self.D.float()[:, None] * xs
            out = self.out_proj(self.norm(y.reshape(Bsz, T, D).to(x.dtype), z))
            return out, (h_last, conv_new)
        Bh = Bm.reshape(Bsz, T, G, N).repeat_interleave(H // G, dim=2).float()
        Ch = Cm.reshape(Bsz, T, G, N).repeat_interleave(H // G, dim=2).float()
        log_a = (delta * A)[..., None, None].expand(Bsz, T, H, P, N).reshape(Bsz, T, H * P * N)
        u = (delta[..., None, None] * xs[..., None] * Bh[:, :, :, None, :]).reshape(Bsz, T, H * P * N)
        h, h_last = split_scan(
            log_a,
            u,
            None if h0 is None else h0.reshape(Bsz, -1).float(),
            seq_start,
            is_prefix,
            self.bidirectional,
            backend=self.backend,
            lengths=lengths,
        )
        y = (h.reshape(Bsz, T, H, P, N) * Ch[:, :, :, None, :]).sum(-1) + self.D.float()[:, None] * xs
        out = self.out_proj(self.norm(y.reshape(Bsz, T, D).to(x.dtype), z))
        return out, (h_last.reshape(Bsz, self.state_heads, P, N), conv_new)

    def _chunk_scan(
        self,
        xs: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        Bm: torch.Tensor,
        Cm: torch.Tensor,
        h0: torch.Tensor | None,
        seq_start: torch.Tensor | None,
        is_prefix: torch.Tensor | None,
        lengths: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scan of the ``"chunk"`` backend: ``xs [B, T, H, P]`` fp32, ``delta [B, T, H]``, ``A [H]``, ``Bm`` and
        ``Cm [B, T, G, N]``, ``h0 [B, H', P, N]`` or None -> ``(y [B, T, H, P]`` without ``D x``, the forward
        state ``[B, H', P, N])``. The masks follow :func:`split_scan` position for position."""
        Bsz, T, H, P = xs.shape
        G = Bm.shape[2]
        seq_start, is_prefix = _masks(xs, seq_start, is_prefix)
        a = delta * A  # [B, T, H]
        u = delta[..., None] * xs
        la = a.masked_fill(seq_start[..., None], float("-inf"))
        if lengths is not None:
            # padding: decay 1 and input 0, so the forward state passes through; it counts as suffix
            pad = torch.arange(T, device=xs.device) >= lengths.to(xs.device)[:, None]
            la = la.masked_fill(pad[..., None], 0.0)
            u = u.masked_fill(pad[..., None, None], 0.0)
            is_prefix = is_prefix & ~pad
        if not self.bidirectional:
            return ssd_scan_segmented(u, la, Bm.float(), Cm.float(), h0, self.chunk_size)
        half = H // 2
        lr = a[..., half:].masked_fill(reverse_reset(seq_start, is_prefix)[..., None], float("-inf"))
        if G == 1:
            Bf, Br, Cf, Cr = Bm, Bm, Cm, Cm
        elif half % (H // G) == 0:  # each half owns whole groups
            Bf, Br, Cf, Cr = Bm[:, :, : G // 2], Bm[:, :, G // 2 :], Cm[:, :, : G // 2], Cm[:, :, G // 2 :]
        else:  # a group straddles the split: one group per head
            Bh, Ch = Bm.repeat_interleave(H // G, dim=2), Cm.repeat_interleave(H // G, dim=2)
            Bf, Br, Cf, Cr = Bh[:, :, :half], Bh[:, :, half:], Ch[:, :, :half], Ch[:, :, half:]
        # the reverse heads are the forward recurrence of the time-flipped row, run as extra batch rows
        y, h = ssd_scan_segmented(
            torch.cat([u[:, :, :half], u[:, :, half:].flip(1)]),
            torch.cat([la[..., :half], lr.flip(1)]),
            torch.cat([Bf, Br.flip(1)]).float(),
            torch.cat([Cf, Cr.flip(1)]).float(),
            None if h0 is None else torch.cat([h0.float(), torch.zeros_like(h0, dtype=torch.float32)]),
            self.chunk_size,
        )
        return torch.cat([y[:Bsz], y[Bsz:].flip(1)], dim=2), h[:Bsz]
