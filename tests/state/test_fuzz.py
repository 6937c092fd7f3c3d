"""Property-based fuzzing of the two readers of untrusted bytes: the state-file reader and the archive importer.

Every case must end in a statelab error (a ``StatelabError`` with a one-line message), with nothing on disk changed,
or, for the few mutations that do not change what the bytes mean (a flipped bit in a header's padding, an archive cut
in the zero padding after its last member, a manifest that is valid after all), in the right result: the original
state, or a complete import whose states verify (undone before the next case). No other exception. The counts
(``max_examples``, derandomized: the same cases on every run) are 1,100 for the reader and 1,000 for the importer.
"""

import hashlib
import io
import json
import sqlite3
import tarfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statelab.errors import StatelabError
from statelab.state import io as state_io
from statelab.state.core import State
from statelab.state.io import decode_state, encode_state, load_state, read_metadata
from statelab.state.store import ARCHIVE_FORMAT, ARCHIVE_VERSION, StateStore

FP = "ab" * 32
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Cases per property; the sums are what the module doc promises (>= 1,000 for each reader).
READER_CASES = {"truncate": 200, "flip": 300, "header": 250, "crafted": 250, "random": 100}
IMPORT_CASES = {"truncate": 200, "flip": 250, "manifest": 350, "members": 200}


def tiny_state(seed=0, arch="mamba1", n=5):
    g = torch.Generator().manual_seed(seed)
    if arch == "mamba1":
        parts = (torch.randn(2, 1, 4, 2, generator=g), torch.randn(2, 1, 4, 3, generator=g), torch.rand(2, 1, 4))
    else:
        parts = (torch.randn(2, 1, 2, 2, 2, generator=g), torch.randn(2, 1, 8, 3, generator=g), torch.rand(2, 1, 2))
    return State(arch=arch, ssm=parts[0], conv=parts[1], sum_delta=parts[2], n_tokens=n, fingerprint=FP)


GOOD_STATE = tiny_state()
GOOD, GOOD_META = encode_state(GOOD_STATE, prompt="Q: a\nA: b\n")


def read_all_ways(data: bytes, path) -> State | None:
    """decode_state, load_state and read_metadata on ``data``: the state, or None after a clean statelab error.

    Fails the test on any other exception, on an error without a message, or on a file changed by reading it.
    """
    path.write_bytes(data)
    results = []
    for fn in (lambda: decode_state(data, "fuzz")[0], lambda: load_state(path), lambda: read_metadata(path)):
        try:
            results.append(fn())
        except StatelabError as e:
            assert str(e).strip(), f"{type(e).__name__} without a message"
            assert "\n" not in str(e).strip()
            results.append(None)
    assert path.read_bytes() == data
    state = results[0]
    assert (results[1] is None) == (state is None)
    if state is not None:
        assert results[1].equal(state)
    return state


def accept(state: State | None) -> None:
    """A read that succeeded must have produced exactly the original state."""
    if state is not None:
        assert state.equal(GOOD_STATE)


@settings(max_examples=READER_CASES["truncate"], **SETTINGS)
@given(cut=st.integers(0, len(GOOD) - 1))
def test_reader_truncated(tmp_path, cut):
    assert read_all_ways(GOOD[:cut], tmp_path / "s.safetensors") is None


@settings(max_examples=READER_CASES["flip"], **SETTINGS)
@given(flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 7)), min_size=1, max_size=6))
def test_reader_bit_flips(tmp_path, flips):
    data = bytearray(GOOD)
    for pos, bit in flips:
        data[pos] ^= 1 << bit
    accept(read_all_ways(bytes(data), tmp_path / "s.safetensors"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
tensor_entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F64", "XX"]),
     "shape": st.lists(st.integers(-1, 6), max_size=5),
     "data_offsets": st.lists(st.integers(-10, 400), min_size=0, max_size=3)}
)  # fmt: skip


@settings(max_examples=READER_CASES["header"], **SETTINGS)
@given(
    meta=st.dictionaries(st.sampled_from([*state_io._REQUIRED, "prompt", "x"]), json_values | st.text(max_size=20)),
    entries=st.dictionaries(st.sampled_from(["ssm", "conv", "sum_delta", "other"]), tensor_entry | json_values),
    body=st.binary(max_size=300),
    fix_len=st.booleans(),
)
def test_reader_random_headers(tmp_path, meta, entries, body, fix_len):
    header = {"__metadata__": {"format": "statelab.state", "format_version": "1", **meta}, **entries}
    head = json.dumps(header).encode()
    n = len(head) if fix_len else len(head) + 7
    data = n.to_bytes(8, "little") + head + body
    assert read_all_ways(data, tmp_path / "s.safetensors") is None


@settings(max_examples=READER_CASES["crafted"], **SETTINGS)
@given(
    changes=st.dictionaries(
        st.sampled_from(
            [
                "arch",
                "dtype",
                "layout",
                "num_layers",
                "batch_size",
                "n_tokens",
                "conv_width",
                "format_version",
                "fingerprint",
            ]
        ),
        st.sampled_from(
            [
                "",
                "0",
                "1",
                "2",
                "-1",
                "3",
                "[1]",
                "[1, 2]",
                "[-1]",
                "[[[[",
                "{}",
                '{"ssm": 3}',
                '{"ssm": [4, 2], "conv": [4, 3], "sum_delta": [4]}',
                '{"ssm": "ab"}',
                "mamba2",
                "float16",
                "int64",
                "nan",
                "1e400",
                "9" * 30,
            ]
        ),
        min_size=1,
    ),
    tensor=st.sampled_from([None, "ssm", "conv", "sum_delta"]),
    value=st.sampled_from([float("nan"), float("inf"), 0.0]),
)
def test_reader_crafted_with_valid_checksums(tmp_path, changes, tensor, value):
    """Metadata and values changed with the checksum recomputed, so the later checks are reached."""
    meta = {**GOOD_META, **changes}
    tensors = {k: getattr(GOOD_STATE, k).clone() for k in state_io.PARTS}
    if tensor is not None:
        tensors[tensor].view(-1)[0] = value
    meta["checksum"] = state_io._checksum(meta, tensors)
    data = state_io._serialize(tensors, meta)
    state = read_all_ways(data, tmp_path / "s.safetensors")
    if state is not None:  # only harmless changes may pass
        assert state.equal(GOOD_STATE.replace(fingerprint=meta["fingerprint"])) or (
            tensor is not None and value == 0.0 and state.layout == GOOD_STATE.layout
        )


@settings(max_examples=READER_CASES["random"], **SETTINGS)
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\x80\x04", b"PK\x03\x04", b"{", b"\x10\0\0\0"]))
def test_reader_random_bytes(tmp_path, data, prefix):
    assert read_all_ways(prefix + data, tmp_path / "s.safetensors") is None


# ---- the archive importer -------------------------------------------------------------------------------------------
def _tar(members) -> bytes:
    """A tar of ``(name, payload, type)`` members (type: a tarfile member type; payload bytes or a link target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = payload.decode(errors="replace")
                tar.addfile(info)
            elif kind == tarfile.REGTYPE:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    return buf.getvalue()


class Importer(tuple):
    """(store, members of a good archive, its bytes, a scratch directory, where its last member's data ends)."""

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case: keep the bytes out of it
        return f"Importer({self[0]!r})"


@pytest.fixture(scope="module")
def importer(tmp_path_factory):
    """A store with one entry, and a good archive of two other entries."""
    d = tmp_path_factory.mktemp("importer")
    store = StateStore(d / "store")
    store.add(tiny_state(1), name="mine", tags=["x"])
    src = StateStore(d / "src")
    src.add(tiny_state(2), name="a", task="t", tags=["x", "y"], prompt="Q: a\nA: b\n", shots=1)
    src.add(tiny_state(3, arch="mamba2"), name="b")
    src.export(d / "good.tar")
    with tarfile.open(d / "good.tar") as tar:
        infos = tar.getmembers()
        members = {m.name: tar.extractfile(m).read() for m in infos}
    end = max(m.offset_data + m.size for m in infos)
    return Importer((store, members, (d / "good.tar").read_bytes(), d, end))


def store_snapshot(store: StateStore):
    """Rows, tags and every file but the database's own (whose bytes SQLite may rewrite without changing a row)."""
    db = sqlite3.connect(store.path / "store.db")
    try:
        rows = db.execute("SELECT id, name, task, prompt, blob FROM entries ORDER BY id").fetchall()
        tags = db.execute("SELECT entry_id, tag FROM tags ORDER BY entry_id, tag").fetchall()
    finally:
        db.close()
    files = {
        str(p.relative_to(store.path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in store.path.rglob("*")
        if p.is_file() and not p.name.startswith("store.db")
    }
    return rows, tags, files


def try_import(importer, data: bytes, name: str) -> list | None:
    """Import ``data``; None after a clean StatelabError with the store unchanged. A successful import is checked
    (every entry's state verified against its blob) and undone, so the next case starts from the same store."""
    store, _, _, d, _ = importer
    path = d / name
    path.write_bytes(data)
    before = store_snapshot(store)
    try:
        added = store.import_(path)
    except StatelabError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), repr(e)
        assert store_snapshot(store) == before
        return None
    for e in added:
        assert store.get(e.name).fingerprint == FP
    if added:
        store.remove_many([e.name for e in added])
    rows, tags, files = store_snapshot(store)
    assert (rows, tags) == before[:2] and files == before[2]
    return added


@settings(max_examples=IMPORT_CASES["truncate"], **SETTINGS)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_importer_truncated_archives(importer, cut):
    """Cut anywhere before the last member's data ends: a clean error. Cut in the zero padding after it, the tar
    may still hold every member whole (tar needs no end marker): then the import must be complete and right."""
    good, end = importer[2], importer[4]
    n = int(cut * min(len(good), end + 1536))  # the zero padding beyond is all alike
    added = try_import(importer, good[:n], "cut.tar")
    if n < end or added is not None:
        assert (added is None) if n < end else [e.name for e in added] == ["a", "b"]


@settings(max_examples=IMPORT_CASES["flip"], **SETTINGS)
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8))
def test_importer_bit_flips(importer, flips):
    data = bytearray(importer[2])
    for where, bit in flips:  # within the headers and members: a flip in the zero padding after them is harmless
        data[int(where * importer[4])] ^= 1 << bit
    try_import(importer, bytes(data), "flip.tar")


entry_values = {
    "name": st.text(max_size=8) | st.integers() | st.none() | st.sampled_from(["a", "b", "z1", "12", "mine", " "]),
    "task": st.none() | st.text(max_size=5) | st.integers() | st.lists(st.integers(), max_size=2),
    "tags": st.lists(st.text(max_size=4), max_size=3) | st.integers() | st.text(max_size=3) | st.none(),
    "prompt": st.none() | st.text(max_size=10) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    "description": st.none() | st.text(max_size=5) | st.booleans(),
    "shots": st.none() | st.integers(-3, 5) | st.text(max_size=2) | st.floats(allow_nan=True),
    "created": st.none() | st.text(max_size=12) | st.integers(),
    "blob": st.sampled_from(["good0", "good1", "", "0" * 64, None, 5]),
}


@settings(max_examples=IMPORT_CASES["manifest"], **SETTINGS)
@given(
    entries=st.lists(st.fixed_dictionaries({}, optional=entry_values), max_size=3)
    | json_values
    | st.dictionaries(st.text(max_size=3), json_values, max_size=2),
    top=st.sampled_from(["ok", "list", "format", "version", "string", "missing-entries"]),
)
def test_importer_random_manifests(importer, entries, top):
    _, members, _, _, _ = importer
    blobs = sorted(k for k in members if k != "manifest.json")
    if isinstance(entries, list):
        for e in entries:
            if isinstance(e, dict) and e.get("blob") in ("good0", "good1"):
                e["blob"] = blobs[int(e["blob"][-1])].removeprefix("blobs/").removesuffix(".safetensors")
    manifest = {"format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "entries": entries}
    manifest = {
        "ok": manifest, "list": [manifest], "format": {**manifest, "format": "zip"},
        "version": {**manifest, "version": 2}, "string": "statelab", "missing-entries": {"format": ARCHIVE_FORMAT},
    }[top]  # fmt: skip
    data = _tar([("manifest.json", json.dumps(manifest).encode(), tarfile.REGTYPE)]
                + [(b, members[b], tarfile.REGTYPE) for b in blobs])  # fmt: skip
    try_import(importer, data, "manifest.tar")


member_names = st.sampled_from(
    ["manifest.json", "blobs/" + "a" * 64 + ".safetensors", "../evil", "/etc/passwd", "blobs/x.safetensors",
     "blobs/", "store.db", "blobs/../../x", "good0", "good1"]
) | st.text(max_size=20)  # fmt: skip
member_types = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE])


@settings(max_examples=IMPORT_CASES["members"], **SETTINGS)
@given(
    extra=st.lists(st.tuples(member_names, st.binary(max_size=64), member_types), min_size=1, max_size=4),
    keep=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_importer_random_tar_members(importer, extra, keep):
    """Links, directories, paths outside blobs/, duplicated and missing members, random contents."""
    _, members, _, _, _ = importer
    names = sorted(members)
    real = [(n, members[n], tarfile.REGTYPE) for n, k in zip(names, keep, strict=True) if k]
    mapped = []
    for name, payload, kind in extra:
        if name in ("good0", "good1"):
            name = [n for n in names if n.startswith("blobs/")][int(name[-1])]
            payload = payload or members[name]
        mapped.append((name, payload, kind))
    assert try_import(importer, _tar(real + mapped), "members.tar") is None
