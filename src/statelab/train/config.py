"""Typed, frozen training configs, read from TOML or JSON, with ``key=value`` command-line overrides.

A config file mirrors :class:`TrainConfig`: one table per section. For example (TOML)::

    [model]
    arch = "mamba1"
    config = { d_model = 64, n_layer = 2, vocab_size = 260 }

    [data]
    source = "text"
    seq_len = 128
    options = { path = "corpus.txt" }

    [optim]
    lr = 3e-3

    [run]
    out_dir = "runs/tiny"
    max_steps = 200

and ``optim.lr=1e-3 run.max_steps=50`` on the command line overrides single keys. Unknown keys, wrong types and
invalid values raise :class:`statelab.errors.ConfigError` naming the key. Free-form tables (``model.config``,
``data.options``) are checked by whatever consumes them (the model's own config class, the data source's config).

The parsing helpers (:func:`from_dict`, :func:`apply_overrides`, :func:`read_config_file`) are generic over
frozen dataclasses, so experiments reuse them for their own configs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from statelab.errors import ConfigError

__all__ = [
    "ModelSection",
    "DataSection",
    "OptimSection",
    "RunSection",
    "TrainConfig",
    "load_train_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "read_config_file",
    "parse_override",
]

T = TypeVar("T")


@dataclass(frozen=True)
class ModelSection:
    """Which model to train.

    Attributes:
        arch: a statelab architecture (``"mamba1"``, ``"mamba2"``); selects the model and config classes.
        config: keyword arguments of that architecture's config class (e.g. ``d_model``, ``n_layer``).
        init_from: a checkpoint directory (or ``"embedded"``) to start from instead of a fresh initialisation;
            empty for a fresh model built from ``config`` with ``run.seed``.
    """

    arch: str = "mamba1"
    config: dict[str, Any] = field(default_factory=dict)
    init_from: str = ""


@dataclass(frozen=True)
class DataSection:
    """Where training sequences come from.

    Attributes:
        source: a registered data source (see :mod:`statelab.train.data`).
        seq_len: tokens per training sequence ``T``.
        seed: seed of the data stream; sequence ``i`` is a pure function of ``(seed, i)``.
        options: the source's own options, checked by the source's config class.
    """

    source: str = "tasks"
    seq_len: int = 256
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warmup and cosine decay.

    Attributes:
        lr: peak learning rate, reached after ``warmup_steps``.
        min_lr: floor of the cosine decay, reached at ``run.max_steps``.
        warmup_steps: linear warmup from ``lr / warmup_steps`` to ``lr``.
        betas: AdamW ``(beta1, beta2)``.
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay of matrices; decay parameters (``A_log``, ``dt_bias``, ``D``),
            norms, biases and other vectors get none.
        grad_clip: clip the global gradient norm to this value; ``0`` disables clipping.
    """

    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class RunSection:
    """Steps, batch sizes, checkpoints and logging.

    Attributes:
        out_dir: where checkpoints, metrics, the loss plot and the final model go.
        max_steps: optimizer steps in total.
        global_batch_size: sequences per optimizer step, over all processes and accumulation steps.
        micro_batch_size: sequences per forward pass in one process; the loop accumulates
            ``global_batch_size / (micro_batch_size * world_size)`` micro-batches per step.
        seed: seed of the model initialisation and of the torch RNG during training.
        checkpoint_every: write a checkpoint every this many steps (and at the end); ``0`` only at the end.
        keep_checkpoints: how many of the newest checkpoints to keep (older ones are deleted).
        log_every: append a metrics line every this many steps.
        resume: continue from the newest checkpoint in ``out_dir`` when there is one.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
        autocast: ``"none"`` or ``"bfloat16"`` (mixed precision on CUDA; parameters stay fp32).
        threads: torch intra-op threads; ``0`` leaves torch's default.
        progress: show a rich progress bar (rank 0 only).
    """

    out_dir: str = "runs/train"
    max_steps: int = 1000
    global_batch_size: int = 16
    micro_batch_size: int = 16
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = True
    device: str = "cpu"
    autocast: str = "none"
    threads: int = 0
    progress: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Saved with every checkpoint and with the final model."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        o, r, d = self.optim, self.run, self.data
        checks = [
            (o.lr > 0 and math.isfinite(o.lr), "optim.lr must be a positive number", o.lr),
            (0 <= o.min_lr <= o.lr, "optim.min_lr must lie in [0, optim.lr]", o.min_lr),
            (o.warmup_steps >= 0, "optim.warmup_steps must be >= 0", o.warmup_steps),
            (all(0 <= b < 1 for b in o.betas), "optim.betas must lie in [0, 1)", o.betas),
            (o.eps > 0, "optim.eps must be > 0", o.eps),
            (o.weight_decay >= 0, "optim.weight_decay must be >= 0", o.weight_decay),
            (o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)", o.grad_clip),
            (r.max_steps >= 1, "run.max_steps must be >= 1", r.max_steps),
            (r.micro_batch_size >= 1, "run.micro_batch_size must be >= 1", r.micro_batch_size),
            (r.global_batch_size >= 1, "run.global_batch_size must be >= 1", r.global_batch_size),
            (r.checkpoint_every >= 0, "run.checkpoint_every must be >= 0", r.checkpoint_every),
            (r.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1", r.keep_checkpoints),
            (r.log_every >= 1, "run.log_every must be >= 1", r.log_every),
            (r.device in ("cpu", "cuda", "auto"), "run.device must be 'cpu', 'cuda' or 'auto'", r.device),
            (r.autocast in ("none", "bfloat16"), "run.autocast must be 'none' or 'bfloat16'", r.autocast),
            (r.threads >= 0, "run.threads must be >= 0", r.threads),
            (d.seq_len >= 2, "data.seq_len must be >= 2", d.seq_len),
        ]
        for ok, msg, got in checks:
            if not ok:
                raise ConfigError(f"{msg}, got {got!r}")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step in each process; raises unless the global batch divides evenly."""
        per_step = self.run.micro_batch_size * world_size
        if self.run.global_batch_size % per_step:
            raise ConfigError(
                f"run.global_batch_size={self.run.global_batch_size} must be a multiple of "
                f"run.micro_batch_size * world_size = {self.run.micro_batch_size} * {world_size}"
            )
        return self.run.global_batch_size // per_step


# ---- generic typed parsing -------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form (tuples for tuples)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        _, varg = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, varg, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from a mapping; unknown keys and wrong types raise ``ConfigError``.

    Missing keys take the field defaults. Nested dataclasses are built from nested mappings.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """A frozen config dataclass as plain JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.toml`` or ``.json`` config file into a dict (``ConfigError`` on a missing or malformed file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            return tomllib.loads(text)
        if p.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ConfigError(f"{p}: the top level of a JSON config must be an object")
            return data
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p} is not valid {p.suffix[1:].upper()}: {e}") from e
    raise ConfigError(f"config file {str(p)!r} must end in .toml or .json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> ``(["optim", "lr"], 0.001)``.

    The value is read as a TOML value (numbers, ``true``/``false``, quoted strings, ``[lists]``,
    ``{ inline = "tables" }``); anything that is not valid TOML is taken as a bare string.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the nested dict ``data`` with each ``key=value`` override set (tables created as needed)."""
    out = json.loads(json.dumps(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {p!r} is a value, not a table")
            node = nxt
        node[parts[-1]] = value
    return out


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training config file (or start from the defaults) and apply ``key=value`` overrides."""
    data = read_config_file(path) if path is not None else {}
    return from_dict(TrainConfig, apply_overrides(data, overrides))
