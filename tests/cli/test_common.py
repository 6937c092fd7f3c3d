"""The rules every command shares (statelab.cli.common): exit code 2 for usage errors and 1 for runtime errors, one
``error:`` line, ``warning:`` lines; and the command line starts without torch."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
import typer
from typer.testing import CliRunner

from statelab.cli.common import CliError, fail_cleanly, int_list
from statelab.errors import ConfigError, StateFileError, StatelabWarning, StoreError

RAISED = [
    (CliError("give --a or --b, not both"), 2, "error: give --a or --b, not both"),
    (ConfigError("unknown config key(s) lrr"), 2, "error: unknown config key(s) lrr"),
    (StoreError("no entry named 'x'"), 1, "error: no entry named 'x'"),
    (StateFileError("truncated state file"), 1, "error: truncated state file"),
    (ValueError("temperature must be a finite number"), 1, "error: temperature must be a finite number"),
    (TypeError("k must be an int"), 1, "error: k must be an int"),
    (FileNotFoundError(2, "No such file or directory", "/nowhere/a.jsonl"), 1,
     "error: No such file or directory: /nowhere/a.jsonl"),
    (PermissionError(13, "Permission denied"), 1, "error: Permission denied"),
]  # fmt: skip


def _app(fn):
    app = typer.Typer()
    app.command()(fail_cleanly(fn))
    return app


@pytest.mark.parametrize("error, code, line", RAISED, ids=[type(e).__name__ for e, _, _ in RAISED])
def test_an_error_is_one_line_and_its_exit_code(error, code, line):
    def command() -> None:
        raise error

    r = CliRunner().invoke(_app(command), [])
    assert r.exit_code == code
    assert r.stderr == line + "\n" and r.stdout == ""


def test_a_bug_keeps_its_traceback():
    def command() -> None:
        raise KeyError("a bug, not an input error")

    r = CliRunner().invoke(_app(command), [])
    assert isinstance(r.exception, KeyError)


def test_statelab_warnings_are_warning_lines_and_others_pass_through():
    def command() -> None:
        warnings.warn("index cache rebuilt", StatelabWarning, stacklevel=1)
        warnings.warn("index cache rebuilt", StatelabWarning, stacklevel=1)  # every one is shown, not once
        typer.echo("done")

    r = CliRunner().invoke(_app(command), [])
    assert r.exit_code == 0 and r.stdout == "done\n"
    assert r.stderr == "warning: index cache rebuilt\nwarning: index cache rebuilt\n"

    def failing() -> None:
        warnings.warn("repaired first", StatelabWarning, stacklevel=1)
        raise StoreError("then failed")

    r = CliRunner().invoke(_app(failing), [])
    assert r.exit_code == 1 and r.stderr == "error: then failed\nwarning: repaired first\n"


def test_int_list():
    assert int_list("1, 2,3", "--layers") == [1, 2, 3] and int_list(None, "--layers") is None
    with pytest.raises(CliError, match="--layers must be comma-separated integers, got '1,x'"):
        int_list("1,x", "--layers")


# what a fresh process imports for a short command (the part of start-up that does not depend on machine load)
_PROBE = """
import json, sys
from statelab.cli import main
sys.argv = ["statelab", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "numpy", "rich.console") if m in sys.modules)}),
      file=sys.stderr)
"""


def _imports_of(args: list[str], tmp_path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_help_and_store_list_start_without_torch(tmp_path):
    from statelab.state.core import State
    from statelab.state.store import StateStore

    g = torch.Generator().manual_seed(0)
    state = State(
        arch="mamba1", ssm=torch.randn(2, 1, 4, 3, generator=g), conv=torch.randn(2, 1, 4, 2, generator=g),
        sum_delta=torch.rand(2, 1, 4, generator=g), n_tokens=3, fingerprint="ab" * 32,
    )  # fmt: skip
    StateStore(tmp_path / "skills").add(state, name="a", task="t")

    assert _imports_of(["--help"], tmp_path) == {"code": 0, "heavy": ["rich.console"]}
    got = _imports_of(["store", "list", "-s", str(tmp_path / "skills"), "--json"], tmp_path)
    assert got == {"code": 0, "heavy": []}
    got = _imports_of(["store", "list", "-s", str(tmp_path / "skills")], tmp_path)  # the table: rich, no torch
    assert got == {"code": 0, "heavy": ["rich.console"]}


def _commands(cmd, path=()):
    """``(path, click command)`` for every leaf command under ``cmd``."""
    subs = getattr(cmd, "commands", None)
    if not subs:
        yield path, cmd
        return
    for name, sub in subs.items():
        yield from _commands(sub, (*path, name))


def test_one_name_for_the_progress_flag_and_for_the_config_file():
    from statelab.cli import app

    root = typer.main.get_command(app)
    progress, config = [], []
    for path, cmd in _commands(root):
        for p in cmd.params:
            names = [*p.opts, *p.secondary_opts]
            assert not {"--quiet", "-q", "--progress"} & set(names), (path, names)
            if p.name == "no_progress":
                progress.append(path)
                assert names == ["--no-progress"], (path, names)
            if p.name == "config":
                config.append(path)
                assert "--config" in names and p.param_type_name == "option", (path, names)
    runs = {("soup", "run"), ("gdssm", "run"), ("birdie", "run"), ("train", "run")}
    assert runs | {("store", "ingest"), ("eval",)} <= set(progress)
    assert runs | {("train", "config")} <= set(config)
