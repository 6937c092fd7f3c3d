"""Training: typed configs, deterministic data streams, the loop (DDP-ready, with a model registry, loss hooks,
batch sources and callbacks) and atomic, bit-exact checkpoints."""

from statelab.train.config import TrainConfig, config_digest, load_train_config
from statelab.train.loop import (
    BatchSource,
    Callback,
    LossHook,
    StepInfo,
    TrainResult,
    lr_at,
    make_optimizer,
    param_groups,
    register_model,
    train,
)

__all__ = [
    "BatchSource",
    "Callback",
    "LossHook",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "config_digest",
    "load_train_config",
    "lr_at",
    "make_optimizer",
    "param_groups",
    "register_model",
    "train",
]
