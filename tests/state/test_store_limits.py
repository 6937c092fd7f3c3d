"""The state store at the limits of its machine: a store this process cannot write, and a full disk.

Each scenario runs in a forked child under the real limit (see ``tests/_isolation.py``): another user or ``chmod``
(not writable), a read-only bind mount (EROFS, even for root), a 1 MiB tmpfs filled to the last page (ENOSPC), a
file-size limit (EFBIG). What must hold: reads work, every write fails with one line naming the cause, and the
store is unchanged (no orphan blob, no temporary file, no entry half-added).
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from tests._isolation import (
    can_mount,
    file_size_limit,
    fill_disk,
    in_child,
    private_mounts,
    read_only_bind,
    read_only_view,
    tmpfs,
)
from typer.testing import CliRunner

from statelab.cli import app
from statelab.errors import StoreError
from statelab.state.core import State
from statelab.state.io import save_state
from statelab.state.store import StateStore

FP = "ab" * 32
runner = CliRunner()


def make_state(seed, D=8):
    g = torch.Generator().manual_seed(seed)
    return State(
        arch="mamba1", ssm=torch.randn(6, 1, D, 4, generator=g), conv=torch.randn(6, 1, D, 3, generator=g),
        sum_delta=torch.rand(6, 1, D, generator=g), n_tokens=7, fingerprint=FP,
    )  # fmt: skip


def cli(*args):
    """``statelab ARGS`` in this process: (exit code, stdout + stderr lines, whether a traceback escaped)."""
    r = runner.invoke(app, [str(a) for a in args])
    escaped = r.exception is not None and not isinstance(r.exception, SystemExit)
    return r.exit_code, r.output.strip().splitlines(), escaped


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with the SHA-256 of its bytes."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def blobs_and_rows(store: StateStore) -> tuple[list[str], list[str], list[str]]:
    """(blob files, blobs the rows name, temporary files): a store without orphans has the first two equal."""
    files = sorted(p.stem for p in (store.path / "blobs").glob("*/*.safetensors"))
    temps = sorted(p.name for p in (store.path / "blobs").glob("*/.tmp-*"))
    return files, sorted({e.blob for e in store.list()}), temps


@pytest.fixture
def shared_dir():
    """A directory every user can read (tmp_path is private to root) and remove afterwards."""
    d = Path(tempfile.mkdtemp(prefix="statelab-limits-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---- a store that cannot be written ------------------------------------------------------------------------------
def _read_only_checks(store_dir: Path, files: Path) -> dict:
    """Everything a user of a read-only store does; returns what happened (run in the child)."""
    out: dict = {}
    st = StateStore(store_dir)
    out["names"] = [e.name for e in st.list()]
    out["get"] = st.get("b").equal(make_state(2))
    out["search"] = [h.name for h in st.search(make_state(3), k=2)]
    out["search_faiss"] = StateStore(store_dir, index="faiss").search(make_state(3), k=1)[0].name
    out["check_ok"] = st.check().ok
    out["read_only"] = st.read_only
    st.export(files / "out" / "copy.tar")
    out["exported"] = (files / "out" / "copy.tar").stat().st_size > 0
    writes = {
        "add": lambda: st.add(make_state(9), name="z"),
        "add_many": lambda: st.add_many([{"name": "z", "state": make_state(9)}]),
        "remove": lambda: st.remove("a"),
        "remove_many": lambda: st.remove_many(["a", "b"]),
        "import": lambda: st.import_(files / "other.tar"),
        "repair": lambda: st.check(repair=True),
    }
    out["writes"] = {}
    for name, call in writes.items():
        try:
            call()
            out["writes"][name] = "no error"
        except StoreError as e:
            out["writes"][name] = str(e)
    q, s = files / "q.safetensors", store_dir
    out["cli_ok"] = {
        "list": cli("store", "list", "-s", s, "--json"),
        "show": cli("store", "show", "a", "-s", s),
        "get": cli("store", "get", "a", files / "out" / "a.safetensors", "-s", s),
        "search": cli("search", q, "-s", s, "--json"),
        "check": cli("store", "check", "-s", s),
    }
    out["cli_refused"] = {
        "add": cli("store", "add", q, "-n", "z", "-s", s),
        "rm": cli("store", "rm", "a", "-s", s),
        "import": cli("store", "import", files / "other.tar", "-s", s),
        "repair": cli("store", "check", "--repair", "-s", s),
        "ingest": cli("store", "ingest", files / "prompts.jsonl", "-s", s, "--model", "embedded"),
    }
    return out


def _warm_up(files: Path) -> None:
    """Import, as the current user, what the checks import lazily: the other user may not be able to read the
    interpreter's own files (here under /root), which a real other user's Python would not have to."""
    import faiss  # noqa: F401
    import rich.console  # noqa: F401
    import rich.table  # noqa: F401

    cli("store", "list", "-s", files / "no-store")
    cli("search", files / "q.safetensors", "-s", files / "no-store")


@pytest.mark.parametrize("how", ["not writable", "read-only mount"])
@pytest.mark.parametrize("held_open", [False, True], ids=["closed", "owner-has-it-open"])
def test_a_read_only_store_reads_and_refuses_writes_in_one_line(shared_dir, how, held_open):
    """The trial: on a read-only mount or as another user, every command (list and get too) failed with a
    traceback. With the owner holding a connection (lock files present) a read takes the read-only path;
    without, the unlocked snapshot path."""
    if how == "read-only mount" and not can_mount():
        pytest.skip("this machine does not allow private mounts (needs root with CAP_SYS_ADMIN)")
    store_dir, files = shared_dir / "store", shared_dir / "files"
    (files / "out").mkdir(parents=True)
    for p in (files, files / "out"):
        p.chmod(0o777)
    st = StateStore(store_dir)
    for i, n in enumerate(["a", "b", "c"], 1):
        st.add(make_state(i), name=n, task="t")
    StateStore(store_dir, index="faiss").search(make_state(3), k=1)  # a recorded index cache exists too
    save_state(make_state(3), files / "q.safetensors")
    (files / "prompts.jsonl").write_text('{"name": "p1", "prompt": "Q: cat\\nA: CAT\\n"}\n')
    other = StateStore(shared_dir / "other")
    other.add(make_state(8), name="x")
    other.export(files / "other.tar")
    for p in files.iterdir():
        p.chmod(0o777 if p.is_dir() else 0o644)
    before = tree(store_dir)

    owner = None
    if held_open:  # the owner's open connection keeps store.db-wal and store.db-shm in place
        import sqlite3

        owner = sqlite3.connect(store_dir / "store.db")
        owner.execute("SELECT COUNT(*) FROM entries").fetchone()
        assert (store_dir / "store.db-shm").exists()

    def run():
        if how == "read-only mount":
            return _read_only_checks(store_dir, files)
        _warm_up(files)
        with read_only_view(store_dir):
            return _read_only_checks(store_dir, files)

    setup = None
    if how == "read-only mount":

        def setup():
            private_mounts()
            read_only_bind(store_dir)

    try:
        out = in_child(run, setup=setup)
    finally:
        if owner is not None:
            owner.close()
    assert out["names"] == ["a", "b", "c"] and out["get"] and out["search"][0] == "c"
    assert out["search_faiss"] == "c" and out["check_ok"] and out["exported"] and out["read_only"]
    for name, message in out["writes"].items():
        assert "is read-only" in message and "nothing was changed" in message, (name, message)
    cause = "mounted read-only" if how == "read-only mount" else "not writable"
    assert all(cause in m for m in out["writes"].values()), out["writes"]
    for name, (code, lines, escaped) in out["cli_ok"].items():
        assert code == 0 and not escaped, (name, lines)
    assert [e["name"] for e in json.loads("\n".join(out["cli_ok"]["list"][1]))] == ["a", "b", "c"]
    assert json.loads("\n".join(out["cli_ok"]["search"][1]))[0]["name"] == "c"
    for name, (code, lines, escaped) in out["cli_refused"].items():
        assert code == 1 and not escaped and len(lines) == 1, (name, lines)
        assert lines[0].startswith("error: store") and "is read-only" in lines[0], (name, lines)
    assert tree(store_dir) == before  # not a byte changed, no lock file created (the owner's went with it)


# ---- a full disk ------------------------------------------------------------------------------------------------
def _full_disk_checks(d: Path, limit: str) -> dict:
    """Run in the child: make a store on ``d``, then try everything with no space left."""
    out: dict = {}
    st = StateStore(d / "s")
    st.add(make_state(1, D=64), name="a", task="t")
    st.add(make_state(2, D=64), name="b", task="t")
    if limit == "file-size limit":
        file_size_limit(16 * 1024)  # store.db-shm needs 32 KiB, a blob ~30 KiB
        fd = size = None
    else:
        fd, size = fill_disk(d)

    out["names"] = [e.name for e in st.list()]
    out["get"] = st.get("a").equal(make_state(1, D=64))
    out["search"] = st.search(make_state(2, D=64), k=1)[0].name
    out["check_ok"] = st.check().ok
    out["cli_list"] = cli("store", "list", "-s", d / "s", "--json")
    out["cli_add"] = cli("store", "get", "a", d / "x.safetensors", "-s", d / "s")

    # free 0, 1, 2, ... pages: the add fails at the connection, at the blob or at the commit, or succeeds;
    # whatever happens, no orphan blob and no temporary file is left
    outcomes = []
    for k in range(0, 40 if fd is not None else 1):
        if fd is not None:
            os.ftruncate(fd, size - 4096 * k)
        for batch in (False, True):
            name = f"n{k}-{int(batch)}"
            try:
                if batch:
                    st.add_many([{"name": name, "state": make_state(100 + k, D=64)},
                                 {"name": name + "x", "state": make_state(200 + k, D=64)}])  # fmt: skip
                else:
                    st.add(make_state(100 + k, D=64), name=name)
                outcome = "added"
            except StoreError as e:
                outcome = str(e)
            files, named, temps = blobs_and_rows(st)
            outcomes.append((k, batch, outcome, files == named and not temps))
            if outcome == "added":  # undo, with the space the add used
                if fd is not None:
                    os.ftruncate(fd, 0)
                st.remove_many([name, name + "x"] if batch else [name])
    out["outcomes"] = outcomes
    if fd is not None:
        os.ftruncate(fd, size)  # full again
        try:
            st.remove("a")
            out["remove"] = "removed"
        except StoreError as e:
            out["remove"] = str(e)
    out["final"] = [e.name for e in st.list()]
    return out


@pytest.mark.parametrize("limit", ["tmpfs", "file-size limit"])
def test_a_full_disk_fails_writes_in_one_line_leaves_no_blob_and_reads_work(shared_dir, limit):
    """The trial: a full disk made every command, reads included, fail with a raw 'disk I/O error', and a failed
    add left an orphan blob."""
    if limit == "tmpfs" and not can_mount():
        pytest.skip("this machine does not allow private mounts (needs root with CAP_SYS_ADMIN)")
    d = shared_dir / "disk"
    d.mkdir()

    def setup():
        if limit == "tmpfs":
            private_mounts()
            tmpfs(d, "1m")

    out = in_child(lambda: _full_disk_checks(d, limit), setup=setup)
    assert out["names"] == ["a", "b"] and out["get"] and out["search"] == "b" and out["check_ok"]
    code, lines, escaped = out["cli_list"]
    assert code == 0 and not escaped and [e["name"] for e in json.loads("\n".join(lines))] == ["a", "b"]
    for k, batch, outcome, clean in out["outcomes"]:
        assert clean, (k, batch, outcome)
        if outcome != "added":
            assert "\n" not in outcome and "nothing was" in outcome, outcome
            assert any(s in outcome for s in ("no space left", "disk full", "file-size limit")), outcome
    failures = [o for _, _, o, _ in out["outcomes"] if o != "added"]
    assert failures
    if limit == "tmpfs":
        # the window that used to leave an orphan: the blob fitted, the commit did not
        kinds = ["blob" if "could not write" in o else "db" for o in failures]
        assert "blob" in kinds and "db" in kinds[kinds.index("blob") :], kinds
        assert any(o == "added" for _, _, o, _ in out["outcomes"])
        assert out["remove"] == "removed" or "no space left" in out["remove"]
    assert set(out["final"]) <= {"a", "b"}
