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
