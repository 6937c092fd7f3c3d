"""Every word task: right answers, disjoint non-empty splits, determinism."""

import doctest

import pytest

import statelab.tasks.base
import statelab.tasks.words
from statelab.tasks import (
    RELATED_TASKS,
    TASKS,
    EpisodeConfig,
    get_word_task,
    make_episode,
    number_to_words,
    split_of,
    word_task_names,
)

KNOWN = {
    "uppercase": [("cat", "CAT")],
    "lowercase": [("HOUSE", "house")],
    "capitalize": [("water", "Water")],
    "capitalize_first_letter": [("water", "W")],
    "first_letter": [("water", "w")],
    "last_letter": [("water", "r")],
    "second_letter": [("water", "a")],
    "reverse": [("water", "retaw")],
    "word_length": [("water", "5"), ("cat", "3")],
    "sort_letters": [("water", "aertw")],
    "double_letters": [("cat", "ccaatt")],
    "count_vowels": [("water", "2"), ("people", "3")],
    "remove_vowels": [("water", "wtr")],
    "caesar_shift": [("cat", "dbu"), ("size", "tjaf"), ("crazy", "dsbaz")],
    "next_letter": [("a", "b"), ("z", "a"), ("Q", "R")],
    "prev_letter": [("b", "a"), ("a", "z"), ("R", "Q")],
    "number_to_word": [("0", "zero"), ("17", "seventeen"), ("40", "forty"), ("342", "three hundred forty-two")],
    "word_to_number": [("ninety-nine", "99"), ("one hundred", "100")],
    "next_number": [("9", "10"), ("999", "1000")],
    "prev_number": [("10", "9"), ("1", "0")],
    "singular_plural": [("child", "children"), ("city", "cities"), ("mouse", "mice"), ("man", "men"), ("box", "boxes")],
    "plural_singular": [("children", "child"), ("women", "woman"), ("people", "person")],
    "present_past": [("go", "went"), ("stop", "stopped"), ("try", "tried"), ("eat", "ate"), ("think", "thought")],
    "past_present": [("went", "go"), ("saw", "see")],
    "verb_gerund": [("run", "running"), ("make", "making")],
    "verb_third_person": [("go", "goes"), ("try", "tries")],
    "antonym": [("hot", "cold"), ("cold", "hot"), ("up", "down")],
    "country_capital": [("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Kenya", "Nairobi")],
    "capital_country": [("Paris", "France"), ("Tokyo", "Japan")],
    "country_currency": [("France", "Euro"), ("Japan", "Yen"), ("United States", "US Dollar")],
    "country_continent": [("France", "Europe"), ("Japan", "Asia"), ("Kenya", "Africa")],
    "country_subregion": [("France", "Western Europe")],
    "country_demonym": [("France", "French"), ("Japan", "Japanese")],
    "country_code": [("France", "FR"), ("Japan", "JP")],
    "code_country": [("DE", "Germany")],
    "country_language": [("France", "French"), ("Brazil", "Portuguese")],
    "country_german": [("Germany", "Deutschland")],
    "country_spanish": [("Germany", "Alemania")],
    "country_french": [("Germany", "Allemagne")],
}


def test_at_least_twenty_tasks_and_all_checked():
    assert len(TASKS) >= 20
    assert set(KNOWN) == set(TASKS)


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_answers(name):
    task = TASKS[name]
    for x, y in KNOWN[name]:
        assert task(x) == y, f"{name}({x!r}) = {task(x)!r}, expected {y!r}"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_pools_disjoint_nonempty_and_consistent(name):
    task = TASKS[name]
    train, test = task.pool("train"), task.pool("test")
    assert len(train) >= 20 and len(test) >= 8
    assert {x for x, _ in train}.isdisjoint({x for x, _ in test})
    for x, y, key in task.items:
        assert task(x) == y and isinstance(y, str) and y
        assert ((x, y) in test) == (split_of(key) == "test")
    a = task.examples("train", 5, seed=11)
    assert a == task.examples("train", 5, seed=11)
    assert a != task.examples("train", 5, seed=12)


def test_string_tasks_are_their_function():
    words = [x for x, _ in TASKS["reverse"].pool("train")]
    assert all(TASKS["reverse"](w) == w[::-1] for w in words)
    assert all(TASKS["word_length"](w) == str(len(w)) for w in words)
    assert all(TASKS["sort_letters"](w) == "".join(sorted(w)) for w in words)
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 7 for w in words)


def test_inverse_tasks_share_split():
    for fwd, inv in [
        ("country_capital", "capital_country"),
        ("singular_plural", "plural_singular"),
        ("present_past", "past_present"),
    ]:
        for x, y in TASKS[inv].pool("test"):
            assert (y, x) in TASKS[fwd].pool("test")
    # the same word is held out from every string task
    held = {x for x, _ in TASKS["uppercase"].pool("test")}
    assert held == {x for x, _ in TASKS["reverse"].pool("test")}
    assert {x.lower() for x, _ in TASKS["lowercase"].pool("test")} == held


def test_number_to_words_bounds():
    assert number_to_words(115) == "one hundred fifteen"
    with pytest.raises(ValueError):
        number_to_words(1000)


def test_episode_on_real_task():
    ep = make_episode(EpisodeConfig(task="country_capital", k=4, split="test"), seed=7)
    assert ep.answer == TASKS["country_capital"](ep.query)
    assert ep.prompt.endswith(f"Q: {ep.query}\nA: ")
    assert all((x, y) in TASKS["country_capital"].pool("test") for x, y in ep.examples)


def test_docstring_examples():
    for mod in (statelab.tasks.base, statelab.tasks.words, statelab.tasks):
        result = doctest.testmod(mod)
        assert result.failed == 0 and result.attempted > 0


def test_registry_helpers_and_groups():
    assert word_task_names() == tuple(TASKS)
    assert get_word_task("reverse") is TASKS["reverse"]
    with pytest.raises(KeyError, match="known"):
        get_word_task("nope")
    assert {t.group for t in TASKS.values()} == {"string", "letter", "number", "inflection", "lexical", "country"}
    assert TASKS["country_capital"].group == "country" and TASKS["next_letter"].group == "letter"
    for a, b in RELATED_TASKS:
        assert a in TASKS and b in TASKS


def test_library_sets_fit_every_task():
    # the State Soup library needs a few disjoint 32-shot sets of train items per task
    for name, task in TASKS.items():
        if task.group != "letter":
            assert len(task.disjoint_sets("train", 4, 32, seed=0)) == 4, name


def test_top_level_exports():
    import statelab

    assert statelab.TASKS is TASKS
    assert statelab.make_episode is make_episode


@pytest.mark.parametrize(
    ("fwd", "inv"),
    [
        ("country_capital", "capital_country"),
        ("country_code", "code_country"),
        ("singular_plural", "plural_singular"),
        ("present_past", "past_present"),
        ("number_to_word", "word_to_number"),
        ("next_number", "prev_number"),
    ],
)
def test_inverse_tasks_round_trip(fwd, inv):
    f, g = TASKS[fwd], TASKS[inv]
    answers = [y for _, y, _ in f.items]
    unique = {y for y in answers if answers.count(y) == 1}
    inputs = {x for x, _, _ in g.items}
    checked = 0
    for x, y, _ in f.items:
        if y in unique and y in inputs:
            assert g(y) == x, f"{inv}({y!r}) = {g(y)!r}, expected {x!r}"
            checked += 1
    assert checked >= 0.9 * len(f.items)
