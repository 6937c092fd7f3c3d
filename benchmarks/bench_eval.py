"""Evaluation speed: a multiple-choice task through lm-eval, ``--model statelab`` vs lm-eval's ``hf`` model.

Both run the same transformers checkpoint through lm-eval's own evaluator (``lm_eval.evaluator.evaluate``, in this
process, so lm-eval's start-up is not timed), on the same local task: ``--items`` (500) generated multiple-choice
items, each a context of 60-160 bytes and 4 choices of 10-40 bytes, read with one byte-level tokenizer
(``tokenizer.json``: ids 0-255 are the bytes, as statelab's byte tokenizer) that both models use. Two checkpoints,
each saved to a temporary directory:

* a random 130m-sized ``MambaForCausalLM`` (24 layers, d_model 768, vocabulary 50280; transformers' own init);
* statelab's embedded model written in Hugging Face format with ``model.save_pretrained``.

Rows per checkpoint, items/s (wall) and CPU seconds per item:

* ``hf``: lm-eval's ``HFLM`` with ``batch_size`` ``--hf-batch`` (16): every choice is a full pass over context +
  choice;
* ``statelab`` batched: ``StatelabLM`` with ``--batch_size auto`` (a 4096-token budget per pass): each context is
  read once and its choices run from its state, in ragged batches;
* ``statelab`` per item: ``batch_size=1`` (one row per pass; contexts are still read once).

The ratios (hf time / statelab time) are taken in the same run, because the machine is shared. As a check that
the two models computed the same thing, the table gives both accuracies and the largest difference between their
log-likelihoods of the same (context, choice) pairs. Results go to ``benchmarks/RESULTS.md`` under
``## Evaluation``.

    python benchmarks/bench_eval.py                  # full run (tens of minutes on 2 cores)
    python benchmarks/bench_eval.py --quick          # 16 items, 2-layer 130m-width model: a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from _results import RESULTS, cpu_name, write_section  # benchmarks/ is on sys.path when a script runs

SECTION = "## Evaluation"
TASK = "statelab_bench_mc"


# ---- data and checkpoints ---------------------------------------------------------------------------------------
def write_task(directory: Path, n_items: int, seed: int = 0) -> Path:
    """A JSONL of ``n_items`` multiple-choice items made of real words, and its lm-eval task YAML."""
    import statelab

    words = (Path(statelab.__file__).parent / "data" / "tasks" / "words.txt").read_text().split()
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        n = rng.randint(lo, hi)
        out = ""
        while len(out) < n:
            out += rng.choice(words) + " "
        return out[:n].strip()

    data = directory / "items.jsonl"
    with data.open("w") as f:
        for _ in range(n_items):
            item = {"context": text(60, 160), "choices": [text(10, 40) for _ in range(4)], "answer": rng.randrange(4)}
            f.write(json.dumps(item) + "\n")
    (directory / "task.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n'
    )
    return data


def _byte_chars() -> list[str]:
    """The printable character that byte-level BPE tokenizers write for each byte 0-255 (printable Latin-1 bytes
    stand for themselves; the others are moved to code points from 256 up, in byte order)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def save_byte_tokenizer(directory: Path) -> None:
    """A transformers fast tokenizer whose ids are statelab's byte tokenizer's: bytes 0-255, PAD 256, BOS 257,
    EOS 258 (``tokenizer.json`` + ``tokenizer_config.json``, read by both lm-eval's ``hf`` model and statelab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(_byte_chars())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|pad|>", "<|bos|>", "<|eos|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")
    fast.save_pretrained(directory)


def random_130m(directory: Path, layers: int) -> Path:
    """A random 130m-sized ``MambaForCausalLM`` (transformers' init, seed 0) saved with the byte tokenizer."""
    import transformers

    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = transformers.MambaConfig(
            vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=layers, expand=2, conv_kernel=4
        )
        transformers.MambaForCausalLM(cfg).save_pretrained(directory)
    save_byte_tokenizer(directory)
    return directory


def embedded_as_hf(directory: Path) -> Path:
    """statelab's embedded model written in Hugging Face format, with the byte tokenizer."""
    import statelab

    statelab.load_model("embedded").save_pretrained(directory)
    save_byte_tokenizer(directory)
    return directory


def check_tokenizers_agree(directory: Path, data: Path) -> None:
    """The saved tokenizer gives statelab's byte ids on the task's texts (so both models read the same ids)."""
    from statelab.models.tokenizer import ByteTokenizer, load_tokenizer

    hf, byte = load_tokenizer(directory), ByteTokenizer()
    for line in data.read_text().splitlines()[:20]:
        item = json.loads(line)
        for t in [item["context"], *item["choices"]]:
            if hf.encode(t) != byte.encode(t):
                raise SystemExit(f"the saved tokenizer does not give byte ids for {t!r}")


# ---- runs -------------------------------------------------------------------------------------------------------
def run_lm_eval(lm, task_dir: Path) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, results) of lm-eval's evaluator on the task with ``lm``."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(task_dir), include_defaults=False).load([TASK])
    w0, c0 = time.perf_counter(), time.process_time()
    res = evaluate(lm, tasks, bootstrap_iters=0, log_samples=True, verbosity="WARNING")
    return time.perf_counter() - w0, time.process_time() - c0, res


def loglikelihoods(res: dict) -> list[float]:
    """Every (context, choice) log-likelihood of a run, in doc and choice order."""
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    return [float(r[0]) for s in samples for r in s["filtered_resps"]]


def bench_checkpoint(name: str, directory: Path, task_dir: Path, n_items: int, args, say) -> list[dict]:
    from lm_eval.models.huggingface import HFLM

    from statelab.eval.lm_eval_model import StatelabLM

    runs = [
        ("hf", f"batch_size {args.hf_batch}", lambda: HFLM(pretrained=str(directory), batch_size=args.hf_batch,
                                                            device="cpu", dtype="float32")),
        ("statelab", "batched (token budget 4096)", lambda: StatelabLM(pretrained=str(directory), batch_size="auto")),
        ("statelab", "per item (batch_size 1)", lambda: StatelabLM(pretrained=str(directory), batch_size=1)),
    ]  # fmt: skip
    rows, lls = [], {}
    for model, how, make in runs:
        say(f"{name}: {model} {how}")
        lm = make()
        wall, cpu, res = run_lm_eval(lm, task_dir)
        lls[(model, how)] = loglikelihoods(res)
        rows.append({
            "checkpoint": name, "model": model, "how": how, "items": n_items, "seconds": wall,
            "items_per_s": n_items / wall, "cpu_s_per_item": cpu / n_items, "acc": res["results"][TASK]["acc,none"],
        })  # fmt: skip
        del lm
    hf = lls[("hf", runs[0][1])]
    for r in rows:
        r["speedup_vs_hf"] = rows[0]["seconds"] / r["seconds"]
        r["max_abs_ll_diff_vs_hf"] = max(abs(a - b) for a, b in zip(hf, lls[(r["model"], r["how"])], strict=True))
    return rows


# ---- report -----------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    out = [
        "| checkpoint | model | how | items/s | CPU s / item | speed-up vs hf | acc | max abs Δ log-lik vs hf |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['checkpoint']} | {r['model']} | {r['how']} | {r['items_per_s']:.2f} | {r['cpu_s_per_item']:.3f} | "
            f"{r['speedup_vs_hf']:.2f} | {r['acc']:.3f} | {r['max_abs_ll_diff_vs_hf']:.1e} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--layers", type=int, default=24, help="layers of the random 130m-sized model")
    p.add_argument("--hf-batch", type=int, default=16, help="batch_size of lm-eval's hf model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoints", default="mamba-130m,embedded", help="comma-separated: mamba-130m,embedded")
    p.add_argument("--quick", action="store_true", help="16 items, 2-layer 130m-width model: a smoke run")
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args()
    if args.quick:
        args.items, args.layers = 16, 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    from rich.console import Console

    console = Console()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, console.status("benchmarking") as status:
        os.environ.setdefault("HF_HOME", str(Path(tmp) / "hf"))  # the json dataset cache stays in the temp dir
        task_dir = Path(tmp) / "task"
        task_dir.mkdir()
        data = write_task(task_dir, args.items)
        makers = {"mamba-130m": lambda d: random_130m(d, args.layers), "embedded": embedded_as_hf}
        for name in [c.strip() for c in args.checkpoints.split(",") if c.strip()]:
            if name not in makers:
                raise SystemExit(f"unknown checkpoint {name!r}; choose from {', '.join(makers)}")
            directory = makers[name](Path(tmp) / name)
            check_tokenizers_agree(directory, data)

            def say(msg: str) -> None:
                status.update(msg)
                console.print(msg)

            rows += bench_checkpoint(name, directory, task_dir, args.items, args, say)
            report(rows, args, console)  # after each checkpoint, so a long run leaves results behind


def report(rows: list[dict], args, console) -> None:
    text = table(rows)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    import lm_eval

    header = (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()} ({os.cpu_count()} cores), torch "
        f"{torch.__version__}, lm-eval {lm_eval.__version__}, {args.threads} threads, fp32. {args.items} "
        f"multiple-choice items (context 60-160 bytes, 4 choices of 10-40 bytes, byte-level tokenizer) through "
        f"lm-eval's evaluator; mamba-130m is a random {args.layers}-layer MambaForCausalLM of 130m width"
        f"{', quick run' if args.quick else ''}. Load average at the end {load}: the cores were shared with other "
        "jobs, so absolute figures are noisy; the ratios compare runs made back to back in the same process."
    )
    console.print(text)
    if not args.no_write:
        write_section(SECTION, header + "\n\n" + text + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```")
        console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
