"""The :class:`StateStore` facade: adding, reading, listing, removing, searching, checking and archiving entries.

The pieces it joins: :mod:`~statelab.state.store.db` (connections and transactions), :mod:`~.schema`
(tables and config), :mod:`~.rows` (records), :mod:`~.blobs` (state files), :mod:`~.index_cache` (vector
indexes), :mod:`~.ranking` (exact scores), :mod:`~.repair` (check) and :mod:`~.archive` (export and import).
"""

from __future__ import annotations

import functools
import math
import os
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statelab.errors import StateFileError, StateMismatchError, StoreError
from statelab.state.store.archive import ArchivedEntry, read_archive, write_archive
from statelab.state.store.blobs import Blobs
from statelab.state.store.db import IN_CHUNK, StoreDB, scalar
from statelab.state.store.repair import CheckReport, check_store
from statelab.state.store.rows import (
    ENTRY_COLUMNS,
    Entry,
    Hit,
    NewEntry,
    as_new_entry,
    check_fields,
    entry_from_row,
    find_row,
)
from statelab.state.store.schema import count_removal, create_store, open_store, wanted_config

# torch, numpy and the search modules load on the first call that handles a state (add, get, search, ...):
# opening a store and reading its rows (list, show, rm) import none of them, so `statelab store list` starts fast
if TYPE_CHECKING:
    import torch

    from statelab.state.core import State
    from statelab.state.retrieval import RetrievalChoice
    from statelab.state.search import CountSketch
    from statelab.state.store.index_cache import IndexCache
    from statelab.state.store.ranking import FeatureCache

__all__ = ["StateStore", "STORE_INDEX_KINDS"]

STORE_INDEX_KINDS = ("exact", "sketch", "faiss", "faiss-ivf", "usearch")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class StateStore:
    """A directory of named states (see :mod:`statelab.state.store`).

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
        self._db = StoreDB(self.path, self.timeout)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store path {self.path} exists and is not a directory")
        wanted = wanted_config(sketch_dim, sketch_seed, layers)
        if not self._db.file.is_file():
            if not create:
                where = "is not a state store (it has no store.db)" if self.path.is_dir() else "does not exist"
                raise StoreError(
                    f"no state store at {self.path}: the path {where}; check the path, or create a store with "
                    f"`statelab store init {self.path}` (nothing was created)"
                )
            config = create_store(self._db, wanted)
        else:
            config = open_store(self._db, wanted)
        self.sketch_dim = config.sketch_dim
        self.sketch_seed = config.sketch_seed
        self.layers: list[int] | None = config.layers
        self._blobs = Blobs(self._db)
        self._index_records = config.index_records
        self._cache_bytes = int(cache_mb) * 2**20

    @functools.cached_property
    def _sketch(self) -> CountSketch:
        from statelab.state.search import CountSketch

        return CountSketch(self.sketch_dim, self.sketch_seed)

    @functools.cached_property
    def _indexes(self) -> IndexCache:
        from statelab.state.store.index_cache import IndexCache

        # a "sketch" store scores sketches by brute force: an exact index over them, never cached on disk
        sketch_index = "exact" if self.index_kind == "sketch" else self.index_kind
        return IndexCache(self._db, sketch_index, self.sketch_dim, self._index_records)

    @functools.cached_property
    def _features(self) -> FeatureCache:
        from statelab.state.store.ranking import FeatureCache

        return FeatureCache(self._blobs, self._cache_bytes)

    @property
    def read_only(self) -> str | None:
        """Why this process cannot write the store (read-only file system, no write permission), or None."""
        return self._db.read_only_reason()

    def _layers_for(self, num_layers: int) -> list[int]:
        from statelab.state.search import resolve_layers

        return resolve_layers(self.layers, num_layers)

    # adding

    def _prepare(
        self, state: State, name: str, task: str | None, tags: Sequence[str], description: str | None,
        prompt: str | None, shots: int | None,
    ) -> tuple[bytes, dict[str, Any]]:  # fmt: skip
        """The blob bytes and the row (column values, plus ``tags``) of a new entry, after checking its fields."""
        from statelab.state.io import encode_state
        from statelab.state.search import layer_features

        tags = check_fields(state, name, task, tags, description, prompt, shots)
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
        return data, row

    def _insert(self, db: sqlite3.Connection, row: dict[str, Any], data: bytes | None) -> Entry:
        """Insert a prepared row and its tags (inside a write transaction); the new entry."""
        if db.execute("SELECT 1 FROM entries WHERE name = ?", (row["name"],)).fetchone():
            raise StoreError(f"store {self.path} already has an entry named {row['name']!r}; remove it first")
        if not self._blobs.exists(row["blob"]):  # a concurrent repair may have collected it: write it again
            if data is None:
                raise StoreError(f"blob {row['blob'][:12]} vanished before its entry was committed")
            self._blobs.write(row["blob"], data)
        cols = [c for c in row if c != "tags"]
        cur = db.execute(
            f"INSERT INTO entries ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", [row[c] for c in cols]
        )
        db.executemany("INSERT INTO tags (entry_id, tag) VALUES (?, ?)", [(cur.lastrowid, t) for t in row["tags"]])
        return entry_from_row(db, find_row(db, int(cur.lastrowid), self.path))

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
        from statelab.state.core import State

        if not isinstance(state, State):
            raise StoreError(f"add needs a statelab.State, got {type(state).__name__}")
        data, row = self._prepare(state, name, task, tags, description, prompt, shots)
        what = f"add {name!r}"
        with self._db.session(what) as db:
            self._blobs.write(row["blob"], data)
            try:
                with self._db.transaction(db, what):
                    entry = self._insert(db, row, data)
            except BaseException:
                self._blobs.collect_quietly([row["blob"]], db)
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
        specs = [as_new_entry(i, item) for i, item in enumerate(items)]
        first: dict[str, int] = {}
        for i, spec in enumerate(specs):
            if spec.name in first:
                raise StoreError(
                    f"item {i} ({spec.name!r}): item {first[spec.name]} has the same name; names must be unique"
                )
            first[spec.name] = i
        names = list(first)
        with self._db.read() as db:
            for start in range(0, len(names), IN_CHUNK):
                chunk = names[start : start + IN_CHUNK]
                taken = db.execute(
                    f"SELECT name FROM entries WHERE name IN ({','.join('?' * len(chunk))})", chunk
                ).fetchone()
                if taken is not None:
                    raise StoreError(
                        f"item {first[taken['name']]} ({taken['name']!r}): store {self.path} already has an entry "
                        "of that name; remove it first or rename the item"
                    )
        rows: list[dict[str, Any]] = []
        what = f"add {len(specs)} entries"
        # the connection is opened before the first blob is written and kept for the clean-up (see add)
        with self._db.session(what) as session:
            try:
                for i, spec in enumerate(specs):
                    try:
                        data, row = self._prepare(
                            spec.state, spec.name, spec.task, spec.tags, spec.description, spec.prompt, spec.shots
                        )
                        self._blobs.write(row["blob"], data)  # the bytes are dropped here: a batch is not held twice
                    except StoreError as e:
                        raise StoreError(f"item {i} ({spec.name!r}): {e}") from None
                    rows.append(row)
                added: list[Entry] = []
                with self._db.transaction(session, what) as db:
                    for i, (spec, row) in enumerate(zip(specs, rows, strict=True)):
                        data = None
                        if not self._blobs.exists(row["blob"]):  # collected by a concurrent repair: rewrite
                            from statelab.state.io import encode_state

                            data, _ = encode_state(spec.state.detach(), prompt=spec.prompt)
                        try:
                            added.append(self._insert(db, row, data))
                        except StoreError as e:
                            raise StoreError(f"item {i} ({spec.name!r}): {e}") from None
            except BaseException:
                self._blobs.collect_quietly([row["blob"] for row in rows], session)
                raise
        return added

    # reading

    def entry(self, name_or_id: str | int) -> Entry:
        """The metadata of one entry, by name or id."""
        with self._db.read() as db:
            return entry_from_row(db, find_row(db, name_or_id, self.path))

    def get(self, name_or_id: str | int, model: Any = None, *, device: torch.device | str | None = None) -> State:
        """The stored state, verified; with ``model``, refused (``StateMismatchError``) unless made by it."""
        with self._db.read() as db:
            row = find_row(db, name_or_id, self.path)
        state = self._blobs.load(row["blob"], repr(row["name"]))
        if model is not None:
            if state.fingerprint != model.fingerprint:
                hint = getattr(model, "fingerprint_hint", None)
                raise StateMismatchError(
                    f"entry {row['name']!r} was made by model {state.fingerprint}, "
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
        condition = " WHERE " + " AND ".join(where) if where else ""
        sql = f"SELECT {ENTRY_COLUMNS} FROM entries{condition} ORDER BY id"
        with self._db.read() as db:
            return [entry_from_row(db, r) for r in db.execute(sql, args).fetchall()]

    def __len__(self) -> int:
        with self._db.read() as db:
            return int(scalar(db, "SELECT COUNT(*) FROM entries"))

    def __contains__(self, name_or_id: object) -> bool:
        try:
            self.entry(name_or_id)  # type: ignore[arg-type]
        except StoreError:
            return False
        return True

    # removing

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
        with self._db.session(what) as session:
            with self._db.transaction(session, what) as db:
                entries: dict[int, Entry] = {}
                for n in names_or_ids:
                    try:
                        row = find_row(db, n, self.path)
                    except StoreError as e:
                        raise StoreError(f"{e}; nothing was removed") from None
                    entries.setdefault(row["id"], entry_from_row(db, row))
                db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in entries])
                count_removal(db)
            # the entries are gone; a failure to delete their blobs now only leaves orphans for `check`
            self._blobs.collect_quietly([e.blob for e in entries.values()], session)
        return list(entries.values())

    # integrity

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
        report = check_store(self._db, self._blobs, self._indexes, repair, verify)
        if repair:  # entries may have been dropped and caches rebuilt
            self._features.clear()
        return report

    # archives

    def export(self, archive_path: str | os.PathLike, names: Sequence[str] | None = None) -> int:
        """Write entries (all, or ``names``) to one tar archive: ``manifest.json`` plus their blobs.

        The archive is written atomically. Returns the number of entries exported.
        """
        with self._db.read() as db:
            if names is None:
                rows = db.execute(f"SELECT {ENTRY_COLUMNS} FROM entries ORDER BY id").fetchall()
            else:
                rows = [find_row(db, n, self.path) for n in names]
            entries = [entry_from_row(db, r) for r in rows]
        blobs: dict[str, bytes] = {}
        for blob in sorted({e.blob for e in entries}):
            try:
                data = self._blobs.path(blob).read_bytes()
            except FileNotFoundError:
                raise StoreError(
                    f"cannot export: blob {blob[:12]} is missing; run `statelab store check --repair`"
                ) from None
            self._blobs.decode(data, blob, blob[:12])
            blobs[blob] = data
        write_archive(Path(archive_path), entries, blobs, _now())
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

        def prepare(e: ArchivedEntry) -> tuple[bytes, dict[str, Any]]:
            data, row = self._prepare(e.state, e.name, e.task, e.tags, e.description, e.prompt, e.shots)
            row["created"] = e.created or row["created"]
            return data, row

        prepared = read_archive(archive, prepare)
        added: list[Entry] = []
        what = f"import {archive}"
        with self._db.session(what) as session:  # opened before any blob is written: see add
            try:
                for data, row in prepared:
                    self._blobs.write(row["blob"], data)
                with self._db.transaction(session, what) as db:
                    for data, row in prepared:
                        old = db.execute("SELECT blob FROM entries WHERE name = ?", (row["name"],)).fetchone()
                        if old is not None:
                            if old["blob"] == row["blob"]:
                                continue
                            raise StoreError(
                                f"cannot import {row['name']!r}: this store already has a different state of that "
                                "name; nothing was imported"
                            )
                        added.append(self._insert(db, row, data))
            except BaseException:
                self._blobs.collect_quietly([row["blob"] for _, row in prepared], session)
                raise
        return added

    # search

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
                Layers other than the store's are always searched exactly on the raw states. Without ``layers``,
                an exact store uses the query model's recorded retrieval choice when it has one
                (:meth:`set_retrieval`: layers and feature chosen by validation, ``statelab.state.retrieval``).
            threshold: drop hits scoring below it; an empty list means "no match".
            rerank: with a sketch-based index, re-score this many sketch candidates on the raw states, so the
                scores (and order) of the returned hits are exact cosines. 0 keeps sketch scores.
            task: only entries of this task.

        Raises ``StoreError`` for an empty store or a store holding no entry of the query's model.
        """
        from statelab.state.core import State
        from statelab.state.store.ranking import with_prompts

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
        with self._db.read() as db:
            hits = self._rank(db, query_state, k, layers, threshold, rerank, task)
            return with_prompts(db, hits)

    def _rank(
        self, db: sqlite3.Connection, query_state: State, k: int, layers: Sequence[int] | None,
        threshold: float | None, rerank: int, task: str | None,
    ) -> list[Hit]:  # fmt: skip
        """The hits of :meth:`search` (without prompts), candidates read through ``db``."""
        import torch

        from statelab.state.retrieval import load_choice
        from statelab.state.search import layer_features, resolve_layers
        from statelab.state.store.index_cache import read_sketches
        from statelab.state.store.ranking import exact_hits

        fp = query_state.fingerprint
        total = scalar(db, "SELECT COUNT(*) FROM entries")
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
        choice = load_choice(db, fp) if layers is None and self.index_kind == "exact" else None
        if choice is not None:  # the model's recorded retrieval choice (statelab.state.retrieval)
            q = choice.vectors(query_state)[0]
            scores = [float(torch.dot(q, self._choice_vector(r["blob"], choice, repr(r["name"])))) for r in rows]
            order = sorted(range(len(rows)), key=lambda i: -scores[i])[:k]
            hits = [Hit(rows[i]["name"], rows[i]["id"], scores[i], rows[i]["task"]) for i in order]
        elif self.index_kind == "exact" or use_layers != store_layers:
            hits = exact_hits(query_state, rows, use_layers, k, self._features)
        else:
            want = max(k, rerank)
            q = self._sketch(layer_features(query_state, use_layers))
            info = {r["id"]: r for r in rows}
            if task is None:
                scores, ids = self._indexes.index(fp).search(q.numpy(), want)
                pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if int(i) in info]
            else:
                vecs = read_sketches(db, [r["id"] for r in rows], self.sketch_dim)
                s = (vecs @ q[0]).tolist()
                pairs = sorted(zip(s, [r["id"] for r in rows], strict=True), reverse=True)[:want]
            if rerank:
                hits = exact_hits(query_state, [info[i] for _, i in pairs], use_layers, k, self._features)
            else:
                hits = [Hit(info[i]["name"], i, s, info[i]["task"]) for s, i in pairs[:k]]
        if threshold is not None:
            hits = [h for h in hits if h.score >= threshold]
        return hits

    def _choice_vector(self, blob: str, choice: RetrievalChoice, label: str) -> torch.Tensor:
        """A blob's retrieval vector ``[F]`` under ``choice`` (cached like the raw features)."""
        return self._features.cached(
            blob, ("retrieval", choice.digest), lambda: choice.vectors(self._blobs.load(blob, label))[0]
        )

    # per-model retrieval choice (statelab.state.retrieval)

    def set_retrieval(self, choice: RetrievalChoice) -> None:
        """Record how states of ``choice.fingerprint`` are compared: exact searches of that model's queries without
        ``layers=`` then use its layers and feature (replaces an earlier choice for that model)."""
        from statelab.state.retrieval import save_choice

        with self._db.write("record a retrieval choice") as db:
            save_choice(db, choice)

    def retrieval(self, fingerprint: str) -> RetrievalChoice | None:
        """The recorded retrieval choice of model ``fingerprint``, or ``None`` (search then compares raw states
        of the store's layers)."""
        from statelab.state.retrieval import load_choice

        with self._db.read() as db:
            return load_choice(db, fingerprint)

    def clear_retrieval(self, fingerprint: str) -> bool:
        """Forget the retrieval choice of model ``fingerprint``; whether there was one."""
        from statelab.state.retrieval import delete_choice

        with self._db.write("clear a retrieval choice") as db:
            return delete_choice(db, fingerprint)

    def __repr__(self) -> str:
        return f"StateStore({str(self.path)!r}, index={self.index_kind!r}, sketch_dim={self.sketch_dim})"
