"""``statelab train``: run a training config, or print it resolved, from the command line."""

from __future__ import annotations

import json

import typer

from statelab.errors import StatelabError

__all__ = ["app"]

app = typer.Typer(
    name="train",
    help="Train a statelab model from a TOML/JSON config (runs under torchrun for DDP).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command("run")
def run_cmd(
    config: str = typer.Argument(..., help="training config file (.toml or .json)"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. optim.lr=1e-3 run.max_steps=50"),
) -> None:
    """Train (or resume) the run a config describes.

    Example: statelab train run src/statelab/embedded/train.toml run.max_steps=100 run.out_dir=runs/short

    Several processes: torchrun --nproc-per-node 2 -m statelab.train CONFIG [key=value ...]
    """
    from statelab.train.config import load_train_config
    from statelab.train.loop import train

    try:
        cfg = load_train_config(config, overrides or [])
        result = train(cfg)
    except StatelabError as e:
        _fail(e)
    typer.echo(
        f"trained {result.step} steps ({result.tokens:,} tokens, {result.elapsed:.0f} s); "
        f"last loss {result.last_loss:.4f}; run directory {result.out_dir}"
    )


@app.command("config")
def config_cmd(
    config: str = typer.Argument(None, help="training config file (.toml or .json); omit for the defaults"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides"),
) -> None:
    """Print the resolved config as JSON (file, then overrides, checked).

    Example: statelab train config src/statelab/embedded/train.toml optim.lr=1e-3
    """
    from statelab.train.config import load_train_config, to_dict

    try:
        cfg = load_train_config(config, overrides or [])
    except StatelabError as e:
        _fail(e)
    typer.echo(json.dumps(to_dict(cfg), indent=2))
