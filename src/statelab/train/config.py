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

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from statelab.config import apply_overrides, from_dict, parse_override, read_config_file, to_dict
from statelab.errors import ConfigError

__all__ = [
    "ModelSection",
    "DataSection",
    "OptimSection",
    "RunSection",
    "TrainConfig",
    "load_train_config",
    "config_digest",
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
        lr_scale: learning-rate factors by parameter leaf name (``{ lam = 0.5 }``: GD-SSM's recurrence at half
            the rate); empty for one rate everywhere.
    """

    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSection:
    """Steps, batch sizes, checkpoints and logging.

    Attributes:
        out_dir: where checkpoints, metrics, the loss plot and the final model go.
        max_steps: optimizer steps in total; with ``max_tokens``, the length of the schedule in steps.
        max_tokens: ``0``, or a token budget: the run ends after the first step at which this many tokens (as the
            loss hook counts them) are done, and the learning-rate schedule follows the share of the budget spent.
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
        plots: draw ``loss.png`` (at checkpoints, at most once a minute, and at the end); studies that train many
            small runs turn it off.
    """

    out_dir: str = "runs/train"
    max_steps: int = 1000
    max_tokens: int = 0
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
    plots: bool = True


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
            (r.max_tokens >= 0, "run.max_tokens must be >= 0 (0: no token budget)", r.max_tokens),
            (all(v > 0 for v in o.lr_scale.values()), "optim.lr_scale factors must be > 0", o.lr_scale),
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


def config_digest(cfg: TrainConfig, length: int = 10) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``cfg`` as JSON with sorted keys: studies name a run's
    directory with it, so that a run with another config starts afresh instead of refusing to resume."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:length]


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training config file (or start from the defaults) and apply ``key=value`` overrides."""
    data = read_config_file(path) if path is not None else {}
    return from_dict(TrainConfig, apply_overrides(data, overrides))
