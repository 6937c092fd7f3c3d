"""Where threads start to pay: prefill and decode at 1 thread and at every core, for several model sizes.

For each model (the embedded model, a 256-wide 6-layer Mamba-1 and Mamba-2, a 130m-sized Mamba-1 of 4 layers) and
each call size (decode steps of batch 1 and 8, prefills of 64, 256 and 1,024 tokens), the best of ``--repeats``
interleaved rounds at 1 thread and at ``--threads`` threads (default: the cores in the affinity mask). Each row
gives the work of the call as :func:`statelab.threads.model_work` counts it (matrix parameters per layer x tokens)
and the speed-up of the threads over one; the script ends with the threshold it suggests for
``statelab.threads.MIN_PARALLEL_WORK``: between the largest work that ran slower with threads and the smallest that
ran faster (their geometric mean), or a note when the two overlap. Results go to ``benchmarks/RESULTS.md`` under
``## Threads``.

    python benchmarks/bench_threads.py            # all sizes (a few minutes)
    python benchmarks/bench_threads.py --quick    # small models and short calls only (seconds), no RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import time

import torch

from _results import cpu_name, write_section  # benchmarks/ is on sys.path when a script runs

SECTION = "## Threads"


def models(quick: bool) -> dict[str, torch.nn.Module]:
    from statelab.models.loading import load_model
    from statelab.models.mamba1 import Mamba1Config, Mamba1LM
    from statelab.models.mamba2 import Mamba2Config, Mamba2LM

    torch.manual_seed(0)
    out = {
        "embedded": load_model("embedded").eval(),
        "mamba1 256x6": Mamba1LM(Mamba1Config(d_model=256, n_layer=6, vocab_size=256)).eval(),
        "mamba2 256x6": Mamba2LM(Mamba2Config(vocab_size=256, d_model=256, n_layer=6, d_state=64, head_dim=32)).eval(),
    }
    if not quick:
        out["mamba1 130m-wide x4"] = Mamba1LM(Mamba1Config(d_model=768, n_layer=4, vocab_size=50280)).eval()
    return out


def timed(fn, repeats: int, threads: int) -> float:
    torch.set_num_threads(threads)
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def calls(model, quick: bool):
    """``(name, tokens per call, fn)`` for each call size."""
    V = model.embedding.weight.shape[0]
    g = torch.Generator().manual_seed(1)
    for B in (1, 8):
        state = model.encode(torch.randint(0, V, (B, 8), generator=g))
        tok = torch.randint(0, V, (B,), generator=g)

        def decode(tok=tok, state=state):
            s = state
            for _ in range(8):
                _, s = model.step(tok, s)

        yield f"decode batch {B} (8 steps)", B, decode
    for T in (64, 256) if quick else (64, 256, 1024):
        x = torch.randint(0, V, (1, T), generator=g)
        yield f"prefill {T}", T, lambda x=x: model(x)


def main() -> None:
    from statelab.threads import MIN_PARALLEL_WORK, model_work

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=cores, help="the parallel side (default: every core)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.threads < 2:
        raise SystemExit("--threads must be at least 2 to compare with one thread")
    rows = []
    with torch.no_grad():
        for name, model in models(args.quick).items():
            for what, tokens, fn in calls(model, args.quick):
                t1 = tn = math.inf
                for _ in range(2):  # interleaved: load from other jobs hits both sides alike
                    t1 = min(t1, timed(fn, args.repeats, 1))
                    tn = min(tn, timed(fn, args.repeats, args.threads))
                work = model_work(model, tokens)
                rows.append({"model": name, "call": what, "work": work, "t1": t1, "tn": tn, "speedup": t1 / tn})
                print(f"{name:22s} {what:26s} work {work:>13,d}  1 thread {t1 * 1e3:8.2f} ms  "
                      f"{args.threads} threads {tn * 1e3:8.2f} ms  x{t1 / tn:.2f}")  # fmt: skip
    slower = [r["work"] for r in rows if r["speedup"] < 1.0]
    faster = [r["work"] for r in rows if r["speedup"] > 1.1]
    if faster and (not slower or max(slower) < min(faster)):
        lo = max(slower) if slower else min(faster) / 4
        suggestion = f"MIN_PARALLEL_WORK ~ {math.sqrt(lo * min(faster)):,.0f}"
    elif not faster:
        suggestion = "threads never won by more than 10%: one thread everywhere (MIN_PARALLEL_WORK above every row)"
    else:
        suggestion = (
            f"no clean cut: slower with threads up to {max(slower):,d}, faster from {min(faster):,d}; keep the "
            "threshold where the rows of the sizes users run fall on the right side"
        )
    print(f"suggested: {suggestion} (now {MIN_PARALLEL_WORK:,d})")
    if args.no_write or args.quick:
        return
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()} ({cores} cores), torch {torch.__version__}, "
        f"1 vs {args.threads} threads, best of {args.repeats} x 2 interleaved rounds; load average at the end {load}. "
        f"Suggested threshold: {suggestion}; statelab.threads.MIN_PARALLEL_WORK is {MIN_PARALLEL_WORK:,d}.",
        "",
        f"| model | call | work (params/layer x tokens) | 1 thread ms | {args.threads} threads ms | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['call']} | {r['work']:,d} | {r['t1'] * 1e3:.2f} | {r['tn'] * 1e3:.2f} | "
            f"{r['speedup']:.2f} |"
        )
    write_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
