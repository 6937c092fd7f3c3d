"""docs/errors.md is true: every bad input it lists gives, through the API, the error class and message it names,
and through the ``statelab`` command line, the exit code and message it names on one line of stderr, never a
traceback.

The command lines run in one real process (``tests/_cli_driver.py``: the installed console-script entry point,
fds 1 and 2 captured per case), on a copy of the files the API cases use. Cases under a system limit (a read-only
store, a full disk) run in forked children under that real limit (``tests/_isolation.py``).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import statelab
from statelab.errors import StatelabWarning
from statelab.models.tokenizer import ByteTokenizer
from statelab.state import io as state_io
from statelab.state.io import encode_state, load_state, read_metadata, save_state
from statelab.state.mix import mix
from statelab.state.store import StateStore
from tests import _isolation as iso

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"


@dataclass(frozen=True)
class Case:
    """``api(world)`` makes the bad call; ``cli(world)`` gives the command line (None: no command expresses it);
    ``env(world)`` names a system limit both run under (see ``tests/_cli_driver.py``)."""

    api: Callable[[dict], object]
    cli: Callable[[dict], list[str]] | None = None
    env: Callable[[dict], list[str]] | None = None


def _ids(text: str) -> torch.Tensor:
    return torch.tensor([ByteTokenizer().encode(text)])


def _archive(w: dict, name: str, manifest: object = None, raw: bytes | None = None) -> Path:
    """A copy of the good archive with its manifest replaced."""
    path = w["dir"] / f"{name}.tar"
    with tarfile.open(w["archive"]) as src, tarfile.open(path, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "manifest.json":
                data = raw if raw is not None else json.dumps(manifest).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return path


def build_world(d: Path) -> dict:
    """Every file the cases need, under ``d``."""
    model = statelab.load_model("embedded")
    w: dict = {"dir": d, "model": model}
    s1, s2 = model.encode(_ids("Q: cat\nA: CAT\n")), model.encode(_ids("Q: dog\nA: DOG\n"))
    w["s1"], w["s2"] = s1, s2
    for name, s in (("s1", s1), ("s2", s2), ("q", model.encode(_ids("Q: cow\nA:")))):
        save_state(s, d / f"{name}.safetensors", prompt=name)
    save_state(s1.replace(fingerprint="0" * 64), d / "other-model.safetensors")
    (d / "pickle.safetensors").write_bytes(pickle.dumps({"ssm": [1.0, 2.0]}))
    torch.save({"ssm": torch.zeros(3)}, d / "torch-save.safetensors")
    (d / "text.safetensors").write_text("Q: cat\nA: CAT\n")
    good = (d / "s1.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    flipped[-5] ^= 0x10
    (d / "corrupt.safetensors").write_bytes(bytes(flipped))
    _, meta = encode_state(s1)
    tensors = {k: getattr(s1, k).clone() for k in state_io.PARTS}
    tensors["ssm"].view(-1)[0] = math.nan
    meta["checksum"] = state_io._checksum(meta, tensors)
    (d / "nan.safetensors").write_bytes(state_io._serialize(tensors, meta))
    (d / "random.bin").write_bytes(bytes(range(256)) * 8)

    st = StateStore(d / "store")
    st.add(s1, name="a1")
    st.add(s2, name="a2")
    st.export(d / "good.tar")
    w["archive"] = d / "good.tar"
    (d / "not-a-tar.tar").write_bytes(bytes(range(256)) * 20)
    (d / "cut.tar").write_bytes((d / "good.tar").read_bytes()[:1500])

    cached = StateStore(d / "cached", index="usearch")
    cached.add(s1, name="c1")
    cached.add(s2, name="c2")
    cached.search(s1, k=1)
    (cache,) = (d / "cached" / "index").glob("usearch-*.idx")
    data = bytearray(cache.read_bytes())
    for i in range(100, len(data), 97):
        data[i] ^= 0xFF
    cache.write_bytes(bytes(data))

    legacy = StateStore(d / "legacy")
    legacy.add(s1, name="first")
    legacy.add(s2, name="second")
    db = sqlite3.connect(d / "legacy" / "store.db")
    db.execute("UPDATE entries SET name = '1' WHERE name = 'second'")  # written before digit names were refused
    db.commit()
    db.close()

    StateStore(d / "ro").add(s1, name="r1")
    (d / "disk").mkdir()
    for p in [d, *d.rglob("*")]:  # readable by the other user of the read-only cases
        p.chmod(0o755 if p.is_dir() else 0o644)
    return w


def _warns(fn: Callable[[], object]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    ws = [x for x in caught if issubclass(x.category, StatelabWarning)]
    if ws:
        raise StatelabWarning(str(ws[0].message))


def _store_add(w: dict, store: str, name: str = "z", file: str = "s1.safetensors") -> list[str]:
    return ["store", "add", str(w["dir"] / file), "-n", name, "-s", str(w["dir"] / store)]


CASES: dict[str, Case] = {
    # ---- state files
    "state-file-pickle": Case(lambda w: load_state(w["dir"] / "pickle.safetensors"),
                              lambda w: _store_add(w, "store", file="pickle.safetensors")),
    "state-file-torch-save": Case(lambda w: load_state(w["dir"] / "torch-save.safetensors"),
                                  lambda w: _store_add(w, "store", file="torch-save.safetensors")),
    "state-file-text": Case(lambda w: load_state(w["dir"] / "text.safetensors"),
                            lambda w: _store_add(w, "store", file="text.safetensors")),
    "state-file-random": Case(lambda w: read_metadata(w["dir"] / "random.bin"),
                              lambda w: _store_add(w, "store", file="random.bin")),
    "state-file-truncated": Case(lambda w: load_state(w["dir"] / "truncated.safetensors"),
                                 lambda w: _store_add(w, "store", file="truncated.safetensors")),
    "state-file-corrupt": Case(lambda w: load_state(w["dir"] / "corrupt.safetensors"),
                               lambda w: _store_add(w, "store", file="corrupt.safetensors")),
    "state-file-nan": Case(lambda w: load_state(w["dir"] / "nan.safetensors"),
                           lambda w: _store_add(w, "store", file="nan.safetensors")),
    "state-file-missing": Case(lambda w: load_state(w["dir"] / "missing.safetensors"),
                               lambda w: _store_add(w, "store", file="missing.safetensors")),
    # ---- states and models
    "state-of-another-model": Case(
        lambda w: load_state(w["dir"] / "other-model.safetensors", w["model"]),
        lambda w: ["generate", "embedded", "-p", "Q: cow\nA:", "-n", "2", "--state",
                   str(w["dir"] / "other-model.safetensors")]),
    "state-of-another-dtype": Case(
        lambda w: statelab.load_model("embedded", dtype=torch.bfloat16).check_state(w["s1"])),
    "state-nan-in-memory": Case(
        lambda w: w["model"].generate(_ids("Q:"), 2, state=w["s1"].replace(ssm=w["s1"].ssm * math.nan))),
    "state-to-int": Case(lambda w: w["s1"].to(torch.int64)),
    "token-ids-outside-vocabulary": Case(lambda w: w["model"](torch.tensor([[5, 300, -1]]))),
    "generate-temperature-nan": Case(
        lambda w: w["model"].generate(_ids("Q:"), 2, temperature=math.nan),
        lambda w: ["generate", "embedded", "-p", "Q: cow", "--temperature", "nan"]),
    "mix-inf-state": Case(lambda w: mix([w["s1"], w["s2"].replace(conv=w["s2"].conv * math.inf)])),
    "mix-overflow": Case(
        lambda w: mix([w["s1"], w["s2"]], "weighted", [3e38, 3e38]),
        lambda w: ["mix", str(w["dir"] / "s1.safetensors"), str(w["dir"] / "s2.safetensors"), "--method",
                   "weighted", "--weights", "3e38,3e38", "-o", str(w["dir"] / "mixed.safetensors")]),
    # ---- the store
    "store-missing": Case(lambda w: StateStore(w["dir"] / "skilz", create=False),
                          lambda w: ["store", "list", "-s", str(w["dir"] / "skilz")]),
    "store-rm-a-missing-name": Case(
        lambda w: StateStore(w["dir"] / "store").remove_many(["a2", "nope"]),
        lambda w: ["store", "rm", "a2", "nope", "-s", str(w["dir"] / "store")]),
    "store-name-of-digits": Case(lambda w: StateStore(w["dir"] / "store").add(w["s1"], name="1"),
                                 lambda w: _store_add(w, "store", name="1")),
    "store-name-taken": Case(lambda w: StateStore(w["dir"] / "store").add(w["s1"], name="a1"),
                             lambda w: _store_add(w, "store", name="a1")),
    "store-ambiguous-name": Case(lambda w: StateStore(w["dir"] / "legacy").entry("1"),
                                 lambda w: ["store", "show", "1", "-s", str(w["dir"] / "legacy")]),
    "store-read-only": Case(lambda w: StateStore(w["dir"] / "ro").add(w["s2"], name="z"),
                            lambda w: _store_add(w, "ro", file="s2.safetensors"),
                            env=lambda w: ["read-only", str(w["dir"] / "ro")]),
    "store-disk-full": Case(
        lambda w: StateStore(w["dir"] / "disk" / "store").add(w["s2"], name="z"),
        lambda w: ["store", "add", str(w["dir"] / "s2.safetensors"), "-n", "z", "-s", str(w["dir"] / "disk" / "store")],
        env=lambda w: ["full-disk", str(w["dir"] / "disk"), str(w["dir"] / "s1.safetensors")]),
    "search-k-not-an-int": Case(
        lambda w: StateStore(w["dir"] / "store").search(w["s1"], k=2.5),
        lambda w: ["search", str(w["dir"] / "q.safetensors"), "-s", str(w["dir"] / "store"), "-k", "2.5"]),
    "search-threshold-nan": Case(
        lambda w: StateStore(w["dir"] / "store").search(w["s1"], threshold=math.nan),
        lambda w: ["search", str(w["dir"] / "q.safetensors"), "-s", str(w["dir"] / "store"), "--threshold", "nan"]),
    "index-cache-corrupt": Case(
        lambda w: _warns(lambda: StateStore(w["dir"] / "cached", index="usearch").search(w["s1"], k=1)),
        lambda w: ["search", str(w["dir"] / "q.safetensors"), "-s", str(w["dir"] / "cached"), "--index", "usearch"]),
    # ---- archives
    "import-truncated": Case(lambda w: StateStore(w["dir"] / "store").import_(w["dir"] / "cut.tar"),
                             lambda w: ["store", "import", str(w["dir"] / "cut.tar"), "-s", str(w["dir"] / "store")]),
    "import-not-a-tar": Case(
        lambda w: StateStore(w["dir"] / "store").import_(w["dir"] / "not-a-tar.tar"),
        lambda w: ["store", "import", str(w["dir"] / "not-a-tar.tar"), "-s", str(w["dir"] / "store")]),
    "import-manifest-a-list": Case(
        lambda w: StateStore(w["dir"] / "store").import_(w["dir"] / "manifest-list.tar"),
        lambda w: ["store", "import", str(w["dir"] / "manifest-list.tar"), "-s", str(w["dir"] / "store")]),
    "import-entries-a-dict": Case(
        lambda w: StateStore(w["dir"] / "store").import_(w["dir"] / "entries-dict.tar"),
        lambda w: ["store", "import", str(w["dir"] / "entries-dict.tar"), "-s", str(w["dir"] / "store")]),
    "import-tags-an-int": Case(
        lambda w: StateStore(w["dir"] / "store").import_(w["dir"] / "tags-int.tar"),
        lambda w: ["store", "import", str(w["dir"] / "tags-int.tar"), "-s", str(w["dir"] / "store")]),
    "import-prompt-a-dict": Case(
        lambda w: StateStore(w["dir"] / "store").import_(w["dir"] / "prompt-dict.tar"),
        lambda w: ["store", "import", str(w["dir"] / "prompt-dict.tar"), "-s", str(w["dir"] / "store")]),
}  # fmt: skip


def _bad_archives(w: dict) -> None:
    with tarfile.open(w["archive"]) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
    entry = manifest["entries"][0]
    _archive(w, "manifest-list", [manifest])
    _archive(w, "entries-dict", {**manifest, "entries": {"a1": entry}})
    _archive(w, "tags-int", {**manifest, "entries": [{**entry, "name": "t", "tags": 3}]})
    _archive(w, "prompt-dict", {**manifest, "entries": [{**entry, "name": "p", "prompt": {"text": "x"}}]})


# ---- the document -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    case: str
    api_error: str
    exit_code: int | None
    api_message: str
    cli_message: str | None


def doc_rows() -> dict[str, Row]:
    """The rows of every table in docs/errors.md whose first cell is a case id in backticks."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|", line)
        if not m:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 6, f"docs/errors.md row of {m.group(1)} needs 6 cells: {line}"
        case, _, api_error, exit_code, api_msg, cli_msg = cells
        unquote = lambda s: s.strip("`")  # noqa: E731
        rows[m.group(1)] = Row(
            case=m.group(1), api_error=unquote(api_error), exit_code=None if exit_code == "—" else int(exit_code),
            api_message=unquote(api_msg), cli_message=None if cli_msg == "—" else (
                unquote(api_msg) if cli_msg == "same" else unquote(cli_msg)),
        )  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def world():
    d = Path(tempfile.mkdtemp(prefix="statelab-errors-"))
    d.chmod(0o755)
    try:
        api_dir, cli_dir = d / "api", d / "cli"
        api_dir.mkdir()
        w = build_world(api_dir)
        _bad_archives(w)
        shutil.copytree(api_dir, cli_dir, symlinks=True)
        for p in [cli_dir, *cli_dir.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        yield w, {**w, "dir": cli_dir, "archive": cli_dir / "good.tar"}
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cli_results(world):
    """Every command line of the list, run by the real entry point in one process."""
    _, wc = world
    spec = [
        {"id": case_id, "args": case.cli(wc), "env": case.env(wc) if case.env else None}
        for case_id, case in CASES.items()
        if case.cli is not None
    ]
    spec_file, out_file = wc["dir"] / "spec.json", wc["dir"] / "out.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "tests._cli_driver", str(spec_file), str(out_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out_file.read_text())


def test_the_document_and_the_cases_list_the_same_inputs():
    rows = doc_rows()
    assert sorted(rows) == sorted(CASES), sorted(set(rows) ^ set(CASES))
    for case_id, row in rows.items():
        assert (row.exit_code is None) == (CASES[case_id].cli is None), case_id


def _limit_setup(case: Case, w: dict):
    """How a case's system limit is made for the API call (in a forked child), or None."""
    if case.env is None:
        return None
    kind, path = case.env(w)[:2]
    if kind == "read-only" and iso.can_mount():
        return lambda: (iso.private_mounts(), iso.read_only_bind(path))
    if kind == "full-disk" and iso.can_mount():
        return lambda: (iso.private_mounts(), iso.tmpfs(path, "1m"))
    return None


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_the_api_raises_what_the_document_says(world, case_id):
    w, _ = world
    row, case = doc_rows()[case_id], CASES[case_id]

    def call() -> tuple[str, str]:
        if case.env is not None and case.env(w)[0] == "full-disk":
            StateStore(w["dir"] / "disk" / "store").add(w["s1"], name="a")
            if iso.can_mount():
                iso.fill_disk(w["dir"] / "disk")
            else:
                iso.file_size_limit(16 * 1024)
        try:
            if case.env is not None and case.env(w)[0] == "read-only" and not iso.can_mount():
                with iso.read_only_view(w["dir"] / "ro"):
                    case.api(w)
            else:
                case.api(w)
        except Exception as e:  # noqa: BLE001  (the class is what is checked)
            return type(e).__name__, str(e)
        return "no error", ""

    if case.env is not None:
        name, message = iso.in_child(call, setup=_limit_setup(case, w))
    else:
        name, message = call()
    assert name == row.api_error, (case_id, name, message)
    assert row.api_message in message and "\n" not in message, (case_id, message)


@pytest.mark.parametrize("case_id", sorted(c for c, case in CASES.items() if case.cli is not None))
def test_the_command_line_fails_as_the_document_says_without_a_traceback(cli_results, case_id):
    row, got = doc_rows()[case_id], cli_results[case_id]
    assert "Traceback" not in got["stderr"] and "Traceback" not in got["stdout"], got
    assert got["code"] == row.exit_code, (case_id, got)
    lines = got["stderr"].strip().splitlines()
    if row.exit_code == 0:  # a warning: the command worked and said once what it repaired
        assert len(lines) == 1 and lines[0].startswith("warning: ") and row.cli_message in lines[0], got
    elif row.exit_code == 2:  # the command-line parser's usage error (a box of a few lines, no traceback)
        assert row.cli_message in got["stderr"], got
    else:
        assert len(lines) == 1 and lines[0].startswith("error: ") and row.cli_message in lines[0], got
