"""Mixing states: a registry of pure functions ``(states, weights, *, options) -> State``.

``mix(states, method="mean", weights=None, **options)`` validates the states (one model, one layout, one dtype,
one device, one batch size, no NaN), turns ``weights`` into an fp32 tensor ``[n, B]`` and calls the registered
method. Every method works in torch on the states' device, accumulates in fp32, is differentiable with respect
to the states and the weights, and returns a state with the inputs' dtype and layout.

| method            | formula (per layer, channel and state index)                              | source               |
|-------------------|---------------------------------------------------------------------------|----------------------|
| ``mean``          | ``Σ_i w_i s_i / Σ_i w_i`` (uniform by default)                            | State Soup §2.6      |
| ``weighted``      | ``Σ_i w_i s_i`` (weights as given)                                        | State Soup §2.6      |
| ``sum``           | ``Σ_i s_i``                                                               | State Soup §2.6      |
| ``norm_matched``  | mean, then each layer rescaled to the members' typical norm               | statelab (§5.4.4)    |
| ``adecay``        | ``Σ_k (Π_{j>k} Λ_j) ⊙ h_k``, ``Λ_j = exp(A ⊙ ΣΔ_j)``                      | State Soup §2.4/2.7  |
| ``append``        | one fold step ``h ← Λ(new) ⊙ h + h(new)`` onto a stored skill             | State Soup §2.4      |
| ``hybrid``        | ``adecay`` on slow entries (small ``|A| ΣΔ``), ``mean`` on fast ones      | statelab (§5.4.3)    |
| ``picaso_r``      | ``adecay`` averaged over the n cyclic orders                              | PICASO 2502.17605    |
| ``picaso_s``      | ``adecay`` averaged over all n! orders (dynamic programming)              | PICASO 2502.17605    |
| ``task_arithmetic`` | ``base + Σ_i λ_i (s_i − base)``                                         | Ilharco 2212.04089   |
| ``layers``        | an inner mix on chosen layers, the other layers from ``base``             | rag-state-soups      |
| ``softmax_topk``  | ``Σ_i softmax(sim_i / τ) s_i`` over the top-k retrieval hits              | statelab (§5.4.5)    |

Papers: State Soup, arXiv 2406.08423; PICASO, arXiv 2502.17605; task arithmetic, Ilharco et al., arXiv 2212.04089.

**Conv state.** The conv state holds raw pre-conv inputs, so it is never summed or extrapolated: every method
takes ``conv=`` from :data:`CONV_POLICIES`: ``"mean"`` (average with the mixing proportions ``|w_i| / Σ|w_j|``),
``"first"``, ``"last"`` (the last state given, exact for ordered composition when the last chunk has at least
``K - 1`` tokens), ``"base"`` (the ``base`` state's, where a method has one) or ``"zero"``.

**ΣΔ and n_tokens of a mix.** Order-free averages carry the proportion-weighted mean of ΣΔ and of the token
counts (a mixed state is not "after" any real sequence; the numbers describe a typical member). ``sum``,
``adecay``, ``append``, ``hybrid`` and the PICASO averages add them up, as concatenation would. ``task_arithmetic`` and
``layers`` keep the base's token count. A state whose ΣΔ is NaN (unknown, e.g. imported from a transformers
cache) can be mixed by order-free methods (the result's ΣΔ is then unknown too) but not composed in order.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from statelab.errors import ConfigError, StateMismatchError
from statelab.state.core import State

__all__ = ["mix", "register", "MIX_METHODS", "CONV_POLICIES", "MixFn", "decay_log", "method_help", "soup_from_hits"]

MixFn = Callable[..., State]

#: name -> pure mixing function ``(states, weights, *, options) -> State``.
MIX_METHODS: dict[str, MixFn] = {}

CONV_POLICIES = ("mean", "first", "last", "base", "zero")


def register(name: str) -> Callable[[MixFn], MixFn]:
    """Decorator: add a mixing function to :data:`MIX_METHODS` under ``name``."""

    def deco(fn: MixFn) -> MixFn:
        if name in MIX_METHODS:
            raise ConfigError(f"mixing method {name!r} is already registered")
        MIX_METHODS[name] = fn
        return fn

    return deco


def method_help(name: str) -> str:
    """First paragraph of a method's docstring (for ``--help`` texts and error messages)."""
    doc = inspect.getdoc(MIX_METHODS[name]) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def mix(
    states: Sequence[State],
    method: str = "mean",
    weights: Sequence[float] | torch.Tensor | None = None,
    **options: Any,
) -> State:
    """Mix ``states`` with a registered method.

    Args:
        states: states of one model (same fingerprint, layout, dtype, device and batch size ``B``), in order for
            the ordered methods (``adecay``, ``append``: earliest chunk first).
        method: a key of :data:`MIX_METHODS`.
        weights: ``[n]`` (one weight per state) or ``[n, B]`` (per batch row), finite; a tensor keeps its
            autograd graph, so weights can be learned. ``None`` = the method's default.
        **options: the method's keyword options (e.g. ``conv="last"``, ``A=model.decay_A()``, ``base=state``).

    Returns:
        A new state with the inputs' dtype and layout (``sum_delta`` fp32). No input is modified.

    Raises:
        ConfigError: unknown method or option, missing required option, bad weights.
        StateMismatchError: states from different models, layouts, dtypes, devices or batch sizes; NaN/inf
            states; a result that overflowed to NaN/inf.
    """
    fn = MIX_METHODS.get(method) if isinstance(method, str) else None
    if fn is None:
        raise ConfigError(f"unknown mixing method {method!r}; known: {', '.join(sorted(MIX_METHODS))}")
    states = _check_states(states)
    sig = inspect.signature(fn)
    allowed = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"mixing method {method!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(allowed) or 'none'}"
        )
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty and p.name not in options
    ]
    if missing:
        raise ConfigError(f"mixing method {method!r} needs option(s) {', '.join(missing)}")
    if "conv" in options and options["conv"] not in CONV_POLICIES:
        raise ConfigError(f"conv policy must be one of {', '.join(CONV_POLICIES)}, got {options['conv']!r}")
    w = None if weights is None else _weights(weights, len(states), states[0].batch_size, states[0].device)
    out = fn(states, w, **options)
    for part in ("ssm", "conv"):
        if not torch.isfinite(getattr(out, part)).all():  # e.g. huge weights overflowing a bf16/fp16 state
            raise StateMismatchError(
                f"the {method} mix overflowed: its {part} state holds NaN/inf (weights too large for "
                f"{str(out.dtype).removeprefix('torch.')}?); nothing was returned"
            )
    return out


def _check_states(states: Sequence[State]) -> list[State]:
    if isinstance(states, State):
        raise StateMismatchError("mix takes a sequence of states, got a single State")
    states = list(states)
    if not states:
        raise StateMismatchError("mix needs at least one state, got none")
    for i, s in enumerate(states):
        if not isinstance(s, State):
            raise StateMismatchError(f"states[{i}] must be a statelab.State, got {type(s).__name__}")
    first = states[0]
    if first.arch_layout.token_axis is not None:
        raise StateMismatchError(
            f"{first.arch} states are key/value caches that grow with the context, not fixed-size states; "
            "they cannot be mixed (mix the states of a recurrent model)"
        )
    for i, s in enumerate(states):
        first.check_like(s)
        if s.batch_size != first.batch_size:
            raise StateMismatchError(
                f"states[{i}] has batch size {s.batch_size} but states[0] has {first.batch_size}; "
                "use state.expand(n) or state.select(rows)"
            )
        if s.device != first.device:
            raise StateMismatchError(f"states[{i}] is on {s.device} but states[0] on {first.device}")
        for part in ("ssm", "conv"):
            if not torch.isfinite(getattr(s, part)).all():
                raise StateMismatchError(f"states[{i}] has NaN/inf in its {part} state")
    return states


def _weights(weights: Sequence[float] | torch.Tensor, n: int, B: int, device: torch.device) -> torch.Tensor:
    """Weights as fp32 ``[n, B]`` on ``device`` (a ``[n]`` input is broadcast over the batch)."""
    try:
        w = torch.as_tensor(weights) if isinstance(weights, torch.Tensor) else torch.tensor(list(weights))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"weights must be a sequence of numbers, got {weights!r}") from e
    w = w.to(device=device, dtype=torch.float32)
    if w.dim() == 1 and w.shape[0] == n:
        w = w[:, None].expand(n, B)
    elif not (w.dim() == 2 and tuple(w.shape) == (n, B)):
        raise ConfigError(
            f"weights must have shape [{n}] or [{n}, {B}] for {n} states of batch {B}, got {list(w.shape)}"
        )
    if not torch.isfinite(w).all():
        raise ConfigError(f"weights must be finite, got {w.detach().cpu().tolist()}")
    return w


def _bcast(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Weight row ``[B]`` shaped to broadcast against ``[L, B, ...]``."""
    return w.view(1, -1, *([1] * (like.dim() - 2)))


def _proportions(w: torch.Tensor | None, n: int, B: int, device: torch.device) -> torch.Tensor:
    """Mixing proportions ``|w_i| / Σ_j |w_j|`` ``[n, B]`` (uniform when ``w`` is None or all zero)."""
    if w is None:
        return torch.full((n, B), 1.0 / n, device=device)
    a = w.abs()
    tot = a.sum(0, keepdim=True)
    return torch.where(tot > 0, a / tot.clamp_min(1e-30), torch.full_like(a, 1.0 / n))


def _lincomb(parts: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i parts_i`` in fp32; ``parts_i [L, B, ...]``, ``w [n, B]``."""
    acc = torch.zeros_like(parts[0], dtype=torch.float32)
    for p, wi in zip(parts, w, strict=True):
        acc = acc + _bcast(wi, p) * p.float()
    return acc


def _conv(states: Sequence[State], w: torch.Tensor | None, policy: str, base: State | None = None) -> torch.Tensor:
    """Conv state of a mix under ``policy`` (see :data:`CONV_POLICIES`), in the states' dtype."""
    first = states[0]
    if policy == "mean":
        p = _proportions(w, len(states), first.batch_size, first.device)
        return _lincomb([s.conv for s in states], p).to(first.dtype)
    if policy == "first":
        return first.conv.clone()
    if policy == "last":
        return states[-1].conv.clone()
    if policy == "zero":
        return torch.zeros_like(first.conv)
    if policy == "base":
        if base is None:
            raise ConfigError("conv='base' needs a base state; this method has none (use mean, first, last or zero)")
        return base.conv.clone()
    raise ConfigError(f"conv policy must be one of {', '.join(CONV_POLICIES)}, got {policy!r}")


def _tokens(states: Sequence[State], p: torch.Tensor) -> tuple[int, ...]:
    """Proportion-weighted mean token count of each batch row (``p [n, B]``: row ``b`` mixes with row ``b``)."""
    pl = p.tolist()
    return tuple(
        int(round(sum(pl[i][b] * s.tokens[b] for i, s in enumerate(states)))) for b in range(states[0].batch_size)
    )


def _summed_tokens(states: Sequence[State]) -> tuple[int, ...]:
    """Token counts added row by row (ordered composition and ``sum``)."""
    return tuple(sum(counts) for counts in zip(*(s.tokens for s in states), strict=True))


def _averaged(states: Sequence[State], w: torch.Tensor, ssm: torch.Tensor, conv: str, base: State | None = None):
    """Assemble an order-free mix: fp32 ``ssm`` cast back, ΣΔ and n_tokens by the mixing proportions."""
    first = states[0]
    p = _proportions(w, len(states), first.batch_size, first.device)
    return first.replace(
        ssm=ssm.to(first.dtype),
        conv=_conv(states, w, conv, base),
        sum_delta=_lincomb([s.sum_delta for s in states], p),
        n_tokens=_tokens(states, p.detach()),
    )


def _check_base(states: Sequence[State], base: State) -> None:
    if not isinstance(base, State):
        raise ConfigError(f"base must be a statelab.State, got {type(base).__name__}")
    states[0].check_like(base)
    if base.batch_size != states[0].batch_size:
        raise StateMismatchError(f"base has batch size {base.batch_size} but the states have {states[0].batch_size}")
    if not (torch.isfinite(base.ssm).all() and torch.isfinite(base.conv).all()):
        raise StateMismatchError("base state has NaN/inf")


@register("mean")
def mean(states: Sequence[State], weights: torch.Tensor | None, *, conv: str = "mean") -> State:
    """Average of the states: ``s = Σ_i w_i s_i / Σ_i w_i``, uniform ``w_i = 1/n`` without weights.

    The "state soup" of State Soup (arXiv 2406.08423, §2.6), elementwise on every layer. Weights must not sum to
    zero. Conv state by ``conv`` (default: the same average).
    """
    n, B = len(states), states[0].batch_size
    w = torch.ones(n, B, device=states[0].device) if weights is None else weights
    tot = w.sum(0)
    if (tot.abs() < 1e-12).any():
        raise ConfigError("mean: the weights sum to zero; use method='weighted' for an unnormalised combination")
    wn = w / tot
    return _averaged(states, wn, _lincomb([s.ssm for s in states], wn), conv)


@register("weighted")
def weighted(states: Sequence[State], weights: torch.Tensor | None, *, conv: str = "mean") -> State:
    """Weighted combination with the weights as given: ``s = Σ_i w_i s_i`` (no normalisation).

    State Soup (arXiv 2406.08423, §2.6) with non-uniform weights; negative weights give differences of states.
    Without weights it is the mean. Conv state by ``conv`` (default: average with proportions ``|w_i|/Σ|w_j|``).
    """
    n, B = len(states), states[0].batch_size
    w = torch.full((n, B), 1.0 / n, device=states[0].device) if weights is None else weights
    return _averaged(states, w, _lincomb([s.ssm for s in states], w), conv)


@register("sum")
def sum_(states: Sequence[State], weights: torch.Tensor | None, *, conv: str = "mean") -> State:
    """Plain sum ``s = Σ_i s_i``: concatenation without the decay factors (State Soup, arXiv 2406.08423, §2.6).

    A concatenated prompt *sums* decayed chunk states where a mean divides by n; ``sum`` is the other end of
    that scale. ΣΔ and token counts add up. Takes no weights (use ``weighted``).
    """
    if weights is not None:
        raise ConfigError("sum takes no weights; use method='weighted'")
    ones = torch.ones(len(states), states[0].batch_size, device=states[0].device)
    # the composition of chunk states without decay factors: ssm, ΣΔ and token counts all add up
    return _ordered(states, _lincomb([s.ssm for s in states], ones), conv)


@register("norm_matched")
def norm_matched(
    states: Sequence[State], weights: torch.Tensor | None, *, conv: str = "mean", typical: str = "mean"
) -> State:
    """Mean, then each layer's SSM state rescaled to the members' typical norm.

    ``m^ℓ = Σ_i p_i s_i^ℓ`` with proportions ``p_i = |w_i| / Σ|w_j|``, then
    ``s^ℓ = m^ℓ · t^ℓ / ‖m^ℓ‖`` per layer ℓ and batch row, with ``t^ℓ = Σ_i p_i ‖s_i^ℓ‖`` (``typical="mean"``)
    or ``max_i ‖s_i^ℓ‖`` (``typical="max"``). Averaging states that point in different directions shrinks
    them, while a concatenated prompt sums them (State Soup, arXiv 2406.08423, §2.6; statelab's fix, §5.4.4).
    """
    if typical not in ("mean", "max"):
        raise ConfigError(f"norm_matched: typical must be 'mean' or 'max', got {typical!r}")
    first = states[0]
    n, B = len(states), first.batch_size
    p = _proportions(weights, n, B, first.device)
    m = _lincomb([s.ssm for s in states], p)
    norms = torch.stack([s.ssm.float().flatten(2).norm(dim=-1) for s in states])  # [n, L, B]
    t = (p[:, None, :] * norms).sum(0) if typical == "mean" else norms.max(0).values
    mn = m.flatten(2).norm(dim=-1)  # [L, B]
    scale = torch.where(mn > 0, t / mn.clamp_min(1e-30), torch.ones_like(mn))
    ssm = m * scale.view(*scale.shape, *([1] * (m.dim() - 2)))
    return _averaged(states, p, ssm, conv)


def decay_log(state: State, A: torch.Tensor) -> torch.Tensor:
    """``log Λ = A ⊙ ΣΔ`` of a state (fp32, ≤ 0), shaped to broadcast against its SSM state.

    Args:
        state: a state with known ΣΔ ``[L, B, D]`` (mamba1) or ``[L, B, H]`` (mamba2).
        A: ``-exp(A_log)`` stacked over layers, ``[L, D, N]`` (mamba1) or ``[L, H]`` (mamba2); ``model.decay_A()``.

    Returns:
        ``[L, B, D, N]`` (mamba1) or ``[L, B, H, 1, 1]`` (mamba2, one decay per head, broadcast over P and N).
    """
    if not isinstance(A, torch.Tensor):
        raise ConfigError(f"A must be a tensor (model.decay_A()), got {type(A).__name__}")
    if not state.arch_layout.tracks_delta:
        raise StateMismatchError(
            f"{state.arch} states track no ΣΔ, so ordered composition (adecay, append, hybrid, picaso) does not "
            "apply to them; use an order-free method (mean, weighted, sum, norm_matched, task_arithmetic, ...)"
        )
    sd = state.sum_delta
    if torch.isnan(sd).any():
        raise StateMismatchError(
            "a state's ΣΔ is unknown (NaN, e.g. imported from a transformers cache); ordered composition needs it: "
            "re-encode the chunk with a statelab model or pass sum_delta when importing"
        )
    A = A.to(device=sd.device, dtype=torch.float32)
    L = state.num_layers
    if state.arch == "mamba1":
        want = (L, sd.shape[2], state.ssm.shape[3])
        if tuple(A.shape) != want:
            raise ConfigError(f"A must be [L, D, N] = {list(want)} for this mamba1 state, got {list(A.shape)}")
        return A[:, None] * sd[..., None]
    want = (L, sd.shape[2])
    if tuple(A.shape) != want:
        raise ConfigError(f"A must be [L, H] = {list(want)} for this mamba2 state, got {list(A.shape)}")
    return (A[:, None] * sd)[..., None, None]


def _fold(states: Sequence[State], A: torch.Tensor) -> torch.Tensor:
    """``h ← Λ_k ⊙ h + h_k`` over the states in order, from zero; fp32 ``[L, B, ...]``."""
    h = torch.zeros_like(states[0].ssm, dtype=torch.float32)
    for s in states:
        h = torch.exp(decay_log(s, A)) * h + s.ssm.float()
    return h


def _ordered(states: Sequence[State], ssm: torch.Tensor, conv: str) -> State:
    first = states[0]
    ones = torch.ones(len(states), first.batch_size, device=first.device)
    return first.replace(
        ssm=ssm.to(first.dtype),
        conv=_conv(states, None, conv),
        sum_delta=_lincomb([s.sum_delta for s in states], ones),
        n_tokens=_summed_tokens(states),
    )


@register("adecay")
def adecay(states: Sequence[State], weights: torch.Tensor | None, *, A: torch.Tensor, conv: str = "last") -> State:
    """Ordered composition of chunk states: ``h = Σ_k (Π_{j>k} Λ_j) ⊙ h_k`` with ``Λ_j = exp(A ⊙ ΣΔ_j)``.

    State Soup (arXiv 2406.08423, §2.4 and §2.7): chunks encoded independently from zero (earliest first),
    folded as ``h ← Λ_k ⊙ h + h_k``. For one linear recurrence this equals the state of the concatenation
    exactly; through a deep stack it is an approximation. ``A = model.decay_A()`` (``[L, D, N]`` Mamba-1,
    ``[L, H]`` Mamba-2, per head broadcast over P and N). The conv state is the last chunk's (``conv="last"``;
    exact when that chunk has at least K - 1 tokens); ΣΔ and token counts add up. Takes no weights: the
    decays come from ΣΔ. It is one fixed order of PICASO's composition (arXiv 2502.17605).
    """
    if weights is not None:
        raise ConfigError("adecay takes no weights: the decays come from each chunk's ΣΔ")
    return _ordered(states, _fold(states, A), conv)


@register("append")
def append(states: Sequence[State], weights: torch.Tensor | None, *, A: torch.Tensor, conv: str = "last") -> State:
    """Add new demonstrations to a stored skill without re-reading it: ``h ← Λ(new) ⊙ h + h(new)``.

    ``states = [skill, new_1, new_2, ...]``: the skill is the state after its own demonstrations, each ``new_k``
    a chunk encoded from a zero SSM state (ideally with ``encode(..., conv_context=...)``, the skill's last
    tokens, which makes the step exact for one layer). One fold step per new chunk (State Soup, arXiv
    2406.08423, §2.4; statelab §5.4.2). Conv from the newest chunk; ΣΔ and token counts add up.
    """
    if weights is not None:
        raise ConfigError("append takes no weights: the decays come from each new chunk's ΣΔ")
    if len(states) < 2:
        raise ConfigError("append needs a skill state and at least one new chunk state")
    skill = states[0]
    h = skill.ssm.float()
    for s in states[1:]:
        h = torch.exp(decay_log(s, A)) * h + s.ssm.float()
    return _ordered(states, h, conv)


@register("hybrid")
def hybrid(
    states: Sequence[State], weights: torch.Tensor | None, *, A: torch.Tensor, cutoff: float = 1.0, conv: str = "last"
) -> State:
    """A-decay on slow state entries, the mean on fast ones: ``s = where(r < cutoff, adecay, mean)``.

    ``r = (1/n) Σ_k |A ⊙ ΣΔ_k|`` is the mean log-decay per chunk of each (layer, channel, state index) entry
    (per head for Mamba-2): a slow entry (``r`` small) still remembers earlier chunks, which only the ordered
    composition accounts for; a fast one forgets within a chunk, where A-decay keeps the last chunk alone and
    the mean pools all chunks instead. ``cutoff = inf`` gives ``adecay``, ``cutoff = 0`` the mean. A statelab
    experiment, not from a paper. Conv from the last chunk; ΣΔ and tokens add up.
    """
    if weights is not None:
        raise ConfigError("hybrid takes no weights")
    if not isinstance(cutoff, int | float) or math.isnan(cutoff) or cutoff < 0:
        raise ConfigError(f"hybrid: cutoff must be a number >= 0, got {cutoff!r}")
    n = len(states)
    r = sum(decay_log(s, A).abs() for s in states) / n
    avg = sum(s.ssm.float() for s in states) / n
    return _ordered(states, torch.where(r < cutoff, _fold(states, A), avg), conv)


@register("picaso_r")
def picaso_r(states: Sequence[State], weights: torch.Tensor | None, *, A: torch.Tensor, conv: str = "mean") -> State:
    """Ordered composition averaged over the ``n`` cyclic orders of the states (PICASO-R, arXiv 2502.17605).

    ``h = (1/n) Σ_r adecay(rotate(states, r))``; invariant to cyclic shifts of the input order. Conv state by
    ``conv`` (default mean: no member is "last"); ΣΔ and token counts add up (the same for every order).
    """
    if weights is not None:
        raise ConfigError("picaso_r takes no weights")
    n = len(states)
    acc = torch.zeros_like(states[0].ssm, dtype=torch.float32)
    for r in range(n):
        acc = acc + _fold([*states[r:], *states[:r]], A)
    return _ordered(states, acc / n, conv)


@register("picaso_s")
def picaso_s(states: Sequence[State], weights: torch.Tensor | None, *, A: torch.Tensor, conv: str = "mean") -> State:
    """Ordered composition averaged over all ``n!`` orders, in polynomial time (PICASO-S, arXiv 2502.17605).

    In a uniformly random order, the states after ``k`` form a uniformly random subset of size ``m`` with
    probability ``1/n`` for each ``m``, so ``E[Π_{j after k} Λ_j] = (1/n) Σ_m e_m(Λ_{-k}) / C(n-1, m)`` where
    ``e_m`` are the elementary symmetric polynomials of the other decays, built by the usual dynamic programme
    (``O(n^2)`` elementwise products per state). ``h = Σ_k E[...] ⊙ h_k``. Invariant to any permutation.
    """
    if weights is not None:
        raise ConfigError("picaso_s takes no weights")
    n = len(states)
    lam = [torch.exp(decay_log(s, A)) for s in states]
    acc = torch.zeros_like(states[0].ssm, dtype=torch.float32)
    for k, s in enumerate(states):
        e = [torch.ones_like(lam[0])]  # e_0 .. e_m of the decays of the other states
        for j in range(n):
            if j == k:
                continue
            nxt = [e[0]]
            for m in range(1, len(e)):
                nxt.append(e[m] + lam[j] * e[m - 1])
            nxt.append(lam[j] * e[-1])
            e = nxt
        expect = sum(e[m] / math.comb(n - 1, m) for m in range(n)) / n
        acc = acc + expect * s.ssm.float()
    return _ordered(states, acc, conv)


@register("task_arithmetic")
def task_arithmetic(states: Sequence[State], weights: torch.Tensor | None, *, base: State, conv: str = "base") -> State:
    """Task vectors on states: ``s = base + Σ_i λ_i (s_i − base)``, ``λ_i = weights`` (default 1).

    Task arithmetic of Ilharco et al. (arXiv 2212.04089) applied to states instead of weights (State Soup
    §5.4.2): add a skill, subtract one (``λ < 0``), or extrapolate. ΣΔ follows the same formula, clamped at 0
    (a negative ΣΔ would be a growing decay); the token count is the base's. Conv from the base by default.
    """
    _check_base(states, base)
    n, B = len(states), base.batch_size
    lam = torch.ones(n, B, device=base.device) if weights is None else weights
    ssm = base.ssm.float() + _lincomb([s.ssm.float() - base.ssm.float() for s in states], lam)
    sd = base.sum_delta + _lincomb([s.sum_delta - base.sum_delta for s in states], lam)
    return base.replace(
        ssm=ssm.to(base.dtype),
        conv=_conv(states, weights, conv, base),
        sum_delta=sd.clamp_min(0.0),
        n_tokens=base.n_tokens,
    )


@register("layers")
def layers(
    states: Sequence[State],
    weights: torch.Tensor | None,
    *,
    base: State,
    layers: Sequence[int],
    inner: str = "weighted",
    conv: str = "mean",
) -> State:
    """Mix only chosen layers: ``s^ℓ = inner(states)^ℓ`` for ℓ in ``layers``, ``s^ℓ = base^ℓ`` elsewhere.

    As in rag-state-soups (State Soup §5.1), where ``λ · context + (1 − λ) · query`` on some layers was the only
    stable soup: ``mix([ctx, query], "layers", [λ, 1 - λ], base=query, layers=[16, 32, 48])``. ``inner`` is any
    order-free method (``weighted`` by default, ``mean``, ``sum``, ``norm_matched``); ``conv`` applies to the
    chosen layers (ssm, conv and ΣΔ of the others come from ``base``). Negative layer indices count from the end.
    """
    _check_base(states, base)
    if inner not in ("weighted", "mean", "sum", "norm_matched"):
        raise ConfigError(f"layers: inner must be weighted, mean, sum or norm_matched, got {inner!r}")
    L = base.num_layers
    try:
        chosen = sorted({int(i) % L for i in layers if -L <= int(i) < L})
        bad = [int(i) for i in layers if not -L <= int(i) < L]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"layers must be a sequence of layer indices, got {layers!r}") from e
    if bad:
        raise ConfigError(f"layers {bad} out of range for a {L}-layer state")
    if not chosen:
        raise ConfigError("layers: choose at least one layer")
    mixed = MIX_METHODS[inner](states, weights, conv=conv)
    sel = torch.zeros(L, dtype=torch.bool, device=base.device)
    sel[chosen] = True

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(sel.view(L, *([1] * (a.dim() - 1))), a, b)

    return base.replace(
        ssm=pick(mixed.ssm, base.ssm),
        conv=pick(mixed.conv, base.conv),
        sum_delta=pick(mixed.sum_delta, base.sum_delta),
        n_tokens=base.n_tokens,
    )


@register("softmax_topk")
def softmax_topk(
    states: Sequence[State],
    weights: torch.Tensor | None,
    *,
    scores: Sequence[float] | torch.Tensor,
    temperature: float = 0.1,
    k: int | None = None,
    threshold: float | None = None,
    conv: str = "mean",
) -> State:
    """Retrieval hits weighted by similarity: ``s = Σ_{i∈top-k} softmax(sim_i / τ) s_i``.

    ``scores`` are the hits' similarities (e.g. cosine from ``StateStore.search``), one per state. Hits below
    ``threshold`` are dropped (an error if none is left: "no match"); of the rest the ``k`` best are kept.
    ``τ → 0`` gives the best hit alone, ``τ → ∞`` the plain mean (statelab §5.4.5, a softmax-temperature
    version of State Soup's retrieve-then-mix, arXiv 2406.08423). Takes no weights (they come from scores).
    """
    if weights is not None:
        raise ConfigError("softmax_topk takes scores=..., not weights")
    first = states[0]
    sim = torch.as_tensor(scores, dtype=torch.float32, device=first.device).flatten()
    if sim.shape[0] != len(states):
        raise ConfigError(f"softmax_topk: {len(states)} states but {sim.shape[0]} scores")
    if not torch.isfinite(sim).all():
        raise ConfigError(f"softmax_topk: scores must be finite, got {sim.tolist()}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"softmax_topk: temperature must be > 0, got {temperature!r}")
    keep = torch.ones_like(sim, dtype=torch.bool)
    if threshold is not None:
        keep = sim >= threshold
        if not keep.any():
            raise ConfigError(f"softmax_topk: no hit reaches the threshold {threshold} (best {float(sim.max()):.4g})")
    if k is not None:
        if k < 1:
            raise ConfigError(f"softmax_topk: k must be >= 1, got {k}")
        masked = sim.masked_fill(~keep, -math.inf)
        top = torch.topk(masked, min(k, int(keep.sum()))).indices
        keep = torch.zeros_like(keep).index_fill(0, top, True)
    idx = keep.nonzero().flatten().tolist()
    picked = [states[i] for i in idx]
    w = torch.softmax(sim[idx] / temperature, dim=0)[:, None].expand(len(idx), first.batch_size)
    return _averaged(picked, w, _lincomb([s.ssm for s in picked], w), conv)


def soup_from_hits(
    store: Any,
    hits: Sequence[Any],
    *,
    model: Any = None,
    temperature: float = 0.1,
    k: int | None = None,
    threshold: float | None = None,
    conv: str = "mean",
) -> State:
    """The ``softmax_topk`` soup of retrieval hits: ``store.search(query, ...)`` -> one state.

    Args:
        store: a ``StateStore`` (anything with ``get(id, model)``).
        hits: its search results (each with ``id`` and ``score``), best first.
        model: optional model the stored states must come from (checked by the store).
        temperature, k, threshold, conv: as in :func:`softmax_topk`.

    Raises:
        ConfigError: no hits ("no match"), or none reaches ``threshold``.
    """
    if not hits:
        raise ConfigError("no retrieval hits to mix (the search found no match)")
    states = [store.get(h.id, model) for h in hits]
    return mix(
        states, "softmax_topk", scores=[float(h.score) for h in hits], temperature=temperature, k=k,
        threshold=threshold, conv=conv,
    )  # fmt: skip
