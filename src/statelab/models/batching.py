"""Many texts through a model at once: length-bucketed ragged batches under a token budget.

``encode_texts(model, tokenizer, texts)`` gives the state after each text, as if each had been encoded alone, but
runs them in few passes: the texts are sorted by length, cut into groups whose padded size ``rows * longest`` stays
under ``batch_tokens`` and whose rows are each at least three quarters real tokens (:func:`length_buckets`), and
each group runs as one right-padded batch with ``lengths`` (see :mod:`statelab.models.base`: a row of a padded
batch gets exactly the state it gets alone, up to fp32 round-off of the batched matrix products). Sorting first
keeps the padding small: a group holds texts of similar length, so most of the ``rows * longest`` positions it
pays for are real tokens.

Example:
    >>> import statelab
    >>> model, tok = statelab.load_model("embedded"), statelab.load_tokenizer("embedded")   # doctest: +SKIP
    >>> states = statelab.encode_texts(model, tok, ["Q: cat\\nA: CAT\\n\\n", "Q: a\\nA: A\\n\\n"])  # doctest: +SKIP
    >>> [s.n_tokens for s in states]                                                          # doctest: +SKIP
    [16, 14]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from statelab.errors import StateMismatchError
from statelab.state.core import State

__all__ = [
    "length_buckets",
    "encode_texts",
    "tokenize_texts",
    "EmptyTextError",
    "DEFAULT_BATCH_TOKENS",
    "DEFAULT_MAX_PAD",
]

DEFAULT_BATCH_TOKENS = 8192
# a row may be padded by at most this share of its batch's width (see length_buckets)
DEFAULT_MAX_PAD = 0.25
# texts tokenized per encode_batch call: bounds the padded [chunk, longest] tensor a tokenizer builds
_TOKENIZE_CHUNK = 1024


def length_buckets(
    lengths: Sequence[int] | torch.Tensor, batch_tokens: int, max_pad: float = DEFAULT_MAX_PAD
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches of similar length with ``max_len * rows <= batch_tokens``.

    The indices are sorted by length, longest first (ties in index order), and cut greedily: a batch takes the
    next index while its padded size, ``rows * width`` (``width``: the length of its first, longest, index), stays
    within the budget and the new row's padding, ``width - length``, is at most ``max_pad * width``. A single
    length above ``batch_tokens`` gets a batch of its own (it cannot be split). Longest first means the largest
    batch in memory comes first, so a budget that is too large fails at once rather than at the end.

    Why the padding cap: a pass costs about ``rows * width`` token steps (on a CPU exactly that), so a few texts
    of very different lengths in one batch would cost more than running them one by one; with many texts the
    budget cuts first and the cap rarely matters.

    Args:
        lengths: ``[N]`` token counts, each ``>= 1``.
        batch_tokens: the budget of padded positions per batch, ``>= 1``.
        max_pad: the largest share of a batch's width a row may spend on padding, in ``[0, 1]`` (1: no cap).

    Returns:
        A list of batches, each a list of indices into ``lengths``; every index appears exactly once. Within a
        batch and from one batch to the next, lengths never increase.

    >>> length_buckets([3, 10, 4, 9, 1], batch_tokens=20, max_pad=1.0)
    [[1, 3], [2, 0, 4]]
    >>> length_buckets([3, 10, 4, 9, 1], batch_tokens=20)
    [[1, 3], [2, 0], [4]]
    """
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be an int >= 1, got {batch_tokens!r}")
    if isinstance(max_pad, bool) or not isinstance(max_pad, (int, float)) or not 0 <= max_pad <= 1:
        raise ValueError(f"max_pad must be a number in [0, 1], got {max_pad!r}")
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    lens = list(lengths)
    bad = [i for i, n in enumerate(lens) if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad:
        raise ValueError(f"lengths must be ints >= 1; entries {bad[:5]} are {[lens[i] for i in bad[:5]]}")
    order = sorted(range(len(lens)), key=lambda i: (-lens[i], i))
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            width = lens[buckets[-1][0]]
            if (len(buckets[-1]) + 1) * width <= batch_tokens and width - lens[i] <= max_pad * width:
                buckets[-1].append(i)
                continue
        buckets.append([i])
    return buckets


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[torch.Tensor]:
    """The token ids of each text, ``[n_i]`` int64 each, in input order (no BOS is added).

    Uses ``tokenizer.encode_batch`` (``(ids [B, T] right-padded, lengths [B])``) when the tokenizer has it, in
    chunks of texts, else ``tokenizer.encode`` text by text. Raises ``ValueError`` naming the first text that gives
    no tokens (and how many more do).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got a single str; wrap it in a list")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts must be strings; text {i} is a {type(t).__name__}")
    _refuse_empty([i for i, t in enumerate(texts) if not t])
    rows: list[torch.Tensor] = []
    batch_fn = getattr(tokenizer, "encode_batch", None)
    if callable(batch_fn):
        for start in range(0, len(texts), _TOKENIZE_CHUNK):
            chunk = texts[start : start + _TOKENIZE_CHUNK]
            try:
                ids, lengths = batch_fn(chunk)
            except ValueError:
                # a non-empty text that gives no tokens: name it by its index in ``texts``, not in the chunk
                _refuse_empty([start + j for j, t in enumerate(chunk) if not list(tokenizer.encode(t))])
                raise
            ids, lengths = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(lengths, dtype=torch.long)
            if ids.dim() != 2 or ids.shape[0] != len(chunk) or tuple(lengths.shape) != (len(chunk),):
                raise ValueError(
                    f"tokenizer.encode_batch returned ids {tuple(ids.shape)} and lengths {tuple(lengths.shape)} "
                    f"for {len(chunk)} texts; expected [{len(chunk)}, T] and [{len(chunk)}]"
                )
            rows += [ids[b, :n].clone() for b, n in enumerate(lengths.tolist())]
    else:
        rows = [torch.tensor(list(tokenizer.encode(t)), dtype=torch.long) for t in texts]
    _refuse_empty([i for i, r in enumerate(rows) if r.numel() == 0])
    return rows


class EmptyTextError(ValueError):
    """Some texts give no tokens; ``indices`` lists them (positions in the caller's ``texts``)."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)
        more = f", and {len(self.indices) - 1} more" if len(self.indices) > 1 else ""
        super().__init__(
            f"text {self.indices[0]} is empty (no tokens){more}; every text needs at least one token: "
            "drop the empty ones"
        )


def _refuse_empty(empty: list[int]) -> None:
    if empty:
        raise EmptyTextError(empty)


def _progress(enabled: bool, n_texts: int, n_tokens: int):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]encode[/bold]"),
        BarColumn(),
        TextColumn("{task.fields[texts]}/" + f"{n_texts} texts"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout stays clean for whatever the caller prints (JSON, tables)
        disable=not enabled,
    )
    return progress, progress.add_task("encode", total=n_tokens, texts=0, tps=0.0)


@torch.no_grad()
def encode_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    state: State | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = False,
) -> list[State]:
    """The state after each text, each from ``state`` (or zeros), computed in length-bucketed ragged batches.

    Args:
        model: a statelab model (``model.encode(ids, state=..., lengths=...)``).
        tokenizer: its tokenizer (``encode_batch`` is used when present, else ``encode``).
        texts: ``N`` strings, each of at least one token.
        state: a batch-1 state of ``model`` that every text continues from (a shared prefix, a skill), or ``None``
            for the zero state.
        batch_tokens: padded positions per batch (``rows * longest row``); a text longer than this runs alone.
            Peak memory grows with it; throughput stops growing once a batch fills the machine. Rows are grouped
            by :func:`length_buckets` (a row is padded by at most ``DEFAULT_MAX_PAD`` of its batch's width).
        progress: show a progress bar (texts done, tokens per second) on stderr.

    Returns:
        ``N`` batch-1 states in input order; ``states[i]`` is after ``texts[i]`` (``tokens == (n_start + n_i,)``)
        and equals ``model.encode(tokenize(texts[i]), state=state)`` up to fp32 round-off, with the same token
        count. Each state owns its tensors (none is a view of a batch).

    Raises:
        EmptyTextError: (a ``ValueError``) texts that give no tokens, listed in ``.indices``.
        ValueError: a bad ``batch_tokens``.
        TypeError: ``texts`` is a single string or holds a non-string.
        StateMismatchError: ``state`` is not a batch-1 state of this model.
    """
    rows = tokenize_texts(tokenizer, texts)
    lengths = [int(r.numel()) for r in rows]
    buckets = length_buckets(lengths, batch_tokens)
    device = model.device
    if state is not None:
        if not isinstance(state, State):
            raise StateMismatchError(f"state must be a statelab.State, got {type(state).__name__}")
        if state.batch_size != 1:
            raise StateMismatchError(
                f"state is the common start of every text and must have batch 1, got batch {state.batch_size}; "
                "pick one row with state.select(i)"
            )
        model.check_state(state, batch_size=1)
        state = state.to(device=device)
    out: list[State | None] = [None] * len(rows)
    bar, task = _progress(progress, len(rows), sum(lengths))
    t0, done_tokens, done_texts = time.perf_counter(), 0, 0
    with bar:
        for idx in buckets:
            width = lengths[idx[0]]  # buckets are longest first
            ids = torch.zeros(len(idx), width, dtype=torch.long)  # padding id is irrelevant: lengths mask it
            for j, i in enumerate(idx):
                ids[j, : lengths[i]] = rows[i]
            lt = torch.tensor([lengths[i] for i in idx], dtype=torch.long)
            start = None if state is None else state.expand(len(idx))
            batch = model.encode(ids.to(device), state=start, lengths=lt.to(device))
            for j, i in enumerate(idx):
                out[i] = batch.select(j)  # index_select copies: the batch buffer is not kept alive
            done_tokens += int(lt.sum())
            done_texts += len(idx)
            tps = done_tokens / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=done_tokens, texts=done_texts, tps=tps)
    return out  # type: ignore[return-value]
