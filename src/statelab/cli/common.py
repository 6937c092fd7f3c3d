"""What every ``statelab`` command shares: the error wrapper, the exit codes and the common options.

Exit codes, the same for every command:

* ``0``: the command did what it was asked (a problem statelab repaired on its own is a ``warning: ...`` line).
* ``2``: a usage error; the command line cannot be run as written: an option missing, malformed or contradicting
  another (:class:`CliError`, and the parser's own usage messages), or an invalid config file or ``key=value``
  override (:class:`~statelab.errors.ConfigError`). Nothing was read or changed.
* ``1``: a runtime error; the command ran and what it was given failed: a file that is missing or damaged, a
  store or entry that does not exist, a state of another model, a model that cannot be loaded, a value the
  library refuses (any other :class:`~statelab.errors.StatelabError`, ``ValueError``, ``TypeError``, ``OSError``).

Either error is one line on stderr starting with ``error:`` and no traceback. This module imports nothing heavy
(no torch, no rich): ``statelab --help`` builds every command's signature from here.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable
from typing import Annotated, Any

import typer

from statelab.errors import ConfigError, StatelabError, StatelabWarning

__all__ = [
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "CliError",
    "fail_cleanly",
    "emit",
    "JsonOpt",
    "NoProgressOpt",
    "TokenizerOpt",
    "TOKENIZER_HELP",
    "load_model_and_tokenizer",
    "tokenizer_for",
    "int_list",
]

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class CliError(StatelabError):
    """A usage error: an option that is missing, malformed or contradicts another (exit code 2)."""


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, StatelabError):
        filename = getattr(e, "filename", None)
        text = e.strerror or str(e)
        return f"{text}: {filename}" if filename else text
    return str(e)


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command: a usage error (``CliError``, ``ConfigError``) becomes ``error: ...`` and exit code 2, a
    runtime error (any other ``StatelabError``, ``ValueError``, ``TypeError``, ``OSError``) ``error: ...`` and exit
    code 1; every ``StatelabWarning`` raised meanwhile is printed as one ``warning: ...`` line on stderr.

    Other warnings are shown as Python shows them; any other exception (a bug) keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StatelabWarning)
            try:
                return fn(*args, **kwargs)
            except (CliError, ConfigError) as e:
                typer.echo(f"error: {_message(e)}", err=True)
                raise typer.Exit(EXIT_USAGE) from None
            except (StatelabError, ValueError, TypeError, OSError) as e:
                typer.echo(f"error: {_message(e)}", err=True)
                raise typer.Exit(EXIT_RUNTIME) from None
            finally:
                for w in caught:
                    if issubclass(w.category, StatelabWarning):
                        typer.echo(f"warning: {w.message}", err=True)
                    else:
                        warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    return wrapper


def emit(as_json: bool, payload: Any, text: Callable[[], None]) -> None:
    """Print ``payload`` as JSON with ``--json``, else call ``text`` (a table or a summary for people)."""
    if as_json:
        typer.echo(json.dumps(payload, indent=1, sort_keys=True))
    else:
        text()


def int_list(s: str | None, name: str) -> list[int] | None:
    """``"1,2,3"`` -> ``[1, 2, 3]``; ``None`` stays ``None``; anything else is a ``CliError`` naming ``name``."""
    if s is None:
        return None
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{name} must be comma-separated integers, got {s!r}") from None


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a summary.")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bar (for log files and scripts).")]
TOKENIZER_HELP = (
    "Tokenizer for the text: a tokenizer.json file, a directory with tokenizer.json, statelab_tokenizer.json or "
    "vocab.json + merges.txt, or 'byte' (statelab's byte tokenizer). Default: the one in the model's directory "
    "(mamba_ssm checkpoints ship none: name it here)."
)
TokenizerOpt = Annotated[str | None, typer.Option("--tokenizer", help=TOKENIZER_HELP, show_default=False)]


def load_model_and_tokenizer(model: str, tokenizer: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``MODEL``: the tokenizer ``--tokenizer`` names, else the checkpoint's own."""
    from statelab.models.loading import load_model
    from statelab.threads import COMMAND_WORK_TOKENS, apply_thread_rule

    m = load_model(model)
    apply_thread_rule(m, COMMAND_WORK_TOKENS)  # statelab.threads: measured rule, STATELAB_THREADS overrides
    return m, tokenizer_for(model, m, tokenizer)


def tokenizer_for(model: str, m: Any, tokenizer: str | None = None) -> Any:
    """The tokenizer of the loaded model ``m`` (named ``model`` on the command line): the one ``--tokenizer``
    names, else the checkpoint's own.

    Raises:
        StatelabError: the checkpoint has no tokenizer files and none is named, or the tokenizer has more tokens
            than ``m`` embeds (it is another model's); both messages name ``--tokenizer``.
    """
    from statelab.models.loading import _resolve
    from statelab.models.tokenizer import has_tokenizer, load_tokenizer

    if tokenizer is None:
        directory = _resolve(model)  # the local directory of MODEL, a hub id's snapshot included
        if not has_tokenizer(directory):
            raise StatelabError(
                f"{model} has no tokenizer files (tokenizer.json, vocab.json + merges.txt or "
                "statelab_tokenizer.json); name one with --tokenizer PATH, or --tokenizer byte"
            )
        tok = load_tokenizer(directory)
    else:
        tok = load_tokenizer(tokenizer)
    rows = getattr(m.config, "padded_vocab_size", None) or m.config.vocab_size
    if tok.vocab_size > rows:
        raise StatelabError(
            f"the tokenizer has {tok.vocab_size} tokens but {model} embeds only {rows}: it is not this model's "
            "tokenizer; name the right one with --tokenizer"
        )
    return tok
