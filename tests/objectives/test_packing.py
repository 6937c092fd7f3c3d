import numpy as np
import pytest
import torch

from statelab.objectives import IGNORE, VOCAB, Example, NextTokenConfig, pack_example, pack_rows
from statelab.objectives.corruption import next_token


def ex(inp, tgt):
    return Example(input=np.array(inp, dtype=np.int64), target=np.array(tgt, dtype=np.int64))


def test_pack_example_matches_the_spec():
    tok, lab = pack_example(ex([4, 5, 6], [7, 8, 9]))
    assert tok.tolist() == [4, 5, 6, VOCAB.begin, 7, 8]
    assert lab.tolist() == [IGNORE, IGNORE, IGNORE, 7, 8, 9]


def test_next_token_labels_are_the_next_tokens():
    x = np.arange(40, 90, dtype=np.int64)
    tok, lab = pack_example(next_token(x, NextTokenConfig(), np.random.default_rng(0)))
    assert tok[0] == VOCAB.begin
    assert np.array_equal(lab[:-1], tok[1:])  # not a copy task: label t is token t+1
    assert np.array_equal(lab, x)


def test_rows_segments_masks_and_carry():
    items = [(ex([1, 2], [3, 4]), 0), (ex([], [5, 6, 7]), 1), (ex([8, 9, 10], [11]), 2), (ex([1], [2]), 3)]
    batch, carry = pack_rows(iter(items), seq_len=8, n_rows=1)
    assert batch.tokens.shape == (1, 8)
    assert batch.tokens[0].tolist() == [1, 2, VOCAB.begin, 3, VOCAB.begin, 5, 6, VOCAB.pad]
    assert batch.labels[0].tolist() == [IGNORE, IGNORE, 3, 4, 5, 6, 7, IGNORE]
    assert batch.segment_ids[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
    assert batch.seq_start[0].tolist() == [True, False, False, False, True, False, False, False]
    assert batch.is_prefix[0].tolist() == [True, True, False, False, False, False, False, False]
    assert batch.config_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1, -1]
    assert batch.counted_tokens == 7 and batch.loss_tokens == 5
    assert len(carry) == 1 and carry[0][1] == 2
    # the loss never covers a prefix position or padding
    assert not (batch.is_prefix & (batch.labels != IGNORE)).any()
    assert (batch.labels[batch.segment_ids == 0] == IGNORE).all()


def test_too_long_example_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows(iter([(ex(list(range(10)), [1]), 0)]), seq_len=8)


def test_all_rows_present_when_examples_run_out():
    batch, carry = pack_rows(iter([(ex([1], [2]), 0)]), seq_len=8, n_rows=3)
    assert batch.tokens.shape == (3, 8) and carry == []
    assert torch.equal(batch.segment_ids[1:], torch.zeros(2, 8, dtype=torch.long))


def test_packer_streams_every_example_once_across_batches():
    from statelab.objectives import Packer

    items = ((ex([i % 200], [i % 200, 1]), i) for i in range(1000))
    p = Packer(items, seq_len=10)
    seen = []
    for _ in range(5):
        b = p.next_batch(4)
        for row_c, row_s in zip(b.config_ids, b.seq_start, strict=True):
            seen += row_c[row_s].tolist()
    assert seen == list(range(len(seen))) and len(seen) == 5 * 4 * 3
