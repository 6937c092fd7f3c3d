"""``statelab train config | run``: the config file is named by --config (a positional CONFIG still works, with a
warning); a bad key is a usage error (exit code 2)."""

import json
from pathlib import Path

from typer.testing import CliRunner

from statelab.cli import app
from statelab.train.config import load_train_config, to_dict

RECIPE = Path(__file__).resolve().parents[2] / "src" / "statelab" / "embedded" / "train.toml"
runner = CliRunner()


def test_config_resolves_the_file_and_the_overrides():
    r = runner.invoke(app, ["train", "config", "--config", str(RECIPE), "optim.lr=0.002", "run.max_steps=7"])
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert json.loads(r.stdout) == to_dict(load_train_config(RECIPE, ["optim.lr=0.002", "run.max_steps=7"]))
    assert json.loads(r.stdout)["optim"]["lr"] == 0.002


def test_a_positional_config_is_the_same_with_a_warning():
    new = runner.invoke(app, ["train", "config", "--config", str(RECIPE), "run.max_steps=7"])
    old = runner.invoke(app, ["train", "config", str(RECIPE), "run.max_steps=7"])
    assert old.exit_code == 0 and old.stdout == new.stdout
    assert old.stderr == f"warning: CONFIG as a positional argument is deprecated; write --config {RECIPE}\n"


def test_usage_errors_exit_2_in_one_line(tmp_path):
    r = runner.invoke(app, ["train", "config", "--config", str(RECIPE), "optim.lrr=1"])
    assert r.exit_code == 2 and r.stderr.startswith("error: unknown config key(s) optim.lrr") and r.stdout == ""
    assert r.stderr.count("\n") == 1
    r = runner.invoke(app, ["train", "run", "run.max_steps=1"])
    assert r.exit_code == 2 and r.stderr.startswith("error: give the training config: statelab train run --config")
    r = runner.invoke(app, ["train", "run", "--config", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "missing.toml" in r.stderr and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
