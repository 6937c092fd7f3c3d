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
  Every index cache file is checked against the size, SHA-256 and entry range recorded for it in the database
  before FAISS or usearch parse it; a cache that does not match is rebuilt from the database (with one warning).
* **Read-only stores.** A store this process cannot write (a read-only mount, another user's directory) opens
  read-only: reads work, and every write fails with one line saying the store is read-only. Opening a store never
  writes to it, and reading never creates one (``create=False``).
* **Full disks.** A write that runs out of space fails with one line and leaves no blob behind (the connection is
  opened before the blob is written and kept for the clean-up, which then needs no new space); reads keep working
  (SQLite's shared-memory file cannot be created on a full disk, so a read falls back to an unlocked snapshot
  that is verified not to have changed while it was read).

Search (see :mod:`statelab.state.search`): ``index="exact"`` (default) scores the raw SSM states of the chosen layers
(exact cosine, blobs streamed); ``"sketch"`` scores stored CountSketch vectors by brute force; ``"faiss"`` and
``"usearch"`` search the sketches with an HNSW index, ``"faiss-ivf"`` with an IVF-Flat index (fast to build; the
one to use beyond ~1e5 entries, see ``benchmarks/RESULTS.md``). Sketches are computed when a state is added, with
the dimension, seed and layers recorded in the store, so every sketch in a store is comparable.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io as _io
import json
import math
import os
import re
import sqlite3
import tarfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from statelab.errors import StateFileError, StatelabWarning, StateMismatchError, StoreError
from statelab.state.core import State
from statelab.state.io import TMP_PREFIX, atomic_write, decode_state, encode_state
from statelab.state.search import (
    CountSketch,
    VectorIndex,
    index_from_bytes,
    layer_features,
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
CREATE TABLE IF NOT EXISTS index_files (
    file TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    removals INTEGER NOT NULL,
    max_id INTEGER NOT NULL,
    count INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""
_TABLES = ("config", "entries", "tags", "index_files")
# SQLite result codes that mean "this file cannot be written (or its lock files created) here"
_UNWRITABLE = ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_PERM")
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
    bad_indexes: list[str] = field(default_factory=list)
    rebuilt_indexes: list[str] = field(default_factory=list)
    repaired: bool = False
    dropped_entries: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong (temporary files of live writers and stale index caches are not faults; an
        index cache whose bytes do not match their record is)."""
        return not (
            self.orphan_blobs or self.missing_blobs or self.corrupt_blobs or self.temp_files or self.bad_indexes
        )

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
            ("index caches that do not match their checksum", self.bad_indexes),
        ):
            if items:
                parts.append(f"{verb} {len(items)} {label}")
        if self.dropped_entries:
            parts.append(f"dropped entries {self.dropped_entries}")
        if self.rebuilt_indexes:
            parts.append(f"rebuilt index caches {self.rebuilt_indexes}")
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
        path: the store directory.
        create: create the store if ``path`` holds none (default). With ``False`` a missing store is a
            ``StoreError`` and nothing is created: what read-only callers (the ``list``, ``get``, ``search``
            commands) use, so that a mistyped path is an error rather than a new empty store.
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
        create: bool = True,
    ) -> None:
        if index not in STORE_INDEX_KINDS:
            raise StoreError(f"unknown index {index!r}; choose one of {list(STORE_INDEX_KINDS)}")
        self.path = Path(path)
        self.index_kind = index
        self.timeout = float(timeout)
        self._cache_limit = int(cache_mb) * 2**20
        self._feature_cache: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self._indexes: dict[str, tuple[VectorIndex, int, int]] = {}
        self._warned: set[str] = set()
        self._index_records = False  # whether the database has the index_files table (set when opening)
        self._db_file = self.path / "store.db"
        # SQLite URI of the database; "mode=rw" (never "rwc") everywhere but creation, so nothing is created by
        # accident if the file vanished
        self._db_uri = self._db_file.absolute().as_uri()
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store path {self.path} exists and is not a directory")
        wanted = {
            "sketch_dim": None if sketch_dim is None else str(int(sketch_dim)),
            "sketch_seed": None if sketch_seed is None else str(int(sketch_seed)),
            "layers": None if layers is None else json.dumps(sorted({int(i) for i in layers})),
        }
        if not self._db_file.is_file():
            if not create:
                where = "is not a state store (it has no store.db)" if self.path.is_dir() else "does not exist"
                raise StoreError(
                    f"no state store at {self.path}: the path {where}; check the path, or create a store with "
                    f"`statelab store init {self.path}` (nothing was created)"
                )
            config = self._create(wanted)
        else:
            config = self._open_existing(wanted)
        self.sketch_dim = int(config["sketch_dim"])
        self.sketch_seed = int(config["sketch_seed"])
        stored_layers = json.loads(config["layers"])
        self.layers: list[int] | None = stored_layers
        self._sketch = CountSketch(self.sketch_dim, self.sketch_seed)

    # ---- creating and opening ----------------------------------------------------------------------------
    def _fill_schema(self, db: sqlite3.Connection, wanted: dict[str, str | None]) -> dict[str, str]:
        """Create missing tables and config keys (inside a write transaction); the store's config."""
        for stmt in filter(str.strip, _SCHEMA.split(";")):
            db.execute(stmt)
        config = dict(db.execute("SELECT key, value FROM config").fetchall())
        self._check_config(config, wanted)
        defaults = {"sketch_dim": str(DEFAULT_SKETCH_DIM), "sketch_seed": "0", "layers": "null"}
        for key, default in {"schema_version": SCHEMA_VERSION, **defaults, "removals": "0"}.items():
            if key not in config:
                value = wanted.get(key) or default
                db.execute("INSERT INTO config (key, value) VALUES (?, ?)", (key, value))
                config[key] = value
        return config

    def _check_config(self, config: dict[str, str], wanted: dict[str, str | None]) -> None:
        if config.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema version {config['schema_version']}, "
                f"this statelab reads version {SCHEMA_VERSION}"
            )
        for key, value in wanted.items():
            if value is not None and key in config and config[key] != value:
                raise StoreError(f"store {self.path} was created with {key}={config[key]}, not {value}")

    def _create(self, wanted: dict[str, str | None]) -> dict[str, str]:
        """Make the directories and the database (several processes may race to do this; all succeed)."""
        try:
            (self.path / "blobs").mkdir(parents=True, exist_ok=True)
            (self.path / "index").mkdir(exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.path}: {e.strerror or e}") from None
        db = None
        try:
            db = sqlite3.connect(self._db_uri + "?mode=rwc", uri=True, timeout=self.timeout, isolation_level=None)
            self._setup_writer(db)
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            raise self._write_error(e, "create the store") from None
        try:
            with self._transaction(db, "create the store"):
                config = self._fill_schema(db, wanted)
        finally:
            db.close()
        self._index_records = True
        return config

    def _open_existing(self, wanted: dict[str, str | None]) -> dict[str, str]:
        """Read the config of an existing store; fill in what an older store lacks only if it can be written."""
        with self._read() as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            config = dict(db.execute("SELECT key, value FROM config").fetchall()) if "config" in tables else {}
        self._check_config(config, wanted)
        complete = set(_TABLES) <= tables and {"sketch_dim", "sketch_seed", "layers", "removals"} <= set(config)
        self._index_records = "index_files" in tables
        if complete:
            return config
        try:
            with self._write("bring the store's schema up to date") as db:
                config = self._fill_schema(db, wanted)
        except StoreError:
            if {"config", "entries", "tags"} <= tables and {"sketch_dim", "sketch_seed", "layers"} <= set(config):
                return config  # a read-only copy of an older store: readable, without index-cache records
            raise
        self._index_records = True
        return config

    # ---- database plumbing -------------------------------------------------------------------------------
    def _open_db(self, mode: str) -> sqlite3.Connection:
        """A connection in SQLite URI ``mode`` (``rw``, ``ro``) or ``immutable`` (no locks, no lock files)."""
        query = "immutable=1" if mode == "immutable" else f"mode={mode}"
        db = sqlite3.connect(f"{self._db_uri}?{query}", uri=True, timeout=self.timeout, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _setup_writer(self, db: sqlite3.Connection) -> None:
        db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"store database {self.path} could not switch to WAL mode (got {mode})")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = FULL")

    def _read_only_reason(self) -> str | None:
        """Why this process cannot write the store, if the file system or the permissions say so."""
        try:
            if os.statvfs(self.path).f_flag & os.ST_RDONLY:
                return "its file system is mounted read-only"
        except OSError:
            pass
        for p in (self.path, self._db_file):
            if p.exists() and not os.access(p, os.W_OK):
                return f"{p} is not writable by this user (uid {os.geteuid()})"
        return None

    @property
    def read_only(self) -> str | None:
        """Why this process cannot write the store (read-only file system, no write permission), or None."""
        return self._read_only_reason()

    def _free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _write_error(self, e: BaseException, what: str) -> StoreError:
        """One line saying why a write (``what``) failed: read-only store, full disk, lock timeout or else."""
        if isinstance(e, StoreError):
            return e
        code = getattr(e, "sqlite_errorname", "") or ""
        reason = self._read_only_reason()
        if reason is None and code.startswith("SQLITE_READONLY"):
            reason = str(e)
        if reason is not None:
            msg, cause = f"store {self.path} is read-only ({reason}): cannot {what}; nothing was changed", "read-only"
        else:
            free = self._free_bytes()
            full = code == "SQLITE_FULL" or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
            if full or (code.startswith("SQLITE_IOERR") and free is not None and free < 2**20):
                msg = f"store {self.path}: no space left on its disk ({free} bytes free): cannot {what}"
                cause = "disk full"
            elif code.startswith("SQLITE_BUSY") or "locked" in str(e):
                msg = (
                    f"store {self.path} is busy: another process held its write lock for more than "
                    f"{self.timeout:g} s; cannot {what}"
                )
                cause = "busy"
            elif code.startswith("SQLITE_IOERR"):
                msg = f"store {self.path}: the disk refused a write ({e}; full, or a file-size limit?): cannot {what}"
                cause = "disk full"
            else:
                msg, cause = f"store {self.path}: cannot {what}: database error: {e}", "database"
            msg += "; nothing was changed"
        err = StoreError(msg)
        err.cause = cause  # for callers that can do without writing (check without repair)
        return err

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = self._db_file.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _connect_read(self) -> tuple[sqlite3.Connection, tuple | None]:
        """A connection inside a read transaction, and the database file's identity when that read takes no lock.

        Tried in order: a normal connection; a read-only one (works on a read-only store whose lock files exist);
        an ``immutable`` one, which needs no lock files (a read-only store nobody has open, a full disk) but takes
        no lock either: it is used only when no write-ahead log holds changes, and :meth:`_read` then checks that
        the file did not change while it was read.
        """
        failures: list[sqlite3.Error] = []
        for mode in ("rw", "ro"):
            db = None
            try:
                db = self._open_db(mode)
                db.execute("BEGIN")
                db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # maps the lock files now, or fails
                return db, None
            except sqlite3.Error as e:
                if db is not None:
                    db.close()
                code = getattr(e, "sqlite_errorname", "") or ""
                if not code.startswith(_UNWRITABLE):
                    raise StoreError(f"store {self.path}: cannot read its database: {e}") from None
                failures.append(e)
        wal = self._db_file.with_name(self._db_file.name + "-wal")
        with contextlib.suppress(FileNotFoundError):
            if wal.stat().st_size > 0:
                raise StoreError(
                    f"store {self.path} cannot be read here: its lock files cannot be created "
                    f"({failures[-1]}) and its write-ahead log holds changes only a writer can replay; open it once "
                    "where it can be written (or free some disk space)"
                )
        before = self._identity()
        db = None
        try:
            db = self._open_db("immutable")
            db.execute("BEGIN")
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            raise StoreError(f"store {self.path}: cannot read its database: {e}") from None
        return db, before

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs (works on read-only stores and full disks too)."""
        db, before = self._connect_read()
        try:
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: database error: {e}") from None
        finally:
            db.close()
        if before is not None and self._identity() != before:
            raise StoreError(
                f"store {self.path} was written by another process while this one read it without a lock (it "
                "cannot take one here: read-only or full disk); run the command again"
            )

    @contextlib.contextmanager
    def _session(self, what: str) -> Iterator[sqlite3.Connection]:
        """A connection able to write, opened (lock files in place) but outside any transaction.

        Opened before anything is written, so a read-only store or a full disk fails here with nothing changed;
        kept open for the clean-up after a failed transaction, which then needs no new lock files (on a full disk,
        a new connection could not be opened to remove the blob a failed add wrote).
        """
        if self._read_only_reason() is not None:  # SQLite would open such a file read-only without a word
            raise self._write_error(PermissionError(errno.EACCES, "not writable"), what)
        db = None
        try:
            db = self._open_db("rw")
            self._setup_writer(db)
        except (sqlite3.Error, StoreError) as e:
            if db is not None:
                db.close()
            raise self._write_error(e, what) from None
        try:
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self, db: sqlite3.Connection, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction on ``db`` holding the store's write lock; rolled back on any error."""
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._write_error(e, what) from None
        try:
            yield db
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already (e.g. disk full)
                db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise self._write_error(e, what) from None
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise self._write_error(e, what) from None

    @contextlib.contextmanager
    def _write(self, what: str = "write to it") -> Iterator[sqlite3.Connection]:
        """One write transaction on a new connection; rolled back on any error."""
        with self._session(what) as db, self._transaction(db, what):
            yield db

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
        """The row of an entry by name, or by id (an int, or a string of digits that is no entry's name).

        Names made only of digits are refused when adding, so a string of digits is an id; a store written before
        that rule may hold such a name, and then a string that is both a name and another entry's id is refused
        as ambiguous rather than silently meaning one of them.
        """
        if isinstance(name_or_id, bool) or not isinstance(name_or_id, str | int):
            raise StoreError(f"entries are named by a name (str) or an id (int), got {type(name_or_id).__name__}")
        by_name = by_id = None
        if isinstance(name_or_id, str):
            by_name = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE name = ?", (name_or_id,)).fetchone()
        digits = isinstance(name_or_id, int) or (name_or_id.isascii() and name_or_id.isdigit())
        if digits and int(name_or_id) < 2**63:
            by_id = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (int(name_or_id),)).fetchone()
        if by_name is not None and by_id is not None and by_name[0] != by_id[0]:
            raise StoreError(
                f"{name_or_id!r} is ambiguous in store {self.path}: it is the name of entry {by_name[0]} and the id "
                f"of entry {by_id[1]!r}; rename the entry called {name_or_id!r}"
            )
        row = by_name if by_name is not None else by_id
        if row is None:
            raise StoreError(f"no entry named {name_or_id!r} in store {self.path}")
        return row

    def _write_blob(self, blob: str, data: bytes) -> bool:
        """Write a blob unless it exists; True when this call created it."""
        p = self._blob_path(blob)
        if p.exists():
            return False
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._write_error(e, "write a state file") from None
        try:
            atomic_write(p, data)
        except StateFileError as e:
            raise StoreError(f"store {self.path}: {e}") from None
        return True

    def _collect(self, blobs: Sequence[str], db: sqlite3.Connection | None = None) -> None:
        """Delete the blobs no row refers to; under the write lock, so no concurrent add can be using them.

        ``db``: an open connection (see :meth:`_session`) to take the lock on, instead of a new one.
        """
        if not blobs:
            return
        with contextlib.ExitStack() as stack:
            if db is None:
                db = stack.enter_context(self._session("remove unused state files"))
            with self._transaction(db, "remove unused state files"):
                for blob in set(blobs):
                    if db.execute("SELECT 1 FROM entries WHERE blob = ? LIMIT 1", (blob,)).fetchone() is None:
                        self._blob_path(blob).unlink(missing_ok=True)

    def _collect_quietly(self, blobs: Sequence[str], db: sqlite3.Connection) -> None:
        """:meth:`_collect` while another error propagates: a failure here must not hide that error (what it
        leaves behind are orphan blobs, which ``check`` reports and repairs)."""
        with contextlib.suppress(StoreError, OSError):
            self._collect(blobs, db)

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
        _check_name(name)
        for key, value in (("task", task), ("description", description), ("prompt", prompt)):
            if value is not None and not isinstance(value, str):
                raise StoreError(f"{key} must be a string or None, got {type(value).__name__}")
        if isinstance(tags, str) or not isinstance(tags, Sequence | set | frozenset):
            raise StoreError(f"tags must be a list of strings, got {tags!r}")
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

    @contextlib.contextmanager
    def _check_snapshot(self) -> Iterator[sqlite3.Connection]:
        """What a check without repair runs under: the write lock if the store can be written (so nothing in
        flight is mistaken for debris), else a read snapshot (read-only store, full disk: no writer is in flight)."""
        with contextlib.ExitStack() as stack:
            try:
                db = stack.enter_context(self._write("check"))
            except StoreError as e:
                if getattr(e, "cause", None) not in ("read-only", "disk full"):
                    raise
                db = stack.enter_context(self._read())
            yield db

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
        what = f"add {name!r}"
        with self._session(what) as db:
            self._write_blob(blob, data)
            try:
                with self._transaction(db, what):
                    new_id = self._insert(db, row, data)
                    entry = self._entry(db, self._find(db, new_id))
            except BaseException:
                self._collect_quietly([blob], db)
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
        what = f"add {len(specs)} entries"
        # the connection is opened before the first blob is written and kept for the clean-up (see add)
        with self._session(what) as session:
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
                with self._transaction(session, what) as db:
                    for i, (spec, row) in enumerate(zip(specs, rows, strict=True)):
                        data = None
                        if not self._blob_path(row["blob"]).exists():  # collected by a concurrent repair: rewrite
                            data, _ = encode_state(spec.state.detach(), prompt=spec.prompt)
                        try:
                            new_id = self._insert(db, row, data)
                        except StoreError as e:
                            raise StoreError(f"item {i} ({spec.name!r}): {e}") from None
                        added.append(self._entry(db, self._find(db, new_id)))
            except BaseException:
                self._collect_quietly(written, session)
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
        try:
            _check_name(item.name)
        except StoreError as e:
            raise StoreError(f"{label}: {e}") from None
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
                hint = getattr(model, "fingerprint_hint", None)
                raise StateMismatchError(
                    f"entry {row[1]!r} was made by model {state.fingerprint}, "
                    f"but this model's fingerprint is {model.fingerprint}"
                    + (hint(state.fingerprint) if callable(hint) else "")
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
        return self.remove_many([name_or_id])[0]

    def remove_many(self, names_or_ids: Sequence[str | int]) -> list[Entry]:
        """Delete several entries in one transaction: all of them or, if any is missing, none.

        Returns the removed entries in the order given (an entry named twice is removed once). Blobs no other entry
        shares are deleted after the commit, under the write lock.
        """
        if isinstance(names_or_ids, str | int):
            raise StoreError("remove_many takes a list of names or ids; for one entry use remove")
        names_or_ids = list(names_or_ids)
        if not names_or_ids:
            raise StoreError("remove_many needs at least one name or id")
        what = "remove " + ", ".join(repr(n) for n in names_or_ids[:5]) + (" ..." if len(names_or_ids) > 5 else "")
        with self._session(what) as session:
            with self._transaction(session, what) as db:
                entries: dict[int, Entry] = {}
                for n in names_or_ids:
                    try:
                        row = self._find(db, n)
                    except StoreError as e:
                        raise StoreError(f"{e}; nothing was removed") from None
                    entries.setdefault(row[0], self._entry(db, row))
                db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in entries])
                db.execute("UPDATE config SET value = CAST(value AS INTEGER) + 1 WHERE key = 'removals'")
            # the entries are gone; a failure to delete their blobs now only leaves orphans for `check`
            self._collect_quietly([e.blob for e in entries.values()], session)
        return list(entries.values())

    # ---- integrity ---------------------------------------------------------------------------------------
    def check(self, repair: bool = False, verify: bool = True) -> CheckReport:
        """Look for orphan blobs, entries whose blob is missing or corrupt, and temporary files of dead writers.

        Index caches are checked against their records (size, SHA-256): one that does not match is a problem
        (``bad_indexes``); one of an older removal count or without a record is stale (not a problem).

        With ``repair``: delete orphan blobs and dead writers' temporary files, drop entries whose state is lost
        (missing or corrupt blob; they are listed in ``dropped_entries``), drop stale index caches and rebuild bad
        ones (``rebuilt_indexes``). Runs under the write lock, so concurrent writers wait and nothing in flight is
        mistaken for debris. ``verify`` reads and verifies every blob (slower); without it only their presence is
        checked. Without ``repair`` a read-only store can be checked too.
        """
        report = CheckReport(repaired=repair)
        with self._write("check --repair") if repair else self._check_snapshot() as db:
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
            rebuild = self._check_indexes(db, report, repair)
        if repair:
            self._indexes.clear()
            self._feature_cache.clear()
            for kind, fp in rebuild:
                with contextlib.suppress(StoreError):  # e.g. the index's package is not installed: left deleted
                    self._synced_index(fp, kind)
                    report.rebuilt_indexes.append(f"{kind}-{_fp_tag(fp)}")
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

        The archive is read whole and checked before anything is written: a readable tar holding only
        ``manifest.json`` and ``blobs/<sha256>.safetensors`` members (each once), a manifest of the right format and
        version whose entries have fields of the right types, and every blob verified (checksum, layout, name).
        An entry whose name already exists with the same state is skipped; with a different state it is an error.
        Any failure is a ``StoreError`` and leaves the store as it was.
        """
        archive = Path(archive_path)
        files = _read_archive(archive)
        try:
            manifest = json.loads(files.pop("manifest.json"))
        except KeyError:
            raise StoreError(f"archive {archive} has no manifest.json") from None
        except (ValueError, RecursionError) as e:
            raise StoreError(f"archive {archive}: manifest.json is not JSON ({type(e).__name__}: {e})") from None
        if not isinstance(manifest, dict):
            raise StoreError(f"archive {archive}: manifest.json must be a JSON object, got {type(manifest).__name__}")
        if manifest.get("format") != ARCHIVE_FORMAT or manifest.get("version") != ARCHIVE_VERSION:
            raise StoreError(
                f"archive {archive} is not a statelab store archive version {ARCHIVE_VERSION} "
                f"(format {str(manifest.get('format'))[:40]!r}, version {str(manifest.get('version'))[:20]!r})"
            )
        items = manifest.get("entries", [])
        if not isinstance(items, list):
            raise StoreError(f"archive {archive}: manifest 'entries' must be a list, got {type(items).__name__}")
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
        for i, e in enumerate(items):
            where = f"archive {archive}: entry {i}"
            if not isinstance(e, dict):
                raise StoreError(f"{where} must be a JSON object, got {type(e).__name__}")
            blob = e.get("blob")
            if not isinstance(blob, str) or blob not in states:
                raise StoreError(f"{where} ({str(e.get('name'))[:40]!r}) refers to a blob the archive does not hold")
            if e.get("name") in seen:
                raise StoreError(f"{where}: name {e.get('name')!r} appears twice")
            created = e.get("created")
            if created is not None and not isinstance(created, str):
                raise StoreError(f"{where}: 'created' must be a string, got {type(created).__name__}")
            try:
                data, blob2, row = self._prepare(
                    states[blob], e.get("name"), e.get("task"), e.get("tags", ()), e.get("description"),
                    e.get("prompt"), e.get("shots"),
                )  # fmt: skip
            except StoreError as err:
                raise StoreError(f"{where}: {err}") from None
            seen.add(e.get("name"))
            row["created"] = created or row["created"]
            prepared.append((data, blob2, row))
        added: list[Entry] = []
        what = f"import {archive}"
        with self._session(what) as session:  # opened before any blob is written: see add
            try:
                for data, blob, _ in prepared:
                    self._write_blob(blob, data)
                with self._transaction(session, what) as db:
                    for data, blob, row in prepared:
                        old = db.execute("SELECT blob FROM entries WHERE name = ?", (row["name"],)).fetchone()
                        if old is not None:
                            if old[0] == blob:
                                continue
                            raise StoreError(
                                f"cannot import {row['name']!r}: this store already has a different state of that "
                                "name; nothing was imported"
                            )
                        new_id = self._insert(db, row, data)
                        added.append(self._entry(db, self._find(db, new_id)))
            except BaseException:
                self._collect_quietly([b for _, b, _ in prepared], session)
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
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise StoreError(f"k must be an int >= 1, got {k!r}")
        if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 0:
            raise StoreError(f"rerank must be an int >= 0, got {rerank!r}")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold)
        ):
            raise StoreError(f"threshold must be a finite number (a cosine) or None, got {threshold!r}")
        if task is not None and not isinstance(task, str):
            raise StoreError(f"task must be a string or None, got {type(task).__name__}")
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
    # A cache file is index/<kind>-<model tag>-r<removals>-m<max id>-<sha256[:12]>.idx. Its row in ``index_files``
    # records its size, SHA-256, the removal count it was built at and the entries it covers (fingerprint, ids up
    # to max_id, how many); the bytes are verified against that row before FAISS or usearch see them.
    def _index_kind(self) -> str:
        return "exact" if self.index_kind == "sketch" else self.index_kind

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, StatelabWarning, stacklevel=4)

    def _synced_index(self, fp: str, kind: str | None = None) -> VectorIndex:
        """The vector index of model ``fp``'s sketches, brought up to date with the database.

        New rows are appended to the cached index; after any removal the index is rebuilt (HNSW graphs do not
        delete well). Non-exact indexes are also cached on disk (see above), verified before they are read.
        """
        kind = kind or self._index_kind()
        with self._read() as db:
            removals = int(db.execute("SELECT value FROM config WHERE key = 'removals'").fetchone()[0])
            max_id = db.execute("SELECT COALESCE(MAX(id), 0) FROM entries WHERE fingerprint = ?", (fp,)).fetchone()[0]
        cached = self._indexes.get(fp) if kind == self._index_kind() else None
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
        if kind == self._index_kind():
            self._indexes[fp] = (index, max_id, removals)
        if changed and kind != "exact":
            self._save_index_file(kind, fp, index, removals, max_id)
        return index

    def _load_index_file(self, kind: str, fp: str, removals: int, max_id: int):
        """The newest recorded cache of (kind, model) for this removal count, verified; None if there is none or
        it does not match its record (then with one warning, and the caller rebuilds it)."""
        if kind == "exact" or not self._index_records:
            return None
        with self._read() as db:
            rec = db.execute(
                "SELECT file, max_id, count, nbytes, sha256 FROM index_files WHERE kind = ? AND fingerprint = ? "
                "AND removals = ? AND max_id <= ? ORDER BY max_id DESC LIMIT 1",
                (kind, fp, removals, max_id),
            ).fetchone()
            if rec is None:
                return None
            file, rec_max, rec_count, nbytes, sha = rec
            count = db.execute(
                "SELECT COUNT(*) FROM entries WHERE fingerprint = ? AND id <= ?", (fp, rec_max)
            ).fetchone()[0]
        problem = None
        try:
            data = (self.path / "index" / file).read_bytes()
        except OSError as e:
            problem = f"cannot be read ({e.strerror or e})"
        else:
            if len(data) != nbytes:
                problem = f"has {len(data)} bytes where {nbytes} were recorded"
            elif hashlib.sha256(data).hexdigest() != sha:
                problem = "does not match its recorded SHA-256 (the file was changed or damaged)"
            elif rec_count != count:
                problem = f"covers {rec_count} entries, the store holds {count} in its range"
        index = None
        if problem is None:
            try:
                index = index_from_bytes(kind, data, self.sketch_dim)
            except (RuntimeError, ValueError) as e:  # verified bytes that still do not parse
                problem = f"cannot be parsed ({e})"
        if problem is None and len(index) != count:
            problem = f"holds {len(index)} vectors, the store {count} entries in its range"
        if problem is not None:
            self._warn_once(file, f"index cache {file} of store {self.path} {problem}; rebuilding it from the database")
            return None
        return index, rec_max, removals

    def _save_index_file(self, kind: str, fp: str, index: VectorIndex, removals: int, max_id: int) -> None:
        """Write the cache file and its record; a store that cannot be written just keeps no cache."""
        if not self._index_records:
            return
        directory = self.path / "index"
        tmp = directory / f"{TMP_PREFIX}{os.getpid()}-{time.monotonic_ns()}-{kind}.idx"
        try:
            directory.mkdir(exist_ok=True)
            index.save(tmp)
            data = tmp.read_bytes()
        except (OSError, RuntimeError):
            tmp.unlink(missing_ok=True)  # the cache is an optimisation: a failed save only costs a rebuild
            return
        sha = hashlib.sha256(data).hexdigest()
        name = f"{kind}-{_fp_tag(fp)}-r{removals}-m{max_id}-{sha[:12]}.idx"
        old: list[tuple[str]] = []
        renamed = False
        try:
            with self._session("save an index cache") as session:
                # a cache is worth a short wait for the lock only: a search must not queue behind a long write
                session.execute("PRAGMA busy_timeout = 200")
                with self._transaction(session, "save an index cache") as db:
                    os.replace(tmp, directory / name)  # under the lock, so `check` never sees it half-recorded
                    renamed = True
                    db.execute(
                        "INSERT OR REPLACE INTO index_files (file, kind, fingerprint, removals, max_id, count, nbytes, "
                        "sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, kind, fp, removals, max_id, len(index), len(data), sha),
                    )
                    old = db.execute(
                        "SELECT file FROM index_files WHERE kind = ? AND fingerprint = ? AND file != ? "
                        "AND (removals != ? OR max_id <= ?)",
                        (kind, fp, name, removals, max_id),
                    ).fetchall()
                    db.executemany("DELETE FROM index_files WHERE file = ?", old)
        except (StoreError, OSError):
            tmp.unlink(missing_ok=True)
            if renamed:  # renamed but not recorded: unusable, unless an identical file was recorded before
                with contextlib.suppress(StoreError), self._read() as db:
                    if db.execute("SELECT 1 FROM index_files WHERE file = ?", (name,)).fetchone() is None:
                        (directory / name).unlink(missing_ok=True)
            return
        for (f,) in old:
            (directory / f).unlink(missing_ok=True)

    def _check_indexes(self, db: sqlite3.Connection, report: CheckReport, repair: bool) -> list[tuple[str, str]]:
        """The index-cache part of :meth:`check` (under its write lock); the (kind, model) caches to rebuild."""
        removals = int(db.execute("SELECT value FROM config WHERE key = 'removals'").fetchone()[0])
        records = {}
        if self._index_records:
            rows = db.execute("SELECT file, kind, fingerprint, removals, nbytes, sha256 FROM index_files").fetchall()
            records = {r[0]: r for r in rows}
        rebuild: list[tuple[str, str]] = []
        directory = self.path / "index"
        on_disk = sorted(directory.iterdir()) if directory.is_dir() else []
        for p in on_disk:
            if p.name.startswith(TMP_PREFIX):
                owner = _temp_owner(p.name)
                if owner is not None and owner != os.getpid() and _pid_alive(owner):
                    continue  # a live searcher is writing it
                stale = True
            else:
                rec = records.get(p.name)
                stale = rec is None or rec[3] != removals  # unrecorded (older statelab, interrupted save) or old
            if stale:
                report.stale_indexes.append(p.name)
                if repair:
                    p.unlink(missing_ok=True)
                    db.execute("DELETE FROM index_files WHERE file = ?", (p.name,))
                continue
            try:
                data = p.read_bytes()
                good = len(data) == rec[4] and hashlib.sha256(data).hexdigest() == rec[5]
            except OSError:
                good = False
            if not good:
                report.bad_indexes.append(p.name)
                if repair:
                    p.unlink(missing_ok=True)
                    db.execute("DELETE FROM index_files WHERE file = ?", (p.name,))
                    rebuild.append((rec[1], rec[2]))
        if repair:
            present = {p.name for p in on_disk}
            db.executemany("DELETE FROM index_files WHERE file = ?", [(f,) for f in records if f not in present])
        return rebuild

    def __repr__(self) -> str:
        return f"StateStore({str(self.path)!r}, index={self.index_kind!r}, sketch_dim={self.sketch_dim})"


def _check_name(name: object) -> None:
    """Refuse a name that is not a non-empty string, or that reads as an id (only digits)."""
    if not isinstance(name, str) or not name.strip():
        raise StoreError(f"an entry needs a non-empty name, got {name!r}")
    if name.isascii() and name.isdigit():
        raise StoreError(
            f"entry name {name!r} is only digits, which commands read as an entry id; use a name with a letter"
        )


def _fp_tag(fingerprint: str) -> str:
    """16 hex digits naming a model in index file names (fingerprints are free-form strings)."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def _read_archive(archive: Path) -> dict[str, bytes]:
    """The members of a store archive by name, or a ``StoreError``: unreadable or truncated tar, a member that is
    not ``manifest.json`` or ``blobs/<sha256>.safetensors`` (links, directories, other paths), a member twice."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar:
                ok = member.isfile() and (
                    member.name == "manifest.json"
                    or re.fullmatch(r"blobs/[0-9a-f]{64}\.safetensors", member.name) is not None
                )
                if not ok:
                    raise StoreError(f"archive {archive}: unexpected member {member.name[:100]!r}")
                if member.name in files:
                    raise StoreError(f"archive {archive}: member {member.name!r} appears twice")
                f = tar.extractfile(member)
                if f is None:
                    raise StoreError(f"archive {archive}: unreadable member {member.name!r}")
                files[member.name] = f.read()
    except FileNotFoundError:
        raise StoreError(f"cannot read archive {archive}: it does not exist") from None
    except IsADirectoryError:
        raise StoreError(f"cannot read archive {archive}: it is a directory") from None
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise StoreError(f"cannot read archive {archive}: it is truncated or not a tar archive ({e})") from None
    return files


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, _io.BytesIO(data))
