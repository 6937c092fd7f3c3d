"""Word-function tasks: a pool of ``(x, y)`` pairs, a deterministic train/test split, prompts and k-shot episodes.

A :class:`Task` is a function from short strings to short strings ("France" -> "Paris", "cat" -> "CAT"), in the
style of the function-vector suite (Todd et al. 2024, arXiv 2310.15213). Everything here is a pure function of
its arguments and a seed: sampling uses a local :class:`random.Random`, never the global one.

Train/test split: every pair carries a *key*, the entity it is about (the word, the country, the lemma). A key goes
to ``"test"`` when the first 8 bytes of ``sha256(key)`` read as a fraction fall below ``test_fraction``, otherwise to
``"train"``. The split does not depend on the task, so a word held out from ``uppercase`` is held out from
``reverse`` too, and ``capital_country`` holds out the same countries as ``country_capital``.

Template: a string with one ``{x}`` and one ``{y}``, ``{x}`` first. The default ``"Q: {x}\\nA: {y}\\n\\n"`` renders
one example as ``"Q: cat\\nA: CAT\\n\\n"``; the text before ``{y}`` (with ``x`` filled in) is the *query prefix*, the
text after it the *separator*. Values are substituted literally (no ``str.format``), so braces in data are safe.

Worked example::

    >>> from statelab.tasks import TASKS, build_prompt, make_episode, EpisodeConfig
    >>> t = TASKS["uppercase"]
    >>> t("cat")
    'CAT'
    >>> build_prompt([("cat", "CAT"), ("dog", "DOG")], query="sun")
    'Q: cat\\nA: CAT\\n\\nQ: dog\\nA: DOG\\n\\nQ: sun\\nA: '
    >>> ep = make_episode(EpisodeConfig(task="uppercase", k=2), seed=0)
    >>> ep.prompt.endswith("A: ") and ep.text == ep.prompt + ep.answer + "\\n\\n"
    True
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from statelab.errors import ConfigError

__all__ = [
    "DEFAULT_TEMPLATE",
    "SPLITS",
    "Split",
    "Task",
    "Episode",
    "EpisodeConfig",
    "split_of",
    "check_template",
    "format_example",
    "format_query",
    "build_prompt",
    "make_episode",
]

DEFAULT_TEMPLATE = "Q: {x}\nA: {y}\n\n"
SPLITS = ("train", "test")
Split = Literal["train", "test"]
DEFAULT_TEST_FRACTION = 0.25


def split_of(key: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> Split:
    """``"test"`` or ``"train"`` for an item key, by hash (stable across runs, machines and Python versions).

    >>> split_of("france") in ("train", "test")
    True
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def check_template(template: str) -> tuple[str, str]:
    """Split a template into (query part with ``{x}``, separator after ``{y}``); raise ConfigError if malformed."""
    if not isinstance(template, str):
        raise ConfigError(f"a template must be a str with one {{x}} and one {{y}}, got {type(template).__name__}")
    if template.count("{x}") != 1 or template.count("{y}") != 1:
        raise ConfigError(f"a template needs exactly one {{x}} and one {{y}}, got {template!r}")
    head, sep = template.split("{y}")
    if "{x}" not in head:
        raise ConfigError(f"a template must place {{x}} before {{y}}, got {template!r}")
    return head, sep


def format_query(x: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The text a model reads before it answers ``x``: ``format_query("cat") == "Q: cat\\nA: "``."""
    head, _ = check_template(template)
    return head.replace("{x}", x)


def format_example(x: str, y: str, template: str = DEFAULT_TEMPLATE) -> str:
    """One demonstration: ``format_example("cat", "CAT") == "Q: cat\\nA: CAT\\n\\n"``."""
    head, sep = check_template(template)
    return head.replace("{x}", x) + y + sep


def build_prompt(
    examples: Sequence[tuple[str, str]], query: str | None = None, template: str = DEFAULT_TEMPLATE
) -> str:
    """Demonstrations rendered one after the other, then (if given) the query prefix of ``query``.

    >>> build_prompt([("a", "A")])
    'Q: a\\nA: A\\n\\n'
    >>> build_prompt([], query="b")
    'Q: b\\nA: '
    """
    head, sep = check_template(template)
    parts = [head.replace("{x}", x) + y + sep for x, y in examples]
    if query is not None:
        parts.append(head.replace("{x}", query))
    return "".join(parts)


@dataclass(frozen=True)
class Task:
    """A word function with its whole pool of items ``(x, y, key)``, built lazily from ``build``.

    Attributes:
        name: registry name, e.g. ``"country_capital"``.
        description: one line saying what ``y`` is given ``x``.
        source: where the data comes from (package, file, or "computed").
        build: ``() -> iterable of (x, y, key)``; ``key`` decides the split (see the module docstring). Items
            whose ``x`` repeats an earlier item's are dropped, so each input has one answer.
        test_fraction: share of keys held out for ``"test"``.

    Example:
        >>> t = Task("double", "x twice", "computed", lambda: [(w, w + w, w) for w in ("ab", "cd", "ef")])
        >>> t("ab"), len(t.pool("train")) + len(t.pool("test"))
        ('abab', 3)
    """

    name: str
    description: str
    source: str
    build: Callable[[], object] = field(repr=False, compare=False)
    test_fraction: float = DEFAULT_TEST_FRACTION

    @cached_property
    def items(self) -> tuple[tuple[str, str, str], ...]:
        """Every ``(x, y, key)`` of the task, in build order, ``x`` unique."""
        seen: set[str] = set()
        out = []
        for x, y, key in self.build():  # type: ignore[attr-defined]
            if x in seen or not x or not y:
                continue
            seen.add(x)
            out.append((x, y, key))
        if not out:
            raise ConfigError(f"task {self.name!r} has no items")
        return tuple(out)

    @cached_property
    def _lookup(self) -> dict[str, str]:
        return {x: y for x, y, _ in self.items}

    @cached_property
    def _pools(self) -> dict[str, tuple[tuple[str, str], ...]]:
        pools: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
        for x, y, key in self.items:
            pools[split_of(key, self.test_fraction)].append((x, y))
        return {s: tuple(p) for s, p in pools.items()}

    def __call__(self, x: str) -> str:
        """The answer for input ``x`` (any split); KeyError naming the task if ``x`` is not in its pool."""
        try:
            return self._lookup[x]
        except KeyError:
            raise KeyError(f"{x!r} is not an input of task {self.name!r}") from None

    def pool(self, split: Split) -> tuple[tuple[str, str], ...]:
        """All ``(x, y)`` of one split, in build order."""
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        return self._pools[split]

    def examples(self, split: Split, n: int, seed: int) -> list[tuple[str, str]]:
        """``n`` distinct ``(x, y)`` pairs drawn from ``split`` by a generator seeded with ``(task, split, seed)``.

        >>> from statelab.tasks import TASKS
        >>> TASKS["reverse"].examples("train", 2, seed=0) == TASKS["reverse"].examples("train", 2, seed=0)
        True
        """
        pool = self.pool(split)
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"n must be an int >= 0, got {n!r}")
        if n > len(pool):
            raise ConfigError(f"task {self.name!r} has {len(pool)} {split} items, asked for {n} distinct ones")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        return rng.sample(pool, n)


@dataclass(frozen=True)
class EpisodeConfig:
    """A k-shot evaluation episode of one task.

    Attributes:
        task: registry name in :data:`statelab.tasks.TASKS`.
        k: number of demonstrations (0 allowed).
        split: pool the demonstrations and the query come from.
        template: see the module docstring.
    """

    task: str
    k: int = 4
    split: Split = "test"
    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if not isinstance(self.task, str):
            raise ConfigError(f"EpisodeConfig.task must be a task name (str), got {self.task!r}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            raise ConfigError(f"EpisodeConfig.k must be an int >= 0, got {self.k!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"EpisodeConfig.split must be one of {SPLITS}, got {self.split!r}")
        check_template(self.template)


@dataclass(frozen=True)
class Episode:
    """``k`` demonstrations and one query, all distinct inputs of one split.

    ``prompt`` ends with the query prefix (``"...Q: sun\\nA: "``); the model should continue with ``answer``;
    ``text = prompt + answer + separator`` is the whole episode as a training document would hold it.
    """

    task: str
    examples: tuple[tuple[str, str], ...]
    query: str
    answer: str
    prompt: str
    text: str


def make_episode(config: EpisodeConfig, seed: int, tasks: dict[str, Task] | None = None) -> Episode:
    """Draw ``k + 1`` distinct pairs of ``config.split``; the last one is the query.

    >>> ep = make_episode(EpisodeConfig(task="country_capital", k=1), seed=3)
    >>> len(ep.examples), ep.prompt.count("Q: ")
    (1, 2)
    """
    if tasks is None:
        from statelab.tasks.words import TASKS as tasks  # noqa: N811
    if config.task not in tasks:
        raise ConfigError(f"unknown task {config.task!r}; known: {', '.join(sorted(tasks))}")
    task = tasks[config.task]
    drawn = task.examples(config.split, config.k + 1, seed)
    shots, (query, answer) = tuple(drawn[:-1]), drawn[-1]
    prompt = build_prompt(shots, query=query, template=config.template)
    _, sep = check_template(config.template)
    return Episode(task.name, shots, query, answer, prompt, prompt + answer + sep)
