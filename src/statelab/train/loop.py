"""The training loop: one readable function for every statelab model (anything with ``logits, state = model(x)``).

What it does per optimizer step ``s`` (all processes together):

1. ``lr = lr_at(s)``: linear warmup, then cosine decay to ``min_lr`` (a pure function of the step, so the
   scheduler state is the step count);
2. read global batch ``s`` (sequences ``s*G .. s*G+G-1``, see :func:`statelab.train.data.step_rows`), this
   process's rows, in ``accumulation`` micro-batches;
3. loss = sum of token cross-entropies / number of loss tokens in the *whole global batch*. Each process scales its
   partial sum by ``world_size / n_global`` so that DDP's gradient average is exactly the gradient of that loss:
   the same objective whatever the number of processes or micro-batches;
4. clip the global gradient norm, AdamW step (no weight decay on ``A_log``, ``dt_bias``, ``D``, norms, biases);
5. every ``checkpoint_every`` steps, an atomic checkpoint (model, optimizer, RNG, step, config) from which a
   resumed run continues bit for bit.

Metrics go to ``metrics.jsonl`` (one JSON object per logged step) and ``loss.png``; the trained model to
``final/`` through its ``save_pretrained``. Under ``torchrun`` (``WORLD_SIZE > 1``) the loop runs DDP with NCCL on
CUDA and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from statelab.errors import CheckpointError, ConfigError
from statelab.train import checkpoint as ckpt_io
from statelab.train.config import ModelSection, TrainConfig, to_dict
from statelab.train.data import IGNORE_INDEX, DataSource, build_source, make_batch, step_rows

__all__ = [
    "TrainResult",
    "train",
    "lr_at",
    "param_groups",
    "build_model",
    "NO_DECAY_NAMES",
    "ARCHITECTURES",
    "plot_metrics",
    "read_metrics",
]

# Parameters named like this (last name component) get no weight decay: decaying A_log, dt_bias or D would pull the
# SSM's time constants and skip connection toward arbitrary values (mamba_ssm marks them ``_no_weight_decay``).
NO_DECAY_NAMES = frozenset({"A_log", "dt_bias", "D", "bias"})

# arch -> (module, config class, model class)
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "mamba1": ("statelab.models.mamba1", "Mamba1Config", "Mamba1LM"),
    "mamba2": ("statelab.models.mamba2", "Mamba2Config", "Mamba2LM"),
}

# Config keys that do not change the trajectory of a run: they may differ between a run and its resumption.
_COSMETIC_KEYS = frozenset(
    {"run.progress", "run.resume", "run.threads", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints"}
)


@dataclass
class TrainResult:
    """What a call to :func:`train` did.

    Attributes:
        model: the trained model (unwrapped from DDP), in eval mode.
        step: optimizer steps completed in total (including those of earlier runs this one resumed).
        resumed_from: the step the run resumed from (0 for a fresh run).
        last_loss: the mean training loss of the last step taken, ``nan`` when no step was taken.
        tokens: input tokens processed in total, over all processes.
        elapsed: seconds of training in total, over all resumptions.
        out_dir: the run directory.
    """

    model: nn.Module
    step: int
    resumed_from: int
    last_loss: float
    tokens: int
    elapsed: float
    out_dir: Path


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine from ``lr`` to ``min_lr``."""
    o, total = cfg.optim, cfg.run.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, total - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; vectors, ``A_log``, ``dt_bias``, ``D``, norms and biases do not.

    Parameters a module marks with ``_no_weight_decay = True`` do not decay either. Tied parameters appear once.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or leaf in NO_DECAY_NAMES or "norm" in name or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_model(section: ModelSection, seed: int) -> nn.Module:
    """A fresh model of ``section.arch`` with ``section.config``, initialised from ``seed``; or the checkpoint
    ``section.init_from``. The global torch RNG of the caller is left untouched.
    """
    if section.init_from:
        from statelab.models.loading import load_model

        return load_model(section.init_from)
    if section.arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch={section.arch!r} is unknown; known: {', '.join(sorted(ARCHITECTURES))}")
    mod_name, cfg_name, model_name = ARCHITECTURES[section.arch]
    mod = importlib.import_module(mod_name)
    cfg_cls, model_cls = getattr(mod, cfg_name), getattr(mod, model_name)
    try:
        model_cfg = cfg_cls(**section.config)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.config is not a valid {cfg_name}: {e}") from e
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(model_cfg)


# ---- distributed helpers -------------------------------------------------------------------------------------


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


# ---- metrics ---------------------------------------------------------------------------------------------------


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


# ---- the loop --------------------------------------------------------------------------------------------------


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        name = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and name not in ("model.config", "data.options"):
            out += _config_diff(va, vb, name + ".")
        elif va != vb and name not in _COSMETIC_KEYS:
            out.append(name)
    return out


def _progress(enabled: bool):
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
        MofNCompleteColumn(),
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
    source: DataSource | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` as ``cfg.optim`` and ``cfg.run`` say; resume from ``run.out_dir``.

    Args:
        cfg: the full config (saved with every checkpoint; a resumed run must have the same one, up to cosmetic
            keys such as ``run.progress``).
        model: use this model instead of building one from ``cfg.model`` (its parameters are trained in place).
        source: use this data source instead of building one from ``cfg.data``.
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
            return _train(cfg, ctx, accum, out_dir, model, source, stop_after)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    ctx: _Dist,
    accum: int,
    out_dir: Path,
    model: nn.Module | None,
    source: DataSource | None,
    stop_after: int | None,
) -> TrainResult:
    run = cfg.run
    if model is None:
        model = build_model(cfg.model, run.seed)
    model = model.to(ctx.device)
    model.train()
    if source is None:
        source = build_source(cfg.data)
    if source.seq_len != cfg.data.seq_len:
        raise ConfigError(f"data source yields seq_len={source.seq_len}, config says data.seq_len={cfg.data.seq_len}")
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps
    )
    # training randomness (dropout, if a model has any) comes from the global torch RNG, seeded per process
    torch.manual_seed(run.seed * 1_000_003 + 7919 * (ctx.rank + 1))

    start, tokens_done, elapsed_before = 0, 0, 0.0
    latest = ckpt_io.latest_checkpoint(out_dir) if run.resume else None
    if latest is not None:
        ck = ckpt_io.read_checkpoint(latest)
        diff = _config_diff(ck.meta["config"], to_dict(cfg))
        if diff:
            raise ConfigError(
                f"cannot resume {latest}: the config differs in {', '.join(diff)} "
                "(use another run.out_dir, or run.resume=false to start over)"
            )
        ckpt_io.load_model_tensors(ck, model)
        ckpt_io.load_optimizer(ck, optimizer)
        ckpt_io.restore_rng(ck, ctx.rank)
        start = ck.step
        tokens_done = int(ck.meta.get("tokens", 0))
        elapsed_before = float(ck.meta.get("elapsed", 0.0))
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
    metrics_path = out_dir / "metrics.jsonl"
    interactive = sys.stdout.isatty()
    last_loss = float("nan")
    t_run = time.perf_counter()
    busy_log, tok_log = 0.0, 0  # time spent in steps (not checkpoints) and tokens since the last log line
    with _progress(run.progress and ctx.main) as bar:
        task = bar.add_task("train", total=run.max_steps, completed=start, loss=float("nan"), tps=0.0)
        for step in range(start, end):
            t_step = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batches = [
                make_batch(source, step_rows(step, m, ctx.rank, run.global_batch_size, run.micro_batch_size, ctx.world))
                for m in range(accum)
            ]
            n_local = torch.tensor(float(sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)))
            n_global = float(ctx.all_sum(n_local))
            if n_global == 0:
                raise ConfigError(f"global batch {step} has no loss tokens (every label is {IGNORE_INDEX})")
            loss_sum = torch.zeros((), dtype=torch.float64)
            for m, (x, y) in enumerate(batches):
                x, y = x.to(ctx.device), y.to(ctx.device)
                sync = ctx.world == 1 or m == accum - 1
                with contextlib.nullcontext() if sync else net.no_sync(), autocast:
                    out = net(x)
                    logits = out[0] if isinstance(out, tuple) else out
                    part = F.cross_entropy(
                        logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                    )
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
            step_tokens = run.global_batch_size * cfg.data.seq_len
            tokens_done += step_tokens
            tok_log += step_tokens
            done = step + 1
            now = time.perf_counter()
            busy_log += now - t_step
            if ctx.main:
                tps = tok_log / max(busy_log, 1e-9)
                bar.update(task, completed=done, loss=last_loss, tps=tps)
                if done % run.log_every == 0 or done == run.max_steps:
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
            due = (run.checkpoint_every and done % run.checkpoint_every == 0) or done == run.max_steps
            if due:
                _save(cfg, ctx, out_dir, done, model, optimizer, tokens_done, elapsed_before + now - t_run)

    elapsed = elapsed_before + time.perf_counter() - t_run
    final_step = end if end > start else start
    if ctx.main and final_step == run.max_steps and end > start:
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
    )


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
) -> None:
    """Checkpoint after ``step`` steps: rank 0 writes model and optimizer, every rank its RNG, rank 0 commits."""
    tmp = ckpt_io.checkpoint_dir(out_dir, step).with_name(ckpt_io.checkpoint_dir(out_dir, step).name + ".tmp")
    if ctx.main:
        tmp = ckpt_io.begin_checkpoint(out_dir, step)
    ctx.barrier()
    ckpt_io.write_rng(tmp, ctx.rank)
    if ctx.main:
        ckpt_io.write_model(tmp, model)
        opt_meta = ckpt_io.write_optimizer(tmp, optimizer)
    ctx.barrier()
    if ctx.main:
        meta = {
            "step": step,
            "sequences_read": step * cfg.run.global_batch_size,
            "world_size": ctx.world,
            "scheduler": {"kind": "warmup_cosine", "step": step, "lr_next": lr_at(step, cfg)},
            "optimizer": opt_meta,
            "tokens": tokens,
            "elapsed": elapsed,
            "config": to_dict(cfg),
        }
        final = ckpt_io.finish_checkpoint(tmp, meta)
        ckpt_io.prune_checkpoints(out_dir, cfg.run.keep_checkpoints, protect=[final])
        plot = out_dir / "loss.png"
        # refresh the plot at most once a minute (drawing costs a fraction of a second); always at the end
        if not plot.exists() or time.time() - plot.stat().st_mtime > 60:
            plot_metrics(read_metrics(out_dir / "metrics.jsonl"), plot)
    ctx.barrier()


def _finish(cfg: TrainConfig, out_dir: Path, model: nn.Module, tokenizer: Any) -> None:
    """Final artifacts: the model in its own format (``final/``) with the data's tokenizer and the config beside
    it, and the loss plot."""
    final = out_dir / "final"
    save = getattr(model, "save_pretrained", None)
    if save is None:
        raise CheckpointError(f"{type(model).__name__} has no save_pretrained; cannot write the final model")
    save(final)
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(final)
    (final / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=1), encoding="utf-8")
    (out_dir / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=1), encoding="utf-8")
    plot_metrics(read_metrics(out_dir / "metrics.jsonl"), out_dir / "loss.png")
