"""Synthetic token tasks: determinism, disjoint streams, labels pointing at the right tokens."""

import doctest

import pytest
import torch

import statelab.tasks.synthetic as syn
from statelab.errors import ConfigError
from statelab.tasks.synthetic import (
    IGNORE_INDEX,
    SYNTHETIC_TASKS,
    CopyingConfig,
    MQARConfig,
    PhonebookConfig,
    SelectiveCopyingConfig,
    TextRecallConfig,
    make_copying,
    make_mqar,
    make_phonebook,
    make_selective_copying,
    make_text_recall,
    render_phonebook,
)

SMALL = {
    "mqar": MQARConfig(vocab_size=64, seq_len=63, num_kv_pairs=8),
    "phonebook": PhonebookConfig(n_entries=5, n_queries=3, n_digits=4),
    "copying": CopyingConfig(n_tokens=7, vocab_size=12),
    "selective_copying": SelectiveCopyingConfig(n_tokens=5, region_len=17, vocab_size=12),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_deterministic_and_split_streams_differ(name):
    cfg_cls, make = SYNTHETIC_TASKS[name]
    cfg = SMALL[name]
    assert isinstance(cfg, cfg_cls)
    a, b = make(cfg, 3, 4), make(cfg, 3, 4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, make(cfg, 4, 4).input_ids)
    assert not torch.equal(a.input_ids, make(cfg, 3, 4, split="test").input_ids)
    assert a.input_ids.dtype == a.labels.dtype == torch.long
    seq_len = cfg.seq_len
    assert a.input_ids.shape == a.labels.shape == (4, seq_len)
    # a label is always the next input token where both exist
    mask = a.labels[:, :-1] != IGNORE_INDEX
    assert torch.equal(a.labels[:, :-1][mask], a.input_ids[:, 1:][mask])
    assert (a.labels != IGNORE_INDEX).any()
    assert int(a.input_ids.max()) < getattr(cfg, "vocab_size", 10**9)


def test_global_rng_untouched():
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    make_mqar(SMALL["mqar"], 0, 2)
    assert torch.equal(torch.rand(3), before)


def test_mqar_labels_point_at_values():
    cfg = SMALL["mqar"]
    b = make_mqar(cfg, seed=5, batch_size=16)
    n = cfg.num_kv_pairs
    for ids, lab in zip(b.input_ids.tolist(), b.labels.tolist(), strict=True):
        keys, values = ids[0 : 2 * n : 2], ids[1 : 2 * n : 2]
        assert len(set(keys)) == n and all(1 <= k < 32 for k in keys) and all(32 <= v < 64 for v in values)
        kv = dict(zip(keys, values, strict=True))
        scored = [t for t in range(len(lab)) if lab[t] != IGNORE_INDEX]
        assert len(scored) == n and all(t >= 2 * n for t in scored)
        assert sorted(ids[t] for t in scored) == sorted(keys)  # every key queried once
        assert all(lab[t] == kv[ids[t]] for t in scored)
        assert all(ids[t] == 0 for t in range(2 * n, len(ids)) if t not in scored and t - 1 not in scored)


def test_mqar_random_filler_and_power_law():
    b = make_mqar(MQARConfig(vocab_size=64, seq_len=63, num_kv_pairs=8, filler="random"), seed=0, batch_size=4)
    assert (b.input_ids[:, 16:] != 0).float().mean() > 0.8
    # small a puts most queries near the context
    cfg = MQARConfig(vocab_size=512, seq_len=511, num_kv_pairs=4, power_a=0.01)
    lab = make_mqar(cfg, seed=0, batch_size=64).labels
    pos = (lab != IGNORE_INDEX).nonzero()[:, 1].float()
    assert pos.median() < 8 + (511 - 8) / 4


def test_phonebook_answers_are_the_book_numbers():
    cfg = SMALL["phonebook"]
    b = make_phonebook(cfg, seed=2, batch_size=8)
    for ids, lab in zip(b.input_ids, b.labels, strict=True):
        text = render_phonebook(cfg, ids)
        lines = text.split("\n")
        book = dict(line.split(": ") for line in lines[: cfg.n_entries])
        assert len(book) == cfg.n_entries
        queries = lines[cfg.n_entries :]
        answered = [int(t) - 4 for t in lab.tolist() if t != IGNORE_INDEX and 4 <= t < 14]
        expected = []
        for q in queries:
            name, number = q[2:].split(": ") if ": " in q else (q[2:].rstrip(":"), None)
            assert q.startswith("? ") and name in book
            if number is not None:
                assert number == book[name]
            expected += [int(c) for c in book[name]]
        assert answered == expected


def test_copying_and_selective_copying():
    cfg = SMALL["copying"]
    b = make_copying(cfg, seed=0, batch_size=3)
    n = cfg.n_tokens
    assert torch.equal(b.labels[:, n:], b.input_ids[:, :n])
    assert (b.labels[:, :n] == IGNORE_INDEX).all() and (b.input_ids[:, n] == 1).all()
    scfg = SMALL["selective_copying"]
    s = make_selective_copying(scfg, seed=0, batch_size=3)
    region = s.input_ids[:, : scfg.region_len]
    for row, lab in zip(region.tolist(), s.labels.tolist(), strict=True):
        assert [t for t in row if t != 0] == lab[scfg.region_len :]
        assert all(t == IGNORE_INDEX for t in lab[: scfg.region_len])


def test_text_recall_answers_repeat_the_context():
    from statelab.tasks import split_of

    cfg = TextRecallConfig(n_pairs=6, n_queries=5)
    for seed in range(10):
        doc = make_text_recall(cfg, seed, split="test")
        assert doc == make_text_recall(cfg, seed, split="test")
        shown = dict(doc.examples[:6])
        assert len(shown) == 6 and all(shown[x] == y for x, y in doc.examples[6:])
        assert all(split_of(x) == "test" and split_of(y) == "test" for x, y in doc.examples)
        raw = doc.text.encode("utf-8")
        got = [raw[s:e].decode() for s, e in doc.answer_byte_spans]
        assert got == [y for _, y in doc.examples[6:]] == [doc.text[s:e] for s, e in doc.answer_spans]
    assert make_text_recall(cfg, 0).text != make_text_recall(cfg, 0, split="test").text


def test_bad_configs():
    with pytest.raises(ConfigError, match="too short"):
        MQARConfig(seq_len=16, num_kv_pairs=8)
    with pytest.raises(ConfigError, match="keys"):
        MQARConfig(vocab_size=8, num_kv_pairs=8, seq_len=64)
    with pytest.raises(ConfigError):
        PhonebookConfig(n_entries=2, n_queries=3)
    with pytest.raises(ConfigError):
        CopyingConfig(n_tokens=0)
    with pytest.raises(ConfigError, match="split"):
        make_copying(CopyingConfig(), seed=0, batch_size=1, split="val")
    with pytest.raises(ConfigError, match="batch_size"):
        make_copying(CopyingConfig(), seed=0, batch_size=0)


def test_docstring_examples():
    result = doctest.testmod(syn)
    assert result.failed == 0 and result.attempted > 0


def test_phonebook_text_is_the_token_phonebook_as_text():
    """Row b of make_phonebook and item b of phonebook_text come from the same draws: same book, same queries."""
    cfg = PhonebookConfig(n_entries=6, n_queries=3, n_digits=5)
    tokens = make_phonebook(cfg, seed=4, batch_size=3, split="test")
    items = syn.phonebook_text(cfg, seed=4, batch_size=3, split="test")
    assert len(items) == 3 and items != syn.phonebook_text(cfg, seed=4, batch_size=3, split="train")
    for row, item in zip(tokens.input_ids, items, strict=True):
        shown = render_phonebook(cfg, row).splitlines()
        book, queries = shown[: cfg.n_entries], shown[cfg.n_entries :]
        lines = item.prompt.splitlines()
        assert lines[1] == "Phonebook:" and lines[0] == lines[-1] and lines[2:-1] == [b.strip() for b in book]
        asked = [q.lstrip("? ").split(":")[0] for q in queries]
        assert lines[0] == "Find: " + ", ".join(asked)
        entries = dict(b.strip().split(": ") for b in book)
        # the token sequence drops its last newline; its last query's digits are all there
        assert item.answer.split(", ") == [entries[a].replace(" ", "") for a in asked]


def test_mqar_text_is_the_token_mqar_as_text():
    """The text pairs are the token context's pairs; the queried keys are the first ones the tokens ask for."""
    cfg = MQARConfig(vocab_size=200, seq_len=40, num_kv_pairs=6)
    tokens = make_mqar(cfg, seed=2, batch_size=2, split="test")
    items = syn.mqar_text(cfg, seed=2, batch_size=2, n_queries=4, split="test")
    letters = "abcdefghijklmnopqrstuvwxyz"
    for ids, labels, item in zip(tokens.input_ids.tolist(), tokens.labels.tolist(), items, strict=True):
        key = {k: letters[(k - 1) // 26] + letters[(k - 1) % 26] for k in ids[0:12:2]}
        pairs = dict(p.split(":") for p in item.prompt.splitlines()[0][len("pairs: ") :].split())
        assert pairs == {key[k]: f"{v - 100:02d}" for k, v in zip(ids[0:12:2], ids[1:12:2], strict=True)}
        asked = [key[ids[t]] for t in range(12, len(ids)) if labels[t] != IGNORE_INDEX][:4]
        assert item.prompt.splitlines()[1] == "query: " + " ".join(asked)
        assert item.answer.split() == [pairs[k] for k in asked]
    with pytest.raises(ConfigError, match="too large for the text form"):
        syn.mqar_text(MQARConfig(vocab_size=256, seq_len=40, num_kv_pairs=6), seed=0, batch_size=1, n_queries=1)
    with pytest.raises(ConfigError, match="n_queries"):
        syn.mqar_text(cfg, seed=0, batch_size=1, n_queries=7)
