"""The training loop: one readable function for every statelab model and objective.

What it does per optimizer step ``s`` (all processes together):

1. ``lr = lr_at(s)``: linear warmup, then cosine decay to ``min_lr`` (a pure function of the step, so the
   scheduler state is the step count). A run with a token budget (``run.max_tokens``) reads the same schedule on
   its token clock: after a share ``f`` of the budget, it is at step ``f * max_steps``;
2. read global batch ``s`` (sequences ``s*G .. s*G+G-1``, see :func:`statelab.train.data.step_rows`), this
   process's rows, in ``accumulation`` micro-batches; or, from a :class:`BatchSource`, this process's parts of it;
3. loss = sum of the loss terms / number of loss terms in the *whole global batch* (token cross-entropy by
   default; a :class:`LossHook` says what a term is for other objectives). Each process scales its partial sum by
   ``world_size / n_global`` so that DDP's gradient average is exactly the gradient of that loss: the same
   objective whatever the number of processes or micro-batches;
4. clip the global gradient norm, AdamW step with one no-decay rule (:func:`param_groups`: no weight decay on the
   recurrences' decay parameters, norms, biases, vectors, nor on rows a module marks, such as the gated SSM's
   forget gate);
5. callbacks (:class:`Callback`) see the finished step (evaluations, a controller that changes the data mixture);
6. every ``checkpoint_every`` steps, an atomic checkpoint (model, optimizer, RNG, step, config, and the state of a
   stateful data source and of the callbacks) from which a resumed run continues bit for bit.

Models come from a registry (:func:`register_model`, :data:`ARCHITECTURES`) by ``model.arch``, initialised from
``run.seed`` under a forked RNG. Metrics go to ``metrics.jsonl`` (one JSON object per logged step) and
``loss.png``; the trained model to ``final/`` (its ``save_pretrained``, or ``model.safetensors``). Under
``torchrun`` (``WORLD_SIZE > 1``) the loop runs DDP with NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from statelab.errors import CheckpointError, ConfigError
from statelab.train import checkpoint as ckpt_io
from statelab.train.config import ModelSection, OptimSection, TrainConfig, to_dict
from statelab.train.data import IGNORE_INDEX, DataSource, build_source, make_batch, step_rows
from statelab.train.state_tree import load_tree, save_tree

__all__ = [
    "TrainResult",
    "train",
    "lr_at",
    "param_groups",
    "make_optimizer",
    "RowDecayAdamW",
    "build_model",
    "seeded_init",
    "register_model",
    "MODEL_FACTORIES",
    "NO_DECAY_NAMES",
    "ARCHITECTURES",
    "BatchSource",
    "LossHook",
    "TokenCrossEntropy",
    "Callback",
    "StepInfo",
    "plot_metrics",
    "read_metrics",
]

# Parameters named like this (last name component) get no weight decay: decaying A_log, dt_bias or D would pull the
# SSM's time constants and skip connection toward arbitrary values (mamba_ssm marks them ``_no_weight_decay``).
# The same holds for the other recurrences' decays: Hawk's RG-LRU ``Lambda``, GD-SSM's ``lam`` (Λ) and ``log_step``.
NO_DECAY_NAMES = frozenset({"A_log", "dt_bias", "D", "bias", "Lambda", "lam", "log_step"})

# Built-in architectures, imported when first used: arch -> (module, config class, model class); the model is
# ``model_class(config_class(**model.config))``.
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "mamba1": ("statelab.models.mamba1", "Mamba1Config", "Mamba1LM"),
    "mamba2": ("statelab.models.mamba2", "Mamba2Config", "Mamba2LM"),
    "birdie": ("statelab.models.birdie_models", "BirdieModelConfig", "BirdieLM"),
}

# Registered factories: arch -> factory(model.config as a dict) -> nn.Module (see register_model).
MODEL_FACTORIES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}

# Config keys that do not change the trajectory of a run: they may differ between a run and its resumption.
_COSMETIC_KEYS = frozenset(
    {
        "run.progress",
        "run.resume",
        "run.threads",
        "run.log_every",
        "run.checkpoint_every",
        "run.keep_checkpoints",
        "run.plots",
    }
)


@dataclass
class TrainResult:
    """What a call to :func:`train` did.

    Attributes:
        model: the trained model (unwrapped from DDP), in eval mode.
        step: optimizer steps completed in total (including those of earlier runs this one resumed).
        resumed_from: the step the run resumed from (0 for a fresh run).
        last_loss: the mean training loss of the last step taken, ``nan`` when no step was taken.
        tokens: input tokens processed in total, over all processes (a :class:`LossHook`'s count of them for
            other objectives, e.g. the non-padding tokens of packed rows).
        elapsed: seconds of training in total, over all resumptions.
        out_dir: the run directory.
        step_seconds: seconds spent in optimizer steps alone (no callbacks, checkpoints or logging), in total.
    """

    model: nn.Module
    step: int
    resumed_from: int
    last_loss: float
    tokens: int
    elapsed: float
    out_dir: Path
    step_seconds: float = 0.0


def lr_at(step: float, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine from ``lr`` to ``min_lr``.

    ``step`` may be fractional: a run with ``run.max_tokens`` is at step ``max_steps * tokens / max_tokens``.
    """
    o, total = cfg.optim, cfg.run.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, total - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))


def _no_decay_rows(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Full parameter name -> ``[start, stop)`` rows that a module exempts from weight decay.

    A module declares them as ``no_weight_decay_rows = {"local.param.name": (start, stop)}`` (the gated SSM's
    forget-gate rows of its fused input projection, for instance).
    """
    out: dict[str, tuple[int, int]] = {}
    for prefix, module in model.named_modules():
        for name, (a, b) in getattr(module, "no_weight_decay_rows", {}).items():
            out[f"{prefix}.{name}" if prefix else name] = (int(a), int(b))
    return out


def param_groups(
    model: nn.Module, weight_decay: float, lr_scale: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups under statelab's one no-decay rule.

    Matrices decay; vectors, the decay parameters of the recurrences (:data:`NO_DECAY_NAMES`: ``A_log``,
    ``dt_bias``, ``D``, ``Lambda``, ``lam``, ``log_step``), norms and biases do not; nor do parameters marked
    ``_no_weight_decay = True``. Rows a module lists in ``no_weight_decay_rows`` do not decay while the other rows
    of the same matrix do: such matrices form a group with ``weight_decay = 0`` and ``decay_rows`` (per parameter,
    the ``[start, stop)`` row ranges that decay) and ``row_weight_decay``, applied by :class:`RowDecayAdamW`.

    Args:
        model: the model; tied parameters appear once.
        weight_decay: decoupled weight decay of the decaying parameters.
        lr_scale: learning-rate factor by parameter leaf name (``{"lam": 0.5}``); such parameters form their own
            groups with ``lr_scale`` (the loop multiplies the schedule's learning rate by it).

    Returns:
        ``[decay, no_decay]`` and, only where needed, a group of partly decayed matrices, then one group per
        distinct ``lr_scale`` and decay kind (groups with no parameters are left out after the first two).
    """
    scales = dict(lr_scale or {})
    rows = _no_decay_rows(model)
    groups: dict[tuple[str, float], list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or leaf in NO_DECAY_NAMES or "norm" in name or getattr(p, "_no_weight_decay", False):
            kind = "no_decay"
        elif name in rows and weight_decay > 0:
            kind = "rows"
        else:
            kind = "decay"
        groups.setdefault((kind, float(scales.get(leaf, 1.0))), []).append((name, p))
    out: list[dict[str, Any]] = []
    for key in sorted(groups.keys() | {("decay", 1.0), ("no_decay", 1.0)}, key=_group_order):
        kind, scale = key
        members = groups.get(key, [])
        if not members and key not in (("decay", 1.0), ("no_decay", 1.0)):
            continue
        group: dict[str, Any] = {
            "params": [p for _, p in members],
            "weight_decay": weight_decay if kind == "decay" else 0.0,
        }
        if kind == "rows":
            group["row_weight_decay"] = weight_decay
            group["decay_rows"] = [_complement(rows[n], p.shape[0]) for n, p in members]
        if scale != 1.0:
            group["lr_scale"] = scale
        out.append(group)
    return out


def _group_order(key: tuple[str, float]) -> tuple[bool, float, int]:
    kind, scale = key
    return (scale != 1.0, scale, ("decay", "no_decay", "rows").index(kind))


def _complement(span: tuple[int, int], n: int) -> list[list[int]]:
    """The ``[start, stop)`` ranges of ``range(n)`` outside ``span``."""
    a, b = span
    return [r for r in ([0, max(0, a)], [min(n, b), n]) if r[1] > r[0]]


class RowDecayAdamW(torch.optim.AdamW):
    """AdamW whose groups may decay only some rows of a parameter (groups with ``decay_rows``, see
    :func:`param_groups`).

    Those rows get the same decoupled decay as AdamW gives a whole parameter, ``p ← p · (1 − lr · wd)``, applied
    before the Adam update as AdamW does; the group's own ``weight_decay`` is 0, so the other rows get none.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        for g in self.param_groups:
            ranges = g.get("decay_rows")
            if not ranges:
                continue
            factor = 1.0 - g["lr"] * g["row_weight_decay"]
            for p, spans in zip(g["params"], ranges, strict=True):
                if p.grad is None:
                    continue
                for a, b in spans:
                    p[a:b].mul_(factor)
        return super().step(closure)


def make_optimizer(model: nn.Module, optim: OptimSection) -> RowDecayAdamW:
    """The optimizer of a run: :class:`RowDecayAdamW` over :func:`param_groups` with ``optim``'s settings."""
    return RowDecayAdamW(
        param_groups(model, optim.weight_decay, optim.lr_scale), lr=optim.lr, betas=optim.betas, eps=optim.eps
    )


def register_model(name: str) -> Callable:
    """Decorator registering ``factory(config: dict) -> nn.Module`` as architecture ``name`` (``model.arch``)."""

    def deco(factory: Callable[[dict[str, Any]], nn.Module]) -> Callable[[dict[str, Any]], nn.Module]:
        MODEL_FACTORIES[name] = factory
        return factory

    return deco


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Initialise modules from ``seed`` inside the block: torch's initialisers draw from the global RNG, so it is
    forked, seeded for the block and given back to the caller unchanged afterwards (CPU; the models are built on
    the CPU and moved afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(section: ModelSection, seed: int) -> nn.Module:
    """A fresh model of ``section.arch`` with ``section.config``, initialised from ``seed``; or the checkpoint
    ``section.init_from``. The global torch RNG of the caller is left untouched.
    """
    if section.init_from:
        from statelab.models.loading import load_model

        return load_model(section.init_from)
    if section.arch in MODEL_FACTORIES:
        factory = MODEL_FACTORIES[section.arch]
    elif section.arch in ARCHITECTURES:
        mod_name, cfg_name, model_name = ARCHITECTURES[section.arch]
        mod = importlib.import_module(mod_name)
        cfg_cls, model_cls = getattr(mod, cfg_name), getattr(mod, model_name)

        def factory(config: dict[str, Any]) -> nn.Module:
            try:
                model_cfg = cfg_cls(**config)
            except ConfigError:
                raise
            except (TypeError, ValueError) as e:
                raise ConfigError(f"model.config is not a valid {cfg_name}: {e}") from e
            return model_cls(model_cfg)
    else:
        known = ", ".join(sorted(ARCHITECTURES.keys() | MODEL_FACTORIES.keys()))
        raise ConfigError(f"model.arch={section.arch!r} is unknown; known: {known}")
    with seeded_init(seed):
        return factory(dict(section.config))


@runtime_checkable
class BatchSource(Protocol):
    """Data that is not a :class:`~statelab.train.data.DataSource` of token rows: whole batches by step.

    ``batch(step, part, n_parts)`` is part ``part`` of ``n_parts`` equal parts of global batch ``step`` (the loop
    asks process ``r`` for parts ``m * world + r`` of micro-step ``m``, so any split reads the same global batch).
    A source whose batches depend on what it read before (a stream) also has ``state_dict()`` and
    ``load_state_dict(state)``, saved with every checkpoint (a state tree, :mod:`statelab.train.state_tree`).
    """

    def batch(self, step: int, part: int, n_parts: int) -> Any: ...


class LossHook(Protocol):
    """What a loss term is for a run's batches.

    ``count(batch)``: the number of loss terms (the loop divides the summed loss of a global batch by the summed
    counts); ``tokens(batch)``: the tokens it holds (throughput and ``run.max_tokens``); ``model, batch ->`` the
    *sum* of its loss terms (a scalar tensor).
    """

    def count(self, batch: Any) -> float: ...

    def tokens(self, batch: Any) -> int: ...

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor: ...


class TokenCrossEntropy:
    """The default loss: next-token cross-entropy of ``(input_ids [B, T], labels [B, T])`` batches, one term per
    label that is not -100."""

    def count(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        return float(int((batch[1] != IGNORE_INDEX).sum()))

    def tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return int(batch[0].numel())

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


class StepInfo(NamedTuple):
    """A finished optimizer step: ``step`` steps done, its mean ``loss``, ``tokens`` done in total, its ``lr``."""

    step: int
    loss: float
    tokens: int
    lr: float


class Callback:
    """Something that runs after every optimizer step; override what you need.

    ``on_step(model, info)`` is called with the (unwrapped) model in train mode (a callback that evaluates puts it
    back in train mode) and a :class:`StepInfo`, before the checkpoint of that step. ``state_dict()`` returns a
    state tree saved with every checkpoint (``None``: nothing to save); ``load_state_dict`` restores it on resume.
    """

    def on_step(self, model: nn.Module, info: StepInfo) -> None:
        return None

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        return None


@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _setup_dist(device_pref: str) -> _Dist:
    want_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device='cuda' but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return _Dist(0, 1, torch.device("cuda" if want_cuda else "cpu"), False)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return _Dist(rank, world, device, owns)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (a torn last line, from a killed run, is skipped)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """Keep only records of steps ``<= upto_step``: the steps after a checkpoint are redone on resume."""
    if path.is_file():
        keep = [r for r in read_metrics(path) if r.get("step", 0) <= upto_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")


def plot_metrics(records: list[dict[str, Any]], path: str | Path, title: str = "training loss") -> None:
    """Loss (and its running mean) against step, with the learning rate on a second axis, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    smooth, acc = [], None
    for v in loss:
        acc = v if acc is None else 0.9 * acc + 0.1 * v
        smooth.append(acc)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="loss")
    ax.plot(steps, smooth, color="tab:blue", lw=2, label="loss (running mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in records], color="tab:orange", lw=1, label="learning rate")
    ax2.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _config_diff(a: dict[str, Any], b: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between the saved config ``a`` and ``b``; a key the saved config predates counts
    as equal when ``b`` has its default there."""
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        name = f"{prefix}{k}"
        va, vb, vd = a.get(k), b.get(k), (defaults or {}).get(k)
        if k not in a and vb == vd:
            continue
        if isinstance(va, dict) and isinstance(vb, dict) and name not in ("model.config", "data.options"):
            out += _config_diff(va, vb, vd if isinstance(vd, dict) else {}, name + ".")
        elif va != vb and name not in _COSMETIC_KEYS:
            out.append(name)
    return out


def _progress(enabled: bool, by_tokens: bool = False):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train[/bold]"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok") if by_tokens else MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def train(
    cfg: TrainConfig,
    *,
    model: nn.Module | None = None,
    source: DataSource | BatchSource | None = None,
    loss: LossHook | None = None,
    callbacks: Sequence[Callback] = (),
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` as ``cfg.optim`` and ``cfg.run`` say; resume from ``run.out_dir``.

    Args:
        cfg: the full config (saved with every checkpoint; a resumed run must have the same one, up to cosmetic
            keys such as ``run.progress``).
        model: use this model instead of building one from ``cfg.model`` (its parameters are trained in place).
        source: use this data source instead of building one from ``cfg.data``: a ``DataSource`` of token rows, or
            a :class:`BatchSource` of whole batches (then ``data.source`` and ``data.options`` only describe it).
        loss: what the loss of a batch is (default :class:`TokenCrossEntropy`, for token rows).
        callbacks: run after every step (:class:`Callback`); their state is checkpointed.
        stop_after: stop once this many optimizer steps are done in total (as if the run had been killed), after
            any checkpoint due at that step. The run directory is left resumable.

    Returns:
        A :class:`TrainResult`.
    """
    ctx = _setup_dist(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    accum = cfg.accumulation_steps(ctx.world)
    out_dir = Path(cfg.run.out_dir)
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    cuda_devices = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            return _train(cfg, ctx, accum, out_dir, model, source, loss, list(callbacks), stop_after)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _schedule_step(step: int, tokens: int, cfg: TrainConfig) -> float:
    """Where the schedule is at step ``step`` with ``tokens`` done: the step, or the token clock's step."""
    if cfg.run.max_tokens:
        return cfg.run.max_steps * tokens / cfg.run.max_tokens
    return step


def _run_state(source: Any, callbacks: list[Callback]) -> dict[str, Any]:
    state_of = getattr(source, "state_dict", None)
    return {
        "source": state_of() if callable(state_of) else None,
        "callbacks": [cb.state_dict() for cb in callbacks],
    }


def _restore_run_state(ck: ckpt_io.Checkpoint, source: Any, callbacks: list[Callback]) -> None:
    skeleton = ck.meta.get("run_state")
    if skeleton is None:
        return
    state = load_tree(ck.path / "run_state.safetensors", skeleton)
    if len(state["callbacks"]) != len(callbacks):
        raise CheckpointError(
            f"{ck.path}: saved with {len(state['callbacks'])} callbacks, this run has {len(callbacks)}"
        )
    if state["source"] is not None:
        source.load_state_dict(state["source"])
    for cb, st in zip(callbacks, state["callbacks"], strict=True):
        cb.load_state_dict(st)


def _train(
    cfg: TrainConfig,
    ctx: _Dist,
    accum: int,
    out_dir: Path,
    model: nn.Module | None,
    source: DataSource | BatchSource | None,
    loss_fn: LossHook | None,
    callbacks: list[Callback],
    stop_after: int | None,
) -> TrainResult:
    run = cfg.run
    if model is None:
        model = build_model(cfg.model, run.seed)
    model = model.to(ctx.device)
    model.train()
    if source is None:
        source = build_source(cfg.data)
    by_step = isinstance(source, BatchSource)
    if not by_step and source.seq_len != cfg.data.seq_len:
        raise ConfigError(f"data source yields seq_len={source.seq_len}, config says data.seq_len={cfg.data.seq_len}")
    if loss_fn is None:
        loss_fn = TokenCrossEntropy()
    optimizer = make_optimizer(model, cfg.optim)
    # training randomness (dropout, if a model has any) comes from the global torch RNG, seeded per process
    # (inside the fork_rng of train(): the caller's RNG is left as it was)
    torch.manual_seed(run.seed * 1_000_003 + 7919 * (ctx.rank + 1))

    start, tokens_done, elapsed_before, step_s_before = 0, 0, 0.0, 0.0
    latest = ckpt_io.latest_checkpoint(out_dir) if run.resume else None
    if latest is not None:
        ck = ckpt_io.read_checkpoint(latest)
        diff = _config_diff(ck.meta["config"], to_dict(cfg), to_dict(TrainConfig()))
        if diff:
            raise ConfigError(
                f"cannot resume {latest}: the config differs in {', '.join(diff)} "
                "(use another run.out_dir, or run.resume=false to start over)"
            )
        ckpt_io.load_model_tensors(ck, model)
        ckpt_io.load_optimizer(ck, optimizer)
        ckpt_io.restore_rng(ck, ctx.rank)
        _restore_run_state(ck, source, callbacks)
        start = ck.step
        tokens_done = int(ck.meta.get("tokens", 0))
        elapsed_before = float(ck.meta.get("elapsed", 0.0))
        step_s_before = float(ck.meta.get("step_seconds", 0.0))
        if ctx.main:
            _truncate_metrics(out_dir / "metrics.jsonl", start)
    elif ctx.main and (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()
    ctx.barrier()

    net: nn.Module = model
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if cuda_ok(ctx) else None)
    autocast = (
        torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)
        if run.autocast == "bfloat16"
        else contextlib.nullcontext()
    )
    end = run.max_steps if stop_after is None else min(run.max_steps, stop_after)
    if run.max_tokens:  # the budget ends the run; stop_after still stops it early
        end = stop_after if stop_after is not None else sys.maxsize

    def more(step: int) -> bool:
        if step >= end:
            return False
        return tokens_done < run.max_tokens if run.max_tokens else True

    metrics_path = out_dir / "metrics.jsonl"
    interactive = sys.stdout.isatty()
    last_loss = float("nan")
    t_run = time.perf_counter()
    step_s = 0.0
    busy_log, tok_log = 0.0, 0  # time spent in steps (not checkpoints) and tokens since the last log line
    total = run.max_tokens or run.max_steps
    with _progress(run.progress and ctx.main, by_tokens=bool(run.max_tokens)) as bar:
        task = bar.add_task(
            "train", total=total, completed=tokens_done if run.max_tokens else start, loss=float("nan"), tps=0.0
        )
        step = start
        while more(step):
            t_step = time.perf_counter()
            net.train()
            lr = lr_at(_schedule_step(step, tokens_done, cfg), cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            if by_step:
                batches = [source.batch(step, m * ctx.world + ctx.rank, accum * ctx.world) for m in range(accum)]
            else:
                batches = [
                    make_batch(
                        source, step_rows(step, m, ctx.rank, run.global_batch_size, run.micro_batch_size, ctx.world)
                    )
                    for m in range(accum)
                ]
            n_local = torch.tensor(sum(loss_fn.count(b) for b in batches), dtype=torch.float64)
            n_global = float(ctx.all_sum(n_local))
            if n_global == 0:
                raise ConfigError(f"global batch {step} has no loss terms (every label is {IGNORE_INDEX})")
            loss_sum = torch.zeros((), dtype=torch.float64)
            for m, batch in enumerate(batches):
                batch = _to_device(batch, ctx.device)
                sync = ctx.world == 1 or m == accum - 1
                with contextlib.nullcontext() if sync else net.no_sync(), autocast:
                    part = loss_fn(net, batch)
                (part * (ctx.world / n_global)).backward()
                loss_sum += part.detach().double().cpu()
            if cfg.optim.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
            else:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                grad_norm = float(torch.nn.utils.get_total_norm(grads))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            last_loss = float(ctx.all_sum(loss_sum)) / n_global
            if by_step:
                step_tokens = int(ctx.all_sum(torch.tensor(sum(loss_fn.tokens(b) for b in batches))))
            else:
                step_tokens = run.global_batch_size * cfg.data.seq_len
            tokens_done += step_tokens
            tok_log += step_tokens
            step += 1
            done = step
            now = time.perf_counter()
            busy_log += now - t_step
            step_s += now - t_step
            if ctx.main:
                tps = tok_log / max(busy_log, 1e-9)
                bar.update(task, completed=tokens_done if run.max_tokens else done, loss=last_loss, tps=tps)
                spent = bool(run.max_tokens) and tokens_done >= run.max_tokens
                if done % run.log_every == 0 or done == run.max_steps or spent:
                    rec = {
                        "step": done,
                        "loss": last_loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": tokens_done,
                        "tokens_per_s": tps,
                        "elapsed": elapsed_before + now - t_run,
                    }
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                    if not interactive and run.progress:
                        print(
                            f"step {done}/{run.max_steps} loss {last_loss:.4f} lr {lr:.2e} "
                            f"{tps:,.0f} tok/s {rec['elapsed']:.0f}s",
                            flush=True,
                        )
                    busy_log, tok_log = 0.0, 0
            info = StepInfo(done, last_loss, tokens_done, lr)
            for cb in callbacks:
                cb.on_step(model, info)
            complete = run.max_tokens and tokens_done >= run.max_tokens
            due = (run.checkpoint_every and done % run.checkpoint_every == 0) or done == run.max_steps or complete
            if due:
                _save(
                    cfg,
                    ctx,
                    out_dir,
                    done,
                    model,
                    optimizer,
                    tokens_done,
                    elapsed_before + time.perf_counter() - t_run,
                    step_s_before + step_s,
                    _run_state(source, callbacks),
                )

    elapsed = elapsed_before + time.perf_counter() - t_run
    final_step = step
    finished = (tokens_done >= run.max_tokens) if run.max_tokens else final_step == run.max_steps
    if ctx.main and finished and final_step > start:
        _finish(cfg, out_dir, model, getattr(source, "tokenizer", None))
    ctx.barrier()
    model.eval()
    return TrainResult(
        model=model,
        step=final_step,
        resumed_from=start,
        last_loss=last_loss,
        tokens=tokens_done,
        elapsed=elapsed,
        out_dir=out_dir,
        step_seconds=step_s_before + step_s,
    )


def _to_device(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, a tuple or list of them, or an object with ``.to(device)``) on ``device``."""
    if isinstance(batch, torch.Tensor) or hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def cuda_ok(ctx: _Dist) -> bool:
    return ctx.device.type == "cuda"


def _save(
    cfg: TrainConfig,
    ctx: _Dist,
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: int,
    elapsed: float,
    step_seconds: float,
    run_state: dict[str, Any],
) -> None:
    """Checkpoint after ``step`` steps: rank 0 writes model, optimizer and the run state of source and callbacks,
    every rank its RNG, rank 0 commits."""
    tmp = ckpt_io.checkpoint_dir(out_dir, step).with_name(ckpt_io.checkpoint_dir(out_dir, step).name + ".tmp")
    if ctx.main:
        tmp = ckpt_io.begin_checkpoint(out_dir, step)
    ctx.barrier()
    ckpt_io.write_rng(tmp, ctx.rank)
    if ctx.main:
        ckpt_io.write_model(tmp, model)
        opt_meta = ckpt_io.write_optimizer(tmp, optimizer)
        state_skeleton = save_tree(tmp / "run_state.safetensors", run_state)
    ctx.barrier()
    if ctx.main:
        meta = {
            "step": step,
            "sequences_read": step * cfg.run.global_batch_size,
            "world_size": ctx.world,
            "scheduler": {
                "kind": "warmup_cosine",
                "step": step,
                "lr_next": lr_at(_schedule_step(step, tokens, cfg), cfg),
            },
            "optimizer": opt_meta,
            "run_state": state_skeleton,
            "tokens": tokens,
            "elapsed": elapsed,
            "step_seconds": step_seconds,
            "config": to_dict(cfg),
        }
        final = ckpt_io.finish_checkpoint(tmp, meta)
        ckpt_io.prune_checkpoints(out_dir, cfg.run.keep_checkpoints, protect=[final])
        plot = out_dir / "loss.png"
        # refresh the plot at most once a minute (drawing costs a fraction of a second); always at the end
        if cfg.run.plots and (not plot.exists() or time.time() - plot.stat().st_mtime > 60):
            plot_metrics(read_metrics(out_dir / "metrics.jsonl"), plot)
    ctx.barrier()


def _finish(cfg: TrainConfig, out_dir: Path, model: nn.Module, tokenizer: Any) -> None:
    """Final artifacts: the model in its own format (``final/``) with the data's tokenizer and the config beside
    it, and the loss plot."""
    final = out_dir / "final"
    save = getattr(model, "save_pretrained", None)
    if save is not None:
        save(final)
    else:  # a model without its own format: its tensors, read back with the config beside them
        import safetensors.torch

        final.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_model(model, str(final / "model.safetensors"))
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(final)
    (final / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=1), encoding="utf-8")
    (out_dir / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=1), encoding="utf-8")
    if cfg.run.plots:
        plot_metrics(read_metrics(out_dir / "metrics.jsonl"), out_dir / "loss.png")
