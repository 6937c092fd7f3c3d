"""Checking a store and repairing it: orphan blobs, entries whose blob is lost, temporary files of dead writers
and index caches that do not match their records."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from statelab.errors import StoreError
from statelab.state.store.blobs import Blobs
from statelab.state.store.db import StoreDB
from statelab.state.store.schema import count_removal

if TYPE_CHECKING:  # the index cache (numpy, torch) loads when a check runs, not when the store is opened
    from statelab.state.store.index_cache import IndexCache

__all__ = ["CheckReport", "check_store"]


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


def check_store(store_db: StoreDB, blobs: Blobs, indexes: IndexCache, repair: bool, verify: bool) -> CheckReport:
    """What :meth:`StateStore.check` does (see there).

    With ``repair`` it runs under the write lock; without, under the write lock if the store can be written, so
    nothing in flight is mistaken for debris, else in a read snapshot.
    """
    report = CheckReport(repaired=repair)
    relative = store_db.path
    with store_db.write("check --repair") if repair else store_db.snapshot_or_lock("check") as db:
        rows = db.execute("SELECT id, name, blob FROM entries ORDER BY id").fetchall()
        report.entries = len(rows)
        referenced = {r["blob"] for r in rows}
        found = blobs.scan()
        report.live_temp_files = [str(p.relative_to(relative)) for p in found.live_temp_files]
        report.temp_files = [str(p.relative_to(relative)) for p in found.dead_temp_files]
        if repair:
            for p in found.dead_temp_files:
                p.unlink(missing_ok=True)
        on_disk = found.blobs
        report.blobs = len(on_disk)
        report.orphan_blobs = sorted(set(on_disk) - referenced)
        bad_blobs: set[str] = set()
        for blob in sorted(referenced):
            if blob not in on_disk:
                bad_blobs.add(blob)
            elif verify:
                try:
                    blobs.load(blob, blob[:12])
                except StoreError:
                    bad_blobs.add(blob)
        for r in rows:
            if r["blob"] in bad_blobs:
                (report.missing_blobs if r["blob"] not in on_disk else report.corrupt_blobs).append(r["name"])
        if repair:
            for blob in report.orphan_blobs:
                on_disk[blob].unlink(missing_ok=True)
            for blob in bad_blobs:
                blobs.path(blob).unlink(missing_ok=True)
            lost = [r for r in rows if r["blob"] in bad_blobs]
            db.executemany("DELETE FROM entries WHERE id = ?", [(r["id"],) for r in lost])
            if lost:
                count_removal(db)
            report.dropped_entries = [r["name"] for r in lost]
        index_check = indexes.check(db, repair)
        report.stale_indexes, report.bad_indexes = index_check.stale, index_check.bad
    if repair:
        indexes.clear()
        for kind, fp in index_check.rebuild:
            with contextlib.suppress(StoreError):  # e.g. the index's package is not installed: left deleted
                indexes.index(fp, kind)
                from statelab.state.store.index_cache import model_tag

                report.rebuilt_indexes.append(f"{kind}-{model_tag(fp)}")
    return report
