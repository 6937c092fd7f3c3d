"""Scoring many requests at once: log-likelihoods, rolling log-likelihoods and greedy generation.

This is the engine behind ``statelab eval`` and the lm-eval adapter (``lm_eval --model statelab``). Every function
takes a list of requests and returns one result per request, in input order, each equal (up to fp32 round-off of
batched matrix products) to running that request alone with plain ``model(ids)`` calls on its concatenated ids.

**Read each context once.** A multiple-choice question scores several continuations after one context. Here each
distinct context is read once: its tokens but the last are encoded (without the output head) in length-bucketed
ragged batches, giving one state per context; then every continuation runs from its context's state, fed
``[last context token] + continuation[:-1]`` so that the logits predicting the continuation's first token come
from the same pass. Continuations of many contexts run together as one ragged batch (``State.select`` gathers their
context states). This is exact, because continuing from a state equals reading the whole sequence, and it is where
the speed-up for multiple choice comes from: the context is read once instead of once per choice.

**Tokenisation boundary** (:func:`encode_pair`), as lm-eval's ``hf`` model does it for causal models: trailing
whitespace of the context moves to the start of the continuation; the context ids are ``encode(context)`` and the
continuation ids are what ``encode(context + continuation)`` adds after them. A byte tokenizer gives the same as
encoding the two strings separately; a BPE tokenizer may merge across the boundary, which this split accounts
for. An empty context becomes the prefix token (BOS, else EOS) so that the continuation's first token has a
prediction.

**Rolling log-likelihood** (perplexity tasks). A state-space model has no maximum length, so a text is not cut
into windows: the whole text is read from the start state, preceded by the prefix token (BOS, else EOS) as
lm-eval's ``hf`` model does for the first window, so that every token of the text, the first included, is
predicted exactly once with everything before it in view. A text longer than ``batch_tokens`` is read in chunks
that carry the state (exact), which bounds the memory of the logits.

**Generation** is greedy. Each row stops at the tokenizer's EOS, at ``max_gen_toks`` new tokens, or as soon as
its decoded text contains one of its ``until`` strings; the returned text is cut before the first stop string.
Finished rows leave the batch between decoding steps.

**Start state.** With ``state`` (a skill or a soup, batch 1: see :func:`statelab.eval.skills.start_state`) every
request starts from it instead of the zero state.

**Memory.** ``batch_tokens`` bounds the padded positions of every pass (``rows * longest row``); the logits of a
scoring pass take ``batch_tokens * vocab * 4`` bytes. The states held at once (one per context of a batch) are
also bounded, to about ``state_memory_mb``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from statelab.errors import StateMismatchError
from statelab.models.batching import length_buckets
from statelab.state.core import State

__all__ = [
    "loglikelihood",
    "loglikelihood_tokens",
    "loglikelihood_rolling",
    "generate_until",
    "encode_pair",
    "prefix_token_id",
    "GenRequest",
    "parse_gen_kwargs",
    "DEFAULT_BATCH_TOKENS",
    "DEFAULT_MAX_GEN_TOKS",
]

DEFAULT_BATCH_TOKENS = 4096
# lm-eval's default when a task gives no max_gen_toks
DEFAULT_MAX_GEN_TOKS = 256
# the states of one batch of contexts (one per context) are kept while their continuations run
DEFAULT_STATE_MEMORY_MB = 256


def prefix_token_id(tokenizer: Any) -> int:
    """The token put before an empty context or a rolling text: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    for name in ("bos_token_id", "eos_token_id"):
        t = getattr(tokenizer, name, None)
        if t is not None:
            return int(t)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start an empty context with")


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` for scoring ``continuation`` after ``context`` (see the module doc).

    The context ids always hold at least one token: an empty (or all-whitespace) context becomes
    ``[prefix_token_id]``.
    """
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise TypeError(
            f"a loglikelihood request is (context: str, continuation: str), got "
            f"({type(context).__name__}, {type(continuation).__name__})"
        )
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    if not context:
        cont = list(tokenizer.encode(continuation))
        p = prefix_token_id(tokenizer)
        if cont and cont[0] == p:  # the text already starts with the prefix token (as lm-eval treats it)
            return cont[:1], cont[1:]
        return [p], cont
    ctx = list(tokenizer.encode(context))
    whole = list(tokenizer.encode(context + continuation))
    if not ctx:
        return [prefix_token_id(tokenizer)], whole
    return ctx, whole[len(ctx) :]


def _check_start(model: Any, state: State | None) -> State | None:
    if state is None:
        return None
    if not isinstance(state, State):
        raise StateMismatchError(f"state must be a statelab.State, got {type(state).__name__}")
    if state.batch_size != 1:
        raise StateMismatchError(
            f"the start state is shared by every request and must have batch 1, got batch {state.batch_size}"
        )
    state = state.to(device=model.device)
    model.check_state(state, batch_size=1)
    return state


def _check_budget(batch_tokens: int, max_rows: int | None) -> None:
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be an int >= 1, got {batch_tokens!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be an int >= 1 or None, got {max_rows!r}")


def _max_rows(model: Any, state_memory_mb: float) -> int:
    """How many rows' states fit in ``state_memory_mb`` (at least 1)."""
    ref = model.zero_state(1, device="meta")
    per_row = sum(t.numel() * t.element_size() for t in (ref.ssm, ref.conv, ref.sum_delta))
    return max(1, int(state_memory_mb * 2**20 // max(per_row, 1)))


def _buckets(lengths: Sequence[int], batch_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """``length_buckets`` (lengths of 0 counted as 1), each batch also cut to at most ``max_rows`` rows."""
    out = length_buckets([max(int(n), 1) for n in lengths], batch_tokens) if lengths else []
    if max_rows is None:
        return out
    return [b[i : i + max_rows] for b in out for i in range(0, len(b), max_rows)]


def _padded(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``ids [B, T]`` (pad id 0: ``lengths`` masks it) and ``lengths [B]`` of ``rows`` (each >= 1)."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return ids.to(device), torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)


def _start_rows(model: Any, start: State | None, n: int) -> State:
    """``n`` rows of the start state (the zero state when there is none)."""
    base = start if start is not None else model.zero_state(1, device=model.device)
    return base.expand(n)


def _encode_rows(model: Any, rows: Sequence[Sequence[int]], start: State | None, batch_tokens: int) -> State:
    """The state after each of ``rows`` (each from ``start``), as one batch; rows may be empty (then the start).

    One ragged ``encode`` pass for the non-empty rows; a lone row longer than ``batch_tokens`` is read in chunks
    that carry the state.
    """
    full = [i for i, r in enumerate(rows) if len(r)]
    if not full:
        return _start_rows(model, start, len(rows))
    ids, lengths = _padded([rows[i] for i in full], model.device)
    st = None if start is None else start.expand(len(full))
    if len(full) == 1 and ids.shape[1] > batch_tokens:
        for s in range(0, ids.shape[1], batch_tokens):
            st = model.encode(ids[:, s : s + batch_tokens], state=st)
    else:
        st = model.encode(ids, state=st, lengths=lengths)
    if len(full) == len(rows):
        return st
    # put the empty rows (the start state itself) back in their places
    parts, k = [], 0
    one = _start_rows(model, start, 1)
    for r in rows:
        if len(r):
            parts.append(st.select(k))
            k += 1
        else:
            parts.append(one)
    return State.cat(parts)


def _score_rows(
    model: Any,
    inputs: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    state: State | None,
    batch_tokens: int,
) -> list[tuple[float, bool]]:
    """``(Σ log p(targets[b] | state, inputs[b]), greedy)`` per row: ``targets[b][t]`` is predicted from the
    logits after ``inputs[b][: t + 1]``; ``greedy`` is true when every target is the argmax there.

    ``inputs[b]`` and ``targets[b]`` have the same length ``>= 1``; ``state`` has one row per input (or is
    ``None``). A lone row longer than ``batch_tokens`` runs in chunks that carry the state.
    """
    ids, lengths = _padded(inputs, model.device)
    tgt, _ = _padded(targets, model.device)
    n_rows, width = ids.shape
    if n_rows == 1 and width > batch_tokens:
        spans = [(s, min(s + batch_tokens, width)) for s in range(0, width, batch_tokens)]
        lengths_arg = None
    else:
        spans = [(0, width)]
        lengths_arg = lengths if bool((lengths < width).any()) else None
    total = torch.zeros(n_rows, dtype=torch.float64, device=ids.device)
    greedy = torch.ones(n_rows, dtype=torch.bool, device=ids.device)
    st = state
    for a, b in spans:
        logits, st = model(ids[:, a:b], state=st, lengths=lengths_arg)
        logits = logits.float()
        t = tgt[:, a:b]
        # log p(target) = logit(target) - logsumexp(logits): no [B, T, V] log-softmax is materialised
        lp = logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        real = torch.arange(a, b, device=ids.device)[None, :] < lengths[:, None]
        total += torch.where(real, lp, torch.zeros((), device=lp.device)).double().sum(1)
        greedy &= ((logits.argmax(-1) == t) | ~real).all(1)
    return [(float(v), bool(g)) for v, g in zip(total.tolist(), greedy.tolist(), strict=True)]


class _Bar:
    """A rich progress bar on stderr with items per second (no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, what: str) -> None:
        self.enabled = enabled and total > 0
        self.done = 0
        self.t0 = time.perf_counter()
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn(f"[bold]{what}[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:,.1f} items/s"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task(what, total=total, rate=0.0)

    def __enter__(self) -> _Bar:
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

    def advance(self, n: int) -> None:
        self.done += n
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=self.done, rate=rate)


@torch.no_grad()
def loglikelihood_tokens(
    model: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    state: State | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_rows: int | None = None,
    state_memory_mb: float = DEFAULT_STATE_MEMORY_MB,
    progress: bool = False,
    on_result: Callable[[int, tuple[float, bool]], None] | None = None,
) -> list[tuple[float, bool]]:
    """:func:`loglikelihood` on token ids: ``pairs[i] = (context ids (>= 1 token), continuation ids)``.

    An empty continuation scores ``(0.0, True)``. ``on_result(i, result)`` is called as each result is known
    (the lm-eval adapter feeds its cache with it).
    """
    _check_budget(batch_tokens, max_rows)
    start = _check_start(model, state)
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    members: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        ctx, cont = tuple(int(t) for t in ctx), tuple(int(t) for t in cont)
        if not ctx:
            raise ValueError(f"request {i}: the context needs at least one token (use the prefix token)")
        if not cont:
            results[i] = (0.0, True)
            continue
        members.setdefault(ctx, []).append(i)
    contexts = list(members)
    held = _max_rows(model, state_memory_mb) if max_rows is None else min(max_rows, _max_rows(model, state_memory_mb))
    with _Bar(progress, len(pairs), "loglikelihood") as bar:
        bar.advance(sum(r is not None for r in results))
        for group in _buckets([len(c) - 1 for c in contexts], batch_tokens, held):
            # the context minus its last token, read once for all of its continuations
            ctx_state = _encode_rows(model, [contexts[k][:-1] for k in group], start, batch_tokens)
            rows = [(j, i) for j, k in enumerate(group) for i in members[contexts[k]]]
            for sub in _buckets([len(pairs[i][1]) for _, i in rows], batch_tokens, max_rows):
                picked = [rows[s] for s in sub]
                inputs = [(contexts[group[j]][-1], *tuple(pairs[i][1])[:-1]) for j, i in picked]
                targets = [tuple(pairs[i][1]) for _, i in picked]
                st = ctx_state.select([j for j, _ in picked])
                for (_, i), res in zip(picked, _score_rows(model, inputs, targets, st, batch_tokens), strict=True):
                    results[i] = res
                    if on_result is not None:
                        on_result(i, res)
                bar.advance(len(picked))
    return results  # type: ignore[return-value]


def loglikelihood(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    state: State | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_rows: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """``(Σ log p(continuation | context), is_greedy)`` for each ``(context, continuation)`` request.

    ``is_greedy`` is true when greedy decoding from the context would produce exactly the continuation's tokens.
    Tokenisation as :func:`encode_pair`; each distinct context is read once (see the module doc).

    Args:
        model: a statelab model.
        tokenizer: its tokenizer.
        requests: ``N`` ``(context, continuation)`` string pairs.
        state: batch-1 start state of every request (a skill or soup), or ``None`` (zero state).
        batch_tokens: padded positions per pass (``rows * longest row``).
        max_rows: at most this many rows per pass (``None``: only ``batch_tokens`` limits a pass).
        progress: show a progress bar on stderr.

    Returns:
        ``N`` ``(float, bool)`` pairs in input order.
    """
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    return loglikelihood_tokens(
        model, pairs, state=state, batch_tokens=batch_tokens, max_rows=max_rows, progress=progress
    )


@torch.no_grad()
def loglikelihood_rolling(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    state: State | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_rows: int | None = None,
    progress: bool = False,
) -> list[float]:
    """``Σ_t log p(token t | prefix token, tokens < t)`` over every token of each text (perplexity tasks).

    The whole text is read from the start state after the prefix token (BOS, else EOS); there are no windows, a
    state-space model having no maximum length (see the module doc). An empty text scores 0.0. Arguments as in
    :func:`loglikelihood`.
    """
    _check_budget(batch_tokens, max_rows)
    start = _check_start(model, state)
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got a single str")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"a loglikelihood_rolling request is a string; text {i} is a {type(t).__name__}")
    p = prefix_token_id(tokenizer)
    ids = [list(tokenizer.encode(t)) for t in texts]
    out: list[float] = [0.0] * len(ids)
    todo = [i for i, r in enumerate(ids) if r]
    with _Bar(progress, len(ids), "loglikelihood_rolling") as bar:
        bar.advance(len(ids) - len(todo))
        for sub in _buckets([len(ids[i]) for i in todo], batch_tokens, max_rows):
            picked = [todo[s] for s in sub]
            inputs = [[p, *ids[i][:-1]] for i in picked]
            st = None if start is None else start.expand(len(picked))
            for i, (lp, _) in zip(
                picked, _score_rows(model, inputs, [ids[i] for i in picked], st, batch_tokens), strict=True
            ):
                out[i] = lp
            bar.advance(len(picked))
    return out


@dataclass(frozen=True)
class GenRequest:
    """One greedy generation: stop strings (``until``) and a limit of new tokens (``max_gen_toks``)."""

    until: tuple[str, ...] = ()
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS


_GREEDY_ONLY = ("temperature", "do_sample")
# sampling knobs that mean nothing for greedy decoding: accepted, and moot
_MOOT = ("top_p", "top_k", "min_p", "repetition_penalty", "num_beams", "seed")


def parse_gen_kwargs(kwargs: Mapping[str, Any] | None, default_max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> GenRequest:
    """lm-eval generation kwargs -> :class:`GenRequest`.

    ``until`` (a string or a list of strings) and ``max_gen_toks`` (or its aliases ``max_new_tokens``,
    ``max_tokens``, ``max_completion_tokens``, in that priority, as lm-eval reads them). Decoding is greedy:
    ``do_sample=True`` or a temperature above 0 is refused.

    Raises:
        ValueError: sampling asked for, a bad ``until``, a bad token limit, or an unknown key.
    """
    kw = dict(kwargs or {})
    until = kw.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    if not isinstance(until, list | tuple) or any(not isinstance(s, str) for s in until):
        raise ValueError(f"until must be a string or a list of strings, got {until!r}")
    limit = None
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        v = kw.pop(key, None)
        if v is not None and limit is None:
            limit = v
    limit = default_max_gen_toks if limit is None else limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"max_gen_toks must be an int >= 0, got {limit!r}")
    temperature = kw.pop("temperature", 0.0)
    do_sample = kw.pop("do_sample", None)
    if do_sample or (temperature is not None and float(temperature) > 0 and do_sample is not False):
        raise ValueError(
            f"statelab decodes greedily; this request asks for sampling (do_sample={do_sample}, "
            f"temperature={temperature}): set do_sample=False or temperature=0"
        )
    for key in _MOOT:
        kw.pop(key, None)
    if kw:
        raise ValueError(f"unknown generation argument(s) {sorted(kw)}; statelab reads until and max_gen_toks")
    return GenRequest(tuple(s for s in until if s), limit)


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` before the first occurrence of any stop string."""
    for s in until:
        if s:
            text = text.split(s, 1)[0]
    return text


@torch.no_grad()
def generate_until(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, Mapping[str, Any] | GenRequest]],
    *,
    state: State | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_rows: int | None = None,
    state_memory_mb: float = DEFAULT_STATE_MEMORY_MB,
    progress: bool = False,
    stop_at_eos: bool = True,
) -> list[str]:
    """Greedy continuation of each ``(context, gen_kwargs)`` request, cut before its first stop string.

    ``gen_kwargs``: lm-eval's dict (``until``, ``max_gen_toks``; see :func:`parse_gen_kwargs`) or a
    :class:`GenRequest`. A row stops at EOS (``stop_at_eos``), at ``max_gen_toks`` new tokens, or once its text
    contains a stop string. Contexts are read in length-bucketed ragged batches (all but their last token
    without the output head), then decoded together, finished rows leaving the batch between steps; requests
    with the same context and settings are generated once. An empty context starts from the prefix token.

    ``batch_tokens`` and ``max_rows`` as in :func:`loglikelihood`.

    Returns:
        ``N`` strings in input order; each equals generating that request alone.
    """
    _check_budget(batch_tokens, max_rows)
    start = _check_start(model, state)
    jobs: dict[tuple[tuple[int, ...], GenRequest], list[int]] = {}
    for i, req in enumerate(requests):
        if not isinstance(req, tuple | list) or len(req) != 2 or not isinstance(req[0], str):
            raise TypeError(f"a generate_until request is (context: str, gen_kwargs: dict); request {i} is {req!r}")
        context, kw = req
        g = kw if isinstance(kw, GenRequest) else parse_gen_kwargs(kw)
        ids = tuple(int(t) for t in tokenizer.encode(context)) or (prefix_token_id(tokenizer),)
        jobs.setdefault((ids, g), []).append(i)
    keys = list(jobs)
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    vocab = getattr(tokenizer, "vocab_size", None)

    def text_of(toks: list[int]) -> str:
        return tokenizer.decode([t for t in toks if vocab is None or t < vocab])

    out: list[str] = [""] * len(requests)
    with _Bar(progress, len(requests), "generate_until") as bar:
        held = _max_rows(model, state_memory_mb)
        for group in _buckets(
            [len(k[0]) for k in keys], batch_tokens, held if max_rows is None else min(held, max_rows)
        ):
            st = _encode_rows(model, [keys[k][0][:-1] for k in group], start, batch_tokens)
            cur = torch.tensor([keys[k][0][-1] for k in group], dtype=torch.long, device=model.device)
            gen: list[list[int]] = [[] for _ in group]
            live = [j for j, k in enumerate(group) if keys[k][1].max_gen_toks > 0]
            if len(live) < len(group):
                st, cur = st.select(live), cur[live]
            while live:
                logits, st = model(cur[:, None], state=st)
                nxt = logits[:, -1].argmax(-1)
                keep = []
                for pos, (j, t) in enumerate(zip(live, nxt.tolist(), strict=True)):
                    g = keys[group[j]][1]
                    if eos is not None and t == eos:
                        continue
                    gen[j].append(t)
                    if len(gen[j]) >= g.max_gen_toks or (g.until and any(s in text_of(gen[j]) for s in g.until)):
                        continue
                    keep.append(pos)
                if len(keep) < len(live):
                    live = [live[p] for p in keep]
                    if keep:
                        st, nxt = st.select(keep), nxt[keep]
                cur = nxt
            for j, k in enumerate(group):
                text = _cut(text_of(gen[j]), keys[k][1].until)
                for i in jobs[keys[k]]:
                    out[i] = text
                bar.advance(len(jobs[keys[k]]))
    return out
