"""A byte-level pretraining corpus in which in-context retrieval can be learned by next-token prediction.

The Birdie study (arXiv 2411.01030, §9 of statelab's spec) pretrains every arm on the same corpus and then asks
for retrieval (phonebook lookup, multi-query associative recall). A corpus of plays alone has no digits, no
key-value records and no reason to ever copy a value from far back, so no arm can be expected to retrieve. This
one is made of three kinds of documents, joined by blank lines:

* **text**: windows of Tiny Shakespeare (words and spelling; shipped in the package, public domain);
* **directories**: a header (``Phonebook:``, ``Directory:``, ``Contacts:``, ``Staff:``) and (by default) 2-12
  entries ``First Last: <digits>`` (names from :mod:`statelab.tasks.synthetic`'s name lists, numbers of 3-10
  random digits, mostly 10), then a *recall section*: some of the entries again, in a random order, each in one of
  three forms (``First Last: <digits>``, ``Call First Last at <digits>.``, ``First Last's number is <digits>.``);
* **key-value records**: a header (``pairs:``, ``map:``, ``table:``, ``codes:``) and (by default) 3-12 pairs on one
  line, keys of two letters or common words (the ``train`` split of :func:`statelab.tasks.words.load_words`),
  values of 1-3 digits, in one of three forms (``ab:37``, ``ab=37``, ``ab -> 37``); then a second line that
  repeats some of the pairs in a random order;
* **task items** (``mix[3]``, none by default): phonebook and MQAR items of the ``train`` split of
  :mod:`statelab.tasks.synthetic` in the evaluation's own layout (``Find:`` / ``query:`` prompt, then the answer),
  2-6 entries or 4-8 pairs, 1-3 queries.

A repeated key is followed by a value that only the earlier context can predict, so the next-token loss on a
recall section rewards retrieval. The recall formats are not the evaluation's: its ``Find:`` / ``query:`` prompts
occur only in task items, when they are mixed in. Documents are drawn from a generator seeded by
``(seed, document index)``; the evaluation's items come from :mod:`statelab.tasks.synthetic`'s ``test`` split, and
:func:`held_out_overlap` checks that none of them (no phone number, no line of pairs) appears in a corpus.

Worked example::

    >>> text = records_corpus(RecordsConfig(n_bytes=2000, seed=0)).tobytes().decode()
    >>> len(text) == 2000, ("Phonebook:" in text or "Directory:" in text or "Contacts:" in text or "Staff:" in text)
    (True, True)
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from statelab.errors import ConfigError
from statelab.tasks.base import split_of
from statelab.tasks.synthetic import _FIRST, _LAST, MQARConfig, PhonebookConfig, mqar_text, phonebook_text
from statelab.tasks.words import load_words

__all__ = ["RecordsConfig", "records_corpus", "shakespeare_bytes", "held_out_overlap", "KINDS"]

#: the document kinds, in the order of :attr:`RecordsConfig.mix`
KINDS = ("text", "directory", "pairs", "tasks")

_DIRECTORY_HEADERS = ("Phonebook:", "Directory:", "Contacts:", "Staff:")
_PAIR_HEADERS = ("pairs:", "map:", "table:", "codes:")
_PAIR_FORMS = ("{k}:{v}", "{k}={v}", "{k} -> {v}")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class RecordsConfig:
    """The records corpus.

    Attributes:
        n_bytes: length of the corpus in bytes (the last document is cut there).
        seed: the corpus is a pure function of the config; a different seed gives a disjoint draw (the study uses
            one seed for training text and another for held-out text).
        mix: share of documents of each kind of :data:`KINDS` (text, directory, pairs, tasks); normalised.
        text_part: which part of Tiny Shakespeare text windows come from: ``"train"`` (the first 90%) or
            ``"test"`` (the last 10%).
        text_window: (min, max) bytes of a text document.
        recall_fraction: (min, max) share of a directory's or record's entries repeated in its recall section.
        entries: (min, max) entries of a directory; pairs: (min, max) pairs of a record.
        long_numbers: share of directories whose numbers have 10 digits (the others 3-9).
        value_digits: (min, max) digits of a record's values.
        letter_keys: share of records keyed by two letters (the others by common words).
    """

    n_bytes: int = 4_000_000
    seed: int = 0
    mix: tuple[float, float, float, float] = (0.25, 0.4, 0.35, 0.0)
    text_part: str = "train"
    text_window: tuple[int, int] = (200, 800)
    recall_fraction: tuple[float, float] = (0.3, 1.0)
    entries: tuple[int, int] = (2, 12)
    pairs: tuple[int, int] = (3, 12)
    long_numbers: float = 0.7
    value_digits: tuple[int, int] = (1, 3)
    letter_keys: float = 0.6

    def __post_init__(self) -> None:
        if not isinstance(self.n_bytes, int) or self.n_bytes < 1:
            raise ConfigError(f"RecordsConfig.n_bytes must be a positive int, got {self.n_bytes!r}")
        if len(self.mix) != len(KINDS) or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ConfigError(f"RecordsConfig.mix must be {len(KINDS)} non-negative shares {KINDS}, got {self.mix}")
        if self.text_part not in ("train", "test"):
            raise ConfigError(f"RecordsConfig.text_part must be 'train' or 'test', got {self.text_part!r}")
        lo, hi = self.text_window
        if not 1 <= lo <= hi:
            raise ConfigError(f"RecordsConfig.text_window must be (min, max) with 1 <= min <= max, got {lo, hi}")
        lo, hi = self.recall_fraction
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"RecordsConfig.recall_fraction must satisfy 0 < min <= max <= 1, got {lo, hi}")
        for name, low in (("entries", 1), ("pairs", 1), ("value_digits", 1)):
            lo, hi = getattr(self, name)
            if not low <= lo <= hi:
                raise ConfigError(f"RecordsConfig.{name} must be (min, max) with {low} <= min <= max, got {lo, hi}")
        if self.pairs[1] > 26 * 26 or self.entries[1] > len(_FIRST) * len(_LAST):
            raise ConfigError(f"RecordsConfig: at most {26 * 26} pairs and {len(_FIRST) * len(_LAST)} entries")
        for name in ("long_numbers", "letter_keys"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"RecordsConfig.{name} must be a share in [0, 1], got {getattr(self, name)!r}")


@cache
def shakespeare_bytes() -> bytes:
    """Tiny Shakespeare (1,115,394 bytes, shipped gzipped in ``statelab/data``)."""
    raw = resources.files("statelab").joinpath("data", "tinyshakespeare.txt.gz").read_bytes()
    return gzip.decompress(raw)


@cache
def _train_words() -> tuple[str, ...]:
    return tuple(w for w in load_words() if split_of(w) == "train")


def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(map(str, rng.integers(0, 10, n)))


def _recalled(rng: np.random.Generator, n: int, frac: tuple[float, float]) -> np.ndarray:
    """Indices of the entries a recall section repeats (at least one), in a random order."""
    m = max(1, round(n * rng.uniform(*frac)))
    return rng.permutation(n)[:m]


def _directory(rng: np.random.Generator, cfg: RecordsConfig) -> str:
    n = int(rng.integers(cfg.entries[0], cfg.entries[1] + 1))
    idx = rng.choice(len(_FIRST) * len(_LAST), n, replace=False)
    names = [f"{_FIRST[i // len(_LAST)]} {_LAST[i % len(_LAST)]}" for i in idx]
    width = 10 if rng.random() < cfg.long_numbers else int(rng.integers(3, 10))
    numbers = [_digits(rng, width) for _ in range(n)]
    lines = [_DIRECTORY_HEADERS[rng.integers(len(_DIRECTORY_HEADERS))]]
    lines += [f"{a}: {p}" for a, p in zip(names, numbers, strict=True)]
    lines.append("")
    for i in _recalled(rng, n, cfg.recall_fraction):
        form = rng.random()
        if form < 0.5:
            lines.append(f"{names[i]}: {numbers[i]}")
        elif form < 0.75:
            lines.append(f"Call {names[i]} at {numbers[i]}.")
        else:
            lines.append(f"{names[i]}'s number is {numbers[i]}.")
    return "\n".join(lines)


def _pairs(rng: np.random.Generator, cfg: RecordsConfig) -> str:
    n = int(rng.integers(cfg.pairs[0], cfg.pairs[1] + 1))
    words = _train_words()
    if rng.random() < cfg.letter_keys or n > len(words):
        codes = rng.choice(26 * 26, n, replace=False)
        keys = [_LETTERS[c // 26] + _LETTERS[c % 26] for c in codes]
    else:
        keys = [words[i] for i in rng.choice(len(words), n, replace=False)]
    width = int(rng.integers(cfg.value_digits[0], cfg.value_digits[1] + 1))
    values = [_digits(rng, width) for _ in range(n)]
    form = _PAIR_FORMS[rng.integers(len(_PAIR_FORMS))]
    sep = " " if form == "{k}:{v}" else ", "
    line = sep.join(form.format(k=k, v=v) for k, v in zip(keys, values, strict=True))
    again = sep.join(form.format(k=keys[i], v=values[i]) for i in _recalled(rng, n, cfg.recall_fraction))
    return f"{_PAIR_HEADERS[rng.integers(len(_PAIR_HEADERS))]} {line}\n{again}"


def _task(rng: np.random.Generator) -> str:
    """A phonebook or MQAR item of the ``train`` split in the evaluation's own layout, prompt then answer."""
    seed = int(rng.integers(2**62))
    if rng.random() < 0.5:
        n = int(rng.integers(2, 7))
        cfg = PhonebookConfig(n_entries=n, n_queries=int(rng.integers(1, min(3, n) + 1)), n_digits=10)
        item = phonebook_text(cfg, seed, 1, "train")[0]
    else:
        n = int(rng.integers(4, 9))
        item = mqar_text(MQARConfig(vocab_size=200, seq_len=4 * n, num_kv_pairs=n), seed, 1, int(rng.integers(1, 4)))[0]
    return item.prompt + item.answer


def _text(rng: np.random.Generator, cfg: RecordsConfig, source: bytes) -> str:
    lo, hi = cfg.text_window
    n = min(int(rng.integers(lo, hi + 1)), len(source))
    start = int(rng.integers(0, len(source) - n + 1))
    return source[start : start + n].decode("utf-8", errors="ignore")


def records_corpus(cfg: RecordsConfig) -> np.ndarray:
    """The corpus of ``cfg`` as byte ids ``[cfg.n_bytes]`` int64 (documents joined by ``"\\n\\n"``).

    A pure function of ``cfg``: document ``i`` is drawn from ``np.random.default_rng([seed, i])``.
    """
    text = shakespeare_bytes()
    cut = int(0.9 * len(text))
    source = text[:cut] if cfg.text_part == "train" else text[cut:]
    p = np.asarray(cfg.mix, dtype=np.float64)
    p = p / p.sum()
    parts: list[bytes] = []
    size, i = 0, 0
    while size < cfg.n_bytes:
        rng = np.random.default_rng([cfg.seed, i])
        kind = KINDS[int(rng.choice(len(KINDS), p=p))]
        if kind == "text":
            doc = _text(rng, cfg, source)
        elif kind == "directory":
            doc = _directory(rng, cfg)
        elif kind == "tasks":
            doc = _task(rng)
        else:
            doc = _pairs(rng, cfg)
        b = doc.encode() + b"\n\n"
        parts.append(b)
        size += len(b)
        i += 1
    return np.frombuffer(b"".join(parts)[: cfg.n_bytes], dtype=np.uint8).astype(np.int64)


def held_out_overlap(corpus: np.ndarray, needles: Iterable[str]) -> list[str]:
    """The strings of ``needles`` that occur in ``corpus`` (byte ids ``[n]``), in order: the evaluation's phone
    numbers and lines of pairs must give ``[]``."""
    hay = np.asarray(corpus, dtype=np.uint8).tobytes()
    return [s for s in needles if s and s.encode() in hay]
