"""Birdie pretraining objectives (arXiv 2411.01030): typed configs, pure objective functions, packing, the
control grids, one mixture sampler and the reward-driven controller."""

from statelab.objectives.base import (
    CONFIG_CLASSES,
    VOCAB,
    AutoencodingConfig,
    CopyingObjectiveConfig,
    DeshufflingConfig,
    Example,
    InfillingConfig,
    NextTokenConfig,
    ObjectiveConfig,
    PrefixLMConfig,
    SelectiveCopyingObjectiveConfig,
    Vocab,
    config_from_dict,
)
from statelab.objectives.corruption import OBJECTIVES, apply_objective
from statelab.objectives.grid import birdie_grid, class_uniform_probs, decoder_ul2_probs, ul2_configs
from statelab.objectives.packing import IGNORE, PackedBatch, Packer, pack_example, pack_rows
from statelab.objectives.sampler import ObjectiveSampler, per_config_loss, validation_batch

__all__ = [
    "CONFIG_CLASSES",
    "VOCAB",
    "AutoencodingConfig",
    "CopyingObjectiveConfig",
    "DeshufflingConfig",
    "Example",
    "InfillingConfig",
    "NextTokenConfig",
    "ObjectiveConfig",
    "PrefixLMConfig",
    "SelectiveCopyingObjectiveConfig",
    "Vocab",
    "config_from_dict",
    "OBJECTIVES",
    "apply_objective",
    "birdie_grid",
    "class_uniform_probs",
    "decoder_ul2_probs",
    "ul2_configs",
    "IGNORE",
    "PackedBatch",
    "Packer",
    "pack_example",
    "pack_rows",
    "ObjectiveSampler",
    "per_config_loss",
    "validation_batch",
]
