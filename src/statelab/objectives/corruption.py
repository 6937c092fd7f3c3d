"""The Birdie objectives (arXiv 2411.01030, §3 and A.2), each a pure function ``(tokens, config, rng) -> Example``.

``tokens`` is a chunk of text ``[L]`` (int64 byte ids) whose length the caller drew from ``config.length``; every
objective uses all of it. All randomness comes from ``rng`` (a ``numpy.random.Generator``), so a sample is a pure
function of (tokens, config, seed).

Span corruption places spans exactly (T5-style random partition), so the hidden fraction is the configured rate up
to rounding, unlike the Bernoulli span walk of the public code whose realised rate falls well below nominal
(27-30% for a nominal 50%). The realised fraction is reported in ``Example.masked_fraction``.

Worked example (infilling, rate 0.3, one span): ``a b c d e f g h i j`` -> input ``a b <s0> f g h i j``, target
``<s0> c d e <eos>``; the model sees the input as its prefix and writes ``<s0> c d e <eos>`` after ``[BEGIN]``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from statelab.objectives.base import (
    VOCAB,
    AutoencodingConfig,
    CopyingObjectiveConfig,
    DeshufflingConfig,
    Example,
    InfillingConfig,
    NextTokenConfig,
    ObjectiveConfig,
    PrefixLMConfig,
    SelectiveCopyingObjectiveConfig,
    Vocab,
)

__all__ = [
    "OBJECTIVES",
    "apply_objective",
    "span_mask",
    "next_token",
    "prefix_lm",
    "infilling",
    "autoencoding",
    "copying",
    "deshuffling",
    "selective_copying",
]

_I64 = np.int64


def _as_tokens(tokens: np.ndarray, min_len: int, name: str) -> np.ndarray:
    t = np.asarray(tokens)
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"{name}: tokens must be a 1-D integer array, got shape {t.shape} dtype {t.dtype}")
    if t.shape[0] < min_len:
        raise ValueError(f"{name}: needs at least {min_len} tokens, got {t.shape[0]}")
    return t.astype(_I64, copy=False)


def _partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random composition of ``total`` into ``parts`` positive integers (``total >= parts``)."""
    if parts == 1:
        return np.array([total], dtype=_I64)
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(_I64)


def span_mask(n: int, rate: float, mean_span: float, rng: np.random.Generator, max_spans: int) -> np.ndarray:
    """Spans to hide in a chunk of ``n`` tokens: ``[S, 2]`` rows ``(start, end)``, sorted, disjoint, not adjacent.

    Hides ``round(rate · n)`` tokens (at least 1, leaving at least 1 visible) in
    ``S = clip(round(hidden / mean_span), 1, max_spans)`` spans; span lengths are a random composition of the
    hidden count, the visible tokens a random composition into the ``S + 1`` gaps with every inner gap >= 1.
    """
    hidden = int(min(max(round(rate * n), 1), n - 1))
    n_spans = int(np.clip(round(hidden / mean_span), 1, max_spans))
    visible = n - hidden
    n_spans = min(n_spans, hidden, visible + 1)
    lengths = _partition(hidden, n_spans, rng)
    # gaps: S + 1 of them, outer ones may be empty; add 1 to the outer ones, partition, subtract again
    gaps = _partition(visible + 2, n_spans + 1, rng)
    gaps[0] -= 1
    gaps[-1] -= 1
    starts = np.cumsum(np.concatenate([[gaps[0]], (lengths + gaps[1:])[:-1]]))
    return np.stack([starts, starts + lengths], axis=1).astype(_I64)


def _corrupt(tokens: np.ndarray, spans: np.ndarray, vocab: Vocab) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cut ``tokens`` at ``spans``: the visible pieces (S + 1 of them, possibly empty) and the hidden spans."""
    visible, hidden = [], []
    prev = 0
    for s, e in spans:
        visible.append(tokens[prev:s])
        hidden.append(tokens[s:e])
        prev = e
    visible.append(tokens[prev:])
    return visible, hidden


def next_token(tokens: np.ndarray, config: NextTokenConfig, rng: np.random.Generator, vocab: Vocab = VOCAB) -> Example:
    """Next-token prediction: empty input, target ``x``; packed as ``[BEGIN] x[:-1]`` with labels ``x``."""
    x = _as_tokens(tokens, 1, "next_token")
    return Example(input=np.zeros(0, dtype=_I64), target=x.copy())


def prefix_lm(tokens: np.ndarray, config: PrefixLMConfig, rng: np.random.Generator, vocab: Vocab = VOCAB) -> Example:
    """Prefix-LM: split at ``s`` uniform in ``[split_lo · L, split_hi · L]`` with both parts >= ``min_part``."""
    x = _as_tokens(tokens, config.min_length(), "prefix_lm")
    n = x.shape[0]
    lo = max(config.min_part, int(np.ceil(config.split[0] * n)))
    hi = min(n - config.min_part, int(np.floor(config.split[1] * n)))
    s = int(rng.integers(lo, hi + 1)) if hi >= lo else n // 2
    return Example(input=x[:s].copy(), target=x[s:].copy())


def infilling(tokens: np.ndarray, config: InfillingConfig, rng: np.random.Generator, vocab: Vocab = VOCAB) -> Example:
    """Span corruption: each span becomes its own sentinel (ordered ``<s0> <s1> ...``); the target lists
    ``<s_i> span_i`` for every span, then ``<eos>``.
    """
    x = _as_tokens(tokens, config.min_length(), "infilling")
    spans = span_mask(x.shape[0], config.rate, config.mean_span, rng, vocab.n_sentinels)
    visible, hidden = _corrupt(x, spans, vocab)
    inp: list[np.ndarray] = []
    tgt: list[np.ndarray] = []
    for i, h in enumerate(hidden):
        sent = np.array([vocab.sentinel(i)], dtype=_I64)
        inp += [visible[i], sent]
        tgt += [sent, h]
    inp.append(visible[-1])
    tgt.append(np.array([vocab.eos], dtype=_I64))
    n_hidden = int((spans[:, 1] - spans[:, 0]).sum())
    return Example(
        input=np.concatenate(inp),
        target=np.concatenate(tgt),
        masked_fraction=n_hidden / x.shape[0],
        n_spans=len(hidden),
    )


def autoencoding(
    tokens: np.ndarray, config: AutoencodingConfig, rng: np.random.Generator, vocab: Vocab = VOCAB
) -> Example:
    """BART-style: spans replaced by sentinels; target the whole chunk then ``<eos>``.

    With ``config.shuffle`` the corrupted input is cut into pieces (the head, then one piece starting at each
    sentinel) and the pieces are permuted uniformly among the non-identity orders (AE + deshuffling). Exactly the
    span tokens are hidden: nothing else is dropped.
    """
    x = _as_tokens(tokens, config.min_length(), "autoencoding")
    spans = span_mask(x.shape[0], config.rate, config.mean_span, rng, vocab.n_sentinels)
    visible, hidden = _corrupt(x, spans, vocab)
    pieces = [visible[0]] + [
        np.concatenate([np.array([vocab.sentinel(i)], dtype=_I64), visible[i + 1]]) for i in range(len(hidden))
    ]
    if config.shuffle and len(pieces) >= 2:
        order = np.arange(len(pieces))
        while np.array_equal(order, np.arange(len(pieces))):
            order = rng.permutation(len(pieces))
        pieces = [pieces[i] for i in order]
    n_hidden = int((spans[:, 1] - spans[:, 0]).sum())
    return Example(
        input=np.concatenate(pieces),
        target=np.concatenate([x, [vocab.eos]]).astype(_I64),
        masked_fraction=n_hidden / x.shape[0],
        n_spans=len(hidden),
    )


def copying(
    tokens: np.ndarray, config: CopyingObjectiveConfig, rng: np.random.Generator, vocab: Vocab = VOCAB
) -> Example:
    """Copying: input ``x``, target ``x <eos>``."""
    x = _as_tokens(tokens, 1, "copying")
    return Example(input=x.copy(), target=np.concatenate([x, [vocab.eos]]).astype(_I64))


def deshuffling(
    tokens: np.ndarray, config: DeshufflingConfig, rng: np.random.Generator, vocab: Vocab = VOCAB
) -> Example:
    """Deshuffling: the tokens at ``k = floor(fraction · L)`` random positions are permuted among those positions
    (a non-identity permutation when ``k >= 2``); the target is ``x <eos>``. ``masked_fraction`` is ``k / L``.
    """
    x = _as_tokens(tokens, 2, "deshuffling")
    n = x.shape[0]
    k = max(2, int(np.floor(config.fraction * n)))
    pos = np.sort(rng.choice(n, size=k, replace=False))
    perm = np.arange(k)
    while np.array_equal(perm, np.arange(k)):
        perm = rng.permutation(k)
    y = x.copy()
    y[pos] = x[pos[perm]]
    return Example(input=y, target=np.concatenate([x, [vocab.eos]]).astype(_I64), masked_fraction=k / n, n_spans=0)


def selective_copying(
    tokens: np.ndarray, config: SelectiveCopyingObjectiveConfig, rng: np.random.Generator, vocab: Vocab = VOCAB
) -> Example:
    """Selective copying (paper A.5): copy the spans named by their surrounding delimiters.

    ``k = n_spans`` disjoint spans of ``span_length`` tokens are chosen in the context, each with ``before`` and
    ``after`` delimiters of ``delimiter`` tokens (the text just before and after it). Input:
    ``[CONTEXT] x [COPY] ([START] before [END] after)...`` (query first with ``query_first``: the ``[COPY]`` part
    comes first). Target: the spans in query order joined by ``[SEP]``, then ``[DONE]``. Every span lies inside the
    visible context: the whole chunk is kept.

    Example: context ``ABCDEF``, span ``DE`` -> ``[CONTEXT] ABCDEF [COPY] [START] BC [END] F`` -> ``DE [DONE]``.
    """
    x = _as_tokens(tokens, config.min_length(), "selective_copying")
    n = x.shape[0]
    k = config.n_spans
    # each slot = before + span + after; place the slots without overlap via a random composition of the slack
    sl = rng.integers(config.span_length[0], config.span_length[1] + 1, size=k)
    bl = rng.integers(config.delimiter[0], config.delimiter[1] + 1, size=k)
    al = rng.integers(config.delimiter[0], config.delimiter[1] + 1, size=k)
    slot = bl + sl + al
    slack = n - int(slot.sum())
    gaps = _partition(slack + k + 1, k + 1, rng) - 1
    starts = np.cumsum(np.concatenate([[gaps[0]], (slot + gaps[1:])[:-1]]))
    order = rng.permutation(k)
    query: list[np.ndarray] = []
    answer: list[np.ndarray] = []
    for j, i in enumerate(order):
        s0 = int(starts[i])
        before = x[s0 : s0 + bl[i]]
        span = x[s0 + bl[i] : s0 + bl[i] + sl[i]]
        after = x[s0 + bl[i] + sl[i] : s0 + slot[i]]
        query += [np.array([vocab.start], dtype=_I64), before, np.array([vocab.end], dtype=_I64), after]
        if j:
            answer.append(np.array([vocab.sep], dtype=_I64))
        answer.append(span)
    answer.append(np.array([vocab.done], dtype=_I64))
    ctx = np.concatenate([[vocab.context], x]).astype(_I64)
    q = np.concatenate([np.array([vocab.copy], dtype=_I64), *query])
    inp = np.concatenate([q, ctx] if config.query_first else [ctx, q])
    return Example(input=inp, target=np.concatenate(answer), masked_fraction=None, n_spans=k)


OBJECTIVES: dict[str, Callable[..., Example]] = {
    "next_token": next_token,
    "prefix_lm": prefix_lm,
    "infilling": infilling,
    "autoencoding": autoencoding,
    "copying": copying,
    "deshuffling": deshuffling,
    "selective_copying": selective_copying,
}


def apply_objective(
    tokens: np.ndarray, config: ObjectiveConfig, rng: np.random.Generator, vocab: Vocab = VOCAB
) -> Example:
    """Dispatch ``config`` to its objective function."""
    return OBJECTIVES[config.class_name](tokens, config, rng, vocab)
