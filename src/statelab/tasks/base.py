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
    "Document",
    "DocumentConfig",
    "make_document",
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
        group: family of the task (``"string"``, ``"letter"``, ``"number"``, ``"inflection"``, ``"lexical"``,
            ``"country"``), for plots and for picking related tasks.

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
    group: str = ""

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

    def split(self, split: Split, seed: int = 0) -> tuple[tuple[str, str], ...]:
        """All ``(x, y)`` of one split in an order shuffled by ``seed`` (``seed`` decides only the order)."""
        return tuple(self.examples(split, len(self.pool(split)), seed))

    def disjoint_sets(self, split: Split, n_sets: int, k: int, seed: int) -> list[list[tuple[str, str]]]:
        """``n_sets`` demonstration sets of ``k`` pairs each, no pair in two sets (for a skill library).

        >>> from statelab.tasks import TASKS
        >>> sets = TASKS["country_capital"].disjoint_sets("train", 3, 32, seed=0)
        >>> len({x for s in sets for x, _ in s})
        96
        """
        if not isinstance(n_sets, int) or not isinstance(k, int) or n_sets < 0 or k < 0:
            raise ConfigError(f"n_sets and k must be ints >= 0, got {n_sets!r}, {k!r}")
        pool = self.pool(split)
        if n_sets * k > len(pool):
            raise ConfigError(
                f"task {self.name!r} has {len(pool)} {split} items; {n_sets} disjoint sets of {k} need {n_sets * k}"
            )
        drawn = random.Random(f"{self.name}/{split}/sets/{seed}").sample(pool, n_sets * k)
        return [drawn[i * k : (i + 1) * k] for i in range(n_sets)]

    def where(self, keep: Callable[[str, str], bool], name: str | None = None) -> Task:
        """A task with only the items ``keep(x, y)`` accepts; keys (hence splits) stay those of this task.

        >>> from statelab.tasks import TASKS
        >>> short = TASKS["country_capital"].where(lambda x, y: x.isascii() and y.isascii() and len(y) <= 8)
        >>> all(len(y) <= 8 for _, y in short.pool("test"))
        True
        """
        items = self.items
        return Task(
            name or self.name,
            self.description,
            self.source,
            lambda: [(x, y, key) for x, y, key in items if keep(x, y)],
            self.test_fraction,
            self.group,
        )

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
        split: pool the demonstrations (and, by default, the query) come from.
        template: see the module docstring.
        query_split: pool of the query when it differs from ``split`` (e.g. train demonstrations, test query).
    """

    task: str
    k: int = 4
    split: Split = "test"
    template: str = DEFAULT_TEMPLATE
    query_split: Split | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task, str):
            raise ConfigError(f"EpisodeConfig.task must be a task name (str), got {self.task!r}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            raise ConfigError(f"EpisodeConfig.k must be an int >= 0, got {self.k!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"EpisodeConfig.split must be one of {SPLITS}, got {self.split!r}")
        if self.query_split is not None and self.query_split not in SPLITS:
            raise ConfigError(f"EpisodeConfig.query_split must be None or one of {SPLITS}, got {self.query_split!r}")
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

    With ``query_split`` set and different from ``split``, the ``k`` demonstrations come from ``split`` and the
    query from ``query_split`` (distinct by construction, since the pools are disjoint).

    >>> ep = make_episode(EpisodeConfig(task="country_capital", k=1), seed=3)
    >>> len(ep.examples), ep.prompt.count("Q: ")
    (1, 2)
    """
    if tasks is None:
        from statelab.tasks.words import TASKS as tasks  # noqa: N811
    if config.task not in tasks:
        raise ConfigError(f"unknown task {config.task!r}; known: {', '.join(sorted(tasks))}")
    task = tasks[config.task]
    if config.query_split is None or config.query_split == config.split:
        drawn = task.examples(config.split, config.k + 1, seed)
        shots, (query, answer) = tuple(drawn[:-1]), drawn[-1]
    else:
        shots = tuple(task.examples(config.split, config.k, seed))
        ((query, answer),) = task.examples(config.query_split, 1, seed)
    prompt = build_prompt(shots, query=query, template=config.template)
    _, sep = check_template(config.template)
    return Episode(task.name, shots, query, answer, prompt, prompt + answer + sep)


@dataclass(frozen=True)
class DocumentConfig:
    """A training document: ``k`` demonstrations of one task drawn from a mixture.

    Attributes:
        tasks: task names to draw from, uniformly; empty for every task of the registry.
        k_min, k_max: the number of demonstrations is uniform in ``[k_min, k_max]`` (capped by the pool size).
        split: pool the demonstrations come from (``"train"`` for training).
        template: see the module docstring.
    """

    tasks: tuple[str, ...] = ()
    k_min: int = 1
    k_max: int = 16
    split: Split = "train"
    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, tuple) or not all(isinstance(t, str) for t in self.tasks):
            raise ConfigError(f"DocumentConfig.tasks must be a tuple of task names, got {self.tasks!r}")
        for f in ("k_min", "k_max"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"DocumentConfig.{f} must be an int >= 1, got {v!r}")
        if self.k_min > self.k_max:
            raise ConfigError(f"DocumentConfig.k_min={self.k_min} > k_max={self.k_max}")
        if self.split not in SPLITS:
            raise ConfigError(f"DocumentConfig.split must be one of {SPLITS}, got {self.split!r}")
        check_template(self.template)


@dataclass(frozen=True)
class Document:
    """Demonstrations of one task as one text, with where the answers are.

    ``answer_spans`` are ``[start, end)`` character offsets of every ``y`` in ``text``; ``answer_byte_spans`` the
    same in UTF-8 bytes (for a byte-level tokenizer's loss mask). A span covers ``y`` only, not the separator.
    """

    task: str
    examples: tuple[tuple[str, str], ...]
    text: str
    answer_spans: tuple[tuple[int, int], ...]
    answer_byte_spans: tuple[tuple[int, int], ...]


def make_document(config: DocumentConfig, seed: int, tasks: dict[str, Task] | None = None) -> Document:
    """Pick a task and ``k`` train demonstrations from ``seed`` and render them.

    >>> doc = make_document(DocumentConfig(tasks=("uppercase",), k_min=2, k_max=2), seed=0)
    >>> s, e = doc.answer_spans[0]
    >>> doc.text[s:e] == doc.examples[0][1], doc.text.count("Q: ")
    (True, 2)
    """
    if tasks is None:
        from statelab.tasks.words import TASKS as tasks  # noqa: N811
    names = list(config.tasks) if config.tasks else list(tasks)
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; known: {', '.join(sorted(tasks))}")
    rng = random.Random(f"document/{seed}")
    task = tasks[names[rng.randrange(len(names))]]
    k = min(rng.randint(config.k_min, config.k_max), len(task.pool(config.split)))
    examples = tuple(task.examples(config.split, k, seed=rng.randrange(2**62)))
    head, sep = check_template(config.template)
    parts: list[str] = []
    spans, byte_spans = [], []
    n_chars = n_bytes = 0
    for x, y in examples:
        for piece, is_answer in ((head.replace("{x}", x), False), (y, True), (sep, False)):
            size = len(piece.encode("utf-8"))
            if is_answer:
                spans.append((n_chars, n_chars + len(piece)))
                byte_spans.append((n_bytes, n_bytes + size))
            parts.append(piece)
            n_chars += len(piece)
            n_bytes += size
    return Document(task.name, examples, "".join(parts), tuple(spans), tuple(byte_spans))
