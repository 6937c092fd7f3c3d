"""lm-evaluation-harness's own command line, with ``--model statelab`` registered.

lm-eval 0.4.13 discovers no models outside its source tree (no entry points, no plugin option), so this imports
:mod:`statelab.eval.lm_eval_model` (which registers ``statelab``) and then runs lm-eval's command-line entry
point, ``lm_eval.__main__.cli_evaluate``, on the given arguments, unchanged::

    python -m statelab.cli.lm_eval --model statelab --model_args pretrained=embedded --tasks TASK
    statelab lm-eval --model statelab --model_args pretrained=embedded --tasks TASK      # the same
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's CLI on ``argv`` (default: this process's arguments) with the ``statelab`` model registered."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:  # pragma: no cover - the eval extra is missing
        sys.exit("error: lm-eval is not installed; install statelab's eval extra: pip install 'statelab[eval]'")
    import statelab.eval.lm_eval_model  # noqa: F401  (registers --model statelab)

    args = list(sys.argv[1:] if argv is None else argv)
    # lm-eval's parser reads sys.argv itself
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
