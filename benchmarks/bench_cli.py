"""Start-up time of the ``statelab`` command: how long a short command takes from process start to exit.

Each command runs ``--runs`` times as a fresh process (the installed ``statelab`` console script next to this
Python, else ``python -m statelab.cli``); the table gives the median, the fastest and the slowest wall-clock time,
beside two references measured the same way: a bare ``python -c pass`` and ``python -c "import torch"`` (what a
command pays if it imports torch). One extra run of each command under ``python -X importtime`` says whether torch
was imported and which top-level modules cost the most. Commands:

* ``statelab --help`` (builds every command's options; imports no model code),
* ``statelab store list -s STORE`` on a store of ``--entries`` entries (random batch-1 Mamba-1 states), made in a
  temporary directory before the timing,
* ``statelab version``.

Results go to ``benchmarks/RESULTS.md`` under ``## Command-line start-up``. On a loaded machine every figure moves;
compare the commands with the references of the same run.

    python benchmarks/bench_cli.py                 # 15 runs of each
    python benchmarks/bench_cli.py --quick         # 3 runs, a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import cpu_name, write_section  # benchmarks/ is on sys.path when a script runs

SECTION = "## Command-line start-up"


def statelab_command() -> list[str]:
    """The console script installed beside this interpreter, else the module entry point."""
    script = Path(sys.executable).with_name("statelab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "statelab.cli"]


def make_store(path: Path, entries: int) -> None:
    """A store of ``entries`` random batch-1 Mamba-1 states (6 layers, d_inner 64, d_state 8)."""
    import torch

    from statelab.state.core import State
    from statelab.state.store import NewEntry, StateStore

    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(entries):
        state = State(
            arch="mamba1", ssm=torch.randn(6, 1, 64, 8, generator=g), conv=torch.randn(6, 1, 64, 3, generator=g),
            sum_delta=torch.rand(6, 1, 64, generator=g), n_tokens=16, fingerprint="ab" * 32,
        )  # fmt: skip
        items.append(NewEntry(f"skill-{i}", state, task=f"task-{i % 5}", tags=("bench",)))
    StateStore(path).add_many(items)


def wall_times(cmd: list[str], runs: int, env: dict[str, str]) -> list[float]:
    """Seconds from start to exit of ``runs`` fresh processes; any failure stops the benchmark."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, env=env)
        out.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return out


def import_profile(args: list[str], env: dict[str, str], top: int = 4) -> tuple[bool, list[tuple[str, float]]]:
    """``(torch imported?, [(top-level module, cumulative seconds)] of the ``top`` costliest)`` for one run of
    ``python -X importtime -m statelab.cli ARGS``."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "statelab.cli", *args], capture_output=True, text=True, env=env
    )
    costs: dict[str, float] = {}
    imported = set()
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line.split("|")
        if not cumulative.strip().isdigit():  # the header line
            continue
        imported.add(name.strip())
        if name[1:].startswith(" "):  # a nested import: counted in its top-level importer's cumulative time
            continue
        costs[name.strip()] = costs.get(name.strip(), 0.0) + int(cumulative) / 1e6
    ranked = sorted(costs.items(), key=lambda kv: -kv[1])[:top]
    return "torch" in imported, ranked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="fresh processes per command")
    ap.add_argument("--entries", type=int, default=50, help="entries of the store that store list reads")
    ap.add_argument("--quick", action="store_true", help="3 runs of each: a smoke run")
    ap.add_argument("--no-write", action="store_true", help="print the table, do not touch RESULTS.md")
    args = ap.parse_args()
    runs = 3 if args.quick else args.runs
    env = {**os.environ, "COLUMNS": "100"}
    env.pop("STATELAB_STORE", None)
    exe = statelab_command()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "skills"
        make_store(store, args.entries)
        cases = [
            ("python -c pass (reference)", [sys.executable, "-c", "pass"], None),
            ('python -c "import torch" (reference)', [sys.executable, "-c", "import torch"], None),
            ("statelab --help", [*exe, "--help"], ["--help"]),
            (f"statelab store list ({args.entries} entries)", [*exe, "store", "list", "-s", str(store)],
             ["store", "list", "-s", str(store)]),
            ("statelab version", [*exe, "version"], ["version"]),
        ]  # fmt: skip
        for label, cmd, cli_args in cases:
            times = wall_times(cmd, runs, env)
            torch_imported, costly = import_profile(cli_args, env) if cli_args is not None else (None, [])
            rows.append({
                "command": label, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                "runs": runs, "imports_torch": torch_imported, "costliest_imports": costly,
            })  # fmt: skip
            print(f"{label}: median {rows[-1]['median_s']:.3f} s (min {min(times):.3f}, max {max(times):.3f})")

    import torch  # the version for the header; imported only after the timings

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"{when}, {cpu_name()} ({os.cpu_count()} cores), Python {sys.version.split()[0]}, torch {torch.__version__}; "
        f"{runs} fresh processes per command, wall clock from start to exit. Load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}."
    )
    lines = [
        header,
        "",
        "| command | median s | fastest s | slowest s | imports torch | costliest top-level imports (cumulative s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        torch_cell = "–" if r["imports_torch"] is None else ("yes" if r["imports_torch"] else "no")
        costly = ", ".join(f"{m} {s:.2f}" for m, s in r["costliest_imports"]) or "–"
        lines.append(
            f"| {r['command']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | {torch_cell} | {costly} |"
        )
    text = "\n".join(lines) + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
