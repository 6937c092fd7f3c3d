"""Report of the GD-SSM study: ``report.md`` (tables, mean ± standard deviation over seeds) and PNG plots."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["aggregate", "write_report"]


def _stats(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def aggregate(records: list[dict[str, Any]], key: str) -> dict[str, tuple[float, float, int]]:
    """``label -> (mean, std, n)`` of one scalar metric over the successful seeds of each label."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if "error" not in r and key in r:
            groups[r["label"]].append(r[key])
    return {label: _stats(v) for label, v in groups.items()}


def _pm(stat: tuple[float, float, int], digits: int = 4) -> str:
    mean, std, n = stat
    if n == 0:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _nested(records: list[dict[str, Any]], label: str, key: str) -> tuple[float, float, int]:
    return _stats([r["canonical"][key] for r in records if r["label"] == label and "canonical" in r])


def _plots(config: Any, results: dict[str, Any], root: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "error" not in r]
    refs = results["references"]
    gd = {row["steps"]: row for row in refs["gd"]}
    made = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(root / name, dpi=120)
        plt.close(fig)
        made.append(name)

    # 1. validation curves of GD-SSM per depth, mean ± std over seeds
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = [(f"gdssm-L{d}", d, f"GD-SSM, {d} layer{'s' if d > 1 else ''}") for d in config.gdssm.depths]
    rows += [(f"gdssm-L1-init{x:g}", 1, f"GD-SSM, 1 layer, init scale {x:g}") for x in config.gdssm.extra_init_scales]
    for label, depth, name in rows:
        curves = [r["curve"] for r in runs if r["label"] == label]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        stats = [_stats([c[i][1] for c in curves]) for i in range(len(steps))]
        mean = [m for m, _, _ in stats]
        std = [s for _, s, _ in stats]
        line = ax.plot(steps, mean, label=name, ls="-" if label == f"gdssm-L{depth}" else "-.")[0]
        ax.fill_between(
            steps,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            color=line.get_color(),
            alpha=0.2,
        )
        if depth in gd:
            ax.axhline(gd[depth]["expected_loss"], color=line.get_color(), ls="--", lw=0.8)
    ax.axhline(refs["zero_predictor"], color="grey", ls=":", label="zero predictor")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (½·MSE at the query)")
    ax.set_title("GD-SSM from random init; dashed: k-step GD at its optimal η")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    save(fig, "training_curves.png")

    # 2. loss per in-context position
    n = config.task.n_examples
    xs = list(range(1, n + 1))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for depth in config.gdssm.depths:
        rows = [r["position_loss"] for r in runs if r["label"] == f"gdssm-L{depth}"]
        if rows:
            stats = [_stats([row[i] for row in rows]) for i in range(n)]
            ax.errorbar(
                xs,
                [m for m, _, _ in stats],
                yerr=[s for _, s, _ in stats],
                marker="o",
                ms=3,
                capsize=2,
                label=f"GD-SSM {depth} layer{'s' if depth > 1 else ''} (trained at i = N only)",
            )
    ax.plot(xs, refs["positions"]["construction"], "k--", label="1-step GD construction, c = η*/N")
    ax.plot(xs, refs["positions"]["best_per_prefix"], "k:", label="1-step GD, best c per prefix")
    ax.set_xlabel("in-context examples i (window i predicts y_{i+1})")
    ax.set_ylabel("½·MSE")
    ax.legend(fontsize=8)
    save(fig, "positions.png")

    # 3. depth vs GD steps
    loss = aggregate(runs, "loss")
    depths = [d for d in config.gdssm.depths if f"gdssm-L{d}" in loss]
    if depths:
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        ax.errorbar(
            depths,
            [loss[f"gdssm-L{d}"][0] for d in depths],
            yerr=[loss[f"gdssm-L{d}"][1] for d in depths],
            marker="o",
            capsize=3,
            label="GD-SSM, L layers (trained)",
        )
        ks = sorted(gd)
        ax.plot(ks, [gd[k]["expected_loss"] for k in ks], "s--", label="k-step GD, optimal η")
        ax.set_xlabel("layers L / GD steps k")
        ax.set_ylabel("test loss")
        ax.set_xticks(sorted(set(depths) | set(ks)))
        ax.legend(fontsize=8)
        save(fig, "depth.png")

    # 4. baselines
    labels = [lab for lab in loss if not lab.startswith("gdssm")]
    if labels:
        labels = ["gdssm-L1", *sorted(labels)] if "gdssm-L1" in loss else sorted(labels)
        fig, ax = plt.subplots(figsize=(7.2, 4.0))
        ax.bar(
            range(len(labels)),
            [loss[lab][0] for lab in labels],
            yerr=[loss[lab][1] for lab in labels],
            capsize=3,
            color=["C1" if lab.startswith("gdssm") else "C0" for lab in labels],
        )
        ax.axhline(gd[1]["expected_loss"], color="k", ls="--", lw=0.8, label="1-step GD, optimal η")
        ax.axhline(refs["zero_predictor"], color="grey", ls=":", label="zero predictor")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("test loss")
        ax.legend(fontsize=8)
        save(fig, "baselines.png")

    # 5. canonical parameters of the first 1-layer run next to the construction
    first = next((r for r in runs if r["label"] == "gdssm-L1" and "canonical" in r), None)
    if first is not None:
        import numpy as np

        can = first["canonical"]
        d = config.task.d
        eta = gd[1]["eta"]
        fig, axes = plt.subplots(1, 4, figsize=(11, 3.0))
        panels = [
            ("trained W_q / W_q[1,2]", np.array(can["w_q"])),
            ("construction W_q = e₁e₂ᵀ", np.eye(3, k=1) * np.array([[1, 1, 0], [0, 0, 0], [0, 0, 0]])),
            ("trained C·W_q[1,2]·D₃", np.array(can["C"])),
            (
                f"construction C = −(η*/N)I = {-eta / config.task.n_examples:.3f}·I",
                -eta / config.task.n_examples * np.eye(d),
            ),
        ]
        for ax, (title, mat) in zip(axes, panels, strict=True):
            lim = max(abs(mat).max(), 1e-9)
            im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046)
        save(fig, "parameters.png")
    return made


def write_report(config: Any, results: dict[str, Any], root: Path) -> Path:
    """Write ``report.md`` and the plots into ``root``."""
    root = Path(root)
    meta, refs = results["meta"], results["references"]
    runs = [r for r in results["runs"] if "error" not in r]
    failed = [r for r in results["runs"] if "error" in r]
    plots = _plots(config, results, root)
    gd = {row["steps"]: row for row in refs["gd"]}
    loss = aggregate(runs, "loss")
    t = config.train
    task = config.task
    lines = [
        f"# GD-SSM study: {config.name}",
        "",
        f"Commit `{meta['commit']}`, {meta['date_utc']} UTC, {meta['machine']}; wall time "
        f"{meta['wall_seconds']:.0f} s for {meta['runs']} runs ({meta['failures']} failed). Seeds "
        f"{list(config.seeds)}; mean ± standard deviation over seeds.",
        "",
        f"Task: d = {task.d}, N = {task.n_examples}, {task.target} targets, x ~ U(−{task.x_range / 2:g}, "
        f"{task.x_range / 2:g}), w ~ N(0, {task.w_scale:g}²I), noise {task.noise_std:g}; ½·MSE per output "
        f"dimension at the query. Training: {t.steps} steps × {t.batch_size} fresh tasks; GD-SSM: Adam "
        f"{t.lr_recurrence:g} on Λ, log Δ and AdamW {t.lr:g} (weight decay {t.weight_decay:g}) on W_q, C, D; "
        f"baselines: AdamW {t.baseline_lr:g}. Test set: {t.test_tasks} fixed tasks.",
        "",
        "## References",
        "",
        "| predictor | η | expected loss | loss on the test set |",
        "|---|---|---|---|",
        f"| zero | — | {refs['zero_predictor']:.4f} | {refs['zero_predictor_test']:.4f} |",
        f"| 1-step GD, closed form | {refs['one_step_closed_form']['eta']:.3f} | "
        f"{refs['one_step_closed_form']['loss']:.4f} | — |",
    ]
    for k in sorted(gd):
        lines.append(
            f"| {k}-step GD, optimal η (Monte Carlo) | {gd[k]['eta']:.3f} | {gd[k]['expected_loss']:.4f} "
            f"| {gd[k]['test_loss']:.4f} |"
        )
    lines += [f"| least squares (Bayes, noiseless) | — | 0 | {refs['least_squares_test']:.2e} |", ""]

    g = config.gdssm
    lines += [
        "## GD-SSM trained from random initialisation",
        "",
        f"Init scale {g.init_scale:g} (factor on the public code's initial standard deviations of W_q and C) unless "
        "the row says otherwise. 'Seeds at GD' counts seeds whose loss is at most 1.02 × the L-step GD loss. "
        "Prediction cosine: cosine between all test-set query predictions of the model and of GD (flattened); "
        "sensitivity cosine: mean over tasks and output rows of cos(∂ŷ/∂x_q, W_GD), von Oswald et al.'s measure.",
        "",
        "| layers L | init scale | test loss | seeds at GD | L-step GD | loss / L-step GD | pred. cosine to 1-step "
        "GD | pred. cosine to L-step GD | sensitivity cosine to 1-step GD | steps/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pc1, pck = aggregate(runs, "pred_cos_gd1"), aggregate(runs, "pred_cos_gdk")
    sc1, sps = aggregate(runs, "sens_cos_gd1"), aggregate(runs, "steps_per_s")
    rows = [(f"gdssm-L{d}", d, g.init_scale) for d in g.depths]
    rows += [(f"gdssm-L1-init{x:g}", 1, x) for x in g.extra_init_scales]
    for lab, depth, scale in rows:
        if lab not in loss:
            continue
        ref = gd.get(depth, {}).get("expected_loss", float("nan"))
        at_gd = sum(r["loss"] <= 1.02 * ref for r in runs if r["label"] == lab)
        lines.append(
            f"| {depth} | {scale:g} | {_pm(loss[lab])} | {at_gd}/{loss[lab][2]} | {ref:.4f} | "
            f"{loss[lab][0] / ref:.3f} | {_pm(pc1[lab])} | {_pm(pck[lab])} | {_pm(sc1[lab])} | {sps[lab][0]:.0f} |"
        )
    lines.append("")

    if "gdssm-L1" in loss:
        lab = "gdssm-L1"
        m1 = loss[lab][0]
        target = refs["one_step_closed_form"]["loss"]
        gap = (m1 - target) / target * 100
        md1, pd1, il = (aggregate(runs, k).get(lab) for k in ("model_diff_gd1", "pred_diff_gd1", "interpolation_loss"))
        lines += [
            "### One layer vs one GD step",
            "",
            f"- test loss {_pm(loss[lab])} vs the 1-step GD optimum {target:.4f} ({gap:+.2f} %; on the same test "
            f"set 1-step GD at η* scores {gd[1]['test_loss']:.4f}, ratio {m1 / gd[1]['test_loss']:.4f}); "
            f"prediction cosine {_pm(pc1[lab])}, sensitivity cosine {_pm(sc1[lab])}; mean ‖J − W₁‖ "
            f"{_pm(md1)}, mean ‖ŷ − ŷ_GD‖ {_pm(pd1)}.",
            f"- interpolation (average of canonical trained and constructed parameters): loss {_pm(il)}.",
            "",
            "Parameters after removing the scale symmetries (W_q[1,2] = 1, D₃ = 1, scale moved into C):",
            "",
            "| quantity | trained | construction |",
            "|---|---|---|",
            f"| effective η = −N·mean diag(C) | {_pm(_nested(runs, lab, 'eta_eff'), 3)} | {gd[1]['eta']:.3f} |",
            f"| ‖offdiag C‖ / ‖diag C‖ | {_pm(_nested(runs, lab, 'C_offdiag_ratio'), 3)} | 0 |",
            f"| cosine(C, −I) | {_pm(_nested(runs, lab, 'C_cos_minus_identity'), 4)} | 1 |",
            f"| max other entry of W_q | {_pm(_nested(runs, lab, 'w_q_max_other'), 4)} | 0 |",
            f"| max(|D₁|, |D₂|) | {_pm(_nested(runs, lab, 'D_max_other'), 4)} | 0 |",
            f"| Λ̄ min | {_pm(_nested(runs, lab, 'decay_min'), 4)} | 1 |",
            f"| Λ̄ max | {_pm(_nested(runs, lab, 'decay_max'), 4)} | 1 |",
            "",
        ]

    n = task.n_examples
    pos_rows = {d: [r["position_loss"] for r in runs if r["label"] == f"gdssm-L{d}"] for d in config.gdssm.depths}
    lines += [
        "## Loss per in-context position",
        "",
        "Window i predicts the label of x_{i+1} from the first i examples; models are trained at i = N only.",
        "",
        "| i | " + " | ".join(str(i) for i in range(1, n + 1)) + " |",
        "|---|" + "---|" * n,
        "| 1-step GD construction (c = η*/N), analytic | "
        + " | ".join(f"{v:.3f}" for v in refs["positions"]["construction"])
        + " |",
        "| 1-step GD construction, test set | "
        + " | ".join(f"{v:.3f}" for v in refs["positions"]["construction_test"])
        + " |",
        "| 1-step GD, best c per prefix, analytic | "
        + " | ".join(f"{v:.3f}" for v in refs["positions"]["best_per_prefix"])
        + " |",
    ]
    for d, rows in pos_rows.items():
        if rows:
            lines.append(
                f"| GD-SSM L = {d} | "
                + " | ".join(f"{_stats([row[i] for row in rows])[0]:.3f}" for i in range(n))
                + " |"
            )
    lines.append("")

    base = sorted(lab for lab in loss if not lab.startswith("gdssm"))
    if base:
        params = aggregate(runs, "params")
        lines += [
            "## Baselines (same tasks, steps and batch)",
            "",
            "`+window`: the model reads one token per window [x_i; y_i; x_{i+1}] (3d wide) instead of the "
            "interleaved tokens (which carry a 1-bit x/y flag).",
            "",
            "| model | parameters | test loss | loss / 1-step GD | pred. cosine to 1-step GD | steps/s |",
            "|---|---|---|---|---|---|",
        ]
        for lab in (["gdssm-L1"] if "gdssm-L1" in loss else []) + base:
            lines.append(
                f"| {lab} | {params[lab][0]:.0f} | {_pm(loss[lab])} | {loss[lab][0] / gd[1]['expected_loss']:.3f} | "
                f"{_pm(pc1[lab])} | {sps[lab][0]:.0f} |"
            )
        lines.append("")

    if meta.get("not_finished"):
        lines += ["## Runs not finished (study interrupted)", "", ", ".join(meta["not_finished"]), ""]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- {r['label']} seed {r['seed']}: {r['error']}" for r in failed]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path
