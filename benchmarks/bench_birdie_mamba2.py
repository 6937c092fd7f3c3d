"""Training speed of the Birdie study's Mamba-2 stack: the chunked segment scan against the per-step linear scan.

One training step (forward, backward, AdamW) of ``BirdieLM(arch="mamba2")`` on packed rows of the objective sampler
(8 x 256, several samples per row with their prefixes), one torch thread, for the mixer's ``"chunk"`` backend (the
default: SSD chunks with segment resets) and its ``"parallel"`` backend (the baseline measured in the same run: the
linear scan over the flattened ``[H * P * N]`` state), causal and with alternating bidirectional-prefix layers.
Prints tokens/s and the speed-up, and writes the table to benchmarks/RESULTS.md under "## Birdie Mamba-2 training".

Run: ``.venv/bin/python benchmarks/bench_birdie_mamba2.py`` (about 2 minutes; on a quiet machine).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import torch

from _results import RESULTS, cpu_name, write_section  # benchmarks/ is on sys.path when a script runs
from statelab.experiments.birdie import load_corpus
from statelab.layers.protocol import Segments
from statelab.models.birdie_models import BirdieLM, BirdieModelConfig
from statelab.objectives import VOCAB, ObjectiveSampler, birdie_grid
from statelab.objectives.packing import IGNORE

SECTION = "## Birdie Mamba-2 training"
SIZES = ((64, 2), (128, 4))


def step_seconds(d_model: int, n_layer: int, bidirectional: bool, backend: str, batch, steps: int) -> float:
    torch.manual_seed(0)
    model = BirdieLM(
        BirdieModelConfig(
            arch="mamba2", vocab_size=VOCAB.size, d_model=d_model, n_layer=n_layer, bidirectional=bidirectional
        )
    )
    for block in model.blocks:
        block.mixer.backend = backend
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        logits, _ = model(batch.tokens, segments=Segments(batch.seq_start, batch.is_prefix))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    torch.set_num_threads(1)
    sampler = ObjectiveSampler(birdie_grid(256), load_corpus()[:200_000], 256, seed=0)
    batch = sampler.next_batch(8)
    tokens = int(batch.tokens.numel())
    rows = []
    for d, n in SIZES:
        for bi in (False, True):
            base_steps = 2 if d >= 128 else 4
            slow = step_seconds(d, n, bi, "parallel", batch, base_steps)
            fast = step_seconds(d, n, bi, "chunk", batch, 10)
            rows.append((d, n, bi, tokens / slow, tokens / fast, slow / fast))
            print(
                f"{d}x{n} {'bidirectional' if bi else 'causal'}: parallel {tokens / slow:,.0f} tok/s, "
                f"chunk {tokens / fast:,.0f} tok/s, {slow / fast:.1f}x",
                flush=True,
            )
    lines = [
        f"{datetime.now(UTC):%Y-%m-%d}, {cpu_name()}, torch {torch.__version__}, one thread; one training step "
        f"(forward, backward, AdamW) on 8 x 256 packed objective rows ({tokens:,} tokens).",
        "",
        "| model | layers | linear scan (parallel), tok/s | chunked segment scan, tok/s | speed-up |",
        "|---|---|---|---|---|",
    ]
    for d, n, bi, slow, fast, ratio in rows:
        kind = "alternating bidirectional" if bi else "causal"
        lines.append(f"| Mamba-2 {d} x {n} | {kind} | {slow:,.0f} | {fast:,.0f} | {ratio:.1f}x |")
    write_section(SECTION, "\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
