"""The thread rule (statelab.threads) and the promise behind it: no op changes torch's thread count, and a model's
results do not depend on it (to fp32 round-off)."""

import os

import pytest
import torch

from statelab import threads
from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.models.mamba2 import Mamba2Config, Mamba2LM
from statelab.testing import assert_close


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _tiny1() -> Mamba1LM:
    torch.manual_seed(0)
    return Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=30, d_state=4))


def _tiny2() -> Mamba2LM:
    torch.manual_seed(0)
    return Mamba2LM(Mamba2Config(vocab_size=30, d_model=16, n_layer=2, d_state=8, head_dim=8, chunk_size=16))


def test_model_work_counts_matrix_parameters_per_layer():
    m = _tiny1()
    per_layer = sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear)) // 2
    assert threads.model_work(m, 10) == 10 * per_layer


def test_small_work_gets_one_thread_large_work_the_free_cores(monkeypatch):
    m = _tiny1()
    assert threads.choose_threads(m, 8) == 1
    big = threads.MIN_PARALLEL_WORK // threads.model_work(m, 1) + 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads.choose_threads(m, big) == cores
    # every core busy with other jobs: one thread, whatever the work
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))
    assert threads.available_cores() == 1
    assert threads.choose_threads(m, big) == 1


def test_apply_thread_rule_explicit_env_and_rule(monkeypatch, keep_threads):
    m = _tiny1()
    monkeypatch.delenv("STATELAB_THREADS", raising=False)
    assert threads.apply_thread_rule(m, 8, threads=3) == 3 and torch.get_num_threads() == 3
    monkeypatch.setenv("STATELAB_THREADS", "2")
    assert threads.apply_thread_rule(m, 8) == 2 and torch.get_num_threads() == 2
    assert threads.apply_thread_rule(m, 8, threads=1) == 1  # an explicit count beats the environment
    monkeypatch.delenv("STATELAB_THREADS")
    torch.set_num_threads(2)
    assert threads.apply_thread_rule(m, 8) == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("STATELAB_THREADS", "two")
    with pytest.raises(ValueError, match="STATELAB_THREADS must be a positive integer"):
        threads.apply_thread_rule(m, 8)
    assert torch.get_num_threads() == 1  # a bad value changes nothing


@pytest.mark.parametrize("make", [_tiny1, _tiny2], ids=["mamba1", "mamba2"])
def test_no_op_changes_the_thread_count_and_results_do_not_depend_on_it(make, keep_threads):
    m = make()
    ids = torch.randint(0, 30, (2, 40), generator=torch.Generator().manual_seed(1))

    def run():
        m.zero_grad()
        logits, state = m(ids)
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in m.parameters() if p.grad is not None]
        at = m.encode(ids, positions=[5, 40])
        gen = m.generate(ids[:, :7], 4, lengths=[7, 3])
        return logits.detach(), state, grads, at, gen

    torch.set_num_threads(1)
    one = run()
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    two = run()
    assert torch.get_num_threads() == 2, "an op changed torch's thread count"
    assert_close("logits", one[0], two[0])
    assert_close("state", one[1].ssm, two[1].ssm)
    for g1, g2 in zip(one[2], two[2], strict=True):
        assert_close("grad", g1, g2)
    for s1, s2 in zip(one[3], two[3], strict=True):
        assert_close("state at", s1.ssm, s2.ssm)
    assert torch.equal(one[4].tokens, two[4].tokens)
