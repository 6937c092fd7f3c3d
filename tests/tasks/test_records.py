import re

import numpy as np
import pytest

from statelab.errors import ConfigError
from statelab.tasks.base import split_of
from statelab.tasks.records import RecordsConfig, held_out_overlap, records_corpus, shakespeare_bytes
from statelab.tasks.words import load_words


def docs(cfg):
    return records_corpus(cfg).astype(np.uint8).tobytes().decode("utf-8", errors="ignore").split("\n\n")


def test_corpus_is_a_pure_function_of_its_config_with_the_exact_length():
    a = records_corpus(RecordsConfig(n_bytes=30_000, seed=3))
    assert a.shape == (30_000,) and a.dtype == np.int64 and a.max() < 256
    assert np.array_equal(a, records_corpus(RecordsConfig(n_bytes=30_000, seed=3)))
    assert not np.array_equal(a, records_corpus(RecordsConfig(n_bytes=30_000, seed=4)))
    # a longer corpus of the same seed starts with the shorter one: documents are drawn by index
    assert np.array_equal(records_corpus(RecordsConfig(n_bytes=50_000, seed=3))[:30_000], a)


def test_every_recalled_directory_entry_repeats_its_own_number():
    """A directory is its header and entries, a blank line, then its recall section (the next piece)."""
    pieces = docs(RecordsConfig(n_bytes=60_000, seed=0))
    n_dirs = 0
    for piece, recall in zip(pieces[:-2], pieces[1:-1], strict=True):
        lines = piece.split("\n")
        if lines[0] not in ("Phonebook:", "Directory:", "Contacts:", "Staff:"):
            continue
        book = dict(line.split(": ", 1) for line in lines[1:])
        assert len(book) == len(lines) - 1 >= 2 and all(v.isdigit() for v in book.values())
        for line in recall.split("\n"):
            m = re.fullmatch(r"(?:Call )?([A-Z][a-z]+ [A-Z][a-z]+)(?::|'s number is| at) (\d+)\.?", line)
            assert m, line
            assert book[m.group(1)] == m.group(2)
        n_dirs += 1
    assert n_dirs > 20


def test_every_repeated_pair_is_a_pair_of_its_record_and_word_keys_are_train_words():
    n_records, words = 0, set(load_words())
    for doc in docs(RecordsConfig(n_bytes=60_000, seed=1)):
        first = doc.split(" ", 1)[0]
        if first not in ("pairs:", "map:", "table:", "codes:") or doc.count("\n") != 1:
            continue
        line, again = doc[len(first) + 1 :].split("\n")
        pat = r"([a-z]+)(?::| = |=| -> )(\d+)"
        pairs = re.findall(pat, line)
        table = dict(pairs)
        assert len(table) == len(pairs) >= 3
        assert all(table[k] == v for k, v in re.findall(pat, again)) and re.findall(pat, again)
        for k in table:
            assert len(k) == 2 or (k in words and split_of(k) == "train")
        n_records += 1
    assert n_records > 20


def test_text_documents_come_from_the_asked_part_of_the_plays():
    plays = shakespeare_bytes().decode()
    cut = int(0.9 * len(plays))
    head, tail = plays[:cut], plays[cut:]
    only_text = RecordsConfig(n_bytes=20_000, mix=(1, 0, 0, 0), text_part="test", seed=2)
    assert all(p.strip()[:40] in tail for p in docs(only_text)[:-1] if len(p.strip()) > 40)
    only_text = RecordsConfig(n_bytes=20_000, mix=(1, 0, 0, 0), text_part="train", seed=2)
    assert all(p.strip()[:40] in head for p in docs(only_text)[:-1] if len(p.strip()) > 40)


def test_held_out_overlap_finds_exactly_the_strings_present():
    corpus = records_corpus(RecordsConfig(n_bytes=20_000, seed=0))
    text = corpus.astype(np.uint8).tobytes().decode("utf-8", errors="ignore")
    present = re.search(r"\d{10}", text).group(0)
    assert held_out_overlap(corpus, [present, "9" * 30, "Find: "]) == [present]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_bytes", 0, "n_bytes"),
        ("mix", (1.0, 0.0), "mix"),
        ("mix", (0.0, 0.0, 0.0), "mix"),
        ("text_part", "dev", "text_part"),
        ("text_window", (10, 5), "text_window"),
        ("recall_fraction", (0.0, 0.5), "recall_fraction"),
    ],
)
def test_bad_config_is_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        RecordsConfig(**{field: value})


def test_task_items_are_the_train_split_in_the_evaluation_layout():
    from statelab.tasks.synthetic import MQARConfig, mqar_text

    pieces = docs(RecordsConfig(n_bytes=20_000, mix=(0, 0, 0, 1), seed=0))[:-1]
    finds = [p for p in pieces if p.startswith("Find: ")]
    queries = [p for p in pieces if p.startswith("pairs: ")]
    assert len(finds) > 10 and len(queries) > 10
    for p in finds:
        lines = p.split("\n")
        book = dict(line.split(": ") for line in lines[2:-2])
        asked = lines[0][len("Find: ") :].split(", ")
        assert lines[1] == "Phonebook:" and lines[-2] == lines[0] and lines[-1] == ", ".join(book[a] for a in asked)
    for p in queries:
        pairs_line, query, answer = p.split("\n")
        table = dict(kv.split(":") for kv in pairs_line[len("pairs: ") :].split())
        assert answer.split() == [table[k] for k in query[len("query: ") :].split()]
    # the same draws as the train split of the task generator: a test-split item of the same size differs
    test_item = mqar_text(MQARConfig(vocab_size=200, seq_len=16, num_kv_pairs=4), 0, 1, 1, "test")[0]
    assert test_item.prompt.split("\n")[0] not in "\n".join(queries)
