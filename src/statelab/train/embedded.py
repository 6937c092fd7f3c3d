"""Build statelab's embedded model: train it from the recipe in the package, evaluate it, write its model card.

``make embedded`` runs ``python -m statelab.train.embedded``:

1. trains (or resumes) the run described by ``statelab/embedded/train.toml`` (``key=value`` overrides allowed);
2. copies the trained model (Hugging Face format: ``config.json``, ``model.safetensors``), its tokenizer
   description and the training config into ``statelab/embedded/``, with the training curve;
3. measures greedy exact-match accuracy by number of shots on held-out (test-split) items of every training task;
4. writes the model card ``statelab/embedded/README.md`` and ``accuracy_by_shots.png``.

``statelab.load_model("embedded")`` then returns the model.
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from statelab.train.config import TrainConfig, load_train_config, to_dict
from statelab.train.loop import read_metrics, train

__all__ = ["recipe_path", "accuracy_by_shots", "write_checksums", "write_model_card", "build_embedded", "main"]

SHOTS = (0, 1, 2, 4, 8, 16, 32)
_ARCH_NAMES = {"mamba1": "Mamba-1", "mamba2": "Mamba-2"}
_COPY = ("config.json", "model.safetensors", "statelab_tokenizer.json", "tokenizer.json")


def recipe_path() -> Path:
    """The training config of the embedded model, shipped in the package."""
    return Path(__file__).resolve().parents[1] / "embedded" / "train.toml"


@torch.no_grad()
def accuracy_by_shots(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    template: str,
    shots: Sequence[int] = SHOTS,
    items: int = 16,
    prompts: int = 2,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Greedy exact-match accuracy ``{task: {k: acc}}`` on ``items`` test items per task, ``k`` train demos.

    For each ``(task, k)``, ``prompts`` different k-shot prompts each serve an equal share of the items. A task's
    prompts are encoded in bulk (:func:`statelab.encode_texts`) and the items of all prompts of one ``k`` are scored
    in one teacher-forced pass, each item from its own prompt's state (greedy exact match, as ``exact_match``
    decides it).
    """
    from statelab.eval.icl import Prompter, exact_match
    from statelab.models.batching import encode_texts
    from statelab.state.core import State
    from statelab.tasks import TASKS

    p = Prompter(template, tokenizer)
    out: dict[str, dict[str, float]] = {}
    for ti, name in enumerate(tasks):
        task = TASKS[name]
        test = task.examples("test", min(items, len(task.pool("test"))), seed=seed)
        its = [p.item(x, y) for x, y in test]
        out[name] = {}
        jobs = []  # (k, the items one prompt serves, its demonstrations)
        for k in shots:
            if k == 0:
                out[name]["0"] = float(np.mean(exact_match(model, None, its)))
                continue
            n_p = min(prompts, len(its))
            for j in range(n_p):
                demos = task.examples("train", k, seed=seed * 1000 + 17 * ti + 7919 * j + k)
                jobs.append((k, its[j::n_p], demos))
        if not jobs:
            continue
        states = encode_texts(model, tokenizer, [p.demos(demos) for _, _, demos in jobs])
        for k in shots:
            if k == 0:
                continue
            mine = [(group, s) for (kk, group, _), s in zip(jobs, states, strict=True) if kk == k]
            start = State.cat([s.expand(len(group)) for group, s in mine])
            out[name][str(k)] = float(np.mean(exact_match(model, start, [it for group, _ in mine for it in group])))
        out[name] = {str(k): out[name][str(k)] for k in shots}  # in the order of shots
    return out


def write_checksums(dest: Path) -> Path:
    """``SHA256SUMS`` of the shipped model files (``sha256sum -c`` format), so a test can tell a damaged or
    unrebuilt copy from the one the card describes."""
    import hashlib

    lines = []
    for name in _COPY:
        f = dest / name
        if f.is_file():
            lines.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {name}")
    path = dest / "SHA256SUMS"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _plot_shots(acc: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [int(k) for k in next(iter(acc.values()))]
    xs = [max(k, 0.5) for k in ks]  # 0 shots drawn at 0.5 on the log axis
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in acc.values():
        ax.plot(xs, [100 * row[str(k)] for k in ks], lw=0.8, alpha=0.35)
    mean = [100 * float(np.mean([row[str(k)] for row in acc.values()])) for k in ks]
    ax.plot(xs, mean, color="black", lw=2.5, marker="o", label=f"mean over {len(acc)} tasks")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(k) for k in ks])
    ax.set_xlabel("demonstrations in the prompt (k)")
    ax.set_ylabel("greedy exact match on held-out items (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Embedded model: accuracy by number of shots (thin lines: single tasks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> str:
    """CPU model, core count and torch version of this machine, for the model card."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def write_model_card(
    dest: Path,
    cfg: TrainConfig,
    metrics: list[dict[str, Any]],
    acc: dict[str, dict[str, float]],
    template: str,
    note: str = "",
) -> Path:
    """``README.md``: what the model is, how it was made (config, data, seed), its curve and its accuracy.

    The architecture, Hugging Face class and data options are read from ``cfg`` and ``dest/config.json``, so the
    card describes whichever model the recipe builds."""
    mc = cfg.model.config
    last = metrics[-1] if metrics else {}
    tail = [m["loss"] for m in metrics[-20:] if "loss" in m]
    tail_loss = float(np.mean(tail)) if tail else float("nan")
    n_params = None
    cfg_file = dest / "model.safetensors"
    if cfg_file.is_file():
        import safetensors

        with safetensors.safe_open(str(cfg_file), "pt") as f:
            n_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
    ks = list(next(iter(acc.values())))
    mean = {k: float(np.mean([row[k] for row in acc.values()])) for k in ks}
    tasks = list(cfg.data.options.get("tasks", []))
    arch = _ARCH_NAMES.get(cfg.model.arch, cfg.model.arch)
    hf_class = "?"
    if (dest / "config.json").is_file():
        hf_class = ", ".join(json.loads((dest / "config.json").read_text()).get("architectures", ["?"]))
    opts = cfg.data.options
    extra_templates = list(opts.get("templates", []))
    mixing = []
    if extra_templates and opts.get("template_mix"):
        mixing.append(
            f"a fraction {opts['template_mix']:g} of the sequences use one of {len(extra_templates)} other "
            f"templates ({', '.join(f'`{json.dumps(t)}`' for t in extra_templates)})"
        )
    if opts.get("switch_prob"):
        mixing.append(f"with probability {opts['switch_prob']:g} a sequence holds 2 or 3 tasks in turn, unannounced")
    if opts.get("text_fraction"):
        frac, text = opts["text_fraction"], opts.get("text", "?")
        mixing.append(f"a fraction {frac:g} of the sequences are windows of the text `{text}` (loss on every byte)")
    lines = [
        "# statelab embedded model",
        "",
        f"A small byte-level {arch} language model trained by statelab's own training loop to learn word-function "
        "tasks in context. It ships with the package so that the State Soup demo (`make demo`) runs anywhere "
        'without downloading anything: `statelab.load_model("embedded")`. It is a toy for demonstrations and '
        "tests, not a general language model.",
        "",
        "## Model",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in mc.items()],
        f"| parameters | {n_params:,} |" if n_params is not None else "| parameters | ? |",
        "| tokenizer | bytes 0-255, then PAD 256, BOS 257, EOS 258 (`statelab_tokenizer.json`) |",
        f"| architecture | {arch} (`{cfg.model.arch}`) |",
        f"| format | Hugging Face `{hf_class}` (`config.json`, `model.safetensors`) |",
        "",
        "## Training",
        "",
        "- Recipe: `train.toml` (in this directory; the exact resolved config is `train_config.json`). Reproduce "
        f"with `make embedded` (CPU, {cfg.run.threads or 'default'} torch thread(s)).",
        f"- Data: the `tasks` source of `statelab.train.mixture`, seed {cfg.data.seed}: each sequence of "
        f"{cfg.data.seq_len} bytes holds demonstrations of one task drawn uniformly from {len(tasks)} word-function "
        f"tasks of `statelab.tasks` (train split only; the test split is held out by key), template "
        f"`{json.dumps(template)}`, loss on the answer bytes and the newline after each answer"
        + (f"; {'; '.join(mixing)}." if mixing else "."),
        f"- Tasks: {', '.join(f'`{t}`' for t in tasks)}.",
        f"- Optimiser: AdamW lr {cfg.optim.lr:g} (warmup {cfg.optim.warmup_steps} steps, cosine to "
        f"{cfg.optim.min_lr:g}), betas {list(cfg.optim.betas)}, weight decay {cfg.optim.weight_decay:g} (none on "
        f"A_log, dt_bias, D, norms), gradient clip {cfg.optim.grad_clip:g}; {cfg.run.max_steps} steps of "
        f"{cfg.run.global_batch_size} sequences; model seed {cfg.run.seed}.",
        f"- Trained: {last.get('step', '?')} steps, {last.get('tokens', 0):,} tokens, "
        f"{last.get('elapsed', 0) / 60:.1f} minutes of training; training loss {tail_loss:.3f} nats per scored "
        f"byte (mean of the last {len(tail)} logged steps).",
        f"- Card written {datetime.date.today().isoformat()} on {_machine()}.",
        *([f"- Note: {note}"] if note else []),
        "",
        "![training curve](training_curve.png)",
        "",
        "## Accuracy by number of shots",
        "",
        "Greedy exact match (answer and its terminating newline) on 16 held-out test items per task; the k "
        "demonstrations come from the train split (2 different prompts per task and k). Scored by "
        "`statelab.train.embedded.accuracy_by_shots`.",
        "",
        "| task | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
        "| **mean** | " + " | ".join(f"**{100 * mean[k]:.1f}**" for k in ks) + " |",
        *[f"| {t} | " + " | ".join(f"{100 * row[k]:.1f}" for k in ks) + " |" for t, row in acc.items()],
        "",
        "![accuracy by shots](accuracy_by_shots.png)",
        "",
        "## Limits",
        "",
        "- Tiny and briefly trained: knowledge tasks (capitals, antonyms) cannot be answered for held-out keys the "
        "model never saw; accuracy there measures format and guessing, not knowledge.",
        "- Byte-level and trained on the formats above: other text is out of distribution."
        if extra_templates
        else "- Byte-level and trained only on the `Q: x\\nA: y` format: other text is out of distribution.",
        "",
    ]
    path = dest / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def build_embedded(
    overrides: Sequence[str] = (), dest: Path | None = None, skip_train: bool = False, note: str = ""
) -> Path:
    """Train (unless ``skip_train``), copy into ``dest`` (default: the package's ``embedded/``), evaluate, card."""
    from statelab.models.loading import load_model
    from statelab.models.tokenizer import load_tokenizer
    from statelab.tasks import DEFAULT_TEMPLATE

    src_cfg = recipe_path()
    cfg = load_train_config(src_cfg, overrides)
    dest = dest or src_cfg.parent
    run_dir = Path(cfg.run.out_dir)
    if not skip_train:
        train(cfg)
    final = run_dir / "final"
    dest.mkdir(parents=True, exist_ok=True)
    for name in _COPY:
        if (final / name).is_file():
            shutil.copy2(final / name, dest / name)
    (dest / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=1) + "\n", encoding="utf-8")
    if (run_dir / "loss.png").is_file():
        shutil.copy2(run_dir / "loss.png", dest / "training_curve.png")
    if dest.resolve() != src_cfg.parent.resolve():
        shutil.copy2(src_cfg, dest / "train.toml")
    model = load_model(dest).eval()
    tokenizer = load_tokenizer(dest)
    template = cfg.data.options.get("template") or DEFAULT_TEMPLATE
    tasks = list(cfg.data.options.get("tasks", []))
    acc = accuracy_by_shots(model, tokenizer, tasks, template)
    (dest / "accuracy_by_shots.json").write_text(json.dumps(acc, indent=1) + "\n", encoding="utf-8")
    _plot_shots(acc, dest / "accuracy_by_shots.png")
    write_checksums(dest)
    return write_model_card(dest, cfg, read_metrics(run_dir / "metrics.jsonl"), acc, template, note)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m statelab.train.embedded [--skip-train] [--note=TEXT] [key=value ...]``

    ``--skip-train`` only copies, evaluates and writes the card from a finished run; ``--note`` adds a line about
    how this build differed from the recipe (e.g. the machine).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    skip = "--skip-train" in args
    note = next((a.split("=", 1)[1] for a in args if a.startswith("--note=")), "")
    args = [a for a in args if a != "--skip-train" and not a.startswith("--note=")]
    card = build_embedded(args, skip_train=skip, note=note)
    print(f"embedded model written; model card: {card}")


if __name__ == "__main__":
    main()
