"""GPU benchmark of Mamba-2: statelab's pure-torch chunked scan vs the fla kernel backend vs transformers.

Random weights of a 130m-sized Mamba-2 (hidden 768, 24 layers, state 128, head dim 64, vocabulary 50288), batch 1:
prefill tokens/s at several lengths and decode ms/token, fp32 and bf16, with transformers' own Mamba2ForCausalLM
(its torch path when mamba_ssm is absent) on the same weights as the baseline measured in the same run.

Run on a CUDA machine: ``python benchmarks/bench_gpu.py [--out table.md]``. It prints a markdown table (the
``## GPU`` section of ``benchmarks/RESULTS.md`` is that table plus the machine it ran on).
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
import warnings

import torch

from statelab.backends import available_backends
from statelab.models.mamba2 import Mamba2Config, Mamba2LM

CFG = Mamba2Config(vocab_size=50288, d_model=768, n_layer=24, d_state=128, head_dim=64, n_groups=1)


def _time(fn, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up, with device synchronisation."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device")
    from rich.progress import Progress

    lengths = [int(v) for v in args.lengths.split(",")]
    torch.manual_seed(0)
    base = Mamba2LM(CFG).eval()
    hf = None
    try:
        from transformers import Mamba2ForCausalLM

        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base.save_pretrained(d)
            hf = Mamba2ForCausalLM.from_pretrained(d).eval()
    except ImportError:
        hf = None
    backends = [b for b in ("chunk", "cuda") if b in available_backends()]
    rows = []
    jobs = [(dt, T) for dt in (torch.float32, torch.bfloat16) for T in lengths]
    with Progress() as progress, torch.no_grad():
        task = progress.add_task("GPU bench", total=len(jobs) * (len(backends) + 2))
        for dtype, T in jobs:
            model = Mamba2LM(CFG).eval()
            model.load_state_dict(base.state_dict())
            model = model.to("cuda")
            for name, p in model.named_parameters():
                if not name.endswith(Mamba2LM.fp32_params):
                    p.data = p.data.to(dtype)
            x = torch.randint(0, CFG.vocab_size, (1, T), device="cuda")
            row = {"dtype": str(dtype).removeprefix("torch."), "T": T}
            for b in backends:
                model.backend = b
                sec = _time(lambda: model(x), reps=3)  # noqa: B023
                row[f"{b}_tok_s"] = T / sec
                progress.update(task, advance=1, description=f"{row['dtype']} T={T} {b}: {T / sec:,.0f} tok/s")
            if hf is not None:
                hfm = hf.to(device="cuda", dtype=dtype)
                try:
                    sec = _time(lambda: hfm(x, use_cache=False), reps=3)  # noqa: B023
                    row["hf_tok_s"] = T / sec
                except torch.OutOfMemoryError:
                    row["hf_tok_s"] = float("nan")
                torch.cuda.empty_cache()
            progress.update(task, advance=1)
            # decode: one token at a time from the prefill state
            model.backend = backends[-1]
            _, st = model(x[:, :16])
            tok = x[:, 16:17]

            def decode(st=st, tok=tok):
                s = st
                for _ in range(args.decode_steps):
                    _, s = model(tok, s)  # noqa: B023

            row["decode_ms"] = _time(decode, reps=3) / args.decode_steps * 1e3
            progress.update(task, advance=1)
            rows.append(row)
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name()
    lines = [
        f"{datetime.date.today().isoformat()}, {name}, torch {torch.__version__}, batch 1, 130m-sized Mamba-2 "
        "(random weights), median of 3 runs.",
        "",
        "| dtype | T | chunk (pure torch) tok/s | cuda (fla kernel) tok/s | kernel / pure | transformers tok/s "
        "| best / transformers | decode ms/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, k, h = r.get("chunk_tok_s", float("nan")), r.get("cuda_tok_s", float("nan")), r.get("hf_tok_s", float("nan"))
        best = max(v for v in (c, k) if v == v)
        lines.append(
            f"| {r['dtype']} | {r['T']} | {c:,.0f} | {k:,.0f} | {k / c:.2f}x | {h:,.0f} | {best / h:.2f}x "
            f"| {r['decode_ms']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
