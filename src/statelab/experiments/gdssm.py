"""The GD-SSM study: trained GD-SSM vs gradient descent vs other sequence models on in-context linear regression.

``statelab gdssm run --config configs/gdssm/quick.toml`` runs every (model, seed) of a config, records each run
(failures are counted and reported, not fatal) and writes ``runs/<name>/`` with ``config.json``,
``results.json``, ``report.md`` and PNG plots. The protocol follows the public code of arXiv 2410.11687:
d = N = 10, x ~ U(−0.5, 0.5), w ~ N(0, I), fresh tasks every step, ½·MSE at the query, Adam on
the recurrence (Λ, log Δ) and AdamW with weight decay on everything else, constant learning rate.

Measured per run: test loss at the query; for GD-SSM also the prediction cosine and sensitivity cosine
(``∂ŷ/∂x_q``, row by row) to k-step GD at its optimal η, the symmetry-canonicalised parameters, the loss of the
parameter average with the construction (interpolation) and the loss at every in-context position.

Every run trains through the shared loop of :mod:`statelab.train` (:func:`train_run`): fresh regression batches
by step, a query-only ½·MSE as its loss hook, one AdamW under the loop's no-decay rule (the recurrence Λ, log Δ at
``lr_recurrence`` and without decay; matrices with decay; vectors such as D without), a constant schedule and no
clipping; validation and progress as a callback. A run directory keeps its checkpoints, so a study stopped half
way resumes each run bit for bit.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from statelab.config import apply_overrides, from_dict, read_config_file, to_dict
from statelab.errors import ConfigError
from statelab.eval.gd_reference import (
    gd_predict,
    gd_prefix_predict,
    gd_weights,
    least_squares_predict,
    one_step_optimum,
    optimal_gd_lr,
    prefix_loss,
    zero_predictor_loss,
)
from statelab.eval.metrics import cosine, row_cosine
from statelab.layers.attention import CausalSelfAttention
from statelab.layers.gd_ssm import GDSSM, GDSSMConfig, make_windows
from statelab.layers.linear_attention import LinearSelfAttention
from statelab.layers.norm import RMSNorm
from statelab.layers.s5 import S5Layer
from statelab.tasks.regression import (
    RegressionBatch,
    RegressionConfig,
    batch_seed,
    half_mse,
    interleave,
    make_regression_batch,
)
from statelab.train.config import DataSection, ModelSection, OptimSection, RunSection, TrainConfig, config_digest
from statelab.train.loop import Callback, StepInfo, seeded_init
from statelab.train.loop import train as train_loop

__all__ = [
    "TrainSection",
    "GDSSMSection",
    "BaselineSection",
    "ExperimentConfig",
    "RunSpec",
    "load_config",
    "plan_runs",
    "SeqRegressor",
    "BASELINE_MIXERS",
    "build_model",
    "model_inputs",
    "query_prediction",
    "train_config",
    "train_run",
    "execute_run",
    "report_from_files",
    "canonical_parameters",
    "run_experiment",
]


@dataclass(frozen=True)
class TrainSection:
    """Optimisation, shared by every model of a config (the same budget for all).

    Attributes:
        steps: optimiser steps, one fresh batch of ``batch_size`` tasks each.
        lr: AdamW learning rate of every weight outside the recurrence (GD-SSM: W_q, C, D).
        lr_recurrence: learning rate of GD-SSM's Λ and log Δ (no weight decay).
        weight_decay: AdamW weight decay of the matrices (:func:`statelab.train.loop.param_groups`: vectors,
            biases, norms and the recurrence get none). eval_every: steps between validation losses (and
            checkpoints).
        val_tasks / test_tasks: sizes of the fixed validation and test sets (the same for every seed).
        baseline_lr: AdamW learning rate of the baselines.
    """

    steps: int = 10_000
    batch_size: int = 64
    lr: float = 2e-4
    lr_recurrence: float = 1e-4
    weight_decay: float = 0.05
    eval_every: int = 250
    val_tasks: int = 2000
    test_tasks: int = 10_000
    baseline_lr: float = 1e-3


@dataclass(frozen=True)
class GDSSMSection:
    """GD-SSM models: one run per depth (layers) and seed.

    Attributes:
        depths: layer counts to train. decay: ``"real"`` or ``"negative"`` (see :mod:`statelab.layers.gd_ssm`).
        backend: the scan used in training, ``"naive"`` (the loop; fastest for N = 10 windows) or ``"chunk"``.
        init_scale: factor on the initial standard deviation of W_q and C for the depth runs (1 = public code).
        extra_init_scales: further init scales, run for one layer only (an initialisation ablation).
    """

    depths: tuple[int, ...] = (1, 2, 3, 4)
    decay: str = "real"
    backend: str = "naive"
    init_scale: float = 1.0
    extra_init_scales: tuple[float, ...] = ()


@dataclass(frozen=True)
class BaselineSection:
    """Baselines: each mixer with and/or without the window ``[x_i; y_i; x_{i+1}]`` as its tokens.

    Attributes:
        models: names from :data:`BASELINE_MIXERS`. windows: which input formats to run.
        width: residual width M. layers: mixer blocks. heads: attention heads. d_state: SSM state size.
        seeds: the seeds of the baseline runs (empty: the config's seeds); same steps and batch as GD-SSM.
    """

    models: tuple[str, ...] = ("lsa", "s5", "mamba1", "mamba2", "transformer")
    windows: tuple[bool, ...] = (False, True)
    width: int = 32
    layers: int = 2
    heads: int = 2
    d_state: int = 16
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole study. ``seeds`` seed the model initialisation and the training task stream of each run."""

    name: str = "gdssm"
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1
    workers: int = 1
    out_dir: str = "runs"
    eta_tasks: int = 100_000
    task: RegressionConfig = field(default_factory=RegressionConfig)
    train: TrainSection = field(default_factory=TrainSection)
    gdssm: GDSSMSection = field(default_factory=GDSSMSection)
    baselines: BaselineSection = field(default_factory=BaselineSection)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("ExperimentConfig.seeds must name at least one seed")
        if self.task.function != "linear":
            raise ConfigError("the GD-SSM study runs the linear task")
        for m in self.baselines.models:
            if m not in BASELINE_MIXERS:
                raise ConfigError(f"unknown baseline {m!r}; known: {sorted(BASELINE_MIXERS)}")
        if any(d < 1 for d in self.gdssm.depths):
            raise ConfigError(f"depths must be >= 1, got {self.gdssm.depths}")
        if self.gdssm.backend not in ("naive", "chunk") or self.gdssm.decay not in ("real", "negative"):
            raise ConfigError(f"gdssm.backend must be naive|chunk and decay real|negative, got {self.gdssm}")
        if self.threads < 1 or self.workers < 1:
            raise ConfigError(f"threads and workers must be >= 1, got {self.threads}, {self.workers}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a TOML or JSON config through :mod:`statelab.config`, then apply ``key=value`` overrides
    (``seeds=[0,1]``, ``train.steps=200``, ``gdssm.depths=[1]``). Unknown keys, wrong types and invalid values are
    :class:`ConfigError` naming the key."""
    return from_dict(ExperimentConfig, apply_overrides(read_config_file(path), overrides))


@dataclass(frozen=True)
class RunSpec:
    """One training run: ``kind`` is ``"gdssm"`` or a baseline mixer name."""

    kind: str
    seed: int
    depth: int = 1
    window: bool = False
    init_scale: float | None = None

    @property
    def label(self) -> str:
        if self.kind == "gdssm":
            return f"gdssm-L{self.depth}" + ("" if self.init_scale is None else f"-init{self.init_scale:g}")
        return f"{self.kind}{'+window' if self.window else ''}"


def plan_runs(config: ExperimentConfig) -> list[RunSpec]:
    """Every run of a config: GD-SSM depths, the init-scale ablation (1 layer), then baselines × window formats,
    each for every seed."""
    runs = [RunSpec("gdssm", s, depth=d) for d in config.gdssm.depths for s in config.seeds]
    runs += [RunSpec("gdssm", s, init_scale=x) for x in config.gdssm.extra_init_scales for s in config.seeds]
    b = config.baselines
    runs += [RunSpec(m, s, window=w) for m in b.models for w in b.windows for s in (b.seeds or config.seeds)]
    return runs


# rough relative cost per step on CPU, to hand the longest runs to the workers first
_COST = {"mamba1": 8.0, "mamba2": 3.0, "transformer": 2.0, "s5": 1.4, "lsa": 1.0, "gdssm": 0.4}


def _order(spec: RunSpec) -> tuple[int, float]:
    """Submission order for workers: GD-SSM runs first, longest first (the study's subject); then the baselines,
    cheapest first, so that an interrupted study has as many baselines as possible."""
    cost = _COST.get(spec.kind, 1.0) * (spec.depth if spec.kind == "gdssm" else 1.0) * (0.7 if spec.window else 1.0)
    return (0, -cost) if spec.kind == "gdssm" else (1, cost)


def _mamba1_mixer(width: int, d_state: int) -> nn.Module:
    """statelab's Mamba-1 mixer, expand 2, dt_rank ⌈M/16⌉."""
    from statelab.layers.mamba1 import Mamba1Mixer

    return Mamba1Mixer(d_model=width, d_inner=2 * width, d_state=d_state, dt_rank=math.ceil(width / 16))


def _mamba2_mixer(width: int, d_state: int) -> nn.Module:
    from statelab.layers.mamba2 import Mamba2Mixer

    return Mamba2Mixer(d_model=width, d_inner=2 * width, d_state=d_state, n_groups=1, head_dim=16)


def _rms_norm(width: int) -> RMSNorm:
    """The baselines' norm, with the numerics of ``torch.nn.RMSNorm`` (eps: the machine epsilon)."""
    return RMSNorm(width, eps=None, style="torch")


# name -> (builder(width, d_state, heads), uses pre-norm blocks, has an MLP after the mixer)
BASELINE_MIXERS: dict[str, tuple[Any, bool, bool]] = {
    "lsa": (lambda w, n, h: LinearSelfAttention(w, n_heads=h, d_key=w // h, d_value=w // h), False, False),
    "s5": (lambda w, n, h: S5Layer(w, d_state=n), True, False),
    "mamba1": (lambda w, n, h: _mamba1_mixer(w, n), True, False),
    "mamba2": (lambda w, n, h: _mamba2_mixer(w, n), True, False),
    "transformer": (lambda w, n, h: CausalSelfAttention(w, n_heads=h), True, True),
}


class SeqRegressor(nn.Module):
    """Read-in → L residual mixer blocks → read-out, for any mixer with ``y, state = mixer(x, state)``.

    ``pred, state = model(x [B, T, d_in], state=None)``: ``pred: [B, T, E]`` at every position; the state is
    ``(n_tokens, [per-layer states])`` after the last token. The Transformer adds learned absolute positions
    (``max_len``) and an MLP per block; LSA blocks have no norm (von Oswald's LSA is purely linear).

    Like :class:`~statelab.layers.gd_ssm.GDSSM` this is a regressor over real-valued tokens, not a language model,
    so it is not a ``StatefulLM`` and its state is not a ``State`` (see :class:`~statelab.layers.gd_ssm.GDSSMState`
    for the reasons); its per-layer states are whatever each baseline mixer returns.
    """

    def __init__(
        self,
        mixer: str,
        d_in: int,
        d_out: int,
        width: int = 32,
        layers: int = 2,
        heads: int = 2,
        d_state: int = 16,
        max_len: int = 64,
    ) -> None:
        super().__init__()
        if mixer not in BASELINE_MIXERS:
            raise ConfigError(f"unknown mixer {mixer!r}; known: {sorted(BASELINE_MIXERS)}")
        build, self.use_norm, use_mlp = BASELINE_MIXERS[mixer]
        self.mixer_name = mixer
        self.read_in = nn.Linear(d_in, width)
        self.pos = nn.Embedding(max_len, width) if mixer == "transformer" else None
        self.mixers = nn.ModuleList(build(width, d_state, heads) for _ in range(layers))
        self.norms = nn.ModuleList(_rms_norm(width) for _ in range(layers)) if self.use_norm else None
        self.mlps = (
            nn.ModuleList(
                nn.Sequential(_rms_norm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                for _ in range(layers)
            )
            if use_mlp
            else None
        )
        self.norm_f = _rms_norm(width) if self.use_norm else nn.Identity()
        self.read_out = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor, state: tuple[int, list[Any]] | None = None) -> tuple[torch.Tensor, Any]:
        start, layer_states = (0, [None] * len(self.mixers)) if state is None else state
        h = self.read_in(x)
        if self.pos is not None:
            if start + x.shape[1] > self.pos.num_embeddings:
                raise ConfigError(f"sequence longer than max_len={self.pos.num_embeddings}")
            h = h + self.pos(torch.arange(start, start + x.shape[1], device=x.device))
        new_states = []
        for i, mixer in enumerate(self.mixers):
            u = self.norms[i](h) if self.norms is not None else h
            y, s = mixer(u, layer_states[i])
            new_states.append(s)
            h = h + y
            if self.mlps is not None:
                h = h + self.mlps[i](h)
        return self.read_out(self.norm_f(h)), (start + x.shape[1], new_states)


def model_inputs(spec: RunSpec, batch: RegressionBatch) -> torch.Tensor:
    """The tokens a run's model reads.

    GD-SSM: interleaved tokens ``[B, 2N + 1, d]``. Baselines without window: interleaved tokens plus a flag
    channel (1 on y tokens; with vector targets x and y tokens are otherwise indistinguishable): ``[B, 2N + 1,
    d + 1]``. With window: one token per window ``[x_i; y_i; x_{i+1}]``: ``[B, N, 3d]``.
    """
    tokens = interleave(batch)
    if spec.kind == "gdssm":
        return tokens
    if spec.window:
        windows, _ = make_windows(tokens)
        return windows.flatten(2)
    flag = torch.zeros(*tokens.shape[:2], 1, dtype=tokens.dtype)
    flag[:, 1::2] = 1.0
    return torch.cat([tokens, flag], dim=-1)


def build_model(spec: RunSpec, config: ExperimentConfig) -> nn.Module:
    """A freshly initialised model for ``spec`` (initialised from ``spec.seed``, global RNG left untouched)."""
    d, e = config.task.d, config.task.e
    b = config.baselines
    with seeded_init(spec.seed):
        if spec.kind == "gdssm":
            scale = config.gdssm.init_scale if spec.init_scale is None else spec.init_scale
            gd = GDSSMConfig(d=d, num_layers=spec.depth, decay=config.gdssm.decay, init_scale=scale)
            return GDSSM(gd, backend=config.gdssm.backend)
        d_in = 3 * d if spec.window else d + 1
        return SeqRegressor(
            spec.kind, d_in, e, b.width, b.layers, b.heads, b.d_state, max_len=2 * config.task.n_examples + 1
        )


def query_prediction(spec: RunSpec, model: nn.Module, inputs: torch.Tensor, e: int) -> torch.Tensor:
    """The prediction for the query: ``[B, E]`` (GD-SSM: the last window's ``−z``, last coordinate if E = 1)."""
    pred, _ = model(inputs)
    last = pred[:, -1]
    if spec.kind == "gdssm":
        return last[:, -e:]
    return last


def train_config(spec: RunSpec, config: ExperimentConfig, out_dir: str | Path, world_size: int = 1) -> TrainConfig:
    """The :class:`~statelab.train.config.TrainConfig` of one run: a constant learning rate (``lr``, or
    ``baseline_lr`` for a baseline; GD-SSM's Λ and log Δ at ``lr_recurrence``), AdamW's default betas, no
    clipping, one batch of ``batch_size`` tasks per step (split over ``world_size`` processes), a checkpoint every
    ``eval_every`` steps."""
    tr = config.train
    lr = tr.lr if spec.kind == "gdssm" else tr.baseline_lr
    scale = {"lam": tr.lr_recurrence / tr.lr, "log_step": tr.lr_recurrence / tr.lr} if spec.kind == "gdssm" else {}
    n = config.task.n_examples
    return TrainConfig(
        model=ModelSection(arch=spec.kind, config={"spec": asdict(spec), "gdssm": asdict(config.gdssm)}),
        data=DataSection(
            source="regression",
            seq_len=2 * n + 1 if spec.kind == "gdssm" or not spec.window else n,
            seed=spec.seed,
            options={"task": asdict(config.task), "baselines": asdict(config.baselines)},
        ),
        optim=OptimSection(
            lr=lr,
            min_lr=lr,
            warmup_steps=0,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=tr.weight_decay,
            grad_clip=0.0,
            lr_scale=scale,
        ),
        run=RunSection(
            out_dir=str(out_dir),
            max_steps=tr.steps,
            global_batch_size=tr.batch_size,
            micro_batch_size=max(1, tr.batch_size // world_size),
            seed=spec.seed,
            checkpoint_every=tr.eval_every,
            keep_checkpoints=1,
            log_every=tr.eval_every,
            progress=False,
            plots=False,
        ),
    )


class _TaskBatches:
    """Fresh regression tasks by step: global batch ``s`` is ``batch_seed(seed, "train", s + 1)`` (a pure
    function of the step), as the model's inputs and the query targets."""

    def __init__(self, spec: RunSpec, config: ExperimentConfig) -> None:
        self.spec, self.task, self.size = spec, config.task, config.train.batch_size

    def batch(self, step: int, part: int, n_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size % n_parts:
            raise ConfigError(f"train.batch_size={self.size} does not split into {n_parts} equal parts")
        b = make_regression_batch(self.task, batch_seed(self.spec.seed, "train", step + 1), self.size)
        rows = slice(part * self.size // n_parts, (part + 1) * self.size // n_parts)
        return model_inputs(self.spec, b)[rows], b.query_y[rows]


class _QueryLoss:
    """½·MSE at the query: each part of a global batch is one term (parts hold equally many tasks, so the mean
    over parts is the mean over tasks)."""

    def __init__(self, spec: RunSpec, e: int) -> None:
        self.spec, self.e = spec, e

    def count(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        return 1.0

    def tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return int(batch[0].shape[0] * batch[0].shape[1])

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, target = batch
        return half_mse(query_prediction(self.spec, model, inputs, self.e), target)


class _Validation(Callback):
    """Validation loss every ``eval_every`` steps (and at the end) into ``curve``; a non-finite training loss
    stops the run; progress to a rich bar."""

    def __init__(
        self, spec: RunSpec, config: ExperimentConfig, val: RegressionBatch, progress: Any, task_id: Any
    ) -> None:
        self.spec, self.config, self.progress, self.task_id = spec, config, progress, task_id
        self.val_in, self.val_y = model_inputs(spec, val), val.query_y
        self.curve: list[tuple[int, float]] = []
        self.t0 = time.perf_counter()
        self.eval_s = 0.0

    def evaluate(self, step: int, model: nn.Module) -> None:
        t = time.perf_counter()
        with torch.no_grad():
            pred = query_prediction(self.spec, model, self.val_in, self.config.task.e)
            self.curve.append((step, float(half_mse(pred, self.val_y))))
        self.eval_s += time.perf_counter() - t
        if self.progress is not None:
            rate = step / max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(self.task_id, rate=f"{rate:.0f} steps/s, val loss {self.curve[-1][1]:.4f}")

    def on_step(self, model: nn.Module, info: StepInfo) -> None:
        step, loss = info.step, info.loss
        if not math.isfinite(loss):
            raise FloatingPointError(f"{self.spec.label} seed {self.spec.seed}: loss became {loss} at step {step}")
        tr = self.config.train
        if step % tr.eval_every == 0 or step == tr.steps:
            self.evaluate(step, model)
        if self.progress is not None:
            self.progress.advance(self.task_id)

    def state_dict(self) -> Any:
        return {"curve": [list(c) for c in self.curve]}

    def load_state_dict(self, state: Any) -> None:
        self.curve = [(int(s), float(v)) for s, v in state["curve"]]
        if self.progress is not None:
            self.progress.update(self.task_id, completed=self.curve[-1][0] if self.curve else 0)


@dataclass
class TrainedRun:
    spec: RunSpec
    model: nn.Module
    curve: list[tuple[int, float]]
    seconds: float
    steps_per_s: float


def run_dir_name(spec: RunSpec, config: ExperimentConfig) -> str:
    """``<label>_s<seed>_<hash>``: the hash of the run's training config, so a changed config trains afresh."""
    return f"{spec.label}_s{spec.seed}_{config_digest(train_config(spec, config, ''))}"


def train_run(
    spec: RunSpec,
    config: ExperimentConfig,
    val: RegressionBatch,
    progress: Any = None,
    task_id: Any = None,
    out_dir: str | Path | None = None,
    stop_after: int | None = None,
) -> TrainedRun:
    """Train one model on fresh tasks, ``config.train.steps`` steps, through :func:`statelab.train.train`;
    validation loss every ``eval_every`` steps.

    ``out_dir`` keeps the run's checkpoints (a run found there resumes; ``None``: a temporary directory, deleted
    afterwards). ``stop_after`` stops after that many steps, as if the process had been killed.
    """
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="gdssm-run-") as tmp:
            return train_run(spec, config, val, progress, task_id, tmp, stop_after)
    model = build_model(spec, config)
    validation = _Validation(spec, config, val, progress, task_id)
    validation.evaluate(0, model)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    result = train_loop(
        train_config(spec, config, out_dir, world),
        model=model,
        source=_TaskBatches(spec, config),
        loss=_QueryLoss(spec, config.task.e),
        callbacks=[validation],
        stop_after=stop_after,
    )
    # training time as before the shared loop: optimizer steps and validation (not checkpoints)
    seconds = result.step_seconds + validation.eval_s
    return TrainedRun(spec, result.model, validation.curve, seconds, result.step / max(seconds, 1e-9))


def _query_jacobian(spec: RunSpec, model: nn.Module, batch: RegressionBatch, e: int) -> torch.Tensor:
    """``∂ŷ/∂x_q`` per task: ``[B, E, d]`` by one backward pass per output (tasks are independent)."""
    tokens = interleave(batch).clone().requires_grad_(True)
    pred = query_prediction(spec, model, tokens, e)
    rows = []
    for k in range(e):
        (g,) = torch.autograd.grad(pred[:, k].sum(), tokens, retain_graph=k < e - 1)
        rows.append(g[:, -1])
    return torch.stack(rows, dim=1)


def canonical_parameters(layer: Any) -> dict[str, torch.Tensor]:
    """Remove the scale symmetries of one GD-SSM layer: ``W_q[1,2] = 1``, ``D_3 = 1``, scale moved into C.

    The layer computes ``C S(W_q) (D·E)``, bilinear in ``W_q`` and ``D`` times C, so only
    ``W_q[1,2]·D_3·C`` is identified. Returns ``w_q``, ``D``, ``C`` (= ``W_q[1,2]·D_3·C``) and ``decay`` (Λ̄).
    """
    with torch.no_grad():
        a, b = layer.w_q[0, 1].item(), layer.D[2].item()
        if abs(a) < 1e-12 or abs(b) < 1e-12:
            raise ConfigError("cannot canonicalise: W_q[1,2] or D_3 is zero")
        return {
            "w_q": (layer.w_q / a).clone(),
            "D": (layer.D / b).clone(),
            "C": (layer.C * a * b).clone(),
            "decay": layer.log_decay().exp().clone(),
        }


def _interpolate(model: GDSSM, constructed: GDSSM) -> GDSSM:
    """Average of canonical trained and constructed parameters (1 layer), as von Oswald's interpolation."""
    mix = GDSSM(GDSSMConfig(d=model.config.d, num_layers=1, decay="real"))
    t, c = canonical_parameters(model.layers[0]), canonical_parameters(constructed.layers[0])
    with torch.no_grad():
        layer = mix.layers[0]
        layer.w_q.copy_((t["w_q"] + c["w_q"]) / 2)
        layer.D.copy_((t["D"] + c["D"]) / 2)
        layer.C.copy_((t["C"] + c["C"]) / 2)
        layer.log_step.zero_()
        layer.lam.copy_((t["decay"].log() + c["decay"].log()) / 2)
    return mix


def _gdssm_metrics(
    run: TrainedRun, config: ExperimentConfig, test: RegressionBatch, optima: dict[int, tuple[float, float]]
) -> dict[str, Any]:
    spec, model, task = run.spec, run.model, config.task
    e, n = task.e, task.n_examples
    tokens = interleave(test)
    with torch.no_grad():
        pred_all, _ = model(tokens)
    pred_all = pred_all[..., -e:]
    pred = pred_all[:, -1]
    out: dict[str, Any] = {"loss": float(half_mse(pred, test.query_y)), "max_decay": model.max_decay()}
    k = spec.depth
    eta1, eta_k = optima[1][0], optima[k][0]
    gd1 = gd_predict(test.context_x, test.context_y, test.query_x, eta1, 1)
    gdk = gd_predict(test.context_x, test.context_y, test.query_x, eta_k, k)
    out["pred_cos_gd1"] = cosine(pred, gd1)
    out["pred_cos_gdk"] = cosine(pred, gdk)
    out["pred_diff_gd1"] = float((pred.double() - gd1).norm(dim=-1).mean())
    jac = _query_jacobian(spec, model, test, e)
    w1 = gd_weights(test.context_x, test.context_y, eta1, 1)
    wk = gd_weights(test.context_x, test.context_y, eta_k, k)
    out["sens_cos_gd1"] = row_cosine(jac, w1)
    out["sens_cos_gdk"] = row_cosine(jac, wk)
    out["model_diff_gd1"] = float((jac.double() - w1).flatten(1).norm(dim=-1).mean())
    # loss at every in-context position i = 1..N (window i predicts y_{i+1})
    targets = torch.cat([test.y[:, 1:-1], test.query_y[:, None]], dim=1)
    out["position_loss"] = [float(half_mse(pred_all[:, i], targets[:, i])) for i in range(n)]
    if k == 1:
        canon = canonical_parameters(model.layers[0])
        c_eff = canon["C"]
        diag = torch.diagonal(c_eff)
        off = c_eff - torch.diag(diag)
        wq_off = canon["w_q"].clone()
        wq_off[0, 1] = 0.0
        out["canonical"] = {
            "eta_eff": float(-diag.mean() * n),
            "C_offdiag_ratio": float(off.norm() / diag.norm()),
            "C_cos_minus_identity": cosine(c_eff, -torch.eye(task.d)),
            "w_q_max_other": float(wq_off.abs().max()),
            "D_max_other": float(canon["D"][:2].abs().max()),
            "decay_min": float(canon["decay"].min()),
            "decay_max": float(canon["decay"].max()),
            "w_q": canon["w_q"].tolist(),
            "D": canon["D"].tolist(),
            "C": c_eff.tolist(),
        }
        constructed = GDSSM.from_gd(eta1, n, task.d)
        with torch.no_grad():
            mixed, _ = _interpolate(model, constructed)(tokens)
        out["interpolation_loss"] = float(half_mse(mixed[:, -1, -e:], test.query_y))
    return out


def _baseline_metrics(
    run: TrainedRun, config: ExperimentConfig, test: RegressionBatch, optima: dict[int, tuple[float, float]]
) -> dict[str, Any]:
    with torch.no_grad():
        pred = query_prediction(run.spec, run.model, model_inputs(run.spec, test), config.task.e)
    gd1 = gd_predict(test.context_x, test.context_y, test.query_x, optima[1][0], 1)
    return {"loss": float(half_mse(pred, test.query_y)), "pred_cos_gd1": cosine(pred, gd1)}


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _references(config: ExperimentConfig, test: RegressionBatch) -> dict[str, Any]:
    task = config.task
    depths = sorted(set(config.gdssm.depths) | {1})
    optima, table = {}, []
    for k in depths:
        opt = optimal_gd_lr(task, k, n_tasks=config.eta_tasks, seed=batch_seed(0, "eta", k))
        test_loss = float(
            half_mse(gd_predict(test.context_x, test.context_y, test.query_x, opt.eta, k), test.query_y.double())
        )
        optima[k] = (opt.eta, opt.loss)
        table.append({"steps": k, "eta": opt.eta, "expected_loss": opt.loss, "test_loss": test_loss})
    closed = one_step_optimum(task.d, task.n_examples, task.x_range, task.w_scale)
    c = optima[1][0] / task.n_examples
    n = task.n_examples
    positions = {
        "construction": [prefix_loss(c, i, task.d, task.x_range, task.w_scale) for i in range(1, n + 1)],
        "best_per_prefix": [
            prefix_loss(1 / (task.x_variance * (task.d + i - 0.2)), i, task.d, task.x_range, task.w_scale)
            for i in range(1, n + 1)
        ],
    }
    gd_prefix = gd_prefix_predict(test.x, test.context_y, c, 1)
    targets = torch.cat([test.y[:, 1:-1], test.query_y[:, None]], dim=1).double()
    positions["construction_test"] = [float(half_mse(gd_prefix[:, i], targets[:, i])) for i in range(n)]
    lstsq = float(half_mse(least_squares_predict(test.context_x, test.context_y, test.query_x), test.query_y.double()))
    return {
        "zero_predictor": zero_predictor_loss(task.d, task.x_range, task.w_scale),
        "zero_predictor_test": float(half_mse(torch.zeros_like(test.query_y), test.query_y)),
        "one_step_closed_form": {"eta": closed.eta, "loss": closed.loss},
        "gd": table,
        "least_squares_test": lstsq,
        "positions": positions,
        "_optima": optima,
    }


def execute_run(
    spec: RunSpec,
    config: ExperimentConfig,
    optima: dict[int, tuple[float, float]],
    progress: Any = None,
    task_id: Any = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train and measure one run with ``config.threads`` threads (restored afterwards); a failure is returned as a
    record with ``error`` (and counted by the caller). ``out_dir``: the run's checkpoints (see :func:`train_run`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    record: dict[str, Any] = {"label": spec.label, **asdict(spec)}
    try:
        val = make_regression_batch(config.task, batch_seed(0, "val", 0), config.train.val_tasks)
        test = make_regression_batch(config.task, batch_seed(0, "test", 0), config.train.test_tasks)
        run = train_run(spec, config, val, progress, task_id, out_dir)
        metrics = (_gdssm_metrics if spec.kind == "gdssm" else _baseline_metrics)(run, config, test, optima)
        record.update(metrics)
        record.update(
            curve=run.curve,
            seconds=run.seconds,
            steps_per_s=run.steps_per_s,
            params=sum(p.numel() for p in run.model.parameters()),
        )
    except Exception as err:  # a failed run is recorded and counted; the study goes on
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc(limit=4)
    finally:
        torch.set_num_threads(threads)
    return record


def run_experiment(config: ExperimentConfig, out_dir: str | Path | None = None, show_progress: bool = True) -> Path:
    """Run every run of ``config``, write ``config.json``, ``results.json``, ``report.md`` and plots; return the
    run directory. A run that raises is recorded with its error and counted; the others go on. With
    ``workers > 1`` runs go to that many processes (``threads`` each); every run is a pure function of its spec,
    so the results do not depend on the number of workers. Each run keeps its checkpoints in
    ``train/<label>_s<seed>_<config hash>/``: run again after an interruption, a study resumes every run where it
    stopped (bit for bit) and reuses the finished ones."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from statelab.experiments.gdssm_report import write_report

    root = Path(out_dir) if out_dir is not None else Path(config.out_dir) / config.name
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    commit = _git_commit()
    (root / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    test = make_regression_batch(config.task, batch_seed(0, "test", 0), config.train.test_tasks)
    refs = _references(config, test)
    optima = refs.pop("_optima")
    runs = plan_runs(config)
    records: list[dict[str, Any]] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not show_progress) as progress:
        total = progress.add_task("all runs", total=len(runs), rate="")
        if config.workers == 1:
            for spec in runs:
                tid = progress.add_task(f"{spec.label} seed {spec.seed}", total=config.train.steps, rate="")
                out = root / "train" / run_dir_name(spec, config)
                records.append(execute_run(spec, config, optima, progress, tid, out))
                _write_partial(root, refs, records, len(runs), t_start)
                progress.remove_task(tid)
                progress.advance(total)
        else:
            with ProcessPoolExecutor(config.workers, mp_context=get_context("spawn")) as pool:
                ordered = sorted(runs, key=_order)
                futures = [
                    pool.submit(
                        execute_run, spec, config, optima, None, None, root / "train" / run_dir_name(spec, config)
                    )
                    for spec in ordered
                ]
                for fut in as_completed(futures):
                    rec = fut.result()
                    records.append(rec)
                    done = time.perf_counter() - t_start
                    progress.update(total, rate=f"last: {rec['label']} seed {rec['seed']}, {done:.0f} s")
                    progress.advance(total)
                    _write_partial(root, refs, records, len(runs), t_start)
            order = {(s.label, s.seed): i for i, s in enumerate(runs)}
            records.sort(key=lambda r: order[(r["label"], r["seed"])])
    failures = sum("error" in r for r in records)
    meta = {
        "commit": commit,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
        f"{config.workers} worker(s) × {config.threads} thread(s)",
        "wall_seconds": time.perf_counter() - t_start,
        "failures": failures,
        "runs": len(runs),
    }
    results = {"meta": meta, "references": refs, "runs": records}
    (root / "results.json").write_text(json.dumps(results, indent=1))
    write_report(config, results, root)
    return root


def _write_partial(
    root: Path, refs: dict[str, Any], records: list[dict[str, Any]], n_runs: int, t_start: float
) -> None:
    """``results.partial.json`` after every finished run, so an interrupted study keeps what it has done."""
    meta = {"partial": True, "done": len(records), "runs": n_runs, "wall_seconds": time.perf_counter() - t_start}
    tmp = root / "results.partial.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "references": refs, "runs": records}, indent=1))
    tmp.replace(root / "results.partial.json")


def report_from_files(run_dir: str | Path) -> Path:
    """Rebuild ``report.md`` and the plots of a run directory from its ``config.json`` and ``results.json`` (or,
    for an interrupted study, ``results.partial.json``)."""
    root = Path(run_dir)
    from statelab.experiments.gdssm_report import write_report

    if not (root / "config.json").is_file():
        raise ConfigError(f"{str(root)!r} has no config.json")
    config = from_dict(ExperimentConfig, read_config_file(root / "config.json"))
    final, partial = root / "results.json", root / "results.partial.json"
    if not final.exists() and not partial.exists():
        raise ConfigError(f"{str(root)!r} has neither results.json nor results.partial.json")
    results = json.loads((final if final.exists() else partial).read_text())
    meta = results["meta"]
    if meta.get("partial"):
        order = {(s.label, s.seed): i for i, s in enumerate(plan_runs(config))}
        results["runs"].sort(key=lambda r: order.get((r["label"], r["seed"]), len(order)))
        done = {(r["label"], r["seed"]) for r in results["runs"]}
        meta["not_finished"] = [f"{label} seed {seed}" for label, seed in order if (label, seed) not in done]
        meta.update(
            commit=_git_commit(),
            date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            machine=f"{platform.machine()}, torch {torch.__version__}, {config.workers} worker(s) × "
            f"{config.threads} thread(s); INTERRUPTED after {meta['done']} of {meta['runs']} runs",
            failures=sum("error" in r for r in results["runs"]),
        )
    return write_report(config, results, root)
