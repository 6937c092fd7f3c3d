"""Model speed: statelab vs transformers on the same random 130m-sized weights, fp32, CPU.

Measures, per architecture (``--arch mamba1,mamba2``):

* prefill tokens/s at several lengths (logits for every token, like ``model(input_ids)``; also statelab's
  ``encode``, which skips the output head), and the ratio statelab / transformers;
* decode ms/token through ``model.step`` (the decode path generate and the server use) and through
  ``model(tok[:, None], state)`` (the general pass), ratio to transformers, and the memory-bandwidth floor: bytes
  of weights read per token divided by the machine's measured read rate (and by its copy rate, read + write, as
  before);
* the matrix-vector products of one decode token in each precision torch offers on the CPU (fp32 as decoded,
  fp32 in the module layout, fp16, bf16, int8 weight-only): whether any beats fp32 here;
* long prefill (``--long-lengths``, default 2,048 / 8,192 / 32,768 tokens, ``encode``: no output head, whose
  logits alone would take 6.6 GB at 32k): tokens/s and the peak resident memory the call added (sampled every
  2 ms), which should grow linearly with the length;
* small models (``--small``: hidden 256 x 6 layers x 1,024 tokens and the embedded model's size, both
  architectures): prefill ratio to transformers at one thread, and where statelab's time goes (projections, scan,
  conv and gates, head/norms/embedding);
* prefill MFU: matmul FLOPs per token x tokens/s divided by the machine's measured matmul GFLOP/s;
* time to first token after a 2048-token prefix: loading the saved state from disk and running one token, vs
  re-reading the prefix, and vs one decode step.

The machine is measured in the same run (matmul GFLOP/s, copy GB/s), so the table reads as ratios. Results go to
``benchmarks/RESULTS.md`` under ``## Models`` (plus ``benchmarks/models.png``).

    python benchmarks/bench_models.py                 # full run (minutes)
    python benchmarks/bench_models.py --quick         # 4 layers, 512 tokens: a smoke run in well under a minute
    python benchmarks/bench_models.py --only small     # one section: prefill, decode, precision, long, small
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from _results import RESULTS, cpu_name, write_section  # benchmarks/ is on sys.path when a script runs

PLOT = Path(__file__).resolve().parent / "models.png"
SECTION = "## Models"
SECTIONS = ("prefill", "decode", "precision", "ttft", "cputime", "long", "small")


# ---- machine ----------------------------------------------------------------------------------------------------
def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` calls after ``warmup`` calls, seconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine_rates(quick: bool) -> dict[str, float]:
    """fp32 matmul GFLOP/s (square 1536 matmul), copy GB/s (256 MiB, read + write bytes) and read GB/s (a sum over
    the same 256 MiB: what a decode step, which only reads its weights, can reach)."""
    n = 1024 if quick else 1536
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = best_time(lambda: a @ b, 3 if quick else 5)
    src = torch.empty(64 * 2**20 // 4 * (1 if quick else 4)).uniform_()
    dst = torch.empty_like(src)
    tc = best_time(lambda: dst.copy_(src), 3 if quick else 5)
    tr = best_time(lambda: src.sum(), 3 if quick else 5)
    return {
        "matmul_gflops": 2 * n**3 / t / 1e9,
        "copy_gbs": 2 * src.numel() * 4 / tc / 1e9,
        "read_gbs": src.numel() * 4 / tr / 1e9,
    }


# ---- models -----------------------------------------------------------------------------------------------------
def build(arch: str, n_layer: int, seed: int = 0):
    """A statelab model with random weights of a 130m-sized config."""
    torch.manual_seed(seed)
    if arch == "mamba1":
        from statelab.models.mamba1 import Mamba1Config, Mamba1LM

        return Mamba1LM(Mamba1Config(d_model=768, n_layer=n_layer, vocab_size=50280, d_state=16)).eval()
    if arch == "mamba2":
        from statelab.models.mamba2 import Mamba2Config, Mamba2LM

        cfg = Mamba2Config(vocab_size=50280, d_model=768, n_layer=n_layer, d_state=128, head_dim=64)
        return Mamba2LM(cfg).eval()
    raise SystemExit(f"unknown arch {arch!r}; choose mamba1 and/or mamba2")


def matmul_params(model: torch.nn.Module) -> int:
    """Weights that take part in a matmul per token: every Linear plus the output head."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if getattr(model, "lm_head", None) is None:
        n += model.embedding.weight.numel()
    return n


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decoded token: every parameter once (the embedding is read whole only as a tied head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if getattr(model, "lm_head", None) is not None:
        total -= model.embedding.weight.numel() * model.embedding.weight.element_size()
    return total


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_round(prefill: Callable[[], tuple], step: Callable[[object, object], tuple], steps: int) -> float:
    """Per-token time of ``steps`` one-token calls after an untimed prefill (``prefill() -> (tok, cache)``)."""
    tok, cache = prefill()
    t0 = time.perf_counter()
    for _ in range(steps):
        tok, cache = step(tok, cache)
    return (time.perf_counter() - t0) / steps


def hf_fns(hf, prompt: torch.Tensor):
    def prefill():
        out = hf(prompt, use_cache=True)
        return out.logits[:, -1:].argmax(-1), out.cache_params

    def step(tok, cache):
        out = hf(tok, cache_params=cache, use_cache=True)
        return out.logits[:, -1:].argmax(-1), cache

    return prefill, step


def ours_fns(model, prompt: torch.Tensor):
    """The general pass, one token per call (``model(tok[:, None], state)``)."""

    def prefill():
        logits, state = model(prompt)
        return logits[:, -1:].argmax(-1), state

    def step(tok, state):
        logits, state = model(tok, state)
        return logits[:, -1:].argmax(-1), state

    return prefill, step


def step_fns(model, prompt: torch.Tensor):
    """The decode path (``model.step``), as generate and the server run it."""

    def prefill():
        logits, state = model(prompt)
        return logits[:, -1].argmax(-1), state

    def step(tok, state):
        logits, state = model.step(tok, state)
        return logits.argmax(-1), state

    return prefill, step


def save_state_file(state, path: Path) -> None:
    try:
        from statelab.state.io import save_state

        save_state(state, path, fsync=False)
    except ImportError:
        from safetensors.torch import save_file

        save_file({"ssm": state.ssm, "conv": state.conv, "sum_delta": state.sum_delta}, str(path))


def load_state_file(path: Path, model):
    try:
        from statelab.state.io import load_state

        return load_state(path, model)
    except ImportError:
        from safetensors.torch import load_file

        t = load_file(str(path))
        return model.zero_state(1).replace(ssm=t["ssm"], conv=t["conv"], sum_delta=t["sum_delta"], n_tokens=2048)


def bench_arch(arch: str, args, rates: dict[str, float], progress) -> list[dict]:
    model = build(arch, args.layers)
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = AutoModelForCausalLM.from_pretrained(d).eval()
    rows = []
    flops_tok = 2 * matmul_params(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for T in args.lengths if "prefill" in args.sections else []:
            x = torch.randint(0, 50000, (1, T), generator=g)
            reps = 1 if T > 2048 else args.repeats
            with_hf = hf is not None and args.hf_max_len >= T
            if T <= 512:  # warm-up (allocator, weights in cache)
                model(x)
                if with_hf:
                    hf(x, use_cache=False)
            # interleaved rounds: load from other jobs hits both sides alike
            t_fwd = t_enc = t_hf = float("inf")
            for _ in range(reps):
                t_fwd = min(t_fwd, timed(lambda x=x: model(x)))
                if with_hf:
                    t_hf = min(t_hf, timed(lambda x=x: hf(x, use_cache=False)))
                if T <= 2048:  # the long run is costly: its forward pass stands for both
                    t_enc = min(t_enc, timed(lambda x=x: model.encode(x)))
            row = {"arch": arch, "what": f"prefill {T}", "ours_tok_s": T / t_fwd, "ours_encode_tok_s": T / t_enc}
            if T > 2048:
                row["ours_encode_tok_s"] = None
            row["mfu"] = flops_tok * T / t_fwd / (rates["matmul_gflops"] * 1e9)
            if with_hf:
                row["hf_tok_s"] = T / t_hf
                row["ratio"] = t_hf / t_fwd
            rows.append(row)
            progress(f"{arch} prefill {T}: {row['ours_tok_s']:.0f} tok/s (hf {row.get('hf_tok_s', float('nan')):.0f})")
            gc.collect()
        if "long" in args.sections:
            rows += long_rows(arch, model, args.long_lengths, progress)
        prompt = torch.randint(0, 50000, (1, 8), generator=g)
        steps = args.decode_steps
        if "decode" in args.sections:
            fns = {"ours": step_fns(model, prompt), "forward": ours_fns(model, prompt)}
            if hf is not None:
                fns["hf"] = hf_fns(hf, prompt)
            best = {k: float("inf") for k in fns}
            for r in range(args.repeats + 1):  # round 0 warms up; rounds alternate between the sides
                for k, f in fns.items():
                    t = decode_round(*f, steps)
                    best[k] = min(best[k], t) if r else best[k]
            t_ours = best["ours"]
            wb = weight_bytes(model)
            row = {
                "arch": arch,
                "what": "decode ms/token",
                "ours_ms": t_ours * 1e3,
                "forward_ms": best["forward"] * 1e3,
                "floor_ms": wb / (rates["copy_gbs"] * 1e9) * 1e3,
                "read_floor_ms": wb / (rates["read_gbs"] * 1e9) * 1e3,
            }
            if hf is not None:
                row["hf_ms"] = best["hf"] * 1e3
                row["ratio"] = best["hf"] / t_ours
            rows.append(row)
            progress(
                f"{arch} decode: step {row['ours_ms']:.1f} ms/token, general pass {row['forward_ms']:.1f} "
                f"(hf {row.get('hf_ms', float('nan')):.1f}, read floor {row['read_floor_ms']:.1f})"
            )
        if "precision" in args.sections:
            rows.append(precision_row(arch, model, args.repeats, progress))

        if "ttft" in args.sections:
            # time to first token after a prefix: stored state vs re-reading the prefix
            P = args.ttft_prefix
            prefix = torch.randint(0, 50000, (1, P), generator=g)
            nxt = torch.randint(0, 50000, (1, 1), generator=g)
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "prefix.safetensors"
                in_memory = model.encode(prefix)
                save_state_file(in_memory, path)
                # interleaved: first token from the file vs one decode step from the state already in memory
                t_disk = t_step = float("inf")
                for r in range(args.repeats * 2 + 1):
                    a = timed(lambda: model(nxt, load_state_file(path, model)))
                    b = timed(lambda: model(nxt, in_memory))
                    if r:
                        t_disk, t_step = min(t_disk, a), min(t_step, b)
            t_reread = best_time(lambda: model(torch.cat([prefix, nxt], 1)), 1, warmup=0)
            rows.append(
                {
                    "arch": arch,
                    "what": f"first token after {P}",
                    "disk_ms": t_disk * 1e3,
                    "reread_ms": t_reread * 1e3,
                    "step_ms": t_step * 1e3,
                    "vs_decode": t_disk / t_step,
                }
            )
            progress(f"{arch} TTFT: state from disk {t_disk * 1e3:.1f} ms vs re-read {t_reread * 1e3:.0f} ms")

        if hf is not None and args.cpu_time_len and "cputime" in args.sections:
            # CPU time of one thread: what each side computes, whatever else runs on the machine
            T = args.cpu_time_len
            x = torch.randint(0, 50000, (1, T), generator=g)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                c_ours = cpu_time(lambda: model(x))
                c_hf = cpu_time(lambda: hf(x, use_cache=False))
                decode_round(*step_fns(model, prompt), 1)  # builds the decode weight copies outside the timing
                d_ours = cpu_time(lambda: decode_round(*step_fns(model, prompt), steps)) / (steps + 1)
                d_hf = cpu_time(lambda: decode_round(*hf_fns(hf, prompt), steps)) / (steps + 1)
            finally:
                torch.set_num_threads(threads)
            rows.append(
                {
                    "arch": arch,
                    "what": f"1-thread CPU time, prefill {T} + decode",
                    "prefill_ratio": c_hf / c_ours,
                    "ours_prefill_s": c_ours,
                    "hf_prefill_s": c_hf,
                    "decode_ratio": d_hf / d_ours,
                }
            )
            progress(f"{arch} 1-thread CPU time: prefill x{c_hf / c_ours:.2f}, decode x{d_hf / d_ours:.2f}")
    return rows


# ---- decode precision ---------------------------------------------------------------------------------------
def decode_matrices(model) -> list[torch.Tensor]:
    """The ``[out, in]`` matrices one decode token multiplies, in order: every Linear, then the output head."""
    mats = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if getattr(model, "lm_head", None) is None:
        mats.append(model.embedding.weight.detach())
    return mats


def precision_row(arch: str, model, repeats: int, progress) -> dict:
    """ms for the matrix-vector products of one decode token in each CPU precision torch offers.

    fp32 as the decode step keeps them (``x @ Wt``, transposed, contiguous), fp32 in the module layout
    (``F.linear``), fp16 and bf16 (``F.linear`` on cast copies) and int8 weight-only (per-row scales,
    ``torch.ops.aten._weight_int8pack_mm``). A precision would be worth a decode mode only if it beat the first.
    """
    import torch.nn.functional as F

    mats = decode_matrices(model)
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in mats}
    ways: dict[str, Callable[[], object]] = {}
    wt = [w.t().contiguous() for w in mats]
    ways["fp32 x@Wt (decode path)"] = lambda: [xs[w.shape[0]] @ w for w in wt]
    ways["fp32 F.linear"] = lambda: [F.linear(xs[w.shape[1]], w) for w in mats]
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        low = [w.to(dtype) for w in mats]
        xl = {k: v.to(dtype) for k, v in xs.items()}
        ways[f"{name} F.linear"] = lambda low=low, xl=xl: [F.linear(xl[w.shape[1]], w) for w in low]
    try:
        q = []
        for w in mats:
            scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
            q.append(((w / scale[:, None]).round().to(torch.int8), scale))
        torch.ops.aten._weight_int8pack_mm(xs[mats[0].shape[1]], *q[0])
        ways["int8 weight-only"] = lambda: [torch.ops.aten._weight_int8pack_mm(xs[w.shape[1]], w, sc) for w, sc in q]
    except (RuntimeError, AttributeError) as e:  # not every torch build has the kernel
        progress(f"int8 weight-only matvec unavailable: {e}")
    best = {k: float("inf") for k in ways}
    for r in range(repeats + 1):  # interleaved; round 0 warms up
        for k, fn in ways.items():
            t = timed(fn)
            best[k] = min(best[k], t) if r else best[k]
    fp32_bytes = sum(w.numel() * 4 for w in mats)
    row = {"arch": arch, "what": "decode matvecs by precision", "ms": {k: v * 1e3 for k, v in best.items()}}
    row["fp32_gbs"] = {k: fp32_bytes / v / 1e9 for k, v in best.items()}
    progress(f"{arch} decode matvecs: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()))
    return row


# ---- long prefill -------------------------------------------------------------------------------------------
class PeakRSS:
    """Peak resident memory added while the ``with`` body runs: a thread samples ``/proc/self/statm`` every
    2 ms (torch's CPU allocations bypass Python's allocator, so tracemalloc would not see them)."""

    def __enter__(self) -> PeakRSS:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def added_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def long_rows(arch: str, model, lengths: list[int], progress) -> list[dict]:
    """Long prefill through ``encode`` (no head): tokens/s and the peak memory each call added."""
    rows = []
    g = torch.Generator().manual_seed(2)
    model.encode(torch.randint(0, 50000, (1, 512), generator=g))  # warm-up
    for T in lengths:
        x = torch.randint(0, 50000, (1, T), generator=g)
        gc.collect()
        with PeakRSS() as mem:
            t = timed(lambda x=x: model.encode(x))
        rows.append({"arch": arch, "what": f"long prefill {T}", "tok_s": T / t, "peak_mb": mem.added_mb})
        progress(f"{arch} encode {T}: {T / t:.0f} tok/s, peak +{mem.added_mb:.0f} MB")
    base = rows[0]
    for r in rows:
        T = int(r["what"].split()[-1])
        r["rate_vs_first"] = r["tok_s"] / base["tok_s"]
        r["mb_per_1k_tokens"] = r["peak_mb"] / T * 1024
    return rows


# ---- small models -------------------------------------------------------------------------------------------
def small_models() -> dict[str, torch.nn.Module]:
    """hidden 256 x 6 layers (both architectures) and models of the embedded model's size (its own checkpoint,
    and the other architecture at its width and depth), random weights, byte vocabulary."""
    from statelab.models.loading import load_model
    from statelab.models.mamba1 import Mamba1Config, Mamba1LM
    from statelab.models.mamba2 import Mamba2Config, Mamba2LM

    torch.manual_seed(0)
    out = {
        "mamba1 256x6": Mamba1LM(Mamba1Config(d_model=256, n_layer=6, vocab_size=256)),
        "mamba2 256x6": Mamba2LM(Mamba2Config(vocab_size=256, d_model=256, n_layer=6, d_state=64, head_dim=32)),
    }
    emb = load_model("embedded")
    c = emb.config
    out[f"embedded ({emb.arch}, {c.d_model}x{c.n_layer})"] = emb
    if emb.arch == "mamba1":
        other = Mamba2LM(Mamba2Config(vocab_size=c.padded_vocab_size, d_model=c.d_model, n_layer=c.n_layer,
                                      d_state=64, head_dim=32))  # fmt: skip
    else:
        other = Mamba1LM(Mamba1Config(d_model=c.d_model, n_layer=c.n_layer, vocab_size=c.vocab_size))
    out[f"embedded-sized {other.arch} ({c.d_model}x{c.n_layer})"] = other
    return {k: m.eval() for k, m in out.items()}


def breakdown(model, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds of one ``model(x)`` by part, best of ``repeats``: the layers' Linear modules (projections), the scan
    op (selective scan or SSD), the rest of the mixers (conv, gates, norms inside the mixer) and everything outside
    the mixers (embedding, block norms, residual adds, final norm, output head). Timed by wrapping the modules'
    forward and the scan function of the layer modules for the duration of the call."""
    import statelab.layers.mamba1 as l1
    import statelab.layers.mamba2 as l2

    spent = {"projections": 0.0, "scan": 0.0, "mixers": 0.0}

    def timing(fn, key):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0

        return wrapped

    mixers = [b.mixer for b in model.layers]
    linears = [m for mx in mixers for m in mx.modules() if isinstance(m, torch.nn.Linear)]
    saved_scan = (l1.selective_scan, l2.ssd_scan)
    for m in mixers + linears:
        m.forward = timing(m.forward, "mixers" if m in mixers else "projections")
    l1.selective_scan, l2.ssd_scan = timing(l1.selective_scan, "scan"), timing(l2.ssd_scan, "scan")
    best: dict[str, float] | None = None
    try:
        for _ in range(repeats):
            for k in spent:
                spent[k] = 0.0
            t0 = time.perf_counter()
            model(x)
            total = time.perf_counter() - t0
            parts = {
                "total": total,
                "projections": spent["projections"],
                "scan": spent["scan"],
                "conv and gates": spent["mixers"] - spent["projections"] - spent["scan"],
                "head, norms, embedding": total - spent["mixers"],
            }
            if best is None or total < best["total"]:
                best = parts
    finally:
        for m in mixers + linears:
            del m.forward  # back to the class's forward
        l1.selective_scan, l2.ssd_scan = saved_scan
    assert best is not None
    return best


def small_rows(args, progress) -> list[dict]:
    """Prefill of 1,024 tokens at one thread: ratio to transformers and statelab's time by part, per small model."""
    from transformers import AutoModelForCausalLM

    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, model in small_models().items():
            V = model.embedding.weight.shape[0]
            x = torch.randint(0, V, (1, args.small_tokens), generator=torch.Generator().manual_seed(3))
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                hf = AutoModelForCausalLM.from_pretrained(d).eval()
            with torch.no_grad():
                model(x)
                hf(x, use_cache=False)
                t_ours = t_hf = float("inf")
                for _ in range(args.repeats * 2):  # interleaved
                    t_ours = min(t_ours, timed(lambda x=x, m=model: m(x)))
                    t_hf = min(t_hf, timed(lambda x=x, h=hf: h(x, use_cache=False)))
                parts = breakdown(model, x, args.repeats * 2)
            rows.append(
                {
                    "arch": name,
                    "what": f"small prefill {args.small_tokens}",
                    "ours_tok_s": args.small_tokens / t_ours,
                    "hf_tok_s": args.small_tokens / t_hf,
                    "ratio": t_hf / t_ours,
                    "parts_ms": {k: v * 1e3 for k, v in parts.items()},
                }
            )
            share = ", ".join(f"{k} {100 * v / parts['total']:.0f}%" for k, v in parts.items() if k != "total")
            progress(f"{name}: x{t_hf / t_ours:.2f} vs transformers; {share}")
    finally:
        torch.set_num_threads(threads)
    return rows


def cpu_time(fn: Callable[[], object]) -> float:
    """Process CPU seconds of one call (meaningful with one intra-op thread)."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


# ---- report -----------------------------------------------------------------------------------------------------
def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    out = [
        "| arch | measure | statelab | transformers | ratio (speed-up) | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["what"].startswith("prefill"):
            enc = r["ours_encode_tok_s"]
            note = (f"encode (no head) {enc:.0f} tok/s; " if enc else "") + f"MFU {100 * r['mfu']:.0f}%"
            out.append(
                f"| {r['arch']} | {r['what']} tok/s | {r['ours_tok_s']:.0f} | {fmt(r.get('hf_tok_s'), '.0f')} | "
                f"{fmt(r.get('ratio'), '.2f')} | {note} |"
            )
        elif r["what"].startswith("decode ms"):
            note = (
                f"model.step; the general pass model(tok, state) {r['forward_ms']:.1f} ms; floor (weights at the "
                f"read rate) {r['read_floor_ms']:.1f} ms = {r['ours_ms'] / r['read_floor_ms']:.2f}x floor; at the copy "
                f"rate {r['floor_ms']:.1f} ms"
            )
            out.append(
                f"| {r['arch']} | {r['what']} | {r['ours_ms']:.1f} | {fmt(r.get('hf_ms'), '.1f')} | "
                f"{fmt(r.get('ratio'), '.2f')} | {note} |"
            )
        elif r["what"].startswith("decode matvecs"):
            ms = r["ms"]
            base = ms["fp32 x@Wt (decode path)"]
            cells = "; ".join(f"{k} {v:.1f} ms ({base / v:.2f}x)" for k, v in ms.items())
            out.append(f"| {r['arch']} | {r['what']} (one token) | {base:.1f} ms | – | – | {cells} |")
        elif r["what"].startswith("long prefill"):
            out.append(
                f"| {r['arch']} | {r['what']} tok/s (encode) | {r['tok_s']:.0f} | – | {r['rate_vs_first']:.2f} of the "
                f"first length's rate | peak memory +{r['peak_mb']:.0f} MB ({r['mb_per_1k_tokens']:.1f} MB per 1k "
                "tokens) |"
            )
        elif r["what"].startswith("small prefill"):
            parts = r["parts_ms"]
            share = ", ".join(
                f"{k} {v:.1f} ms ({100 * v / parts['total']:.0f}%)" for k, v in parts.items() if k != "total"
            )
            out.append(
                f"| {r['arch']} | {r['what']} tok/s, 1 thread | {r['ours_tok_s']:.0f} | {r['hf_tok_s']:.0f} | "
                f"{r['ratio']:.2f} | {share} |"
            )
        elif r["what"].startswith("1-thread"):
            out.append(
                f"| {r['arch']} | {r['what']} | prefill {r['ours_prefill_s']:.1f} s | {r['hf_prefill_s']:.1f} s | "
                f"prefill {r['prefill_ratio']:.2f}, decode {r['decode_ratio']:.2f} | CPU seconds, robust to load |"
            )
        else:
            out.append(
                f"| {r['arch']} | {r['what']} ms | {r['disk_ms']:.1f} (state from disk) | "
                f"{r['reread_ms']:.0f} (re-read prefix, statelab) | {r['reread_ms'] / r['disk_ms']:.0f} | "
                f"{r['vs_decode']:.2f}x one decode step ({r['step_ms']:.1f} ms) |"
            )
    return "\n".join(out)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = [r for r in rows if r["what"].startswith("prefill") and "hf_tok_s" in r]
    dec = [r for r in rows if r["what"].startswith("decode ms") and "hf_ms" in r]
    if not pre and not dec:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['arch']}\n{r['what'].split()[1]}" for r in pre]
    xs = range(len(pre))
    axes[0].bar([x - 0.2 for x in xs], [r["hf_tok_s"] for r in pre], 0.4, label="transformers")
    axes[0].bar([x + 0.2 for x in xs], [r["ours_tok_s"] for r in pre], 0.4, label="statelab")
    axes[0].set_xticks(list(xs), labels)
    axes[0].set_ylabel("prefill tokens/s")
    axes[0].legend()
    xs = range(len(dec))
    axes[1].bar([x - 0.2 for x in xs], [r["hf_ms"] for r in dec], 0.4, label="transformers")
    axes[1].bar([x + 0.2 for x in xs], [r["ours_ms"] for r in dec], 0.4, label="statelab")
    axes[1].plot(list(xs), [r["floor_ms"] for r in dec], "k_", markersize=30, label="bandwidth floor")
    axes[1].set_xticks(list(xs), [r["arch"] for r in dec])
    axes[1].set_ylabel("decode ms/token")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mamba1,mamba2", help="comma-separated: mamba1,mamba2")
    p.add_argument("--lengths", default="512,2048,8192", help="prefill lengths")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--ttft-prefix", type=int, default=2048)
    p.add_argument("--hf-max-len", type=int, default=2048, help="longest prefill also run through transformers")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (statelab only)")
    p.add_argument(
        "--cpu-time-len", type=int, default=2048, help="prefill length of the 1-thread CPU-time check (0: skip)"
    )
    p.add_argument("--long-lengths", default="2048,8192,32768", help="long prefill lengths (encode, no head)")
    p.add_argument("--small-tokens", type=int, default=1024, help="prefill length of the small-model rows")
    p.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections to run, of {','.join(SECTIONS)}"
    )
    p.add_argument("--quick", action="store_true", help="4 layers, 512 tokens, short decode: a smoke run")
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args()
    if args.quick:
        args.layers, args.lengths, args.decode_steps, args.ttft_prefix, args.repeats = 4, "512", 4, 512, 1
        args.cpu_time_len, args.long_lengths, args.small_tokens = 256, "512,2048", 256
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.long_lengths = [int(x) for x in args.long_lengths.split(",")]
    args.sections = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = args.sections - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    from rich.console import Console

    console = Console()
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    if "mamba2" in archs:
        try:
            import statelab.models.mamba2  # noqa: F401
        except ImportError:
            console.print("[yellow]statelab.models.mamba2 not importable: skipping mamba2[/]")
            archs.remove("mamba2")
    rates = machine_rates(args.quick)
    console.print(f"matmul {rates['matmul_gflops']:.0f} GFLOP/s, copy {rates['copy_gbs']:.1f} GB/s")
    rows: list[dict] = []
    with console.status("benchmarking") as status:
        if "small" in args.sections:
            rows += small_rows(args, lambda msg: (status.update(msg), console.print(msg)))
            report(rows, args, rates, console)
        per_arch = {"prefill", "decode", "precision", "ttft", "cputime", "long"} & args.sections
        for arch in archs if per_arch else []:
            rows += bench_arch(arch, args, rates, lambda msg: (status.update(msg), console.print(msg)))
            again = machine_rates(args.quick)  # other jobs lower any one measurement: keep the best seen
            for k, v in again.items():
                if v > rates[k]:
                    scale = rates[k] / v
                    rates[k] = v
                    for r in rows:  # MFU is relative to the matmul rate; the floor to the copy rate
                        if k == "matmul_gflops" and "mfu" in r:
                            r["mfu"] *= scale
                        if k == "copy_gbs" and "floor_ms" in r:
                            r["floor_ms"] *= scale
                        if k == "read_gbs" and "read_floor_ms" in r:
                            r["read_floor_ms"] *= scale
            report(rows, args, rates, console)  # after each architecture, so a long run leaves results behind


def report(rows: list[dict], args, rates: dict[str, float], console) -> None:
    text = table(rows)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()} ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, {args.threads} threads, fp32, random 130m-sized weights "
        f"({args.layers} layers{', quick run' if args.quick else ''}). Machine: matmul "
        f"{rates['matmul_gflops']:.0f} GFLOP/s, copy {rates['copy_gbs']:.1f} GB/s (read + write), read "
        f"{rates['read_gbs']:.1f} GB/s. Sections: {', '.join(s for s in SECTIONS if s in args.sections)}. Load "
        f"average at the end {load}: the cores were shared with other jobs, so absolute figures are noisy; the "
        "ratios compare runs made back to back in the same process."
    )
    console.print(text)
    if not args.no_write:
        write_section(SECTION, header + "\n\n" + text + "\n\n![models](models.png)\n\n" + "```json\n" + json.dumps(
            rows, indent=1, default=float) + "\n```")  # fmt: skip
        plot(rows)
        console.print(f"wrote {RESULTS} and {PLOT}")


if __name__ == "__main__":
    main()
