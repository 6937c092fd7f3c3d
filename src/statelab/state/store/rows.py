"""The store's records: :class:`Entry` (a stored state's metadata), :class:`NewEntry` (one to add), :class:`Hit`
(a search result), and reading entry rows by name or id.

Rows are :class:`sqlite3.Row` values read by column name; an entry's tags come from the ``tags`` table.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statelab.errors import StoreError

if TYPE_CHECKING:  # torch loads only when a state is handled, not when rows are listed
    from statelab.state.core import State

__all__ = [
    "Entry",
    "NewEntry",
    "Hit",
    "ENTRY_COLUMNS",
    "NEW_ENTRY_KEYS",
    "entry_from_row",
    "find_row",
    "check_name",
    "check_fields",
    "as_new_entry",
]

# the columns an Entry is read from (everything but the sketch)
ENTRY_COLUMNS = (
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


NEW_ENTRY_KEYS = ("name", "state", "task", "tags", "description", "prompt", "shots")


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


def entry_from_row(db: sqlite3.Connection, row: sqlite3.Row) -> Entry:
    """The :class:`Entry` of a row of ``ENTRY_COLUMNS``, with its tags (sorted) read through ``db``."""
    tags = tuple(t["tag"] for t in db.execute("SELECT tag FROM tags WHERE entry_id = ? ORDER BY tag", (row["id"],)))
    fields = dict(zip(row.keys(), row, strict=True))  # iterating a sqlite3.Row gives its values, not its keys
    fields["layout"] = json.loads(fields["layout"])
    return Entry(**fields, tags=tags)


def find_row(db: sqlite3.Connection, name_or_id: str | int, path: Path) -> sqlite3.Row:
    """The row (``ENTRY_COLUMNS``) of an entry by name, or by id (an int, or a string of digits that is no entry's
    name); ``path`` names the store in errors.

    Names made only of digits are refused when adding, so a string of digits is an id; a store written before
    that rule may hold such a name, and then a string that is both a name and another entry's id is refused
    as ambiguous rather than silently meaning one of them.
    """
    if isinstance(name_or_id, bool) or not isinstance(name_or_id, str | int):
        raise StoreError(f"entries are named by a name (str) or an id (int), got {type(name_or_id).__name__}")
    by_name = by_id = None
    if isinstance(name_or_id, str):
        by_name = db.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE name = ?", (name_or_id,)).fetchone()
    digits = isinstance(name_or_id, int) or (name_or_id.isascii() and name_or_id.isdigit())
    if digits and int(name_or_id) < 2**63:
        by_id = db.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE id = ?", (int(name_or_id),)).fetchone()
    if by_name is not None and by_id is not None and by_name["id"] != by_id["id"]:
        raise StoreError(
            f"{name_or_id!r} is ambiguous in store {path}: it is the name of entry {by_name['id']} and the id "
            f"of entry {by_id['name']!r}; rename the entry called {name_or_id!r}"
        )
    row = by_name if by_name is not None else by_id
    if row is None:
        raise StoreError(f"no entry named {name_or_id!r} in store {path}")
    return row


def check_name(name: object) -> None:
    """Refuse a name that is not a non-empty string, or that reads as an id (only digits)."""
    if not isinstance(name, str) or not name.strip():
        raise StoreError(f"an entry needs a non-empty name, got {name!r}")
    if name.isascii() and name.isdigit():
        raise StoreError(
            f"entry name {name!r} is only digits, which commands read as an entry id; use a name with a letter"
        )


def check_fields(
    state: object, name: object, task: object, tags: object, description: object, prompt: object, shots: object
) -> tuple[str, ...]:
    """Refuse (``StoreError``) what cannot be a new entry: a state that is not a batch-1 :class:`State`, a bad
    name, non-string text fields, tags that are not a list of non-empty strings, shots that is not an int >= 0.

    Returns the tags as a tuple.
    """
    from statelab.state.core import State

    if not isinstance(state, State):
        raise StoreError(f"state must be a statelab.State, got {type(state).__name__}")
    if state.batch_size != 1:
        raise StoreError(
            f"a store entry holds one sequence's state, got batch size {state.batch_size}; "
            "add rows separately with state.select(i)"
        )
    check_name(name)
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
    return tags


def as_new_entry(i: int, item: NewEntry | dict[str, Any]) -> NewEntry:
    """``item`` (the ``i``-th of an ``add_many`` call) as a checked :class:`NewEntry`, or a ``StoreError`` naming
    the item (its position and name) and what is wrong with it."""
    if isinstance(item, dict):
        unknown = sorted(set(item) - set(NEW_ENTRY_KEYS))
        missing = [k for k in ("name", "state") if k not in item]
        label = f"item {i}" + (f" ({item['name']!r})" if "name" in item else "")
        if unknown:
            raise StoreError(f"{label}: unknown key(s) {unknown}; an item has {', '.join(NEW_ENTRY_KEYS)}")
        if missing:
            raise StoreError(f"{label}: missing {' and '.join(missing)}")
        item = NewEntry(**item)
    elif not isinstance(item, NewEntry):
        raise StoreError(f"item {i}: expected a NewEntry or a dict, got {type(item).__name__}")
    try:
        check_fields(item.state, item.name, item.task, item.tags, item.description, item.prompt, item.shots)
    except StoreError as e:
        raise StoreError(f"item {i} ({item.name!r}): {e}") from None
    return item
