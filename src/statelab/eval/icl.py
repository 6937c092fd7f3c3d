"""In-context learning items: demonstration prompts from a template, and greedy exact match by teacher forcing.

A task's examples ``(x, y)`` become text with a template such as ``"Q: {x}\nA: {y}\n\n"`` (:class:`Prompter`);
an item is ``(query tokens, answer tokens)``, and :func:`exact_match` decides for a batch of items, each from its
own start state (a prompt's state, a retrieved skill, a soup), whether greedy decoding would emit the answer.
Used by the State Soup experiment and by the embedded model's accuracy-by-shots card.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from statelab.errors import ConfigError
from statelab.state.core import State

__all__ = ["Prompter", "exact_match"]


@torch.no_grad()
def exact_match(model: Any, state: State | None, items: Sequence[tuple[list[int], list[int]]]) -> list[bool]:
    """Greedy exact match of each item's answer when ``model`` continues from ``state`` (``None``: zero state).

    ``items``: ``(query tokens, answer tokens)``; ``state`` has batch 1 (shared by every item) or one row per item.
    Greedy decoding emits the answer iff the argmax at every answer position, given the correct prefix, is the
    answer token, so one right-padded teacher-forced pass ``[B, T]`` decides it; padding follows every scored
    position and cannot change it (the model is causal).
    """
    device = model.device
    seqs = [list(q) + list(a) for q, a in items]
    T = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    st = None if state is None else state.expand(len(seqs)) if state.batch_size == 1 else state
    logits, _ = model(x, st)
    pred = logits.argmax(-1)
    out = []
    for i, (q, a) in enumerate(items):
        pos = torch.arange(len(q) - 1, len(q) + len(a) - 1, device=device)
        out.append(bool((pred[i, pos] == x[i, pos + 1]).all()))
    return out


class Prompter:
    """Turns examples into demonstration text and tokens with a template ``"...{x}...{y}<terminator>..."``.

    Example:
        >>> p = Prompter("Q: {x}\\nA: {y}\\n\\n", tokenizer=None)
        >>> p.demos([("cat", "CAT")]), p.query("dog"), p.answer("DOG")
        ('Q: cat\\nA: CAT\\n\\n', 'Q: dog\\nA: ', 'DOG\\n')
    """

    def __init__(self, template: str, tokenizer: Any) -> None:
        if template.count("{y}") != 1 or template.count("{x}") != 1 or template.index("{x}") > template.index("{y}"):
            raise ConfigError(f"template must hold one {{x}} before one {{y}}, got {template!r}")
        self.template = template
        # the query is everything before {y} (as training documents render it, trailing space included)
        self._pre, self._post = template.split("{y}")
        self.tokenizer = tokenizer

    def demos(self, examples: Sequence[tuple[str, str]]) -> str:
        return "".join(self.template.replace("{x}", x).replace("{y}", y) for x, y in examples)

    def query(self, x: str) -> str:
        return self._pre.replace("{x}", x)

    def answer(self, y: str) -> str:
        """The answer as the model must produce it: the answer and the first character of the separator."""
        return y + self._post[:1]

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def demo_ids(self, examples: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """``(tokens, mask)`` of the demonstrations, one example after another; ``mask`` is 1 on each answer and
        its terminator (what :meth:`item` calls the answer), 0 elsewhere. The tokens are the concatenation of each
        example's own tokens (equal to ``ids(demos(examples))`` for a byte tokenizer)."""
        ids: list[int] = []
        mask: list[int] = []
        for x, y in examples:
            q, a = self.item(x, y)
            rest = self.ids(self.demos([(x, y)]))[len(q) + len(a) :]
            ids += q + a + rest
            mask += [0] * len(q) + [1] * len(a) + [0] * len(rest)
        return ids, mask

    def item(self, x: str, y: str) -> tuple[list[int], list[int]]:
        """``(query tokens, answer tokens)``; the answer split off the jointly tokenized text when possible."""
        q = self.ids(self.query(x))
        full = self.ids(self.query(x) + self.answer(y))
        if full[: len(q)] == q and len(full) > len(q):
            return q, full[len(q) :]
        return q, self.ids(self.answer(y))
