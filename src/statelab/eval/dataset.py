"""Evaluation files of ``statelab eval``: one item per JSONL line, read, checked and scored.

Each line of a file is one item, of either kind (a file may mix them):

* **generation**: ``{"prompt": "Q: cat\\nA: ", "answer": "CAT"}`` (``"context"`` is accepted for ``"prompt"``).
  The model continues the prompt greedily for at most ``max_new_tokens`` tokens, stopping at EOS or at a stop
  string (by default a newline: one answer per line), and the text before the first stop string is compared with
  ``answer``, both stripped of surrounding whitespace (exact match).
* **multiple choice**: ``{"context": "Q: cat\\nA:", "choices": [" CAT", " cat"], "answer": 0}``. Every choice is
  scored as a continuation of the context, exactly as given (include the space a format needs), by its total
  log-likelihood; the prediction is the best choice (``acc``), and, for ``acc_norm``, the best log-likelihood per
  character of the choice (lm-eval's length normalisation). Ties go to the first choice.

An optional ``"id"`` is kept in the per-item output; any other key is an error (a misspelt ``"answer"`` would
otherwise turn an item into another kind). A bad line is a :class:`DatasetError` naming the file and line number.

Scoring goes through :mod:`statelab.eval.scoring` (ragged batches under ``batch_tokens``; each multiple-choice
context is read once and its choices run from its state), every item from the same start ``state`` (zero, a
stored skill or a soup: :func:`statelab.eval.skills.start_state`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statelab.errors import StatelabError
from statelab.jsonl import json_lines

__all__ = ["EvalItem", "read_items", "score_items", "DatasetError", "DEFAULT_MAX_NEW_TOKENS"]

DEFAULT_MAX_NEW_TOKENS = 32


class DatasetError(StatelabError, ValueError):
    """A line of an evaluation file that is not a valid item."""


@dataclass(frozen=True)
class EvalItem:
    """One item of an evaluation file.

    Attributes:
        line: 1-based line number in the file.
        kind: ``"generation"`` or ``"multiple_choice"``.
        context: the prompt (generation) or the context (multiple choice).
        answer: the expected text (generation) or the index of the right choice (multiple choice).
        choices: the choices (multiple choice only).
        id: the item's ``"id"``, if it has one.
    """

    line: int
    kind: str
    context: str
    answer: str | int
    choices: tuple[str, ...] = field(default=())
    id: Any = None


_GEN_KEYS = {"prompt", "context", "answer", "id"}
_MC_KEYS = {"context", "choices", "answer", "id"}


def _item(obj: Any, where: str, line: int) -> EvalItem:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: an item is a JSON object, got {type(obj).__name__}")
    if "choices" in obj:
        extra = sorted(set(obj) - _MC_KEYS)
        if extra:
            raise DatasetError(f"{where}: unknown key(s) {extra}; a multiple-choice item has context, choices, answer")
        for key in ("context", "answer"):
            if key not in obj:
                raise DatasetError(f"{where}: a multiple-choice item needs {key!r}")
        ctx, choices, answer = obj["context"], obj["choices"], obj["answer"]
        if not isinstance(ctx, str):
            raise DatasetError(f"{where}: context must be a string, got {type(ctx).__name__}")
        if not isinstance(choices, list) or len(choices) < 2 or any(not isinstance(c, str) or not c for c in choices):
            raise DatasetError(f"{where}: choices must be a list of at least 2 non-empty strings, got {choices!r}")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DatasetError(
                f"{where}: answer must be the index of the right choice (0..{len(choices) - 1}), got {answer!r}"
            )
        return EvalItem(line, "multiple_choice", ctx, answer, tuple(choices), obj.get("id"))
    extra = sorted(set(obj) - _GEN_KEYS)
    if extra:
        raise DatasetError(
            f"{where}: unknown key(s) {extra}; a generation item has prompt (or context) and answer, "
            "a multiple-choice item context, choices and answer"
        )
    if ("prompt" in obj) == ("context" in obj):
        raise DatasetError(f"{where}: a generation item needs exactly one of 'prompt' or 'context'")
    prompt = obj.get("prompt", obj.get("context"))
    if not isinstance(prompt, str):
        raise DatasetError(f"{where}: the prompt must be a string, got {type(prompt).__name__}")
    if "answer" not in obj:
        raise DatasetError(f"{where}: a generation item needs 'answer'")
    if not isinstance(obj["answer"], str):
        raise DatasetError(
            f"{where}: a generation answer must be a string, got {type(obj['answer']).__name__} "
            "(a multiple-choice item also needs 'choices')"
        )
    return EvalItem(line, "generation", prompt, obj["answer"], (), obj.get("id"))


def read_items(path: str | Path) -> list[EvalItem]:
    """Every item of a JSONL evaluation file (blank lines skipped), checked (see the module doc).

    Raises:
        DatasetError: a line that is not JSON or not a valid item (``FILE:LINE: what is wrong``), or no item.
        OSError: the file cannot be read.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    items = []
    for n, where, obj in json_lines(text, DatasetError, lambda n: f"{p}:{n}"):
        items.append(_item(obj, where, n))
    if not items:
        raise DatasetError(f"{p}: no items (expected one JSON object per line)")
    return items


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)  # the first of equal maxima, as numpy's argmax


def score_items(
    model: Any,
    tokenizer: Any,
    items: list[EvalItem],
    *,
    state: Any = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop: tuple[str, ...] = ("\n",),
    batch_tokens: int = 4096,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``items`` (see the module doc); returns the summary and per-item results as JSON-able data."""
    from statelab.eval import scoring

    gen = [it for it in items if it.kind == "generation"]
    mc = [it for it in items if it.kind == "multiple_choice"]
    per_item: dict[int, dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    t0 = time.perf_counter()
    if gen:
        g = scoring.GenRequest(tuple(stop), max_new_tokens)
        outs = scoring.generate_until(
            model, tokenizer, [(it.context, g) for it in gen], state=state, batch_tokens=batch_tokens,
            progress=progress,
        )  # fmt: skip
        hits = 0
        for it, out in zip(gen, outs, strict=True):
            ok = out.strip() == str(it.answer).strip()
            hits += ok
            per_item[it.line] = {"output": out, "correct": ok}
        summary["generation"] = {"items": len(gen), "correct": hits, "exact_match": hits / len(gen)}
    if mc:
        reqs = [(it.context, c) for it in mc for c in it.choices]
        lls = scoring.loglikelihood(model, tokenizer, reqs, state=state, batch_tokens=batch_tokens, progress=progress)
        k = acc = acc_norm = 0
        for it in mc:
            lp = [ll for ll, _ in lls[k : k + len(it.choices)]]
            k += len(it.choices)
            pred = _argmax(lp)
            pred_norm = _argmax([v / len(c) for v, c in zip(lp, it.choices, strict=True)])
            acc += pred == it.answer
            acc_norm += pred_norm == it.answer
            per_item[it.line] = {
                "loglikelihoods": lp, "prediction": pred, "prediction_norm": pred_norm,
                "correct": pred == it.answer, "correct_norm": pred_norm == it.answer,
            }  # fmt: skip
        summary["multiple_choice"] = {
            "items": len(mc),
            "acc": acc / len(mc),
            "acc_norm": acc_norm / len(mc),
            "chance": sum(1 / len(it.choices) for it in mc) / len(mc),
        }
    seconds = time.perf_counter() - t0
    summary["seconds"] = seconds
    summary["items_per_second"] = len(items) / max(seconds, 1e-9)
    summary["items"] = [
        {"line": it.line, "kind": it.kind, **({"id": it.id} if it.id is not None else {}), **per_item[it.line]}
        for it in items
    ]
    return summary
