"""``python -m statelab.cli ...``: the ``statelab`` command without the console script."""

from __future__ import annotations

from statelab.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
