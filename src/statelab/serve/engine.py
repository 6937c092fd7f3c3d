"""The batched decoding engine behind ``statelab serve``: one thread owns the model and decodes every active
request together, one token per step.

Each choice of a request is a *row*. Between decode steps the engine

1. drops the rows of cancelled requests (a client that went away) with ``State.select``;
2. admits waiting rows while fewer than ``max_batch`` are active: their prompts are looked up in the prefix cache
   (:mod:`statelab.serve.cache`), the rest of each prompt is read in ragged prefill batches (right padding with
   ``lengths``, each row from its own start state: a cached prefix, a skill, a soup or none), the states after
   every block boundary are kept in the cache, the first token is sampled from the prompt's last logits, and the
   new rows' states are joined to the running batch with ``State.cat``;
3. runs one step for all active rows, ``model(tokens[:, None], state)``, samples each row's next token and
   removes finished rows with ``state.select``.

Rows never wait for each other: a row joins at the step after its prompt is read and leaves as soon as it is
done. Greedy rows give exactly the tokens of ``model.generate`` on the prompt alone (up to fp32 round-off in
batched matrix products, which moves no argmax in practice); a sampled row draws from its own
``torch.Generator`` seeded with the request's seed (``seed + j`` for choice ``j``), through the same sampling code
as ``generate``, so the rows it shares a batch with never change its tokens.

The engine reports through a *sink*: a callable given with each request, called on the engine thread with a
:class:`Delta` per choice per step (or a :class:`Failure`), which must return quickly. A sink that raises cancels
its request.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from statelab.models.base import StatefulLM, _pick
from statelab.serve.cache import CachedPrefix, PrefixCache, state_digest
from statelab.state.core import State

__all__ = [
    "SamplingParams",
    "TokenLogprob",
    "Delta",
    "Failure",
    "GenerationRequest",
    "Engine",
    "EngineStats",
    "BATCH_BUCKETS",
    "embedding_rows",
]

log = logging.getLogger("statelab.serve")

# upper bounds of the decode batch-size histogram
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class SamplingParams:
    """How one request's rows are generated (checked by :mod:`statelab.serve.protocol` before they get here).

    Attributes:
        max_tokens: new tokens at most per choice (``>= 0``).
        temperature: 0 for greedy, else the softmax temperature.
        top_p: nucleus mass in ``(0, 1]`` (1 = no filtering).
        stop: strings that end a choice; the text is cut before the first one found.
        logprobs: ``None``, or how many most likely tokens to report beside each sampled one (``0`` = only the
            sampled token's log-probability).
        seed: seeds the generator of choice ``j`` with ``seed + j``; ``None`` = a fresh random seed per request.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probabilities at one generated position (natural log, from the raw logits: no temperature, no top-p).

    Attributes:
        token_id: the sampled token.
        text: its text alone (``"<|token:ID|>"`` for a token with no text of its own, such as EOS).
        logprob: its log-probability.
        top: ``(token_id, text, logprob)`` of the ``k`` most likely tokens, most likely first.
        offset: where its text starts in the choice's text (characters).
    """

    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]
    offset: int


@dataclass(frozen=True)
class Delta:
    """What one step added to one choice.

    Attributes:
        index: the choice (``prompt_index * n + j``).
        text: new text, safe to show: held back while it could still become the start of a stop string or an
            unfinished UTF-8 character, flushed when the choice finishes. The deltas of a choice concatenate to
            its final text.
        token_ids: tokens produced in this step (one, or none for ``max_tokens = 0``).
        logprobs: one entry per token of ``token_ids`` when the request asked for log-probabilities.
        finish_reason: ``None`` while running, then ``"stop"`` (EOS or a stop string) or ``"length"``.
        prompt_tokens: tokens of this choice's prompt.
        cached_tokens: of those, how many came from the prefix cache instead of being read.
        completion_tokens: tokens produced so far by this choice.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failure:
    """The engine could not finish a request (a model error, or the server stopping)."""

    message: str


Sink = Callable[[Delta | Failure], None]


class GenerationRequest:
    """One completion call: ``prompts`` (token ids, each non-empty) x ``n`` choices from one start state.

    Args:
        prompts: token ids of each prompt.
        params: sampling settings shared by every choice.
        sink: receives the deltas (see the module doc).
        n: choices per prompt.
        start: batch-1 state to read every prompt from (a skill or a soup), or ``None`` for the zero state.
        start_key: identity of ``start`` for the prefix cache; computed from its tensors when not given.
    """

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        sink: Sink,
        *,
        n: int = 1,
        start: State | None = None,
        start_key: str | None = None,
    ) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if start is not None and start.batch_size != 1:
            raise ValueError(f"the start state must have batch size 1, got {start.batch_size}")
        self.prompts = [list(map(int, p)) for p in prompts]
        self.params = params
        self.n = n
        self.start = start
        self.start_key = start_key if start_key is not None else state_digest(start)
        self._sink = sink
        self._cancelled = threading.Event()
        self.created = time.monotonic()

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def cancel(self) -> None:
        """Stop generating for this request; its rows are freed before the engine's next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Delta | Failure) -> None:
        if self.cancelled:
            return
        try:
            self._sink(event)
        except Exception:  # a sink that cannot deliver (closed event loop): nobody is listening any more
            log.debug("sink failed; cancelling request", exc_info=True)
            self.cancel()


@dataclass
class _Row:
    """One choice being generated."""

    req: GenerationRequest
    index: int
    prompt: list[int]
    gen: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already reported
    text_len: int = 0  # length of the full decoded text so far (offsets of log-probabilities)
    pending: int = -1  # the sampled token the next step feeds
    cached_tokens: int = 0
    done: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.req.params


@dataclass
class _Job:
    """One distinct (start state, prompt) to read; several rows (choices) may share it.

    ``start`` is the state after ``prompt[:skip]``: the request's start state (``skip = 0``) or a cached prefix
    (``skip = jK - 1``, see :mod:`statelab.serve.cache`).
    """

    rows: list[_Row]
    prompt: list[int]
    keys: list[bytes]
    start: State | None
    skip: int

    @property
    def new(self) -> list[int]:
        return self.prompt[self.skip :]


class EngineStats:
    """Counters of the engine (updated on the engine thread, read from anywhere)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.steps = 0
        self.rows_stepped = 0
        self.max_rows = 0
        self.batch_hist = [0] * (len(BATCH_BUCKETS) + 1)  # last slot: above the largest bucket
        self.prefill_batches = 0
        self.prefill_rows = 0
        self.tokens_read = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.rows_admitted = 0
        self.rows_finished: dict[str, int] = {"stop": 0, "length": 0}
        self.rows_cancelled = 0
        self.rows_failed = 0
        self.step_seconds = 0.0
        self.prefill_seconds = 0.0

    def record_step(self, rows: int, seconds: float) -> None:
        with self._lock:
            self.steps += 1
            self.rows_stepped += rows
            self.max_rows = max(self.max_rows, rows)
            self.step_seconds += seconds
            i = next((k for k, b in enumerate(BATCH_BUCKETS) if rows <= b), len(BATCH_BUCKETS))
            self.batch_hist[i] += 1

    def add(self, **counts: float) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def finished(self, reason: str) -> None:
        with self._lock:
            self.rows_finished[reason] = self.rows_finished.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "decode_steps": self.steps,
                "decode_rows": self.rows_stepped,
                "decode_batch_max": self.max_rows,
                "decode_batch_mean": self.rows_stepped / self.steps if self.steps else 0.0,
                "decode_batch_histogram": dict(zip([*map(str, BATCH_BUCKETS), "+Inf"], self.batch_hist, strict=True)),
                "decode_seconds": self.step_seconds,
                "prefill_batches": self.prefill_batches,
                "prefill_rows": self.prefill_rows,
                "prefill_seconds": self.prefill_seconds,
                "prompt_tokens": self.prompt_tokens,
                "prompt_tokens_read": self.tokens_read,
                "prompt_tokens_cached": self.cached_tokens,
                "completion_tokens": self.completion_tokens,
                "rows_admitted": self.rows_admitted,
                "rows_finished": dict(self.rows_finished),
                "rows_cancelled": self.rows_cancelled,
                "rows_failed": self.rows_failed,
            }


class Engine:
    """Owns ``model`` on one thread and generates for every submitted request in ragged batches.

    Args:
        model: a statelab language model (``eval`` mode is set).
        tokenizer: its tokenizer (``decode`` for text and stop strings, ``eos_token_id`` ends a choice).
        max_batch: rows decoded together at most (1 serves one choice at a time).
        cache: the prefix-state cache (``None``: no caching).
        prefill_tokens: padded tokens per prefill batch at most (rows x longest new part); a longer prompt is
            read alone.
        logit_floats: a prefill batch computes the logits of all its positions only while they are at most this
            many floats (rows x positions x vocabulary); beyond it, only the last position's, at the cost of one
            more call (see ``_prefill``). The head over all positions costs ``2 x floats x d_model`` FLOPs: at the
            default 2^20 that is about one decode step of a 130m model, and nothing for a byte-level one.

    Use ``start()`` / ``stop()`` (or ``with Engine(...)``), ``submit(request)``, and ``call(fn)`` to run
    ``fn(model)`` on the engine thread between steps (encoding a skill, for instance).
    """

    def __init__(
        self,
        model: StatefulLM,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        cache: PrefixCache | None = None,
        prefill_tokens: int = 16384,
        logit_floats: int = 1 << 20,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.cache = cache if cache is not None else PrefixCache(0, 256)
        self.prefill_tokens = prefill_tokens
        self.logit_floats = logit_floats
        self._vocab_rows = embedding_rows(model) or 1
        self.stats = EngineStats()
        self._vocab = getattr(tokenizer, "vocab_size", None)
        self._eos = getattr(tokenizer, "eos_token_id", None)
        self._pad = getattr(tokenizer, "pad_token_id", None) or 0
        self._cond = threading.Condition()
        self._waiting: deque[_Row] = deque()
        self._calls: deque[tuple[Callable[[StatefulLM], Any], Future]] = deque()
        self._rows: list[_Row] = []
        self._state: State | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> Engine:
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="statelab-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, fail every unfinished request with a ``Failure`` and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, req: GenerationRequest) -> None:
        """Queue every choice of ``req``; deltas start arriving at its sink once rows are admitted.

        Raises ``StateMismatchError`` (and queues nothing) when the request's start state is not this model's.
        """
        if not self.running:
            raise RuntimeError("the engine is not running; call start() first")
        if req.start is not None:  # refused here, before it could fail a whole prefill batch
            self.model.check_state(req.start.to(device=self.model.device), batch_size=1)
        rows = []
        for p, prompt in enumerate(req.prompts):
            for j in range(req.n):
                gen = None
                if req.params.temperature > 0:
                    gen = torch.Generator(device=self.model.device)
                    seed = req.params.seed if req.params.seed is not None else secrets.randbits(62)
                    gen.manual_seed(seed + j)
                rows.append(_Row(req=req, index=p * req.n + j, prompt=prompt, gen=gen))
        with self._cond:
            self._waiting.extend(rows)
            self._cond.notify_all()

    def call(self, fn: Callable[[StatefulLM], Any]) -> Future:
        """Run ``fn(model)`` on the engine thread between two steps; the future holds its result or exception."""
        fut: Future = Future()
        with self._cond:
            if self._stopping or not self.running:
                fut.set_exception(RuntimeError("the engine is not running"))
                return fut
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    @property
    def active_rows(self) -> int:
        return len(self._rows)

    @property
    def waiting_rows(self) -> int:
        return len(self._waiting)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # per thread: nothing the engine runs needs autograd
        while True:
            with self._cond:
                while not (self._stopping or self._rows or self._waiting or self._calls):
                    self._cond.wait()
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.model))
                    except BaseException as e:  # handed to the caller through the future
                        fut.set_exception(e)
            self._drop_cancelled()
            try:
                self._admit()
            except Exception:
                log.error("prefill failed:\n%s", traceback.format_exc())
            if self._rows:
                try:
                    self._step()
                except Exception as e:
                    log.error("decode step failed:\n%s", traceback.format_exc())
                    self._fail(self._rows, f"the model failed during decoding: {e}")
                    self._rows, self._state = [], None
        self._shutdown()

    def _shutdown(self) -> None:
        with self._cond:
            rows = [*self._rows, *self._waiting]
            self._waiting.clear()
            calls = list(self._calls)
            self._calls.clear()
        self._fail(rows, "the server is shutting down")
        self._rows, self._state = [], None
        for _, fut in calls:
            fut.cancel()

    def _fail(self, rows: Sequence[_Row], message: str) -> None:
        seen: set[int] = set()
        for r in rows:
            r.done = True
            self.stats.add(rows_failed=1)
            if id(r.req) not in seen:
                seen.add(id(r.req))
                r.req.emit(Failure(message))
                r.req.cancel()

    def _drop_cancelled(self) -> None:
        with self._cond:
            if any(r.req.cancelled for r in self._waiting):
                kept = [r for r in self._waiting if not r.req.cancelled]
                self.stats.add(rows_cancelled=len(self._waiting) - len(kept))
                self._waiting = deque(kept)
        keep = [i for i, r in enumerate(self._rows) if not r.req.cancelled]
        if len(keep) < len(self._rows):
            self.stats.add(rows_cancelled=len(self._rows) - len(keep))
            self._rows = [self._rows[i] for i in keep]
            self._state = self._state.select(keep) if keep and self._state is not None else None

    def _take_waiting(self) -> list[_Row]:
        out: list[_Row] = []
        with self._cond:
            free = self.max_batch - len(self._rows)
            while free > 0 and self._waiting:
                row = self._waiting.popleft()
                if row.req.cancelled:
                    self.stats.add(rows_cancelled=1)
                    continue
                out.append(row)
                free -= 1
        return out

    def _admit(self) -> None:
        rows = self._take_waiting()
        if not rows:
            return
        self.stats.add(rows_admitted=len(rows))
        try:
            self._admit_rows(rows)
        except Exception as e:
            self._fail([r for r in rows if not r.done], f"the model failed while reading the prompt: {e}")
            raise

    def _admit_rows(self, rows: list[_Row]) -> None:
        jobs: dict[tuple[str, tuple[int, ...]], _Job] = {}
        for row in rows:
            if row.params.max_tokens == 0:
                self._finish_empty(row)
                continue
            key = (row.req.start_key, tuple(row.prompt))
            if key not in jobs:
                keys: list[bytes] = []
                hit = None
                if self.cache.enabled:
                    keys = self.cache.block_keys(row.req.start_key, row.prompt)
                    hit = self.cache.lookup(keys)
                if hit is None:
                    jobs[key] = _Job([], row.prompt, keys, row.req.start, 0)
                else:
                    jobs[key] = _Job([], row.prompt, keys, hit.state, hit.n_tokens - 1)
                self.stats.add(prompt_tokens=len(row.prompt), cached_tokens=jobs[key].skip)
            jobs[key].rows.append(row)
        if not jobs:
            return
        states: list[State] = []
        logits: list[torch.Tensor] = []
        order: list[_Row] = []
        for group in self._prefill_groups(list(jobs.values())):
            t0 = time.perf_counter()
            st, lg = self._prefill(group)
            self.stats.add(prefill_seconds=time.perf_counter() - t0)
            idx = [g for g, j in enumerate(group) for _ in j.rows]
            states.append(st.select(idx))
            logits.append(lg[idx])
            order.extend(r for j in group for r in j.rows)
        for j in jobs.values():
            for r in j.rows:
                r.cached_tokens = j.skip
        new_state = State.cat(states) if len(states) > 1 else states[0]
        self._advance(order, torch.cat(logits) if len(logits) > 1 else logits[0])
        keep = [i for i, r in enumerate(order) if not r.done]
        if not keep:
            return
        joined = new_state.select(keep) if len(keep) < len(order) else new_state
        self._rows.extend(order[i] for i in keep)
        self._state = joined if self._state is None else State.cat([self._state, joined])

    def _prefill_groups(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Jobs sorted by the length of what they read, cut into groups of at most ``prefill_tokens`` padded
        tokens (each group's rows x its longest new part; a job alone may exceed it)."""
        groups: list[list[_Job]] = []
        cur: list[_Job] = []
        for j in sorted(jobs, key=lambda j: len(j.new)):
            if cur and (len(cur) + 1) * len(j.new) > self.prefill_tokens:
                groups.append(cur)
                cur = []
            cur.append(j)
        if cur:
            groups.append(cur)
        return groups

    def _prefill(self, group: list[_Job]) -> tuple[State, torch.Tensor]:
        """Read each job's new tokens from its start; returns ``(state [G], logits of each last token [G, V])``.

        The same pass yields the states the cache keeps (one token before each block boundary). When the logits of
        every position would exceed ``logit_floats``, every token but the last is read without the output head and
        the last tokens in one more step with it, so the head runs on one position per prompt, not on all of them.
        """
        dev = self.model.device
        body = [len(j.new) - 1 for j in group]
        K = self.cache.block_tokens
        wants: list[tuple[int, int, bytes, int]] = []  # (row, position in this pass, key, prefix length)
        if self.cache.enabled:
            for g, j in enumerate(group):
                for b in range(1, len(j.prompt) // K + 1):
                    r = b * K - 1 - j.skip  # the kept state is after prompt[: bK - 1]
                    if r >= 0 and j.keys[b - 1] not in self.cache:
                        wants.append((g, r, j.keys[b - 1], b * K))
        if all(j.start is None for j in group):
            start = None
        else:
            zero = self.model.zero_state(1, device=dev)
            start = State.cat([zero if j.start is None else j.start.to(device=dev) for j in group])
        positions = sorted({r for _, r, _, _ in wants if r > 0})
        lens = [n + 1 for n in body]
        G = len(group)
        if G * max(lens) * self._vocab_rows <= self.logit_floats:
            # small enough to keep every position's logits: one pass, as generate reads a prompt
            out = self.model._run(self._padded([j.new for j in group], dev), start, positions or None, True,
                                  self._lengths(lens, dev))  # fmt: skip
            assert out.logits is not None
            state, at = out.state, out.states_at
            last = torch.tensor([n - 1 for n in lens], device=dev)
            logits = out.logits[torch.arange(G, device=dev), last]
        else:
            state, at = start, None
            if max(body) > 0:
                ids = self._padded([j.new[:-1] for j in group], dev)
                out = self.model._run(ids, start, positions or None, False, self._lengths(body, dev))
                state, at = out.state, out.states_at
            step, state = self.model(torch.tensor([[j.new[-1]] for j in group], dtype=torch.long, device=dev), state)
            logits = step[:, -1]
        for g, r, key, n in wants:
            if r == 0:  # a boundary right at the start (block size 1): the start state itself
                kept = start.select([g]) if start is not None else self.model.zero_state(1, device=dev)
            else:
                assert at is not None
                kept = at[positions.index(r)].select([g])
            self.cache.insert(key, CachedPrefix(kept, n))
        self.stats.add(prefill_batches=1, prefill_rows=G, tokens_read=sum(lens))
        return state, logits

    def _padded(self, rows: list[list[int]], dev: torch.device) -> torch.Tensor:
        """``rows`` right-padded into ``[len(rows), longest]`` (a row may be empty)."""
        ids = torch.full((len(rows), max(map(len, rows))), self._pad, dtype=torch.long, device=dev)
        for g, r in enumerate(rows):
            if r:
                ids[g, : len(r)] = torch.tensor(r, dtype=torch.long, device=dev)
        return ids

    @staticmethod
    def _lengths(lens: list[int], dev: torch.device) -> torch.Tensor | None:
        return None if all(n == max(lens) for n in lens) else torch.tensor(lens, dtype=torch.long, device=dev)

    def _step(self) -> None:
        rows = self._rows
        assert self._state is not None and self._state.batch_size == len(rows)
        t0 = time.perf_counter()
        tok = torch.tensor([r.pending for r in rows], dtype=torch.long, device=self.model.device)
        logits, self._state = self.model.step(tok, self._state)  # the model's decode path
        self._advance(rows, logits)
        self.stats.record_step(len(rows), time.perf_counter() - t0)
        keep = [i for i, r in enumerate(rows) if not r.done]
        if len(keep) < len(rows):
            self._rows = [rows[i] for i in keep]
            self._state = self._state.select(keep) if keep else None

    def _advance(self, rows: Sequence[_Row], logits: torch.Tensor) -> None:
        """Sample one token per row from ``logits [R, V]``, report it, and mark the rows that are done."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            p = row.params
            if p.temperature == 0:
                tok = greedy[i]
            else:
                top_p = p.top_p if p.top_p < 1 else None
                tok = int(_pick(logits[i : i + 1], p.temperature, None, top_p, row.gen)[0])
            lp = None
            if p.logprobs is not None:
                lp = self._logprob(logits[i], tok, p.logprobs, row.text_len)
            self._emit_token(row, tok, lp)

    def _logprob(self, logits: torch.Tensor, tok: int, k: int, offset: int) -> TokenLogprob:
        logp = torch.log_softmax(logits, dim=-1)
        top = []
        if k > 0:
            vals, ids = torch.topk(logp, min(k, logp.shape[-1]))
            top = [
                (int(i), self.token_text(int(i)), float(v)) for v, i in zip(vals.tolist(), ids.tolist(), strict=True)
            ]
        return TokenLogprob(tok, self.token_text(tok), float(logp[tok]), tuple(top), offset)

    def _emit_token(self, row: _Row, tok: int, lp: TokenLogprob | None) -> None:
        row.tokens.append(tok)
        row.pending = tok
        self.stats.add(completion_tokens=1)
        p = row.params
        full = self.decode(row.tokens)
        row.text_len = len(full)
        reason = None
        cut = _first_stop(full, p.stop)
        if cut is not None:
            reason, full = "stop", full[:cut]
        elif self._eos is not None and tok == self._eos:
            reason = "stop"
        elif len(row.tokens) >= p.max_tokens:
            reason = "length"
        end = len(full) if reason is not None else _stable_end(full, p.stop)
        text = full[row.sent : end] if end > row.sent else ""
        row.sent = max(row.sent, end)
        if reason is not None:
            row.done = True
            self.stats.finished(reason)
        row.req.emit(
            Delta(
                index=row.index,
                text=text,
                token_ids=(tok,),
                logprobs=None if lp is None else (lp,),
                finish_reason=reason,
                prompt_tokens=len(row.prompt),
                cached_tokens=row.cached_tokens,
                completion_tokens=len(row.tokens),
            )
        )

    def _finish_empty(self, row: _Row) -> None:
        row.done = True
        self.stats.finished("length")
        row.req.emit(
            Delta(row.index, "", (), () if row.params.logprobs is not None else None, "length", len(row.prompt), 0, 0)
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ids beyond the tokenizer's vocabulary (padding rows of the embedding) are dropped."""
        v = self._vocab
        return self.tokenizer.decode([i for i in ids if v is None or i < v])

    def token_text(self, token_id: int) -> str:
        """The text of one token alone, or ``"<|token:ID|>"`` for a token without text (EOS, padding)."""
        s = self.decode([token_id])
        return s if s else f"<|token:{token_id}|>"


def embedding_rows(model: Any) -> int | None:
    """How many token ids the model reads (its embedding rows; its logits have as many columns), or ``None``."""
    weight = getattr(getattr(model, "embedding", None), "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any of ``stops`` in ``text``, or ``None``."""
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


def _stable_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be shown while generation goes on: not a trailing U+FFFD (an unfinished UTF-8
    character may still complete), nor a tail that could become the start of a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), hold, -1):
            if text.endswith(s[:k], 0, end):
                hold = k
                break
    return end - hold
