"""Serving tests run the model on one torch thread: decode steps are tiny, and on a shared 2-core machine a
second intra-op thread waits for a core at every operation (measured: 8x slower decode under load)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
