"""Finding similar states: layer features, exact cosine, random-projection sketches and vector indexes.

Similarity follows State Soup (arXiv 2406.08423, §2.5 of the statelab spec): the cosine between the flattened SSM
states of chosen layers,

    sim(q, s) = <vec q^(ℓ), vec s^(ℓ)> / (||vec q^(ℓ)|| ||vec s^(ℓ)||),

where ``vec x^(ℓ)`` concatenates the SSM states of the layers ``ℓ`` (default: the middle third of the layers).

Raw features are large (130m Mamba-1: 8 layers × 1536 × 16 = 196,608 floats), so large stores compare *sketches*:
a signed feature-hashing projection (CountSketch; Charikar, Chen & Farach-Colton 2002; Weinberger et al.,
arXiv:0902.2206) to ``dim`` floats, ``S x = Σ_i σ(i) x_i e_{h(i)}`` with bucket ``h`` and sign ``σ`` drawn from a
seeded SplitMix64 stream. It preserves inner products in expectation, costs O(F) per state and needs no
``F × dim`` matrix. Bucket and sign are a pure function of ``(seed, i)``, so a sketch computed today matches one
computed years later on another machine.

Vector indexes share one small interface (:class:`VectorIndex`): ``add(ids, vectors)``, ``search(queries, k)``,
``save`` / ``load``, ``len``. :class:`ExactIndex` is brute force in torch (fp32, batched); :class:`FaissIndex`
(HNSW, inner product), :class:`FaissIVFIndex` (IVF-Flat) and :class:`UsearchIndex` (HNSW) are approximate and
optional (``pip install statelab[ann]``).
Vectors are unit-normalised before they reach an index, so inner product equals cosine.
"""

from __future__ import annotations

import io
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from statelab.errors import StateMismatchError, StoreError
from statelab.state.core import State

__all__ = [
    "middle_third",
    "resolve_layers",
    "layer_features",
    "cosine_scores",
    "cosine_scores_naive",
    "CountSketch",
    "count_sketch_naive",
    "VectorIndex",
    "ExactIndex",
    "FaissIndex",
    "FaissIVFIndex",
    "UsearchIndex",
    "INDEX_KINDS",
    "make_index",
    "load_index",
    "index_from_bytes",
    "recall_at_k",
]


def middle_third(num_layers: int) -> list[int]:
    """The default search layers: ``[L // 3, L - L // 3)``, e.g. layers 8..15 of 24 (all layers when L < 3)."""
    return list(range(num_layers // 3, num_layers - num_layers // 3))


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """Sorted, de-duplicated layer indices (negative ones count from the end); ``None`` gives the middle third."""
    if layers is None:
        return middle_third(num_layers)
    out = set()
    for i in layers:
        if not isinstance(i, int | np.integer) or not -num_layers <= int(i) < num_layers:
            raise StateMismatchError(f"layer {i!r} out of range for a {num_layers}-layer state")
        out.add(int(i) % num_layers)
    if not out:
        raise StateMismatchError("layers must name at least one layer")
    return sorted(out)


def layer_features(state: State, layers: Sequence[int] | None = None) -> torch.Tensor:
    """Flattened SSM state of ``layers``: ``ssm [L, B, ...] -> [B, F]`` in fp32, F = len(layers) · prod(...)."""
    idx = resolve_layers(layers, state.num_layers)
    ssm = state.ssm[idx].to(torch.float32)  # [l, B, ...]
    return ssm.transpose(0, 1).reshape(state.batch_size, -1)


def cosine_scores_naive(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Reference cosine ``[Q, F] x [M, F] -> [Q, M]``: one pair at a time, fp64. A zero vector scores 0."""
    out = torch.zeros(queries.shape[0], keys.shape[0], dtype=torch.float64)
    for a in range(queries.shape[0]):
        q = queries[a].double()
        for b in range(keys.shape[0]):
            s = keys[b].double()
            den = q.norm() * s.norm()
            out[a, b] = (q @ s) / den if den > 0 else 0.0
    return out


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def cosine_scores(queries: torch.Tensor, keys: torch.Tensor, *, block: int = 65536) -> torch.Tensor:
    """Cosine ``[Q, F] x [M, F] -> [Q, M]`` in fp32: normalise, then one matmul per block of ``block`` keys."""
    q = _normalize(queries)
    return torch.cat(
        [q @ _normalize(keys[i : i + block]).T for i in range(0, keys.shape[0], block)] or [torch.zeros(q.shape[0], 0)],
        dim=1,
    )


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (wrapping arithmetic): a fixed, platform-independent hash."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hash_buckets(n_features: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket ``h(i) in [0, dim)`` and sign ``σ(i) in {-1, +1}`` for ``i < n_features``."""
    base = _splitmix64(np.array([seed], dtype=np.uint64) & _M64)
    z = _splitmix64(np.arange(n_features, dtype=np.uint64) ^ base)
    bucket = (z % np.uint64(dim)).astype(np.int64)
    sign = np.where((z >> np.uint64(63)) == 1, -1.0, 1.0).astype(np.float32)
    return bucket, sign


def count_sketch_naive(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Reference CountSketch ``[B, F] -> [B, dim]`` (unit rows): one coordinate at a time, fp64."""
    bucket, sign = _hash_buckets(features.shape[1], dim, seed)
    out = torch.zeros(features.shape[0], dim, dtype=torch.float64)
    for b in range(features.shape[0]):
        for i in range(features.shape[1]):
            out[b, int(bucket[i])] += float(sign[i]) * float(features[b, i])
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-300)


class CountSketch:
    """Signed feature hashing ``[B, F] -> [B, dim]``, rows unit-normalised (see module doc).

    Args:
        dim: sketch dimension.
        seed: selects the hash; recorded by the store so every sketch in it uses the same projection.
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        if dim < 1:
            raise StoreError(f"sketch dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.seed = int(seed)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n_features not in self._cache:
            bucket, sign = _hash_buckets(n_features, self.dim, self.seed)
            self._cache[n_features] = (torch.from_numpy(bucket), torch.from_numpy(sign))
        return self._cache[n_features]

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        bucket, sign = self._table(features.shape[1])
        x = features.to(torch.float32)
        out = torch.zeros(x.shape[0], self.dim, dtype=torch.float32, device=x.device)
        out.index_add_(1, bucket.to(x.device), x * sign.to(x.device))
        return _normalize(out)


def recall_at_k(found: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / |truth_q| for id arrays ``[Q, k]`` (``-1`` marks no result)."""
    found, truth = np.asarray(found), np.asarray(truth)
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


class VectorIndex(ABC):
    """Top-k inner-product search over unit vectors ``[n, dim]`` with int64 ids.

    ``search(queries [Q, dim], k) -> (scores [Q, k'], ids [Q, k'])`` with ``k' = min(k, len)``, best first.
    """

    kind: str = ""

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)

    def _check(self, vectors: torch.Tensor | np.ndarray) -> np.ndarray:
        v = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise StoreError(f"{self.kind} index expects vectors [n, {self.dim}], got {list(v.shape)}")
        return v

    @abstractmethod
    def add(self, ids: Sequence[int] | np.ndarray, vectors: torch.Tensor | np.ndarray) -> None: ...

    @abstractmethod
    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` (the caller makes the write atomic by renaming)."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | os.PathLike, dim: int) -> VectorIndex: ...

    @classmethod
    def from_bytes(cls, data: bytes, dim: int) -> VectorIndex:
        """Read an index from the bytes its ``save`` wrote (so a caller can verify exactly what is parsed)."""
        return _load_ids_and_vectors_index(cls, data, dim)


class _ArrayFileIndex(VectorIndex):
    """An index whose file holds its ids and vectors (:func:`_save_ids_and_vectors`) and is rebuilt from them on
    load. Subclasses keep ``_ids`` and ``_vecs`` current after ``_flush()``."""

    def save(self, path) -> None:
        self._flush()
        _save_ids_and_vectors(path, self._ids, np.asarray(self._vecs))

    @classmethod
    def load(cls, path, dim):
        index = cls(dim)
        index.add(*_load_ids_and_vectors(path))
        return index


class ExactIndex(_ArrayFileIndex):
    """Brute force in torch: fp32 matmul over all vectors, then ``topk``. Exact; O(n · dim) per query."""

    kind = "exact"

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._ids = np.zeros(0, dtype=np.int64)
        self._vecs = torch.zeros(0, dim)
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []

    def _flush(self) -> None:
        if self._pending:
            self._ids = np.concatenate([self._ids, *[i for i, _ in self._pending]])
            self._vecs = torch.cat([self._vecs, *[v for _, v in self._pending]])
            self._pending.clear()

    def add(self, ids, vectors) -> None:
        v = self._check(vectors)
        self._pending.append((np.asarray(ids, dtype=np.int64).reshape(-1), torch.from_numpy(v.copy())))

    def __len__(self) -> int:
        return len(self._ids) + sum(len(i) for i, _ in self._pending)

    def search(self, queries, k):
        self._flush()
        q = torch.from_numpy(self._check(queries))
        k = min(int(k), len(self._ids))
        if k == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        best_s, best_i = None, None
        block = 262144
        for start in range(0, len(self._ids), block):
            s = q @ self._vecs[start : start + block].T
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
            top_i = top_i + start
            if best_s is not None:
                top_s, sel = torch.cat([best_s, top_s], 1).topk(k, dim=1)
                top_i = torch.cat([best_i, top_i], 1).gather(1, sel)
            best_s, best_i = top_s, top_i
        return best_s.numpy(), self._ids[best_i.numpy()]


class FaissIndex(VectorIndex):
    """FAISS ``IndexHNSWFlat`` (inner product) inside ``IndexIDMap2``. Needs ``faiss-cpu``.

    Args:
        m: HNSW links per node. ef_construction / ef_search: candidate-list sizes when building / searching
            (larger: better recall, slower).
    """

    kind = "faiss"

    def __init__(self, dim: int, m: int = 32, ef_construction: int = 80, ef_search: int = 96) -> None:
        super().__init__(dim)
        faiss = _import("faiss", "faiss-cpu")
        hnsw = faiss.IndexHNSWFlat(self.dim, m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = ef_construction
        hnsw.hnsw.efSearch = ef_search
        self._index = faiss.IndexIDMap2(hnsw)
        self.ef_search = ef_search

    def add(self, ids, vectors) -> None:
        v = self._check(vectors)
        self._index.add_with_ids(v, np.asarray(ids, dtype=np.int64).reshape(-1))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries, k):
        q = self._check(queries)
        k = min(int(k), len(self))
        if k == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        import faiss

        faiss.downcast_index(self._index.index).hnsw.efSearch = max(self.ef_search, k)
        return _faiss_search(self._index, q, k)

    def save(self, path) -> None:
        import faiss

        faiss.write_index(self._index, str(path))

    @classmethod
    def load(cls, path, dim):
        faiss = _import("faiss", "faiss-cpu")
        return cls._around(faiss, faiss.read_index(str(path)), dim, f"{path} ")

    @classmethod
    def from_bytes(cls, data, dim):
        faiss = _import("faiss", "faiss-cpu")
        return cls._around(faiss, faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), dim, "")

    @classmethod
    def _around(cls, faiss, native, dim: int, where: str) -> FaissIndex:
        """The index around a faiss index just read (``where``: the file and a space, or ``""``, for the error)."""
        index = cls.__new__(cls)
        VectorIndex.__init__(index, dim)
        index._index = native
        index.ef_search = faiss.downcast_index(native.index).hnsw.efSearch
        if native.d != dim:
            raise StoreError(f"faiss index {where}has dimension {native.d}, expected {dim}")
        return index


class FaissIVFIndex(_ArrayFileIndex):
    """FAISS ``IndexIVFFlat`` (inner product): k-means cells, a query scans the ``nprobe`` nearest cells.

    Builds much faster than HNSW (one k-means on a sample, then one assignment per vector), which is what makes
    1e6-entry stores practical on a small machine. The cells are trained lazily on the first search and retrained
    whenever the index has grown 4x since, so a store that starts small and grows keeps balanced cells. ``nlist``
    is ``sqrt(n)`` cells trained on ``40 · nlist`` sampled vectors (below 1,000 vectors: one flat list, exact);
    ``nprobe`` defaults to ``max(nlist / 20, cells holding ~20,000 vectors)``. Keeps a copy of the vectors for
    retraining. Needs ``faiss-cpu``.
    """

    kind = "faiss-ivf"

    def __init__(self, dim: int, nprobe: int | None = None) -> None:
        super().__init__(dim)
        _import("faiss", "faiss-cpu")
        self.nprobe = nprobe
        self._ids = np.zeros(0, np.int64)
        self._vecs = np.zeros((0, self.dim), np.float32)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._index = None
        self._trained_n = 0

    def add(self, ids, vectors) -> None:
        v = self._check(vectors).copy()
        i = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._pending.append((i, v))
        if self._index is not None and len(self) <= 4 * self._trained_n:
            self._index.add_with_ids(v, i)

    def __len__(self) -> int:
        return len(self._ids) + sum(len(i) for i, _ in self._pending)

    def _flush(self) -> None:
        if self._pending:
            self._ids = np.concatenate([self._ids, *[i for i, _ in self._pending]])
            self._vecs = np.concatenate([self._vecs, *[v for _, v in self._pending]])
            self._pending.clear()

    def _build(self) -> None:
        import faiss

        self._flush()
        n = len(self._ids)
        if n < 1000:  # too few to train cells on; brute force is faster at this size anyway
            flat = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            flat.add_with_ids(self._vecs, self._ids)
            self._index, self._trained_n = flat, n
            return
        nlist = max(1, min(int(np.sqrt(n)), n // 40))
        rng = np.random.default_rng(0)
        sample = self._vecs[rng.choice(n, min(n, 40 * nlist), replace=False)]
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = 10
        ivf.cp.seed = 0
        ivf.train(sample)
        ivf.add_with_ids(self._vecs, self._ids)
        self._index, self._trained_n = ivf, n

    def search(self, queries, k):
        q = self._check(queries)
        k = min(int(k), len(self))
        if k == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        if self._index is None or len(self) > 4 * self._trained_n:
            self._build()

        nlist = getattr(self._index, "nlist", 1)
        # Scan at least ~20,000 vectors (cheap, and small stores have clusters spread over many cells), and at
        # least 1/20 of the cells in large ones.
        auto = max(nlist // 20, math.ceil(20_000 * nlist / max(1, len(self))))
        if nlist > 1:
            self._index.nprobe = min(nlist, self.nprobe or auto)
        return _faiss_search(self._index, q, k)


class UsearchIndex(VectorIndex):
    """usearch HNSW (inner product, f32). Needs ``usearch``.

    Args:
        connectivity: links per node. expansion_add / expansion_search: candidate-list sizes.
    """

    kind = "usearch"

    def __init__(self, dim: int, connectivity: int = 32, expansion_add: int = 80, expansion_search: int = 96):
        super().__init__(dim)
        usearch_index = _import("usearch.index", "usearch")
        self._index = usearch_index.Index(
            ndim=self.dim,
            metric="ip",
            dtype="f32",
            connectivity=connectivity,
            expansion_add=expansion_add,
            expansion_search=expansion_search,
        )

    def add(self, ids, vectors) -> None:
        v = self._check(vectors)
        self._index.add(np.asarray(ids, dtype=np.uint64).reshape(-1), v)

    def __len__(self) -> int:
        return len(self._index)

    def search(self, queries, k):
        q = self._check(queries)
        k = min(int(k), len(self))
        if k == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        m = self._index.search(q, k, threads=1 if q.shape[0] < 8 else 0)
        keys = np.asarray(m.keys).reshape(q.shape[0], -1).astype(np.int64)
        dist = np.asarray(m.distances).reshape(q.shape[0], -1)
        counts = np.asarray(m.counts).reshape(-1) if hasattr(m, "counts") else np.array([keys.shape[1]])
        mask = np.arange(keys.shape[1])[None, :] >= counts[:, None]
        keys[mask] = -1
        scores = (1.0 - dist).astype(np.float32)  # usearch "ip" distance is 1 - <q, v>
        scores[mask] = -np.inf
        return scores, keys

    def save(self, path) -> None:
        self._index.save(str(path))

    @classmethod
    def load(cls, path, dim):
        return cls._restored(str(path), dim, f"{path} ")

    @classmethod
    def from_bytes(cls, data, dim):
        return cls._restored(bytes(data), dim, "")

    @classmethod
    def _restored(cls, source: str | bytes, dim: int, where: str) -> UsearchIndex:
        """The index restored from a file name or bytes (``where``: the file and a space, or ``""``, for the
        error)."""
        usearch_index = _import("usearch.index", "usearch")
        index = cls.__new__(cls)
        VectorIndex.__init__(index, dim)
        index._index = usearch_index.Index.restore(source)
        if index._index is None or index._index.ndim != dim:
            raise StoreError(f"usearch index {where}is unreadable or not of dimension {dim}")
        return index


def _faiss_search(index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(q, k)``; with fewer than 8 queries on one OpenMP thread (a few queries gain nothing from
    OpenMP, and waking its threads costs more than the search on a busy machine)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    if q.shape[0] < 8:
        faiss.omp_set_num_threads(1)
    try:
        return index.search(q, k)
    finally:
        faiss.omp_set_num_threads(threads)


def _import(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise StoreError(f"this index needs the {package} package: pip install 'statelab[ann]'") from None


INDEX_KINDS: dict[str, type[VectorIndex]] = {
    "exact": ExactIndex,
    "faiss": FaissIndex,
    "faiss-ivf": FaissIVFIndex,
    "usearch": UsearchIndex,
}


def make_index(kind: str, dim: int) -> VectorIndex:
    """A new empty index of ``kind`` (one of ``INDEX_KINDS``) for ``dim``-dim vectors."""
    if kind not in INDEX_KINDS:
        raise StoreError(f"unknown index kind {kind!r}; known: {sorted(INDEX_KINDS)}")
    return INDEX_KINDS[kind](dim)


def load_index(kind: str, path: Path, dim: int) -> VectorIndex:
    """Read an index of ``kind`` written by its ``save``."""
    if kind not in INDEX_KINDS:
        raise StoreError(f"unknown index kind {kind!r}; known: {sorted(INDEX_KINDS)}")
    return INDEX_KINDS[kind].load(path, dim)


def index_from_bytes(kind: str, data: bytes, dim: int) -> VectorIndex:
    """Read an index of ``kind`` from the bytes its ``save`` wrote (the store verifies them first: FAISS and usearch
    trust their input, and a corrupted file can crash them or return wrong hits)."""
    if kind not in INDEX_KINDS:
        raise StoreError(f"unknown index kind {kind!r}; known: {sorted(INDEX_KINDS)}")
    return INDEX_KINDS[kind].from_bytes(data, dim)


def _load_ids_and_vectors_index(cls: type[VectorIndex], data: bytes, dim: int) -> VectorIndex:
    f = io.BytesIO(data)
    ids, vecs = np.load(f, allow_pickle=False), np.load(f, allow_pickle=False)
    index = cls(dim)
    index.add(ids, vecs)
    return index


def _save_ids_and_vectors(path, ids: np.ndarray, vecs: np.ndarray) -> None:
    """Write an index's ids and vectors as two consecutive ``.npy`` arrays (no pickle)."""
    with open(path, "wb") as f:
        np.save(f, ids, allow_pickle=False)
        np.save(f, vecs, allow_pickle=False)


def _load_ids_and_vectors(path) -> tuple[np.ndarray, np.ndarray]:
    """Read what :func:`_save_ids_and_vectors` wrote."""
    with open(path, "rb") as f:
        return np.load(f, allow_pickle=False), np.load(f, allow_pickle=False)
