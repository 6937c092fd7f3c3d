"""``statelab gdssm run --config FILE [key=value ...]`` and ``statelab gdssm report RUN_DIR``: the GD-SSM study
(:mod:`statelab.experiments.gdssm`)."""

from __future__ import annotations

from pathlib import Path

import typer

from statelab.cli.common import CliError, NoProgressOpt, fail_cleanly

__all__ = ["app"]

app = typer.Typer(
    help="GD-SSM: an SSM that does gradient descent in context (arXiv 2410.11687).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
@fail_cleanly
def run(
    config: Path = typer.Option(..., "--config", "-c", help="TOML or JSON config, e.g. configs/gdssm/quick.toml"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. train.steps=200 gdssm.depths=[1]"),
    out: Path | None = typer.Option(None, "--out", help="output directory (default: <out_dir>/<name>)"),
    seeds: str | None = typer.Option(None, "--seeds", help="comma-separated seeds (short for seeds=[...])"),
    workers: int | None = typer.Option(None, "--workers", help="parallel processes (short for workers=N)"),
    no_progress: NoProgressOpt = False,
) -> None:
    """Train GD-SSM (depths) and baselines for every seed; write results.json, report.md and PNG plots.

    Example: statelab gdssm run --config configs/gdssm/quick.toml --seeds 0,1
    """
    from statelab.experiments.gdssm import load_config, run_experiment

    try:
        seed_list = [int(s) for s in seeds.split(",")] if seeds else None
    except ValueError:
        raise CliError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    # --seeds and --workers come after the key=value overrides, so they win over seeds=... and workers=...
    extra = [f"seeds={seed_list}"] if seed_list is not None else []
    extra += [f"workers={workers}"] if workers is not None else []
    cfg = load_config(config, [*(overrides or []), *extra])
    root = run_experiment(cfg, out_dir=out, show_progress=not no_progress)
    typer.echo(f"report: {root / 'report.md'}")


@app.command()
@fail_cleanly
def report(run_dir: Path = typer.Argument(..., help="a run directory written by `statelab gdssm run`")) -> None:
    """Rebuild report.md and the plots from a run directory (also from an interrupted run's partial results).

    Example: statelab gdssm report runs/gdssm-quick
    """
    from statelab.experiments.gdssm import report_from_files

    typer.echo(f"report: {report_from_files(run_dir)}")
