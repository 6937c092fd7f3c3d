"""GD-SSM scan: the chunked path against the naive loop, forward + backward, as the context grows.

Times ``diag_scan_naive`` and ``diag_scan_chunk`` (statelab.ops.diag_scan, GD-SSM's scan) on the same inputs for W
windows (W = N in-context examples), d = P = 10, batch 8, and reports the speed-up of the chunked path over the loop
measured in the same run. Writes the table to ``benchmarks/RESULTS.md`` under ``## GD-SSM scan``.

    .venv/bin/python benchmarks/bench_gdssm.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from statelab.ops.diag_scan import diag_scan_chunk, diag_scan_naive

HERE = Path(__file__).resolve().parent


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(windows: list[int], chunks: list[int], repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    cases = [(w, c) for w in windows for c in [None, *chunks]]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("GD-SSM scan", total=len(cases))
        for w, chunk in cases:
            a = torch.randn(8, w, 10, 10, generator=gen).requires_grad_(True)
            g = torch.randn(8, w, 10, generator=gen).requires_grad_(True)
            log_decay = (-torch.rand(10, 10, generator=gen) * 0.01).requires_grad_(True)

            def step(chunk=chunk, a=a, g=g, log_decay=log_decay):
                if chunk is None:
                    out = diag_scan_naive(a, log_decay, g, output_final_state=True)
                else:
                    out = diag_scan_chunk(a, log_decay, g, output_final_state=True, chunk_size=chunk)
                (out.y.sum() + out.final_state.sum()).backward()

            rows.append(
                {
                    "windows": w,
                    "path": "naive" if chunk is None else f"chunk {chunk}",
                    "ms": 1000 * _time(step, repeats),
                }
            )
            bar.advance(task)
    for r in rows:
        base = next(x["ms"] for x in rows if x["windows"] == r["windows"] and x["path"] == "naive")
        r["speed-up"] = base / r["ms"]
    return rows


def write_section(text: str) -> None:
    path = HERE / "RESULTS.md"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    section = "## GD-SSM scan\n\n" + text.strip() + "\n"
    pattern = re.compile(r"^## GD-SSM scan\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: section + "\n", old) if pattern.search(old) else old.rstrip() + "\n\n" + section
    path.write_text(new.rstrip() + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args()
    # one thread: on a shared machine a threaded op waiting for a descheduled thread times the neighbours
    torch.set_num_threads(1)
    windows = [10, 100, 1000] if args.quick else [10, 100, 1000, 4000]
    rows = bench(windows, [16, 64], 3 if args.quick else 5)
    table = Table(title="GD-SSM scan, forward + backward, B = 8, d = P = 10")
    for col in ("windows", "path", "ms", "speed-up vs naive"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["windows"]), r["path"], f"{r['ms']:.2f}", f"{r['speed-up']:.2f}x")
    Console().print(table)
    if args.no_write:
        return
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), 1 thread, torch {torch.__version__}"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"`benchmarks/bench_gdssm.py`{' --quick' if args.quick else ''}, {when}, {machine}. Forward + backward of the "
        "GD-SSM scan (S_i = Λ̄ ⊙ S_{i-1} + A_iᵀ, h_i = S_i g_i), batch 8, d = P = 10; speed-up = naive time / "
        "time, same run.",
        "",
        "| windows | path | ms | speed-up vs naive |",
        "|---|---|---|---|",
        *[f"| {r['windows']} | {r['path']} | {r['ms']:.2f} | {r['speed-up']:.2f}x |" for r in rows],
    ]
    write_section("\n".join(lines))


if __name__ == "__main__":
    main()
