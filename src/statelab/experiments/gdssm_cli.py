"""``statelab gdssm``: run a GD-SSM study from a config file (heavy imports happen inside the command)."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer(help="GD-SSM: an SSM that does gradient descent in context (arXiv 2410.11687).",
                  no_args_is_help=True)


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="TOML config, e.g. configs/gdssm/quick.toml"),
    out: Path | None = typer.Option(None, "--out", help="output directory (default: <out_dir>/<name>)"),
    seeds: str | None = typer.Option(None, "--seeds", help="comma-separated seeds overriding the config"),
    workers: int | None = typer.Option(None, "--workers", help="parallel processes overriding the config"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar (for log files)"),
) -> None:
    """Train GD-SSM (depths) and baselines for every seed; write results.json, report.md and PNG plots."""
    from statelab.errors import ConfigError
    from statelab.experiments.gdssm import load_config, run_experiment

    try:
        seed_list = [int(s) for s in seeds.split(",")] if seeds else None
    except ValueError as err:
        raise typer.BadParameter(f"--seeds must be comma-separated integers, got {seeds!r}") from err
    try:
        cfg = load_config(config, seeds=seed_list, workers=workers)
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
