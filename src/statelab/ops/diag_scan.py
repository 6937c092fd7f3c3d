"""Time-invariant diagonal linear recurrence: ``naive`` (the loop) and ``chunk`` (chunks through a table of decay
powers), one signature. Used by S5 (:mod:`statelab.layers.s5`) and GD-SSM (:mod:`statelab.layers.gd_ssm`).

For a state ``S`` of any shape ``[*S]`` (one decay per entry, the same at every step)::

    S_t = exp(log_decay) ⊙ S_{t-1} + x_t
    y_t = S_t            (no readout, ``g=None``)
    y_t = S_t · g_t      (readout: ``S_t`` contracted with ``g_t`` over its last axis)

S5 runs it on a complex ``[P]`` state with ``y_t = S_t``; GD-SSM on a real ``[P, d]`` accumulator read out by a
gate ``g_t [d]``. Complex inputs and decays work on both paths.

**Fast path.** The decay does not depend on ``t``, so within a chunk of ``Q`` steps starting from ``S``:
``S_t = Λ̄^{t+1} ⊙ S + Σ_{j≤t} Λ̄^{t-j} ⊙ x_j``, one contraction of the chunk's inputs with a ``[Q, Q, *S]`` table of
``exp((t − j) · log_decay)`` (lower triangle, zero above), then the readout; the state after the chunk is its
last ``S_t``. Only exponents ``(t − j) ≥ 0`` are taken, so a decay above 1 overflows no sooner than the loop.
Autograd provides the backward.

Numerics: accumulated in ``promote(x.dtype, float32)`` (fp64 stays fp64, complex64 stays complex64), results cast
back to ``x``'s dtype. The result follows the :mod:`statelab.ops` convention (:class:`~statelab.ops.ScanOutput`,
positions in ``[0, T]``, ``states_at [B, n_pos, *S]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from statelab.ops.scan_output import ScanOutput, check_positions, stack_at

__all__ = ["BACKENDS", "DEFAULT_CHUNK_SIZE", "diag_scan", "diag_scan_chunk", "diag_scan_naive"]

BACKENDS = ("naive", "chunk")
DEFAULT_CHUNK_SIZE = 16


def _check(
    x: torch.Tensor,
    log_decay: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    return_states_at: Sequence[int] | None,
) -> list[int] | None:
    """Validate shapes (``ValueError`` naming the expected one); return the positions as ints."""
    if x.dim() < 3:
        raise ValueError(f"diag_scan: x must be [B, T, *S] with a state of at least one axis, got {tuple(x.shape)}")
    Bsz, T, *S = x.shape
    if tuple(log_decay.shape) != tuple(S):
        raise ValueError(f"diag_scan: log_decay must be [*S] = {tuple(S)}, got {tuple(log_decay.shape)}")
    if g is not None and tuple(g.shape) != (Bsz, T, S[-1]):
        raise ValueError(f"diag_scan: g must be [B, T, S[-1]] = {(Bsz, T, S[-1])}, got {tuple(g.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (Bsz, *S):
        raise ValueError(f"diag_scan: initial_state must be [B, *S] = {(Bsz, *S)}, got {tuple(initial_state.shape)}")
    return check_positions("diag_scan", return_states_at, T)


def _acc_dtype(x: torch.Tensor, log_decay: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, torch.float32), log_decay.dtype)


def _readout(states: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """``states [B, n, *S]`` and ``g [B, n, S[-1]]`` -> ``y [B, n, *S[:-1]]`` (or the states themselves)."""
    if g is None:
        return states
    return (states * g.view(*g.shape[:2], *([1] * (states.dim() - 3)), g.shape[-1])).sum(-1)


def _result(
    x: torch.Tensor,
    g: torch.Tensor | None,
    acc: torch.dtype,
    ys: list[torch.Tensor],
    final: torch.Tensor,
    captured: dict[int, torch.Tensor],
    pos: list[int] | None,
    output_final_state: bool,
) -> ScanOutput:
    """The ScanOutput, in ``x``'s dtype, from the readouts ``ys`` (``[B, n, ...]`` pieces in time order), the state
    after the last step ``final [B, *S]`` and the states ``captured[p] [B, *S]`` after the first ``p`` steps."""
    Bsz, _, *S = x.shape
    out_shape = S if g is None else S[:-1]
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(Bsz, 0, *out_shape, dtype=acc)
    return ScanOutput(
        y=y.to(x.dtype),
        final_state=final.to(x.dtype) if output_final_state else None,
        states_at=None if pos is None else stack_at([captured[p] for p in pos], final).to(x.dtype),
    )


def diag_scan_naive(
    x: torch.Tensor,
    log_decay: torch.Tensor,
    g: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states_at: Sequence[int] | None = None,
) -> ScanOutput:
    """The reference loop, one step at a time.

    Args:
        x: ``[B, T, *S]``, what each step adds to the state.
        log_decay: ``[*S]``, ``log Λ̄`` (real or complex).
        g: ``[B, T, S[-1]]`` readout vectors, or ``None`` (the output is the state itself).
        initial_state: ``[B, *S]``, the state before step 0 (``None`` = zeros); never modified.
        output_final_state: return the state after the last step.
        return_states_at: positions ``p`` in ``[0, T]``; the state after the first ``p`` steps is returned for each.

    Returns:
        :class:`~statelab.ops.ScanOutput` with ``y [B, T, *S]`` (no readout) or ``[B, T, *S[:-1]]``, in ``x``'s
        dtype; ``sum_delta`` and ``sum_delta_at`` are ``None`` (there is no step size).
    """
    pos = _check(x, log_decay, g, initial_state, return_states_at)
    Bsz, T, *S = x.shape
    acc = _acc_dtype(x, log_decay)
    decay = log_decay.to(acc).exp()
    s = x.new_zeros(Bsz, *S, dtype=acc) if initial_state is None else initial_state.to(acc)
    want = set(pos or ())
    captured = {0: s.clone()} if 0 in want else {}
    ys = []
    for t in range(T):
        s = decay * s + x[:, t].to(acc)
        ys.append(_readout(s[:, None], None if g is None else g[:, t : t + 1].to(acc)))
        if t + 1 in want:
            captured[t + 1] = s
    return _result(x, g, acc, ys, s, captured, pos, output_final_state)


def diag_scan_chunk(
    x: torch.Tensor,
    log_decay: torch.Tensor,
    g: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states_at: Sequence[int] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ScanOutput:
    """Chunked form of :func:`diag_scan_naive` (same arguments and results), ``chunk_size`` steps per chunk."""
    pos = _check(x, log_decay, g, initial_state, return_states_at)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"diag_scan: chunk_size must be an int >= 1, got {chunk_size!r}")
    Bsz, T, *S = x.shape
    F = 1
    for n in S:
        F *= n
    acc = _acc_dtype(x, log_decay)
    ld = log_decay.to(acc).reshape(F)
    s = x.new_zeros(Bsz, F, dtype=acc) if initial_state is None else initial_state.to(acc).reshape(Bsz, F)
    q = min(chunk_size, max(T, 1))
    steps = torch.arange(q, device=x.device)
    diff = (steps[:, None] - steps[None, :]).to(ld.real.dtype)  # t - j
    # table[t, j] = Λ̄^{t-j} for j <= t, else 0: [Q, Q, F]
    table = torch.where((diff >= 0)[..., None], (diff.clamp_min(0)[..., None] * ld).exp(), 0)
    carry = ((steps + 1).to(diff.dtype)[:, None] * ld).exp()  # Λ̄^{t+1}: [Q, F]
    want = sorted(set(pos or ()))
    captured = {0: s.clone().view(Bsz, *S)} if 0 in want else {}
    ys = []
    for start in range(0, T, q):
        xc = x[:, start : start + q].to(acc).reshape(Bsz, -1, F)
        n = xc.shape[1]
        # every state of the chunk, [B, n, F] (as small as the chunk's inputs), then the readout
        states = torch.einsum("tjf,bjf->btf", table[:n, :n], xc) + carry[:n] * s[:, None]
        full = states.view(Bsz, n, *S)
        ys.append(_readout(full, None if g is None else g[:, start : start + n].to(acc)))
        for p in want:
            if start < p <= start + n:
                captured[p] = full[:, p - start - 1]
        s = states[:, -1]
    return _result(x, g, acc, ys, s.view(Bsz, *S), captured, pos, output_final_state)


def diag_scan(
    x: torch.Tensor,
    log_decay: torch.Tensor,
    g: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states_at: Sequence[int] | None = None,
    backend: str = "chunk",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ScanOutput:
    """The diagonal scan with an explicit ``backend`` (``"chunk"`` by default, ``"naive"`` for the reference);
    arguments as :func:`diag_scan_naive` (``chunk_size`` is used by ``"chunk"``)."""
    if backend == "naive":
        return diag_scan_naive(x, log_decay, g, initial_state, output_final_state, return_states_at)
    if backend == "chunk":
        return diag_scan_chunk(x, log_decay, g, initial_state, output_final_state, return_states_at, chunk_size)
    raise ValueError(f"diag_scan: unknown backend {backend!r}; choose one of {BACKENDS}")
