"""Choosing how a model's states are compared for retrieval: layers and feature, by validation inside a library.

A retrieval configuration is a set of layers and a *feature*, the vector whose cosine ranks library entries:

| feature    | vector of a state (layers ``ℓ_1..ℓ_m``, ``x_ℓ`` = flattened SSM state of layer ``ℓ``)        |
|------------|----------------------------------------------------------------------------------------------|
| ``raw``      | ``[x_ℓ1; ...; x_ℓm]`` (what :func:`statelab.state.search.layer_features` gives)            |
| ``unit``     | ``u = [x_ℓ1/‖x_ℓ1‖; ...; x_ℓm/‖x_ℓm‖]``: every layer weighs the same                         |
| ``centred``  | ``u − μ``, ``μ`` the mean of the library's ``u``: removes what every skill shares               |
| ``whitened`` | ``c = u − μ``, then ``c + V^T((V c) ⊙ (sqrt(α/(λ+α)) − 1))``: shrunk principal directions   |

For ``whitened``, ``V [r, F]`` holds the library's top ``r`` principal directions of ``u − μ`` with variances
``λ [r]``, and ``α`` is the median variance of all its non-zero principal directions: a direction of variance
``λ`` is scaled by ``sqrt(α/(λ+α))`` relative to the rest (a regularised ZCA whitening ``(Σ + αI)^(-1/2)``, up to
a constant factor that cosine ignores; directions beyond the top ``r`` keep factor 1, their variance being small).
The median keeps a few dominant directions from setting the regularisation, and leaves the query's component
outside the library's span at the weight of a typical direction.
Whitening keeps the few directions in which the library's skills differ most from drowning out the others.

The choice is made by held-out validation inside the library (:func:`validate`): the library's states carry a
*group* (e.g. which disjoint prompt set of its task a state was built from); for each group in turn, the
statistics (``μ``, ``V``, ``λ``) are fitted on the other groups' states, and the validation queries of that group
are ranked against the other groups' states only. The score of a configuration is the fraction of queries whose
top-1 hit has the query's task. With no separate queries, each library state is a query of its own group
(leave-one-out when every state is its own group). The test queries of an experiment never enter the choice.

A :class:`RetrievalChoice` records the winner with the statistics fitted on the whole library and the validation
table; :meth:`statelab.StateStore.set_retrieval` stores it per model fingerprint, and ``store.search`` then uses
it by default for that model's queries.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from statelab.errors import StoreError
from statelab.state.core import State
from statelab.state.search import middle_third

__all__ = [
    "FEATURES",
    "WHITEN_RANK",
    "RetrievalChoice",
    "layer_options",
    "per_layer",
    "fit_stats",
    "transform",
    "top1",
    "Kernels",
    "predict",
    "validate",
    "choose",
    "choose_for_store",
    "save_choice",
    "load_choice",
    "delete_choice",
]

#: the features, simplest first (ties in validation go to the earlier one)
FEATURES = ("raw", "unit", "centred", "whitened")
#: principal directions kept by ``whitened``
WHITEN_RANK = 32
_TINY = torch.finfo(torch.float32).tiny


def layer_options(num_layers: int) -> list[tuple[int, ...]]:
    """The layer sets tried by default: every single layer, every adjacent pair, the middle third, all layers."""
    opts = [(i,) for i in range(num_layers)]
    opts += [(i, i + 1) for i in range(num_layers - 1)]
    opts += [tuple(middle_third(num_layers)), tuple(range(num_layers))]
    return list(dict.fromkeys(opts))  # de-duplicated, in order


def per_layer(states: Sequence[State]) -> list[torch.Tensor]:
    """Flattened SSM states per layer: ``L`` tensors ``[M, F_ℓ]`` (fp32) for ``M`` batch-1 (or batched) states."""
    if not states:
        raise StoreError("no states to compare")
    ssm = torch.cat([s.ssm.to(torch.float32) for s in states], dim=1)  # [L, M, ...]
    return [ssm[i].reshape(ssm.shape[1], -1) for i in range(ssm.shape[0])]


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)


def _stack(layers_x: Sequence[torch.Tensor], layers: Sequence[int], feature: str) -> torch.Tensor:
    """``raw`` or ``unit`` vectors ``[M, F]`` of the chosen layers."""
    parts = [layers_x[i] for i in layers]
    if feature != "raw":
        parts = [_unit_rows(p) for p in parts]
    return torch.cat(parts, dim=1)


def fit_stats(u: torch.Tensor, feature: str, rank: int = WHITEN_RANK) -> dict[str, torch.Tensor]:
    """Library statistics of ``feature`` from its ``unit`` vectors ``u [M, F]`` (``raw``, ``unit``: none).

    ``centred``: ``mean [F]``. ``whitened``: also ``basis [r, F]`` (orthonormal rows) and ``shrink [r]``
    (``sqrt(α/(λ+α)) − 1``). Fitted in fp64 through the ``M × M`` Gram matrix (``M`` is small, ``F`` large).
    """
    if feature in ("raw", "unit"):
        return {}
    if feature not in FEATURES:
        raise StoreError(f"unknown retrieval feature {feature!r}; known: {list(FEATURES)}")
    mean = u.double().mean(0)
    out = {"mean": mean.float()}
    if feature == "centred":
        return out
    c = u.double() - mean
    m = c.shape[0]
    evals, evecs = torch.linalg.eigh(c @ c.T)  # ascending; eigenvalues of the Gram matrix are s_i^2
    keep = evals > evals.max().clamp_min(0) * 1e-10
    evals, evecs = evals[keep].flip(0), evecs[:, keep].flip(1)
    if evals.numel() == 0:  # every library vector identical: nothing to whiten
        out["basis"], out["shrink"] = torch.zeros(0, u.shape[1]), torch.zeros(0)
        return out
    lam = evals / max(m - 1, 1)
    alpha = lam.median()
    r = min(rank, lam.numel())
    basis = (evecs[:, :r].T @ c) / evals[:r].sqrt()[:, None]  # right singular vectors, [r, F]
    out["basis"] = basis.float()
    out["shrink"] = ((alpha / (lam[:r] + alpha)).sqrt() - 1).float()
    return out


def transform(u: torch.Tensor, feature: str, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unit-norm retrieval vectors ``[M, F]`` of ``feature`` from ``raw`` (for ``raw``) or ``unit`` vectors ``u``."""
    x = u
    if feature in ("centred", "whitened"):
        x = x - stats["mean"].to(x)
    if feature == "whitened" and stats["basis"].numel():
        basis = stats["basis"].to(x)
        x = x + ((x @ basis.T) * stats["shrink"].to(x)) @ basis
    return _unit_rows(x)


def top1(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index ``[Q]`` of each query's most similar key (unit rows: inner product is cosine; ties to the first)."""
    return (queries @ keys.T).argmax(dim=1)


class Kernels:
    """Per-layer Gram matrices of a library ``[M, M]`` and of queries against it ``[Q, M]`` (fp64 after fp32
    products), from which every configuration's cosine scores follow without forming its vectors.

    Every feature is an affine map of the ``raw`` or ``unit`` vectors followed by cosine, and its statistics are
    built from the reference rows themselves, so all inner products it needs are sums of the per-layer Gram
    entries: ``unit`` divides them by the layer norms, ``centred`` subtracts the library mean through row and
    column means, and ``whitened`` works in the span of the centred references (its basis is ``E^T C / sqrt(e)``
    for the eigenpairs ``(e, E)`` of the centred Gram matrix ``C C^T``). One pass over the features costs
    ``O((Q + M) · M · F)``; each configuration and held-out fold after that costs ``O(Q · M · r)``. Equal to
    :func:`transform` then cosine (tested).

    Args:
        lib, qs: :func:`per_layer` of the library and of the queries (``None``: the library is its own queries).
    """

    def __init__(self, lib: Sequence[torch.Tensor], qs: Sequence[torch.Tensor] | None = None) -> None:
        self.ll = [(x @ x.T).double() for x in lib]
        self.ql = self.ll if qs is None else [(q @ x.T).double() for q, x in zip(qs, lib, strict=True)]
        self.nl = [g.diagonal().clamp_min(0).sqrt() for g in self.ll]
        self.nq = self.nl if qs is None else [q.double().norm(dim=1) for q in qs]

    def _base(self, layers: Sequence[int], unit: bool, q_rows: Sequence[int], ref: Sequence[int]):
        """``(K_qR [Q', R], k_qq [Q'], K_RR [R, R])`` of the ``raw`` (or ``unit``) vectors of ``layers``."""
        qi, ri = torch.as_tensor(list(q_rows)), torch.as_tensor(list(ref))
        K_qR = torch.zeros(len(qi), len(ri), dtype=torch.float64)
        K_RR = torch.zeros(len(ri), len(ri), dtype=torch.float64)
        k_qq = torch.zeros(len(qi), dtype=torch.float64)
        for i in layers:
            gq, gr = self.ql[i][qi][:, ri], self.ll[i][ri][:, ri]
            nq, nr = self.nq[i][qi], self.nl[i][ri]
            if unit:
                iq, ir = _inv(nq), _inv(nr)
                K_qR += gq * iq[:, None] * ir[None, :]
                K_RR += gr * ir[:, None] * ir[None, :]
                k_qq += (nq > 0).double()
            else:
                K_qR += gq
                K_RR += gr
                k_qq += nq**2
        return K_qR, k_qq, K_RR

    def scores(
        self, layers: Sequence[int], feature: str, q_rows: Sequence[int], ref: Sequence[int],
        rank: int = WHITEN_RANK,
    ) -> torch.Tensor:  # fmt: skip
        """Cosine ``[Q', R]`` of queries ``q_rows`` with library rows ``ref`` under ``(layers, feature)``, the
        statistics fitted on ``ref``."""
        K_qR, k_qq, K_RR = self._base(layers, feature != "raw", q_rows, ref)
        k_RR = K_RR.diagonal().clone()
        if feature in ("centred", "whitened"):
            mq, mr, mm = K_qR.mean(1), K_RR.mean(1), K_RR.mean()
            K_qR = K_qR - mq[:, None] - mr[None, :] + mm
            k_qq = k_qq - 2 * mq + mm
            K_RR = K_RR - mr[:, None] - mr[None, :] + mm
            k_RR = K_RR.diagonal().clone()
        if feature == "whitened":
            evals, evecs = torch.linalg.eigh(K_RR)
            keep = evals > evals.max().clamp_min(0) * 1e-10
            evals, evecs = evals[keep].flip(0), evecs[:, keep].flip(1)
            if evals.numel():
                lam = evals / max(len(ref) - 1, 1)
                g = lam / (lam + lam.median())
                r = min(rank, lam.numel())
                basis = evecs[:, :r] / evals[:r].sqrt()  # projections: centred kernel @ basis
                Pq, Pr = K_qR @ basis, K_RR @ basis
                K_qR = K_qR - (Pq * g[:r]) @ Pr.T
                k_qq = k_qq - (Pq**2 * g[:r]).sum(1)
                k_RR = k_RR - (Pr**2 * g[:r]).sum(1)
        return K_qR * _inv(k_qq.clamp_min(0).sqrt())[:, None] * _inv(k_RR.clamp_min(0).sqrt())[None, :]


def _inv(x: torch.Tensor) -> torch.Tensor:
    """``1 / x``, 0 where ``x`` is 0 (a zero vector has cosine 0 with everything)."""
    return torch.where(x > 0, 1 / x.clamp_min(1e-300), torch.zeros_like(x))


def predict(
    lib: Sequence[torch.Tensor], lib_tasks: Sequence[str], qs: Sequence[torch.Tensor],
    layers: Sequence[int], feature: str, rank: int = WHITEN_RANK, kernels: Kernels | None = None,
) -> list[str]:  # fmt: skip
    """Top-1 task of each query under ``(layers, feature)`` with the statistics fitted on the whole library.

    ``lib`` and ``qs`` are :func:`per_layer` outputs (``L`` tensors ``[M, F_ℓ]`` and ``[Q, F_ℓ]``); pass
    ``kernels=Kernels(lib, qs)`` to score many configurations from one pass over the features.
    """
    k = kernels or Kernels(lib, qs)
    M, Q = len(lib_tasks), k.ql[0].shape[0]
    best = k.scores(layers, feature, range(Q), range(M), rank).argmax(dim=1)
    return [lib_tasks[int(b)] for b in best]


def _accuracy(
    k: Kernels, lib_tasks: Sequence[str], lib_groups: Sequence[Any], q_tasks: Sequence[str],
    q_groups: Sequence[Any], layers: Sequence[int], feature: str, rank: int,
) -> float:  # fmt: skip
    """Top-1 task accuracy of one configuration, each query group against the library's other groups."""
    hits = 0
    for g in dict.fromkeys(q_groups):
        ref = [i for i, lg in enumerate(lib_groups) if lg != g]
        mine = [i for i, qg in enumerate(q_groups) if qg == g]
        if not ref:
            raise StoreError("validation needs library states of at least two groups")
        best = k.scores(layers, feature, mine, ref, rank).argmax(dim=1)
        hits += sum(lib_tasks[ref[int(b)]] == q_tasks[i] for i, b in zip(mine, best, strict=True))
    return hits / len(q_tasks)


def validate(
    library: Sequence[State],
    tasks: Sequence[str],
    groups: Sequence[Any],
    queries: Sequence[State] | None = None,
    query_tasks: Sequence[str] | None = None,
    query_groups: Sequence[Any] | None = None,
    *,
    options: Sequence[Sequence[int]] | None = None,
    features: Sequence[str] = FEATURES,
    rank: int = WHITEN_RANK,
) -> list[dict[str, Any]]:
    """Held-out top-1 task accuracy of every ``(layers, feature)``: ``[{"layers", "feature", "accuracy"}]``.

    Args:
        library: ``M`` batch-1 states (or batched ones, ``M`` rows in all) of one model.
        tasks, groups: each library row's task and group (any hashable; rows of a group are held out together).
        queries, query_tasks, query_groups: validation queries, each held out with its group; ``None``: the
            library rows themselves.
        options: layer sets (default :func:`layer_options`); features: subset of :data:`FEATURES`.
    """
    lib = per_layer(library)
    if len(tasks) != lib[0].shape[0] or len(groups) != lib[0].shape[0]:
        raise StoreError(f"validate: {lib[0].shape[0]} library rows but {len(tasks)} tasks and {len(groups)} groups")
    if queries is None:
        qs, q_tasks, q_groups = lib, list(tasks), list(groups)
    else:
        qs, q_tasks, q_groups = per_layer(queries), list(query_tasks or []), list(query_groups or [])
        if len(q_tasks) != qs[0].shape[0] or len(q_groups) != qs[0].shape[0]:
            raise StoreError("validate: every query needs a task and a group")
    if len(set(groups)) < 2:
        raise StoreError("validation needs library states of at least two groups")
    bad = [f for f in features if f not in FEATURES]
    if bad or not features:
        raise StoreError(f"unknown retrieval feature(s) {bad}; known: {list(FEATURES)}")
    L = len(lib)
    opts = [tuple(o) for o in (options if options is not None else layer_options(L))]
    for o in opts:
        if not o or any(not 0 <= i < L for i in o):
            raise StoreError(f"layer set {list(o)} is empty or out of range for a {L}-layer model")
    k = Kernels(lib, None if queries is None else qs)
    return [
        {"layers": list(o), "feature": f, "accuracy": _accuracy(k, tasks, groups, q_tasks, q_groups, o, f, rank)}
        for o in opts for f in features
    ]  # fmt: skip


@dataclass(frozen=True, eq=False)
class RetrievalChoice:
    """How one model's states are compared: layers, feature and the library statistics it needs.

    Attributes:
        fingerprint: the model's fingerprint.
        layers: layers compared (sorted).
        feature: one of :data:`FEATURES`.
        stats: :func:`fit_stats` of the whole library (tensors on the CPU).
        n_library: library states the statistics were fitted on.
        validation: the table :func:`validate` returned (every option tried), for reports.
        method: how the validation held states out (free text for reports).
    """

    fingerprint: str
    layers: tuple[int, ...]
    feature: str
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    n_library: int = 0
    validation: tuple[dict[str, Any], ...] = ()
    method: str = ""

    def vectors(self, states: State | Sequence[State]) -> torch.Tensor:
        """Unit retrieval vectors ``[M, F]`` of states of this model (a batch, or a list of them)."""
        states = [states] if isinstance(states, State) else list(states)
        for s in states:
            if s.fingerprint != self.fingerprint:
                raise StoreError(
                    f"retrieval choice of model {self.fingerprint[:16]} applied to a state of model "
                    f"{s.fingerprint[:16]}"
                )
        base = "raw" if self.feature == "raw" else "unit"
        u = _stack(per_layer(states), self.layers, base)
        return transform(u, self.feature, self.stats)

    def spec(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-able."""
        return {
            "fingerprint": self.fingerprint, "layers": list(self.layers), "feature": self.feature,
            "n_library": self.n_library, "validation": list(self.validation), "method": self.method,
        }  # fmt: skip

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the spec and the statistics (identifies the choice in caches; computed once)."""
        return _digest(json.dumps(self.spec(), sort_keys=True), _stats_bytes(self.stats))


def choose(
    library: Sequence[State],
    tasks: Sequence[str],
    groups: Sequence[Any],
    queries: Sequence[State] | None = None,
    query_tasks: Sequence[str] | None = None,
    query_groups: Sequence[Any] | None = None,
    *,
    options: Sequence[Sequence[int]] | None = None,
    features: Sequence[str] = FEATURES,
    rank: int = WHITEN_RANK,
    method: str = "",
) -> RetrievalChoice:
    """The best configuration by :func:`validate` (ties: earlier option, then simpler feature), fitted on the
    whole library."""
    table = validate(
        library, tasks, groups, queries, query_tasks, query_groups, options=options, features=features, rank=rank
    )
    best = max(range(len(table)), key=lambda i: (table[i]["accuracy"], -i))
    layers, feature = tuple(table[best]["layers"]), table[best]["feature"]
    lib = per_layer(library)
    stats = fit_stats(_stack(lib, layers, "unit"), feature, rank) if feature not in ("raw", "unit") else {}
    fps = {s.fingerprint for s in library}
    if len(fps) != 1:
        raise StoreError(f"a retrieval choice is per model; the library holds states of {len(fps)} models")
    return RetrievalChoice(
        fingerprint=fps.pop(), layers=layers, feature=feature, stats=stats, n_library=lib[0].shape[0],
        validation=tuple(table), method=method or ("held-out groups" if queries is not None else "leave-one-out"),
    )  # fmt: skip


def choose_for_store(store: Any, fingerprint: str, *, options=None, features=FEATURES, save: bool = True):
    """Choose by leave-one-out over the store's own entries of ``fingerprint`` (each entry a query against the
    others; needs two entries of a task), record it in the store (``save``) and return it."""
    entries = [e for e in store.list() if e.fingerprint == fingerprint and e.task]
    if len({e.task for e in entries}) < 2:
        raise StoreError(f"choosing a retrieval needs entries of at least two tasks of model {fingerprint[:16]}")
    states = [store.get(e.name) for e in entries]
    choice = choose(
        states, [e.task for e in entries], [e.id for e in entries], options=options, features=features,
        method="leave-one-out over the store's entries",
    )  # fmt: skip
    if save:
        store.set_retrieval(choice)
    return choice


_TABLE = """CREATE TABLE IF NOT EXISTS retrieval (
    fingerprint TEXT PRIMARY KEY, spec TEXT NOT NULL, stats BLOB NOT NULL, sha256 TEXT NOT NULL
)"""


def _stats_bytes(stats: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(stats.items())})


def _digest(spec: str, stats: bytes) -> str:
    h = hashlib.sha256(spec.encode())
    h.update(b"\0")
    h.update(stats)
    return h.hexdigest()


def save_choice(db: sqlite3.Connection, choice: RetrievalChoice) -> None:
    """Record ``choice`` for its model (replacing any earlier one), inside the caller's write transaction."""
    _check_finite(choice)
    db.execute(_TABLE)
    spec = json.dumps(choice.spec(), sort_keys=True)
    data = _stats_bytes(choice.stats)
    db.execute(
        "INSERT OR REPLACE INTO retrieval (fingerprint, spec, stats, sha256) VALUES (?, ?, ?, ?)",
        (choice.fingerprint, spec, data, _digest(spec, data)),
    )


def delete_choice(db: sqlite3.Connection, fingerprint: str) -> bool:
    """Forget the choice of model ``fingerprint`` (inside a write transaction); whether there was one."""
    db.execute(_TABLE)
    return db.execute("DELETE FROM retrieval WHERE fingerprint = ?", (fingerprint,)).rowcount > 0


_CACHE: dict[str, RetrievalChoice] = {}


def load_choice(db: sqlite3.Connection, fingerprint: str) -> RetrievalChoice | None:
    """The recorded choice of model ``fingerprint``, verified against its checksum, or ``None``."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'retrieval'").fetchone():
        return None
    row = db.execute("SELECT sha256 FROM retrieval WHERE fingerprint = ?", (fingerprint,)).fetchone()
    if row is None:
        return None
    if row[0] in _CACHE:  # verified when it was first read (a search reads the choice every time)
        return _CACHE[row[0]]
    spec, data, sha = db.execute(
        "SELECT spec, stats, sha256 FROM retrieval WHERE fingerprint = ?", (fingerprint,)
    ).fetchone()
    if _digest(spec, data) != sha:
        raise StoreError(
            f"the retrieval choice of model {fingerprint[:16]} in this store is damaged (checksum mismatch); "
            "choose again (statelab.state.retrieval.choose_for_store) or clear it (store.clear_retrieval)"
        )
    from safetensors.torch import load

    d = json.loads(spec)
    choice = RetrievalChoice(
        fingerprint=d["fingerprint"], layers=tuple(d["layers"]), feature=d["feature"], stats=load(bytes(data)),
        n_library=int(d["n_library"]), validation=tuple(d["validation"]), method=d["method"],
    )  # fmt: skip
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[sha] = choice
    return choice


def _check_finite(choice: RetrievalChoice) -> None:
    for k, v in choice.stats.items():
        if not torch.isfinite(v).all():
            raise StoreError(f"retrieval statistics {k!r} hold non-finite values")
    if not all(math.isfinite(r["accuracy"]) for r in choice.validation):
        raise StoreError("retrieval validation table holds non-finite accuracies")
