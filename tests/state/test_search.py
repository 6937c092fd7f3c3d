import re
import shutil

import numpy as np
import pytest
import torch

from statelab.errors import StateMismatchError, StoreError
from statelab.state.core import State
from statelab.state.search import (
    CountSketch,
    ExactIndex,
    FaissIndex,
    FaissIVFIndex,
    UsearchIndex,
    cosine_scores,
    cosine_scores_naive,
    count_sketch_naive,
    layer_features,
    make_index,
    middle_third,
    recall_at_k,
    resolve_layers,
)
from statelab.state.store import StateStore

FP = "ab" * 32


def task_state(task, shot_seed, L=6, D=16, N=4, fp=FP, spread=0.35):
    """A state of ``task``: a per-task direction plus per-prompt noise (clusters, like skills)."""
    base = torch.randn(L, 1, D, N, generator=torch.Generator().manual_seed(1000 + task))
    g = torch.Generator().manual_seed(shot_seed)
    ssm = base + spread * torch.randn(L, 1, D, N, generator=g)
    return State(
        arch="mamba1", ssm=ssm, conv=torch.randn(L, 1, D, 3, generator=g), sum_delta=torch.rand(L, 1, D, generator=g),
        n_tokens=32, fingerprint=fp,
    )  # fmt: skip


def test_middle_third_and_resolve_layers():
    assert middle_third(24) == list(range(8, 16))
    assert middle_third(6) == [2, 3]
    assert middle_third(1) == [0] and middle_third(2) == [0, 1]
    assert resolve_layers([-1, 0, 0], 4) == [0, 3]
    with pytest.raises(StateMismatchError, match="out of range"):
        resolve_layers([4], 4)
    with pytest.raises(StateMismatchError, match="at least one"):
        resolve_layers([], 4)


def test_layer_features_shape_and_values():
    s = task_state(0, 1)
    f = layer_features(s, [1, 4])
    assert f.shape == (1, 2 * 16 * 4) and f.dtype == torch.float32
    assert torch.equal(f[0], torch.cat([s.ssm[1, 0].flatten(), s.ssm[4, 0].flatten()]))
    assert torch.equal(layer_features(s), layer_features(s, [2, 3]))


def test_cosine_matches_naive():
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(3, 40, generator=g), torch.randn(17, 40, generator=g)
    keys[5] = 0.0
    ref = cosine_scores_naive(q, keys)
    got = cosine_scores(q, keys, block=4)
    assert torch.allclose(got.double(), ref, atol=1e-6)
    assert torch.all(got[:, 5] == 0)


def test_count_sketch_matches_naive_and_is_stable():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 500, generator=g)
    got = CountSketch(32, seed=5)(x)
    assert torch.allclose(got.double(), count_sketch_naive(x, 32, 5), atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(3))
    assert torch.equal(CountSketch(32, seed=5)(x), got)
    assert not torch.allclose(CountSketch(32, seed=6)(x), got)
    # The hash is a fixed function of (seed, index): check it against plain-int SplitMix64 and pin its values.
    from statelab.state.search import _hash_buckets

    def splitmix64(x):
        m = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    bucket, sign = _hash_buckets(6, 16, 0)
    ref = [splitmix64(i ^ splitmix64(0)) for i in range(6)]
    assert bucket.tolist() == [z % 16 for z in ref] == [15, 14, 9, 1, 13, 12]
    assert sign.tolist() == [-1.0 if z >> 63 else 1.0 for z in ref]


def test_count_sketch_preserves_cosine_roughly():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 20000, generator=g)
    b = a + 0.8 * torch.randn(1, 20000, generator=g)
    true = float(cosine_scores(a, b))
    sk = CountSketch(1024, seed=0)
    est = float(sk(a) @ sk(b).T)
    assert abs(est - true) < 0.05


def test_recall_at_k():
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]])) == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[1, -1]]), np.array([[1, 5]])) == 0.5


@pytest.mark.parametrize("kind", ["exact", "faiss", "faiss-ivf", "usearch"])
def test_indexes_agree_with_brute_force(tmp_path, kind):
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    ids = np.arange(1000, 1300)
    index = make_index(kind, 16)
    index.add(ids[:200], v[:200])
    index.add(ids[200:], v[200:])
    assert len(index) == 300
    q = v[[3, 250]] + 0.01
    scores, found = index.search(q.numpy(), 5)
    true = (q @ v.T).topk(5, dim=1)
    assert recall_at_k(found, ids[true.indices.numpy()]) >= 0.9
    assert found[0, 0] == 1003 and found[1, 0] == 1250
    assert np.allclose(scores[:, 0], true.values[:, 0].numpy(), atol=1e-5)
    index.save(tmp_path / "i.idx")
    again = type(index).load(tmp_path / "i.idx", 16)
    assert len(again) == 300 and np.array_equal(again.search(q.numpy(), 5)[1], found)


def test_index_errors():
    with pytest.raises(StoreError, match="unknown index kind"):
        make_index("annoy", 8)
    with pytest.raises(StoreError, match=r"expects vectors \[n, 8\]"):
        ExactIndex(8).add([1], np.zeros((1, 7), np.float32))
    assert ExactIndex(8).search(np.zeros((1, 8), np.float32), 3)[1].shape == (1, 0)
    for cls in (FaissIndex, FaissIVFIndex, UsearchIndex):
        assert cls(8).search(np.zeros((2, 8), np.float32), 3)[1].shape == (2, 0)


# ---- store search ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def library_template(tmp_path_factory):
    """A store of 5 tasks x 6 states each, built once per module."""
    store = StateStore(tmp_path_factory.mktemp("template") / "lib", sketch_dim=128)
    for task in range(5):
        for shot in range(6):
            store.add(task_state(task, 100 * task + shot), name=f"t{task}-{shot}", task=f"t{task}")
    return store.path


@pytest.fixture
def library(tmp_path, library_template):
    """A private copy of the template store (tests add and remove entries)."""
    shutil.copytree(library_template, tmp_path / "lib")
    return StateStore(tmp_path / "lib")


@pytest.mark.parametrize("kind", ["exact", "sketch", "faiss", "faiss-ivf", "usearch"])
def test_search_finds_the_right_task(library, kind):
    store = StateStore(library.path, index=kind)
    for task in range(5):
        hits = store.search(task_state(task, 9999 + task), k=6)
        assert len(hits) == 6 and all(h.task == f"t{task}" for h in hits), (kind, hits)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))


def test_exact_scores_are_raw_cosines(library):
    q = task_state(2, 777)
    hits = library.search(q, k=3)
    keys = torch.cat([layer_features(library.get(h.name)) for h in hits])
    ref = cosine_scores_naive(layer_features(q), keys)[0]
    assert np.allclose([h.score for h in hits], ref.numpy(), atol=1e-5)
    assert library.search(library.get("t1-3"), k=1)[0].name == "t1-3"
    assert library.search(library.get("t1-3"), k=1)[0].score == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["sketch", "faiss", "faiss-ivf", "usearch"])
def test_rerank_gives_exact_scores(library, kind):
    q = task_state(3, 4242)
    exact = library.search(q, k=4)
    reranked = StateStore(library.path, index=kind).search(q, k=4, rerank=12)
    assert [h.name for h in reranked] == [h.name for h in exact]
    assert np.allclose([h.score for h in reranked], [h.score for h in exact], atol=1e-6)


def test_threshold_layers_and_task_filter(library):
    q = task_state(1, 31337)
    assert library.search(q, k=3, threshold=1.01) == []
    hits = library.search(q, k=30, threshold=0.5)
    assert hits and all(h.score >= 0.5 for h in hits) and all(h.task == "t1" for h in hits)
    by_layer = library.search(q, k=3, layers=[0])
    keys = torch.cat([layer_features(library.get(h.name), [0]) for h in by_layer])
    assert np.allclose([h.score for h in by_layer], cosine_scores(layer_features(q, [0]), keys)[0].numpy())
    assert {h.task for h in library.search(q, k=3, task="t4")} == {"t4"}
    sketch = StateStore(library.path, index="faiss")
    assert [h.name for h in sketch.search(q, k=3, layers=[0])] == [h.name for h in by_layer]


def test_search_errors(tmp_path, library):
    empty = StateStore(tmp_path / "empty")
    with pytest.raises(StoreError, match="is empty"):
        empty.search(task_state(0, 1))
    with pytest.raises(StoreError, match="no state made by the query's model"):
        library.search(task_state(0, 1, fp="ee" * 32))
    with pytest.raises(StoreError, match="batch 1"):
        library.search(State.cat([task_state(0, 1), task_state(0, 2)]))
    with pytest.raises(StoreError, match="k must be"):
        library.search(task_state(0, 1), k=0)
    with pytest.raises(StoreError, match="State query"):
        library.search(torch.zeros(3))


@pytest.mark.parametrize("kind", ["sketch", "faiss", "faiss-ivf", "usearch"])
def test_index_follows_adds_and_removes(library, kind):
    store = StateStore(library.path, index=kind)
    q = task_state(0, 5555)
    first = store.search(q, k=1)[0]
    store.remove(first.name)
    assert first.name not in [h.name for h in store.search(q, k=30)]
    twin = store.add(task_state(0, 5555), name="twin", task="t0")
    assert store.search(q, k=1)[0].name == "twin"
    fresh = StateStore(library.path, index=kind)  # a new process-like handle reads the cache file or rebuilds
    assert fresh.search(q, k=1)[0].id == twin.id
    assert len(fresh.search(q, k=100)) == len(store)
    if kind != "sketch":
        files = sorted(p.name for p in (library.path / "index").iterdir() if p.name.startswith(kind + "-"))
        files = [f for f in files if not f.startswith("faiss-ivf-")] if kind == "faiss" else files
        assert len(files) == 1 and re.search(rf"-r1-m{twin.id}-[0-9a-f]{{12}}\.idx$", files[0]), files
    assert store.check().ok


# ---- index caches are verified before FAISS / usearch read them ---------------------------------------------------
def _cache_file(store, kind):
    files = [p for p in (store.path / "index").iterdir() if re.match(rf"{kind}-[0-9a-f]{{16}}-r", p.name)]
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize("kind", ["faiss", "faiss-ivf", "usearch"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_damaged_index_cache_is_rebuilt_with_one_warning(library, kind, damage):
    """The trial's corrupted caches (usearch segfaulted, FAISS returned a cosine of 94.5): the bytes no longer
    match their recorded SHA-256, so the file is never parsed; search rebuilds, says so once, and check reports it."""
    from statelab.errors import StatelabWarning

    store = StateStore(library.path, index=kind)
    queries = [task_state(t, 7777 + t) for t in range(5)]
    want = [[h.name for h in store.search(q, k=4)] for q in queries]
    path = _cache_file(store, kind)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        for i in range(64, len(data), max(1, len(data) // 50)):
            data[i] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray(np.random.default_rng(0).bytes(len(data)))
    path.write_bytes(bytes(data))

    report = StateStore(library.path).check()
    assert not report.ok and report.bad_indexes == [path.name] and "do not match their checksum" in report.summary()

    fresh = StateStore(library.path, index=kind)
    with pytest.warns(StatelabWarning, match=f"index cache {re.escape(path.name)} .* rebuilding it") as caught:
        got = [[h.name for h in fresh.search(q, k=4)] for q in queries]
    assert len([w for w in caught if issubclass(w.category, StatelabWarning)]) == 1  # once, not once per search
    assert got == want
    assert all(-1.0001 <= h.score <= 1.0001 for q in queries for h in fresh.search(q, k=4))
    assert StateStore(library.path).check().ok  # the rebuild replaced the bad file and its record


@pytest.mark.parametrize("kind", ["faiss", "usearch"])
def test_check_repair_rebuilds_a_bad_index_cache(library, kind):
    store = StateStore(library.path, index=kind)
    q = task_state(2, 4242)
    want = [h.name for h in store.search(q, k=5)]
    path = _cache_file(store, kind)
    data = path.read_bytes()
    path.write_bytes(data[:100] + bytes(b ^ 0x5A for b in data[100:200]) + data[200:])
    report = StateStore(library.path).check(repair=True)
    assert report.bad_indexes == [path.name] and len(report.rebuilt_indexes) == 1
    assert "rebuilt index caches" in report.summary()
    assert StateStore(library.path).check().ok
    rebuilt = _cache_file(store, kind)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache is trusted: no warning
        assert [h.name for h in StateStore(library.path, index=kind).search(q, k=5)] == want
    assert rebuilt.exists()


def test_an_unrecorded_index_file_is_never_read(library):
    """A file in index/ that the database has no record of (dropped there by hand, or left by an interrupted save)
    is not parsed; check calls it stale and repair deletes it."""
    store = StateStore(library.path, index="usearch")
    store.search(task_state(0, 1), k=1)
    real = _cache_file(store, "usearch")
    fake = real.with_name(real.name.replace("-r0-m", "-r0-m9").replace(".idx", "0.idx"))
    fake.write_bytes(b"\xde\xad" * 500)
    fresh = StateStore(library.path, index="usearch")
    assert fresh.search(task_state(0, 1), k=1)[0].task == "t0"
    report = fresh.check()
    assert report.ok and fake.name in report.stale_indexes
    fresh.check(repair=True)
    assert not fake.exists() and real.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"k": 2.5}, "k must be an int"), ({"k": True}, "k must be an int"), ({"k": 0}, "k must be an int"),
     ({"threshold": float("nan")}, "threshold must be a finite number"),
     ({"threshold": float("inf")}, "threshold must be a finite number"), ({"threshold": "0.5"}, "threshold must"),
     ({"rerank": -1}, "rerank must be an int"), ({"task": 3}, "task must be a string")],
)  # fmt: skip
def test_search_arguments_are_checked(library, kwargs, message):
    with pytest.raises(StoreError, match=message):
        library.search(task_state(0, 1), **kwargs)
