"""Gated linear recurrences with a bidirectional prefix (Birdie, arXiv 2411.01030 §3.1 and A.3-A.4).

The recurrence shared by the gated SSM and Hawk (RG-LRU) layers, per channel::

    h_t = a_t ⊙ h_{t-1} + u_t,        a_t = exp(log_a_t) in [0, 1]

``linear_scan`` computes it in ``⌈log2 T⌉`` rounds of whole-tensor operations (a Hillis-Steele scan);
``linear_scan_naive`` is the fp32 loop it is tested against (outputs, final state, gradients including the
initial state's).

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

import torch
import torch.nn.functional as F

from statelab.layers.mamba2 import Mamba2Mixer

__all__ = [
    "BidirectionalMamba2Mixer",
    "linear_scan",
    "linear_scan_naive",
    "reverse_reset",
    "split_scan",
    "split_scan_naive",
    "segment_causal_conv",
]


def linear_scan_naive(
    log_a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loop: ``log_a, u [B, T, D]`` (``log_a <= 0``, ``-inf`` allowed), ``h0 [B, D]`` -> ``(h [B, T, D],
    h_T [B, D])`` in fp32."""
    B, T, D = u.shape
    h = torch.zeros(B, D, dtype=torch.float32, device=u.device) if h0 is None else h0.float()
    out = []
    for t in range(T):
        h = torch.exp(log_a[:, t].float()) * h + u[:, t].float()
        out.append(h)
    hs = torch.stack(out, 1) if out else u.float().new_zeros(B, 0, D)
    return hs, h


def linear_scan(
    log_a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-depth scan, same contract as :func:`linear_scan_naive`; decays and sums in fp32.

    Hillis-Steele doubling on the pairs ``(a, u)`` with ``(a1, u1) ∘ (a2, u2) = (a1·a2, a2·u1 + u2)``: after the
    round with offset ``k`` every position holds the recurrence over its last ``2k`` inputs, so ``⌈log2 T⌉``
    rounds of whole-tensor operations give every ``h_t``. The decays stay as products of numbers in ``[0, 1]``
    (a zeroed decay is an exact 0, with no ``-inf - (-inf)``); autograd provides the backward.
    """
    B, T, D = u.shape
    a = torch.exp(log_a.float())
    h = u.float()
    if h0 is not None and T > 0:
        h = h + F.pad(a[:, :1] * h0.float()[:, None], (0, 0, 0, T - 1))
    k = 1
    while k < T:  # h_t += a_t · h_{t-k}; a_t *= a_{t-k} (shifted copies padded with h = 0, a = 1)
        h = torch.addcmul(h, a, F.pad(h[:, :-k], (0, 0, k, 0)))
        if 2 * k < T:  # the decay products are needed by the next round only
            a = a * F.pad(a[:, :-k], (0, 0, k, 0), value=1.0)
        k *= 2
    if T == 0:
        return h, torch.zeros(B, D, device=u.device) if h0 is None else h0.float()
    return h, h[:, -1]


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
    naive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan of a (possibly bidirectional) layer with segment resets.

    Args:
        log_a, u: ``[B, T, D]``; the log decay (``<= 0``) and the input of the recurrence.
        h0: the forward state before token 0, ``[B, D]`` (causal) or ``[B, D // 2]`` (bidirectional), or None.
        seq_start, is_prefix: ``[B, T]`` masks (module docstring); None means one continuing sample, all suffix.
        bidirectional: split the channels into forward and reverse halves.
    Returns:
        ``h [B, T, D]`` fp32 (forward half then reverse half) and the forward state after the last token.
    """
    seq_start, is_prefix = _masks(u, seq_start, is_prefix)
    scan = linear_scan_naive if naive else linear_scan
    la = log_a.float().masked_fill(seq_start[..., None], float("-inf"))
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv whose window never crosses a sample boundary.

    Args:
        x: ``[B, T, C]``; weight: ``[C, K]`` (tap ``K - 1`` multiplies the current token); bias ``[C]``.
        conv_state: the last ``K - 1`` inputs before token 0, ``[B, C, K - 1]`` oldest first, or None (zeros).
        seq_start: ``[B, T]`` bool or None; inputs before the latest ``seq_start <= t`` are masked out.
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

    ``forward(x [B, T, M], state=None, seq_start=None, is_prefix=None) -> (y, (ssm [B, H', P, N], conv [B, C, K-1]))``
    with ``H' = H / 2`` (bidirectional) or ``H`` (``bidirectional=False``: the plain causal mixer, with segment
    resets). The per-head recurrence ``h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ``, ``y_t = h_t C_t + D x_t`` runs
    through :func:`split_scan` on the flattened ``[H · P · N]`` state, so it is meant for small models (the memory
    is ``T · H · P · N`` per row); the conv window is cut at sample starts.
    """

    def __init__(self, *args, bidirectional: bool = True, **kwargs) -> None:
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
        seq_start: torch.Tensor | None = None,
        is_prefix: torch.Tensor | None = None,
        naive: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        Bsz, T, _ = x.shape
        D, C, H, P, G, N = self.d_inner, self.conv_dim, self.n_heads, self.head_dim, self.n_groups, self.d_state
        h0, conv0 = (None, None) if state is None else state
        if h0 is not None and h0.shape != (Bsz, self.state_heads, P, N):
            raise ValueError(f"Mamba-2 split state must be {(Bsz, self.state_heads, P, N)}, got {tuple(h0.shape)}")
        z, xBC, dt = self.in_proj(x).split([D, C, H], dim=-1)
        xBC, conv_new = segment_causal_conv(xBC, self.conv_weight, self.conv_bias, conv0, seq_start)
        xs, Bm, Cm = F.silu(xBC).split([D, G * N, G * N], dim=-1)
        delta = self._delta(dt)  # [B, T, H] fp32
        A = -torch.exp(self.A_log.float())
        xs = xs.reshape(Bsz, T, H, P).float()
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
            naive=naive,
        )
        y = (h.reshape(Bsz, T, H, P, N) * Ch[:, :, :, None, :]).sum(-1) + self.D.float()[:, None] * xs
        out = self.out_proj(self.norm(y.reshape(Bsz, T, D).to(x.dtype), z))
        return out, (h_last.reshape(Bsz, self.state_heads, P, N), conv_new)
