"""The store's database schema, its config table, and creating or opening a store directory.

Tables: ``config`` (key/value: schema version, sketch settings, the removal count), ``entries`` (one row per
stored state; the tensors live in the blob the row names), ``tags`` and ``index_files`` (one record per
vector-index cache file, see :mod:`statelab.state.store.index_cache`).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from statelab.errors import StoreError
from statelab.state.store.db import StoreDB, scalar

__all__ = [
    "SCHEMA_VERSION",
    "DEFAULT_SKETCH_DIM",
    "StoreConfig",
    "wanted_config",
    "create_store",
    "open_store",
    "removals",
    "count_removal",
]

SCHEMA_VERSION = "1"
# Chosen with benchmarks/bench_store.py (sketch recall against raw-state cosine); see benchmarks/RESULTS.md.
DEFAULT_SKETCH_DIM = 256
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
_SKETCH_KEYS = ("sketch_dim", "sketch_seed", "layers")


@dataclass(frozen=True)
class StoreConfig:
    """What a store fixes at creation, and whether its database records index caches (an older read-only
    store may not have the ``index_files`` table; it is then searched without on-disk caches)."""

    sketch_dim: int
    sketch_seed: int
    layers: list[int] | None
    index_records: bool


def wanted_config(sketch_dim: int | None, sketch_seed: int | None, layers) -> dict[str, str | None]:
    """The config values a caller asks for, as stored (``None``: whatever the store has, or the default)."""
    return {
        "sketch_dim": None if sketch_dim is None else str(int(sketch_dim)),
        "sketch_seed": None if sketch_seed is None else str(int(sketch_seed)),
        "layers": None if layers is None else json.dumps(sorted({int(i) for i in layers})),
    }


def _read_config(db: sqlite3.Connection) -> dict[str, str]:
    return {row["key"]: row["value"] for row in db.execute("SELECT key, value FROM config")}


def _check_config(path: Path, config: dict[str, str], wanted: dict[str, str | None]) -> None:
    if config.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema version {config['schema_version']}, this statelab reads version {SCHEMA_VERSION}"
        )
    for key, value in wanted.items():
        if value is not None and key in config and config[key] != value:
            raise StoreError(f"store {path} was created with {key}={config[key]}, not {value}")


def _fill_schema(path: Path, db: sqlite3.Connection, wanted: dict[str, str | None]) -> dict[str, str]:
    """Create missing tables and config keys (inside a write transaction); the store's config."""
    for stmt in filter(str.strip, _SCHEMA.split(";")):
        db.execute(stmt)
    config = _read_config(db)
    _check_config(path, config, wanted)
    defaults = {"sketch_dim": str(DEFAULT_SKETCH_DIM), "sketch_seed": "0", "layers": "null"}
    for key, default in {"schema_version": SCHEMA_VERSION, **defaults, "removals": "0"}.items():
        if key not in config:
            value = wanted.get(key) or default
            db.execute("INSERT INTO config (key, value) VALUES (?, ?)", (key, value))
            config[key] = value
    return config


def _as_config(config: dict[str, str], index_records: bool) -> StoreConfig:
    return StoreConfig(
        sketch_dim=int(config["sketch_dim"]),
        sketch_seed=int(config["sketch_seed"]),
        layers=json.loads(config["layers"]),
        index_records=index_records,
    )


def create_store(store_db: StoreDB, wanted: dict[str, str | None]) -> StoreConfig:
    """Make the directories and the database (several processes may race to do this; all succeed)."""
    path = store_db.path
    try:
        (path / "blobs").mkdir(parents=True, exist_ok=True)
        (path / "index").mkdir(exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create store directory {path}: {e.strerror or e}") from None
    with store_db.session("create the store", mode="rwc") as db, store_db.transaction(db, "create the store"):
        config = _fill_schema(path, db, wanted)
    return _as_config(config, index_records=True)


def open_store(store_db: StoreDB, wanted: dict[str, str | None]) -> StoreConfig:
    """Read the config of an existing store; fill in what an older store lacks only if it can be written."""
    path = store_db.path
    with store_db.read() as db:
        tables = {row["name"] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        config = _read_config(db) if "config" in tables else {}
    _check_config(path, config, wanted)
    if set(_TABLES) <= tables and {*_SKETCH_KEYS, "removals"} <= set(config):
        return _as_config(config, index_records=True)
    try:
        with store_db.write("bring the store's schema up to date") as db:
            config = _fill_schema(path, db, wanted)
    except StoreError:
        if {"config", "entries", "tags"} <= tables and set(_SKETCH_KEYS) <= set(config):
            # a read-only copy of an older store: readable, without index-cache records
            return _as_config(config, index_records="index_files" in tables)
        raise
    return _as_config(config, index_records=True)


def removals(db: sqlite3.Connection) -> int:
    """How many removals the store has seen (index caches built before the last one are stale)."""
    return int(scalar(db, "SELECT value FROM config WHERE key = 'removals'"))


def count_removal(db: sqlite3.Connection) -> None:
    """Record one more removal (inside the write transaction that removed entries)."""
    db.execute("UPDATE config SET value = CAST(value AS INTEGER) + 1 WHERE key = 'removals'")
