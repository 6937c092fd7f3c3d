"""``statelab eval FILE.jsonl --model DIR``: score a dataset, from the zero state, a stored skill or a soup; and
``statelab lm-eval``, lm-evaluation-harness's command line with ``--model statelab``.

The file format and the metrics are those of :mod:`statelab.eval.dataset`. With ``--skill NAME -s STORE`` or
``--soup A --soup B [--mix METHOD --weights W,W]``, every item starts from that state
(:func:`statelab.eval.skills.start_state`). A bad line stops the command before the model is loaded, with one line
naming the file and line number; errors and exit codes follow :mod:`statelab.cli.common`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from statelab.cli.common import CliError, NoProgressOpt, TokenizerOpt, fail_cleanly
from statelab.eval.dataset import DEFAULT_MAX_NEW_TOKENS  # torch-free: json and dataclasses

__all__ = ["eval_command", "lm_eval_command"]


def _soup_names(soup: list[str] | None) -> list[str] | None:
    from statelab.eval.skills import parse_soup

    if not soup:
        return None
    return [name for part in soup for name in parse_soup(part)]


@fail_cleanly
def eval_command(
    file: Annotated[Path, typer.Argument(help="JSONL file: one generation or multiple-choice item per line.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint directory or 'embedded'.")],
    tokenizer: TokenizerOpt = None,
    skill: Annotated[str | None, typer.Option("--skill", help="Start every item from this store entry.")] = None,
    store: Annotated[Path | None, typer.Option("--store", "-s", help="State store of --skill / --soup.")] = None,
    soup: Annotated[
        list[str] | None,
        typer.Option("--soup", help="Store entries to mix into the start state (repeat, or NAME+NAME)."),
    ] = None,
    mix: Annotated[str, typer.Option("--mix", help="Mixing method of the soup.")] = "mean",
    weights: Annotated[str | None, typer.Option("--weights", help="Soup weights, comma-separated.")] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", min=1, help="Token limit of a generated answer.")
    ] = DEFAULT_MAX_NEW_TOKENS,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="Stop string of generated answers (repeatable; default: a newline)."),
    ] = None,
    batch_tokens: Annotated[
        int, typer.Option("--batch-tokens", min=1, help="Padded tokens per batch (rows x longest row).")
    ] = 4096,
    no_progress: NoProgressOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (summary and every item).")] = False,
) -> None:
    """Score a JSONL dataset: exact match of generated answers, accuracy of multiple choice by log-likelihood.

    Items are {"prompt", "answer"} (generation; greedy, stops at a newline by default) or {"context", "choices",
    "answer": index} (multiple choice; acc and length-normalised acc_norm). With --skill or --soup every item
    starts from that stored state.

    Example: statelab eval data.jsonl --model embedded --skill upper-3shot -s skills
    """
    from statelab.eval.dataset import read_items, score_items
    from statelab.eval.skills import parse_weights, start_state
    from statelab.models.loading import load_model
    from statelab.models.tokenizer import load_tokenizer
    from statelab.threads import COMMAND_WORK_TOKENS, apply_thread_rule

    if skill is not None and soup:
        raise CliError("give --skill or --soup, not both")
    if (skill is not None or soup) and store is None:
        raise CliError("--skill and --soup read a state store: give it with -s/--store")
    if store is not None and skill is None and not soup:
        raise CliError("-s/--store is read only with --skill or --soup")
    items = read_items(file)
    m = load_model(model)
    apply_thread_rule(m, COMMAND_WORK_TOKENS)  # statelab.threads: measured rule, STATELAB_THREADS overrides
    tok = load_tokenizer(tokenizer if tokenizer is not None else model)
    state = start_state(
        m, store=store, skill=skill, soup=_soup_names(soup), mix=mix,
        weights=None if weights is None else parse_weights(weights),
    )  # fmt: skip
    stops = ("\n",) if stop is None else tuple(stop)
    result = score_items(
        m, tok, items, state=state, max_new_tokens=max_new_tokens, stop=stops, batch_tokens=batch_tokens,
        progress=not (no_progress or as_json),
    )  # fmt: skip
    result = {
        "file": str(file), "model": model, "skill": skill, "soup": _soup_names(soup),
        "mix": mix if soup else None, "stop": list(stops), "max_new_tokens": max_new_tokens, **result,
    }  # fmt: skip
    if as_json:
        typer.echo(json.dumps(result, indent=1, sort_keys=True))
    else:
        _table(result)


def _table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    start = "zero state"
    if result["skill"]:
        start = f"skill {result['skill']}"
    elif result["soup"]:
        start = f"soup {'+'.join(result['soup'])} ({result['mix']})"
    table = Table(title=f"{result['file']}: {result['model']}, {start}")
    table.add_column("items")
    table.add_column("n", justify="right")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if "generation" in result:
        g = result["generation"]
        table.add_row("generation", str(g["items"]), "exact match", f"{g['exact_match']:.1%} ({g['correct']})")
    if "multiple_choice" in result:
        c = result["multiple_choice"]
        table.add_row("multiple choice", str(c["items"]), "acc", f"{c['acc']:.1%}")
        table.add_row("", "", "acc_norm", f"{c['acc_norm']:.1%}")
        table.add_row("", "", "chance", f"{c['chance']:.1%}")
    Console().print(table)
    n = len(result["items"])
    typer.echo(f"{n} items in {result['seconds']:.2f} s ({result['items_per_second']:.1f} items/s)")


def lm_eval_command(ctx: typer.Context) -> None:
    """Run lm-evaluation-harness with --model statelab available; every argument goes to lm-eval unchanged.

    Example: statelab lm-eval --model statelab --model_args pretrained=embedded,skill=upper,store=skills
    --tasks hellaswag --batch_size auto --device cpu
    """
    from statelab.cli.lm_eval import main

    main(ctx.args)
