"""``statelab birdie run --config FILE [key=value ...]``: the Birdie study (:mod:`statelab.experiments.birdie`)."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer(
    help="Birdie: objective mixtures, the reward-driven controller and bidirectional SSM layers.", no_args_is_help=True
)


@app.command("run")
def run_command(
    config: Path = typer.Option(..., "--config", help="TOML or JSON file with BirdieExperimentConfig fields"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. token_budget=100000"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Train every arm for every seed at equal counted tokens, evaluate, write runs/<name>/report.md."""
    from statelab.config import apply_overrides, from_dict, read_config_file
    from statelab.errors import ConfigError
    from statelab.experiments.birdie import BirdieExperimentConfig, run_experiment

    try:
        cfg = from_dict(BirdieExperimentConfig, apply_overrides(read_config_file(config), overrides or []))
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    out = run_experiment(cfg, show_progress=not quiet)
    typer.echo(f"report: {out / 'report.md'}")
