"""How many intra-op threads torch gets: one rule, chosen once per process by each entry point, never by an op.

Threads pay off only when each operation is big enough to split: every op with several threads ends in a join,
and a model's per-token ops are small (a 130m-sized Mamba layer runs about twenty of them per token). Below a work
size the joins cost more than the split saves, and on a machine whose cores are busy with other jobs a thread
that is descheduled stalls every join (measured: ``statelab soup run`` on a small user checkpoint was ~10x slower
with 2 threads than with 1 while another process held one of the 2 cores). So:

* **work** of a call = the model's matrix parameters per layer x the tokens one call reads (``batch x length`` for
  a prefill, ``batch`` for a decode step): the size of one layer's matrix products, which is what threads split;
* **rule** (:func:`choose_threads`): 1 thread when the work is below :data:`MIN_PARALLEL_WORK`, else the cores the
  process may use that are not busy (the CPUs in the process's affinity mask, less the 1-minute load
  average of the machine, at least 1);
* an explicit count (``--threads``, a config's ``threads``, ``STATELAB_THREADS``) always wins.

**The threshold** comes from ``benchmarks/bench_threads.py``, which times decode steps and prefills of several
model sizes at 1 thread and at every core and prints where more threads start to win. What it showed so far
(indicative: a 2-core AMD EPYC, AVX2, with a training job on one core and a 1-minute load average of 5-6): two
threads were 7 to 100 times slower than one for every call tried (the embedded model and 256-wide 6-layer Mamba-1
and Mamba-2, decode batches of 1 and 8, prefills of 64 and 256 tokens), which is why busy cores are subtracted.
On the idle machine (2026-12-02, ``benchmarks/RESULTS.md`` section Threads) two threads never lost by more than 1%
and won wherever a call had work to split: decode steps of batch 1 gained 0-4% at every size (work 0.1M-3.7M),
decode batches of 8 gained 9-17%, prefills of 64 tokens 3-51% and of 1,024 tokens 58-83%; the script suggested a
threshold of about 1.2M. :data:`MIN_PARALLEL_WORK` is set a little above the batch-1 decode steps of a 130m-sized
layer (3.7M), where a second thread buys at most 3% for a whole core: single-row decoding stays on one thread,
prefills and batched decoding use the free cores.

No op in statelab changes the thread count; :func:`apply_thread_rule` is called by the command line, the
experiments and the server, once, after the model is loaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = [
    "MIN_PARALLEL_WORK",
    "COMMAND_WORK_TOKENS",
    "available_cores",
    "model_work",
    "choose_threads",
    "apply_thread_rule",
]

# matrix parameters per layer x tokens per call below which one thread is faster (benchmarks/bench_threads.py)
MIN_PARALLEL_WORK = 4_000_000
# tokens per call assumed by commands that read prompts in batches without knowing their sizes in advance
COMMAND_WORK_TOKENS = 1024


def available_cores() -> int:
    """Cores this process may run on and that are not busy: the affinity mask's size (or ``os.cpu_count()``),
    less the machine's 1-minute load average rounded down, at least 1.

    The load average counts runnable processes, this one included once it runs; it is read before the heavy work
    starts, so it measures the others.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, cores - busy))


def model_work(model: Any, work_tokens: int) -> int:
    """``work_tokens`` x the matrix parameters of one layer of ``model`` (every ``nn.Linear`` weight divided by the
    number of layers; models without ``config.n_layer`` count as one layer)."""
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    layers = getattr(getattr(model, "config", None), "n_layer", None) or 1
    return int(work_tokens) * max(1, params // layers)


def choose_threads(model: Any, work_tokens: int) -> int:
    """The rule of this module: 1 thread when ``model_work(model, work_tokens) < MIN_PARALLEL_WORK``, else
    :func:`available_cores`. Models off the CPU get torch's current count (threads only feed the host side)."""
    device = getattr(model, "device", torch.device("cpu"))
    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    if model_work(model, work_tokens) < MIN_PARALLEL_WORK:
        return 1
    return available_cores()


def apply_thread_rule(model: Any, work_tokens: int, threads: int | None = None) -> int:
    """Set torch's intra-op threads for this process and return the count: ``threads`` when given, else the
    ``STATELAB_THREADS`` environment variable when set, else :func:`choose_threads`."""
    if threads is None:
        env = os.environ.get("STATELAB_THREADS", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise ValueError(f"STATELAB_THREADS must be a positive integer, got {env!r}")
            threads = int(env)
    if threads is None:
        threads = choose_threads(model, work_tokens)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
