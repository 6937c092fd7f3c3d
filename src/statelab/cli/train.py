"""``statelab train run | config``: run a training config, or print it resolved, from the command line."""

from __future__ import annotations

import json

import typer

from statelab.cli.common import CliError, NoProgressOpt, fail_cleanly

__all__ = ["app"]

app = typer.Typer(
    name="train",
    help="Train a statelab model from a TOML/JSON config (runs under torchrun for DDP).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigOpt = typer.Option(None, "--config", "-c", help="Training config file (.toml or .json).", show_default=False)
OverridesArg = typer.Argument(None, help="key=value overrides, e.g. optim.lr=1e-3 run.max_steps=50")


def _config_and_overrides(config: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """``--config`` and the overrides; a first positional that is not ``key=value`` is the config file, as
    ``statelab train run CONFIG`` was once written (accepted with a ``warning:`` line)."""
    rest = list(overrides or [])
    if config is None and rest and "=" not in rest[0]:
        config = rest.pop(0)
        typer.echo(f"warning: CONFIG as a positional argument is deprecated; write --config {config}", err=True)
    return config, rest


@app.command("run")
@fail_cleanly
def run_cmd(
    config: str | None = ConfigOpt,
    overrides: list[str] | None = OverridesArg,
    no_progress: NoProgressOpt = False,
) -> None:
    """Train (or resume) the run a config describes.

    Example: statelab train run --config src/statelab/embedded/train.toml run.max_steps=100 run.out_dir=runs/short

    Several processes: torchrun --nproc-per-node 2 -m statelab.train --config CONFIG [key=value ...]
    """
    from statelab.train.config import load_train_config
    from statelab.train.loop import train

    config, rest = _config_and_overrides(config, overrides)
    if config is None:
        raise CliError("give the training config: statelab train run --config FILE [key=value ...]")
    cfg = load_train_config(config, rest + (["run.progress=false"] if no_progress else []))
    result = train(cfg)
    typer.echo(
        f"trained {result.step} steps ({result.tokens:,} tokens, {result.elapsed:.0f} s); "
        f"last loss {result.last_loss:.4f}; run directory {result.out_dir}"
    )


@app.command("config")
@fail_cleanly
def config_cmd(config: str | None = ConfigOpt, overrides: list[str] | None = OverridesArg) -> None:
    """Print the resolved config as JSON (file, then overrides, checked; the defaults without --config).

    Example: statelab train config --config src/statelab/embedded/train.toml optim.lr=1e-3
    """
    from statelab.train.config import load_train_config, to_dict

    config, rest = _config_and_overrides(config, overrides)
    typer.echo(json.dumps(to_dict(load_train_config(config, rest)), indent=2))
