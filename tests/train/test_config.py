"""Typed training configs: files, overrides, and clear errors for unknown keys, wrong types and bad values."""

import dataclasses
import json
from typing import Literal

import pytest

from statelab.errors import ConfigError
from statelab.train.config import (
    TrainConfig,
    apply_overrides,
    from_dict,
    load_train_config,
    parse_override,
    to_dict,
)


def test_defaults_round_trip_through_dict():
    cfg = TrainConfig()
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(
        '[model]\narch = "mamba1"\nconfig = { d_model = 32, n_layer = 2, vocab_size = 259 }\n'
        "[optim]\nlr = 1e-3\nbetas = [0.8, 0.9]\n[run]\nmax_steps = 7\n"
    )
    cfg = load_train_config(f, ["optim.lr=2e-3", "run.out_dir=runs/x", "model.config.n_layer=3", "run.resume=false"])
    assert cfg.optim.lr == 2e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.run.max_steps == 7 and cfg.run.out_dir == "runs/x" and cfg.run.resume is False
    assert cfg.model.config == {"d_model": 32, "n_layer": 3, "vocab_size": 259}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_json_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"run": {"max_steps": 3, "global_batch_size": 8, "micro_batch_size": 4}}))
    cfg = load_train_config(f)
    assert cfg.accumulation_steps(1) == 2 and cfg.accumulation_steps(2) == 1


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert from_dict(TrainConfig, {"optim": {"lr": 1}}).optim.lr == 1.0
    with pytest.raises(ConfigError, match="run.max_steps: expected an integer"):
        from_dict(TrainConfig, {"run": {"max_steps": 2.5}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown config key.*optim.lrr"),
        (["nosuch.x=1"], "unknown config key.*nosuch"),
        (["run.max_steps=many"], "run.max_steps: expected an integer"),
        (["run.progress=1"], "run.progress: expected true or false"),
        (["optim.betas=[0.9]"], "optim.betas: expected a list of 2"),
        (["optim.lr=-1"], "optim.lr must be a positive number"),
        (["run.device=tpu"], "run.device must be"),
        (["optim.lr"], "must look like key=value"),
        (["optim=3", "optim.lr=1"], "is a value, not a table"),
    ],
    ids=[
        "unknown-key",
        "unknown-section",
        "bad-int",
        "bad-bool",
        "short-tuple",
        "negative-lr",
        "bad-device",
        "no-equals",
        "value-not-table",
    ],
)
def test_bad_configs_raise_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides)


def test_batch_must_divide(tmp_path):
    cfg = load_train_config(None, ["run.global_batch_size=6", "run.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="multiple of"):
        cfg.accumulation_steps(1)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_train_config(bad)
    other = tmp_path / "c.yaml"
    other.write_text("a: 1")
    with pytest.raises(ConfigError, match=".toml or .json"):
        load_train_config(other)


def test_parse_override_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override('a="x y"') == (["a"], "x y")
    assert parse_override("a=runs/tiny") == (["a"], "runs/tiny")
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


@dataclasses.dataclass(frozen=True)
class _Choices:
    mode: Literal["a", "b"] = "a"
    level: Literal[1, 2] = 1
    maybe: Literal["x"] | None = None


def test_literal_fields_take_only_their_choices():
    assert from_dict(_Choices, {"mode": "b", "level": 2, "maybe": "x"}) == _Choices("b", 2, "x")
    assert from_dict(_Choices, {"maybe": None}) == _Choices()
    with pytest.raises(ConfigError, match="mode: expected one of 'a', 'b', got 'c'"):
        from_dict(_Choices, {"mode": "c"})
    # True == 1 and 2.0 == 2 in Python, but neither is the integer choice
    with pytest.raises(ConfigError, match="level: expected one of 1, 2, got True"):
        from_dict(_Choices, {"level": True})
    with pytest.raises(ConfigError, match="level: expected one of 1, 2, got 2.0"):
        from_dict(_Choices, {"level": 2.0})
    with pytest.raises(ConfigError, match="maybe: expected"):
        from_dict(_Choices, {"maybe": "y"})
