"""``make demo``: the State Soup experiment on the embedded model, end to end, in a few minutes on a laptop CPU.

Runs ``statelab soup run --config <package>/embedded/demo.toml`` (``key=value`` overrides pass through),
writes ``runs/demo/report.md`` with tables and plots, and prints a summary.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEMO_CONFIG", "main"]

DEMO_CONFIG = Path(__file__).resolve().parent / "embedded" / "demo.toml"


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    from statelab.errors import StatelabError
    from statelab.experiments.soup import load_soup_config, print_summary, run_soup

    console = Console()
    args = list(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    try:
        cfg = load_soup_config(DEMO_CONFIG, args)
        console.print(f"[bold]State Soup demo[/bold]: model '{cfg.model}', {len(cfg.tasks)} tasks ({DEMO_CONFIG.name})")
        res, report = run_soup(cfg)
    except StatelabError as e:
        console.print(f"[red]error:[/red] {e}")
        return 1
    print_summary(res, cfg, report)
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
