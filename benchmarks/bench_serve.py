"""Serving: throughput and latency of ``statelab serve`` batched vs serial, and time to first token with the
prefix-state cache vs without it.

Every server is the real ``statelab serve`` command in its own process, reached over HTTP by httpx clients in
this process (so clients and server do not share one interpreter lock). Two models: the embedded 0.5M-parameter
byte-level Mamba-1 and a random 130m-sized Mamba-1 (24 layers, d_model 768, vocabulary 50280) saved to a
temporary checkpoint directory. Prompts are token-id lists (random ids), decoding is greedy, so the batched and
the serial server produce the same tokens and the comparison is of the same work.

1. **Throughput.** 64 requests from 8 concurrent clients (each sends its 8 in a row) to a batched server
   (``--max-batch 8``) and a serial one (``--max-batch 1``), prefix cache off: requests/s, generated tokens/s,
   p50 / p95 request latency and the mean decode batch the server reports at ``/metrics``.
2. **Time to first token.** A prompt of a 2,000-token prefix plus 16 tokens is sent (one token generated); then a
   prompt of the same prefix plus 16 other tokens is timed until its first streamed token arrives, on a server
   with the prefix cache (blocks of 64 and of 256 tokens) and on one without. A fresh prefix each repeat; the
   median is reported, with the prompt tokens each server actually read.

Results go to ``benchmarks/RESULTS.md`` under ``## Serving``.

    python benchmarks/bench_serve.py                  # full run (several minutes)
    python benchmarks/bench_serve.py --quick          # 16 requests, 4-layer 130m-width model: a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from _results import RESULTS, cpu_name, write_section  # benchmarks/ is on sys.path when a script runs

SECTION = "## Serving"


# ---- servers ----------------------------------------------------------------------------------------------------
class Server:
    """``statelab serve`` in a subprocess on a free port; ``url`` once it answers."""

    def __init__(self, model: str, threads: int, **options: object) -> None:
        cmd = [sys.executable, "-c", "from statelab.cli import main; main()", "serve", "--model", model]
        cmd += ["--port", "0", "--threads", str(threads), "--log-level", "warning"]
        for k, v in options.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        m = re.search(r"on (http://[\d.]+:\d+)", line)
        if not m:
            rest = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise SystemExit(f"statelab serve did not start: {line}{rest}")
        self.url = m.group(1)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        import httpx

        for _ in range(600):
            try:
                httpx.get(self.url + "/v1/models", timeout=5)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise SystemExit(f"statelab serve on {self.url} does not answer")

    def metrics(self) -> dict:
        import httpx

        return httpx.get(self.url + "/metrics", params={"format": "json"}, timeout=30).json()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def save_130m(directory: Path, n_layer: int) -> str:
    """A random 130m-sized Mamba-1 checkpoint (with the byte tokenizer for decoding) in ``directory``."""
    from statelab.models.mamba1 import Mamba1Config, Mamba1LM
    from statelab.models.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = Mamba1LM(Mamba1Config(d_model=768, n_layer=n_layer, vocab_size=50280, d_state=16)).eval()
    model.save_pretrained(directory)
    ByteTokenizer().save(directory)
    return str(directory)


# ---- workloads --------------------------------------------------------------------------------------------------
def throughput(server: Server, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    """Send ``prompts`` from ``clients`` threads (client ``c`` sends prompts ``c, c + clients, ...`` in a row)."""
    import httpx

    with httpx.Client(timeout=600) as warm:  # first-call costs stay out of the timing
        warm.post(server.url + "/v1/completions", json={"prompt": prompts[0][:8], "max_tokens": 2, "temperature": 0})
    before = server.metrics()["engine"]
    latencies: list[float] = []
    tokens: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        with httpx.Client(timeout=3600) as http:
            barrier.wait()
            for p in prompts[c::clients]:
                t0 = time.perf_counter()
                r = http.post(
                    server.url + "/v1/completions", json={"prompt": p, "max_tokens": max_tokens, "temperature": 0}
                )
                dt_ = time.perf_counter() - t0
                r.raise_for_status()
                with lock:
                    latencies.append(dt_)
                    tokens.append(r.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = server.metrics()["engine"]
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "tokens": sum(tokens),
        "wall_s": wall,
        "req_s": len(lat) / wall,
        "tok_s": sum(tokens) / wall,
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "mean_batch": rows / steps if steps else 0.0,
    }


def first_token(server: Server, prefix: list[int], tail_a: list[int], tail_b: list[int]) -> dict:
    """Send ``prefix + tail_a``, then time ``prefix + tail_b`` until its first streamed token."""
    import httpx

    with httpx.Client(timeout=3600) as http:
        r = http.post(server.url + "/v1/completions", json={"prompt": prefix + tail_a, "max_tokens": 1})
        r.raise_for_status()
        body = {
            "prompt": prefix + tail_b,
            "max_tokens": 1,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        t0 = time.perf_counter()
        ttft, usage = None, None
        with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if ttft is None and chunk["choices"] and chunk["choices"][0].get("token_ids"):
                    ttft = time.perf_counter() - t0
                usage = chunk.get("usage") or usage
    assert ttft is not None and usage is not None
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {"ttft_s": ttft, "read": usage["prompt_tokens"] - cached}


# ---- report -----------------------------------------------------------------------------------------------------
def tables(rows: list[dict]) -> str:
    out = [
        "| model | server | requests (clients) | tokens | wall s | req/s | tokens/s | p50 latency s | p95 latency s | "
        "mean decode batch | throughput vs serial |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    serial = {r["model"]: r["tok_s"] for r in rows if r["what"] == "load" and r["max_batch"] == 1}
    for r in rows:
        if r["what"] != "load":
            continue
        vs = r["tok_s"] / serial[r["model"]] if r["model"] in serial else None
        out.append(
            f"| {r['model']} | max-batch {r['max_batch']} | {r['requests']} ({r['clients']}) | {r['tokens']} | "
            f"{r['wall_s']:.1f} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
            f"{r['mean_batch']:.2f} | {'–' if vs is None else f'{vs:.2f}x'} |"
        )
    out += [
        "",
        "| model | prefix tokens | server | prompt tokens read | time to first token ms | speed-up vs no cache |",
        "|---|---|---|---|---|---|",
    ]
    base = {r["model"]: r["ttft_s"] for r in rows if r["what"] == "ttft" and r["block"] is None}
    for r in rows:
        if r["what"] != "ttft":
            continue
        name = "no cache" if r["block"] is None else f"prefix cache, blocks of {r['block']}"
        vs = base[r["model"]] / r["ttft_s"] if r["model"] in base and r["block"] is not None else None
        out.append(
            f"| {r['model']} | {r['prefix']} | {name} | {r['read']} | {1e3 * r['ttft_s']:.1f} | "
            f"{'–' if vs is None else f'{vs:.1f}x'} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="embedded,130m", help="comma-separated: embedded,130m")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8, help="rows of the batched server")
    p.add_argument("--prefix", type=int, default=2000, help="shared prefix of the time-to-first-token test")
    p.add_argument("--blocks", default="64,256", help="block sizes of the cached servers")
    p.add_argument("--repeats", type=int, default=3, help="time-to-first-token repeats (median)")
    p.add_argument("--layers", type=int, default=24, help="layers of the 130m-sized model")
    # one thread: the clients run on the same machine, and a second intra-op thread that waits for a busy core
    # at every operation made decode steps 50x slower on a loaded 2-core machine
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--quick", action="store_true", help="16 requests, 8 new tokens, 4 layers, 1 repeat")
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.layers, args.repeats, args.prefix = 16, 8, 4, 1, 1000
    from rich.console import Console

    console = Console()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, console.status("benchmarking") as status:

        def say(msg: str) -> None:
            status.update(msg)
            console.print(msg)

        for name in models:
            if name == "embedded":
                model, vocab, label = "embedded", 256, "embedded (0.5M)"
            elif name == "130m":
                say(f"saving a random 130m-sized Mamba-1 ({args.layers} layers)")
                model, vocab = save_130m(Path(tmp) / "mamba-130m", args.layers), 50000
                label = f"random 130m-sized Mamba-1 ({args.layers} layers)"
            else:
                raise SystemExit(f"unknown model {name!r}; choose embedded and/or 130m")
            prompts = [
                torch.randint(0, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.requests)
            ]
            for mb in (args.max_batch, 1):
                say(f"{name}: {args.requests} requests from {args.clients} clients, max-batch {mb}")
                with Server(model, args.threads, max_batch=mb, cache_bytes=0) as server:
                    r = throughput(server, prompts, args.clients, args.max_tokens)
                rows.append({"what": "load", "model": label, "max_batch": mb, "clients": args.clients, **r})
                say(f"  {r['tok_s']:.1f} tokens/s, p50 {r['p50_s']:.2f} s, mean decode batch {r['mean_batch']:.2f}")
            for block in [None, *blocks]:
                opts = {"cache_bytes": 0} if block is None else {"cache_bytes": "2G", "block_tokens": block}
                say(f"{name}: time to first token after a {args.prefix}-token shared prefix, block {block}")
                runs = []
                with Server(model, args.threads, max_prompt_tokens=args.prefix + 64, **opts) as server:
                    for rep in range(args.repeats):
                        gen = torch.Generator().manual_seed(100 + rep)  # the same prompts for every server
                        prefix = torch.randint(0, vocab, (args.prefix,), generator=gen).tolist()
                        a, b = (torch.randint(0, vocab, (16,), generator=gen).tolist() for _ in range(2))
                        runs.append(first_token(server, prefix, a, b))
                ttft = statistics.median(x["ttft_s"] for x in runs)
                rows.append(
                    {"what": "ttft", "model": label, "prefix": args.prefix, "block": block, "ttft_s": ttft,
                     "read": runs[0]["read"], "runs": runs}
                )  # fmt: skip
                say(f"  {1e3 * ttft:.1f} ms, {runs[0]['read']} prompt tokens read")
    text = tables(rows)
    console.print(text)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()} ({os.cpu_count()} cores), torch "
        f"{torch.__version__}, {args.threads} torch threads per server, fp32, greedy; `python "
        f"benchmarks/bench_serve.py{' --quick' if args.quick else ''}`. Throughput: {args.prompt_tokens}-token "
        f"prompts, {args.max_tokens} new tokens each, prefix cache off. Load average at the end {load}."
    )
    if not args.no_write:
        write_section(
            SECTION, header + "\n\n" + text + "\n\n```json\n" + json.dumps(rows, indent=1, default=float) + "\n```"
        )
        console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
