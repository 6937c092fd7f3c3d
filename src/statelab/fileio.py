"""Making writes durable: fsync of a file and of a directory (after a rename into it).

A rename is atomic for readers, but it survives a power loss only once the directory holding the new name is
fsynced too; state files (:func:`statelab.state.io.atomic_write`) and training checkpoints
(:mod:`statelab.train.checkpoint`) both end with :func:`fsync_dir`. Standard library only, so every layer may
import it.
"""

from __future__ import annotations

import os

__all__ = ["fsync_dir", "fsync_file"]


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
