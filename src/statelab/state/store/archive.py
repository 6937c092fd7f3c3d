"""Store archives: one tar file holding ``manifest.json`` (the entries' metadata) and their blobs.

Writing reads the entries in one snapshot and verifies every blob; reading checks the whole archive (member
names, manifest format and fields, every blob against its checksum) before the store adds anything.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from statelab.errors import StateFileError, StoreError

if TYPE_CHECKING:  # torch loads when an archive is written or read, not when the store is opened
    from statelab.state.core import State
from statelab.state.store.rows import Entry

__all__ = ["ARCHIVE_FORMAT", "ARCHIVE_VERSION", "ArchivedEntry", "write_archive", "read_archive"]

ARCHIVE_FORMAT = "statelab.store-archive"
ARCHIVE_VERSION = 1
T = TypeVar("T")


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_archive(path: Path, entries: Sequence[Entry], blobs: dict[str, bytes], created: str) -> None:
    """Write ``entries`` and their (verified) blob bytes by checksum to the archive ``path``, atomically."""
    manifest = {
        "format": ARCHIVE_FORMAT,
        "version": ARCHIVE_VERSION,
        "created": created,
        "entries": [{k: v for k, v in e.to_dict().items() if k != "id"} for e in entries],
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _tar_add(tar, "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
        for blob in sorted(blobs):
            _tar_add(tar, f"blobs/{blob}.safetensors", blobs[blob])
    try:
        from statelab.state.io import atomic_write

        atomic_write(path, buf.getvalue())
    except StateFileError as e:
        raise StoreError(f"export failed: {e}") from None


def _members(archive: Path) -> dict[str, bytes]:
    """The members of a store archive by name, or a ``StoreError``: unreadable or truncated tar, a member that is
    not ``manifest.json`` or ``blobs/<sha256>.safetensors`` (links, directories, other paths), a member twice."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar:
                ok = member.isfile() and (
                    member.name == "manifest.json"
                    or re.fullmatch(r"blobs/[0-9a-f]{64}\.safetensors", member.name) is not None
                )
                if not ok:
                    raise StoreError(f"archive {archive}: unexpected member {member.name[:100]!r}")
                if member.name in files:
                    raise StoreError(f"archive {archive}: member {member.name!r} appears twice")
                f = tar.extractfile(member)
                if f is None:
                    raise StoreError(f"archive {archive}: unreadable member {member.name!r}")
                files[member.name] = f.read()
    except FileNotFoundError:
        raise StoreError(f"cannot read archive {archive}: it does not exist") from None
    except IsADirectoryError:
        raise StoreError(f"cannot read archive {archive}: it is a directory") from None
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise StoreError(f"cannot read archive {archive}: it is truncated or not a tar archive ({e})") from None
    return files


class ArchivedEntry:
    """One manifest entry of an archive, with its verified state.

    The fields (``name``, ``task``, ``tags``, ``description``, ``prompt``, ``shots``) are as the manifest has them,
    unchecked (the store checks them as it checks any new entry); ``created`` is a string or None.
    """

    def __init__(self, fields: dict[str, Any], state: State) -> None:
        self.state = state
        self.name = fields.get("name")
        self.task = fields.get("task")
        self.tags = fields.get("tags", ())
        self.description = fields.get("description")
        self.prompt = fields.get("prompt")
        self.shots = fields.get("shots")
        self.created: str | None = fields.get("created")


def read_archive(archive: Path, prepare: Callable[[ArchivedEntry], T]) -> list[T]:
    """``prepare`` of every entry of an archive written by :func:`write_archive`, in manifest order.

    Raises a ``StoreError`` for anything wrong with the archive as a whole (see :func:`_members`), its manifest
    (format, version, types, a name twice), a blob (checksum, layout, name; an entry naming a blob the archive
    lacks), or the first entry ``prepare`` refuses with a ``StoreError`` (then prefixed with where it is).
    """
    files = _members(archive)
    try:
        manifest = json.loads(files.pop("manifest.json"))
    except KeyError:
        raise StoreError(f"archive {archive} has no manifest.json") from None
    except (ValueError, RecursionError) as e:
        raise StoreError(f"archive {archive}: manifest.json is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"archive {archive}: manifest.json must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != ARCHIVE_FORMAT or manifest.get("version") != ARCHIVE_VERSION:
        raise StoreError(
            f"archive {archive} is not a statelab store archive version {ARCHIVE_VERSION} "
            f"(format {str(manifest.get('format'))[:40]!r}, version {str(manifest.get('version'))[:20]!r})"
        )
    items = manifest.get("entries", [])
    if not isinstance(items, list):
        raise StoreError(f"archive {archive}: manifest 'entries' must be a list, got {type(items).__name__}")
    states: dict[str, State] = {}
    for name, data in files.items():
        blob = name.removeprefix("blobs/").removesuffix(".safetensors")
        try:
            from statelab.state.io import decode_state

            state, meta = decode_state(data, f"{archive}:{name}")
        except StateFileError as e:
            raise StoreError(str(e)) from None
        if meta["checksum"].removeprefix("sha256:") != blob:
            raise StoreError(f"archive {archive}: {name} does not match its checksum")
        states[blob] = state
    prepared: list[T] = []
    seen = set()
    for i, fields in enumerate(items):
        where = f"archive {archive}: entry {i}"
        if not isinstance(fields, dict):
            raise StoreError(f"{where} must be a JSON object, got {type(fields).__name__}")
        blob = fields.get("blob")
        if not isinstance(blob, str) or blob not in states:
            raise StoreError(f"{where} ({str(fields.get('name'))[:40]!r}) refers to a blob the archive does not hold")
        if fields.get("name") in seen:
            raise StoreError(f"{where}: name {fields.get('name')!r} appears twice")
        created = fields.get("created")
        if created is not None and not isinstance(created, str):
            raise StoreError(f"{where}: 'created' must be a string, got {type(created).__name__}")
        try:
            prepared.append(prepare(ArchivedEntry(fields, states[blob])))
        except StoreError as err:
            raise StoreError(f"{where}: {err}") from None
        seen.add(fields.get("name"))
    return prepared
