import io
import json
import multiprocessing
import os
import random
import select
import signal
import sqlite3
import tarfile
import time

import pytest
import torch

from statelab.errors import StoreError
from statelab.state.core import State
from statelab.state.store import StateStore

FP = "ab" * 32
OTHER_FP = "cd" * 32


def make_state(seed=0, L=6, D=8, N=4, fp=FP, n=9, base=None, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    ssm = torch.randn(L, 1, D, N, generator=g) * noise
    if base is not None:
        ssm = ssm + base
    return State(
        arch="mamba1",
        ssm=ssm,
        conv=torch.randn(L, 1, D, 3, generator=g),
        sum_delta=torch.rand(L, 1, D, generator=g),
        n_tokens=n,
        fingerprint=fp,
    )


def blob_files(store):
    return sorted(p.name for p in (store.path / "blobs").glob("*/*"))


def snapshot(store):
    """Everything a failed call must leave untouched: rows, tags and files."""
    db = sqlite3.connect(store.path / "store.db")
    rows = db.execute("SELECT id, name, blob FROM entries ORDER BY id").fetchall()
    tags = db.execute("SELECT entry_id, tag FROM tags ORDER BY entry_id, tag").fetchall()
    db.close()
    return rows, tags, blob_files(store)


@pytest.fixture
def store(tmp_path):
    return StateStore(tmp_path / "store")


def test_add_get_entry_roundtrip(store):
    s = make_state(1)
    e = store.add(s, name="a", task="sst2", tags=["x", "y", "x"], description="d", prompt="p", shots=4)
    assert (e.name, e.task, e.tags, e.description, e.prompt, e.shots) == ("a", "sst2", ("x", "y"), "d", "p", 4)
    assert (e.fingerprint, e.arch, e.n_tokens, e.num_layers, e.dtype) == (FP, "mamba1", 9, 6, "float32")
    assert e.layout == s.layout and len(e.blob) == 64 and e.nbytes > 0
    assert store.get("a").equal(s)
    assert store.get(e.id).equal(s) and store.get(str(e.id)).equal(s)
    assert store.entry("a") == e and "a" in store and "zz" not in store and len(store) == 1
    assert e.to_dict()["tags"] == ["x", "y"]


def test_list_filters(store):
    store.add(make_state(1), name="a", task="t1", tags=["x"])
    store.add(make_state(2), name="b", task="t2", tags=["x", "y"])
    store.add(make_state(3, fp=OTHER_FP), name="c", task="t1", tags=["y"])
    names = lambda es: [e.name for e in es]  # noqa: E731
    assert names(store.list()) == ["a", "b", "c"]
    assert names(store.list(task="t1")) == ["a", "c"]
    assert names(store.list(tags=["x"])) == ["a", "b"]
    assert names(store.list(tags=["x", "y"])) == ["b"]
    assert names(store.list(tags="y")) == ["b", "c"]
    assert names(store.list(fingerprint=OTHER_FP[:8])) == ["c"]
    assert names(store.list(task="t1", fingerprint=FP)) == ["a"]


def test_bad_adds_change_nothing(store):
    store.add(make_state(1), name="a")
    before = snapshot(store)
    with pytest.raises(StoreError, match="already has an entry named 'a'"):
        store.add(make_state(2), name="a")
    with pytest.raises(StoreError, match="batch size 2"):
        store.add(State.cat([make_state(3), make_state(4)]), name="b")
    nan = make_state(5)
    nan = nan.replace(ssm=nan.ssm.clone().fill_(float("nan")))
    with pytest.raises(StoreError, match="NaN/inf"):
        store.add(nan, name="n")
    with pytest.raises(StoreError, match="non-empty name"):
        store.add(make_state(6), name="")
    with pytest.raises(StoreError, match="list of strings"):
        store.add(make_state(6), name="t", tags="oops")
    with pytest.raises(StoreError, match="shots"):
        store.add(make_state(6), name="t", shots=-1)
    with pytest.raises(StoreError, match="needs a statelab.State"):
        store.add(torch.zeros(3), name="t")
    assert snapshot(store) == before


def test_missing_entries_are_clear_errors(store):
    with pytest.raises(StoreError, match="no entry named 'nope'"):
        store.get("nope")
    with pytest.raises(StoreError, match="no entry named 'nope'"):
        store.remove("nope")


def test_identical_states_share_a_blob_and_remove_collects_it(store):
    store.add(make_state(1), name="a")
    store.add(make_state(1), name="b")
    assert len(blob_files(store)) == 1
    store.remove("a")
    assert len(blob_files(store)) == 1 and store.get("b").equal(make_state(1))
    removed = store.remove("b")
    assert removed.name == "b" and blob_files(store) == [] and len(store) == 0


def test_reopen_keeps_config_and_refuses_conflicts(tmp_path):
    StateStore(tmp_path / "s", sketch_dim=64, sketch_seed=7, layers=[1, 2])
    again = StateStore(tmp_path / "s")
    assert (again.sketch_dim, again.sketch_seed, again.layers) == (64, 7, [1, 2])
    with pytest.raises(StoreError, match="sketch_dim=64, not 32"):
        StateStore(tmp_path / "s", sketch_dim=32)
    with pytest.raises(StoreError, match="unknown index"):
        StateStore(tmp_path / "s", index="lancedb")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        StateStore(tmp_path / "file")


# ---- damage and repair ---------------------------------------------------------------------------------------
def _blob_path(store, name):
    e = store.entry(name)
    return store.path / "blobs" / e.blob[:2] / f"{e.blob}.safetensors"


def test_missing_blob_is_reported_and_repaired(store):
    store.add(make_state(1), name="a")
    store.add(make_state(2), name="b")
    _blob_path(store, "a").unlink()
    with pytest.raises(StoreError, match="entry 'a' has no state file.*check --repair"):
        store.get("a")
    before = snapshot(store)
    report = store.check()
    assert not report.ok and report.missing_blobs == ["a"] and snapshot(store) == before
    report = store.check(repair=True)
    assert report.dropped_entries == ["a"]
    assert store.check().ok and [e.name for e in store.list()] == ["b"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_blob_is_reported_and_repaired(store, damage):
    store.add(make_state(1), name="a")
    p = _blob_path(store, "a")
    data = bytearray(p.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x40
    else:
        data = data[: len(data) // 2]
    p.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="check --repair"):
        store.get("a")
    report = store.check()
    assert report.corrupt_blobs == ["a"] and not report.ok
    assert store.check(repair=True).dropped_entries == ["a"]
    assert store.check().ok and len(store) == 0 and blob_files(store) == []


def test_orphans_and_dead_temp_files_are_repaired_live_ones_kept(store):
    store.add(make_state(1), name="a")
    orphan = store.path / "blobs" / "ff" / ("f" * 64 + ".safetensors")
    orphan.parent.mkdir()
    orphan.write_bytes(b"x")
    proc = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()  # a pid that no longer runs
    dead = store.path / "blobs" / "ff" / f".tmp-{proc.pid}-0000-x.safetensors"
    dead.write_bytes(b"partial")
    live = store.path / "blobs" / "ff" / f".tmp-{os.getppid()}-0000-y.safetensors"
    live.write_bytes(b"in flight")
    report = store.check()
    assert report.orphan_blobs == ["f" * 64] and len(report.temp_files) == 1 and len(report.live_temp_files) == 1
    assert not report.ok and orphan.exists() and dead.exists()
    store.check(repair=True)
    assert not orphan.exists() and not dead.exists() and live.exists()
    assert store.check().ok and store.get("a").equal(make_state(1))


# ---- archives ------------------------------------------------------------------------------------------------
def test_export_import_roundtrip_and_idempotence(tmp_path, store):
    store.add(make_state(1), name="a", task="t", tags=["x"], prompt="p", shots=2, description="d")
    store.add(make_state(2), name="b")
    store.add(make_state(2), name="b2")
    assert store.export(tmp_path / "arch.tar") == 3
    other = StateStore(tmp_path / "other", sketch_dim=32)
    added = other.import_(tmp_path / "arch.tar")
    assert [e.name for e in added] == ["a", "b", "b2"]
    a0, a1 = store.entry("a"), other.entry("a")
    for field in ("task", "tags", "prompt", "shots", "description", "created", "blob", "fingerprint"):
        assert getattr(a0, field) == getattr(a1, field), field
    assert all(other.get(n).equal(store.get(n)) for n in ("a", "b", "b2"))
    assert other.import_(tmp_path / "arch.tar") == [] and len(other) == 3
    assert other.check().ok and len(blob_files(other)) == 2


def test_import_conflict_or_damage_changes_nothing(tmp_path, store):
    store.add(make_state(1), name="a")
    store.add(make_state(2), name="b")
    store.export(tmp_path / "arch.tar")
    target = StateStore(tmp_path / "t")
    target.add(make_state(3), name="b")
    before = snapshot(target)
    with pytest.raises(StoreError, match="already has a different state of that name"):
        target.import_(tmp_path / "arch.tar")
    assert snapshot(target) == before

    data = bytearray((tmp_path / "arch.tar").read_bytes())
    with tarfile.open(tmp_path / "arch.tar") as tar:
        blob = [m for m in tar.getmembers() if m.name.startswith("blobs/")][-1]
    data[blob.offset_data + blob.size - 5] ^= 0x01  # inside the last blob's tensor bytes
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch"):
        target.import_(tmp_path / "bad.tar")
    assert snapshot(target) == before

    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "evil.tar").write_bytes(evil.getvalue())
    with pytest.raises(StoreError, match="unexpected member '../escape.txt'"):
        target.import_(tmp_path / "evil.tar")
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(StoreError, match="cannot read archive"):
        target.import_(tmp_path / "junk.tar")
    assert snapshot(target) == before


def test_export_selected_names(tmp_path, store):
    store.add(make_state(1), name="a")
    store.add(make_state(2), name="b")
    assert store.export(tmp_path / "one.tar", names=["b"]) == 1
    with tarfile.open(tmp_path / "one.tar") as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert [e["name"] for e in manifest["entries"]] == ["b"]


# ---- concurrency and crashes ---------------------------------------------------------------------------------
def _expected(states, salt, i):
    """The state a writer adds as its i-th entry: distinct n_tokens make every blob new (no dedup)."""
    return states[i % len(states)].replace(n_tokens=salt * 100_000 + i)


def _writer(path, prefix, count, states, fd, salt=0):
    store = StateStore(path)
    for i in range(count):
        name = f"{prefix}{i}"
        store.add(_expected(states, salt, i), name=name, task=prefix, tags=[name, "all"])
        if fd is not None:
            os.write(fd, (name + "\n").encode())
    os._exit(0)


def test_two_processes_add_200_each(tmp_path):
    path = tmp_path / "s"
    StateStore(path)
    states = [make_state(i, L=2) for i in range(16)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, p, 200, states, None)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = StateStore(path)
    entries = store.list()
    assert len(entries) == 400 and len(store.list(task="a")) == 200 and len(store.list(tags=["all"])) == 400
    assert store.check().ok
    assert store.get("a199").equal(_expected(states, 0, 199)) and store.get("b0").equal(_expected(states, 0, 0))


def test_sigkilled_writer_never_leaves_a_partial_entry(tmp_path):
    """100 times: start a writer, SIGKILL it at a random moment, then check what is visible."""
    path = tmp_path / "s"
    store = StateStore(path)
    states = [make_state(i, L=2, D=4) for i in range(8)]
    rng = random.Random(0)
    ctx = multiprocessing.get_context("fork")
    reported: set[str] = set()
    for round_ in range(100):
        read_fd, write_fd = os.pipe()
        proc = ctx.Process(target=_writer, args=(path, f"r{round_}-", 10_000, states, write_fd, round_))
        proc.start()
        os.close(write_fd)
        # Let the writer finish 0-2 adds (however slow the machine is), then kill it somewhere inside the next one.
        done, buf = rng.choice([0, 1, 2]), b""
        while buf.count(b"\n") < done and select.select([read_fd], [], [], 30)[0]:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            buf += chunk
        time.sleep(rng.uniform(0.0, 0.02))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        with os.fdopen(read_fd, "rb") as f:
            reported |= set((buf + f.read()).decode().split())
        report = store.check(verify=False)
        assert not report.missing_blobs and not report.corrupt_blobs, report
        entries = {e.name: e for e in store.list()}
        assert reported <= set(entries), "an add that returned was lost"
        for name, e in entries.items():
            assert set(e.tags) == {name, "all"}, f"entry {name} visible with partial tags {e.tags}"
    report = store.check(repair=True)
    assert not report.missing_blobs and not report.corrupt_blobs and report.dropped_entries == []
    final = store.check()
    assert final.ok and final.entries >= len(reported) > 0
    for e in store.list():
        round_, i = int(e.name[1:].split("-")[0]), int(e.name.split("-")[1])
        assert store.get(e.name).equal(_expected(states, round_, i))


def test_get_with_model_checks_the_fingerprint(store):
    import copy

    from statelab.errors import StateMismatchError
    from statelab.models.mamba1 import Mamba1Config, Mamba1LM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Mamba1LM(Mamba1Config(d_model=16, n_layer=3, vocab_size=29, d_state=4)).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        _, state = model(ids[:, :5])
        store.add(state, name="prefix", prompt="3 1 4 1 5")
        want, _ = model(ids[:, 5:], state=state)
        got, _ = model(ids[:, 5:], state=store.get("prefix", model))
    assert torch.equal(got, want)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[1] += 1e-4
    with pytest.raises(StateMismatchError, match=f"{model.fingerprint}.*{other.fingerprint}"):
        store.get("prefix", other)


# ---- many entries in one transaction -------------------------------------------------------------------------
def test_add_many_adds_every_item_in_order_like_add(tmp_path, store):
    from statelab.state.store import NewEntry

    items = [
        {"name": "a", "state": make_state(1), "task": "t1", "tags": ["x", "y", "x"], "prompt": "pa", "shots": 2},
        NewEntry("b", make_state(2), task="t2", description="d"),
        {"name": "c", "state": make_state(1), "prompt": "pa"},  # the same state and prompt as "a": one blob
        NewEntry("d", make_state(3), tags=("z",)),
    ]
    store.add(make_state(9), name="before")
    entries = store.add_many(items)
    assert [e.name for e in entries] == ["a", "b", "c", "d"] and len(store) == 5
    assert entries == [store.entry(n) for n in "abcd"] and [e.id for e in entries] == sorted(e.id for e in entries)
    one_by_one = StateStore(tmp_path / "single")
    for item in items:
        kw = item if isinstance(item, dict) else item.__dict__
        fields = {k: v for k, v in kw.items() if k not in ("name", "state")}
        want = one_by_one.add(kw["state"], name=kw["name"], **fields).to_dict()
        got = store.entry(kw["name"]).to_dict()
        for key in ("id", "created"):
            want.pop(key), got.pop(key)
        assert got == want, kw["name"]
        assert store.get(kw["name"]).equal(kw["state"])
    assert store.entry("a").blob == store.entry("c").blob and len(blob_files(store)) == 4
    assert store.check().ok
    assert store.add_many([]) == []


def _bad_batches():
    nan = make_state(5)
    nan = nan.replace(ssm=nan.ssm.clone().fill_(float("nan")))
    ok = [{"name": f"new{i}", "state": make_state(10 + i)} for i in range(3)]
    return [
        ("inside", ok + [{"name": "new1", "state": make_state(20)}], r"item 3 \('new1'\): item 1 has the same name"),
        ("store", ok + [{"name": "a", "state": make_state(20)}], r"item 3 \('a'\): store .* already has an entry"),
        ("nan", ok + [{"name": "n", "state": nan}], r"item 3 \('n'\): cannot add 'n': .*NaN/inf"),
        ("tag", ok + [{"name": "t", "state": make_state(20), "tags": ["ok", ""]}], r"item 3 \('t'\): tags must be"),
        ("tags-str", ok + [{"name": "t", "state": make_state(20), "tags": "x"}], r"item 3 .*tags must be a list"),
        ("batch", [*ok, {"name": "b2", "state": State.cat([make_state(1), make_state(2)])}], r"item 3 .*batch size 2"),
        ("not-state", [*ok, {"name": "z", "state": torch.zeros(3)}], r"item 3 \('z'\): state must be a statelab.State"),
        ("key", [*ok, {"name": "k", "state": make_state(1), "label": "x"}], r"item 3 .*unknown key\(s\) \['label'\]"),
        ("missing", [*ok, {"name": "m"}], r"item 3 \('m'\): missing state"),
        ("task-type", [*ok, {"name": "t", "state": make_state(1), "task": 3}], r"item 3 .*task must be a string"),
        ("shots", [*ok, {"name": "s", "state": make_state(1), "shots": -1}], r"item 3 \('s'\): shots must be"),
        ("empty-name", [*ok, {"name": " ", "state": make_state(1)}], r"item 3 \(' '\): .*non-empty name"),
        ("not-item", [*ok, ("x", make_state(1))], r"item 3: expected a NewEntry or a dict, got tuple"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _bad_batches(), ids=lambda c: c[0])
def test_add_many_bad_item_adds_nothing_and_leaves_no_blob(store, case):
    _, items, message = case
    store.add(make_state(1), name="a", tags=["x"])
    before = snapshot(store)
    with pytest.raises(StoreError, match=message):
        store.add_many(items)
    assert snapshot(store) == before, "nothing of the batch is added, no blob left behind"
    assert store.check().ok
    with pytest.raises(StoreError, match="takes a list of items"):
        store.add_many({"name": "x", "state": make_state(1)})


def test_add_many_failure_inside_the_transaction_rolls_back_every_row(store):
    """Rows already inserted when a later insert fails are rolled back with it, and their blobs collected."""
    store.add(make_state(1), name="a")
    db = sqlite3.connect(store.path / "store.db")
    db.execute(
        "CREATE TRIGGER refuse_c BEFORE INSERT ON entries WHEN NEW.name = 'c' BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    db.close()
    before = snapshot(store)
    items = [{"name": n, "state": make_state(30 + i), "tags": [n]} for i, n in enumerate("bcd")]
    with pytest.raises(StoreError, match="refused"):  # the database's error, as a one-line StoreError
        store.add_many(items)
    assert snapshot(store) == before and store.check().ok


def _batch_writer(path, prefix, fd):
    store = StateStore(path)
    for r in range(10_000):
        batch = [
            {"name": f"{prefix}{r}-{i}", "state": make_state(i, L=2, D=4, n=r), "tags": ["all"]} for i in range(12)
        ]
        store.add_many(batch)
        os.write(fd, f"{prefix}{r}\n".encode())
    os._exit(0)


def test_sigkilled_add_many_is_all_or_nothing(tmp_path):
    """A writer adding batches of 12, SIGKILLed at random moments: every batch is visible whole or not at all."""
    path = tmp_path / "s"
    store = StateStore(path)
    rng = random.Random(1)
    ctx = multiprocessing.get_context("fork")
    reported: set[str] = set()
    for round_ in range(25):
        read_fd, write_fd = os.pipe()
        proc = ctx.Process(target=_batch_writer, args=(path, f"r{round_}.", write_fd))
        proc.start()
        os.close(write_fd)
        # let the writer finish 0-1 batches, then kill it somewhere inside the next one
        done, buf = rng.choice([0, 1]), b""
        while buf.count(b"\n") < done and select.select([read_fd], [], [], 30)[0]:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            buf += chunk
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        with os.fdopen(read_fd, "rb") as f:
            reported |= set((buf + f.read()).decode().split())
        counts: dict[str, int] = {}
        for e in store.list():
            batch = e.name.split("-")[0]
            counts[batch] = counts.get(batch, 0) + 1
        assert all(c == 12 for c in counts.values()), f"round {round_}: a partial batch is visible: {counts}"
        assert reported <= set(counts), "a batch that returned was lost"
    report = store.check(repair=True)
    assert not report.missing_blobs and not report.corrupt_blobs and report.dropped_entries == []
    assert store.check().ok and len(store) >= 12 * len(reported) > 0


def test_search_hits_carry_the_stored_prompt(tmp_path):
    for index in ("exact", "sketch"):
        store = StateStore(tmp_path / index, index=index)
        store.add_many([{"name": f"e{i}", "state": make_state(i), "prompt": f"prompt {i}\n" if i else None}
                        for i in range(4)])  # fmt: skip
        hits = store.search(make_state(2), k=4)
        assert hits[0].name == "e2" and hits[0].prompt == "prompt 2\n", index
        assert {h.name: h.prompt for h in hits} == {
            "e0": None,
            "e1": "prompt 1\n",
            "e2": "prompt 2\n",
            "e3": "prompt 3\n",
        }
        assert hits[0].to_dict()["prompt"] == "prompt 2\n"


# ---- hardening: multi-name removal, names that read as ids, stores that must not be created ----------------------
def test_remove_many_is_all_or_nothing(store):
    """`statelab store rm a2 nope` used to delete a2 and then fail on nope without saying a2 was gone."""
    for i, n in enumerate(["a1", "a2", "a3"]):
        store.add(make_state(i), name=n, tags=["x"])
    before = snapshot(store)
    with pytest.raises(StoreError, match="no entry named 'nope'.*nothing was removed"):
        store.remove_many(["a2", "nope"])
    assert snapshot(store) == before
    a1 = store.entry("a1")
    removed = store.remove_many(["a3", a1.id, "a3"])  # by name and by id; an entry named twice goes once
    assert [e.name for e in removed] == ["a3", "a1"] and [e.name for e in store.list()] == ["a2"]
    assert len(blob_files(store)) == 1 and store.check().ok
    with pytest.raises(StoreError, match="at least one"):
        store.remove_many([])
    with pytest.raises(StoreError, match="list of names"):
        store.remove_many("a2")


def test_a_name_of_digits_is_refused_and_an_old_one_is_ambiguous(store):
    """An entry named '1' used to shadow id 1 in show/get/rm."""
    first = store.add(make_state(1), name="first")
    for bad in ("1", "42", "007"):
        with pytest.raises(StoreError, match="only digits"):
            store.add(make_state(2), name=bad)
        with pytest.raises(StoreError, match="only digits"):
            store.add_many([{"name": bad, "state": make_state(2)}])
    store.add(make_state(2), name="second")
    assert store.entry(str(first.id)).name == "first" and store.entry("second").name == "second"
    # a store written before the rule: entry 2 is named "1", so "1" is a name and another entry's id
    db = sqlite3.connect(store.path / "store.db")
    db.execute("UPDATE entries SET name = ? WHERE name = 'second'", (str(first.id),))
    db.commit()
    db.close()
    for call in (store.entry, store.get, store.remove):
        with pytest.raises(StoreError, match="ambiguous.*rename the entry"):
            call(str(first.id))
    assert store.entry(first.id).name == "first"  # an int is always an id
    assert len(store) == 2


def test_a_missing_store_is_not_created_when_create_is_false(tmp_path):
    """A mistyped path on a read command used to create an empty store silently."""
    for path, why in ((tmp_path / "skilz", "does not exist"), (tmp_path, "is not a state store")):
        with pytest.raises(StoreError, match=f"no state store at .*{why}.*statelab store init"):
            StateStore(path, create=False)
    assert not (tmp_path / "skilz").exists() and not (tmp_path / "store.db").exists()
    StateStore(tmp_path / "real").add(make_state(1), name="a")
    assert StateStore(tmp_path / "real", create=False).entry("a").name == "a"


def test_import_of_a_malformed_archive_is_a_store_error(tmp_path, store):
    """Archives whose manifest has the wrong types, or a truncated tar: one StoreError each, nothing added."""
    src = StateStore(tmp_path / "src")
    src.add(make_state(1), name="a", tags=["x"], prompt="p")
    good = tmp_path / "good.tar"
    src.export(good)
    with tarfile.open(good) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(members["manifest.json"])

    def archive(name, manifest_value, extra=None, raw=None):
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w") as tar:
            data = raw if raw is not None else json.dumps(manifest_value).encode()
            blobs = [(k, v) for k, v in members.items() if k != "manifest.json"]
            for member, payload in [("manifest.json", data), *blobs, *(extra or [])]:
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        return path

    entry = manifest["entries"][0]
    cases = {
        "tags-int": (archive("t1", {**manifest, "entries": [{**entry, "tags": 3}]}), "tags must be a list"),
        "prompt-dict": (archive("t2", {**manifest, "entries": [{**entry, "prompt": {"a": 1}}]}), "prompt must be"),
        "entries-dict": (archive("t3", {**manifest, "entries": {"a": entry}}), "'entries' must be a list"),
        "manifest-list": (archive("t4", [manifest]), "must be a JSON object"),
        "entry-int": (archive("t5", {**manifest, "entries": [7]}), "entry 0 must be a JSON object"),
        "name-int": (archive("t6", {**manifest, "entries": [{**entry, "name": 5}]}), "non-empty name"),
        "shots-str": (archive("t7", {**manifest, "entries": [{**entry, "shots": "4"}]}), "shots must be"),
        "created-int": (archive("t8", {**manifest, "entries": [{**entry, "created": 5}]}), "'created' must be"),
        "blob-list": (archive("t9", {**manifest, "entries": [{**entry, "blob": [1]}]}), "refers to a blob"),
        "not-utf8": (archive("t10", None, raw=b"\xff\xfe{"), "manifest.json is not JSON"),
        "deep-json": (archive("t11", None, raw=b"[" * 100_000), "manifest.json is not JSON"),
        "twice": (archive("t12", manifest, extra=[("manifest.json", b"{}")]), "appears twice"),
        "truncated": (None, "truncated or not a tar archive"),
        "directory": (tmp_path, "is a directory"),
    }
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(good.read_bytes()[:700])
    cases["truncated"] = (truncated, cases["truncated"][1])
    store.add(make_state(9), name="mine")
    before = snapshot(store)
    for label, (path, message) in cases.items():
        with pytest.raises(StoreError, match=message):
            store.import_(path)
        assert snapshot(store) == before, label
    assert [e.name for e in store.import_(good)] == ["a"]
