"""Choosing the Birdie study's setting: a sweep of model size, state type and tokens for next-token training.

The study can only show (or refute) Birdie's retrieval claim where retrieval can be learned at all. A sweep trains
the next-token arm (or any arms a setting names) of the study at several settings, with the study's own pipeline
(:func:`statelab.experiments.birdie.run_one`: the same corpus, fine-tunes and zero-shot probes), and tabulates
what next-token training reaches at each, so a reader sees why the study's setting was chosen: the spec asks for
one where next-token retrieves at least twice chance on phonebook (one name) and on MQAR, with headroom left.

``statelab birdie sweep --config configs/birdie/sweep.toml`` reads::

    name = "birdie-sweep"
    [base]                     # BirdieExperimentConfig fields shared by every setting
    corpus = "records"
    arms = ["ntp"]
    [[settings]]               # one table per setting: a label and the fields it changes
    label = "gated SSM 64 x 2, 1M tokens"
    token_budget = 1000000

and writes ``runs/<name>/sweep.md`` (the table), ``results.json`` and each setting's checkpoints under
``runs/<name>/<setting index>/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from statelab.config import from_dict
from statelab.errors import ConfigError
from statelab.experiments.birdie import BirdieExperimentConfig, Job, _run_pool, arm_arch, check_held_out

__all__ = ["BirdieSweepConfig", "sweep_configs", "run_sweep", "sweep_table", "CHANCE"]

#: digit accuracy of a uniform guess (ten digits)
CHANCE = 0.1

_COLUMNS = (
    ("phonebook_q1", "phonebook, 1 name"),
    ("mqar", "MQAR"),
    ("zs_phonebook", "zero-shot phonebook"),
    ("zs_mqar", "zero-shot MQAR"),
    ("zt_phonebook", "zero-shot task phonebook"),
    ("zt_mqar", "zero-shot task MQAR"),
    ("bits_per_byte", "bits per byte"),
)


@dataclass(frozen=True)
class BirdieSweepConfig:
    """A sweep: ``base`` fields of :class:`BirdieExperimentConfig` shared by every setting, and ``settings``, each a
    table with a ``label`` and the fields it changes. ``workers`` processes of ``threads`` torch threads run all
    settings' runs from one queue."""

    name: str = "birdie-sweep"
    out_dir: str = "runs"
    base: dict[str, Any] = field(default_factory=dict)
    settings: tuple[dict[str, Any], ...] = ()
    workers: int = 2
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.settings:
            raise ConfigError("a sweep needs at least one [[settings]] table")
        for i, s in enumerate(self.settings):
            if not isinstance(s, dict) or not isinstance(s.get("label"), str):
                raise ConfigError(f"settings[{i}] must be a table with a string 'label'")
        for key in ("name", "out_dir", "workers", "threads"):
            if key in self.base or any(key in s for s in self.settings):
                raise ConfigError(f"'{key}' is a sweep field: set it at the top level, not in base or a setting")


def sweep_configs(cfg: BirdieSweepConfig) -> list[tuple[str, BirdieExperimentConfig]]:
    """``(label, study config)`` of each setting; unknown or mistyped fields raise :class:`ConfigError`."""
    out = []
    for i, s in enumerate(cfg.settings):
        fields = {**cfg.base, **{k: v for k, v in s.items() if k != "label"}}
        fields.update(name=f"{cfg.name}/{i}", out_dir=cfg.out_dir, workers=cfg.workers, threads=cfg.threads)
        out.append((s["label"], from_dict(BirdieExperimentConfig, fields, where=f"settings[{i}]")))
    return out


def sweep_table(cfg: BirdieSweepConfig, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per (setting, arm), means ± std over its seeds, and whether it retrieves at least
    twice chance on both phonebook (1 name) and MQAR, zero-shot (probes or task items) and after the fine-tune."""
    head = [
        "setting",
        "arm",
        "model",
        "params",
        "counted tokens",
        *(c for _, c in _COLUMNS),
        "zero-shot >= 2x chance",
        "fine-tuned >= 2x chance",
        "train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], r["arm"], r["model"], f"{r['n_params']:,}", f"{r['counted_tokens']:,.0f}"]
        for key, _ in _COLUMNS:
            if key not in r:  # a metric the run's version of statelab did not measure
                cells.append("–")
                continue
            mu, sd = r[key]
            cells.append(f"{mu:.3f}" + (f" ± {sd:.3f}" if r["n_seeds"] > 1 else ""))
        zs = any(all(k in r and r[k][0] >= 2 * CHANCE for k in (f"{p}_phonebook", f"{p}_mqar")) for p in ("zs", "zt"))
        ft = r["phonebook_q1"][0] >= 2 * CHANCE and r["mqar"][0] >= 2 * CHANCE
        cells += ["yes" if zs else "no", "yes" if ft else "no", f"{r['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _rows(settings: list[tuple[str, BirdieExperimentConfig]], records: dict[int, dict[str, Any]], jobs: list[Job]):
    by: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for key, _, arm, _, _ in jobs:
        if key in records:
            by.setdefault((key // 10_000, arm), []).append(records[key])
    rows = []
    for (i, arm), recs in sorted(by.items()):
        label, ecfg = settings[i]
        row: dict[str, Any] = {
            "label": label,
            "arm": arm,
            "model": f"{arm_arch(arm, ecfg)} {ecfg.d_model} x {ecfg.n_layer}",
            "n_params": recs[0]["n_params"],
            "counted_tokens": float(np.mean([r["counted_tokens"] for r in recs])),
            "train_s": float(np.mean([r["train_s"] for r in recs])),
            "n_seeds": len(recs),
        }
        for key, _ in _COLUMNS:
            if all(key in r["metrics"] for r in recs):
                v = np.array([r["metrics"][key] for r in recs])
                row[key] = (float(v.mean()), float(v.std()))
        rows.append(row)
    return rows


def run_sweep(cfg: BirdieSweepConfig, show_progress: bool = True) -> Path:
    """Run every setting's (arm, seed) runs; write ``sweep.md`` and ``results.json``. Returns the sweep dir."""
    settings = sweep_configs(cfg)
    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    checked = sum(check_held_out(ecfg) for _, ecfg in settings)
    jobs: list[Job] = []
    for i, (_, ecfg) in enumerate(settings):
        (run_dir / str(i)).mkdir(exist_ok=True)
        for j, (arm, seed) in enumerate((a, s) for s in ecfg.seeds for a in ecfg.arms):
            jobs.append((10_000 * i + j, ecfg, arm, seed, str(run_dir / str(i))))
    t0 = time.perf_counter()

    def save(done: dict[int, dict[str, Any]], failures: dict[int, str]) -> list[dict[str, Any]]:
        rows = _rows(settings, done, jobs)
        body = {
            "config": asdict(cfg),
            "held_out_checked": checked,
            "rows": rows,
            "runs": {str(k): v for k, v in sorted(done.items())},
            "failures": {str(k): v for k, v in sorted(failures.items())},
            "wall_s": time.perf_counter() - t0,
        }
        (run_dir / "results.json").write_text(json.dumps(body, indent=1))
        return rows

    done, failures = _run_pool(jobs, cfg.workers, cfg.threads, show_progress, save)
    rows = save(done, failures)
    lines = [
        f"# Birdie sweep: {cfg.name}",
        "",
        "What next-token training reaches at each setting (mean ± std over seeds), with the study's own corpus, "
        "fine-tunes and probes. phonebook, 1 name and MQAR: digit accuracy after the fine-tune; zero-shot: the "
        "recall probes without any fine-tune, read as next-token text; zero-shot task: the evaluation's own items "
        f"read as next-token text, no fine-tune; chance is about {CHANCE}. The study's setting "
        f"must retrieve at least twice chance ({2 * CHANCE:.1f}) on both tasks and leave headroom.",
        "",
        *sweep_table(cfg, rows),
        "",
        f"Wall time {(time.perf_counter() - t0) / 60:.1f} min with {cfg.workers} worker process(es) of "
        f"{cfg.threads} torch thread(s).",
    ]
    if failures:
        names = {key: f"{settings[key // 10_000][0]}, {arm} seed {seed}" for key, _, arm, seed, _ in jobs}
        lines += ["", "## Failed runs", ""] + [f"- {names[k]}: {msg}" for k, msg in sorted(failures.items())]
    lines += ["", "## Config", "", "```json", json.dumps(asdict(cfg), indent=1), "```", ""]
    (run_dir / "sweep.md").write_text("\n".join(lines))
    return run_dir
