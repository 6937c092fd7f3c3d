"""The Task API: split by key, deterministic sampling, templates, episodes."""

import pytest

from statelab.errors import ConfigError
from statelab.tasks import (
    DEFAULT_TEMPLATE,
    DocumentConfig,
    EpisodeConfig,
    Task,
    build_prompt,
    check_template,
    format_example,
    format_query,
    make_document,
    make_episode,
    split_of,
)


def _toy(n: int = 200) -> Task:
    return Task("toy", "x doubled", "computed", lambda: [(f"w{i}", f"w{i}w{i}", f"k{i}") for i in range(n)])


def test_split_of_is_stable_and_respects_fraction():
    keys = [f"key{i}" for i in range(4000)]
    first = [split_of(k) for k in keys]
    assert first == [split_of(k) for k in keys]
    share = first.count("test") / len(keys)
    assert 0.22 < share < 0.28
    assert all(split_of(k, 0.0) == "train" for k in keys[:50])
    assert all(split_of(k, 1.0) == "test" for k in keys[:50])


def test_pools_are_disjoint_and_cover_items():
    t = _toy()
    train, test = t.pool("train"), t.pool("test")
    assert set(train).isdisjoint(test)
    assert len(train) + len(test) == 200
    assert {x for x, _ in train} | {x for x, _ in test} == {f"w{i}" for i in range(200)}


def test_examples_deterministic_per_seed_and_distinct():
    t = _toy()
    a = t.examples("train", 10, seed=5)
    assert a == t.examples("train", 10, seed=5)
    assert a != t.examples("train", 10, seed=6)
    assert len({x for x, _ in a}) == 10
    assert all(p in t.pool("train") for p in a)
    assert all(p in t.pool("test") for p in t.examples("test", 10, seed=5))


def test_examples_errors():
    t = _toy(10)
    with pytest.raises(ConfigError, match="asked for"):
        t.examples("train", 1000, seed=0)
    with pytest.raises(ConfigError, match="split"):
        t.examples("val", 1, seed=0)
    with pytest.raises(KeyError, match="toy"):
        t("nope")


def test_duplicate_inputs_keep_first_answer():
    t = Task("dup", "", "computed", lambda: [("a", "1", "a"), ("a", "2", "a"), ("b", "3", "b")])
    assert t("a") == "1" and len(t.items) == 2


def test_templates():
    assert format_example("cat", "CAT") == "Q: cat\nA: CAT\n\n"
    assert format_query("cat") == "Q: cat\nA: "
    assert build_prompt([("a", "b"), ("c", "d")], query="e") == "Q: a\nA: b\n\nQ: c\nA: d\n\nQ: e\nA: "
    tpl = "{x} -> {y};"
    assert build_prompt([("a", "b")], query="c", template=tpl) == "a -> b;c -> "
    # values with braces are inserted literally
    assert format_example("{y}", "{x}") == "Q: {y}\nA: {x}\n\n"
    for bad in ("{x}", "{y} {x}", "{x}{x}{y}", "no fields"):
        with pytest.raises(ConfigError):
            check_template(bad)


def test_episode():
    cfg = EpisodeConfig(task="toy", k=3, split="test")
    ep = make_episode(cfg, seed=1, tasks={"toy": _toy()})
    assert ep == make_episode(cfg, seed=1, tasks={"toy": _toy()})
    assert len(ep.examples) == 3 and ep.query not in {x for x, _ in ep.examples}
    assert ep.answer == ep.query + ep.query
    assert ep.prompt == build_prompt(ep.examples, query=ep.query)
    assert ep.text == build_prompt([*ep.examples, (ep.query, ep.answer)], template=DEFAULT_TEMPLATE)
    with pytest.raises(ConfigError, match="unknown task"):
        make_episode(EpisodeConfig(task="nope"), seed=0, tasks={"toy": _toy()})
    with pytest.raises(ConfigError):
        EpisodeConfig(task="toy", k=-1)
    with pytest.raises(ConfigError):
        EpisodeConfig(task="toy", split="dev")


def test_split_shuffles_pool_by_seed():
    t = _toy()
    assert sorted(t.split("train", seed=0)) == sorted(t.pool("train"))
    assert t.split("train", seed=0) == t.split("train", seed=0)
    assert t.split("train", seed=0) != t.split("train", seed=1)


def test_disjoint_sets():
    t = _toy()
    sets = t.disjoint_sets("train", 4, 20, seed=3)
    assert [len(s) for s in sets] == [20] * 4
    flat = [p for s in sets for p in s]
    assert len(set(flat)) == 80 and all(p in t.pool("train") for p in flat)
    assert sets == t.disjoint_sets("train", 4, 20, seed=3)
    with pytest.raises(ConfigError, match="disjoint"):
        t.disjoint_sets("test", 10, 20, seed=0)


def test_where_keeps_keys():
    t = _toy()
    even = t.where(lambda x, y: int(x[1:]) % 2 == 0, name="toy_even")
    assert even.name == "toy_even" and len(even.items) == 100
    assert set(even.pool("test")) == {p for p in t.pool("test") if int(p[0][1:]) % 2 == 0}


def test_episode_with_query_from_other_split():
    toy = _toy()
    ep = make_episode(EpisodeConfig(task="toy", k=5, split="train", query_split="test"), seed=0, tasks={"toy": toy})
    assert all(p in toy.pool("train") for p in ep.examples)
    assert (ep.query, ep.answer) in toy.pool("test")
    with pytest.raises(ConfigError):
        EpisodeConfig(task="toy", query_split="dev")


def test_document_spans_and_determinism():
    tasks = {
        "toy": _toy(),
        "uni": Task("uni", "", "computed", lambda: [(f"é{i}", f"ü{i}", f"u{i}") for i in range(50)]),
    }
    cfg = DocumentConfig(k_min=2, k_max=6)
    for seed in range(20):
        doc = make_document(cfg, seed, tasks=tasks)
        assert doc == make_document(cfg, seed, tasks=tasks)
        assert 2 <= len(doc.examples) <= 6 and doc.task in tasks
        assert doc.text == build_prompt(doc.examples)
        raw = doc.text.encode("utf-8")
        for (s, e), (bs, be), (_, y) in zip(doc.answer_spans, doc.answer_byte_spans, doc.examples, strict=True):
            assert doc.text[s:e] == y and raw[bs:be].decode("utf-8") == y
        assert all(p in tasks[doc.task].pool("train") for p in doc.examples)
    assert len({make_document(cfg, s, tasks=tasks).task for s in range(20)}) == 2
    with pytest.raises(ConfigError, match="unknown"):
        make_document(DocumentConfig(tasks=("nope",)), 0, tasks=tasks)
    with pytest.raises(ConfigError):
        DocumentConfig(k_min=3, k_max=2)
