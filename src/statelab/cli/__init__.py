"""The ``statelab`` command line: one package holding every command.

=================  ==================================================================
module             commands
=================  ==================================================================
``common``         the error wrapper, exit codes (2 usage, 1 runtime) and shared options
``model``          ``encode``, ``mix``, ``generate``, ``score``
``store``          ``store init|add|ingest|list|show|get|rm|check|export|import``, ``search``
``eval``           ``eval``, ``lm-eval``
``lm_eval``        lm-eval's own command line with ``--model statelab`` (``python -m statelab.cli.lm_eval``)
``serve``          ``serve``
``train``          ``train run|config`` (``python -m statelab.train`` under torchrun)
``soup``           ``soup run``
``gdssm``          ``gdssm run|report``
``birdie``         ``birdie run``
=================  ==================================================================

Command modules import only typer and :mod:`statelab.errors` at import time; torch, the models, the store and
rich load inside the command that needs them, so ``statelab --help`` starts without them. Library modules never
import this package.
"""

from __future__ import annotations

import typer

from statelab.cli import birdie, gdssm, model, serve, soup, store, train
from statelab.cli import eval as eval_cli

__all__ = ["app", "main"]

app = typer.Typer(
    name="statelab",
    help="In-context learning with state-space language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print the statelab version."""
    from statelab import __version__

    typer.echo(__version__)


app.add_typer(store.store_app, name="store")
app.command("search")(store.search_command)
app.command("encode")(model.encode_command)
app.command("mix")(model.mix_command)
app.command("generate")(model.generate_command)
app.command("score")(model.score_command)
app.command("eval")(eval_cli.eval_command)
# every argument goes to lm-eval's own parser, --help included
app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)(eval_cli.lm_eval_command)
app.add_typer(gdssm.app, name="gdssm")
app.add_typer(train.app, name="train")
app.add_typer(soup.app, name="soup")
app.add_typer(birdie.app, name="birdie")
app.command("serve")(serve.serve_command)


def main() -> None:
    """The ``statelab`` console script."""
    app()
