"""The store's SQLite connections: read snapshots, write sessions and transactions, and one-line write errors.

Every call opens its own connection (several processes share a store), in WAL mode with a busy timeout; a write
takes the write lock with ``BEGIN IMMEDIATE``. Rows come back as :class:`sqlite3.Row`, read by column name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from statelab.errors import StoreError

__all__ = ["StoreDB", "scalar", "IN_CHUNK"]

# values per "IN (...)" query, well under SQLite's limit on parameters
IN_CHUNK = 500

# SQLite result codes that mean "this file cannot be written (or its lock files created) here"
_UNWRITABLE = ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_PERM")


def scalar(db: sqlite3.Connection, sql: str, args: tuple | list = ()) -> Any:
    """The single value of a one-row, one-column query (``COUNT(*)``, ``MAX(id)``, a config value)."""
    (value,) = db.execute(sql, args).fetchone()
    return value


class StoreDB:
    """The database file ``store.db`` of the store at ``path``.

    Args:
        path: the store directory.
        timeout: seconds a call waits for another process's write lock.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.file = path / "store.db"
        self.timeout = float(timeout)
        # SQLite URI of the database; "mode=rw" (never "rwc") everywhere but creation, so nothing is created by
        # accident if the file vanished
        self._uri = self.file.absolute().as_uri()

    def connect(self, mode: str) -> sqlite3.Connection:
        """A connection in SQLite URI ``mode`` (``rwc``, ``rw``, ``ro``) or ``immutable`` (no locks, no lock
        files), returning :class:`sqlite3.Row` rows."""
        query = "immutable=1" if mode == "immutable" else f"mode={mode}"
        db = sqlite3.connect(f"{self._uri}?{query}", uri=True, timeout=self.timeout, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def setup_writer(self, db: sqlite3.Connection) -> None:
        """WAL journal, foreign keys and full synchronous commits on a connection that writes."""
        mode = scalar(db, "PRAGMA journal_mode = WAL")
        if mode.lower() != "wal":
            raise StoreError(f"store database {self.path} could not switch to WAL mode (got {mode})")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = FULL")

    def read_only_reason(self) -> str | None:
        """Why this process cannot write the store, if the file system or the permissions say so."""
        try:
            if os.statvfs(self.path).f_flag & os.ST_RDONLY:
                return "its file system is mounted read-only"
        except OSError:
            pass
        for p in (self.path, self.file):
            if p.exists() and not os.access(p, os.W_OK):
                return f"{p} is not writable by this user (uid {os.geteuid()})"
        return None

    def _free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def write_error(self, e: BaseException, what: str) -> StoreError:
        """One line saying why a write (``what``) failed: read-only store, full disk, lock timeout or else.

        The error's ``cause`` (``"read-only"``, ``"disk full"``, ``"busy"``, ``"database"``) is for callers that
        can do without writing (a check without repair).
        """
        if isinstance(e, StoreError):
            return e
        code = getattr(e, "sqlite_errorname", "") or ""
        reason = self.read_only_reason()
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
        err.cause = cause
        return err

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = self.file.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _connect_read(self) -> tuple[sqlite3.Connection, tuple | None]:
        """A connection inside a read transaction, and the database file's identity when that read takes no lock.

        Tried in order: a normal connection; a read-only one (works on a read-only store whose lock files exist);
        an ``immutable`` one, which needs no lock files (a read-only store nobody has open, a full disk) but takes
        no lock either: it is used only when no write-ahead log holds changes, and :meth:`read` then checks that
        the file did not change while it was read.
        """
        failures: list[sqlite3.Error] = []
        for mode in ("rw", "ro"):
            db = None
            try:
                db = self.connect(mode)
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
        wal = self.file.with_name(self.file.name + "-wal")
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
            db = self.connect("immutable")
            db.execute("BEGIN")
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            raise StoreError(f"store {self.path}: cannot read its database: {e}") from None
        return db, before

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
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
    def session(self, what: str, *, mode: str = "rw") -> Iterator[sqlite3.Connection]:
        """A connection able to write, opened (lock files in place) but outside any transaction.

        Opened before anything is written, so a read-only store or a full disk fails here with nothing changed;
        kept open for the clean-up after a failed transaction, which then needs no new lock files (on a full disk,
        a new connection could not be opened to remove the blob a failed add wrote). ``mode="rwc"`` creates the
        database file (store creation only).
        """
        if mode != "rwc" and self.read_only_reason() is not None:  # SQLite would open it read-only without a word
            raise self.write_error(PermissionError(errno.EACCES, "not writable"), what)
        db = None
        try:
            db = self.connect(mode)
            self.setup_writer(db)
        except (sqlite3.Error, StoreError) as e:
            if db is not None:
                db.close()
            raise self.write_error(e, what) from None
        try:
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def transaction(self, db: sqlite3.Connection, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction on ``db`` holding the store's write lock; rolled back on any error."""
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self.write_error(e, what) from None
        try:
            yield db
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already (e.g. disk full)
                db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise self.write_error(e, what) from None
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise self.write_error(e, what) from None

    @contextlib.contextmanager
    def write(self, what: str = "write to it") -> Iterator[sqlite3.Connection]:
        """One write transaction on a new connection; rolled back on any error."""
        with self.session(what) as db, self.transaction(db, what):
            yield db

    @contextlib.contextmanager
    def snapshot_or_lock(self, what: str) -> Iterator[sqlite3.Connection]:
        """The write lock if the store can be written (so nothing in flight is mistaken for debris), else a read
        snapshot (read-only store, full disk: then no writer can be in flight)."""
        with contextlib.ExitStack() as stack:
            try:
                db = stack.enter_context(self.write(what))
            except StoreError as e:
                if getattr(e, "cause", None) not in ("read-only", "disk full"):
                    raise
                db = stack.enter_context(self.read())
            yield db
