"""The Birdie study at laptop scale: next-token vs a fixed mixture vs the Birdie controller, causal and bidirectional.

``statelab birdie run --config configs/birdie/quick.toml`` trains every arm for every seed at an equal budget of
counted tokens (context plus target, paper A.11) on the study's corpus (``corpus``: Tiny Shakespeare bytes, or the
records corpus of :mod:`statelab.tasks.records`, in which retrieval can be learned), then evaluates:

* perplexity: bits per byte of held-out text (next-token, causal);
* zero-shot retrieval (no fine-tune): :func:`recall_probes`, a book or a line of pairs, then a key, the value
  generated greedily, read as next-token text (``zs_*``) and as the prefix (``zsp_*``); and the phonebook (fewest
  names) and MQAR evaluation items themselves read as next-token text (``zt_*``);
* copying, selective copying and span infilling: teacher-forced token accuracy on held-out objective samples;
* phonebook lookup (at each number of queried names) and multi-query associative recall (MQAR), drawn from
  :mod:`statelab.tasks` (the text forms of its phonebook and MQAR generators; fine-tunes read the ``train`` split,
  evaluation the ``test`` split): after the same short fine-tune for every arm, the answer is
  generated greedily from the prompt (the prompt is the prefix, generation continues from the state after
  ``[BEGIN]``) and scored position by position on its digits (the paper's digit accuracy; chance is about 10%).

Arms (all on the same optimiser and, but for the three reference arms, the same architecture; only the mixture and
the bidirectional layers differ):

| arm             | mixture                                            | layers                      |
|-----------------|----------------------------------------------------|-----------------------------|
| ``ntp``         | next-token only                                    | causal                      |
| ``fixed``       | uniform over the 7 classes, even within each class | causal                      |
| ``ul2``         | UL2's R, X and S denoisers at 1:1:1                | causal                      |
| ``birdie_causal``| reward-driven controller over the 96 configs      | causal                      |
| ``birdie``      | reward-driven controller over the 96 configs       | alternating bidirectional   |
| ``loss_prop``   | ablation: configs in proportion to their val. loss | causal                      |
| ``exp_weights`` | ablation: exponential weights on per-config reward | causal                      |
| ``gated_ssm_ntp``, ``mamba2_ntp``, ``transformer_ntp`` | next-token only, on that architecture (a state-type or
  attention reference beside the study's ``arch``) | causal |

The two ablations see the same per-config validation losses as the controller but have no reward model, so
against ``birdie_causal`` they isolate what the reward model adds.

Pretraining and the fine-tunes run through the loop of :mod:`statelab.train`: the registered ``birdie`` model, the
objective sampler as a stateful batch source, the target-token cross-entropy of packed rows as the loss hook, the
controller's evaluations as a callback, the loop's one no-decay rule (no decay on the gated SSM's forget gate nor
on the recurrences' decays), its warmup-and-cosine schedule read on the token clock of the budget, its atomic
checkpoints (sampler and controller included) and bit-exact resume: a study run again after an interruption
continues every run where it stopped. Runs are independent (each is a pure function of its arm, seed and the
config), so ``workers`` processes train them side by side, one torch thread each by default. Writes
``runs/<name>/report.md``, ``results.json``, per-run controller logs (JSONL), PNG plots and each run's checkpoints
under ``train/``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gzip
import hashlib
import json
import math
import multiprocessing as mp
import queue
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from statelab.config import from_dict
from statelab.errors import ConfigError
from statelab.eval.metrics import masked_accuracy
from statelab.layers.protocol import Segments
from statelab.models.birdie_models import BirdieLM
from statelab.objectives.base import (
    VOCAB,
    CopyingObjectiveConfig,
    Example,
    InfillingConfig,
    ObjectiveConfig,
    SelectiveCopyingObjectiveConfig,
)
from statelab.objectives.controller import (
    BirdieController,
    ControllerConfig,
    ExpWeightsPolicy,
    FixedPolicy,
    LossProportionalPolicy,
    MixturePolicy,
    eval_schedule,
    plot_action_log,
)
from statelab.objectives.corruption import apply_objective
from statelab.objectives.grid import birdie_grid, class_uniform_probs, ul2_configs, ul2_probs
from statelab.objectives.packing import IGNORE, PackedBatch, pack_rows
from statelab.objectives.sampler import ObjectiveSampler, per_config_loss, validation_batch
from statelab.tasks.records import RecordsConfig, held_out_overlap, records_corpus
from statelab.tasks.synthetic import MQARConfig, PhonebookConfig, TextItem, mqar_text, phonebook_text
from statelab.train.config import DataSection, ModelSection, OptimSection, RunSection, TrainConfig, config_digest
from statelab.train.loop import Callback, StepInfo, build_model
from statelab.train.loop import train as train_loop

__all__ = [
    "ARMS",
    "BirdieExperimentConfig",
    "load_corpus",
    "split_corpus",
    "recall_probes",
    "evaluation_needles",
    "check_held_out",
    "arm_arch",
    "phonebook_example",
    "phonebook_examples",
    "mqar_example",
    "mqar_examples",
    "arm_configs",
    "train_config",
    "train_arm",
    "finetune_config",
    "generated_accuracy",
    "evaluate",
    "run_one",
    "run_experiment",
]

ARMS: dict[str, dict[str, Any]] = {
    "ntp": {"mixture": "next_token", "bidirectional": False},
    "fixed": {"mixture": "fixed", "bidirectional": False},
    "ul2": {"mixture": "ul2", "bidirectional": False},
    "birdie_causal": {"mixture": "birdie", "bidirectional": False},
    "birdie": {"mixture": "birdie", "bidirectional": True},
    "loss_prop": {"mixture": "loss_prop", "bidirectional": False},
    "exp_weights": {"mixture": "exp_weights", "bidirectional": False},
    "gated_ssm_ntp": {"mixture": "next_token", "bidirectional": False, "arch": "gated_ssm"},
    "mamba2_ntp": {"mixture": "next_token", "bidirectional": False, "arch": "mamba2"},
    "transformer_ntp": {"mixture": "next_token", "bidirectional": False, "arch": "transformer"},
}
"""arm -> its mixture, whether its SSM layers alternate with bidirectional-prefix ones, and (optional) the
architecture it trains instead of the study's ``arch`` (the state-type and Transformer reference arms)."""

CORPORA = ("shakespeare", "records")

CORPUS = "tinyshakespeare.txt.gz"


def load_corpus() -> np.ndarray:
    """Tiny Shakespeare as UTF-8 byte ids ``[n]`` int64, read from statelab's package data (no download)."""
    raw = resources.files("statelab").joinpath("data", CORPUS).read_bytes()
    return np.frombuffer(gzip.decompress(raw), dtype=np.uint8).astype(np.int64)


@dataclass(frozen=True)
class BirdieExperimentConfig:
    """Everything a Birdie study run depends on (saved with its results).

    Attributes:
        name, out_dir: results go to ``out_dir/name``.
        arch, d_model, n_layer, d_state: the model (:class:`BirdieModelConfig`); mamba2_state, mamba2_head_dim:
            N and P of the Mamba-2 arms' mixers; n_heads: the Transformer arms' attention heads.
        corpus: what every arm pretrains on: ``"shakespeare"`` (Tiny Shakespeare bytes) or ``"records"``
            (:mod:`statelab.tasks.records`: text, directories and key-value records whose repeats make retrieval
            learnable by next-token prediction); corpus_bytes: size of the generated records corpus; records: fields
            of :class:`~statelab.tasks.records.RecordsConfig` that change its documents (mix, entries, pairs, ...).
        seq_len, batch_size: packed rows per step; token_budget: counted tokens per run.
        lr, weight_decay, warmup_frac: AdamW (statelab.train's no-decay rule) with linear warmup over the first
            ``warmup_frac`` of the estimated steps, then cosine decay to ``lr / 10`` over the token budget.
        seeds, arms: the runs.
        n_val_per_config: held-out samples per objective config for the controller's validation loss.
        n_evals: controller evaluations (the paper's schedule, thinned to at most this many).
        controller_*: reward model size and fit (the paper's 4 layers / 256 hidden / 200 steps / lr 5e-4 are for
            35 evaluations of a 1.4B run; a small run refits a small model: 2 layers, 64 hidden, 20 steps).
        finetune_steps, finetune_lr, finetune_batch: the fine-tune before phonebook and, separately, before MQAR
            (steps, AdamW learning rate without decay, examples per step; the same for every arm).
        phonebook_entries, mqar_pairs, mqar_queries: task sizes; phonebook_queries: the numbers of queried names
            (the fine-tune cycles through them, each is scored on its own); n_eval_examples: per task and count.
        workers: processes training runs side by side; threads: torch CPU threads per process.
    """

    name: str = "quick"
    out_dir: str = "runs"
    arch: str = "gated_ssm"
    d_model: int = 64
    n_layer: int = 2
    d_state: int = 80
    mamba2_state: int = 16
    mamba2_head_dim: int = 16
    n_heads: int = 4
    corpus: str = "shakespeare"
    corpus_bytes: int = 4_000_000
    records: dict[str, Any] = dataclasses.field(default_factory=dict)
    seq_len: int = 256
    batch_size: int = 8
    token_budget: int = 300_000
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    seeds: tuple[int, ...] = (0, 1)
    arms: tuple[str, ...] = ("ntp", "fixed", "birdie_causal", "birdie")
    n_val_per_config: int = 2
    n_evals: int = 12
    controller_hidden: int = 64
    controller_state: int = 64
    controller_layers: int = 2
    controller_fit_steps: int = 20
    controller_candidates: int = 512
    controller_lr: float = 3e-3
    finetune_steps: int = 40
    finetune_lr: float = 1e-3
    finetune_batch: int = 16
    phonebook_entries: int = 5
    phonebook_queries: tuple[int, ...] = (1, 2, 4)
    mqar_pairs: int = 8
    mqar_queries: int = 4
    n_eval_examples: int = 48
    workers: int = 2
    threads: int = 1

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ConfigError(f"unknown arms {bad}; known: {sorted(ARMS)}")
        if self.corpus not in CORPORA:
            raise ConfigError(f"corpus must be one of {CORPORA}, got {self.corpus!r}")
        bad = sorted(
            set(self.records) - {f.name for f in dataclasses.fields(RecordsConfig)}
            | {"n_bytes", "seed", "text_part"} & set(self.records)
        )
        if bad:
            raise ConfigError(f"records: unknown or reserved RecordsConfig fields {bad}")
        _records_config(self.records, 1, 0, "train")  # refuse bad values now, not in a worker
        if self.token_budget < self.seq_len * self.batch_size:
            raise ConfigError("token_budget must cover at least one batch")
        if not self.phonebook_queries or max(self.phonebook_queries) > self.phonebook_entries:
            raise ConfigError(
                f"phonebook_queries {self.phonebook_queries} must be non-empty and at most phonebook_entries "
                f"({self.phonebook_entries})"
            )
        if self.mqar_queries > self.mqar_pairs:
            raise ConfigError(f"mqar_queries {self.mqar_queries} exceeds mqar_pairs {self.mqar_pairs}")
        if self.workers < 1 or self.threads < 1:
            raise ConfigError(f"workers and threads must be >= 1, got {self.workers}, {self.threads}")


def _ids(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)


def _item_seed(*parts: int) -> int:
    """One int seed for a tuple of ints (the tasks' generators hash it again with the task and split)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:7], "little")


def _text_example(item: TextItem) -> tuple[Example, np.ndarray]:
    """Prompt as the input, answer and ``<eos>`` as the target (bytes), and the mask of the answer's digits."""
    tgt = np.concatenate([_ids(item.answer), [VOCAB.eos]])
    mask = np.array([chr(c).isdigit() for c in tgt[:-1]] + [False])
    return Example(input=_ids(item.prompt), target=tgt), mask


def phonebook_examples(
    n_entries: int, n_queries: int, seed: int, n: int, split: str = "test"
) -> list[tuple[Example, np.ndarray]]:
    """``n`` multi-number phonebooks (Birdie §4, Fig. 1) from :func:`statelab.tasks.phonebook_text`: ten-digit
    numbers, names from the tasks' name lists. Input: the question (``Find: A, B``), ``Phonebook:``, the entries
    ``First Last: dddddddddd``, the question again; target: the queried numbers joined by ``", "``, then ``<eos>``;
    with the mask of the target's digits (the scored positions)."""
    cfg = PhonebookConfig(n_entries=n_entries, n_queries=n_queries, n_digits=10)
    return [_text_example(item) for item in phonebook_text(cfg, seed, n, split)]


def phonebook_example(n_entries: int, n_queries: int, seed: int, split: str = "test") -> tuple[Example, np.ndarray]:
    """One phonebook of :func:`phonebook_examples`."""
    return phonebook_examples(n_entries, n_queries, seed, 1, split)[0]


def mqar_examples(
    n_pairs: int, n_queries: int, seed: int, n: int, split: str = "test"
) -> list[tuple[Example, np.ndarray]]:
    """``n`` multi-query associative recall items (Zoology, arXiv 2312.04927) from :func:`statelab.tasks.mqar_text`:
    ``pairs: ab:37 cd:12 ...`` then the queried keys; the target lists their values. With the mask of the value
    digits in the target."""
    cfg = MQARConfig(vocab_size=200, seq_len=4 * n_pairs, num_kv_pairs=n_pairs)
    return [_text_example(item) for item in mqar_text(cfg, seed, n, n_queries, split)]


def mqar_example(n_pairs: int, n_queries: int, seed: int, split: str = "test") -> tuple[Example, np.ndarray]:
    """One item of :func:`mqar_examples`."""
    return mqar_examples(n_pairs, n_queries, seed, 1, split)[0]


def _task_examples(
    task: str, cfg: BirdieExperimentConfig, seed: int, n: int, queries: int
) -> list[tuple[Example, np.ndarray]]:
    if task == "phonebook":
        return phonebook_examples(cfg.phonebook_entries, queries, seed, n, "test")
    return mqar_examples(cfg.mqar_pairs, queries, seed, n, "test")


def _token_losses(model: BirdieLM, batch: PackedBatch) -> torch.Tensor:
    """Per-position target losses ``[B, T]`` (0 where the label is -100)."""
    logits, _ = model(batch.tokens, segments=Segments(batch.seq_start, batch.is_prefix))
    flat = logits.float().reshape(-1, logits.shape[-1])  # class dim last and contiguous: a fast log-softmax
    return F.cross_entropy(flat, batch.labels.reshape(-1), ignore_index=IGNORE, reduction="none").view_as(batch.labels)


def _loss(model: BirdieLM, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token loss over the target positions, and the per-position losses ``[B, T]``."""
    tok = _token_losses(model, batch)
    n = (batch.labels != IGNORE).sum().clamp_min(1)
    return tok.sum() / n, tok


class TargetLoss:
    """The loop's loss hook for packed rows: one term per target token; tokens are the counted (non-padding)
    tokens, context and target (paper A.11)."""

    def count(self, batch: PackedBatch) -> float:
        return float(batch.loss_tokens)

    def tokens(self, batch: PackedBatch) -> int:
        return batch.counted_tokens

    def __call__(self, model: BirdieLM, batch: PackedBatch) -> torch.Tensor:
        return _token_losses(model, batch).sum()


def _rows(batch: PackedBatch, part: int, n_parts: int) -> PackedBatch:
    """Rows ``[part * B / n, (part + 1) * B / n)`` of a packed batch."""
    b = batch.tokens.shape[0]
    if b % n_parts:
        raise ConfigError(f"batch_size={b} does not split into {n_parts} equal parts (processes x accumulation)")
    sl = slice(part * b // n_parts, (part + 1) * b // n_parts)
    return PackedBatch(*(getattr(batch, f)[sl] for f in PackedBatch.__dataclass_fields__))


class _SampledRows:
    """The objective sampler as the loop's batch source: global batch ``s`` is the next ``batch_size`` packed rows
    of the stream (drawn once per step, each process takes its rows); its state is the sampler's."""

    def __init__(self, sampler: ObjectiveSampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self._step: int | None = None
        self._batch: PackedBatch | None = None

    def batch(self, step: int, part: int, n_parts: int) -> PackedBatch:
        if step != self._step:
            self._batch, self._step = self.sampler.next_batch(self.batch_size), step
        return _rows(self._batch, part, n_parts)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._step = self._batch = None


class _Controlled(Callback):
    """After each step: the loss curve and progress; at the evaluation steps of a controlled arm, the per-config
    validation loss goes to the policy and its action to the sampler."""

    def __init__(
        self,
        policy: MixturePolicy,
        sampler: ObjectiveSampler,
        val: PackedBatch | None,
        schedule: set[int],
        report: Callable[[int, float], None] | None,
    ) -> None:
        self.policy, self.sampler, self.val, self.schedule, self.report = policy, sampler, val, schedule, report
        self.losses: list[tuple[int, int, float]] = []
        self.eval_s = 0.0

    def on_step(self, model: BirdieLM, info: StepInfo) -> None:
        self.losses.append((info.step, info.tokens, info.loss))
        if self.val is not None and (info.step in self.schedule or info.step == 1):
            t1 = time.perf_counter()
            model.eval()
            with torch.no_grad():
                tok = _token_losses(model, self.val)
            model.train()
            per = per_config_loss(tok, self.val, len(self.policy.configs)).numpy()
            self.eval_s += time.perf_counter() - t1
            self.sampler.set_probs(self.policy.update(info.step, per))
        if self.report is not None:
            self.report(info.tokens, info.loss)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": [list(x) for x in self.losses], "eval_s": self.eval_s, "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = [(int(a), int(b), float(c)) for a, b, c in state["losses"]]
        self.eval_s = float(state["eval_s"])
        self.policy.load_state_dict(state["policy"])


def _thin(schedule: list[int], n: int) -> list[int]:
    if len(schedule) <= n:
        return schedule
    idx = np.unique(np.round(np.linspace(0, len(schedule) - 1, n)).astype(int))
    return [schedule[i] for i in idx]


def arm_configs(arm: str, seq_len: int) -> list[ObjectiveConfig]:
    """The objective configs an arm samples from: UL2's denoisers for ``ul2``, the 96-config grid otherwise."""
    return ul2_configs(seq_len) if ARMS[arm]["mixture"] == "ul2" else birdie_grid(seq_len)


def _make_policy(
    arm: str, configs: list[ObjectiveConfig], cfg: BirdieExperimentConfig, seed: int, est_steps: int, log: Path
) -> MixturePolicy:
    mix = ARMS[arm]["mixture"]
    if mix == "ul2":
        return FixedPolicy(configs, ul2_probs(configs), log)
    if mix == "next_token":
        p = np.array([1.0 if c.class_name == "next_token" else 0.0 for c in configs])
        return FixedPolicy(configs, p, log)
    if mix == "fixed":
        return FixedPolicy(configs, class_uniform_probs(configs), log)
    if mix == "loss_prop":
        return LossProportionalPolicy(configs, log_path=log)
    if mix == "exp_weights":
        return ExpWeightsPolicy(configs, log_path=log)
    cc = ControllerConfig(
        total_steps=est_steps,
        n_candidates=cfg.controller_candidates,
        hidden=cfg.controller_hidden,
        n_state=cfg.controller_state,
        n_layers=cfg.controller_layers,
        fit_steps=cfg.controller_fit_steps,
        lr=cfg.controller_lr,
        seed=seed,
    )
    return BirdieController(configs, cc, log)


def arm_arch(arm: str, cfg: BirdieExperimentConfig) -> str:
    """The architecture ``arm`` trains: its own (the ``*_ntp`` reference arms) or the study's ``arch``."""
    return ARMS[arm].get("arch", cfg.arch)


def _model_section(arm: str, cfg: BirdieExperimentConfig) -> ModelSection:
    return ModelSection(
        arch="birdie",
        config={
            "arch": arm_arch(arm, cfg),
            "vocab_size": VOCAB.size,
            "d_model": cfg.d_model,
            "n_layer": cfg.n_layer,
            "d_state": cfg.d_state,
            "bidirectional": ARMS[arm]["bidirectional"],
            "mamba2_state": cfg.mamba2_state,
            "mamba2_head_dim": cfg.mamba2_head_dim,
            "n_heads": cfg.n_heads,
        },
    )


def _estimated_steps(cfg: BirdieExperimentConfig) -> int:
    """Steps the token budget takes at about 80% packing: the length of the controller's and the learning-rate
    schedules (the run itself ends on the budget)."""
    return max(1, round(cfg.token_budget / (0.8 * cfg.seq_len * cfg.batch_size)))


# fields of BirdieExperimentConfig that do not change how an arm trains (evaluation sizes, what to run, where)
_NOT_TRAINING = frozenset(
    {
        "name",
        "out_dir",
        "seeds",
        "arms",
        "workers",
        "threads",
        "n_eval_examples",
        "finetune_steps",
        "finetune_lr",
        "finetune_batch",
        "phonebook_entries",
        "phonebook_queries",
        "mqar_pairs",
        "mqar_queries",
    }
)


def train_config(
    arm: str, seed: int, cfg: BirdieExperimentConfig, out_dir: str | Path, world_size: int = 1
) -> TrainConfig:
    """The :class:`~statelab.train.config.TrainConfig` of one (arm, seed): the ``birdie`` model, AdamW
    (betas 0.9, 0.95; ``weight_decay`` under the loop's no-decay rule), warmup over ``warmup_frac`` of the
    estimated steps and cosine to ``lr / 10`` on the token clock, clipping at 1, until ``token_budget`` counted
    tokens; the rows of a step are split over ``world_size`` processes."""
    est = _estimated_steps(cfg)
    study = {k: v for k, v in asdict(cfg).items() if k not in _NOT_TRAINING}
    return TrainConfig(
        model=_model_section(arm, cfg),
        data=DataSection(source="objectives", seq_len=cfg.seq_len, seed=seed, options={"arm": arm, **study}),
        optim=OptimSection(
            lr=cfg.lr,
            min_lr=0.1 * cfg.lr,
            warmup_steps=max(1, round(cfg.warmup_frac * est)),
            betas=(0.9, 0.95),
            eps=1e-8,
            weight_decay=cfg.weight_decay,
            grad_clip=1.0,
        ),
        run=RunSection(
            out_dir=str(out_dir),
            max_steps=est,
            max_tokens=cfg.token_budget,
            global_batch_size=cfg.batch_size,
            micro_batch_size=max(1, cfg.batch_size // world_size),
            seed=seed,
            checkpoint_every=max(1, est // 10),
            keep_checkpoints=1,
            log_every=10,
            progress=False,
            plots=False,
        ),
    )


def train_arm(
    arm: str,
    seed: int,
    cfg: BirdieExperimentConfig,
    train_text: np.ndarray,
    val_text: np.ndarray,
    run_dir: Path,
    report: Callable[[int, float], None] | None = None,
    stop_after: int | None = None,
) -> tuple[BirdieLM, dict[str, Any]]:
    """Train one arm for one seed until ``cfg.token_budget`` counted tokens, through :func:`statelab.train.train`;
    returns the model and a record. ``report(counted_tokens, loss)`` is called after every step (progress).

    Checkpoints go to ``run_dir/train/<arm>_s<seed>_<config hash>/``; a run found there resumes bit for bit.
    ``stop_after`` stops after that many steps, as if the process had been killed."""
    configs = arm_configs(arm, cfg.seq_len)
    est_steps = _estimated_steps(cfg)
    log = run_dir / f"mixture_{arm}_s{seed}.jsonl"
    log.unlink(missing_ok=True)
    policy = _make_policy(arm, configs, cfg, seed, est_steps, log)
    sampler = ObjectiveSampler(configs, train_text, cfg.seq_len, seed=seed, probs=policy.action)
    controlled = not isinstance(policy, FixedPolicy)  # it reads per-config validation losses
    val = None
    if controlled:
        val = validation_batch(configs, val_text, cfg.seq_len, cfg.n_val_per_config, seed=10_000 + seed)
    schedule = set(_thin(eval_schedule(est_steps), cfg.n_evals))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    tc = train_config(arm, seed, cfg, "", world)
    tc = dataclasses.replace(tc, run=dataclasses.replace(tc.run, out_dir=str(_arm_dir(run_dir, arm, seed, tc))))
    hook = _Controlled(policy, sampler, val, schedule, report)
    result = train_loop(
        tc,
        model=build_model(tc.model, seed),
        source=_SampledRows(sampler, cfg.batch_size),
        loss=TargetLoss(),
        callbacks=[hook],
        stop_after=stop_after,
    )
    model = result.model
    rec = {
        "arm": arm,
        "seed": seed,
        "steps": result.step,
        "counted_tokens": result.tokens,
        "train_s": result.step_seconds,
        "val_eval_s": hook.eval_s,
        "controller_s": getattr(policy, "overhead_s", 0.0),
        "step_s": result.step_seconds / max(result.step, 1),
        "losses": hook.losses,
        "n_params": model.num_parameters(),
        "class_tokens": _class_tokens(configs, sampler),
        "sampler_failures": sampler.stats.failures,
    }
    if controlled and policy.records:
        plot_action_log(
            policy.records,
            [c.class_name for c in configs],
            run_dir / f"mixture_{arm}_s{seed}.png",
            title=f"{arm} seed {seed}: objective mixture",
        )
        rec["final_mixture"] = _class_share(configs, policy.action)
    return model, rec


def _arm_dir(run_dir: Path, arm: str, seed: int, tc: TrainConfig) -> Path:
    return run_dir / "train" / f"{arm}_s{seed}_{config_digest(tc)}"


def _class_share(configs: list[ObjectiveConfig], p: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    for c, pi in zip(configs, p, strict=True):
        out[c.class_name] = out.get(c.class_name, 0.0) + float(pi)
    return out


def _class_tokens(configs: list[ObjectiveConfig], sampler: ObjectiveSampler) -> dict[str, int]:
    out: dict[str, int] = {}
    for c, n in zip(configs, sampler.stats.tokens, strict=True):
        out[c.class_name] = out.get(c.class_name, 0) + int(n)
    return out


@torch.no_grad()
def _accuracy(model: BirdieLM, items: list[tuple[Example, np.ndarray]], seq_len: int) -> float:
    """Teacher-forced accuracy of argmax predictions on the masked target positions (examples longer than a row
    are left out; NaN when none fits)."""
    items = [it for it in items if it[0].packed_length <= seq_len]
    if not items:
        return float("nan")
    model.eval()
    batch, _ = pack_rows(((ex, i) for i, (ex, _) in enumerate(items)), seq_len)
    logits, _ = model(batch.tokens, segments=Segments(batch.seq_start, batch.is_prefix))
    lab = batch.labels != IGNORE
    mask = np.concatenate([m for _, m in items])  # the items' target positions, in packing order
    return masked_accuracy([logits.argmax(-1)[lab].numpy()], [batch.labels[lab].numpy()], [mask])


def _objective_items(config: ObjectiveConfig, text: np.ndarray, n: int, seed: int, seq_len: int):
    items = []
    for j in range(n):
        rng = np.random.default_rng([seed, j])
        L = int(rng.integers(max(config.length[0], config.min_length()), config.length[1] + 1))
        off = int(rng.integers(0, text.shape[0] - L))
        ex = apply_objective(text[off : off + L], config, rng)
        items.append((ex, np.ones(ex.target.shape[0], dtype=bool)))
    return items


@torch.no_grad()
def _bits_per_byte(model: BirdieLM, text: np.ndarray, seq_len: int, n_rows: int = 16) -> float:
    model.eval()
    step = max(1, (text.shape[0] - seq_len) // n_rows)
    exs = [(Example(np.zeros(0, np.int64), text[i * step : i * step + seq_len]), 0) for i in range(n_rows)]
    batch, _ = pack_rows(iter(exs), seq_len)
    loss, _ = _loss(model, batch)
    return float(loss) / math.log(2)


class _FinetuneRows:
    """Fine-tune batches by step (a pure function of the step): ``finetune_batch`` prompts (prefix) -> answers
    (suffix) of ``task``, packed; part ``p`` of ``n`` takes every ``n``-th example."""

    def __init__(self, cfg: BirdieExperimentConfig, seed: int, task: str) -> None:
        self.cfg, self.seed, self.task = cfg, seed, task

    def batch(self, step: int, part: int, n_parts: int) -> PackedBatch:
        cfg = self.cfg
        items = []
        for j in range(part, cfg.finetune_batch, n_parts):
            seed = _item_seed(777, self.seed, step, j)
            if self.task == "phonebook":
                q = cfg.phonebook_queries[j % len(cfg.phonebook_queries)]
                ex = phonebook_example(cfg.phonebook_entries, q, seed, "train")[0]
            else:
                ex = mqar_example(cfg.mqar_pairs, cfg.mqar_queries, seed, "train")[0]
            if ex.packed_length <= cfg.seq_len:
                items.append((ex, j))
        if not items:
            raise ValueError(f"no {self.task} example fits rows of {cfg.seq_len} tokens: make the task smaller")
        batch, _ = pack_rows(iter(items), cfg.seq_len)
        return batch


def finetune_config(
    model: BirdieLM, cfg: BirdieExperimentConfig, seed: int, task: str, out_dir: str | Path, world_size: int = 1
) -> TrainConfig:
    """The fine-tune of every arm: AdamW at a constant ``finetune_lr`` without weight decay (default betas),
    clipping at 1, ``finetune_steps`` steps of ``finetune_batch`` examples (split over ``world_size``
    processes)."""
    return TrainConfig(
        model=ModelSection(arch="birdie", config=asdict(model.config)),
        data=DataSection(source=f"finetune:{task}", seq_len=cfg.seq_len, seed=seed, options={"task": task}),
        optim=OptimSection(
            lr=cfg.finetune_lr,
            min_lr=cfg.finetune_lr,
            warmup_steps=0,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
            grad_clip=1.0,
        ),
        run=RunSection(
            out_dir=str(out_dir),
            max_steps=cfg.finetune_steps,
            global_batch_size=cfg.finetune_batch,
            micro_batch_size=max(1, cfg.finetune_batch // world_size),
            seed=seed,
            checkpoint_every=0,
            keep_checkpoints=1,
            log_every=10,
            progress=False,
            plots=False,
        ),
    )


def _finetune(
    model: BirdieLM, cfg: BirdieExperimentConfig, seed: int, task: str, out_dir: Path | None = None
) -> BirdieLM:
    """The same short fine-tune for every arm, one per task, through :func:`statelab.train.train`:
    ``finetune_batch`` phonebook prompts (cycling through the query counts) or MQAR prompts (prefix) -> answers
    (suffix) per step. Returns a fine-tuned copy; ``out_dir`` keeps its checkpoint (``None``: a temporary one)."""
    m = copy.deepcopy(model)
    if cfg.finetune_steps <= 0:
        return m
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="birdie-finetune-") as tmp:
            return _finetune(model, cfg, seed, task, Path(tmp))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    tc = finetune_config(model, cfg, seed, task, out_dir, world)
    return train_loop(tc, model=m, source=_FinetuneRows(cfg, seed, task), loss=TargetLoss()).model


def recall_probes(
    task: str, cfg: BirdieExperimentConfig, seed: int, n: int, split: str = "test"
) -> list[tuple[Example, np.ndarray]]:
    """Zero-shot retrieval probes made from the evaluation's own items (no task format to learn): ``phonebook``:
    the book as a directory (``Phonebook:`` and its entries), a blank line, then one queried name and ``": "``;
    ``mqar``: the line of pairs, then the first queried key and ``":"``. The target is the value, scored on its
    digits. A model that learned to retrieve from its pretraining text completes them; one that did not is at
    chance (about 0.1)."""
    out = []
    if task == "phonebook":
        pcfg = PhonebookConfig(n_entries=cfg.phonebook_entries, n_queries=1, n_digits=10)
        for item in phonebook_text(pcfg, seed, n, split):
            lines = item.prompt.splitlines()
            who, entries = lines[0][len("Find: ") :], lines[2:-1]
            context = "Phonebook:\n" + "\n".join(entries) + f"\n\n{who}: "
            out.append(_text_example(TextItem(context, item.answer)))
    elif task == "mqar":
        mcfg = MQARConfig(vocab_size=200, seq_len=4 * cfg.mqar_pairs, num_kv_pairs=cfg.mqar_pairs)
        for item in mqar_text(mcfg, seed, n, 1, split):
            pairs, query = item.prompt.splitlines()[:2]
            out.append(_text_example(TextItem(f"{pairs}\n{query[len('query: ') :]}:", item.answer)))
    else:
        raise ConfigError(f"task must be 'phonebook' or 'mqar', got {task!r}")
    return out


@torch.no_grad()
def generated_accuracy(
    model: BirdieLM, items: list[tuple[Example, np.ndarray]], seq_len: int, reading: str = "prefix"
) -> float:
    """Greedy generation after the input, compared position by position with the target on its masked positions
    (examples longer than a row are left out; NaN when none fits).

    ``reading="prefix"``: the prompt is ``input ++ [BEGIN]``, the input read as the (bidirectional, for the
    bidirectional arms) prefix, as the fine-tunes train. ``"causal"``: the prompt is ``[BEGIN] ++ input``, read as
    plain next-token text, as a next-token sample starts; this is how a zero-shot probe meets every arm on equal
    terms."""
    if reading not in ("prefix", "causal"):
        raise ConfigError(f"reading must be 'prefix' or 'causal', got {reading!r}")
    items = [it for it in items if it[0].packed_length <= seq_len]
    if not items:
        return float("nan")
    model.eval()
    by_len: dict[int, list[tuple[Example, np.ndarray]]] = defaultdict(list)
    for ex, mask in items:  # equal prompt lengths decode as one batch
        by_len[ex.input.shape[0]].append((ex, mask))
    predicted, targets, masks = [], [], []
    for group in by_len.values():
        n_new = max(ex.target.shape[0] for ex, _ in group)
        if reading == "prefix":
            prompt = torch.from_numpy(np.stack([np.concatenate([ex.input, [VOCAB.begin]]) for ex, _ in group]))
            gen = model.generate(prompt, n_new).tokens.numpy()
        else:
            prompt = torch.from_numpy(np.stack([np.concatenate([[VOCAB.begin], ex.input]) for ex, _ in group]))
            B, T = prompt.shape
            start = torch.zeros(B, T - 1, dtype=torch.bool)
            start[:, 0] = True
            _, state = model(prompt[:, :-1], segments=Segments(start, torch.zeros_like(start)))
            gen = model.generate(prompt[:, -1:], n_new, state=state).tokens.numpy()
        for (ex, mask), g in zip(group, gen, strict=True):
            predicted.append(g)
            targets.append(ex.target)
            masks.append(mask)
    return masked_accuracy(predicted, targets, masks)


def metric_names(cfg: BirdieExperimentConfig) -> list[str]:
    """The metrics of one run, in report order."""
    return [
        "phonebook",
        *(f"phonebook_q{q}" for q in cfg.phonebook_queries),
        "mqar",
        "zs_phonebook",
        "zs_mqar",
        "zsp_phonebook",
        "zsp_mqar",
        "zt_phonebook",
        "zt_mqar",
        "selective_copying",
        "copying",
        "infilling",
        "bits_per_byte",
    ]


def evaluate(
    model: BirdieLM, cfg: BirdieExperimentConfig, val_text: np.ndarray, seed: int, out_dir: Path | None = None
) -> dict[str, float]:
    """All metrics of one trained model (held-out text and held-out task seeds); ``out_dir`` keeps the
    fine-tunes' checkpoints (``finetune_<task>/``; ``None``: temporary)."""
    T, n = cfg.seq_len, cfg.n_eval_examples
    s = T / 2048
    copy_cfg = CopyingObjectiveConfig(length=(max(8, round(64 * s)), max(16, round(256 * s))))
    sel_cfg = SelectiveCopyingObjectiveConfig(
        length=(max(64, round(384 * s)), max(96, round(768 * s))), n_spans=2, span_length=(4, 8), delimiter=(1, 4)
    )
    inf_cfg = InfillingConfig(length=(max(16, round(256 * s)), max(32, round(512 * s))), rate=0.15, mean_span=3.0)
    probes = _zero_shot_items(cfg, seed)
    out = {
        "bits_per_byte": _bits_per_byte(model, val_text, T),
        **{f"zs_{t}": generated_accuracy(model, probes[t], T, "causal") for t in ZERO_SHOT},
        **{f"zsp_{t}": generated_accuracy(model, probes[t], T, "prefix") for t in ZERO_SHOT},
        "copying": _accuracy(model, _objective_items(copy_cfg, val_text, n, 50_000 + seed, T), T),
        "selective_copying": _accuracy(model, _objective_items(sel_cfg, val_text, n, 60_000 + seed, T), T),
        "infilling": _accuracy(model, _objective_items(inf_cfg, val_text, n, 70_000 + seed, T), T),
    }
    items = _evaluation_items(cfg, seed)
    zero_shot_task = {"phonebook": items[f"phonebook_q{min(cfg.phonebook_queries)}"], "mqar": items["mqar"]}
    out.update({f"zt_{t}": generated_accuracy(model, zero_shot_task[t], T, "causal") for t in ZERO_SHOT})
    ft = _finetune(model, cfg, seed, "phonebook", None if out_dir is None else out_dir / "finetune_phonebook")
    for q in cfg.phonebook_queries:
        out[f"phonebook_q{q}"] = generated_accuracy(ft, items[f"phonebook_q{q}"], T)
    out["phonebook"] = float(np.mean([out[f"phonebook_q{q}"] for q in cfg.phonebook_queries]))
    ft = _finetune(model, cfg, seed, "mqar", None if out_dir is None else out_dir / "finetune_mqar")
    out["mqar"] = generated_accuracy(ft, items["mqar"], T)
    return out


def _evaluation_items(cfg: BirdieExperimentConfig, seed: int) -> dict[str, list[tuple[Example, np.ndarray]]]:
    """The held-out task items one run is scored on: ``phonebook_q<K>`` for each number of queried names and
    ``mqar`` (each on a seed of its own)."""
    n = cfg.n_eval_examples
    out = {
        f"phonebook_q{q}": _task_examples("phonebook", cfg, 90_000 + 100 * q + seed, n, q)
        for q in cfg.phonebook_queries
    }
    out["mqar"] = _task_examples("mqar", cfg, 91_000 + seed, n, cfg.mqar_queries)
    return out


ZERO_SHOT = ("phonebook", "mqar")

#: bytes of held-out records text (seed 1, the last 10% of Tiny Shakespeare) for validation and bits per byte
VAL_BYTES = 300_000


def _records_config(fields: dict[str, Any], n_bytes: int, seed: int, part: str) -> RecordsConfig:
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return from_dict(RecordsConfig, {**tuples, "n_bytes": n_bytes, "seed": seed, "text_part": part}, where="records")


def split_corpus(
    corpus: str = "shakespeare", n_bytes: int = 4_000_000, records: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held-out)`` byte ids of a study's corpus: Tiny Shakespeare's first 90% and last 10%, or the records
    corpus (:func:`statelab.tasks.records.records_corpus`, ``records`` changing its fields) of ``n_bytes`` at seed 0
    over the first 90% of the plays, and ``VAL_BYTES`` at seed 1 over the last 10%."""
    key = json.dumps(records or {}, sort_keys=True)
    return _split_corpus(corpus, n_bytes, key)


@functools.cache
def _split_corpus(corpus: str, n_bytes: int, records_json: str) -> tuple[np.ndarray, np.ndarray]:
    if corpus == "shakespeare":
        text = load_corpus()
        cut = int(0.9 * text.shape[0])
        return text[:cut], text[cut:]
    if corpus == "records":
        fields = json.loads(records_json)
        train = records_corpus(_records_config(fields, n_bytes, 0, "train"))
        return train, records_corpus(_records_config(fields, VAL_BYTES, 1, "test"))
    raise ConfigError(f"corpus must be one of {CORPORA}, got {corpus!r}")


def _zero_shot_items(cfg: BirdieExperimentConfig, seed: int) -> dict[str, list[tuple[Example, np.ndarray]]]:
    """The zero-shot probes of one run, by task (held-out seeds of their own)."""
    return {t: recall_probes(t, cfg, 92_000 + 1000 * i + seed, cfg.n_eval_examples) for i, t in enumerate(ZERO_SHOT)}


def evaluation_needles(cfg: BirdieExperimentConfig) -> list[str]:
    """What of the evaluation must never be in the pretraining corpus: every phone number and every line of
    MQAR pairs that any seed's evaluation items (fine-tuned and zero-shot) contain."""
    out: list[str] = []
    for seed in cfg.seeds:
        tasks = _evaluation_items(cfg, seed)
        probes = _zero_shot_items(cfg, seed)
        items = [ex for q in cfg.phonebook_queries for ex, _ in tasks[f"phonebook_q{q}"]]
        items += [ex for ex, _ in probes["phonebook"]]
        for ex in items:
            text = bytes(ex.input.astype(np.uint8)).decode()
            out += [
                line.split(": ", 1)[1]
                for line in text.splitlines()
                if ": " in line and line.split(": ", 1)[1].isdigit()
            ]
        items = [ex for ex, _ in tasks["mqar"]] + [ex for ex, _ in probes["mqar"]]
        out += [bytes(ex.input.astype(np.uint8)).decode().splitlines()[0] for ex in items]
    return sorted(set(out))


def check_held_out(cfg: BirdieExperimentConfig) -> int:
    """Raise :class:`ConfigError` if any :func:`evaluation_needles` string occurs in the training corpus; returns
    how many were checked."""
    needles = evaluation_needles(cfg)
    found = held_out_overlap(split_corpus(cfg.corpus, cfg.corpus_bytes, cfg.records)[0], needles)
    if found:
        raise ConfigError(f"{len(found)} evaluation items occur in the {cfg.corpus} corpus, e.g. {found[:3]}")
    return len(needles)


def run_one(
    arm: str,
    seed: int,
    cfg: BirdieExperimentConfig,
    run_dir: Path,
    report: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one (arm, seed); returns its JSON-ready record (``metrics`` included)."""
    train_text, val_text = split_corpus(cfg.corpus, cfg.corpus_bytes, cfg.records)
    model, rec = train_arm(arm, seed, cfg, train_text, val_text, run_dir, report)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    tc = train_config(arm, seed, cfg, "", world)
    rec["metrics"] = evaluate(model, cfg, val_text, seed, _arm_dir(run_dir, arm, seed, tc))
    return rec


def _throttled_reporter(messages: Any, key: int, budget: int) -> Callable[[int, float], None]:
    """A progress callback that sends at most two messages a second (and the last one)."""
    last = 0.0

    def report(counted: int, loss: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last > 0.5 or counted >= budget:
            last = now
            messages.put(("progress", key, counted, loss))

    return report


#: one run of a pool: (key, study config, arm, seed, run dir); the key orders and names its record
Job = tuple[int, BirdieExperimentConfig, str, int, str]


def _worker(threads: int, jobs: Any, messages: Any) -> None:
    """Worker process: runs jobs until it reads None; reports progress, records and failures by job key."""
    torch.set_num_threads(threads)
    while (job := jobs.get()) is not None:
        key, cfg, arm, seed, run_dir = job
        try:
            report = _throttled_reporter(messages, key, cfg.token_budget)
            messages.put(("done", key, run_one(arm, seed, cfg, Path(run_dir), report)))
        except Exception as e:  # one failing run is recorded, the others continue
            tb = traceback.format_exception_only(e)[-1].strip()
            messages.put(("failed", key, tb))


def _run_pool(
    jobs: list[Job],
    workers: int,
    threads: int,
    show_progress: bool,
    on_result: Callable[[dict[int, dict[str, Any]], dict[int, str]], None],
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Run ``jobs`` in ``workers`` processes (in this one when ``workers == 1``) with a progress bar per run;
    ``on_result(done, failures)`` after each run ends. Returns the records and failures by job key."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    done: dict[int, dict[str, Any]] = {}
    failures: dict[int, str] = {}
    cols = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} tok"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
    ]
    names = {
        key: f"{arm} seed {seed}" + (f" [{cfg.name}]" if len({j[1].name for j in jobs}) > 1 else "")
        for key, cfg, arm, seed, _ in jobs
    }
    budgets = {key: cfg.token_budget for key, cfg, *_ in jobs}
    with Progress(*cols, disable=not show_progress) as progress:
        bars = {key: progress.add_task(names[key], total=budgets[key], start=False, tps=0.0) for key in names}

        def on_progress(key: int, counted: int, loss: float) -> None:
            bar = bars[key]
            progress.start_task(bar)
            progress.update(bar, completed=min(counted, budgets[key]), description=f"{names[key]} loss {loss:.3f}")
            speed = next(t.speed for t in progress.tasks if t.id == bar)
            progress.update(bar, tps=speed or 0.0)

        if workers == 1:
            torch.set_num_threads(threads)
            for key, cfg, arm, seed, run_dir in jobs:
                try:
                    done[key] = run_one(arm, seed, cfg, Path(run_dir), lambda c, l, k=key: on_progress(k, c, l))
                except (RuntimeError, ValueError) as e:  # one failing run is recorded, the others continue
                    failures[key] = f"{type(e).__name__}: {e}"
                on_result(done, failures)
            return done, failures
        ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools
        job_q, msg_q = ctx.Queue(), ctx.Queue()
        for j in jobs:
            job_q.put(j)
        n_proc = min(workers, len(jobs))
        for _ in range(n_proc):
            job_q.put(None)
        procs = [ctx.Process(target=_worker, args=(threads, job_q, msg_q), daemon=True) for _ in range(n_proc)]
        for p in procs:
            p.start()
        try:
            while len(done) + len(failures) < len(jobs):
                try:
                    kind, key, *rest = msg_q.get(timeout=1.0)
                except queue.Empty:
                    if not any(p.is_alive() for p in procs):
                        for key in names:
                            if key not in done and key not in failures:
                                failures[key] = "its worker process ended without a result"
                    continue
                if kind == "progress":
                    on_progress(key, *rest)
                    continue
                if kind == "done":
                    done[key] = rest[0]
                else:
                    failures[key] = rest[0]
                on_result(done, failures)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.terminate()
    return done, failures


def run_experiment(cfg: BirdieExperimentConfig, show_progress: bool = True) -> Path:
    """Train and evaluate every (arm, seed) in ``cfg.workers`` processes; write ``results.json``, plots and
    ``report.md``. Returns the run dir. Records are ordered by seed, then arm, whatever the workers' order.

    First checks that no evaluation item occurs in the pretraining corpus (:func:`check_held_out`)."""
    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    checked = check_held_out(cfg)
    pairs = [(arm, seed) for seed in cfg.seeds for arm in cfg.arms]
    jobs: list[Job] = [(i, cfg, arm, seed, str(run_dir)) for i, (arm, seed) in enumerate(pairs)]
    t0 = time.perf_counter()

    def save(done: dict[int, dict[str, Any]], failures: dict[int, str], wall: float | None = None):
        results = [done[k] for k in sorted(done)]
        fails = [f"{pairs[k][0]} seed {pairs[k][1]}: {failures[k]}" for k in sorted(failures)]
        body = {"config": asdict(cfg), "held_out_checked": checked, "runs": results, "failures": fails}
        if wall is not None:
            body["wall_s"] = wall
        (run_dir / "results.json").write_text(json.dumps(body, indent=1))
        return results, fails

    done, failures = _run_pool(jobs, cfg.workers, cfg.threads, show_progress, save)
    wall = time.perf_counter() - t0
    results, fails = save(done, failures, wall)
    write_report(cfg, results, fails, wall, run_dir, checked)
    return run_dir


def _summary(
    results: list[dict[str, Any]], arms: tuple[str, ...], metrics: list[str]
) -> dict[str, dict[str, tuple[float, float, int]]]:
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for arm in arms:
        rs = [r for r in results if r["arm"] == arm]
        if not rs:
            continue
        out[arm] = {}
        for m in metrics:
            v = np.array([r["metrics"][m] for r in rs])
            out[arm][m] = (float(v.mean()), float(v.std()), len(v))
        for k in ("counted_tokens", "steps", "step_s", "controller_s", "val_eval_s", "train_s"):
            v = np.array([r[k] for r in rs], dtype=float)
            out[arm][k] = (float(v.mean()), float(v.std()), len(v))
    return out


def _comparison_lines(
    cfg: BirdieExperimentConfig, summ: dict[str, dict[str, tuple[float, float, int]]], metrics: list[str]
) -> list[str]:
    """Each arm against next-token: the difference of means in units of the pooled std over seeds (this
    study's acceptance test: Birdie ahead of next-token by more than 2 pooled std at the most queries)."""
    if "ntp" not in summ or len(summ) < 2:
        return []
    qs = sorted({min(cfg.phonebook_queries), max(cfg.phonebook_queries)})
    keys = [*(f"phonebook_q{q}" for q in qs), "mqar", "zs_phonebook", "zs_mqar", "bits_per_byte"]
    lines = [
        "",
        "Against next-token (ntp): difference of means, and in units of the pooled std "
        "(sqrt of the mean of the two variances over seeds).",
        "",
        "| arm | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for arm in summ:
        if arm == "ntp":
            continue
        cells = []
        for k in keys:
            (m1, s1, _), (m0, s0, _) = summ[arm][k], summ["ntp"][k]
            pooled = math.sqrt((s1**2 + s0**2) / 2)
            z = f"{(m1 - m0) / pooled:+.1f} std" if pooled > 0 else "n/a"
            rel = f", {100 * (m1 - m0) / m0:+.1f}%" if k == "bits_per_byte" else ""
            cells.append(f"{m1 - m0:+.3f} ({z}{rel})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _corpus_line(cfg: BirdieExperimentConfig, checked: int) -> str:
    if cfg.corpus == "shakespeare":
        return "Tiny Shakespeare bytes."
    return (
        f"the records corpus ({cfg.corpus_bytes:,} bytes of plays, directories and key-value records, "
        f"`statelab.tasks.records`; {checked:,} evaluation numbers and lines of pairs checked absent from it)."
    )


def write_report(
    cfg: BirdieExperimentConfig,
    results: list[dict[str, Any]],
    failures: list[str],
    wall: float,
    run_dir: Path,
    held_out_checked: int = 0,
) -> None:
    """``report.md`` with the tables, and the PNG plots it links."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metric_names(cfg)
    summ = _summary(results, cfg.arms, metrics)
    arms = list(summ)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.2))
    for ax, m in zip(axes, metrics, strict=True):
        mu = [summ[a][m][0] for a in arms]
        sd = [summ[a][m][1] for a in arms]
        ax.bar(range(len(arms)), mu, yerr=sd, color=[f"C{i}" for i in range(len(arms))], capsize=3)
        ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=8)
        ax.set_title(m + (" (lower better)" if m == "bits_per_byte" else " acc"), fontsize=9)
    fig.tight_layout()
    fig.savefig(run_dir / "metrics.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, a in enumerate(arms):
        for r in (r for r in results if r["arm"] == a):
            ls = np.array(r["losses"])
            k = max(1, len(ls) // 50)
            sm = np.convolve(ls[:, 2], np.ones(k) / k, mode="valid")
            ax.plot(ls[k - 1 :, 1], sm, color=f"C{i}", alpha=0.8, label=a if r["seed"] == cfg.seeds[0] else None)
    ax.set_xlabel("counted tokens")
    ax.set_ylabel("training loss (own mixture)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "train_loss.png", dpi=110)
    plt.close(fig)

    def fmt(arm: str, m: str) -> str:
        mu, sd, _ = summ[arm][m]
        return f"{mu:.3f} ± {sd:.3f}"

    n_params = results[0]["n_params"] if results else 0
    lines = [
        f"# Birdie study: {cfg.name}",
        "",
        f"{cfg.arch}, d_model {cfg.d_model}, {cfg.n_layer} layers, d_state {cfg.d_state} ({n_params:,} "
        f"parameters); rows of {cfg.seq_len} × {cfg.batch_size}; {cfg.token_budget:,} counted tokens per run; "
        f"seeds {list(cfg.seeds)}; {_corpus_line(cfg, held_out_checked)} "
        f"Wall time {wall / 60:.1f} min with {cfg.workers} worker process(es) of {cfg.threads} torch thread(s).",
        "",
        f"Mean ± std over seeds. phonebook_qK: digit accuracy of the greedily generated answer for K names among "
        f"{cfg.phonebook_entries} entries (phonebook: their mean); mqar: digit accuracy of the generated values of "
        f"{cfg.mqar_queries} of {cfg.mqar_pairs} pairs; each after the same {cfg.finetune_steps}-step fine-tune on "
        f"its task ({cfg.finetune_batch} examples per step, lr {cfg.finetune_lr:g}) for every arm, on held-out seeds "
        "(chance about 0.1). zs_phonebook, zs_mqar: zero-shot retrieval, no fine-tune (the book, then one queried "
        "name and ': '; the pairs, then one queried key and ':'; the value generated greedily, digit accuracy), the "
        "probe read as next-token text; zsp_*: the same probes read as the prefix before [BEGIN]; zt_*: the "
        "phonebook (fewest names) and MQAR evaluation items read as next-token text, no fine-tune. "
        "selective_copying, copying, infilling: teacher-forced token accuracy on held-out "
        "objective samples. bits_per_byte: held-out next-token loss.",
        "",
        "| arm | " + " | ".join(metrics) + " | counted tokens | steps | model |",
        "|---|" + "---|" * (len(metrics) + 3),
    ]
    for a in arms:
        lines.append(
            f"| {a} | "
            + " | ".join(fmt(a, m) for m in metrics)
            + f" | {summ[a]['counted_tokens'][0]:,.0f} | {summ[a]['steps'][0]:.0f} | {arm_arch(a, cfg)}, "
            + f"{next(r['n_params'] for r in results if r['arm'] == a):,} params |"
        )
    lines += _comparison_lines(cfg, summ, metrics)
    lines += ["", "![metrics](metrics.png)", "", "![training loss](train_loss.png)", ""]
    lines += [
        "## Cost",
        "",
        "| arm | step (s) | controller (s) | controller / training | validation evals (s) |",
        "|---|---|---|---|---|",
    ]
    for a in arms:
        ctrl, tr = summ[a]["controller_s"][0], summ[a]["train_s"][0]
        lines.append(
            f"| {a} | {summ[a]['step_s'][0]:.3f} | {ctrl:.2f} | {100 * ctrl / max(tr, 1e-9):.2f}% | "
            f"{summ[a]['val_eval_s'][0]:.1f} |"
        )
    mix = [r for r in results if "final_mixture" in r]
    if mix:
        classes = list(mix[0]["class_tokens"])
        lines += [
            "",
            "## What the controller trained on",
            "",
            "Share of packed tokens per objective class over the whole run (the mixture actually played; the "
            "last action of a run can be an ε-exploration step that trains on nothing).",
            "",
            "| run | " + " | ".join(classes) + " |",
            "|---|" + "---|" * len(classes),
        ]
        for r in mix:
            tot = max(1, sum(r["class_tokens"].values()))
            vals = " | ".join(f"{r['class_tokens'][c] / tot:.2f}" for c in classes)
            lines.append(f"| {r['arm']} s{r['seed']} | {vals} |")
        lines += [""] + [f"![{r['arm']} s{r['seed']}](mixture_{r['arm']}_s{r['seed']}.png)" for r in mix]
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {f}" for f in failures]
    lines += ["", "## Config", "", "```json", json.dumps(asdict(cfg), indent=1), "```", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
