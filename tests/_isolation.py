"""Run part of a test in a forked child under a real limit of the system: another user, a read-only mount, a full
disk, a file-size limit.

Nothing here fakes a failure: the child really is another user (``setresuid``), really sees the directory through a
read-only bind mount, really writes into a tiny tmpfs, in a mount namespace of its own so the parent and the rest of
the machine never see those mounts. The child is a fork of the test process (torch already imported, so it starts
in milliseconds) and reports back as JSON through a pipe. Tests run as root in CI, where ``chmod`` does not stop
writes; without root, :func:`read_only_view` uses ``chmod`` (which then does).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "in_child",
    "private_mounts",
    "read_only_bind",
    "tmpfs",
    "can_mount",
    "as_other_user",
    "read_only_view",
    "file_size_limit",
    "fill_disk",
]

_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
NOBODY = 65534


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def in_child(fn: Callable[[], Any], *, setup: Callable[[], None] | None = None) -> Any:
    """``fn()`` in a forked child (after ``setup()`` there); its JSON-able result, or the test fails with the
    child's traceback. The child never returns into pytest: it ends with ``os._exit``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: single-threaded, so it may unshare its mount namespace
        try:
            os.close(r)
            # the parent's OpenMP threads did not come along: a parallel region would wait for them forever
            import sys

            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(1)
            signal.alarm(120)  # a child stuck for any other reason dies, and the parent reports it
            if setup is not None:
                setup()
            out = {"ok": fn()}
        except BaseException:  # noqa: BLE001  (everything goes back to the parent as text)
            out = {"error": traceback.format_exc()}
        try:
            os.write(w, json.dumps(out, default=str).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        pytest.fail(f"the child process died without a report (status {status})")
    out = json.loads(b"".join(chunks))
    if "error" in out:
        pytest.fail("in the child process:\n" + out["error"])
    return out["ok"]


def private_mounts() -> None:
    """Give the calling (single-threaded) process a mount namespace whose mounts nobody else sees."""
    libc = _libc()
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")


def read_only_bind(path: str | os.PathLike) -> None:
    """Mount ``path`` over itself read-only (after :func:`private_mounts`): writes fail with EROFS, even as root."""
    libc = _libc()
    p = os.fsencode(str(path))
    _check(libc.mount(p, p, None, _MS_BIND | _MS_REC, None), "bind mount")
    _check(libc.mount(None, p, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None), "read-only remount")


def tmpfs(path: str | os.PathLike, size: str) -> None:
    """Mount a tmpfs of ``size`` (e.g. ``"1m"``) on ``path`` (after :func:`private_mounts`)."""
    libc = _libc()
    _check(libc.mount(b"tmpfs", os.fsencode(str(path)), b"tmpfs", 0, f"size={size}".encode()), "mount tmpfs")


_CAN_MOUNT: bool | None = None


def can_mount() -> bool:
    """Whether this machine lets a child process make private mounts (root with CAP_SYS_ADMIN, not too
    sandboxed); probed once."""
    global _CAN_MOUNT
    if _CAN_MOUNT is None:
        if os.geteuid() != 0:
            _CAN_MOUNT = False
        else:
            import tempfile

            d = tempfile.mkdtemp()
            try:

                def probe() -> bool:
                    try:
                        private_mounts()
                        tmpfs(d, "64k")
                    except OSError:
                        return False
                    return True

                _CAN_MOUNT = bool(in_child(probe))
            finally:
                os.rmdir(d)
    return _CAN_MOUNT


@contextlib.contextmanager
def as_other_user(uid: int = NOBODY) -> Iterator[None]:
    """Run the body as user ``uid`` (real and effective ids; the saved id stays 0, so root is restored after).

    Root only. Use it inside :func:`in_child` so that a failure can never leave the test process unprivileged.
    """
    os.setgroups([])
    os.setresgid(uid, uid, 0)
    os.setresuid(uid, uid, 0)
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)


@contextlib.contextmanager
def read_only_view(path: Path) -> Iterator[str]:
    """The body sees ``path`` as not writable: as another user (root: ``setresuid``) or through ``chmod``.

    Yields how: ``"other user"`` or ``"chmod"``. ``path`` and its parents must be readable by that user.
    """
    if os.geteuid() == 0:
        with as_other_user():
            yield "other user"
        return
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
    for p in modes:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        yield "chmod"
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def file_size_limit(nbytes: int) -> None:
    """No file may grow past ``nbytes`` (writes fail with EFBIG instead of raising SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))


def fill_disk(directory: Path) -> tuple[int, int]:
    """Fill the file system of ``directory`` with one file; ``(fd, size)`` of that file (truncate it to free
    space)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    block = b"\0" * 4096
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, block)
    with contextlib.suppress(OSError):  # the last partial page
        while True:
            if os.write(fd, b"\0" * 512) == 0:
                break
    return fd, os.fstat(fd).st_size
