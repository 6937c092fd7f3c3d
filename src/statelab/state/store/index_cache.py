"""Vector indexes over the stored sketches, kept in memory and cached on disk, always rebuilt from the database.

A cache file is ``index/<kind>-<model tag>-r<removals>-m<max id>-<sha256[:12]>.idx``. Its row in ``index_files``
records its size, SHA-256, the removal count it was built at and the entries it covers (fingerprint, ids up to
``max_id``, how many); the bytes are verified against that row before FAISS or usearch parse them, and a cache
that does not match is rebuilt from the database (with one warning). New entries are appended to an index; after
any removal it is rebuilt (HNSW graphs do not delete well).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from statelab.errors import StatelabWarning, StoreError
from statelab.state.io import TMP_PREFIX
from statelab.state.search import VectorIndex, index_from_bytes, make_index
from statelab.state.store.blobs import temp_file_owner_alive
from statelab.state.store.db import IN_CHUNK, StoreDB, scalar
from statelab.state.store.schema import removals

__all__ = ["IndexCache", "IndexCheck", "model_tag", "read_sketches"]


def model_tag(fingerprint: str) -> str:
    """16 hex digits naming a model in index file names (fingerprints are free-form strings)."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def read_sketches(db: sqlite3.Connection, ids: Sequence[int], dim: int) -> torch.Tensor:
    """The stored sketches ``[len(ids), dim]`` of entries ``ids``, in that order."""
    got: list[sqlite3.Row] = []
    for start in range(0, len(ids), IN_CHUNK):
        chunk = list(ids[start : start + IN_CHUNK])
        marks = ",".join("?" * len(chunk))
        got += db.execute(f"SELECT id, sketch FROM entries WHERE id IN ({marks})", chunk).fetchall()
    order = {i: n for n, i in enumerate(ids)}
    got.sort(key=lambda r: order[r["id"]])
    vecs = np.frombuffer(b"".join(r["sketch"] for r in got), dtype="<f4").reshape(len(got), dim)
    return torch.from_numpy(vecs.copy())


def _record_mismatch(data: bytes, record: sqlite3.Row) -> str | None:
    """Why a cache file's bytes do not match their record (size, SHA-256), or None when they do."""
    if len(data) != record["nbytes"]:
        return f"has {len(data)} bytes where {record['nbytes']} were recorded"
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        return "does not match its recorded SHA-256 (the file was changed or damaged)"
    return None


@dataclass
class IndexCheck:
    """The index-cache part of a store check: stale and bad cache files, and the (kind, fingerprint) indexes
    to rebuild after a repair."""

    stale: list[str]
    bad: list[str]
    rebuild: list[tuple[str, str]]


@dataclass
class _Synced:
    index: VectorIndex
    max_id: int  # the index holds the model's entries with ids up to this
    removals: int  # the store's removal count when it was built


class IndexCache:
    """The vector indexes of one store.

    Args:
        store_db: the store's database.
        kind: the store's index kind for sketches (``"exact"``: brute force over the sketches, not cached on
            disk; ``"faiss"``, ``"faiss-ivf"``, ``"usearch"``).
        sketch_dim: the dimension of the stored sketches.
        records: whether the database has the ``index_files`` table (an older read-only store may not; then
            nothing is cached on disk).
    """

    def __init__(self, store_db: StoreDB, kind: str, sketch_dim: int, records: bool) -> None:
        self._db = store_db
        self.kind = kind
        self.sketch_dim = sketch_dim
        self.records = records
        self.directory = store_db.path / "index"
        self._synced: dict[str, _Synced] = {}
        self._warned: set[str] = set()

    def clear(self) -> None:
        """Forget the indexes held in memory (after a repair rewrote the caches)."""
        self._synced.clear()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, StatelabWarning, stacklevel=4)

    def index(self, fp: str, kind: str | None = None) -> VectorIndex:
        """The vector index of model ``fp``'s sketches, brought up to date with the database.

        ``kind`` defaults to the store's; an index of another kind is built (or read from its cache file) but not
        kept in memory.
        """
        kind = kind or self.kind
        with self._db.read() as db:
            n_removals = removals(db)
            max_id = scalar(db, "SELECT COALESCE(MAX(id), 0) FROM entries WHERE fingerprint = ?", (fp,))
        cached = self._synced.get(fp) if kind == self.kind else None
        if cached is None or cached.removals != n_removals:
            cached = self._load_file(kind, fp, n_removals, max_id)
        if cached is None or cached.removals != n_removals:
            cached = _Synced(make_index(kind, self.sketch_dim), 0, n_removals)
        changed = False
        if max_id > cached.max_id:
            ids, vecs = self._new_sketches(fp, after=cached.max_id)
            if len(ids):
                cached.index.add(ids, vecs)
            changed = True
        if kind == self.kind:
            self._synced[fp] = _Synced(cached.index, max_id, n_removals)
        if changed and kind != "exact":
            self._save_file(kind, fp, cached.index, n_removals, max_id)
        return cached.index

    def _new_sketches(self, fp: str, after: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids ``[n]`` and sketches ``[n, sketch_dim]`` of model ``fp``'s entries with ids above ``after``."""
        with self._db.read() as db:
            got = db.execute(
                "SELECT id, sketch FROM entries WHERE fingerprint = ? AND id > ? ORDER BY id", (fp, after)
            ).fetchall()
        vecs = np.frombuffer(b"".join(r["sketch"] for r in got), dtype="<f4").reshape(len(got), self.sketch_dim)
        return np.array([r["id"] for r in got], dtype=np.int64), vecs

    def _load_file(self, kind: str, fp: str, n_removals: int, max_id: int) -> _Synced | None:
        """The newest recorded cache of (kind, model) for this removal count, verified; None if there is none or
        it does not match its record (then with one warning, and the caller rebuilds it)."""
        if kind == "exact" or not self.records:
            return None
        with self._db.read() as db:
            rec = db.execute(
                "SELECT file, max_id, count, nbytes, sha256 FROM index_files WHERE kind = ? AND fingerprint = ? "
                "AND removals = ? AND max_id <= ? ORDER BY max_id DESC LIMIT 1",
                (kind, fp, n_removals, max_id),
            ).fetchone()
            if rec is None:
                return None
            count = scalar(db, "SELECT COUNT(*) FROM entries WHERE fingerprint = ? AND id <= ?", (fp, rec["max_id"]))
        file = rec["file"]
        problem = None
        try:
            data = (self.directory / file).read_bytes()
        except OSError as e:
            problem = f"cannot be read ({e.strerror or e})"
        else:
            problem = _record_mismatch(data, rec)
            if problem is None and rec["count"] != count:
                problem = f"covers {rec['count']} entries, the store holds {count} in its range"
        index = None
        if problem is None:
            try:
                index = index_from_bytes(kind, data, self.sketch_dim)
            except (RuntimeError, ValueError) as e:  # verified bytes that still do not parse
                problem = f"cannot be parsed ({e})"
        if problem is None and len(index) != count:
            problem = f"holds {len(index)} vectors, the store {count} entries in its range"
        if problem is not None:
            self._warn_once(
                file, f"index cache {file} of store {self._db.path} {problem}; rebuilding it from the database"
            )
            return None
        return _Synced(index, rec["max_id"], n_removals)

    def _save_file(self, kind: str, fp: str, index: VectorIndex, n_removals: int, max_id: int) -> None:
        """Write the cache file and its record; a store that cannot be written just keeps no cache."""
        if not self.records:
            return
        directory = self.directory
        tmp = directory / f"{TMP_PREFIX}{os.getpid()}-{time.monotonic_ns()}-{kind}.idx"
        try:
            directory.mkdir(exist_ok=True)
            index.save(tmp)
            data = tmp.read_bytes()
        except (OSError, RuntimeError):
            tmp.unlink(missing_ok=True)  # the cache is an optimisation: a failed save only costs a rebuild
            return
        sha = hashlib.sha256(data).hexdigest()
        name = f"{kind}-{model_tag(fp)}-r{n_removals}-m{max_id}-{sha[:12]}.idx"
        old: list[str] = []
        renamed = False
        try:
            with self._db.session("save an index cache") as session:
                # a cache is worth a short wait for the lock only: a search must not queue behind a long write
                session.execute("PRAGMA busy_timeout = 200")
                with self._db.transaction(session, "save an index cache") as db:
                    os.replace(tmp, directory / name)  # under the lock, so `check` never sees it half-recorded
                    renamed = True
                    db.execute(
                        "INSERT OR REPLACE INTO index_files (file, kind, fingerprint, removals, max_id, count, nbytes, "
                        "sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, kind, fp, n_removals, max_id, len(index), len(data), sha),
                    )
                    old = [
                        r["file"]
                        for r in db.execute(
                            "SELECT file FROM index_files WHERE kind = ? AND fingerprint = ? AND file != ? "
                            "AND (removals != ? OR max_id <= ?)",
                            (kind, fp, name, n_removals, max_id),
                        )
                    ]
                    db.executemany("DELETE FROM index_files WHERE file = ?", [(f,) for f in old])
        except (StoreError, OSError):
            tmp.unlink(missing_ok=True)
            if renamed:  # renamed but not recorded: unusable, unless an identical file was recorded before
                with contextlib.suppress(StoreError), self._db.read() as db:
                    if db.execute("SELECT 1 FROM index_files WHERE file = ?", (name,)).fetchone() is None:
                        (directory / name).unlink(missing_ok=True)
            return
        for f in old:
            (directory / f).unlink(missing_ok=True)

    def check(self, db: sqlite3.Connection, repair: bool) -> IndexCheck:
        """Check the cache files against their records, through ``db`` (under the check's write lock or in its
        read snapshot); with ``repair``, delete stale and bad files and their records."""
        n_removals = removals(db)
        records: dict[str, sqlite3.Row] = {}
        if self.records:
            rows = db.execute("SELECT file, kind, fingerprint, removals, nbytes, sha256 FROM index_files")
            records = {r["file"]: r for r in rows}
        found = IndexCheck([], [], [])
        on_disk = sorted(self.directory.iterdir()) if self.directory.is_dir() else []

        def drop(p: Path) -> None:
            p.unlink(missing_ok=True)
            db.execute("DELETE FROM index_files WHERE file = ?", (p.name,))

        for p in on_disk:
            if p.name.startswith(TMP_PREFIX):
                if temp_file_owner_alive(p.name):
                    continue  # a live searcher is writing it
                stale = True
            else:
                rec = records.get(p.name)
                # unrecorded (older statelab, interrupted save) or built before the last removal
                stale = rec is None or rec["removals"] != n_removals
            if stale:
                found.stale.append(p.name)
                if repair:
                    drop(p)
                continue
            try:
                good = _record_mismatch(p.read_bytes(), rec) is None
            except OSError:
                good = False
            if not good:
                found.bad.append(p.name)
                if repair:
                    drop(p)
                    found.rebuild.append((rec["kind"], rec["fingerprint"]))
        if repair:
            present = {p.name for p in on_disk}
            db.executemany("DELETE FROM index_files WHERE file = ?", [(f,) for f in records if f not in present])
        return found
