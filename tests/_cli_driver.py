"""Run many ``statelab`` command lines in one real process, each with its own stdout, stderr and exit code.

``python -m tests._cli_driver SPEC OUT``: SPEC is a JSON list of ``{"id", "args", "env"}``; OUT receives
``{id: {"code", "stdout", "stderr"}}``. Each command line calls the installed ``statelab`` console-script entry
point exactly as the script does, with file descriptors 1 and 2 redirected to files, so whatever reaches the
terminal (a Python traceback included: the interpreter would print one for an exception that escapes the entry
point, and this driver prints it the same way) is captured. Starting Python and importing torch once for every
case is what makes this affordable (a few seconds, against a few seconds per case).

``env``: ``null``; ``["read-only", STORE]`` (the case runs in a child that sees STORE read-only); ``["full-disk",
MOUNT, STATE_FILE]`` (the case runs in a child with a 1 MiB tmpfs on MOUNT holding a store ``MOUNT/store`` with one
entry made from STATE_FILE, then filled to the last byte).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from importlib.metadata import entry_points


def _entry_point():
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "statelab"]
    return ep.load()


def run_one(args: list[str]) -> dict:
    """One command line, as the console script runs it; its exit code and what it wrote to fds 1 and 2."""
    main = _entry_point()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = ["statelab", *args]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001  (what the interpreter does with an escaping exception)
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return {
            "code": code,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def run_case(case: dict) -> dict:
    env = case.get("env")
    if not env:
        return run_one(case["args"])
    from pathlib import Path

    from tests import _isolation as iso

    if env[0] == "read-only":
        store = Path(env[1])
        if iso.can_mount():

            def setup():
                iso.private_mounts()
                iso.read_only_bind(store)

            return iso.in_child(lambda: run_one(case["args"]), setup=setup)

        def as_reader():
            with iso.read_only_view(store):
                return run_one(case["args"])

        return iso.in_child(as_reader)
    if env[0] == "full-disk":
        mount, state_file = Path(env[1]), env[2]

        def on_full_disk():
            from statelab.state.io import load_state
            from statelab.state.store import StateStore

            StateStore(mount / "store").add(load_state(state_file), name="a")
            iso.fill_disk(mount)
            return run_one(case["args"])

        if iso.can_mount():

            def setup():
                iso.private_mounts()
                iso.tmpfs(mount, "1m")

            return iso.in_child(on_full_disk, setup=setup)

        def limited():  # no mounts here: a file-size limit is the full disk the process sees
            from statelab.state.io import load_state
            from statelab.state.store import StateStore

            StateStore(mount / "store").add(load_state(state_file), name="a")
            iso.file_size_limit(16 * 1024)
            return run_one(case["args"])

        return iso.in_child(limited)
    raise ValueError(f"unknown env {env!r}")


def main() -> None:
    spec_file, out_file = sys.argv[1], sys.argv[2]
    with open(spec_file) as f:
        cases = json.load(f)
    results = {c["id"]: run_case(c) for c in cases}
    with open(out_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
