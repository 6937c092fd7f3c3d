"""Bulk use: many prompts through a model at once vs one at a time, and vs transformers with attention_mask.

Measures, per model (``--models embedded,mamba1-130m``; the second has random 130m-sized weights, as in
``bench_models.py``):

* **library**: ``--prompts`` prompts of ``--min-len``-``--max-len`` tokens (lengths drawn uniformly; random text
  read by the byte tokenizer, so one byte is one token) turned into one state each. ``statelab.encode_texts``
  (length-bucketed ragged batches under ``--batch-tokens``) against ``model.encode`` one prompt at a time, in tokens
  per second, and the ratio. Against transformers' Mamba-1 on the same weights: its backbone (no output head, like
  ``encode``) with ``use_cache=True`` (the cache is its state), left-padded with ``attention_mask``, prompts sorted
  by length and cut into batches of each of ``--hf-batch-sizes``; its best batch size is the one compared.
* **generation**: ``--gen-prompts`` prompts of the library (ragged) x ``--new-tokens`` greedy tokens:
  ``model.generate(ids, n, lengths=...)`` in one batch against ``model.generate`` one prompt at a time, in new
  tokens per second, and how many rows produced the same tokens both ways.

Each figure is one timed pass after a short warm-up; ratios compare runs made back to back in the same process.
``--sample N`` measures the one-at-a-time and transformers rates on N of the prompts (a rate needs no more; the
full library one prompt at a time takes long on a CPU). Results go to ``benchmarks/RESULTS.md`` under
``## Batches``.

    python benchmarks/bench_batch.py                  # full run
    python benchmarks/bench_batch.py --quick          # small sizes: a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import tempfile
import time
from collections.abc import Callable

import torch

from _results import RESULTS, cpu_name, write_section  # benchmarks/ is on sys.path when a script runs

SECTION = "## Batches"
ALPHABET = "abcdefghijklmnopqrstuvwxyz     \n.,:"


# ---- machine and timing -----------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """``(seconds, result)`` of one call, waiting for the device to finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


# ---- models and prompts -----------------------------------------------------------------------------------------
def build(name: str, layers: int):
    """``embedded`` (the shipped model) or ``mamba1-130m`` (random weights of the 130m config, ``layers`` deep)."""
    if name == "embedded":
        import statelab

        return statelab.load_model("embedded").eval()
    if name == "mamba1-130m":
        from statelab.models.mamba1 import Mamba1Config, Mamba1LM

        torch.manual_seed(0)
        return Mamba1LM(Mamba1Config(d_model=768, n_layer=layers, vocab_size=50280, d_state=16)).eval()
    raise SystemExit(f"unknown model {name!r}; choose embedded and/or mamba1-130m")


def hf_twin(model):
    """transformers' MambaForCausalLM with the same weights (written by ``save_pretrained``, read back)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return AutoModelForCausalLM.from_pretrained(d).eval()


def library(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """``n`` random texts whose byte lengths are drawn uniformly from ``[lo, hi]``."""
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(lo, hi))) for _ in range(n)]


# ---- the measurements -------------------------------------------------------------------------------------------
def bench_library(model, hf, texts: list[str], sample: list[str], args, device, say) -> dict:
    from statelab.models.batching import encode_texts, length_buckets
    from statelab.models.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    n_all = sum(len(t) for t in texts)
    n_sample = sum(len(t) for t in sample)
    encode_texts(model, tok, texts[:8], batch_tokens=args.batch_tokens)  # warm-up
    t_batch, states = timed(lambda: encode_texts(model, tok, texts, batch_tokens=args.batch_tokens), device)
    say(f"  encode_texts: {n_all / t_batch:,.0f} tok/s ({len(texts)} prompts, {t_batch:.1f} s)")

    def alone(text: str):
        return model.encode(torch.tensor([tok.encode(text)], device=device))

    with torch.no_grad():
        alone(sample[0])  # warm-up
        t_alone, _ = timed(lambda: [alone(t) for t in sample], device)
        worst = max(float((alone(t).ssm - states[i].ssm).abs().max()) for i, t in enumerate(texts[:4]))
    say(f"  one at a time: {n_sample / t_alone:,.0f} tok/s ({len(sample)} prompts, {t_alone:.1f} s)")
    buckets = length_buckets([len(t) for t in texts], args.batch_tokens)
    padded = sum(len(b) * len(texts[b[0]]) for b in buckets)
    row = {
        "what": "library encode",
        "batched_tok_s": n_all / t_batch,
        "alone_tok_s": n_sample / t_alone,
        "ratio": (n_all / t_batch) / (n_sample / t_alone),
        "batches": len(buckets),
        "padding": 1 - n_all / padded,
        "max_ssm_diff": worst,
        "prompts": len(texts),
        "sample": len(sample),
    }
    if hf is not None:
        ids = [tok.encode(t) for t in sample]
        per_bs = {}
        for bs in args.hf_batch_sizes:
            hf_encode(hf, ids[:bs], bs, device)  # warm-up at this shape
            t_hf, _ = timed(lambda bs=bs: hf_encode(hf, ids, bs, device), device)
            per_bs[bs] = n_sample / t_hf
            say(f"  transformers, batch {bs}: {per_bs[bs]:,.0f} tok/s")
        best = max(per_bs, key=per_bs.get)
        row.update(
            hf_tok_s=per_bs[best], hf_batch=best, hf_by_batch=per_bs, hf_ratio=row["batched_tok_s"] / per_bs[best]
        )
    return row


@torch.no_grad()
def hf_encode(hf, ids: list[list[int]], batch: int, device) -> None:
    """transformers' states of every prompt: sorted by length, left-padded batches with attention_mask."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for start in range(0, len(order), batch):
        rows = [ids[i] for i in order[start : start + batch]]
        T = len(rows[0])
        x = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, T - len(r) :] = torch.tensor(r)
            mask[b, T - len(r) :] = 1
        out = hf.backbone(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=True)
        assert out.cache_params is not None


@torch.no_grad()
def bench_generate(model, texts: list[str], args, device, say) -> dict:
    from statelab.models.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ids, lengths = tok.encode_batch(texts)
    ids, lengths = ids.to(device), lengths.to(device)
    n = args.new_tokens
    model.generate(ids[:2], 2, lengths=lengths[:2])  # warm-up
    t_batch, gen = timed(lambda: model.generate(ids, n, lengths=lengths), device)
    rows = [ids[b : b + 1, : int(lengths[b])] for b in range(len(texts))]
    t_alone, alone = timed(lambda: [model.generate(r, n).tokens for r in rows], device)
    same = sum(bool(torch.equal(gen.tokens[b], a[0])) for b, a in enumerate(alone))
    row = {
        "what": "generate",
        "batched_tok_s": len(texts) * n / t_batch,
        "alone_tok_s": len(texts) * n / t_alone,
        "ratio": t_alone / t_batch,
        "prompts": len(texts),
        "new_tokens": n,
        "min_len": int(lengths.min()),
        "max_len": int(lengths.max()),
        "rows_equal": same,
    }
    rate = f"{row['batched_tok_s']:,.1f} vs {row['alone_tok_s']:,.1f} new tok/s"
    say(f"  generate: {rate}, {same}/{len(texts)} rows equal")
    return row


# ---- report -----------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    out = [
        "| model | measure | statelab batched | one at a time | ratio | transformers, best batch | ratio | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["what"] == "library encode":
            hf = f"{r['hf_tok_s']:,.0f} (batch {r['hf_batch']})" if "hf_tok_s" in r else "–"
            hf_ratio = f"{r['hf_ratio']:.2f}" if "hf_ratio" in r else "–"
            by_bs = ", ".join(f"{b}: {v:,.0f}" for b, v in r.get("hf_by_batch", {}).items())
            note = (
                f"{r['prompts']} prompts, {r['batches']} batches, {100 * r['padding']:.1f}% padding; one at a time"
                f"{' and transformers' if by_bs else ''} on {r['sample']} of them; max SSM diff batched vs alone "
                f"{r['max_ssm_diff']:.1e}" + (f"; transformers by batch size: {by_bs}" if by_bs else "")
            )
            out.append(
                f"| {r['model']} | library encode, tok/s | {r['batched_tok_s']:,.0f} | {r['alone_tok_s']:,.0f} | "
                f"{r['ratio']:.2f} | {hf} | {hf_ratio} | {note} |"
            )
        else:
            note = (
                f"{r['prompts']} prompts of {r['min_len']}-{r['max_len']} tokens x {r['new_tokens']} greedy tokens; "
                f"{r['rows_equal']}/{r['prompts']} rows equal to their generation alone"
            )
            out.append(
                f"| {r['model']} | generate, new tok/s | {r['batched_tok_s']:,.1f} | {r['alone_tok_s']:,.1f} | "
                f"{r['ratio']:.2f} | – | – | {note} |"
            )
    return "\n".join(out)


def report(rows: list[dict], args, device, console) -> None:
    text = table(rows)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()} ({os.cpu_count()} cores)"
    header = (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {where}, torch {torch.__version__}, {args.threads} threads, "
        f"fp32. Library: prompts of {args.min_len}-{args.max_len} tokens, --batch-tokens {args.batch_tokens}; "
        f"mamba1-130m: random weights, {args.layers} layers{', quick run' if args.quick else ''}. Load average at the "
        f"end {load}; ratios compare runs made back to back in the same process."
    )
    console.print(text)
    if not args.no_write:
        write_section(
            SECTION, header + "\n\n" + text + "\n\n```json\n" + json.dumps(rows, indent=1, default=float) + "\n```"
        )
        console.print(f"wrote {RESULTS}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="embedded,mamba1-130m", help="comma-separated: embedded,mamba1-130m")
    p.add_argument("--prompts", type=int, default=1000, help="prompts in the library")
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--sample", type=int, default=0, help="prompts timed one at a time and by transformers (0: all)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="encode_texts' token budget per batch")
    p.add_argument("--hf-batch-sizes", default="1,8,32,64", help="transformers batch sizes to try")
    p.add_argument("--gen-prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=24, help="layers of mamba1-130m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (statelab only)")
    p.add_argument("--quick", action="store_true", help="small sizes (2-layer 130m model, 40 prompts): a smoke run")
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.max_len, args.sample, args.layers = 40, 120, 20, 2
        args.gen_prompts, args.new_tokens, args.hf_batch_sizes = 6, 4, "1,8"
    args.hf_batch_sizes = [int(x) for x in args.hf_batch_sizes.split(",") if x.strip()]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from rich.console import Console

    console = Console()
    texts = library(args.prompts, args.min_len, args.max_len)
    sample = texts if not args.sample else random.Random(1).sample(texts, min(args.sample, len(texts)))
    rows: list[dict] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        console.print(f"[bold]{name}[/bold]")
        model = build(name, args.layers).to(device)
        hf = None if args.no_hf else hf_twin(model).to(device)
        rows.append({"model": name, **bench_library(model, hf, texts, sample, args, device, console.print)})
        gen = bench_generate(model, texts[: args.gen_prompts], args, device, console.print)
        rows.append({"model": name, **gen})
        del model, hf
        report(rows, args, device, console)  # after each model, so a long run leaves results behind


if __name__ == "__main__":
    main()
