"""``/metrics`` for ``statelab serve``: request counts, decode batch sizes, prefix-cache use, in Prometheus' text
format (version 0.0.4) or as JSON.

Every name starts with ``statelab_``. Counters end in ``_total``; the decode batch size is a histogram of rows per
step (``statelab_decode_batch_rows``), so "were requests batched?" is ``..._sum / ..._count > 1`` or a non-zero
bucket above 1.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from statelab.serve.engine import BATCH_BUCKETS

__all__ = ["RequestCounts", "metrics_json", "render_prometheus"]


class RequestCounts:
    """HTTP responses by route and status code (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()

    def add(self, route: str, status: int) -> None:
        with self._lock:
            self._counts[(route, status)] += 1

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"route": r, "status": s, "count": n} for (r, s), n in sorted(self._counts.items())]


def metrics_json(requests: RequestCounts, engine: Any) -> dict[str, Any]:
    """Everything ``/metrics?format=json`` reports: ``requests``, ``engine`` (with ``active_rows`` and
    ``waiting_rows``) and ``prefix_cache``."""
    eng = engine.stats.snapshot()
    eng["active_rows"] = engine.active_rows
    eng["waiting_rows"] = engine.waiting_rows
    eng["max_batch"] = engine.max_batch
    read, cached = eng["prompt_tokens_read"], eng["prompt_tokens_cached"]
    eng["prompt_token_hit_rate"] = cached / (read + cached) if read + cached else 0.0
    return {"requests": requests.snapshot(), "engine": eng, "prefix_cache": engine.cache.stats()}


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(data: dict[str, Any]) -> str:
    """``metrics_json``'s content in Prometheus' text format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP statelab_{name} {help_}")
        lines.append(f"# TYPE statelab_{name} {kind}")
        for labels, value in samples:
            lines.append(f"statelab_{name}{labels} {float(value):.17g}")

    req = data["requests"]
    metric(
        "http_requests_total",
        "counter",
        "HTTP responses by route and status code.",
        [(f'{{route="{_esc(r["route"])}",status="{r["status"]}"}}', r["count"]) for r in req],
    )
    e = data["engine"]
    metric("active_rows", "gauge", "Rows (choices) being decoded now.", [("", e["active_rows"])])
    metric("waiting_rows", "gauge", "Rows waiting for a free slot in the batch.", [("", e["waiting_rows"])])
    metric(
        "max_batch_rows", "gauge", "Most rows decoded together (statelab serve --max-batch).", [("", e["max_batch"])]
    )
    hist = e["decode_batch_histogram"]
    cum, samples = 0, []
    for b in [*map(str, BATCH_BUCKETS), "+Inf"]:
        cum += hist[b]
        samples.append((f'_bucket{{le="{b}"}}', cum))
    samples += [("_sum", e["decode_rows"]), ("_count", e["decode_steps"])]
    metric("decode_batch_rows", "histogram", "Rows decoded together in one step.", samples)
    metric("decode_batch_rows_max", "gauge", "Largest decode batch so far.", [("", e["decode_batch_max"])])
    metric("decode_seconds_total", "counter", "Time spent in decode steps.", [("", e["decode_seconds"])])
    metric("prefill_batches_total", "counter", "Ragged prefill passes.", [("", e["prefill_batches"])])
    metric("prefill_seconds_total", "counter", "Time spent reading prompts.", [("", e["prefill_seconds"])])
    metric("prompt_tokens_total", "counter", "Prompt tokens of admitted prompts.", [("", e["prompt_tokens"])])
    metric(
        "prompt_tokens_read_total", "counter", "Prompt tokens run through the model.", [("", e["prompt_tokens_read"])]
    )
    metric(
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens taken from the prefix cache instead of being read.",
        [("", e["prompt_tokens_cached"])],
    )
    metric(
        "prompt_token_hit_rate",
        "gauge",
        "Cached prompt tokens / (cached + read) prompt tokens.",
        [("", e["prompt_token_hit_rate"])],
    )
    metric("completion_tokens_total", "counter", "Tokens generated.", [("", e["completion_tokens"])])
    metric("rows_admitted_total", "counter", "Rows that started (prompt read).", [("", e["rows_admitted"])])
    metric(
        "rows_finished_total",
        "counter",
        "Rows that finished, by reason.",
        [(f'{{reason="{_esc(k)}"}}', v) for k, v in sorted(e["rows_finished"].items())],
    )
    metric(
        "rows_cancelled_total", "counter", "Rows dropped because their client went away.", [("", e["rows_cancelled"])]
    )
    metric("rows_failed_total", "counter", "Rows ended by an engine error or shutdown.", [("", e["rows_failed"])])
    c = data["prefix_cache"]
    metric("prefix_cache_hits_total", "counter", "Prompt blocks found in the prefix cache.", [("", c["hits"])])
    metric("prefix_cache_misses_total", "counter", "Prompt blocks not found in the prefix cache.", [("", c["misses"])])
    metric("prefix_cache_hit_rate", "gauge", "hits / (hits + misses), over full blocks.", [("", c["hit_rate"])])
    metric("prefix_cache_bytes", "gauge", "Bytes held by cached states and logits.", [("", c["bytes"])])
    metric("prefix_cache_max_bytes", "gauge", "Budget of the prefix cache.", [("", c["max_bytes"])])
    metric("prefix_cache_entries", "gauge", "Cached block-boundary states.", [("", c["entries"])])
    metric("prefix_cache_block_tokens", "gauge", "Tokens between cached states.", [("", c["block_tokens"])])
    metric("prefix_cache_evictions_total", "counter", "Entries evicted to stay in budget.", [("", c["evictions"])])
    metric(
        "prefix_cache_short_prompts_total",
        "counter",
        "Prompts shorter than one block (they can never hit).",
        [("", c["prompts_shorter_than_a_block"])],
    )
    return "\n".join(lines) + "\n"
