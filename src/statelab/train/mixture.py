"""The ``tasks`` data source: in-context learning sequences from a mixture of word-function tasks.

Sequence ``i`` of stream ``seed`` is one task (drawn uniformly from ``tasks``) and distinct demonstrations of it
from the task's *train* split, rendered with the template one after the other until ``seq_len + 1`` tokens are
filled (the last demonstration is cut). Training on such sequences teaches a model to infer the task from the
demonstrations before each answer: the n-th answer is predicted after n - 1 examples, so every sequence trains
0-shot to many-shot prediction at once (the meta-training recipe of MetaICL, Min et al., arXiv 2110.15943).

With ``loss_on = "answers"`` only the answer tokens and the first separator token after each answer (so the model
learns where an answer ends) carry loss; inputs, which no context can predict, do not. ``"all"`` puts loss on
every token.

Three options widen what a sequence can be (all off by default, and then sequence ``i`` is exactly what it always
was; their random choices come from a second stream of ``(seed, i)``):

- ``templates`` + ``template_mix``: with probability ``template_mix`` a sequence is rendered with one of the extra
  templates instead of ``template``, so the model learns the task from the pairs, not from one fixed format;
- ``switch_prob``: with this probability a sequence holds two or three tasks one after the other (the switch is
  not announced), so the model learns to notice that the examples changed and to re-infer the task;
- ``text_fraction``: this fraction of sequences are windows of an English text (``text``; loss on every byte), so
  a byte model learns words and spelling as well as formats.

Example::

    >>> src = TaskMixture(TaskMixtureOptions(tasks=("uppercase",)), seq_len=24, seed=0)
    >>> x, y = src.sequence(0)
    >>> bytes(int(t) for t in x[:3])
    b'Q: '
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from statelab.errors import ConfigError
from statelab.train.data import IGNORE_INDEX, index_rng, register_source, resolve_tokenizer

__all__ = ["TaskMixtureOptions", "TaskMixture"]


@dataclass(frozen=True)
class TaskMixtureOptions:
    """Options of the ``tasks`` source.

    Attributes:
        tasks: word-function task names (:data:`statelab.tasks.TASKS`); empty for all of them.
        template: demonstration template with ``{x}`` and ``{y}``; empty for the suite's default.
        loss_on: ``"answers"`` (answer tokens and the token after each answer) or ``"all"``.
        tokenizer: ``"byte"`` or a tokenizer directory / ``tokenizer.json``.
        templates: extra demonstration templates (each with ``{x}`` then ``{y}``).
        template_mix: probability that a sequence uses one of ``templates`` (uniformly) instead of ``template``.
        switch_prob: probability that a sequence holds 2 or 3 tasks in turn instead of one.
        text_fraction: fraction of sequences that are windows of ``text`` (loss on every token).
        text: ``"tinyshakespeare"`` (shipped with statelab) or a UTF-8 text file.
    """

    tasks: tuple[str, ...] = ()
    template: str = ""
    loss_on: str = "answers"
    tokenizer: str = "byte"
    templates: tuple[str, ...] = ()
    template_mix: float = 0.0
    switch_prob: float = 0.0
    text_fraction: float = 0.0
    text: str = "tinyshakespeare"


def _load_text(name: str) -> str:
    """The general text of the mixture: the packaged Tiny Shakespeare or a UTF-8 file."""
    from pathlib import Path

    if name == "tinyshakespeare":
        raw = resources.files("statelab").joinpath("data", "tinyshakespeare.txt.gz").read_bytes()
        return gzip.decompress(raw).decode("utf-8")
    p = Path(name)
    if not p.is_file():
        raise ConfigError(f"data.options.text={name!r} is neither 'tinyshakespeare' nor an existing text file")
    return p.read_text(encoding="utf-8")


class TaskMixture:
    """Fixed-length ICL sequences of word-function tasks, a pure function of ``(seed, index)``."""

    def __init__(self, options: TaskMixtureOptions, seq_len: int, seed: int) -> None:
        from statelab.tasks import DEFAULT_TEMPLATE, TASKS, check_template

        if options.loss_on not in ("answers", "all"):
            raise ConfigError(f"data.options.loss_on must be 'answers' or 'all', got {options.loss_on!r}")
        names = list(options.tasks) if options.tasks else list(TASKS)
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ConfigError(f"data.options.tasks: unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        self.template = options.template or DEFAULT_TEMPLATE
        self.head, self.sep = check_template(self.template)
        self.formats = [(self.head, self.sep)] + [check_template(t) for t in options.templates]
        for name in ("template_mix", "switch_prob", "text_fraction"):
            v = getattr(options, name)
            if not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
                raise ConfigError(f"data.options.{name} must be a probability in [0, 1], got {v!r}")
        if options.template_mix > 0 and not options.templates:
            raise ConfigError("data.options.template_mix > 0 needs data.options.templates (the extra templates)")
        self.template_mix = float(options.template_mix)
        self.switch_prob = float(options.switch_prob) if len(names) > 1 else 0.0
        self.text_fraction = float(options.text_fraction)
        self.names = names
        self.pools = [TASKS[n].pool("train") for n in names]
        self.loss_on = options.loss_on
        self.tokenizer = resolve_tokenizer(options.tokenizer)
        self.seq_len = seq_len
        self.seed = seed
        self.text_ids: torch.Tensor | None = None
        if self.text_fraction > 0:
            self.text_ids = torch.tensor(self.tokenizer.encode(_load_text(options.text)), dtype=torch.long)
            if self.text_ids.numel() < seq_len + 1:
                raise ConfigError(f"data.options.text has {self.text_ids.numel()} tokens; seq_len needs {seq_len + 1}")

    def _example(self, x: str, y: str, fmt: int = 0) -> tuple[list[int], list[int]]:
        """Tokens of one demonstration in format ``fmt`` and a 0/1 loss mask over them."""
        enc = self.tokenizer.encode
        head, sep = self.formats[fmt]
        q, a, s = enc(head.replace("{x}", x)), enc(y), enc(sep)
        ids = q + a + s
        if self.loss_on == "all":
            return ids, [1] * len(ids)
        return ids, [0] * len(q) + [1] * len(a) + [1] * min(1, len(s)) + [0] * max(0, len(s) - 1)

    def _options_rng(self, index: int) -> np.random.Generator:
        """The second stream of sequence ``index``: template, switch and text choices."""
        return np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(index), 1])

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = index_rng(self.seed, index)
        t = int(rng.integers(len(self.names)))
        extra = self._options_rng(index) if (self.template_mix or self.switch_prob or self.text_fraction) else None
        if extra is not None and self.text_ids is not None and extra.random() < self.text_fraction:
            start = int(extra.integers(0, self.text_ids.numel() - self.seq_len))
            window = self.text_ids[start : start + self.seq_len + 1]
            return window[:-1].clone(), window[1:].clone()
        fmt = 0
        if extra is not None and self.template_mix and extra.random() < self.template_mix:
            fmt = 1 + int(extra.integers(len(self.formats) - 1))
        # where each task segment ends (in tokens); one segment unless the sequence switches tasks
        ends = [self.seq_len + 1]
        tasks = [t]
        if extra is not None and self.switch_prob and extra.random() < self.switch_prob:
            n_seg = 2 + int(extra.integers(2))
            cuts = sorted(int(c) for c in extra.integers(self.seq_len // 6, self.seq_len, size=n_seg - 1))
            ends = [*cuts, self.seq_len + 1]
            for _ in range(n_seg - 1):
                others = [i for i in range(len(self.names)) if i != tasks[-1]]
                tasks.append(others[int(extra.integers(len(others)))])
        ids: list[int] = []
        mask: list[int] = []
        for seg, (task, end) in enumerate(zip(tasks, ends, strict=True)):
            pool = self.pools[task]
            order = rng.permutation(len(pool)) if seg == 0 else extra.permutation(len(pool))
            j = 0
            while len(ids) < end:
                x, y = pool[int(order[j % len(pool)])]
                e, m = self._example(x, y, fmt)
                ids += e
                mask += m
                j += 1
        ids, mask = ids[: self.seq_len + 1], mask[: self.seq_len + 1]
        x = torch.tensor(ids[:-1], dtype=torch.long)
        labels = torch.tensor(ids[1:], dtype=torch.long)
        labels[torch.tensor(mask[1:]) == 0] = IGNORE_INDEX
        return x, labels

    def task_of(self, index: int) -> str:
        """The task sequence ``index`` demonstrates."""
        return self.names[int(index_rng(self.seed, index).integers(len(self.names)))]


@register_source("tasks", TaskMixtureOptions)
def _tasks_source(options: TaskMixtureOptions, seq_len: int, seed: int) -> TaskMixture:
    return TaskMixture(options, seq_len, seed)
