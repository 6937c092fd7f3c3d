"""Run state trees round-trip bit for bit through safetensors plus JSON, without pickle."""

import json

import numpy as np
import pytest
import torch

from statelab.train.state_tree import load_tree, pack, save_tree, unpack


def test_a_tree_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(3)
    rng.random(5)
    tree = {
        "rng": rng.bit_generator.state,  # 128-bit integers
        "probs": np.array([0.1, 0.2, 0.7]) / 3.0,
        "counts": np.arange(4, dtype=np.int64),
        "mask": np.array([True, False]),
        "w": torch.randn(2, 3, dtype=torch.float64),
        "by_index": {0: {"step": torch.tensor(3.0)}, 11: []},
        "pair": (1, None, float("nan")),
        "__odd": 2,
        "x": np.float64(1 / 3),
    }
    skeleton = json.loads(json.dumps(save_tree(tmp_path / "s.safetensors", tree)))
    back = load_tree(tmp_path / "s.safetensors", skeleton)
    assert back["rng"] == tree["rng"] and np.array_equal(back["probs"], tree["probs"])
    assert back["probs"].dtype == np.float64 and back["counts"].dtype == np.int64 and back["mask"].dtype == bool
    assert torch.equal(back["w"], tree["w"]) and list(back["by_index"]) == [0, 11]
    assert torch.equal(back["by_index"][0]["step"], torch.tensor(3.0))
    assert back["pair"][:2] == (1, None) and np.isnan(back["pair"][2]) and back["__odd"] == 2
    assert back["x"] == 1 / 3
    again = np.random.default_rng(0)
    again.bit_generator.state = back["rng"]
    assert again.random() == rng.random()


def test_a_tree_refuses_objects_it_cannot_store():
    with pytest.raises(TypeError, match="cannot store a object"):
        pack({"a": object()})


def test_a_skeleton_naming_a_missing_tensor_is_a_checkpoint_error():
    from statelab.errors import CheckpointError

    tensors, skeleton = pack({"a": torch.ones(1)})
    with pytest.raises(CheckpointError, match="does not hold"):
        unpack({}, skeleton)
