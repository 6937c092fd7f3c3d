"""Training: typed configs, deterministic data streams, the loop (DDP-ready) and atomic, bit-exact checkpoints."""

from statelab.train.config import TrainConfig, load_train_config
from statelab.train.loop import TrainResult, lr_at, param_groups, train

__all__ = ["TrainConfig", "TrainResult", "load_train_config", "lr_at", "param_groups", "train"]
