"""``python -m statelab.train --config CONFIG [key=value ...]``: the entry point ``torchrun -m statelab.train`` uses
(``statelab train run`` under another name)."""

from __future__ import annotations

import sys

from statelab.cli.train import app

__all__ = ["main"]


def main() -> None:
    app(["run", *sys.argv[1:]], prog_name="python -m statelab.train")


if __name__ == "__main__":
    main()
