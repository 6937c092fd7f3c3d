"""Birdie controller overhead against the training step it steers.

Measures, in one run on this machine and one torch thread: the training step of the quick study's model (read from
configs/birdie/quick.toml), the batch sampler (96 objective configs vs next-token only), one validation pass (the
per-config losses the controller reads), and one controller update (reward-model refit + candidate scoring) at the
study's settings and at the paper's (4 layers, hidden 256, state 512, 200 fit steps, 2,048 candidates). The
overhead is the controller time per evaluation over the training time between two evaluations, for the quick
study's spacing and the paper's. Writes its table to benchmarks/RESULTS.md under "## Birdie controller".
"""

from __future__ import annotations

import os
import platform
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from statelab.config import from_dict, read_config_file
from statelab.experiments.birdie import BirdieExperimentConfig, load_corpus
from statelab.layers.protocol import Segments
from statelab.models.birdie_models import BirdieLM, BirdieModelConfig
from statelab.objectives import VOCAB, ObjectiveSampler, birdie_grid
from statelab.objectives.controller import BirdieController, ControllerConfig, eval_schedule
from statelab.objectives.packing import IGNORE
from statelab.objectives.sampler import per_config_loss, validation_batch

SECTION = "## Birdie controller"


def median_time(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> None:
    torch.set_num_threads(1)
    cfg = from_dict(BirdieExperimentConfig, read_config_file(Path(__file__).parents[1] / "configs/birdie/quick.toml"))
    text = load_corpus()[:200_000]
    configs = birdie_grid(cfg.seq_len)
    torch.manual_seed(0)
    model = BirdieLM(
        BirdieModelConfig(vocab_size=VOCAB.size, d_model=cfg.d_model, n_layer=cfg.n_layer, d_state=cfg.d_state)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = ObjectiveSampler(configs, text, cfg.seq_len, seed=0)
    batch = sampler.next_batch(cfg.batch_size)

    def train_step():
        logits, _ = model(batch.tokens, segments=Segments(batch.seq_start, batch.is_prefix))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_step()
    step_s = median_time(train_step, 7)
    birdie_batch_s = median_time(lambda: sampler.next_batch(cfg.batch_size), 20)
    ntp = ObjectiveSampler(
        configs, text, cfg.seq_len, seed=0, probs=np.array([c.class_name == "next_token" for c in configs], float)
    )
    ntp_batch_s = median_time(lambda: ntp.next_batch(cfg.batch_size), 20)

    val = validation_batch(configs, text, cfg.seq_len, cfg.n_val_per_config, seed=1)

    def validate():
        with torch.no_grad():
            logits, _ = model(val.tokens, segments=Segments(val.seq_start, val.is_prefix))
            tok = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), val.labels.flatten(), ignore_index=IGNORE, reduction="none"
            )
        per_config_loss(tok.view_as(val.labels), val, len(configs))

    val_s = median_time(validate, 5)
    est_steps = cfg.token_budget / (0.8 * cfg.seq_len * cfg.batch_size)  # as the study estimates its run length
    study_interval = est_steps / cfg.n_evals
    rng = np.random.default_rng(0)
    rows = []
    settings = {
        f"study ({cfg.controller_layers} layers, hidden {cfg.controller_hidden}, fit {cfg.controller_fit_steps}, "
        f"{cfg.controller_candidates} candidates)": ControllerConfig(
            total_steps=1000,
            hidden=cfg.controller_hidden,
            n_state=cfg.controller_state,
            n_layers=cfg.controller_layers,
            fit_steps=cfg.controller_fit_steps,
            n_candidates=cfg.controller_candidates,
            lr=cfg.controller_lr,
            explore=False,
        ),
        "paper (4 layers, hidden 256, state 512, fit 200, 2048 candidates)": ControllerConfig(
            total_steps=1000, explore=False
        ),
    }
    for name, cc in settings.items():
        ctrl = BirdieController(configs, cc)
        loss = np.full(len(configs), 3.0)
        times = []
        for e in range(cfg.n_evals + 4):  # a history as long as the study's
            t = time.perf_counter()
            ctrl.update(100 + 10 * e, loss)
            times.append(time.perf_counter() - t)
            loss = loss * (1 - 0.01 * rng.random(len(configs)))
        upd = float(np.mean(times[1:]))  # the first update has no history to fit
        for sched_name, interval in (
            (f"quick study: {cfg.n_evals} evaluations in ~{est_steps:.0f} steps", study_interval),
            ("paper schedule, every 1000 steps", 1000.0),
            (f"paper schedule at 32k steps: {len(eval_schedule(32000))} evals", 32000 / len(eval_schedule(32000))),
        ):
            rows.append((name, sched_name, upd, interval, upd / (interval * step_s)))

    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}"
    lines = [
        SECTION,
        "",
        f"{date}; {machine}; load average {load} at the end; `python benchmarks/bench_birdie.py` with the quick "
        "study's config (configs/birdie/quick.toml). Ratios compare timings from this one run.",
        "",
        f"Training step (gated SSM d_model {cfg.d_model}, {cfg.n_layer} layers, {cfg.batch_size} x {cfg.seq_len}): "
        f"{1000 * step_s:.1f} ms. Batch sampling with 96 configs: {1000 * birdie_batch_s:.1f} ms "
        f"({birdie_batch_s / step_s:.1%} of a step); next-token only: {1000 * ntp_batch_s:.1f} ms "
        f"({ntp_batch_s / step_s:.1%}). One validation pass (per-config losses on {cfg.n_val_per_config} held-out "
        f"samples of each of the {len(configs)} configs, {val.tokens.shape[0]} rows): {1000 * val_s:.0f} ms = "
        f"{val_s / step_s:.1f} training steps, {val_s / (study_interval * step_s):.1%} of the training between two "
        "of the quick study's evaluations (not counted as controller time below: every adaptive mixture needs it).",
        "",
        "| controller | schedule | update (s) | steps between evals | overhead vs training |",
        "|---|---|---|---|---|",
    ]
    for name, sched, upd, interval, ratio in rows:
        lines.append(f"| {name} | {sched} | {upd:.3f} | {interval:.0f} | {ratio:.2%} |")
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    path = Path(__file__).with_name("RESULTS.md")
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(text_out + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text_out
    path.write_text(new)


if __name__ == "__main__":
    main()
