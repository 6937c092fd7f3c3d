"""State store benchmark: file latency and size, sketch recall, and search latency / recall at 1e3 to 1e6 entries.

Four parts, each against a baseline measured in the same run:

1. **Files.** ``save_state`` / ``load_state`` of a 130m-sized Mamba-1 state (24 layers, D = 1536, N = 16, K - 1 = 3;
   fp32) against ``torch.save`` / ``torch.load(weights_only=True)`` of the same three tensors (the baseline is used
   here only). statelab's save includes fsync of the file and its directory and a checksum; its load verifies the
   checksum, layout and finiteness.
2. **Sketch recall.** CountSketch dimension against exact raw-state cosine over the middle third of the layers
   (8 x 1536 x 16 = 196,608 features): recall@10 of the sketch's top 10, top-1 task accuracy, and recall@10 after
   re-ranking 50 sketch candidates exactly. The states are synthetic "skills" (shared component + task component +
   prompt noise, with log-normal channel scales), since no pretrained weights are available offline.
3. **Index search.** Exact torch brute force against FAISS HNSW, usearch HNSW and FAISS IVF-Flat over unit sketch
   vectors at 1e3 ... 1e6 entries: single-query latency (median), build time, recall@10 against the exact top 10.
   The vectors are synthetic clustered sketches (not sketches of real states) at every size. HNSW builds stop at
   1e5 in the full run (at 1e6 they take tens of minutes on a 2-core shared machine).
4. **Store end to end.** ``StateStore.add`` and ``search`` with 130m-sized states through each index kind.

Usage: ``python benchmarks/bench_store.py [--quick] [--no-write]``; writes ``## State store`` in
``benchmarks/RESULTS.md`` and ``benchmarks/bench_store.png``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from statelab.state.core import State
from statelab.state.io import decode_state, encode_state, load_state, save_state
from statelab.state.search import (
    CountSketch,
    ExactIndex,
    FaissIndex,
    FaissIVFIndex,
    UsearchIndex,
    cosine_scores,
    recall_at_k,
)
from statelab.state.store import DEFAULT_SKETCH_DIM, StateStore

HERE = Path(__file__).resolve().parent
console = Console()
L, D, N, W = 24, 1536, 16, 3


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), console=console,
    )  # fmt: skip


def state_130m(seed: int, fp: str = "0" * 64) -> State:
    g = torch.Generator().manual_seed(seed)
    return State(
        arch="mamba1", ssm=torch.randn(L, 1, D, N, generator=g), conv=torch.randn(L, 1, D, W, generator=g),
        sum_delta=torch.rand(L, 1, D, generator=g) * 10, n_tokens=512, fingerprint=fp,
    )  # fmt: skip


def skill_state_130m(task: int, seed: int, fp: str = "0" * 64) -> State:
    """A 130m-shaped state with task structure: task direction + per-prompt noise (synthetic)."""
    base = torch.randn(L, 1, D, N, generator=torch.Generator().manual_seed(10_000 + task))
    s = state_130m(seed, fp)
    return s.replace(ssm=base + 0.5 * s.ssm)


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# ---- 1. files ----------------------------------------------------------------------------------------------
def bench_files(reps: int, workdir: Path) -> list[dict]:
    s = state_130m(0)
    tensors = {"ssm": s.ssm, "conv": s.conv, "sum_delta": s.sum_delta}
    ours, base = workdir / "s.safetensors", workdir / "s.pt"
    save_state(s, ours)
    torch.save(tensors, base)
    assert load_state(ours).equal(s)
    data, _ = encode_state(s)
    rows = [
        {"what": "statelab save_state (checksum + fsync + rename)", "ms": median_ms(lambda: save_state(s, ours), reps)},
        {"what": "statelab load_state (verified)", "ms": median_ms(lambda: load_state(ours), reps)},
        {"what": "statelab save_state(fsync=False)", "ms": median_ms(lambda: save_state(s, ours, fsync=False), reps)},
        {"what": "torch.save (no fsync)", "ms": median_ms(lambda: torch.save(tensors, base), reps)},
        {"what": "torch.load(weights_only=True)", "ms": median_ms(lambda: torch.load(base, weights_only=True), reps)},
        {"what": "statelab encode only (in memory)", "ms": median_ms(lambda: encode_state(s), reps)},
        {"what": "statelab decode only (in memory)", "ms": median_ms(lambda: decode_state(data), reps)},
    ]
    rows[0]["bytes"] = ours.stat().st_size
    rows[3]["bytes"] = base.stat().st_size
    return rows


# ---- 2. sketch recall ------------------------------------------------------------------------------------------
def skill_features(n: int, tasks: int, seed: int, noise: float, scale: torch.Tensor, common: torch.Tensor,
                   centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Synthetic middle-layer features ``[n, F]``: scale * (common + 0.6 task + noise * prompt noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(tasks, (n,), generator=g)
    out = torch.empty(n, common.numel())
    for i in range(0, n, 64):
        j = min(n, i + 64)
        eps = torch.randn(j - i, common.numel(), generator=g)
        out[i:j] = scale * (common + 0.6 * centers[labels[i:j]] + noise * eps)
    return out, labels


def bench_sketch_recall(n_entries: int, n_queries: int, dims: list[int]) -> list[dict]:
    F = 8 * D * N
    g = torch.Generator().manual_seed(7)
    tasks = 20
    scale = torch.exp(torch.randn(F, generator=g))
    common = torch.randn(F, generator=g)
    centers = torch.randn(tasks, F, generator=g)
    keys, key_labels = skill_features(n_entries, tasks, 1, 0.5, scale, common, centers)
    queries, q_labels = skill_features(n_queries, tasks, 2, 0.8, scale, common, centers)
    exact = cosine_scores(queries, keys)
    truth = exact.topk(10, dim=1).indices
    top11 = exact.topk(11, dim=1).values
    gap = float((top11[:, 9] - top11[:, 10]).mean())
    rows = []
    with progress() as bar:
        job = bar.add_task("sketch dims", total=len(dims), rate="")
        for dim in dims:
            sk = CountSketch(dim, seed=0)
            t = time.perf_counter()
            ks = torch.cat([sk(keys[i : i + 256]) for i in range(0, n_entries, 256)])
            per_state = (time.perf_counter() - t) * 1e3 / n_entries
            qs = sk(queries)
            approx = qs @ ks.T
            top10 = approx.topk(10, dim=1).indices
            cand = approx.topk(50, dim=1).indices
            reranked = torch.stack([c[exact[i, c].topk(10).indices] for i, c in enumerate(cand)])
            rows.append({
                "dim": dim,
                "recall@10": recall_at_k(top10.numpy(), truth.numpy()),
                "recall@10 rerank50": recall_at_k(reranked.numpy(), truth.numpy()),
                "top1 task": float((key_labels[top10[:, 0]] == q_labels).float().mean()),
                "exact top1 task": float((key_labels[truth[:, 0]] == q_labels).float().mean()),
                "ms/state": per_state,
                "bytes": 4 * dim,
                "gap10": gap,
            })  # fmt: skip
            bar.update(job, advance=1, rate=f"{per_state:.2f} ms/sketch")
    return rows


# ---- 3. index search -------------------------------------------------------------------------------------------
def synthetic_sketches(n: int, dim: int, seed: int, clusters: int = 2000) -> np.ndarray:
    """Unit vectors: a shared direction + one of ``clusters`` centres + noise (states are alike, tasks cluster)."""
    rng = np.random.default_rng(seed)
    common = np.random.default_rng(99).standard_normal(dim).astype(np.float32)
    centers = np.random.default_rng(98).standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, 100_000):
        j = min(n, i + 100_000)
        lab = rng.integers(0, clusters, j - i)
        out[i:j] = 0.8 * common + centers[lab] + 0.9 * rng.standard_normal((j - i, dim), dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def bench_index(sizes: list[int], dim: int, n_queries: int, max_ann_build: int) -> list[dict]:
    queries = synthetic_sketches(n_queries, dim, seed=12345)
    rows = []
    for n in sizes:
        vecs = synthetic_sketches(n, dim, seed=n)
        ids = np.arange(n, dtype=np.int64)
        exact = ExactIndex(dim)
        exact.add(ids, vecs)
        exact.search(queries[:1], 10)
        truth = exact.search(queries, 10)[1]
        ms = statistics.median(_timed(lambda i, ex=exact: ex.search(queries[i : i + 1], 10), n_queries))
        rows.append({"n": n, "backend": "exact (torch)", "build_s": 0.0, "ms": ms, "recall@10": 1.0})
        for cls in (FaissIndex, UsearchIndex, FaissIVFIndex):
            if n > max_ann_build and cls is not FaissIVFIndex:
                continue  # HNSW builds at this size take tens of minutes on a small shared machine
            index = cls(dim)
            t = time.perf_counter()
            with progress() as bar:
                job = bar.add_task(f"{cls.kind} build n={n:.0e}", total=n, rate="")
                for i in range(0, n, 50_000):
                    index.add(ids[i : i + 50_000], vecs[i : i + 50_000])
                    done = min(n, i + 50_000)
                    bar.update(job, completed=done, rate=f"{done / (time.perf_counter() - t):,.0f} vec/s")
            index.search(queries[:1], 10)  # IVF trains its cells here: count it as build time
            build = time.perf_counter() - t
            found = np.concatenate([index.search(queries[i : i + 1], 10)[1] for i in range(n_queries)])
            ms = statistics.median(_timed(lambda i, index=index: index.search(queries[i : i + 1], 10), n_queries))
            recall = recall_at_k(found, truth)
            label = "faiss IVF-Flat" if cls is FaissIVFIndex else f"{cls.kind} HNSW"
            rows.append({"n": n, "backend": label, "build_s": build, "ms": ms, "recall@10": recall})
            del index
        del exact, vecs
    return rows


def _timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t) * 1e3)
    return out


# ---- 4. store end to end -------------------------------------------------------------------------------------
def bench_store(n_entries: int, workdir: Path) -> list[dict]:
    store = StateStore(workdir / "store")
    add_ms = []
    with progress() as bar:
        job = bar.add_task("store.add (130m states)", total=n_entries, rate="")
        for i in range(n_entries):
            s = skill_state_130m(i % 10, 1000 + i)
            t = time.perf_counter()
            store.add(s, name=f"e{i}", task=f"t{i % 10}")
            add_ms.append((time.perf_counter() - t) * 1e3)
            bar.update(job, advance=1, rate=f"{statistics.median(add_ms):.1f} ms/add")
    q = skill_state_130m(3, 5)
    q = q.replace(ssm=q.ssm + 0.3 * torch.randn(q.ssm.shape, generator=torch.Generator().manual_seed(6)))
    rows = [{"operation": f"add (n={n_entries})", "ms": statistics.median(add_ms)}]
    for kind in ("exact", "sketch", "faiss", "faiss-ivf", "usearch"):
        st = StateStore(workdir / "store", index=kind)
        t = time.perf_counter()
        first = st.search(q, k=10)
        cold = (time.perf_counter() - t) * 1e3
        warm = statistics.median(_timed(lambda i, st=st: st.search(q, k=10), 5))
        rows.append({"operation": f"search {kind}: first call (reads blobs / builds index)", "ms": cold})
        rows.append({"operation": f"search {kind}: next calls", "ms": warm})
        if kind == "exact":
            truth = [h.id for h in first]
        else:
            rows[-1]["recall@10"] = len({h.id for h in first} & set(truth)) / len(truth)
    st = StateStore(workdir / "store", index="faiss")
    warm = statistics.median(_timed(lambda i: st.search(q, k=10, rerank=50), 3))
    hits = st.search(q, k=10, rerank=50)
    rows.append({"operation": "search faiss + rerank 50 exactly", "ms": warm,
                 "recall@10": len({h.id for h in hits} & set(truth)) / len(truth)})  # fmt: skip
    return rows


# ---- report ------------------------------------------------------------------------------------------------------
def md_table(rows: list[dict], cols: list[str], fmt: dict[str, str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(format(v, fmt[c]) if c in fmt and v != "" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def show(rows: list[dict], cols: list[str], fmt: dict[str, str], title: str) -> None:
    t = Table(title=title)
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*[format(r[c], fmt[c]) if c in fmt and c in r else str(r.get(c, "")) for c in cols])
    console.print(t)


def plot(sketch_rows: list[dict], index_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    dims = [r["dim"] for r in sketch_rows]
    a.plot(dims, [r["recall@10"] for r in sketch_rows], "o-", label="sketch top-10")
    a.plot(dims, [r["recall@10 rerank50"] for r in sketch_rows], "s-", label="sketch top-50, exact rerank")
    a.plot(dims, [r["top1 task"] for r in sketch_rows], "^-", label="top-1 task accuracy")
    a.set_xscale("log", base=2)
    a.set_xlabel("sketch dimension")
    a.set_ylabel("recall@10 vs raw-state cosine")
    a.set_title("CountSketch vs exact raw cosine (synthetic skills)")
    a.legend()
    for backend in sorted({r["backend"] for r in index_rows}):
        rs = [r for r in index_rows if r["backend"] == backend]
        b.plot([r["n"] for r in rs], [r["ms"] for r in rs], "o-", label=backend)
    b.axhline(50, color="gray", ls="--", lw=1, label="target 50 ms")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("entries")
    b.set_ylabel("top-10 latency per query (ms)")
    b.set_title("search latency")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_section(text: str) -> None:
    path = HERE / "RESULTS.md"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    section = "## State store\n\n" + text.strip() + "\n"
    pattern = re.compile(r"^## State store\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: section + "\n", old) if pattern.search(old) else old.rstrip() + "\n\n" + section
    path.write_text(new.rstrip() + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a minute or so")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md or the plot")
    args = ap.parse_args()
    torch.manual_seed(0)
    # One thread for timings: the machine is shared, and a threaded op waiting for a descheduled second thread
    # measures the neighbours, not statelab. Index builds (FAISS/usearch add) still use every core.
    torch.set_num_threads(1)
    quick = args.quick
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.system()}"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="statelab-bench-store-") as tmp:
        workdir = Path(tmp)
        files = bench_files(10 if quick else 50, workdir)
        sketch = bench_sketch_recall(200 if quick else 1000, 30 if quick else 100, [64, 128, 256, 512, 1024])
        sizes = [1_000, 10_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
        index = bench_index(sizes, DEFAULT_SKETCH_DIM, 50 if quick else 100, 10_000 if quick else 100_000)
        store = bench_store(20 if quick else 200, workdir)

    torch_save = next(r for r in files if r["what"].startswith("torch.save"))["ms"]
    torch_load = next(r for r in files if r["what"].startswith("torch.load"))["ms"]
    for r in files:
        base = torch_load if "load" in r["what"] or "decode" in r["what"] else torch_save
        r["x torch"] = r["ms"] / base
    exact_ms = {r["n"]: r["ms"] for r in index if r["backend"].startswith("exact")}
    for r in index:
        r["x exact"] = r["ms"] / exact_ms[r["n"]]

    show(files, ["what", "ms", "x torch", "bytes"], {"ms": ".2f", "x torch": ".2f", "bytes": ","}, "state files")
    show(sketch, ["dim", "recall@10", "recall@10 rerank50", "top1 task", "exact top1 task", "ms/state", "bytes"],
         {"recall@10": ".3f", "recall@10 rerank50": ".3f", "top1 task": ".3f", "exact top1 task": ".3f",
          "ms/state": ".2f"}, "sketch recall")  # fmt: skip
    show(index, ["n", "backend", "build_s", "ms", "x exact", "recall@10"],
         {"n": ",", "build_s": ".1f", "ms": ".3f", "x exact": ".3f", "recall@10": ".3f"}, "index search")  # fmt: skip
    show(store, ["operation", "ms", "recall@10"], {"ms": ".2f", "recall@10": ".2f"}, "store end to end")
    if args.no_write:
        return
    big = max(r["n"] for r in index)
    at_big = {r["backend"]: r for r in index if r["n"] == big}
    ivf, ex = at_big.get("faiss IVF-Flat"), at_big["exact (torch)"]
    choice = "IVF-Flat was not measured in this run."
    if ivf:
        choice = (
            f"**Choice.** At {big:,} entries exact brute force takes {ex['ms']:.1f} ms per query; FAISS IVF-Flat "
            f"takes {ivf['ms']:.2f} ms at recall@10 {ivf['recall@10']:.3f} after a {ivf['build_s']:.0f} s build. "
            "HNSW queries are as fast, but its build is the bottleneck on small machines (build column). So "
            "`index='faiss-ivf'` is the backend for large stores; `'exact'` (raw states, no approximation) stays "
            "the default; `'sketch'` (brute force over sketches) covers the middle without extra dependencies."
        )
    sketch_default = next(r for r in sketch if r["dim"] == DEFAULT_SKETCH_DIM)
    save_load = files[0]["ms"] + files[1]["ms"]
    save_load_nosync = files[2]["ms"] + files[1]["ms"]
    text = f"""
{when}; {machine}; `python benchmarks/bench_store.py{" --quick" if quick else ""}`. Timings use one torch thread
and single-threaded queries (the machine is shared); index builds use every core.

**State files** (130m Mamba-1 state: 24 layers, D=1536, N=16, K-1=3, fp32; median of {10 if quick else 50}).
save + load = {save_load:.1f} ms with fsync, {save_load_nosync:.1f} ms without (target < 10 ms).
Ratios are against torch.save / torch.load(weights_only=True) of the same tensors, measured in this run;
torch.save does not fsync.

{md_table(files, ["what", "ms", "x torch", "bytes"], {"ms": ".2f", "x torch": ".2f", "bytes": ","})}

**Sketch recall** against exact raw-state cosine over the middle third of the layers (196,608 features), on
synthetic skill states ({200 if quick else 1000} entries, 20 tasks, {30 if quick else 100} noisier queries).
"rerank50" takes the sketch's top 50 and re-scores them on the raw states (`search(..., rerank=50)`).
Without re-ranking, recall@10 is low because the entries of a task are almost equidistant from the query (the
exact 10th and 11th scores differ by {sketch[0]["gap10"]:.4f} on average), so any sketch error reorders them; the
task of the top hit is still right in {sketch_default["top1 task"]:.0%} of queries, and re-ranking 50 candidates
brings recall@10 back near 1. The store's
default sketch is {DEFAULT_SKETCH_DIM} dims ({4 * DEFAULT_SKETCH_DIM:,} bytes per entry): re-ranked recall
{sketch_default["recall@10 rerank50"]:.3f} here, against {sketch[-1]["recall@10 rerank50"]:.3f} at {sketch[-1]["dim"]}
dims for {sketch[-1]["dim"] // DEFAULT_SKETCH_DIM}x the bytes.

{
        md_table(
            sketch,
            ["dim", "recall@10", "recall@10 rerank50", "top1 task", "exact top1 task", "ms/state", "bytes"],
            {
                "recall@10": ".3f",
                "recall@10 rerank50": ".3f",
                "top1 task": ".3f",
                "exact top1 task": ".3f",
                "ms/state": ".2f",
                "bytes": ",",
            },
        )
    }

**Index search** over {DEFAULT_SKETCH_DIM}-dim unit sketches (synthetic clustered vectors at every size, not
sketches of real states); single-query top-10 latency (median), recall@10 against the exact top 10; "x exact"
is the latency ratio against exact torch brute force in the same run. HNSW: M/connectivity 32, ef 80 (build) /
96 (search); IVF-Flat: sqrt(n) cells trained on 40 per cell, nprobe max(cells/20, cells holding 20,000
vectors); build time includes training. HNSW rows stop at {sizes[min(len(sizes) - 1, 2)]:,} (builds beyond take
tens of minutes here).

{choice}

{
        md_table(
            index,
            ["n", "backend", "build_s", "ms", "x exact", "recall@10"],
            {"n": ",", "build_s": ".1f", "ms": ".3f", "x exact": ".3f", "recall@10": ".3f"},
        )
    }

**Store end to end** ({20 if quick else 200} entries of 130m-sized states; recall@10 against `index="exact"`).

{md_table(store, ["operation", "ms", "recall@10"], {"ms": ".2f", "recall@10": ".2f"})}

![state store benchmark](bench_store.png)
"""
    write_section(text)
    plot(sketch, [r for r in index], HERE / "bench_store.png")
    console.print(f"wrote {HERE / 'RESULTS.md'} (## State store) and {HERE / 'bench_store.png'}")


if __name__ == "__main__":
    main()
