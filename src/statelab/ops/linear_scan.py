"""Gated linear recurrence with a decay per token and channel: ``naive`` (the fp32 loop) and ``parallel`` (a
log-depth scan), one signature. Used by the gated SSM and Hawk's RG-LRU (:mod:`statelab.layers.bidirectional`) and
by the Birdie controller's reward model.

Per channel::

    h_t = a_t ⊙ h_{t-1} + u_t,        a_t = exp(log_a_t) ∈ [0, 1]     (log_a_t = -inf gives an exact reset)

The output of the scan is every state: ``y_t = h_t``.

**Fast path.** Hillis-Steele doubling on the pairs ``(a, u)`` with ``(a1, u1) ∘ (a2, u2) = (a1·a2, a2·u1 + u2)``:
after the round with offset ``k`` every position holds the recurrence over its last ``2k`` inputs, so
``⌈log2 T⌉`` rounds of whole-tensor operations give every ``h_t``. The decays stay products of numbers in
``[0, 1]`` (a zeroed decay is an exact 0, never ``-inf - (-inf)``); autograd provides the backward.

Everything is computed and returned in fp32. The result follows the :mod:`statelab.ops` convention
(:class:`~statelab.ops.ScanOutput`, positions in ``[0, T]``, ``states_at [B, n_pos, D]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from statelab.ops.scan_output import ScanOutput, check_positions, stack_at

__all__ = ["BACKENDS", "linear_scan", "linear_scan_naive", "linear_scan_parallel"]

BACKENDS = ("naive", "parallel")


def _prepare(
    log_a: torch.Tensor, u: torch.Tensor, initial_state: torch.Tensor | None, return_states_at: Sequence[int] | None
) -> tuple[list[int] | None, torch.Tensor]:
    """Validate shapes (``ValueError`` naming the expected one); return the positions as ints and the initial
    state ``h0 [B, D]`` in fp32 (zeros for ``None``)."""
    if u.dim() != 3:
        raise ValueError(f"linear_scan: u must be [B, T, D], got {tuple(u.shape)}")
    if log_a.shape != u.shape:
        raise ValueError(f"linear_scan: log_a must be [B, T, D] = {tuple(u.shape)}, got {tuple(log_a.shape)}")
    B, T, D = u.shape
    if initial_state is not None and tuple(initial_state.shape) != (B, D):
        raise ValueError(f"linear_scan: initial_state must be [B, D] = {(B, D)}, got {tuple(initial_state.shape)}")
    pos = check_positions("linear_scan", return_states_at, T)
    h0 = torch.zeros(B, D, dtype=torch.float32, device=u.device) if initial_state is None else initial_state.float()
    return pos, h0


def _result(h: torch.Tensor, h0: torch.Tensor, output_final_state: bool, pos: list[int] | None) -> ScanOutput:
    """``h [B, T, D]`` fp32 (every state) and ``h0 [B, D]`` fp32 (the initial state) -> the ScanOutput."""
    final = h[:, -1] if h.shape[1] else h0.clone()
    at = None
    if pos is not None:
        at = stack_at([h0.clone() if p == 0 else h[:, p - 1] for p in pos], h0)
    return ScanOutput(y=h, final_state=final if output_final_state else None, states_at=at)


def linear_scan_naive(
    log_a: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states_at: Sequence[int] | None = None,
) -> ScanOutput:
    """The reference loop, one token at a time in fp32.

    Args:
        log_a: ``[B, T, D]`` log decays (``<= 0``; ``-inf`` resets the state).
        u: ``[B, T, D]`` inputs.
        initial_state: ``[B, D]``, the state before token 0 (``None`` = zeros); never modified.
        output_final_state: return the state after the last token.
        return_states_at: positions ``p`` in ``[0, T]``; the state after the first ``p`` tokens is returned for each.

    Returns:
        :class:`~statelab.ops.ScanOutput` with ``y = h [B, T, D]`` (every state) fp32, ``final_state [B, D]`` fp32.
    """
    pos, h0 = _prepare(log_a, u, initial_state, return_states_at)
    B, T, D = u.shape
    h = h0
    out = []
    for t in range(T):
        h = torch.exp(log_a[:, t].float()) * h + u[:, t].float()
        out.append(h)
    hs = torch.stack(out, 1) if out else u.float().new_zeros(B, 0, D)
    return _result(hs, h0, output_final_state, pos)


def linear_scan_parallel(
    log_a: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states_at: Sequence[int] | None = None,
) -> ScanOutput:
    """Log-depth scan; same arguments and results as :func:`linear_scan_naive`."""
    pos, h0 = _prepare(log_a, u, initial_state, return_states_at)
    B, T, D = u.shape
    a = torch.exp(log_a.float())
    h = u.float()
    if initial_state is not None and T > 0:
        h = h + F.pad(a[:, :1] * h0[:, None], (0, 0, 0, T - 1))
    k = 1
    while k < T:  # h_t += a_t · h_{t-k}; a_t *= a_{t-k} (shifted copies padded with h = 0, a = 1)
        h = torch.addcmul(h, a, F.pad(h[:, :-k], (0, 0, k, 0)))
        if 2 * k < T:  # the decay products are needed by the next round only
            a = a * F.pad(a[:, :-k], (0, 0, k, 0), value=1.0)
        k *= 2
    return _result(h, h0, output_final_state, pos)


def linear_scan(
    log_a: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states_at: Sequence[int] | None = None,
    backend: str = "parallel",
) -> ScanOutput:
    """The gated linear scan with an explicit ``backend`` (``"parallel"`` by default, ``"naive"`` for the
    reference); arguments as :func:`linear_scan_naive`."""
    if backend == "naive":
        return linear_scan_naive(log_a, u, initial_state, output_final_state, return_states_at)
    if backend == "parallel":
        return linear_scan_parallel(log_a, u, initial_state, output_final_state, return_states_at)
    raise ValueError(f"linear_scan: unknown backend {backend!r}; choose one of {BACKENDS}")
