"""load_model: format detection, registry and the errors a bad checkpoint gives."""

import json

import pytest
import torch

from statelab.errors import CheckpointError
from statelab.models.loading import ARCHITECTURES, embedded_dir, load_model, model_class, read_weights


def test_registry_knows_both_architectures():
    assert {"mamba1", "mamba2"} <= set(ARCHITECTURES)
    assert "MambaForCausalLM" in ARCHITECTURES["mamba1"].hf_architectures
    with pytest.raises(CheckpointError, match="unknown architecture 'rwkv7'"):
        model_class("rwkv7")


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_model(tmp_path)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        read_weights(tmp_path)


def test_not_a_directory_nor_hub_id(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(f)
    with pytest.raises(CheckpointError, match="neither an existing directory"):
        load_model(str(tmp_path / "no" / "such" / "dir"))


def test_sharded_index_with_missing_shard(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors"):
        read_weights(tmp_path)


def test_embedded_is_clear_when_absent():
    if (embedded_dir() / "config.json").is_file():
        assert load_model("embedded").arch in ARCHITECTURES
    else:
        with pytest.raises(CheckpointError, match="no embedded model"):
            load_model("embedded")
