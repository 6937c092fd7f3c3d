"""Reading JSONL text: one JSON value per non-blank line, each failure naming its line.

The readers of ``store ingest`` prompt files, ``statelab eval`` datasets and user task files all go through
:func:`json_lines`; each then checks its own keys and says where with its own line label.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["json_lines"]


def json_lines(text: str, error: type[Exception], where: Callable[[int], str]) -> Iterator[tuple[int, str, Any]]:
    """``(line number, where(line number), value)`` for every non-blank line of ``text``, from 1.

    A line that is not JSON raises ``error("<where>: invalid JSON (<reason> at column <c>)")``.
    """
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        label = where(n)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise error(f"{label}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield n, label, value
