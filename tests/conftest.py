"""Test-suite defaults: CPU, one torch thread, deterministic algorithms where torch offers them.

One thread: the suite's models are tiny, so a second thread saves little, and on cores shared with another
process every parallel op waits for a stalled worker (small-model tests ran 10-30x slower with two threads while
the machine was busy).
"""

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random transformers Mamba-1 checkpoint with statelab's byte tokenizer, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    from statelab.models.tokenizer import ByteTokenizer

    d = tmp_path_factory.mktemp("hf_tiny")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = transformers.MambaConfig(
            vocab_size=259, hidden_size=16, state_size=4, num_hidden_layers=3, expand=2, conv_kernel=4
        )
        transformers.MambaForCausalLM(cfg).save_pretrained(d)
    ByteTokenizer().save(d)
    return d
