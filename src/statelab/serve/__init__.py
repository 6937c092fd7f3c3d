"""``statelab serve``: an OpenAI-compatible HTTP server for statelab models, with skills, ragged batching and a
prefix-state cache.

* :mod:`statelab.serve.engine`: the batched decoding scheduler (one thread owns the model).
* :mod:`statelab.serve.cache`: the prefix-state cache (states at block boundaries, LRU by bytes).
* :mod:`statelab.serve.protocol`: request checking and OpenAI-format responses.
* :mod:`statelab.serve.app`: the FastAPI app and a background uvicorn runner.
* :mod:`statelab.serve.metrics`: ``/metrics`` in Prometheus text or JSON.
* :mod:`statelab.cli.serve`: the ``statelab serve`` command.

Names are imported lazily: the web stack (the ``serve`` extra) loads only when an app is built.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Engine": "statelab.serve.engine",
    "GenerationRequest": "statelab.serve.engine",
    "SamplingParams": "statelab.serve.engine",
    "Delta": "statelab.serve.engine",
    "Failure": "statelab.serve.engine",
    "PrefixCache": "statelab.serve.cache",
    "ServeConfig": "statelab.serve.app",
    "create_app": "statelab.serve.app",
    "BackgroundServer": "statelab.serve.app",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'statelab.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
