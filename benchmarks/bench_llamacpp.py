"""statelab against llama.cpp on the same weights: prefill and decode, Mamba-1 and Mamba-2, CPU.

llama.cpp is what a user would pick for CPU inference of Mamba models (GGUF; its Mamba-2 runs the recurrence token
by token, without a chunked prefill). For each architecture this script

1. builds a random 130m-sized transformers checkpoint with statelab (``save_pretrained``; ``--layers`` and
   ``--width`` make it smaller for a smoke run);
2. converts it to GGUF in f32, f16 and q8_0 with ``convert_hf_to_gguf.py`` from the llama.cpp that
   llama-cpp-python's sdist vendors (no tokenizer files: the converter uses its built-in GPT-NeoX vocabulary, whose
   50,277 tokens padded to 50,280 are the checkpoint's rows);
3. checks first that llama.cpp f32 and statelab agree: the same greedy tokens from the same random prompt, and the
   largest difference of the last logits; a disagreement stops the run (timings of different computations are not
   a comparison);
4. times both engines back to back on the same thread count, interleaved: prefill of 512 and 2,048 tokens with
   logits for every token, and decode ms/token from a short prompt (statelab through ``model.step``, llama.cpp
   one token per ``eval``).

llama-cpp-python is optional (``pip install -e .[llamacpp]``); when it is missing the script downloads its sdist and
builds it into the running environment (minutes; ``CMAKE_ARGS="-DLLAMA_CURL=OFF -DGGML_NATIVE=ON"``), then writes
its table under ``## llama.cpp`` in ``benchmarks/RESULTS.md``. Not part of ``make bench`` or CI:

    make bench-llamacpp
    python benchmarks/bench_llamacpp.py --layers 2 --width 256 --lengths 64 --no-write   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _results import cpu_name, write_section  # benchmarks/ is on sys.path when a script runs

VERSION = "0.3.36"
CMAKE_ARGS = "-DLLAMA_CURL=OFF -DGGML_NATIVE=ON"
ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "llamacpp"  # sdist, extracted converter, GGUF files (git-ignored)
SECTION = "## llama.cpp"
VOCAB = 50280


# ---- llama.cpp --------------------------------------------------------------------------------------------------
def sdist() -> Path:
    """llama-cpp-python's sdist in ``build/llamacpp`` (downloaded with pip when missing)."""
    path = WORK / f"llama_cpp_python-{VERSION}.tar.gz"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={VERSION}", "-d", str(WORK)]  # fmt: skip
        subprocess.run(cmd, check=True)
    return path


def ensure_llama_cpp() -> None:
    """Import llama_cpp, building llama-cpp-python from its sdist into this environment first when it is missing."""
    try:
        import llama_cpp  # noqa: F401

        return
    except ImportError:
        pass
    src = sdist()
    print(f"building llama-cpp-python {VERSION} from {src} (several minutes)", flush=True)
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", CMAKE_ARGS)}
    constraints = ROOT / "constraints.txt"
    cmd = [sys.executable, "-m", "pip", "install", str(src)]
    if constraints.exists():
        cmd[4:4] = ["-c", str(constraints)]
    subprocess.run(cmd, check=True, env=env)


def converter() -> Path:
    """The vendored llama.cpp's ``convert_hf_to_gguf.py`` with the modules it imports, extracted from the sdist."""
    base = WORK / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    script = base / "convert_hf_to_gguf.py"
    if script.exists() and (base / "conversion").is_dir():
        return script
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-gpt-neox.gguf")
    with tarfile.open(sdist()) as tar:
        members = [
            m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
        ]
        tar.extractall(WORK / "src", members=members, filter="data")
    return script


def to_gguf(checkpoint: Path, outtype: str, out: Path) -> Path:
    """Convert a transformers checkpoint directory to GGUF (``outtype``: f32, f16, q8_0)."""
    script = converter()
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    cmd = [sys.executable, str(script), str(checkpoint), "--outtype", outtype, "--outfile", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed for {outtype}:\n{done.stderr[-2000:]}")
    return out


def llama(path: Path, n_ctx: int, threads: int):
    from llama_cpp import Llama

    return Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
        n_threads_batch=threads, logits_all=True, verbose=False,
    )  # fmt: skip


# ---- the two engines, one call shape each -----------------------------------------------------------------------
def llama_prefill(llm, ids: list[int]) -> np.ndarray:
    """Logits of every position ``[T, V]`` after reading ``ids`` from an empty context."""
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)])


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def llama_decode(llm, ids: list[int], steps: int) -> float:
    """Seconds per token of ``steps`` one-token evals after an untimed prompt."""
    llm.reset()
    llm.eval(ids)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return (time.perf_counter() - t0) / steps


def ours_greedy(model, ids: list[int], n: int) -> list[int]:
    return model.generate(torch.tensor([ids]), n).tokens[0].tolist()


def ours_decode(model, ids: list[int], steps: int) -> float:
    logits, state = model(torch.tensor([ids]))
    tok = logits[:, -1].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state = model.step(tok, state)
        tok = logits.argmax(-1)
    return (time.perf_counter() - t0) / steps


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- one architecture -------------------------------------------------------------------------------------------
def build(arch: str, layers: int, width: int):
    torch.manual_seed(0)
    if arch == "mamba1":
        from statelab.models.mamba1 import Mamba1Config, Mamba1LM

        return Mamba1LM(Mamba1Config(d_model=width, n_layer=layers, vocab_size=VOCAB)).eval()
    from statelab.models.mamba2 import Mamba2Config, Mamba2LM

    return Mamba2LM(Mamba2Config(vocab_size=VOCAB, d_model=width, n_layer=layers, d_state=128, head_dim=64)).eval()


class NotLoaded(Exception):
    """llama.cpp refused a GGUF file its own converter wrote."""


def bench_arch(arch: str, args, say) -> list[dict]:
    model = build(arch, args.layers, args.width)
    n_ctx = max(args.lengths) + args.decode_steps + 64
    g = torch.Generator().manual_seed(1)
    vocab_real = 50277  # the built-in GPT-NeoX vocabulary: ids past it are padding rows in llama.cpp
    rows = []
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        ckpt = Path(d) / "hf"
        model.save_pretrained(ckpt)
        ggufs = {q: to_gguf(ckpt, q, Path(d) / f"{arch}-{q}.gguf") for q in args.quants}
        say(f"{arch}: converted to {', '.join(ggufs)}")
        try:
            engines = {q: llama(p, n_ctx, args.threads) for q, p in ggufs.items()}
        except ValueError as e:  # llama_cpp: "Failed to load model from file: ..."
            raise NotLoaded(str(e)) from e

        # agreement first, on f32
        prompt = torch.randint(0, vocab_real, (args.check_prompt,), generator=g).tolist()
        ref = engines["f32"]
        theirs = llama_greedy(ref, prompt, args.check_tokens)
        ours = ours_greedy(model, prompt, args.check_tokens)
        last_theirs = llama_prefill(ref, prompt)[-1]
        last_ours = model(torch.tensor([prompt]))[0][0, -1].float().numpy()
        diff = float(np.abs(last_theirs[: last_ours.shape[0]] - last_ours).max())
        say(
            f"{arch}: greedy tokens {'agree' if theirs == ours else 'DIFFER'}; last logits differ by at most {diff:.2e}"
        )
        if theirs != ours:
            raise SystemExit(f"{arch}: llama.cpp f32 {theirs} vs statelab {ours}: not the same model, stopping")
        agree = {"tokens": len(ours), "max_logit_diff": diff}

        for T in args.lengths:
            ids = torch.randint(0, vocab_real, (T,), generator=g).tolist()
            x = torch.tensor([ids])
            model(x)  # warm-up
            best = {"statelab": math.inf} | {q: math.inf for q in engines}
            for _ in range(args.repeats):  # interleaved rounds: other jobs' load hits every side alike
                best["statelab"] = min(best["statelab"], timed(lambda x=x: model(x)))
                for q, llm in engines.items():
                    best[q] = min(best[q], timed(lambda llm=llm, ids=ids: llama_prefill(llm, ids)))
            row = {"arch": arch, "what": f"prefill {T} tok/s", **{k: T / v for k, v in best.items()}}
            rows.append(row)
            say(
                f"{arch} prefill {T}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items() if k not in ("arch", "what"))
            )

        ids = torch.randint(0, vocab_real, (16,), generator=g).tolist()
        ours_decode(model, ids, 2)  # warm-up: the decode path builds its weight copies once
        best = {"statelab": math.inf} | {q: math.inf for q in engines}
        for _ in range(args.repeats):
            best["statelab"] = min(best["statelab"], ours_decode(model, ids, args.decode_steps))
            for q, llm in engines.items():
                best[q] = min(best[q], llama_decode(llm, ids, args.decode_steps))
        row = {"arch": arch, "what": "decode ms/token", **{k: v * 1e3 for k, v in best.items()}}
        rows.append(row)
        say(f"{arch} decode: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row.items() if k not in ("arch", "what")))
        for r in rows:
            r["agreement"] = agree
        del engines
    return rows


def table(rows: list[dict], quants: list[str]) -> str:
    """One row per measure; the speed-up of statelab over each llama.cpp type (> 1: statelab is faster)."""
    head = "| arch | measure | statelab fp32 | " + " | ".join(f"llama.cpp {q}" for q in quants)
    head += " | statelab speed-up vs " + ", ".join(quants) + " | check |"
    out = [head, "|" + "---|" * (5 + len(quants))]
    for r in rows:
        decode = r["what"].startswith("decode")
        ups = ", ".join(f"{(r[q] / r['statelab'] if decode else r['statelab'] / r[q]):.2f}" for q in quants)
        cells = " | ".join(f"{r[q]:.1f}" if decode else f"{r[q]:.0f}" for q in quants)
        ours = f"{r['statelab']:.1f}" if decode else f"{r['statelab']:.0f}"
        a = r["agreement"]
        note = f"{a['tokens']} greedy tokens agree with f32, last logits within {a['max_logit_diff']:.1e}"
        out.append(f"| {r['arch']} | {r['what']} | {ours} | {cells} | {ups} | {note} |")
    return "\n".join(out)


def main() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mamba1,mamba2")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=768, help="d_model (768: 130m-sized)")
    p.add_argument("--lengths", default="512,2048")
    p.add_argument("--quants", default="f32,f16,q8_0", help="GGUF types; f32 is always included (the check)")
    p.add_argument("--threads", type=int, default=cores, help="threads of both engines")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--check-prompt", type=int, default=32, help="prompt length of the agreement check")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared before timing")
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.quants = ["f32"] + [q for q in args.quants.split(",") if q and q != "f32"]
    torch.set_num_threads(args.threads)
    ensure_llama_cpp()
    rows: list[dict] = []
    refused = []  # architectures whose GGUF llama.cpp would not load
    for arch in [a.strip() for a in args.arch.split(",") if a.strip()]:
        try:
            rows += bench_arch(arch, args, lambda msg: print(msg, flush=True))
        except NotLoaded as e:
            print(f"{arch}: llama.cpp did not load the converted GGUF ({e}); no row for it", flush=True)
            refused.append(arch)
    if not rows:
        raise SystemExit("llama.cpp loaded no converted model; nothing to compare")
    text = table(rows, args.quants)
    if refused:
        text += f"\n\nllama.cpp did not load the GGUF its converter wrote for: {', '.join(refused)}."
    print(text)
    if args.no_write:
        return
    import llama_cpp

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()} ({cores} cores), {args.threads} threads for both, "
        f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__} (built with {CMAKE_ARGS}); random "
        f"weights, {args.layers} layers x {args.width} wide, vocabulary {VOCAB}; best of {args.repeats} interleaved "
        f"rounds; prefill with logits for every token; statelab decode through model.step. Load average at the end "
        f"{load}."
    )
    write_section(SECTION, header + "\n\n" + text + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```")


if __name__ == "__main__":
    main()
