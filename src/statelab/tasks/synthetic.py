"""Token-level synthetic in-context tasks as pure functions of ``(config, seed, batch_size, split)``.

Every generator returns a :class:`SyntheticBatch` of integer token ids, tokenizer-agnostic: each config says which
ids mean what (its ``vocab_size`` is the smallest vocabulary that holds them). The label convention is the one of
``statelab.train.data``: ``labels[b, t]`` is the token the model should predict *at* position ``t`` (the next one,
``input_ids[b, t + 1]`` in the full sequence) or ``-100`` where there is no loss.

Randomness comes from one local ``torch.Generator`` seeded by ``sha256(task/split/seed)``, so the train and test
streams never share a generator seed and nothing touches global RNG state.

Tasks:

- **MQAR**, multi-query associative recall (Arora et al. 2023, Zoology, arXiv 2312.04927): ``k1 v1 ... kN vN``
  then, in a region of filler tokens, every key once more followed by its value, at power-law distributed gaps.
  Loss only where the next token is a queried value.
- **Phonebook** lookup (Jelassi et al. 2024, arXiv 2402.01032): entries ``first last : d1..dD \\n``, then queries
  ``? first last : d1..dD \\n``; loss on the queried number's digits (and the newline after it).
- Text forms of the same draws, as a prompt and its answer (:class:`TextItem`): :func:`phonebook_text` (Birdie's
  layout, arXiv 2411.01030 Fig. 1) and :func:`mqar_text` (``pairs: ab:37 ...`` then the queried keys). Item ``b``
  of ``phonebook_text(cfg, seed, B)`` is the book and the queries of row ``b`` of ``make_phonebook(cfg, seed, B)``.
- **Copying**: ``x1..xn | x1..xn``; loss on the copy.
- **Text recall** (:func:`make_text_recall`): MQAR as text in the word-task template, a random word mapping.
- **Selective copying** (Gu and Dao 2023, arXiv 2312.00752, section 3.1): ``n`` data tokens scattered among
  noise tokens in a region of ``region_len``, then a marker, then the data tokens in order; loss on them.

Worked example::

    >>> b = make_copying(CopyingConfig(n_tokens=3, vocab_size=10), seed=0, batch_size=1)
    >>> ids, labels = b.input_ids[0].tolist(), b.labels[0].tolist()
    >>> len(ids), ids[3] == 1, labels[:3] == [-100, -100, -100], labels[3:] == ids[:3]
    (6, True, True, True)
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple

import torch

from statelab.errors import ConfigError
from statelab.tasks.base import Document, check_template, split_of

__all__ = [
    "IGNORE_INDEX",
    "SyntheticBatch",
    "MQARConfig",
    "PhonebookConfig",
    "CopyingConfig",
    "SelectiveCopyingConfig",
    "make_mqar",
    "make_phonebook",
    "make_copying",
    "make_selective_copying",
    "render_phonebook",
    "TextItem",
    "phonebook_text",
    "mqar_text",
    "TextRecallConfig",
    "make_text_recall",
    "SYNTHETIC_TASKS",
    "task_generator",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SyntheticBatch:
    """``input_ids: [B, T]`` int64 and ``labels: [B, T]`` int64 (``-100`` where no loss)."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def task_generator(task: str, split: str, seed: int) -> torch.Generator:
    """A CPU generator owned by ``(task, split, seed)``; different splits never share a seed."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    digest = hashlib.sha256(f"{task}/{split}/{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _check_ints(cfg: object, minimums: dict[str, int]) -> None:
    for f in fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if f.name in minimums:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{type(cfg).__name__}.{f.name} must be an int, got {value!r}")
            if value < minimums[f.name]:
                raise ConfigError(f"{type(cfg).__name__}.{f.name} must be >= {minimums[f.name]}, got {value}")


def _check_batch(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _shift(full: torch.Tensor, target: torch.Tensor) -> SyntheticBatch:
    """``full, target: [B, T + 1]`` (``target`` -100 where no loss) -> ``full[:, :-1]``, ``target[:, 1:]``."""
    return SyntheticBatch(full[:, :-1].contiguous(), target[:, 1:].contiguous())


def _sample_rows(gen: torch.Generator, batch: int, low: int, high: int, n: int) -> torch.Tensor:
    """``[batch, n]`` ints in ``[low, high)``, distinct within a row."""
    return torch.rand(batch, high - low, generator=gen).argsort(dim=1)[:, :n] + low


@dataclass(frozen=True)
class MQARConfig:
    """Multi-query associative recall (Zoology, arXiv 2312.04927).

    Ids: ``0`` filler; keys ``[1, vocab_size // 2)``; values ``[vocab_size // 2, vocab_size)``.

    Attributes:
        vocab_size: total ids (>= 2 * num_kv_pairs + 2 so keys and values can be distinct).
        seq_len: T, the length of ``input_ids``.
        num_kv_pairs: N pairs in the context; every key is queried once.
        power_a: exponent ``a`` of the gap distribution ``p(g) ∝ g^(a - 1)`` over query slots (small ``a``: most
            queries soon after the context, a long tail far away).
        filler: ``"zero"`` (id 0 between queries) or ``"random"`` (uniform ids from the whole vocabulary).
    """

    vocab_size: int = 8192
    seq_len: int = 256
    num_kv_pairs: int = 16
    power_a: float = 0.01
    filler: Literal["zero", "random"] = "zero"

    def __post_init__(self) -> None:
        _check_ints(self, {"vocab_size": 4, "seq_len": 4, "num_kv_pairs": 1})
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ConfigError(
                f"MQARConfig.vocab_size={self.vocab_size} has too few keys for num_kv_pairs={self.num_kv_pairs}"
            )
        if (self.seq_len + 1 - 2 * self.num_kv_pairs) // 2 < self.num_kv_pairs:
            raise ConfigError(
                f"MQARConfig.seq_len={self.seq_len} is too short for {self.num_kv_pairs} pairs and "
                f"their queries (needs >= {4 * self.num_kv_pairs - 1})"
            )
        if not isinstance(self.power_a, int | float) or not 0 < self.power_a <= 1:
            raise ConfigError(f"MQARConfig.power_a must be in (0, 1], got {self.power_a!r}")
        if self.filler not in ("zero", "random"):
            raise ConfigError(f"MQARConfig.filler must be 'zero' or 'random', got {self.filler!r}")


def _mqar_draw(
    cfg: MQARConfig, gen: torch.Generator, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``keys, values [B, N]`` (distinct within a row), the query ``slot`` of each queried key ``[B, N]`` and
    ``order [B, N]``: slot ``slot[b, i]`` asks for key ``order[b, i]``."""
    n, total = cfg.num_kv_pairs, cfg.seq_len + 1
    half = cfg.vocab_size // 2
    keys = _sample_rows(gen, batch_size, 1, half, n)  # [B, N]
    values = _sample_rows(gen, batch_size, half, cfg.vocab_size, n)  # [B, N]
    slots = (total - 2 * n) // 2  # query slots of two tokens each
    gaps = torch.arange(1, slots + 1, dtype=torch.float64)
    probs = (cfg.power_a * gaps ** (cfg.power_a - 1)).expand(batch_size, slots)
    slot = torch.multinomial(probs, n, replacement=False, generator=gen)  # [B, N]
    order = torch.rand(batch_size, n, generator=gen).argsort(dim=1)  # which key goes to which slot
    return keys, values, slot, order


def make_mqar(cfg: MQARConfig, seed: int, batch_size: int, split: str = "train") -> SyntheticBatch:
    """A batch of MQAR sequences.

    Returns ``input_ids, labels: [B, seq_len]``. At the input position of a queried key the label is its value;
    everywhere else -100.

    >>> cfg = MQARConfig(vocab_size=16, seq_len=12, num_kv_pairs=2)
    >>> b = make_mqar(cfg, seed=0, batch_size=1)
    >>> ids, lab = b.input_ids[0].tolist(), b.labels[0].tolist()
    >>> kv = dict(zip(ids[0:4:2], ids[1:4:2]))
    >>> all(lab[t] == kv[ids[t]] for t in range(12) if lab[t] != -100), sum(v != -100 for v in lab)
    (True, 2)
    """
    _check_batch(batch_size)
    gen = task_generator("mqar", split, seed)
    n, total = cfg.num_kv_pairs, cfg.seq_len + 1
    keys, values, slot, order = _mqar_draw(cfg, gen, batch_size)
    context = torch.stack([keys, values], dim=2).reshape(batch_size, 2 * n)

    if cfg.filler == "zero":
        region = torch.zeros(batch_size, total - 2 * n, dtype=torch.long)
    else:
        region = torch.randint(0, cfg.vocab_size, (batch_size, total - 2 * n), generator=gen)
    target_region = torch.full_like(region, IGNORE_INDEX)
    rows = torch.arange(batch_size)[:, None]
    q_keys, q_vals = keys.gather(1, order), values.gather(1, order)
    region[rows, 2 * slot] = q_keys
    region[rows, 2 * slot + 1] = q_vals
    target_region[rows, 2 * slot + 1] = q_vals

    full = torch.cat([context, region], dim=1)
    target = torch.cat([torch.full_like(context, IGNORE_INDEX), target_region], dim=1)
    return _shift(full, target)


_FIRST = (
    "Alice",
    "Bob",
    "Carol",
    "David",
    "Emma",
    "Frank",
    "Grace",
    "Henry",
    "Irene",
    "Jack",
    "Karen",
    "Liam",
    "Maria",
    "Noah",
    "Olivia",
    "Peter",
    "Quinn",
    "Rosa",
    "Sam",
    "Tina",
    "Umar",
    "Vera",
    "Walter",
    "Xena",
    "Yusuf",
    "Zoe",
    "Anna",
    "Ben",
    "Clara",
    "Dan",
    "Eva",
    "Felix",
    "Gina",
    "Hugo",
    "Ivy",
    "Jonas",
    "Kate",
    "Leo",
    "Mia",
    "Nina",
)
_LAST = (
    "Smith",
    "Jones",
    "Brown",
    "Taylor",
    "Wilson",
    "Davies",
    "Evans",
    "Thomas",
    "Roberts",
    "Walker",
    "Wright",
    "Hall",
    "Green",
    "Wood",
    "Clark",
    "Hughes",
    "Lewis",
    "Moore",
    "King",
    "Baker",
    "Hill",
    "Scott",
    "Young",
    "Allen",
    "Adams",
    "Mitchell",
    "Turner",
    "Parker",
    "Carter",
    "Cooper",
    "Ward",
    "Morris",
    "Price",
    "Bell",
    "Bailey",
    "Cook",
    "Gray",
    "Hunt",
    "Ross",
    "Fox",
)


@dataclass(frozen=True)
class PhonebookConfig:
    """Phonebook lookup (Jelassi et al. 2024, arXiv 2402.01032).

    Ids: ``0`` pad, ``1`` ``:``, ``2`` newline, ``3`` ``?`` (query marker), ``4..13`` digits 0-9, then
    ``n_first`` first names, then ``n_last`` last names. Names in one book are distinct (first, last) pairs.

    Attributes:
        n_entries: entries in the book.
        n_queries: entries asked for after the book (distinct, drawn from the book).
        n_digits: digits per phone number.
        n_first, n_last: name vocabulary sizes (the text rendering has 40 of each built in; more render as
            ``F<i>`` / ``L<i>``).
    """

    n_entries: int = 20
    n_queries: int = 4
    n_digits: int = 7
    n_first: int = 40
    n_last: int = 40

    def __post_init__(self) -> None:
        _check_ints(self, {"n_entries": 1, "n_queries": 1, "n_digits": 1, "n_first": 1, "n_last": 1})
        if self.n_queries > self.n_entries:
            raise ConfigError(f"PhonebookConfig.n_queries={self.n_queries} > n_entries={self.n_entries}")
        if self.n_entries > self.n_first * self.n_last:
            raise ConfigError(
                f"PhonebookConfig: {self.n_entries} entries need distinct names, only "
                f"{self.n_first * self.n_last} exist"
            )

    @property
    def first_id(self) -> int:
        return 14

    @property
    def last_id(self) -> int:
        return 14 + self.n_first

    @property
    def vocab_size(self) -> int:
        return 14 + self.n_first + self.n_last

    @property
    def seq_len(self) -> int:
        """T of ``input_ids``: book and queries are ``n_digits + 4`` tokens per line, ``+ 1`` for ``?``, minus 1."""
        return self.n_entries * (self.n_digits + 4) + self.n_queries * (self.n_digits + 5) - 1


def _phonebook_draw(cfg: PhonebookConfig, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``book [B, n_entries, n_digits + 4]`` (token lines ``first last : digits \\n``) and the queried entries
    ``asked [B, n_queries]`` (distinct, in query order)."""
    n, d = cfg.n_entries, cfg.n_digits
    name_idx = _sample_rows(gen, batch_size, 0, cfg.n_first * cfg.n_last, n)  # distinct (first, last) pairs
    first = cfg.first_id + name_idx // cfg.n_last
    last = cfg.last_id + name_idx % cfg.n_last
    digits = 4 + torch.randint(0, 10, (batch_size, n, d), generator=gen)
    col = torch.ones(batch_size, n, 1, dtype=torch.long)
    book = torch.cat([first[..., None], last[..., None], col, digits, 2 * col], dim=2)  # [B, n, d + 4]
    asked = _sample_rows(gen, batch_size, 0, n, cfg.n_queries)  # [B, Q]
    return book, asked


def make_phonebook(cfg: PhonebookConfig, seed: int, batch_size: int, split: str = "train") -> SyntheticBatch:
    """A batch of phonebooks with queries; ``input_ids, labels: [B, cfg.seq_len]``.

    The loss covers each queried number's digits and the newline after it (predicted from ``:`` on).

    >>> b = make_phonebook(PhonebookConfig(n_entries=3, n_queries=1, n_digits=2), seed=0, batch_size=1)
    >>> text = render_phonebook(PhonebookConfig(n_entries=3, n_queries=1, n_digits=2), b.input_ids[0])
    >>> text.count("\\n"), text.startswith("?") is False, [t for t in b.labels[0].tolist() if t != -100][-1]
    (3, True, 2)
    """
    _check_batch(batch_size)
    n, d = cfg.n_entries, cfg.n_digits
    book, asked = _phonebook_draw(cfg, task_generator("phonebook", split, seed), batch_size)
    rows = torch.arange(batch_size)[:, None]
    queries = torch.cat([3 * torch.ones(batch_size, cfg.n_queries, 1, dtype=torch.long), book[rows, asked]], dim=2)
    q_target = torch.full_like(queries, IGNORE_INDEX)
    q_target[:, :, 4:] = queries[:, :, 4:]  # digits and newline
    full = torch.cat([book.reshape(batch_size, -1), queries.reshape(batch_size, -1)], dim=1)
    target = torch.cat([torch.full((batch_size, n * (d + 4)), IGNORE_INDEX), q_target.reshape(batch_size, -1)], dim=1)
    return _shift(full, target)


def render_phonebook(cfg: PhonebookConfig, ids: torch.Tensor | list[int]) -> str:
    """Text of a phonebook token sequence (``ids: [T]``), e.g. ``"Alice Smith: 0412\\n? Alice Smith: 0412\\n"``."""
    out: list[str] = []
    for t in torch.as_tensor(ids).tolist():
        if t == 0:
            continue
        if t in (1, 2, 3):
            out.append({1: ":", 2: "\n", 3: "?"}[t])
        elif 4 <= t < 14:
            out.append(("" if out and out[-1][-1].isdigit() else " ") + str(t - 4))
        elif cfg.first_id <= t < cfg.last_id:
            i = t - cfg.first_id
            out.append(("" if not out or out[-1] == "\n" else " ") + (_FIRST[i] if i < len(_FIRST) else f"F{i}"))
        elif cfg.last_id <= t < cfg.vocab_size:
            i = t - cfg.last_id
            out.append(" " + (_LAST[i] if i < len(_LAST) else f"L{i}"))
        else:
            raise ConfigError(f"token {t} is outside the phonebook vocabulary of {cfg.vocab_size} ids")
    return "".join(out)


class TextItem(NamedTuple):
    """A task as text: the ``prompt`` a model reads and the ``answer`` it should produce."""

    prompt: str
    answer: str


def _name_text(cfg: PhonebookConfig, first_id: int, last_id: int) -> str:
    i, j = first_id - cfg.first_id, last_id - cfg.last_id
    return f"{_FIRST[i] if i < len(_FIRST) else f'F{i}'} {_LAST[j] if j < len(_LAST) else f'L{j}'}"


def phonebook_text(cfg: PhonebookConfig, seed: int, batch_size: int, split: str = "train") -> list[TextItem]:
    """The phonebooks of :func:`make_phonebook` (same seed, same draws) as text, in Birdie's layout: the question,
    the book, the question again; the answer lists the queried numbers.

    >>> item = phonebook_text(PhonebookConfig(n_entries=2, n_queries=1, n_digits=3), seed=0, batch_size=1)[0]
    >>> lines = item.prompt.splitlines()
    >>> lines[0].startswith("Find: "), lines[1], lines[0] == lines[-1], f": {item.answer}" in item.prompt
    (True, 'Phonebook:', True, True)
    """
    _check_batch(batch_size)
    book, asked = _phonebook_draw(cfg, task_generator("phonebook", split, seed), batch_size)
    out = []
    for b in range(batch_size):
        names = [_name_text(cfg, int(line[0]), int(line[1])) for line in book[b]]
        numbers = ["".join(str(int(t) - 4) for t in line[3:-1]) for line in book[b]]
        who = ", ".join(names[int(i)] for i in asked[b])
        lines = "".join(f"{n}: {p}\n" for n, p in zip(names, numbers, strict=True))
        answer = ", ".join(numbers[int(i)] for i in asked[b])
        out.append(TextItem(f"Find: {who}\nPhonebook:\n{lines}Find: {who}\n", answer))
    return out


def mqar_text(cfg: MQARConfig, seed: int, batch_size: int, n_queries: int, split: str = "train") -> list[TextItem]:
    """The key-value pairs of :func:`make_mqar` (same seed, same draws) as text: ``pairs: ab:37 cd:12 ...`` and
    ``query:`` the first ``n_queries`` keys that the token sequence asks for, in its order; the answer lists their
    values. Keys render as two letters, values as two digits, so ``cfg.vocab_size`` must be at most 200.

    >>> item = mqar_text(MQARConfig(vocab_size=200, seq_len=16, num_kv_pairs=3), seed=0, batch_size=1, n_queries=2)[0]
    >>> pairs = dict(p.split(":") for p in item.prompt.splitlines()[0][len("pairs: "):].split())
    >>> item.answer.split() == [pairs[k] for k in item.prompt.splitlines()[1][len("query: "):].split()]
    True
    """
    _check_batch(batch_size)
    if not isinstance(n_queries, int) or not 1 <= n_queries <= cfg.num_kv_pairs:
        raise ConfigError(f"n_queries must be an int in [1, {cfg.num_kv_pairs}], got {n_queries!r}")
    half = cfg.vocab_size // 2
    if half - 1 > 26 * 26 or cfg.vocab_size - half > 100:
        raise ConfigError(f"MQARConfig.vocab_size={cfg.vocab_size} is too large for the text form (at most 200)")
    keys, values, slot, order = _mqar_draw(cfg, task_generator("mqar", split, seed), batch_size)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for b in range(batch_size):
        key = [letters[(int(k) - 1) // 26] + letters[(int(k) - 1) % 26] for k in keys[b]]
        val = [f"{int(v) - half:02d}" for v in values[b]]
        asked = order[b][slot[b].argsort()][:n_queries].tolist()  # queried key indices in sequence order
        prompt = "pairs: " + " ".join(f"{k}:{v}" for k, v in zip(key, val, strict=True))
        prompt += "\nquery: " + " ".join(key[i] for i in asked) + "\n"
        out.append(TextItem(prompt, " ".join(val[i] for i in asked)))
    return out


@dataclass(frozen=True)
class CopyingConfig:
    """Copy a random string after a separator.

    Ids: ``0`` pad, ``1`` separator, data ``[2, vocab_size)``. ``input_ids: [B, 2 n]``; loss on the last ``n``.
    """

    n_tokens: int = 32
    vocab_size: int = 16

    def __post_init__(self) -> None:
        _check_ints(self, {"n_tokens": 1, "vocab_size": 3})

    @property
    def seq_len(self) -> int:
        return 2 * self.n_tokens


def make_copying(cfg: CopyingConfig, seed: int, batch_size: int, split: str = "train") -> SyntheticBatch:
    """``x1..xn SEP x1..xn`` with loss on the copy (see the module example)."""
    _check_batch(batch_size)
    gen = task_generator("copying", split, seed)
    data = torch.randint(2, cfg.vocab_size, (batch_size, cfg.n_tokens), generator=gen)
    sep = torch.ones(batch_size, 1, dtype=torch.long)
    full = torch.cat([data, sep, data], dim=1)
    target = torch.cat([torch.full((batch_size, cfg.n_tokens + 1), IGNORE_INDEX), data], dim=1)
    return _shift(full, target)


@dataclass(frozen=True)
class SelectiveCopyingConfig:
    """Selective copying (Mamba, arXiv 2312.00752): keep the data tokens, skip the noise, in order.

    Ids: ``0`` noise, ``1`` marker, data ``[2, vocab_size)``. A region of ``region_len`` holds ``n_tokens`` data
    tokens at random positions (order kept), the rest noise; then the marker and the data tokens.
    ``input_ids: [B, region_len + n_tokens]``; loss on the last ``n_tokens`` positions.
    """

    n_tokens: int = 16
    region_len: int = 64
    vocab_size: int = 16

    def __post_init__(self) -> None:
        _check_ints(self, {"n_tokens": 1, "region_len": 1, "vocab_size": 3})
        if self.region_len < self.n_tokens:
            raise ConfigError(f"SelectiveCopyingConfig.region_len={self.region_len} < n_tokens={self.n_tokens}")

    @property
    def seq_len(self) -> int:
        return self.region_len + self.n_tokens


def make_selective_copying(
    cfg: SelectiveCopyingConfig, seed: int, batch_size: int, split: str = "train"
) -> SyntheticBatch:
    """A batch of selective-copying sequences.

    >>> cfg = SelectiveCopyingConfig(n_tokens=2, region_len=5, vocab_size=8)
    >>> b = make_selective_copying(cfg, seed=1, batch_size=1)
    >>> ids, lab = b.input_ids[0].tolist(), b.labels[0].tolist()
    >>> [t for t in ids[:5] if t != 0] == lab[5:], ids[5]
    (True, 1)
    """
    _check_batch(batch_size)
    gen = task_generator("selective_copying", split, seed)
    data = torch.randint(2, cfg.vocab_size, (batch_size, cfg.n_tokens), generator=gen)
    pos = _sample_rows(gen, batch_size, 0, cfg.region_len, cfg.n_tokens).sort(dim=1).values
    region = torch.zeros(batch_size, cfg.region_len, dtype=torch.long)
    region[torch.arange(batch_size)[:, None], pos] = data
    full = torch.cat([region, torch.ones(batch_size, 1, dtype=torch.long), data], dim=1)
    target = torch.cat([torch.full((batch_size, cfg.region_len + 1), IGNORE_INDEX), data], dim=1)
    return _shift(full, target)


SYNTHETIC_TASKS: dict[str, tuple[type, Callable[..., SyntheticBatch]]] = {
    "mqar": (MQARConfig, make_mqar),
    "phonebook": (PhonebookConfig, make_phonebook),
    "copying": (CopyingConfig, make_copying),
    "selective_copying": (SelectiveCopyingConfig, make_selective_copying),
}
"""name -> (config class, ``generator(config, seed, batch_size, split) -> SyntheticBatch``)."""


@dataclass(frozen=True)
class TextRecallConfig:
    """Associative recall in the word-task template: a random word -> word mapping that exists only in context.

    A document shows ``n_pairs`` demonstrations ``Q: key\\nA: value\\n\\n`` (distinct keys, values drawn with
    replacement, both from the common-word list of the ``split``), then ``n_queries`` more demonstrations whose keys
    repeat earlier ones with the same values. Only the repeated answers can be known, so only they are marked in
    ``answer_spans``. It is MQAR (arXiv 2312.04927) in the text format of the word tasks, for training a small
    model to read a function from its context.
    """

    n_pairs: int = 8
    n_queries: int = 8
    template: str = "Q: {x}\nA: {y}\n\n"

    def __post_init__(self) -> None:
        _check_ints(self, {"n_pairs": 1, "n_queries": 1})
        check_template(self.template)


def make_text_recall(cfg: TextRecallConfig, seed: int, split: str = "train") -> Document:
    """One associative-recall document (see :class:`TextRecallConfig`).

    >>> doc = make_text_recall(TextRecallConfig(n_pairs=3, n_queries=2), seed=0)
    >>> shown = dict(doc.examples[:3])
    >>> all(shown[x] == y for x, y in doc.examples[3:]), len(doc.answer_spans)
    (True, 2)
    """
    from statelab.tasks.words import load_words

    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    words = [w for w in load_words() if split_of(w) == split]
    if cfg.n_pairs > len(words):
        raise ConfigError(f"TextRecallConfig.n_pairs={cfg.n_pairs} > {len(words)} {split} words")
    rng = random.Random(f"text_recall/{split}/{seed}")
    keys = rng.sample(words, cfg.n_pairs)
    pairs = [(k, rng.choice(words)) for k in keys]
    queries = [pairs[rng.randrange(cfg.n_pairs)] for _ in range(cfg.n_queries)]
    head, sep = check_template(cfg.template)
    parts: list[str] = []
    spans, byte_spans = [], []
    n_chars = n_bytes = 0
    for i, (x, y) in enumerate(pairs + queries):
        for piece, scored in ((head.replace("{x}", x), False), (y, i >= cfg.n_pairs), (sep, False)):
            size = len(piece.encode("utf-8"))
            if scored:
                spans.append((n_chars, n_chars + len(piece)))
                byte_spans.append((n_bytes, n_bytes + size))
            parts.append(piece)
            n_chars += len(piece)
            n_bytes += size
    return Document("text_recall", tuple(pairs + queries), "".join(parts), tuple(spans), tuple(byte_spans))
