"""Retrieval choice: features against a naive reference, validation that holds groups out, the store using it."""

import sqlite3

import pytest
import torch

from statelab.errors import StoreError
from statelab.state.core import State
from statelab.state.retrieval import (
    FEATURES,
    Kernels,
    choose,
    choose_for_store,
    fit_stats,
    layer_options,
    per_layer,
    transform,
    validate,
)
from statelab.state.store import StateStore

FP = "cd" * 32
L, D, N = 4, 8, 4


def skill(task, seed, *, signal_layer=2, wobble=0.0, loud=1.0, spread=0.6, fp=FP):
    """A state whose layer ``signal_layer`` carries the task's direction; the other layers are noise, ``loud``
    times larger on the last layer; ``wobble`` adds one direction shared by every state at a random per-state
    scale (the library's largest variance, which whitening shrinks)."""
    g = torch.Generator().manual_seed(seed)
    ssm = torch.randn(L, 1, D, N, generator=g)
    ssm[-1] *= loud
    task_dir = torch.randn(D, N, generator=torch.Generator().manual_seed(100 + task))
    shared = torch.randn(D, N, generator=torch.Generator().manual_seed(7))
    scale = wobble * (2 * torch.rand((), generator=g) - 1)
    ssm[signal_layer, 0] = task_dir + spread * torch.randn(D, N, generator=g) + scale * shared
    return State(
        arch="mamba1", ssm=ssm, conv=torch.zeros(L, 1, D, 3), sum_delta=torch.zeros(L, 1, D), n_tokens=8,
        fingerprint=fp,
    )  # fmt: skip


def library(tasks=5, sets=3, **kw):
    states, names, groups = [], [], []
    for t in range(tasks):
        for s in range(sets):
            states.append(skill(t, 1000 * t + s, **kw))
            names.append(f"t{t}")
            groups.append(s)
    return states, names, groups


def test_layer_options():
    assert layer_options(4) == [(0,), (1,), (2,), (3,), (0, 1), (1, 2), (2, 3), (0, 1, 2, 3)]
    assert layer_options(1) == [(0,)]


def test_whitened_equals_a_full_covariance_reference():
    """``whitened`` is ``(Σ + αI)^(-1/2)`` applied to the centred vector (up to a scale cosine ignores), with the full
    ``F x F`` covariance computed naively in fp64, when every principal direction is kept."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(12, 6, generator=g) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1, 0.01])
    stats = fit_stats(u, "whitened", rank=100)
    q = torch.randn(3, 6, generator=g)
    c = u.double() - u.double().mean(0)
    cov = c.T @ c / (u.shape[0] - 1)
    ev = torch.linalg.eigvalsh(cov)
    alpha = ev[ev > ev.max() * 1e-10].median()
    w_ev, w_vec = torch.linalg.eigh(cov + alpha * torch.eye(6, dtype=torch.float64))
    W = w_vec @ torch.diag(w_ev.rsqrt()) @ w_vec.T
    ref = (q.double() - u.double().mean(0)) @ W
    ref = ref / ref.norm(dim=1, keepdim=True)
    torch.testing.assert_close(transform(q, "whitened", stats).double(), ref, atol=1e-5, rtol=1e-5)
    # centred: the library mean removed, then unit rows
    cs = fit_stats(u, "centred")
    assert set(cs) == {"mean"}
    torch.testing.assert_close(transform(u, "centred", cs).norm(dim=1), torch.ones(12))
    assert fit_stats(u, "raw") == {} and fit_stats(u, "unit") == {}


@pytest.mark.parametrize("feature", FEATURES)
def test_kernel_scores_equal_the_explicit_vectors(feature):
    """Scores from per-layer Gram matrices == the features formed explicitly (statistics fitted on the
    reference rows), then cosine: for a layer pair, a subset of references and a zero query."""
    states, _, _ = library(signal_layer=2, wobble=4.0, loud=5.0)
    queries = [skill(t, 9000 + t, wobble=4.0, loud=5.0) for t in range(4)]
    queries.append(queries[0].replace(ssm=torch.zeros_like(queries[0].ssm)))
    lib, qs = per_layer(states), per_layer(queries)
    ref, layers = [0, 2, 3, 5, 7, 8, 9, 12, 14], (2, 3)
    base = "raw" if feature == "raw" else "unit"
    stack = lambda xs, rows: torch.cat(  # noqa: E731
        [
            xs[i][rows] / (1 if base == "raw" else xs[i][rows].norm(dim=1, keepdim=True).clamp_min(1e-30))
            for i in layers
        ],
        1,
    )
    u_ref = stack(lib, ref)
    stats = fit_stats(u_ref, feature, rank=3)
    want = transform(stack(qs, list(range(5))), feature, stats) @ transform(u_ref, feature, stats).T
    got = Kernels(lib, qs).scores(layers, feature, range(5), ref, rank=3)
    torch.testing.assert_close(got.float(), want, atol=2e-5, rtol=1e-4)
    if feature in ("raw", "unit"):  # a zero state has cosine 0 (centred, it is minus the library mean)
        assert bool((got[4] == 0).all())


def test_validation_finds_the_informative_layer_and_feature():
    states, tasks, groups = library(signal_layer=2, wobble=4.0)
    table = validate(states, tasks, groups)
    assert len(table) == len(layer_options(L)) * len(FEATURES)
    acc = {(tuple(r["layers"]), r["feature"]): r["accuracy"] for r in table}
    assert acc[((2,), "whitened")] >= 0.8
    for f in ("raw", "unit", "centred"):  # the shared direction's wobble drowns the task unless it is shrunk
        assert acc[((2,), f)] <= acc[((2,), "whitened")] - 0.2, f
    assert acc[((0,), "whitened")] < 0.5  # a noise layer
    choice = choose(states, tasks, groups)
    assert choice.layers == (2,) and choice.feature == "whitened"
    assert choice.n_library == 15 and choice.fingerprint == FP and len(choice.validation) == len(table)
    # the statistics are the whole library's
    u = per_layer(states)[2]
    torch.testing.assert_close(choice.stats["mean"], (u / u.norm(dim=1, keepdim=True)).mean(0))
    # a loud noise layer beside the signal layer: per-layer unit norm lets the signal count
    states, tasks, groups = library(signal_layer=2, loud=30.0)
    table = validate(states, tasks, groups, options=[(2, 3)], features=("raw", "unit"))
    assert table[0]["accuracy"] < 0.5 and table[1]["accuracy"] == 1.0


def test_validation_never_sees_a_held_out_group():
    """A query is scored against the other groups only: replacing the library states of a query's own group by
    anything leaves its score unchanged when the statistics do not depend on that group (raw, unit)."""
    states, tasks, groups = library()
    queries = [skill(t, 5000 + t) for t in range(5)]
    q_groups = [0] * 5
    a = validate(states, tasks, groups, queries, [f"t{t}" for t in range(5)], q_groups, features=("raw", "unit"))
    # group 0's library states replaced by states of other tasks
    swapped = [skill((i // 3 + 2) % 5, 99 + i) if groups[i] == 0 else s for i, s in enumerate(states)]
    b = validate(swapped, tasks, groups, queries, [f"t{t}" for t in range(5)], q_groups, features=("raw", "unit"))
    assert a == b
    with pytest.raises(StoreError, match="two groups"):
        validate(states, tasks, [0] * 15)
    with pytest.raises(StoreError, match="unknown retrieval feature"):
        validate(states, tasks, groups, features=("pca",))
    with pytest.raises(StoreError, match="out of range"):
        validate(states, tasks, groups, options=[(7,)])


def test_the_store_searches_with_the_recorded_choice(tmp_path):
    states, tasks, groups = library(signal_layer=3)
    store = StateStore(tmp_path / "s")
    store.add_many([{"name": f"{t}/{g}", "state": s, "task": t} for s, t, g in zip(states, tasks, groups, strict=True)])
    queries = [skill(t, 7000 + t, signal_layer=3) for t in range(5)]
    raw_top = [store.search(q, k=1)[0].task for q in queries]  # middle third [1, 2]: noise layers
    assert raw_top != [f"t{t}" for t in range(5)]
    assert store.retrieval(FP) is None
    choice = choose_for_store(store, FP)
    assert choice.layers == (3,) and "leave-one-out" in choice.method
    assert [store.search(q, k=1)[0].task for q in queries] == [f"t{t}" for t in range(5)]
    # a new handle on the same directory reads the same choice
    again = StateStore(tmp_path / "s", create=False).retrieval(FP)
    assert again.digest == choice.digest and again.layers == (3,)
    # a feature with statistics: the hits' scores are the cosines of the choice's vectors
    whitened = choose(states, tasks, groups, features=("whitened",))
    store.set_retrieval(whitened)
    assert store.retrieval(FP).feature == "whitened"
    lib, q0 = whitened.vectors(states), whitened.vectors(queries[0])[0]
    by_name = {f"{t}/{g}": i for i, (t, g) in enumerate(zip(tasks, groups, strict=True))}
    hits = store.search(queries[0], k=15)
    assert len(hits) == 15
    for h in hits:
        assert h.score == pytest.approx(float(lib[by_name[h.name]] @ q0), abs=1e-5)
    # explicit layers search the raw states as before; other models' queries are untouched
    assert [store.search(q, k=1, layers=[1, 2])[0].task for q in queries] == raw_top
    assert store.retrieval("ef" * 32) is None
    assert store.clear_retrieval(FP) and store.retrieval(FP) is None
    assert [store.search(q, k=1)[0].task for q in queries] == raw_top


def test_a_damaged_choice_is_refused(tmp_path):
    states, tasks, groups = library()
    store = StateStore(tmp_path / "s")
    store.add_many([{"name": f"{t}/{g}", "state": s, "task": t} for s, t, g in zip(states, tasks, groups, strict=True)])
    store.set_retrieval(choose(states, tasks, groups, features=("centred",)))
    db = sqlite3.connect(tmp_path / "s" / "store.db")
    db.execute("UPDATE retrieval SET spec = replace(spec, '\"centred\"', '\"raw\"')")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="damaged"):
        store.search(states[0], k=1)
