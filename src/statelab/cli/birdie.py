"""``statelab birdie run --config FILE [key=value ...]``: the Birdie study (:mod:`statelab.experiments.birdie`);
``statelab birdie sweep --config FILE``: the sweep its setting is chosen from
(:mod:`statelab.experiments.birdie_sweep`)."""

from __future__ import annotations

from pathlib import Path

import typer

from statelab.cli.common import NoProgressOpt, fail_cleanly

__all__ = ["app"]

app = typer.Typer(
    help="Birdie: objective mixtures, the reward-driven controller and bidirectional SSM layers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command("run")
@fail_cleanly
def run_command(
    config: Path = typer.Option(..., "--config", "-c", help="TOML or JSON file with BirdieExperimentConfig fields"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. token_budget=100000"),
    no_progress: NoProgressOpt = False,
) -> None:
    """Train every arm for every seed at equal counted tokens, evaluate, write runs/<name>/report.md.

    Example: statelab birdie run --config configs/birdie/quick.toml seeds=[0]
    """
    from statelab.config import apply_overrides, from_dict, read_config_file
    from statelab.experiments.birdie import BirdieExperimentConfig, run_experiment

    cfg = from_dict(BirdieExperimentConfig, apply_overrides(read_config_file(config), overrides or []))
    out = run_experiment(cfg, show_progress=not no_progress)
    typer.echo(f"report: {out / 'report.md'}")


@app.command("sweep")
@fail_cleanly
def sweep_command(
    config: Path = typer.Option(..., "--config", "-c", help="TOML or JSON file with BirdieSweepConfig fields"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. workers=1"),
    no_progress: NoProgressOpt = False,
) -> None:
    """Train the study's next-token arm (or the arms a setting names) at several settings; write
    runs/<name>/sweep.md, the table the study's setting is chosen from.

    Example: statelab birdie sweep --config configs/birdie/sweep.toml
    """
    from statelab.config import apply_overrides, from_dict, read_config_file
    from statelab.experiments.birdie_sweep import BirdieSweepConfig, run_sweep

    cfg = from_dict(BirdieSweepConfig, apply_overrides(read_config_file(config), overrides or []))
    out = run_sweep(cfg, show_progress=not no_progress)
    typer.echo(f"table: {out / 'sweep.md'}")
