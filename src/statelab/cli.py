"""The ``statelab`` command line. Each area adds its commands to the root app here."""

from __future__ import annotations

import typer

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


from statelab.state.store_cli import search_command, store_app  # noqa: E402  (after the root app exists)

app.add_typer(store_app, name="store")
app.command("search")(search_command)

from statelab.state.model_cli import encode_command, generate_command, mix_command, score_command  # noqa: E402

app.command("encode")(encode_command)
app.command("mix")(mix_command)
app.command("generate")(generate_command)
app.command("score")(score_command)

from statelab.eval.eval_cli import eval_command, lm_eval_command  # noqa: E402  (scoring imported when it runs)

app.command("eval")(eval_command)
# every argument goes to lm-eval's own parser, --help included
app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)(lm_eval_command)

from statelab.experiments.gdssm_cli import app as gdssm_app  # noqa: E402

app.add_typer(gdssm_app, name="gdssm")

from statelab.train.cli import app as train_app  # noqa: E402

app.add_typer(train_app, name="train")

from statelab.experiments.soup import app as soup_app  # noqa: E402

app.add_typer(soup_app, name="soup")


from statelab.experiments.birdie_cli import app as birdie_app  # noqa: E402

app.add_typer(birdie_app, name="birdie")

from statelab.serve.cli import serve_command  # noqa: E402  (imports the web stack only when it runs)

app.command("serve")(serve_command)


def main() -> None:
    app()
