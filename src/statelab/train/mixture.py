"""The ``tasks`` data source: in-context learning sequences from a mixture of word-function tasks.

Sequence ``i`` of stream ``seed`` is one task (drawn uniformly from ``tasks``) and distinct demonstrations of it
from the task's *train* split, rendered with the template one after the other until ``seq_len + 1`` tokens are
filled (the last demonstration is cut). Training on such sequences teaches a model to infer the task from the
demonstrations before each answer: the n-th answer is predicted after n - 1 examples, so every sequence trains
0-shot to many-shot prediction at once (the meta-training recipe of MetaICL, Min et al., arXiv 2110.15943).

With ``loss_on = "answers"`` only the answer tokens and the first separator token after each answer (so the model
learns where an answer ends) carry loss; inputs, which no context can predict, do not. ``"all"`` puts loss on
every token.

Example::

    >>> src = TaskMixture(TaskMixtureOptions(tasks=("uppercase",)), seq_len=24, seed=0)
    >>> x, y = src.sequence(0)
    >>> bytes(int(t) for t in x[:3])
    b'Q: '
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    tasks: tuple[str, ...] = ()
    template: str = ""
    loss_on: str = "answers"
    tokenizer: str = "byte"


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
        self.names = names
        self.pools = [TASKS[n].pool("train") for n in names]
        self.loss_on = options.loss_on
        self.tokenizer = resolve_tokenizer(options.tokenizer)
        self.seq_len = seq_len
        self.seed = seed

    def _example(self, x: str, y: str) -> tuple[list[int], list[int]]:
        """Tokens of one demonstration and a 0/1 loss mask over them."""
        enc = self.tokenizer.encode
        q, a, s = enc(self.head.replace("{x}", x)), enc(y), enc(self.sep)
        ids = q + a + s
        if self.loss_on == "all":
            return ids, [1] * len(ids)
        return ids, [0] * len(q) + [1] * len(a) + [1] * min(1, len(s)) + [0] * max(0, len(s) - 1)

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = index_rng(self.seed, index)
        t = int(rng.integers(len(self.names)))
        pool = self.pools[t]
        order = rng.permutation(len(pool))
        ids: list[int] = []
        mask: list[int] = []
        j = 0
        while len(ids) < self.seq_len + 1:
            x, y = pool[int(order[j % len(pool)])]
            e, m = self._example(x, y)
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
