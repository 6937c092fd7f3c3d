"""``statelab soup run [--model DIR] [--config FILE] [key=value ...]``: the State Soup experiment
(:mod:`statelab.experiments.soup`)."""

from __future__ import annotations

import json

import typer

from statelab.cli.common import NoProgressOpt, TokenizerOpt, fail_cleanly

__all__ = ["app"]

app = typer.Typer(
    name="soup",
    help="The State Soup experiment: skill library, retrieval, soups, ordered composition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command("run")
@fail_cleanly
def run_cmd(
    overrides: list[str] = typer.Argument(None, help="key=value config overrides, e.g. icl_items=10 name=quick"),
    model: str = typer.Option(None, "--model", help="checkpoint directory, hub id or 'embedded' (the default)"),
    config: str = typer.Option(None, "--config", "-c", help="a soup config file (.toml or .json)"),
    tokenizer: TokenizerOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Run the experiment and write <out_dir>/<name>/report.md.

    Example: statelab soup run --model embedded name=demo icl_items=10
    """
    from statelab.experiments.soup import load_soup_config, print_summary, run_soup

    given = [f"model={json.dumps(model)}"] if model else []
    given += [f"tokenizer={json.dumps(tokenizer)}"] if tokenizer else []
    given += ["progress=false"] if no_progress else []
    cfg = load_soup_config(config, (overrides or []) + given)
    res, report = run_soup(cfg)
    print_summary(res, cfg, report)
