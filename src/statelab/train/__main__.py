"""``python -m statelab.train CONFIG [key=value ...]``: the entry point ``torchrun -m statelab.train`` uses."""

from __future__ import annotations

import sys

from statelab.train.cli import app


def main() -> None:
    app(["run", *sys.argv[1:]], prog_name="python -m statelab.train")


if __name__ == "__main__":
    main()
