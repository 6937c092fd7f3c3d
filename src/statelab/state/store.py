"""The state store: a directory of named states with metadata, search and safe concurrent access.

Layout of a store directory::

    store.db                      SQLite (WAL): config, entries, tags
    blobs/ab/abcdef….safetensors  one state file per distinct state, named by its checksum (content address)
    index/<kind>-<model>-….idx    vector-index caches (rebuilt from the database whenever they are stale)

Guarantees:

* **Atomic adds.** A blob is written to a temporary file, fsynced and renamed before the row that refers to it is
  committed; the row and its tags go in one transaction. A process killed at any moment leaves either a complete
  entry or none (possibly an orphan blob or a temporary file, which :meth:`StateStore.check` reports and repairs).
  :meth:`StateStore.add_many` commits the rows of all its items in one transaction: a batch is visible whole or
  not at all.
* **Several processes at once.** Every call opens its own SQLite connection (WAL, busy timeout); writes take the
  write lock with ``BEGIN IMMEDIATE``. A blob is only deleted while holding that lock and only when no row refers to
  it, and an add re-checks its blob under the lock, so concurrent adds, removes and repairs never lose data.
* **Verified reads.** Every blob read is checked (checksum, layout, NaN) and must match the checksum its row names.

Search (see :mod:`statelab.state.search`): ``index="exact"`` (default) scores the raw SSM states of the chosen layers
(exact cosine, blobs streamed); ``"sketch"`` scores stored CountSketch vectors by brute force; ``"faiss"`` and
``"usearch"`` search the sketches with an HNSW index, ``"faiss-ivf"`` with an IVF-Flat index (fast to build; the
one to use beyond ~1e5 entries, see ``benchmarks/RESULTS.md``). Sketches are computed when a state is added, with
the dimension, seed and layers recorded in the store, so every sketch in a store is comparable.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import os
import re
import sqlite3
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from statelab.errors import StateFileError, StateMismatchError, StoreError
from statelab.state.core import State
from statelab.state.io import TMP_PREFIX, atomic_write, decode_state, encode_state
from statelab.state.search import (
    CountSketch,
    VectorIndex,
    layer_features,
    load_index,
    make_index,
    resolve_layers,
)

__all__ = ["StateStore", "Entry", "NewEntry", "Hit", "CheckReport", "STORE_INDEX_KINDS", "DEFAULT_SKETCH_DIM"]

SCHEMA_VERSION = "1"
ARCHIVE_FORMAT = "statelab.store-archive"
ARCHIVE_VERSION = 1
STORE_INDEX_KINDS = ("exact", "sketch", "faiss", "faiss-ivf", "usearch")
# Chosen with benchmarks/bench_store.py (sketch recall against raw-state cosine); see benchmarks/RESULTS.md.
DEFAULT_SKETCH_DIM = 256
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    task TEXT,
    description TEXT,
    prompt TEXT,
    shots INTEGER,
    created TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    arch TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    num_layers INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    layout TEXT NOT NULL,
    blob TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    sketch BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (
    entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (entry_id, tag)
);
CREATE INDEX IF NOT EXISTS entries_task ON entries(task);
CREATE INDEX IF NOT EXISTS entries_fingerprint ON entries(fingerprint);
CREATE INDEX IF NOT EXISTS entries_blob ON entries(blob);
CREATE INDEX IF NOT EXISTS tags_tag ON tags(tag);
"""
_COLUMNS = (
    "id, name, task, description, prompt, shots, created, fingerprint, arch, n_tokens, num_layers, dtype, layout, "
    "blob, nbytes"
)


@dataclass(frozen=True)
class Entry:
    """One stored state's metadata (the tensors stay in the blob ``blob``)."""

    id: int
    name: str
    task: str | None
    tags: tuple[str, ...]
    description: str | None
    prompt: str | None
    shots: int | None
    created: str
    fingerprint: str
    arch: str
    n_tokens: int
    num_layers: int
    dtype: str
    layout: dict[str, list[int]]
    blob: str
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d


@dataclass(frozen=True)
class NewEntry:
    """One entry to add with :meth:`StateStore.add_many` (a dict with the same keys works too).

    ``state`` is a batch-1 state; the other fields are those of :meth:`StateStore.add`.
    """

    name: str
    state: State
    task: str | None = None
    tags: Sequence[str] = ()
    description: str | None = None
    prompt: str | None = None
    shots: int | None = None


_NEW_ENTRY_KEYS = ("name", "state", "task", "tags", "description", "prompt", "shots")


@dataclass(frozen=True)
class Hit:
    """A search result: entry name and id, cosine score (higher is closer), and the entry's task and prompt (the
    payload a match is wanted for: the text whose state matched)."""

    name: str
    id: int
    score: float
    task: str | None
    prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckReport:
    """What :meth:`StateStore.check` found (and, with ``repair``, fixed)."""

    entries: int = 0
    blobs: int = 0
    orphan_blobs: list[str] = field(default_factory=list)
    missing_blobs: list[str] = field(default_factory=list)
    corrupt_blobs: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    live_temp_files: list[str] = field(default_factory=list)
    stale_indexes: list[str] = field(default_factory=list)
    repaired: bool = False
    dropped_entries: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong (temporary files of live writers and stale index caches are not faults)."""
        return not (self.orphan_blobs or self.missing_blobs or self.corrupt_blobs or self.temp_files)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        verb = "removed" if self.repaired else "found"
        parts = [f"{self.entries} entries, {self.blobs} blobs"]
        for label, items in (
            ("orphan blobs", self.orphan_blobs),
            ("entries with missing blob", self.missing_blobs),
            ("entries with corrupt blob", self.corrupt_blobs),
            ("temporary files from interrupted writes", self.temp_files),
        ):
            if items:
                parts.append(f"{verb} {len(items)} {label}")
        if self.dropped_entries:
            parts.append(f"dropped entries {self.dropped_entries}")
        return ("OK: " if self.ok or self.repaired else "PROBLEMS: ") + "; ".join(parts)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_owner(name: str) -> int | None:
    """The writer pid encoded in a temporary file name (``.tmp-<pid>-…``), or None."""
    m = re.match(re.escape(TMP_PREFIX) + r"(\d+)-", name)
    return int(m.group(1)) if m else None


class StateStore:
    """A directory of named states (see module doc).

    Args:
        path: the store directory; created if missing.
        index: search backend: ``"exact"`` (default; raw-state cosine), ``"sketch"``, ``"faiss"`` (HNSW),
            ``"faiss-ivf"`` or ``"usearch"`` (HNSW).
        sketch_dim, sketch_seed, layers: sketch dimension (default 256), hash seed (default 0) and the layers
            sketched and searched by default (``None``: the middle third). Fixed when the store is created; passing
            a different value when opening an existing store is an error.
        timeout: seconds a call waits for another process's write lock.
        cache_mb: memory for raw-state features kept between exact searches.

    Example:
        >>> store = StateStore("skills")                                # doctest: +SKIP
        >>> store.add(state, name="sst2-32shot-a", task="sst2", tags=["sentiment"], shots=32)  # doctest: +SKIP
        >>> [h.name for h in store.search(query_state, k=3)]           # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        index: str = "exact",
        sketch_dim: int | None = None,
        sketch_seed: int | None = None,
        layers: Sequence[int] | None = None,
        timeout: float = 60.0,
        cache_mb: int = 256,
    ) -> None:
        if index not in STORE_INDEX_KINDS:
            raise StoreError(f"unknown index {index!r}; choose one of {list(STORE_INDEX_KINDS)}")
        self.path = Path(path)
        self.index_kind = index
        self.timeout = float(timeout)
        self._cache_limit = int(cache_mb) * 2**20
        self._feature_cache: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self._indexes: dict[str, tuple[VectorIndex, int, int]] = {}
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store path {self.path} exists and is not a directory")
        try:
            (self.path / "blobs").mkdir(parents=True, exist_ok=True)
            (self.path / "index").mkdir(exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.path}: {e.strerror or e}") from None
        wanted = {
            "sketch_dim": None if sketch_dim is None else str(int(sketch_dim)),
            "sketch_seed": None if sketch_seed is None else str(int(sketch_seed)),
            "layers": None if layers is None else json.dumps(sorted({int(i) for i in layers})),
        }
        defaults = {"sketch_dim": str(DEFAULT_SKETCH_DIM), "sketch_seed": "0", "layers": "null"}
        with self._write() as db:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)
            config = dict(db.execute("SELECT key, value FROM config").fetchall())
            if config.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {config['schema_version']}, "
                    f"this statelab reads version {SCHEMA_VERSION}"
                )
            for key, default in {"schema_version": SCHEMA_VERSION, **defaults, "removals": "0"}.items():
                if key not in config:
                    value = wanted.get(key) or default
                    db.execute("INSERT INTO config (key, value) VALUES (?, ?)", (key, value))
                    config[key] = value
                elif wanted.get(key) is not None and wanted[key] != config[key]:
                    raise StoreError(f"store {self.path} was created with {key}={config[key]}, not {wanted[key]}")
        self.sketch_dim = int(config["sketch_dim"])
        self.sketch_seed = int(config["sketch_seed"])
        stored_layers = json.loads(config["layers"])
        self.layers: list[int] | None = stored_layers
        self._sketch = CountSketch(self.sketch_dim, self.sketch_seed)

    # ---- database plumbing -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path / "store.db", timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open store database {self.path / 'store.db'}: {e}") from None
        db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            db.close()
            raise StoreError(f"store database {self.path} could not switch to WAL mode (got {mode})")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = FULL")
        return db

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        db = self._connect()
        try:
            db.execute("BEGIN")
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: database error: {e}") from None
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the store's write lock; rolled back on any error."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            raise StoreError(f"store {self.path}: database busy or unwritable: {e}") from None
        finally:
            db.close()

    def _blob_path(self, blob: str) -> Path:
        return self.path / "blobs" / blob[:2] / f"{blob}.safetensors"

    def _entry(self, db: sqlite3.Connection, row: tuple) -> Entry:
        tags = tuple(t for (t,) in db.execute("SELECT tag FROM tags WHERE entry_id = ? ORDER BY tag", (row[0],)))
        (id_, name, task, desc, prompt, shots, created, fp, arch, n_tokens, L, dtype, layout, blob, nbytes) = row
        return Entry(
            id=id_, name=name, task=task, tags=tags, description=desc, prompt=prompt, shots=shots, created=created,
            fingerprint=fp, arch=arch, n_tokens=n_tokens, num_layers=L, dtype=dtype, layout=json.loads(layout),
            blob=blob, nbytes=nbytes,
        )  # fmt: skip

    def _find(self, db: sqlite3.Connection, name_or_id: str | int) -> tuple:
        if isinstance(name_or_id, bool) or not isinstance(name_or_id, str | int):
            raise StoreError(f"entries are named by a name (str) or an id (int), got {type(name_or_id).__name__}")
        row = None
        if isinstance(name_or_id, str):
            row = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE name = ?", (name_or_id,)).fetchone()
        if row is None and (isinstance(name_or_id, int) or name_or_id.isdigit()):
            row = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (int(name_or_id),)).fetchone()
        if row is None:
            raise StoreError(f"no entry named {name_or_id!r} in store {self.path}")
        return row

    def _write_blob(self, blob: str, data: bytes) -> None:
        p = self._blob_path(blob)
        if p.exists():
            return
        try:
            p.parent.mkdir(exist_ok=True)
            atomic_write(p, data)
        except StateFileError as e:
            raise StoreError(f"store {self.path}: {e}") from None

    def _collect(self, blobs: Sequence[str]) -> None:
        """Delete the blobs no row refers to; under the write lock, so no concurrent add can be using them."""
        if not blobs:
            return
        with self._write() as db:
            for blob in set(blobs):
                if db.execute("SELECT 1 FROM entries WHERE blob = ? LIMIT 1", (blob,)).fetchone() is None:
                    self._blob_path(blob).unlink(missing_ok=True)

    # ---- adding and reading ------------------------------------------------------------------------------
    def _prepare(
        self, state: State, name: str, task: str | None, tags: Sequence[str], description: str | None,
        prompt: str | None, shots: int | None,
    ) -> tuple[bytes, str, dict[str, Any]]:  # fmt: skip
        if not isinstance(state, State):
            raise StoreError(f"add needs a statelab.State, got {type(state).__name__}")
        if state.batch_size != 1:
            raise StoreError(
                f"a store entry holds one sequence's state, got batch size {state.batch_size}; "
                "add rows separately with state.select(i)"
            )
        if not isinstance(name, str) or not name.strip():
            raise StoreError(f"an entry needs a non-empty name, got {name!r}")
        if isinstance(tags, str):
            raise StoreError(f"tags must be a list of strings, got the string {tags!r}")
        tags = tuple(tags)
        if any(not isinstance(t, str) or not t for t in tags):
            raise StoreError(f"tags must be non-empty strings, got {list(tags)}")
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
            raise StoreError(f"shots must be a non-negative int, got {shots!r}")
        try:
            data, meta = encode_state(state.detach(), prompt=prompt)
        except StateFileError as e:
            raise StoreError(f"cannot add {name!r}: {e}") from None
        sketch = self._sketch(layer_features(state, self._layers_for(state.num_layers)))[0]
        row = {
            "name": name, "task": task, "description": description, "prompt": prompt, "shots": shots,
            "created": _now(), "fingerprint": state.fingerprint, "arch": state.arch, "n_tokens": state.n_tokens,
            "num_layers": state.num_layers, "dtype": meta["dtype"], "layout": meta["layout"],
            "blob": meta["checksum"].removeprefix("sha256:"), "nbytes": len(data),
            "sketch": sketch.numpy().astype("<f4").tobytes(), "tags": sorted(set(tags)),
        }  # fmt: skip
        return data, row["blob"], row

    def _layers_for(self, num_layers: int) -> list[int]:
        return resolve_layers(self.layers, num_layers)

    def _insert(self, db: sqlite3.Connection, row: dict[str, Any], data: bytes | None) -> int:
        if db.execute("SELECT 1 FROM entries WHERE name = ?", (row["name"],)).fetchone():
            raise StoreError(f"store {self.path} already has an entry named {row['name']!r}; remove it first")
        if not self._blob_path(row["blob"]).exists():  # a concurrent repair may have collected it: write it again
            if data is None:
                raise StoreError(f"blob {row['blob'][:12]} vanished before its entry was committed")
            self._write_blob(row["blob"], data)
        cols = [c for c in row if c != "tags"]
        cur = db.execute(
            f"INSERT INTO entries ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", [row[c] for c in cols]
        )
        db.executemany("INSERT INTO tags (entry_id, tag) VALUES (?, ?)", [(cur.lastrowid, t) for t in row["tags"]])
        return int(cur.lastrowid)

    def add(
        self,
        state: State,
        name: str,
        *,
        task: str | None = None,
        tags: Sequence[str] = (),
        description: str | None = None,
        prompt: str | None = None,
        shots: int | None = None,
    ) -> Entry:
        """Store a batch-1 ``state`` under a new unique ``name``; returns its entry.

        The blob is written (atomically) before the row is committed, so a crash never leaves a row without its
        state. Identical states share one blob. Raises ``StoreError`` for a taken name, a batch size other than 1,
        a NaN/inf state or a write failure, and then leaves the store as it was.
        """
        data, blob, row = self._prepare(state, name, task, tags, description, prompt, shots)
        self._write_blob(blob, data)
        try:
            with self._write() as db:
                new_id = self._insert(db, row, data)
                entry = self._entry(db, self._find(db, new_id))
        except BaseException:
            self._collect([blob])
            raise
        return entry

    def add_many(self, items: Sequence[NewEntry | dict[str, Any]]) -> list[Entry]:
        """Store many batch-1 states in one transaction: all of them or none; returns their entries in order.

        ``items``: :class:`NewEntry` values or dicts with the keys ``name`` and ``state`` and optionally ``task``,
        ``tags``, ``description``, ``prompt``, ``shots`` (as in :meth:`add`).

        Every item is checked before anything is written (names unique within ``items`` and new to the store,
        field types, batch size), then each blob is written (atomically; identical states share one), then all
        rows and tags are committed in a single transaction. Raises ``StoreError`` naming the item (its position
        and name) for the first bad one: a taken or repeated name, a bad field or tag, a NaN/inf state, a write
        failure. Then no entry of ``items`` is added and the blobs it wrote are removed again (those that other
        entries share stay), so the store is as it was.
        """
        if isinstance(items, (dict, NewEntry)):
            raise StoreError("add_many takes a list of items; for one entry pass [item] or use add")
        specs = [self._new_entry(i, item) for i, item in enumerate(items)]
        first: dict[str, int] = {}
        for i, spec in enumerate(specs):
            if spec.name in first:
                raise StoreError(
                    f"item {i} ({spec.name!r}): item {first[spec.name]} has the same name; names must be unique"
                )
            first[spec.name] = i
        names = list(first)
        with self._read() as db:
            for start in range(0, len(names), 500):
                chunk = names[start : start + 500]
                taken = db.execute(
                    f"SELECT name FROM entries WHERE name IN ({','.join('?' * len(chunk))})", chunk
                ).fetchone()
                if taken is not None:
                    raise StoreError(
                        f"item {first[taken[0]]} ({taken[0]!r}): store {self.path} already has an entry of that "
                        "name; remove it first or rename the item"
                    )
        rows: list[dict[str, Any]] = []
        written: list[str] = []
        try:
            for i, spec in enumerate(specs):
                try:
                    data, blob, row = self._prepare(
                        spec.state, spec.name, spec.task, spec.tags, spec.description, spec.prompt, spec.shots
                    )
                    self._write_blob(blob, data)  # the bytes are dropped here: a large batch is not held twice
                except StoreError as e:
                    raise StoreError(f"item {i} ({spec.name!r}): {e}") from None
                written.append(blob)
                rows.append(row)
            added: list[Entry] = []
            with self._write() as db:
                for i, (spec, row) in enumerate(zip(specs, rows, strict=True)):
                    data = None
                    if not self._blob_path(row["blob"]).exists():  # collected by a concurrent repair: rewrite it
                        data, _ = encode_state(spec.state.detach(), prompt=spec.prompt)
                    try:
                        new_id = self._insert(db, row, data)
                    except StoreError as e:
                        raise StoreError(f"item {i} ({spec.name!r}): {e}") from None
                    added.append(self._entry(db, self._find(db, new_id)))
        except BaseException:
            self._collect(written)
            raise
        return added

    @staticmethod
    def _new_entry(i: int, item: NewEntry | dict[str, Any]) -> NewEntry:
        """``item`` as a :class:`NewEntry`, or a ``StoreError`` naming item ``i`` and what is wrong with it."""
        if isinstance(item, dict):
            unknown = sorted(set(item) - set(_NEW_ENTRY_KEYS))
            missing = [k for k in ("name", "state") if k not in item]
            label = f"item {i}" + (f" ({item['name']!r})" if "name" in item else "")
            if unknown:
                raise StoreError(f"{label}: unknown key(s) {unknown}; an item has {', '.join(_NEW_ENTRY_KEYS)}")
            if missing:
                raise StoreError(f"{label}: missing {' and '.join(missing)}")
            item = NewEntry(**item)
        elif not isinstance(item, NewEntry):
            raise StoreError(f"item {i}: expected a NewEntry or a dict, got {type(item).__name__}")
        label = f"item {i} ({item.name!r})"
        if not isinstance(item.name, str) or not item.name.strip():
            raise StoreError(f"{label}: an entry needs a non-empty name")
        for key in ("task", "description", "prompt"):
            value = getattr(item, key)
            if value is not None and not isinstance(value, str):
                raise StoreError(f"{label}: {key} must be a string, got {type(value).__name__}")
        if not isinstance(item.state, State):
            raise StoreError(f"{label}: state must be a statelab.State, got {type(item.state).__name__}")
        if item.state.batch_size != 1:
            raise StoreError(
                f"{label}: a store entry holds one sequence's state, got batch size {item.state.batch_size}; "
                "add rows separately with state.select(i)"
            )
        return item

    def entry(self, name_or_id: str | int) -> Entry:
        """The metadata of one entry, by name or id."""
        with self._read() as db:
            return self._entry(db, self._find(db, name_or_id))

    def _load_blob(self, blob: str, label: str) -> State:
        p = self._blob_path(blob)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise StoreError(
                f"entry {label} has no state file ({p.name} is missing); run `statelab store check --repair`"
            ) from None
        try:
            state, meta = decode_state(data, f"entry {label}")
        except StateFileError as e:
            raise StoreError(f"{e}; run `statelab store check --repair`") from None
        if meta["checksum"].removeprefix("sha256:") != blob:
            raise StoreError(f"entry {label}: state file content does not match its name {blob[:12]}")
        return state

    def get(self, name_or_id: str | int, model: Any = None, *, device: torch.device | str | None = None) -> State:
        """The stored state, verified; with ``model``, refused (``StateMismatchError``) unless made by it."""
        with self._read() as db:
            row = self._find(db, name_or_id)
        state = self._load_blob(row[13], repr(row[1]))
        if model is not None:
            if state.fingerprint != model.fingerprint:
                raise StateMismatchError(
                    f"entry {row[1]!r} was made by model {state.fingerprint}, "
                    f"but this model's fingerprint is {model.fingerprint}"
                )
            model.check_state(state)
        return state if device is None else state.to(device=device)

    def list(
        self,
        task: str | None = None,
        tags: Sequence[str] | None = None,
        fingerprint: str | None = None,
    ) -> list[Entry]:
        """Entries in insertion order, filtered by task, by tags (an entry must carry all of them) and by model
        fingerprint (a prefix is enough)."""
        where, args = [], []
        if task is not None:
            where.append("task = ?")
            args.append(task)
        if fingerprint is not None:
            where.append("substr(fingerprint, 1, ?) = ?")
            args += [len(fingerprint), fingerprint]
        for t in [tags] if isinstance(tags, str) else tags or ():
            where.append("EXISTS (SELECT 1 FROM tags WHERE entry_id = entries.id AND tag = ?)")
            args.append(t)
        sql = f"SELECT {_COLUMNS} FROM entries" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        with self._read() as db:
            return [self._entry(db, r) for r in db.execute(sql, args).fetchall()]

    def __len__(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def __contains__(self, name_or_id: object) -> bool:
        try:
            self.entry(name_or_id)  # type: ignore[arg-type]
        except StoreError:
            return False
        return True

    def remove(self, name_or_id: str | int) -> Entry:
        """Delete one entry (and its blob when no other entry shares it); returns the removed entry."""
        with self._write() as db:
            entry = self._entry(db, self._find(db, name_or_id))
            db.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
            db.execute("UPDATE config SET value = CAST(value AS INTEGER) + 1 WHERE key = 'removals'")
        self._collect([entry.blob])
        return entry

    # ---- integrity ---------------------------------------------------------------------------------------
    def check(self, repair: bool = False, verify: bool = True) -> CheckReport:
        """Look for orphan blobs, entries whose blob is missing or corrupt, and temporary files of dead writers.

        With ``repair``: delete orphan blobs and dead writers' temporary files, drop entries whose state is lost
        (missing or corrupt blob; they are listed in ``dropped_entries``) and drop stale index caches. Runs under
        the write lock, so concurrent writers wait and nothing in flight is mistaken for debris. ``verify`` reads
        and verifies every blob (slower); without it only their presence is checked.
        """
        report = CheckReport(repaired=repair)
        with self._write() as db:
            rows = db.execute("SELECT id, name, blob FROM entries ORDER BY id").fetchall()
            report.entries = len(rows)
            referenced = {blob for _, _, blob in rows}
            on_disk = {}
            for p in (self.path / "blobs").glob("*/*"):
                if p.name.startswith(TMP_PREFIX):
                    owner = _temp_owner(p.name)
                    if owner is not None and owner != os.getpid() and _pid_alive(owner):
                        report.live_temp_files.append(str(p.relative_to(self.path)))
                    else:
                        report.temp_files.append(str(p.relative_to(self.path)))
                        if repair:
                            p.unlink(missing_ok=True)
                elif p.suffix == ".safetensors" and _HEX64.match(p.stem):
                    on_disk[p.stem] = p
            report.blobs = len(on_disk)
            report.orphan_blobs = sorted(set(on_disk) - referenced)
            bad_blobs: set[str] = set()
            for blob in sorted(referenced):
                if blob not in on_disk:
                    bad_blobs.add(blob)
                elif verify:
                    try:
                        self._load_blob(blob, blob[:12])
                    except StoreError:
                        bad_blobs.add(blob)
            for _, name, blob in rows:
                if blob in bad_blobs:
                    (report.missing_blobs if blob not in on_disk else report.corrupt_blobs).append(name)
            if repair:
                for blob in report.orphan_blobs:
                    on_disk[blob].unlink(missing_ok=True)
                for blob in bad_blobs:
                    self._blob_path(blob).unlink(missing_ok=True)
                lost = [(id_, name) for id_, name, blob in rows if blob in bad_blobs]
                db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i, _ in lost])
                if lost:
                    db.execute("UPDATE config SET value = CAST(value AS INTEGER) + 1 WHERE key = 'removals'")
                report.dropped_entries = [n for _, n in lost]
            removals = int(db.execute("SELECT value FROM config WHERE key = 'removals'").fetchone()[0])
            for p in (self.path / "index").iterdir():
                stale = p.name.startswith(TMP_PREFIX) or self._index_file_removals(p) != removals
                if stale:
                    report.stale_indexes.append(p.name)
                    if repair:
                        p.unlink(missing_ok=True)
        if repair:
            self._indexes.clear()
            self._feature_cache.clear()
        return report

    # ---- archives ----------------------------------------------------------------------------------------
    def export(self, archive_path: str | os.PathLike, names: Sequence[str] | None = None) -> int:
        """Write entries (all, or ``names``) to one tar archive: ``manifest.json`` plus their blobs.

        The archive is written atomically. Returns the number of entries exported.
        """
        with self._read() as db:
            if names is None:
                rows = db.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY id").fetchall()
            else:
                rows = [self._find(db, n) for n in names]
            entries = [self._entry(db, r) for r in rows]
        manifest = {
            "format": ARCHIVE_FORMAT,
            "version": ARCHIVE_VERSION,
            "created": _now(),
            "entries": [{k: v for k, v in e.to_dict().items() if k != "id"} for e in entries],
        }
        buf = _io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            _tar_add(tar, "manifest.json", data)
            for blob in sorted({e.blob for e in entries}):
                state_bytes = self._blob_path(blob).read_bytes() if self._blob_path(blob).exists() else None
                if state_bytes is None:
                    raise StoreError(f"cannot export: blob {blob[:12]} is missing; run `statelab store check --repair`")
                self._load_blob(blob, blob[:12])
                _tar_add(tar, f"blobs/{blob}.safetensors", state_bytes)
        archive = Path(archive_path)
        try:
            atomic_write(archive, buf.getvalue())
        except StateFileError as e:
            raise StoreError(f"export failed: {e}") from None
        return len(entries)

    def import_(self, archive_path: str | os.PathLike) -> list[Entry]:
        """Add the entries of an archive written by :meth:`export`; all or nothing.

        Every blob is verified (checksum, layout, name) before anything is written. An entry whose name already
        exists with the same state is skipped; with a different state it is an error.
        """
        archive = Path(archive_path)
        files: dict[str, bytes] = {}
        try:
            tar = tarfile.open(archive, mode="r:")  # noqa: SIM115  (closed by the with below)
        except (OSError, tarfile.TarError) as e:
            raise StoreError(f"cannot read archive {archive}: {e}") from None
        with tar:
            for member in tar.getmembers():
                ok = member.isfile() and (
                    member.name == "manifest.json"
                    or re.fullmatch(r"blobs/[0-9a-f]{64}\.safetensors", member.name) is not None
                )
                if not ok:
                    raise StoreError(f"archive {archive}: unexpected member {member.name!r}")
                f = tar.extractfile(member)
                if f is None:
                    raise StoreError(f"archive {archive}: unreadable member {member.name!r}")
                files[member.name] = f.read()
        try:
            manifest = json.loads(files.pop("manifest.json"))
        except KeyError:
            raise StoreError(f"archive {archive} has no manifest.json") from None
        except json.JSONDecodeError as e:
            raise StoreError(f"archive {archive}: manifest.json is not JSON ({e})") from None
        if manifest.get("format") != ARCHIVE_FORMAT or manifest.get("version") != ARCHIVE_VERSION:
            raise StoreError(
                f"archive {archive} is not a statelab store archive version {ARCHIVE_VERSION} "
                f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})"
            )
        states: dict[str, State] = {}
        for name, data in files.items():
            blob = name.removeprefix("blobs/").removesuffix(".safetensors")
            try:
                state, meta = decode_state(data, f"{archive}:{name}")
            except StateFileError as e:
                raise StoreError(str(e)) from None
            if meta["checksum"].removeprefix("sha256:") != blob:
                raise StoreError(f"archive {archive}: {name} does not match its checksum")
            states[blob] = state
        prepared = []
        seen = set()
        for e in manifest.get("entries", []):
            blob = e.get("blob")
            if blob not in states:
                raise StoreError(f"archive {archive}: entry {e.get('name')!r} refers to a blob it does not contain")
            if e.get("name") in seen:
                raise StoreError(f"archive {archive}: entry name {e.get('name')!r} appears twice")
            seen.add(e.get("name"))
            data, blob2, row = self._prepare(
                states[blob], e.get("name"), e.get("task"), e.get("tags", ()), e.get("description"),
                e.get("prompt"), e.get("shots"),
            )  # fmt: skip
            row["created"] = e.get("created") or row["created"]
            prepared.append((data, blob2, row))
        for data, blob, _ in prepared:
            self._write_blob(blob, data)
        added: list[Entry] = []
        try:
            with self._write() as db:
                for data, blob, row in prepared:
                    old = db.execute("SELECT blob FROM entries WHERE name = ?", (row["name"],)).fetchone()
                    if old is not None:
                        if old[0] == blob:
                            continue
                        raise StoreError(
                            f"cannot import {row['name']!r}: this store already has a different state of that name"
                        )
                    new_id = self._insert(db, row, data)
                    added.append(self._entry(db, self._find(db, new_id)))
        except BaseException:
            self._collect([b for _, b, _ in prepared])
            raise
        return added

    # ---- search ------------------------------------------------------------------------------------------
    def search(
        self,
        query_state: State,
        k: int = 5,
        layers: Sequence[int] | None = None,
        threshold: float | None = None,
        *,
        rerank: int = 0,
        task: str | None = None,
    ) -> list[Hit]:
        """The ``k`` entries most similar to ``query_state`` (cosine of the chosen layers' SSM states), best first,
        each with the entry's task and stored prompt.

        Args:
            query_state: batch-1 state, typically of a short k-shot prompt, from the same model as the entries.
            k: how many hits at most.
            layers: layers to compare; default the store's layers (the middle third unless set at creation).
                Layers other than the store's are always searched exactly on the raw states.
            threshold: drop hits scoring below it; an empty list means "no match".
            rerank: with a sketch-based index, re-score this many sketch candidates on the raw states, so the
                scores (and order) of the returned hits are exact cosines. 0 keeps sketch scores.
            task: only entries of this task.

        Raises ``StoreError`` for an empty store or a store holding no entry of the query's model.
        """
        if not isinstance(query_state, State):
            raise StoreError(f"search needs a statelab.State query, got {type(query_state).__name__}")
        if query_state.batch_size != 1:
            raise StoreError(f"search takes one query state (batch 1), got batch {query_state.batch_size}")
        if k < 1:
            raise StoreError(f"k must be >= 1, got {k}")
        # one snapshot for the candidates and the prompts of the hits (a connection costs as much as a small search)
        with self._read() as db:
            hits = self._rank(db, query_state, k, layers, threshold, rerank, task)
            return self._with_prompts(db, hits)

    def _rank(
        self, db: sqlite3.Connection, query_state: State, k: int, layers: Sequence[int] | None,
        threshold: float | None, rerank: int, task: str | None,
    ) -> list[Hit]:  # fmt: skip
        """The hits of :meth:`search` (without prompts), candidates read through ``db``."""
        fp = query_state.fingerprint
        total = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        cond, args = "fingerprint = ?", [fp]
        if task is not None:
            cond, args = cond + " AND task = ?", [*args, task]
        rows = db.execute(f"SELECT id, name, task, blob FROM entries WHERE {cond} ORDER BY id", args).fetchall()
        if total == 0:
            raise StoreError(f"store {self.path} is empty: nothing to search")
        if not rows:
            if task is not None:
                return []
            raise StoreError(
                f"store {self.path} holds no state made by the query's model {fp[:16]} ({total} entries of others)"
            )
        store_layers = self._layers_for(query_state.num_layers)
        use_layers = store_layers if layers is None else resolve_layers(layers, query_state.num_layers)
        if self.index_kind == "exact" or use_layers != store_layers:
            hits = self._exact(query_state, rows, use_layers, k)
        else:
            want = max(k, rerank)
            q = self._sketch(layer_features(query_state, use_layers))
            info = {r[0]: r for r in rows}
            if task is None:
                scores, ids = self._synced_index(fp).search(q.numpy(), want)
                pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if int(i) in info]
            else:
                vecs = self._sketches([r[0] for r in rows])
                s = (vecs @ q[0]).tolist()
                pairs = sorted(zip(s, [r[0] for r in rows], strict=True), reverse=True)[:want]
            if rerank:
                hits = self._exact(query_state, [info[i] for _, i in pairs], use_layers, k)
            else:
                hits = [Hit(info[i][1], i, s, info[i][2]) for s, i in pairs[:k]]
        if threshold is not None:
            hits = [h for h in hits if h.score >= threshold]
        return hits

    @staticmethod
    def _with_prompts(db: sqlite3.Connection, hits: list[Hit]) -> list[Hit]:
        """The hits with their entries' prompts, read for the returned hits only (a large store's prompts are never
        all loaded)."""
        prompts: dict[int, str | None] = {}
        for start in range(0, len(hits), 500):
            ids = [h.id for h in hits[start : start + 500]]
            marks = ",".join("?" * len(ids))
            prompts.update(db.execute(f"SELECT id, prompt FROM entries WHERE id IN ({marks})", ids).fetchall())
        return [Hit(h.name, h.id, h.score, h.task, prompts.get(h.id)) for h in hits]

    def _features(self, blob: str, layers: list[int], label: str) -> torch.Tensor:
        """Unit-normalised raw features ``[F]`` of a blob's layers (kept in memory up to ``cache_mb``)."""
        key = (blob, tuple(layers))
        f = self._feature_cache.get(key)
        if f is None:
            f = layer_features(self._load_blob(blob, label), layers)[0]
            f = f / f.norm().clamp_min(torch.finfo(torch.float32).tiny)
            used = sum(t.numel() * 4 for t in self._feature_cache.values())
            if used + f.numel() * 4 <= self._cache_limit:
                self._feature_cache[key] = f
        return f

    def _exact(self, query: State, rows: Sequence[tuple], layers: list[int], k: int) -> list[Hit]:
        """Exact cosine against every row's raw features: one dot product per entry, no copy of the features."""
        q = layer_features(query, layers)[0]
        q = q / q.norm().clamp_min(torch.finfo(torch.float32).tiny)
        scores = [float(torch.dot(q, self._features(r[3], layers, repr(r[1])))) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: -scores[i])[:k]
        return [Hit(rows[i][1], rows[i][0], scores[i], rows[i][2]) for i in order]

    def _sketches(self, ids: Sequence[int] | None = None, fingerprint: str | None = None, after: int = 0):
        with self._read() as db:
            if ids is not None:
                got = []
                for start in range(0, len(ids), 500):
                    chunk = list(ids[start : start + 500])
                    marks = ",".join("?" * len(chunk))
                    got += db.execute(f"SELECT id, sketch FROM entries WHERE id IN ({marks})", chunk).fetchall()
                order = {i: n for n, i in enumerate(ids)}
                got.sort(key=lambda r: order[r[0]])
            else:
                got = db.execute(
                    "SELECT id, sketch FROM entries WHERE fingerprint = ? AND id > ? ORDER BY id", (fingerprint, after)
                ).fetchall()
        vecs = np.frombuffer(b"".join(r[1] for r in got), dtype="<f4").reshape(len(got), self.sketch_dim)
        if ids is not None:
            return torch.from_numpy(vecs.copy())
        return np.array([r[0] for r in got], dtype=np.int64), vecs

    # ---- index caches ------------------------------------------------------------------------------------
    def _index_kind(self) -> str:
        return "exact" if self.index_kind == "sketch" else self.index_kind

    @staticmethod
    def _index_file_removals(p: Path) -> int | None:
        m = re.fullmatch(r"[a-z-]+-[0-9a-f]{16}-r(\d+)-m(\d+)\.idx", p.name)
        return int(m.group(1)) if m else None

    def _synced_index(self, fp: str) -> VectorIndex:
        """The vector index of model ``fp``'s sketches, brought up to date with the database.

        New rows are appended to the cached index; after any removal the index is rebuilt (HNSW graphs do not
        delete well). Non-exact indexes are also cached on disk as ``index/<kind>-<model>-r<removals>-m<max id>.idx``.
        """
        kind = self._index_kind()
        with self._read() as db:
            removals = int(db.execute("SELECT value FROM config WHERE key = 'removals'").fetchone()[0])
            max_id = db.execute("SELECT COALESCE(MAX(id), 0) FROM entries WHERE fingerprint = ?", (fp,)).fetchone()[0]
        cached = self._indexes.get(fp)
        if cached is None or cached[2] != removals:
            cached = self._load_index_file(kind, fp, removals, max_id)
        if cached is None or cached[2] != removals:
            cached = (make_index(kind, self.sketch_dim), 0, removals)
        index, synced, _ = cached
        changed = False
        if max_id > synced:
            ids, vecs = self._sketches(fingerprint=fp, after=synced)
            if len(ids):
                index.add(ids, vecs)
            changed = True
        self._indexes[fp] = (index, max_id, removals)
        if changed and kind != "exact":
            self._save_index_file(kind, fp, index, removals, max_id)
        return index

    def _index_files(self, kind: str, fp: str) -> list[tuple[Path, int, int]]:
        out = []
        for p in (self.path / "index").glob(f"{kind}-{_fp_tag(fp)}-r*-m*.idx"):
            m = re.fullmatch(r"[a-z-]+-[0-9a-f]{16}-r(\d+)-m(\d+)\.idx", p.name)
            if m:
                out.append((p, int(m.group(1)), int(m.group(2))))
        return out

    def _load_index_file(self, kind: str, fp: str, removals: int, max_id: int):
        if kind == "exact":
            return None
        best = None
        for p, r, m in self._index_files(kind, fp):
            if r == removals and m <= max_id and (best is None or m > best[2]):
                best = (p, r, m)
        if best is None:
            return None
        try:
            index = load_index(kind, best[0], self.sketch_dim)
        except (StoreError, RuntimeError, OSError):
            return None
        with self._read() as db:
            count = db.execute(
                "SELECT COUNT(*) FROM entries WHERE fingerprint = ? AND id <= ?", (fp, best[2])
            ).fetchone()[0]
        if len(index) != count:
            return None
        return index, best[2], removals

    def _save_index_file(self, kind: str, fp: str, index: VectorIndex, removals: int, max_id: int) -> None:
        target = self.path / "index" / f"{kind}-{_fp_tag(fp)}-r{removals}-m{max_id}.idx"
        tmp = target.with_name(f"{TMP_PREFIX}{os.getpid()}-{time.monotonic_ns()}-{target.name}")
        try:
            index.save(tmp)
            os.replace(tmp, target)
        except (OSError, RuntimeError):
            tmp.unlink(missing_ok=True)  # the cache is an optimisation: a failed save only costs a rebuild
            return
        for p, _, m in self._index_files(kind, fp):
            if p != target and m <= max_id:
                p.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"StateStore({str(self.path)!r}, index={self.index_kind!r}, sketch_dim={self.sketch_dim})"


def _fp_tag(fingerprint: str) -> str:
    """16 hex digits naming a model in index file names (fingerprints are free-form strings)."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, _io.BytesIO(data))
