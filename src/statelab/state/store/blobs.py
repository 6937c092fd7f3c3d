"""Content-addressed state files: ``blobs/ab/abcdef….safetensors``, named by the SHA-256 checksum of the state.

A blob is written atomically (temporary file, fsync, rename) before the row that names it is committed, read back
verified (checksum, layout, NaN) against the name, and deleted only under the store's write lock when no row
refers to it, so concurrent adds, removes and repairs never lose a state another process is committing.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from statelab.errors import StateFileError, StoreError
from statelab.state.store.db import StoreDB

if TYPE_CHECKING:  # torch loads when a state file is written or read, not when the store is opened
    from statelab.state.core import State

__all__ = ["Blobs", "DirectoryScan", "temp_file_owner_alive"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_file_owner_alive(name: str) -> bool:
    """Whether the temporary file ``name`` (``.tmp-<pid>-…``) belongs to another process that is still running
    (then it is a write in flight, not debris)."""
    from statelab.state.io import TMP_PREFIX

    m = re.match(re.escape(TMP_PREFIX) + r"(\d+)-", name)
    owner = int(m.group(1)) if m else None
    return owner is not None and owner != os.getpid() and _pid_alive(owner)


@dataclass
class DirectoryScan:
    """What lies in ``blobs/``: blob files by checksum, and temporary files of dead and of live writers."""

    blobs: dict[str, Path] = field(default_factory=dict)
    dead_temp_files: list[Path] = field(default_factory=list)
    live_temp_files: list[Path] = field(default_factory=list)


class Blobs:
    """The blob directory of a store, deleting through ``store_db``'s write lock."""

    def __init__(self, store_db: StoreDB) -> None:
        self._db = store_db
        self.root = store_db.path / "blobs"

    def path(self, blob: str) -> Path:
        """Where the blob of checksum ``blob`` (64 hex digits) lives."""
        return self.root / blob[:2] / f"{blob}.safetensors"

    def exists(self, blob: str) -> bool:
        return self.path(blob).exists()

    def write(self, blob: str, data: bytes) -> bool:
        """Write a blob unless it exists; True when this call created it."""
        p = self.path(blob)
        if p.exists():
            return False
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._db.write_error(e, "write a state file") from None
        try:
            from statelab.state.io import atomic_write

            atomic_write(p, data)
        except StateFileError as e:
            raise StoreError(f"store {self._db.path}: {e}") from None
        return True

    def load(self, blob: str, label: str) -> State:
        """The verified state of a blob; ``label`` names its entry in errors."""
        p = self.path(blob)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise StoreError(
                f"entry {label} has no state file ({p.name} is missing); run `statelab store check --repair`"
            ) from None
        return self.decode(data, blob, label)

    @staticmethod
    def decode(data: bytes, blob: str, label: str) -> State:
        """The state in a blob's bytes, verified against its name ``blob``; ``label`` names it in errors."""
        try:
            from statelab.state.io import decode_state

            state, meta = decode_state(data, f"entry {label}")
        except StateFileError as e:
            raise StoreError(f"{e}; run `statelab store check --repair`") from None
        if meta["checksum"].removeprefix("sha256:") != blob:
            raise StoreError(f"entry {label}: state file content does not match its name {blob[:12]}")
        return state

    def scan(self) -> DirectoryScan:
        """The files in the blob directory (other files are left alone)."""
        from statelab.state.io import TMP_PREFIX

        found = DirectoryScan()
        for p in self.root.glob("*/*"):
            if p.name.startswith(TMP_PREFIX):
                (found.live_temp_files if temp_file_owner_alive(p.name) else found.dead_temp_files).append(p)
            elif p.suffix == ".safetensors" and _HEX64.match(p.stem):
                found.blobs[p.stem] = p
        return found

    def collect(self, blobs: Sequence[str], db: sqlite3.Connection | None = None) -> None:
        """Delete the blobs no row refers to; under the write lock, so no concurrent add can be using them.

        ``db``: an open connection (see :meth:`StoreDB.session`) to take the lock on, instead of a new one.
        """
        if not blobs:
            return
        with contextlib.ExitStack() as stack:
            if db is None:
                db = stack.enter_context(self._db.session("remove unused state files"))
            with self._db.transaction(db, "remove unused state files"):
                for blob in set(blobs):
                    if db.execute("SELECT 1 FROM entries WHERE blob = ? LIMIT 1", (blob,)).fetchone() is None:
                        self.path(blob).unlink(missing_ok=True)

    def collect_quietly(self, blobs: Sequence[str], db: sqlite3.Connection) -> None:
        """:meth:`collect` while another error propagates: a failure here must not hide that error (what it
        leaves behind are orphan blobs, which ``check`` reports and repairs)."""
        with contextlib.suppress(StoreError, OSError):
            self.collect(blobs, db)
