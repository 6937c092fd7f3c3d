"""Mamba-1 mixer: continuation (whole == prefix + suffix == token by token), positions, backends agree."""

import pytest
import torch

from statelab.layers.mamba1 import Mamba1Mixer
from statelab.testing import assert_close


@pytest.fixture(scope="module")
def mixer():
    torch.manual_seed(0)
    m = Mamba1Mixer(d_model=10, d_inner=20, d_state=4, d_conv=4, dt_rank=3, bias=True)
    with torch.no_grad():
        m.dt_proj.bias.add_(1.0)  # larger Δ so the state carries information across the split
    return m


def _x(T, seed=1):
    return torch.randn(2, T, 10, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [1, 2, 3, 8])
def test_continuation(mixer, t):
    x = _x(11)
    with torch.no_grad():
        whole_y, whole_state = mixer(x)
        a_y, a_state = mixer(x[:, :t])
        b_y, b_state = mixer(x[:, t:], a_state)
        assert_close("y", whole_y, torch.cat([a_y, b_y], 1))
        for name in ("conv", "ssm", "sum_delta"):
            assert_close(name, getattr(whole_state, name), getattr(b_state, name))


def test_token_by_token(mixer):
    x = _x(11)
    with torch.no_grad():
        whole_y, whole_state = mixer(x)
        s, ys = None, []
        for i in range(11):
            o_y, s = mixer(x[:, i : i + 1], s)
            ys.append(o_y)
    assert_close("y_steps", whole_y, torch.cat(ys, 1))
    assert_close("ssm_steps", whole_state.ssm, s.ssm)
    assert_close("conv_steps", whole_state.conv, s.conv)


def test_positions_equal_prefix_states(mixer):
    x = _x(9, seed=2)
    with torch.no_grad():
        _, out_state = mixer(x, positions=[0, 2, 5, 9])
        for j, p in enumerate([0, 2, 5, 9]):
            ref = mixer(x[:, :p])[1] if p else mixer.zero_state(2, torch.float32, None)
            for name in ("conv", "ssm", "sum_delta"):
                assert_close(f"{name}@{p}", getattr(ref, name), getattr(out_state.at, name)[:, j])


def test_naive_backend_matches_with_gradients(mixer):
    x = _x(40, seed=3).requires_grad_(True)
    out = {}
    for backend in ("naive", "chunk"):
        mixer.backend = backend
        o_y, o_state = mixer(x)
        loss = o_y.square().sum() + o_state.ssm.sum()
        grads = torch.autograd.grad(loss, [x, mixer.A_log, mixer.dt_proj.weight, mixer.conv_weight])
        out[backend] = (o_y, grads)
    mixer.backend = "chunk"
    assert_close("y", out["naive"][0], out["chunk"][0], rtol=1e-4, atol=1e-5)
    for name, a, b in zip(["dx", "dA_log", "ddt", "dconv"], out["naive"][1], out["chunk"][1], strict=True):
        assert_close(name, a, b, rtol=1e-4, atol=1e-5)


def test_state_not_mutated(mixer):
    x = _x(5)
    with torch.no_grad():
        s = mixer(x)[1]
        keep = [t.clone() for t in (s.conv, s.ssm, s.sum_delta)]
        mixer(x, s)
    assert all(torch.equal(a, b) for a, b in zip(keep, (s.conv, s.ssm, s.sum_delta), strict=True))
