"""Scoring stored states against a query: exact cosine over raw SSM states (features cached in memory), and the
stored prompts of the hits."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

import torch

from statelab.state.core import State
from statelab.state.search import layer_features
from statelab.state.store.blobs import Blobs
from statelab.state.store.db import IN_CHUNK
from statelab.state.store.rows import Hit

__all__ = ["FeatureCache", "exact_hits", "with_prompts", "unit"]


def unit(f: torch.Tensor) -> torch.Tensor:
    """``f`` divided by its norm (a zero vector stays zero)."""
    return f / f.norm().clamp_min(torch.finfo(torch.float32).tiny)


class FeatureCache:
    """Vectors of stored states (unit-normalised raw features, retrieval vectors), kept in memory up to
    ``limit_bytes``."""

    def __init__(self, blobs: Blobs, limit_bytes: int) -> None:
        self._blobs = blobs
        self._limit = limit_bytes
        self._cache: dict[tuple[str, tuple], torch.Tensor] = {}

    def clear(self) -> None:
        self._cache.clear()

    def get(self, blob: str, layers: list[int], label: str) -> torch.Tensor:
        """The features ``[F]`` of ``layers`` of a blob's state; ``label`` names its entry in errors."""
        return self.cached(blob, tuple(layers), lambda: unit(layer_features(self._blobs.load(blob, label), layers)[0]))

    def cached(self, blob: str, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The vector ``key`` of a blob: held in memory, or ``compute()`` (kept if it fits in the limit)."""
        f = self._cache.get((blob, key))
        if f is None:
            f = compute()
            used = sum(t.numel() * 4 for t in self._cache.values())
            if used + f.numel() * 4 <= self._limit:
                self._cache[(blob, key)] = f
        return f


def exact_hits(
    query: State, rows: Sequence[sqlite3.Row], layers: list[int], k: int, features: FeatureCache
) -> list[Hit]:
    """The ``k`` best of ``rows`` (``id, name, task, blob``) by exact cosine of their raw features with the query's,
    best first: one dot product per entry, no copy of the features."""
    q = unit(layer_features(query, layers)[0])
    scores = [float(torch.dot(q, features.get(r["blob"], layers, repr(r["name"])))) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -scores[i])[:k]
    return [Hit(rows[i]["name"], rows[i]["id"], scores[i], rows[i]["task"]) for i in order]


def with_prompts(db: sqlite3.Connection, hits: list[Hit]) -> list[Hit]:
    """The hits with their entries' prompts, read for the returned hits only (a large store's prompts are never
    all loaded)."""
    prompts: dict[int, str | None] = {}
    for start in range(0, len(hits), IN_CHUNK):
        ids = [h.id for h in hits[start : start + IN_CHUNK]]
        marks = ",".join("?" * len(ids))
        prompts.update(
            (r["id"], r["prompt"]) for r in db.execute(f"SELECT id, prompt FROM entries WHERE id IN ({marks})", ids)
        )
    return [Hit(h.name, h.id, h.score, h.task, prompts.get(h.id)) for h in hits]
