"""Helpers shared by the serving tests: run requests through an engine and compute the references."""

from __future__ import annotations

import queue

import torch

from statelab.serve.engine import Delta, Engine, Failure, GenerationRequest, SamplingParams
from statelab.serve.protocol import Choice

__all__ = ["submit", "collect", "run", "reference"]


def submit(engine: Engine, prompts, params: SamplingParams, *, n: int = 1, start=None):
    """Queue one request; returns ``(request, event queue)``."""
    events: queue.Queue = queue.Queue()
    req = GenerationRequest(prompts, params, events.put, n=n, start=start)
    engine.submit(req)
    return req, events


def collect(req: GenerationRequest, events: queue.Queue, timeout: float = 60.0) -> tuple[list[Choice], list[Delta]]:
    """Wait until every choice of ``req`` finished; returns the choices (by index) and the deltas in order."""
    choices = {i: Choice(i) for i in range(req.num_choices)}
    deltas, finished = [], 0
    while finished < req.num_choices:
        ev = events.get(timeout=timeout)
        assert not isinstance(ev, Failure), ev.message
        deltas.append(ev)
        choices[ev.index].add(ev)
        finished += ev.finish_reason is not None
    return [choices[i] for i in range(req.num_choices)], deltas


def run(engine: Engine, prompts, params: SamplingParams, **kw) -> list[Choice]:
    return collect(*submit(engine, prompts, params, **kw))[0]


def reference(model, ids: list[int], max_tokens: int, eos: int | None, state=None, **sampling) -> list[int]:
    """``model.generate`` on one prompt alone: the tokens up to and including EOS."""
    g = model.generate(torch.tensor([ids]), max_tokens, state=state, eos_token_id=eos, **sampling)
    return g.tokens[0, : int(g.lengths[0])].tolist()
