"""File helpers shared by every layer: durable writes (fsync) and reading a JSON object from a file.

A rename is atomic for readers, but it survives a power loss only once the directory holding the new name is
fsynced too; state files (:func:`statelab.state.io.atomic_write`) and training checkpoints
(:mod:`statelab.train.checkpoint`) both end with :func:`fsync_dir`. Checkpoint directories (``config.json``,
``trainer.json``) and tokenizer directories hold JSON objects read with :func:`read_json_object`. Imports only
the standard library and :mod:`statelab.errors`, so every layer may import it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from statelab.errors import CheckpointError

__all__ = ["fsync_dir", "fsync_file", "read_json_object"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush the directory ``path`` (its entries: names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush the contents of the file ``path``, written and closed earlier, to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object (a dict) in the UTF-8 file ``path``; ``CheckpointError`` naming the file when it is not
    valid JSON or holds something else than an object. A missing file raises ``FileNotFoundError`` (callers say
    what it means)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return value
