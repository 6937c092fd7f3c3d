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

Modules: :mod:`~statelab.state.store.state_store` (the :class:`StateStore` facade), :mod:`~.db` (connections,
transactions, write errors), :mod:`~.schema` (tables and config), :mod:`~.rows` (named records: entries, new
entries, hits), :mod:`~.blobs` (state files), :mod:`~.index_cache` (vector indexes and their cache files),
:mod:`~.ranking` (exact scores), :mod:`~.repair` (check and repair) and :mod:`~.archive` (export and import).
"""

from statelab.state.store.archive import ARCHIVE_FORMAT, ARCHIVE_VERSION
from statelab.state.store.repair import CheckReport
from statelab.state.store.rows import Entry, Hit, NewEntry
from statelab.state.store.schema import DEFAULT_SKETCH_DIM, SCHEMA_VERSION
from statelab.state.store.state_store import STORE_INDEX_KINDS, StateStore

__all__ = [
    "StateStore",
    "Entry",
    "NewEntry",
    "Hit",
    "CheckReport",
    "STORE_INDEX_KINDS",
    "DEFAULT_SKETCH_DIM",
    "SCHEMA_VERSION",
    "ARCHIVE_FORMAT",
    "ARCHIVE_VERSION",
]
