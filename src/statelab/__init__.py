"""statelab: in-context learning with state-space language models.

Stateful Mamba-1 and Mamba-2 models with explicit state in and out, a library to capture, store, retrieve and mix
states (State Soup), Birdie training objectives and the GD-SSM layer. Public names are imported lazily so that
``import statelab`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "State": "statelab.state.core",
    "load_state": "statelab.state.io",
    "save_state": "statelab.state.io",
    "StateStore": "statelab.state.store",
    "mix": "statelab.state.mix",
    "MIX_METHODS": "statelab.state.mix",
    "to_hf_cache": "statelab.state.interop",
    "from_hf_cache": "statelab.state.interop",
    "load_model": "statelab.models.loading",
    "load_tokenizer": "statelab.models.tokenizer",
    "ByteTokenizer": "statelab.models.tokenizer",
    "Mamba1Config": "statelab.models.mamba1",
    "Mamba1LM": "statelab.models.mamba1",
    "Mamba2Config": "statelab.models.mamba2",
    "Mamba2LM": "statelab.models.mamba2",
    "StatefulLM": "statelab.models.base",
    "encode_texts": "statelab.models.batching",
    "available_backends": "statelab.backends",
    "assert_close": "statelab.testing",
    "GDSSM": "statelab.layers.gd_ssm",
    "GDSSMConfig": "statelab.layers.gd_ssm",
    "GDSSMState": "statelab.layers.gd_ssm",
    "RegressionConfig": "statelab.tasks.regression",
    "make_regression_batch": "statelab.tasks.regression",
    "TASKS": "statelab.tasks.words",
    "Task": "statelab.tasks.base",
    "EpisodeConfig": "statelab.tasks.base",
    "make_episode": "statelab.tasks.base",
    "build_prompt": "statelab.tasks.base",
    "TrainConfig": "statelab.train.config",
    "load_train_config": "statelab.train.config",
    "SoupConfig": "statelab.experiments.soup",
    "run_soup": "statelab.experiments.soup",
    "BirdieLM": "statelab.models.birdie_models",
    "BirdieModelConfig": "statelab.models.birdie_models",
    "BirdieController": "statelab.objectives.controller",
    "ObjectiveSampler": "statelab.objectives.sampler",
    "birdie_grid": "statelab.objectives.grid",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'statelab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
