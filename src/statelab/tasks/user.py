"""A user's own word-function task from a JSONL file of ``{"input", "output"}`` pairs.

Each non-blank line is one pair, ``{"input": "cat", "output": "CAT"}``, with an optional ``"key"``: the entity the
pair is about, which decides its split exactly as for the built-in tasks (:func:`statelab.tasks.base.split_of`:
a hash of the key, so the split is deterministic and does not depend on the file's order or on other lines). The
key defaults to the input. The task's name is the file name without ``.jsonl``.

Checks (each a ``ConfigError`` naming the file and line): a line that is not a JSON object, a missing or empty
``input``/``output``, a value that is not a string, an unknown key, and the same input given two different
outputs (a repeated identical pair is kept once).

Example::

    >>> import json, pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "shout.jsonl").write_text("\\n".join(json.dumps({"input": w, "output": w.upper() + "!"})
    ...                                                for w in ["cat", "dog", "sun", "sea"]))
    >>> t = load_jsonl_task(d / "shout.jsonl")
    >>> t.name, t("dog"), len(t.pool("train")) + len(t.pool("test"))
    ('shout', 'DOG!', 4)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from statelab.errors import ConfigError
from statelab.jsonl import json_lines
from statelab.tasks.base import DEFAULT_TEST_FRACTION, Task

__all__ = ["load_jsonl_task", "is_task_file", "task_file_digest"]

_KEYS = {"input", "output", "key"}


def is_task_file(name: str | os.PathLike) -> bool:
    """True when ``name`` names a JSONL task file (ends with ``.jsonl``) rather than a built-in task."""
    return str(name).lower().endswith(".jsonl")


def task_file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes (recorded in reports, so a result says which data made it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _pairs(path: Path) -> list[tuple[str, str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"task file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"task file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    out: list[tuple[str, str, str]] = []
    first_line: dict[str, tuple[int, str]] = {}
    for n, where, obj in json_lines(text, ConfigError, lambda n: f"{path}:{n}"):
        if not isinstance(obj, dict):
            raise ConfigError(f'{where}: a pair is a JSON object {{"input", "output"}}, got {type(obj).__name__}')
        extra = sorted(set(obj) - _KEYS)
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {extra}; a pair has input, output and optionally key")
        for field in ("input", "output"):
            v = obj.get(field)
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{where}: {field!r} must be a non-empty string, got {v!r}")
        key = obj.get("key", obj["input"])
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: 'key' must be a non-empty string, got {key!r}")
        x, y = obj["input"], obj["output"]
        if x in first_line:
            line, y0 = first_line[x]
            if y0 != y:
                raise ConfigError(f"{where}: input {x!r} has output {y!r} here but {y0!r} on line {line}")
            continue
        first_line[x] = (n, y)
        out.append((x, y, key))
    if not out:
        raise ConfigError(f'task file {path} has no pairs (one JSON object {{"input", "output"}} per line)')
    return out


def load_jsonl_task(
    path: str | os.PathLike, name: str | None = None, test_fraction: float = DEFAULT_TEST_FRACTION
) -> Task:
    """The :class:`~statelab.tasks.base.Task` of a JSONL file of pairs (see the module doc).

    Args:
        path: the ``.jsonl`` file.
        name: the task's name (default: the file name without ``.jsonl``).
        test_fraction: share of keys held out for ``"test"`` (the built-in tasks' default).

    Raises:
        ConfigError: the file is missing, unreadable or has a bad line (named with its line number).
    """
    p = Path(path)
    pairs = _pairs(p)  # read and checked now, so errors surface before any model work
    default = p.name[: -len(".jsonl")] if p.name.lower().endswith(".jsonl") else p.stem
    return Task(
        name=name or default,
        description=f"pairs from {p}",
        source=str(p),
        build=lambda: pairs,
        test_fraction=test_fraction,
        group="user",
    )
