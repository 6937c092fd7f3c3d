"""Packing objective examples into fixed-length rows with segment ids, loss labels and prefix/suffix masks.

One example ``(input, target)`` becomes ``tokens = input ++ [BEGIN] ++ target[:-1]`` and
``labels = [-100] * len(input) ++ target``, so ``labels[t]`` is the token that follows position ``t`` and the loss
covers the target only. Example: ``(4, 5, 6) -> (7, 8, 9)`` packs to tokens ``4 5 6 BEGIN 7 8`` and labels
``- - - 7 8 9``.

A row of ``T`` positions holds several examples one after another:

* ``segment_ids [T]``: 1, 2, ... per example, 0 on padding;
* ``seq_start [T]``: True at each example's first token (the forward state and the conv window restart there);
* ``is_prefix [T]``: True on the input part (the bidirectional layers' reverse scan runs there only);
* ``config_ids [T]``: index of the objective config that made the example, -1 on padding;
* padding: token ``VOCAB.pad``, label -100.

An example that does not fit the space left in a row starts the next row; the rest of the row is padding
(counted tokens exclude padding: the paper's A.11 accounting counts context and target tokens).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from statelab.objectives.base import VOCAB, Example, Vocab

__all__ = ["IGNORE", "PackedBatch", "pack_example", "pack_rows", "Packer"]

IGNORE = -100


@dataclass(frozen=True)
class PackedBatch:
    """Packed rows, all ``[B, T]``: ``tokens`` and ``labels`` int64, ``segment_ids`` and ``config_ids`` int64,
    ``seq_start`` and ``is_prefix`` bool."""

    tokens: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    seq_start: torch.Tensor
    is_prefix: torch.Tensor
    config_ids: torch.Tensor

    @property
    def counted_tokens(self) -> int:
        """Non-padding tokens (context plus target)."""
        return int((self.segment_ids > 0).sum())

    @property
    def loss_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def pack_example(ex: Example, vocab: Vocab = VOCAB) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, labels)`` of one example, both ``[len(input) + len(target)]``."""
    if ex.target.shape[0] < 1:
        raise ValueError("an example needs a target of at least one token")
    tokens = np.concatenate([ex.input, [vocab.begin], ex.target[:-1]]).astype(np.int64)
    labels = np.concatenate([np.full(ex.input.shape[0], IGNORE), ex.target]).astype(np.int64)
    return tokens, labels


def pack_rows(
    examples: Iterable[tuple[Example, int]], seq_len: int, vocab: Vocab = VOCAB, n_rows: int | None = None
) -> tuple[PackedBatch, list[tuple[Example, int]]]:
    """Pack ``(example, config_id)`` pairs in order into rows of ``seq_len``.

    Stops after ``n_rows`` rows when given: the example that overflowed the last row is returned as the
    carry-over and the rest stay unread in ``examples``' iterator. Without ``n_rows`` it packs until the examples
    run out. An example longer than ``seq_len`` raises ``ValueError``.
    """
    rows: list[dict[str, np.ndarray]] = []
    carry: list[tuple[Example, int]] = []

    def new_row() -> dict[str, np.ndarray]:
        return {
            "tokens": np.full(seq_len, vocab.pad, dtype=np.int64),
            "labels": np.full(seq_len, IGNORE, dtype=np.int64),
            "segment_ids": np.zeros(seq_len, dtype=np.int64),
            "seq_start": np.zeros(seq_len, dtype=bool),
            "is_prefix": np.zeros(seq_len, dtype=bool),
            "config_ids": np.full(seq_len, -1, dtype=np.int64),
        }

    row = new_row()
    pos, seg = 0, 0
    it = iter(examples)
    for ex, cid in it:
        n = ex.packed_length
        if n > seq_len:
            raise ValueError(f"example of {n} packed tokens does not fit a row of {seq_len}")
        if pos + n > seq_len:
            rows.append(row)
            if n_rows is not None and len(rows) == n_rows:
                carry = [(ex, cid)]
                break
            row, pos, seg = new_row(), 0, 0
        tok, lab = pack_example(ex, vocab)
        seg += 1
        sl = slice(pos, pos + n)
        row["tokens"][sl] = tok
        row["labels"][sl] = lab
        row["segment_ids"][sl] = seg
        row["seq_start"][pos] = True
        row["is_prefix"][pos : pos + ex.input.shape[0]] = True
        row["config_ids"][sl] = cid
        pos += n
    else:
        if pos > 0:
            rows.append(row)
    if n_rows is not None:
        while len(rows) < n_rows:
            rows.append(new_row())
    if not rows:
        rows.append(new_row())
    return (
        PackedBatch(**{k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}),
        carry,
    )


class Packer:
    """Streams rows from a generator of ``(example, config_id)``, carrying examples that did not fit.

    ``next_batch(B)`` returns ``B`` full rows; the example that overflowed the last row opens the next batch.
    """

    def __init__(self, examples: Iterable[tuple[Example, int]], seq_len: int, vocab: Vocab = VOCAB) -> None:
        self.seq_len = seq_len
        self.vocab = vocab
        self._it = iter(examples)
        self._carry: list[tuple[Example, int]] = []

    def next_batch(self, batch_size: int) -> PackedBatch:
        """``batch_size`` rows packed from the carried example and then the stream."""
        # itertools.chain, not a generator with ``yield from``: closing that would close the source stream too
        stream = itertools.chain(self._carry, self._it)
        batch, self._carry = pack_rows(stream, self.seq_len, self.vocab, n_rows=batch_size)
        return batch
