"""``statelab gdssm run --config FILE [key=value ...]``: run a GD-SSM study from a config file
(:mod:`statelab.experiments.gdssm`; heavy imports happen inside the command)."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer(help="GD-SSM: an SSM that does gradient descent in context (arXiv 2410.11687).", no_args_is_help=True)


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="TOML or JSON config, e.g. configs/gdssm/quick.toml"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. train.steps=200 gdssm.depths=[1]"),
    out: Path | None = typer.Option(None, "--out", help="output directory (default: <out_dir>/<name>)"),
    seeds: str | None = typer.Option(None, "--seeds", help="comma-separated seeds (short for seeds=[...])"),
    workers: int | None = typer.Option(None, "--workers", help="parallel processes (short for workers=N)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar (for log files)"),
) -> None:
    """Train GD-SSM (depths) and baselines for every seed; write results.json, report.md and PNG plots."""
    from statelab.errors import ConfigError
    from statelab.experiments.gdssm import load_config, run_experiment

    try:
        seed_list = [int(s) for s in seeds.split(",")] if seeds else None
    except ValueError as err:
        raise typer.BadParameter(f"--seeds must be comma-separated integers, got {seeds!r}") from err
    # --seeds and --workers come after the key=value overrides, so they win over seeds=... and workers=...
    extra = [f"seeds={seed_list}"] if seed_list is not None else []
    extra += [f"workers={workers}"] if workers is not None else []
    try:
        cfg = load_config(config, [*(overrides or []), *extra])
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    root = run_experiment(cfg, out_dir=out, show_progress=not no_progress)
    typer.echo(f"report: {root / 'report.md'}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory written by `statelab gdssm run`")) -> None:
    """Rebuild report.md and the plots from a run directory (also from an interrupted run's partial results)."""
    from statelab.errors import ConfigError
    from statelab.experiments.gdssm import report_from_files

    try:
        path = report_from_files(run_dir)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"report: {path}")
