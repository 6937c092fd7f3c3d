"""Properties of every mixing method on states built directly (no model needed)."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from statelab.errors import ConfigError, StateMismatchError
from statelab.ops.selective_scan import selective_scan
from statelab.state.core import State
from statelab.state.mix import CONV_POLICIES, MIX_METHODS, decay_log, mix
from statelab.testing import assert_close

FP = "a" * 64
ORDER_FREE = ("mean", "weighted", "norm_matched")
ORDERED = ("adecay", "hybrid", "picaso_r", "picaso_s")


def make_state(arch="mamba1", L=3, B=2, D=4, N=3, H=2, P=2, K=4, seed=0, n=5, fp=FP, dtype=torch.float32):
    """A random state: ``[L, B, D, N]`` (mamba1) or ``[L, B, H, P, N]`` (mamba2), ΣΔ > 0."""
    g = torch.Generator().manual_seed(seed)
    if arch == "mamba1":
        ssm, C, sd = torch.randn(L, B, D, N, generator=g), D, torch.rand(L, B, D, generator=g) * 3
    else:
        ssm, C, sd = torch.randn(L, B, H, P, N, generator=g), H * P + 2 * N, torch.rand(L, B, H, generator=g) * 3
    return State(
        arch=arch,
        ssm=ssm.to(dtype),
        conv=torch.randn(L, B, C, K - 1, generator=g).to(dtype),
        sum_delta=sd,
        n_tokens=n,
        fingerprint=fp,
    )


def make_A(arch="mamba1", L=3, D=4, N=3, H=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(L, D, N, generator=g) * 2 if arch == "mamba1" else -torch.rand(L, H, generator=g) * 2


def options_for(method, states, arch):
    """Minimal options that make ``method`` runnable on ``states``."""
    if method in ("adecay", "append", "hybrid", "picaso_r", "picaso_s"):
        return {"A": make_A(arch)}
    if method == "task_arithmetic":
        return {"base": make_state(arch, seed=99, B=states[0].batch_size, dtype=states[0].dtype)}
    if method == "layers":
        return {"base": make_state(arch, seed=98, B=states[0].batch_size, dtype=states[0].dtype), "layers": [0, 2]}
    if method == "softmax_topk":
        return {"scores": [0.1 * i for i in range(len(states))]}
    return {}


def assert_state_close(name, ref: State, got: State, **tol):
    assert_close(f"{name}.ssm", ref.ssm, got.ssm, **tol)
    assert_close(f"{name}.conv", ref.conv, got.conv, **tol)
    assert_close(f"{name}.sum_delta", ref.sum_delta, got.sum_delta, **tol)


# ---- errors ---------------------------------------------------------------------------------------------------
def test_unknown_method_lists_the_methods():
    with pytest.raises(ConfigError, match="unknown mixing method 'blend'.*adecay.*mean.*softmax_topk"):
        mix([make_state()], "blend")


def test_unknown_and_missing_options():
    s = [make_state(), make_state(seed=1)]
    with pytest.raises(ConfigError, match="has no option 'alpha'.*its options: conv"):
        mix(s, "mean", alpha=1)
    with pytest.raises(ConfigError, match="needs option.*A"):
        mix(s, "adecay")
    with pytest.raises(ConfigError, match="conv policy must be one of"):
        mix(s, "mean", conv="median")


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0], r"shape \[2\] or \[2, 2\]"),
        ([1.0, float("nan")], "finite"),
        ([1.0, math.inf], "finite"),
        ("ab", "weights must"),
    ],
    ids=["short", "nan", "inf", "text"],
)
def test_bad_weights(weights, match):
    with pytest.raises(ConfigError, match=match):
        mix([make_state(), make_state(seed=1)], "weighted", weights)


def test_mismatched_states_are_refused():
    a = make_state()
    with pytest.raises(StateMismatchError, match="different models"):
        mix([a, make_state(fp="b" * 64)])
    with pytest.raises(StateMismatchError, match="layout mismatch"):
        mix([a, make_state(D=5)])
    with pytest.raises(StateMismatchError, match="dtype mismatch"):
        mix([a, make_state(dtype=torch.float64)])
    with pytest.raises(StateMismatchError, match="batch size"):
        mix([a, make_state(B=3)])
    with pytest.raises(StateMismatchError, match="at least one state"):
        mix([])
    with pytest.raises(StateMismatchError, match="single State"):
        mix(a)


def test_nan_state_is_refused_and_nothing_changes():
    a, b = make_state(), make_state(seed=1)
    bad = b.replace(ssm=b.ssm.clone().index_fill_(0, torch.tensor([1]), math.nan))
    before = a.clone()
    with pytest.raises(StateMismatchError, match=r"states\[1\] has NaN/inf in its ssm"):
        mix([a, bad])
    assert a.equal(before)


@pytest.mark.parametrize("part", ["ssm", "conv"])
def test_inf_state_is_refused_like_nan(part):
    a, b = make_state(), make_state(seed=1)
    bad = b.replace(**{part: getattr(b, part).clone().index_fill_(0, torch.tensor([0]), math.inf)})
    for method, weights in (("mean", None), ("weighted", [0.5, 0.5]), ("sum", None)):
        with pytest.raises(StateMismatchError, match=rf"states\[1\] has NaN/inf in its {part}"):
            mix([a, bad], method, weights)
    with pytest.raises(StateMismatchError, match="base state has NaN/inf"):
        mix([a, b], "task_arithmetic", base=bad)


def test_a_mix_that_overflows_is_refused():
    """Finite fp16 states and finite weights whose weighted sum overflows fp16: an error, not an inf state."""
    a, b = make_state(dtype=torch.float16), make_state(seed=1, dtype=torch.float16)
    with pytest.raises(StateMismatchError, match="overflowed"):
        mix([a, b], "weighted", [1e6, 1e6])
    assert torch.isfinite(mix([a, b], "weighted", [0.5, 0.5]).ssm).all()


def test_unknown_sum_delta_mixes_order_free_but_not_in_order():
    a, b = make_state(), make_state(seed=1)
    unknown = b.replace(sum_delta=torch.full_like(b.sum_delta, math.nan))
    m = mix([a, unknown], "mean")
    assert torch.isnan(m.sum_delta).all()
    assert_close("ssm", (a.ssm + b.ssm) / 2, m.ssm)
    with pytest.raises(StateMismatchError, match="ΣΔ is unknown"):
        mix([a, unknown], "adecay", A=make_A())


def test_method_specific_errors():
    s = [make_state(), make_state(seed=1)]
    with pytest.raises(ConfigError, match="sum to zero"):
        mix(s, "mean", [1.0, -1.0])
    with pytest.raises(ConfigError, match="takes no weights"):
        mix(s, "adecay", [1.0, 1.0], A=make_A())
    with pytest.raises(ConfigError, match=r"A must be \[L, D, N\]"):
        mix(s, "adecay", A=torch.zeros(3, 4))
    with pytest.raises(ConfigError, match="out of range"):
        mix(s, "layers", base=s[0], layers=[7])
    with pytest.raises(ConfigError, match="threshold"):
        mix(s, "softmax_topk", scores=[0.1, 0.2], threshold=0.5)
    with pytest.raises(ConfigError, match="2 states but 3 scores"):
        mix(s, "softmax_topk", scores=[0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="conv='base' needs a base"):
        mix(s, "mean", conv="base")
    with pytest.raises(ConfigError, match="append needs"):
        mix(s[:1], "append", A=make_A())


# ---- properties every method must have ------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(MIX_METHODS))
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_keeps_dtype_layout_and_inputs(method, arch, dtype):
    states = [make_state(arch, seed=i, dtype=dtype) for i in range(3)]
    before = [s.clone() for s in states]
    out = mix(states, method, **options_for(method, states, arch))
    assert out.dtype == dtype and out.conv.dtype == dtype and out.sum_delta.dtype == torch.float32
    assert out.layout == states[0].layout and out.num_layers == 3 and out.batch_size == 2
    assert out.arch == arch and out.fingerprint == FP
    assert all(s.equal(b) for s, b in zip(states, before, strict=True)), "a mixing method modified its input"
    assert out.ssm.data_ptr() not in {s.ssm.data_ptr() for s in states}
    assert out.conv.data_ptr() not in {s.conv.data_ptr() for s in states}


@pytest.mark.parametrize("method", ["mean", "weighted", "norm_matched", "layers", "softmax_topk", "task_arithmetic"])
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_weights_one_zero_give_the_first_state(method, arch):
    a, b = make_state(arch, seed=3, n=4), make_state(arch, seed=4, n=9)
    if method == "softmax_topk":
        out = mix([a, b], method, scores=[1.0, 0.0], temperature=1e-3)
    elif method == "task_arithmetic":
        out = mix([a, b], method, [1.0, 0.0], base=make_state(arch, seed=5), conv="first")
    elif method == "layers":
        out = mix([a, b], method, [1.0, 0.0], base=b, layers=[0, 1, 2])
    else:
        out = mix([a, b], method, [1.0, 0.0])
    assert_state_close(method, a, out)
    assert out.n_tokens == (b.n_tokens if method == "layers" else 5 if method == "task_arithmetic" else a.n_tokens)


@pytest.mark.parametrize("method", ["mean", "weighted", "norm_matched", "layers", "softmax_topk", "task_arithmetic"])
def test_mix_of_identical_states_is_that_state(method):
    s = make_state(seed=7)
    states = [s.clone() for _ in range(4)]
    opts = {"layers": {"base": s, "layers": [1]}, "task_arithmetic": {"base": s}}.get(method, {})
    if method == "softmax_topk":
        opts = {"scores": [0.3, 0.1, 0.9, 0.2]}
    out = mix(states, method, **opts)
    assert_state_close(method, s, out)
    assert out.n_tokens == s.n_tokens


@pytest.mark.parametrize("method", ORDERED)
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_ordered_composition_of_one_chunk_is_that_chunk(method, arch):
    s = make_state(arch, seed=11)
    out = mix([s], method, A=make_A(arch), conv="last")
    assert_state_close(method, s, out)
    assert out.n_tokens == s.n_tokens


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 4),
    arch=st.sampled_from(["mamba1", "mamba2"]),
    method=st.sampled_from(ORDER_FREE),
    conv=st.sampled_from(["mean", "first", "last", "zero"]),
)
def test_order_free_methods_are_permutation_invariant(seed, n, arch, method, conv):
    states = [make_state(arch, seed=seed + i) for i in range(n)]
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.1
    perm = list(reversed(range(n)))
    out = mix(states, method, w, conv="mean" if conv in ("first", "last") else conv)
    back = mix([states[i] for i in perm], method, w[perm], conv="mean" if conv in ("first", "last") else conv)
    assert_state_close(method, out, back)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), arch=st.sampled_from(["mamba1", "mamba2"]))
def test_weighted_is_the_linear_combination(seed, n, arch):
    states = [make_state(arch, seed=seed + i) for i in range(n)]
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    out = mix(states, "weighted", w)
    ref = sum(wi * s.ssm for wi, s in zip(w, states, strict=True))
    assert_close("ssm", ref, out.ssm)
    p = w.abs() / w.abs().sum()
    assert_close("conv", sum(pi * s.conv for pi, s in zip(p, states, strict=True)), out.conv)


def test_per_row_weights_equal_mixing_rows_separately():
    states = [make_state(seed=i, B=3) for i in range(3)]
    w = torch.tensor([[0.2, 1.0, 0.0], [0.5, 0.0, 2.0], [0.3, 1.0, 1.0]])
    out = mix(states, "mean", w)
    for b in range(3):
        row = mix([s.select(b) for s in states], "mean", w[:, b])
        assert_state_close(f"row {b}", row, out.select(b))


def test_sum_adds_states_decays_and_tokens():
    states = [make_state(seed=i, n=3 + i) for i in range(3)]
    out = mix(states, "sum")
    assert_close("ssm", states[0].ssm + states[1].ssm + states[2].ssm, out.ssm)
    assert_close("sum_delta", sum(s.sum_delta for s in states), out.sum_delta)
    assert out.n_tokens == 3 + 4 + 5
    # sum is A-decay without decay
    assert_close("sum vs adecay(A=0)", out.ssm, mix(states, "adecay", A=torch.zeros(3, 4, 3)).ssm)


def test_norm_matched_sets_each_layer_to_the_typical_norm():
    states = [make_state(seed=i) for i in range(5)]
    out = mix(states, "norm_matched")
    norms = torch.stack([s.ssm.flatten(2).norm(dim=-1) for s in states])  # [n, L, B]
    assert_close("layer norms", norms.mean(0), out.ssm.flatten(2).norm(dim=-1))
    plain = mix(states, "mean")
    cos = torch.nn.functional.cosine_similarity(plain.ssm.flatten(2), out.ssm.flatten(2), dim=-1)
    assert_close("direction", torch.ones_like(cos), cos)
    assert (plain.ssm.flatten(2).norm(dim=-1) < norms.mean(0)).all(), "averaging random states should shrink them"
    top = mix(states, "norm_matched", typical="max")
    assert_close("max norms", norms.max(0).values, top.ssm.flatten(2).norm(dim=-1))


def test_task_arithmetic_formula():
    base, a, b = make_state(seed=1, n=10), make_state(seed=2), make_state(seed=3)
    out = mix([a, b], "task_arithmetic", [0.5, -1.0], base=base)
    assert_close("ssm", base.ssm + 0.5 * (a.ssm - base.ssm) - (b.ssm - base.ssm), out.ssm)
    assert torch.equal(out.conv, base.conv) and out.n_tokens == 10
    assert (out.sum_delta >= 0).all()


def test_layers_mixes_only_the_chosen_layers():
    base, a = make_state(seed=1), make_state(seed=2)
    out = mix([a, base], "layers", [0.7, 0.3], base=base, layers=[-1])
    assert torch.equal(out.ssm[:2], base.ssm[:2]) and torch.equal(out.conv[:2], base.conv[:2])
    assert torch.equal(out.sum_delta[:2], base.sum_delta[:2])
    assert_close("layer 2", 0.7 * a.ssm[2] + 0.3 * base.ssm[2], out.ssm[2])


def test_softmax_topk_weights_threshold_and_k():
    states = [make_state(seed=i) for i in range(4)]
    scores = [0.9, 0.5, 0.8, 0.1]
    out = mix(states, "softmax_topk", scores=scores, temperature=0.2)
    w = torch.softmax(torch.tensor(scores) / 0.2, 0)
    assert_close("ssm", sum(wi * s.ssm for wi, s in zip(w, states, strict=True)), out.ssm)
    top2 = mix(states, "softmax_topk", scores=scores, temperature=0.2, k=2)
    w2 = torch.softmax(torch.tensor([0.9, 0.8]) / 0.2, 0)
    assert_close("top2", w2[0] * states[0].ssm + w2[1] * states[2].ssm, top2.ssm)
    thr = mix(states, "softmax_topk", scores=scores, temperature=0.2, threshold=0.85)
    assert_close("threshold", states[0].ssm, thr.ssm)
    hot = mix(states, "softmax_topk", scores=scores, temperature=1e6)
    assert_close("high temperature = mean", mix(states, "mean").ssm, hot.ssm, rtol=1e-4, atol=1e-5)


def test_mixing_is_differentiable():
    states = [make_state(seed=i) for i in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    ssm = states[0].ssm.clone().requires_grad_(True)
    s0 = states[0].replace(ssm=ssm)
    out = mix([s0, *states[1:]], "weighted", w)
    out.ssm.sum().backward()
    assert_close("d/dw", torch.stack([s.ssm.sum() for s in states]), w.grad)
    assert_close("d/ds0", torch.full_like(ssm, 0.2), ssm.grad)
    ssm.grad = None
    A = make_A()
    mix([s0, *states[1:]], "adecay", A=A).ssm.sum().backward()
    lam = [torch.exp(decay_log(s, A)) for s in states]
    assert_close("adecay d/dh0", lam[1] * lam[2], ssm.grad)


def test_conv_policies():
    states = [make_state(seed=i) for i in range(3)]
    assert set(CONV_POLICIES) == {"mean", "first", "last", "base", "zero"}
    assert torch.equal(mix(states, "mean", conv="first").conv, states[0].conv)
    assert torch.equal(mix(states, "mean", conv="last").conv, states[2].conv)
    assert not mix(states, "mean", conv="zero").conv.any()
    assert_close("mean conv", sum(s.conv for s in states) / 3, mix(states, "sum").conv)
    assert torch.equal(mix(states, "adecay", A=make_A()).conv, states[2].conv)
    base = make_state(seed=9)
    assert torch.equal(mix(states, "task_arithmetic", base=base).conv, base.conv)


# ---- ordered composition --------------------------------------------------------------------------------------
def scan_state(u, dt, A, Bm, backend):
    """Final state and ΣΔ of statelab's selective scan from zero: ``h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t``."""
    out = selective_scan(u, dt, A, Bm, torch.zeros_like(Bm), output_final_state=True, backend=backend)
    return out.final_state, out.sum_delta


@pytest.mark.parametrize("backend", ["naive", "chunk"])
@pytest.mark.parametrize("cuts", [(7,), (1, 5), (3, 4, 10), (13, 14)], ids=lambda c: "cuts" + "-".join(map(str, c)))
def test_adecay_equals_the_linear_recurrence_of_the_concatenation(cuts, backend):
    """Per layer, with fixed inputs (u, Δ, B do not depend on earlier chunks), composition is exact."""
    g = torch.Generator().manual_seed(0)
    L, Bsz, T, D, N = 2, 2, 15, 5, 4
    u = torch.randn(L, Bsz, T, D, generator=g)
    dt = torch.rand(L, Bsz, T, D, generator=g) * 0.5
    Bm = torch.randn(L, Bsz, T, N, generator=g)
    A = -torch.rand(L, D, N, generator=g) * 3
    full = torch.stack([scan_state(u[i], dt[i], A[i], Bm[i], backend)[0] for i in range(L)])
    bounds = [0, *cuts, T]
    chunks = []
    for a, b in itertools.pairwise(bounds):
        hs = [scan_state(u[i, :, a:b], dt[i, :, a:b], A[i], Bm[i, :, a:b], backend) for i in range(L)]
        chunks.append(
            State(
                arch="mamba1",
                ssm=torch.stack([h for h, _ in hs]),
                conv=torch.zeros(L, Bsz, D, 3),
                sum_delta=torch.stack([s for _, s in hs]),
                n_tokens=b - a,
                fingerprint=FP,
            )
        )
    out = mix(chunks, "adecay", A=A)
    assert_close("adecay vs concatenation", full, out.ssm, rtol=1e-6, atol=1e-6)
    assert out.n_tokens == T
    assert_close("ΣΔ", dt.sum(2), out.sum_delta, rtol=1e-6, atol=1e-6)
    # append = one fold step per new chunk onto the first chunk's state
    assert_close("append", out.ssm, mix(chunks, "append", A=A).ssm, rtol=1e-6, atol=1e-7)


def test_adecay_mamba2_decays_per_head():
    """Mamba-2: one scalar decay per head, the same for all P channels and N state entries."""
    g = torch.Generator().manual_seed(1)
    L, Bsz, H, P, N = 2, 1, 3, 2, 4
    A = -torch.rand(L, H, generator=g)
    a, b = (
        make_state("mamba2", L=L, B=Bsz, H=H, P=P, N=N, seed=1),
        make_state("mamba2", L=L, B=Bsz, H=H, P=P, N=N, seed=2),
    )
    out = mix([a, b], "adecay", A=A)
    lam = torch.exp(A[:, None, :, None, None] * b.sum_delta[..., None, None])
    assert_close("ssm", lam * a.ssm + b.ssm, out.ssm)


def test_picaso_s_is_the_average_over_all_orders():
    states = [make_state(seed=i, n=2 + i) for i in range(4)]
    A = make_A()
    ref = sum(mix([states[i] for i in p], "adecay", A=A).ssm for p in itertools.permutations(range(4))) / 24
    out = mix(states, "picaso_s", A=A)
    assert_close("picaso_s", ref, out.ssm)
    assert out.n_tokens == 2 + 3 + 4 + 5
    shuffled = mix([states[i] for i in (2, 0, 3, 1)], "picaso_s", A=A)
    assert_close("permutation invariance", out.ssm, shuffled.ssm)


def test_picaso_r_is_the_average_over_cyclic_orders():
    states = [make_state(seed=i) for i in range(3)]
    A = make_A()
    ref = sum(mix(states[r:] + states[:r], "adecay", A=A).ssm for r in range(3)) / 3
    assert_close("picaso_r", ref, mix(states, "picaso_r", A=A).ssm)
    assert_close("cyclic shift", ref, mix(states[1:] + states[:1], "picaso_r", A=A).ssm)


def test_append_is_one_fold_step():
    skill, new = make_state(seed=1, n=32), make_state(seed=2, n=4)
    A = make_A()
    out = mix([skill, new], "append", A=A)
    assert_close("ssm", torch.exp(decay_log(new, A)) * skill.ssm + new.ssm, out.ssm)
    assert torch.equal(out.conv, new.conv)
    assert out.n_tokens == 36
    assert_close("ΣΔ", skill.sum_delta + new.sum_delta, out.sum_delta)


def test_hybrid_takes_adecay_on_slow_entries_and_the_mean_on_fast_ones():
    states = [make_state(seed=i) for i in range(3)]
    A = make_A()
    ad, mean = mix(states, "adecay", A=A), mix(states, "mean")
    assert_close("cutoff inf", ad.ssm, mix(states, "hybrid", A=A, cutoff=math.inf).ssm)
    assert_close("cutoff 0", mean.ssm, mix(states, "hybrid", A=A, cutoff=0.0).ssm)
    r = sum(decay_log(s, A).abs() for s in states) / 3
    cut = float(r.median())
    out = mix(states, "hybrid", A=A, cutoff=cut)
    assert_close("slow", ad.ssm[r < cut], out.ssm[r < cut])
    assert_close("fast", mean.ssm[r >= cut], out.ssm[r >= cut])
    assert 0 < int((r < cut).sum()) < r.numel()
    assert torch.equal(out.conv, states[-1].conv) and out.n_tokens == 15
    with pytest.raises(ConfigError, match="cutoff must be"):
        mix(states, "hybrid", A=A, cutoff=-1.0)


def test_soup_from_store_hits(tmp_path):
    from statelab.state.mix import soup_from_hits
    from statelab.state.store import StateStore

    store = StateStore(tmp_path / "store")
    library = [make_state(seed=i, B=1) for i in range(4)]
    for i, s in enumerate(library):
        store.add(s, name=f"skill-{i}", task=f"t{i % 2}")
    query = library[2].replace(ssm=library[2].ssm + 0.01 * library[0].ssm)
    hits = store.search(query, k=3, layers=[0, 1, 2])
    assert hits[0].name == "skill-2"
    out = soup_from_hits(store, hits, temperature=0.05)
    w = torch.softmax(torch.tensor([h.score for h in hits]) / 0.05, 0)
    ref = sum(wi * library[int(h.name.split("-")[1])].ssm for wi, h in zip(w, hits, strict=True))
    assert_close("soup", ref, out.ssm)
    with pytest.raises(ConfigError, match="no match"):
        soup_from_hits(store, [])


@pytest.mark.parametrize("method", ["mean", "weighted", "sum", "adecay"])
def test_rows_mix_with_rows_and_keep_their_counts(method):
    """Row b of the result mixes row b of every state; each row's token count follows its own members."""
    a = make_state(B=2, seed=0).replace(n_tokens=[4, 10])
    b = make_state(B=2, seed=1).replace(n_tokens=[6, 2])
    kw = {"A": make_A()} if method == "adecay" else {}
    w = torch.tensor([0.25, 0.75]) if method == "weighted" else None
    out = mix([a, b], method=method, weights=w, **kw)
    want = {"mean": (5, 6), "weighted": (6, 4), "sum": (10, 12), "adecay": (10, 12)}[method]
    assert out.tokens == want
    for r in range(2):
        alone = mix([a.select(r), b.select(r)], method=method, weights=w, **kw)
        assert_close(f"row {r}", out.select(r).ssm, alone.ssm)
        assert alone.n_tokens == want[r]
