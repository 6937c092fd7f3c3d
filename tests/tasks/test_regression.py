import pytest
import torch

from statelab.errors import ConfigError
from statelab.tasks.regression import (
    RegressionConfig,
    batch_seed,
    concatenate,
    half_mse,
    interleave,
    make_regression_batch,
    product_tokens,
)


def test_same_config_and_seed_give_the_same_batch_and_other_seeds_differ():
    cfg = RegressionConfig()
    a = make_regression_batch(cfg, 3, 8)
    b = make_regression_batch(cfg, 3, 8)
    c = make_regression_batch(cfg, 4, 8)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


def test_generator_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    make_regression_batch(RegressionConfig(), 1, 4)
    assert torch.equal(torch.rand(1), before)


def test_linear_targets_and_input_range():
    cfg = RegressionConfig(d=5, n_examples=7)
    b = make_regression_batch(cfg, 0, 64, dtype=torch.float64)
    assert b.x.shape == (64, 8, 5) and b.y.shape == (64, 8, 5) and b.w.shape == (64, 5, 5)
    assert b.x.abs().max() <= 0.5
    torch.testing.assert_close(b.y, torch.einsum("bed,bnd->bne", b.w, b.x))


def test_statistics_match_the_spec_zero_predictor():
    b = make_regression_batch(RegressionConfig(target="scalar"), 0, 20000, dtype=torch.float64)
    assert abs(b.x.var().item() - 1 / 12) < 2e-3
    zero_loss = half_mse(torch.zeros_like(b.query_y), b.query_y).item()
    assert abs(zero_loss - 10 / 24) < 0.02


def test_token_formats():
    cfg = RegressionConfig(d=3, n_examples=4, target="scalar")
    b = make_regression_batch(cfg, 0, 2)
    t = interleave(b)
    assert t.shape == (2, 9, 3)
    assert torch.equal(t[:, 0], b.x[:, 0]) and torch.equal(t[:, -1], b.query_x)
    assert torch.equal(t[:, 1, -1], b.y[:, 0, 0]) and torch.all(t[:, 1, :-1] == 0)
    c = concatenate(b)
    assert c.shape == (2, 5, 4) and torch.all(c[:, -1, -1] == 0) and torch.equal(c[:, 0, -1], b.y[:, 0, 0])
    u = product_tokens(b)
    assert u.shape == (2, 4, 6)
    assert torch.equal(u[:, 1, :3], b.x[:, 1] * b.y[:, 1]) and torch.equal(u[:, -1, 3:], b.query_x)
    with pytest.raises(ConfigError, match="scalar"):
        product_tokens(make_regression_batch(RegressionConfig(d=3), 0, 2))


def test_noise_distractors_sine_and_ood():
    b = make_regression_batch(RegressionConfig(d=2, n_examples=6, n_distractors=2), 0, 4, dtype=torch.float64)
    clean = torch.einsum("bed,bnd->bne", b.w, b.x)
    assert not torch.allclose(b.y[:, :2], clean[:, :2])
    torch.testing.assert_close(b.y[:, 2:], clean[:, 2:])
    n = make_regression_batch(RegressionConfig(d=2, noise_std=0.1), 0, 4, dtype=torch.float64)
    torch.testing.assert_close(n.y[:, -1], torch.einsum("bed,bd->be", n.w, n.query_x))
    s = make_regression_batch(RegressionConfig(d=1, target="scalar", function="sine"), 0, 4, dtype=torch.float64)
    amp, phase = s.w[:, 0], s.w[:, 1]
    torch.testing.assert_close(s.y[..., 0], amp[:, None] * torch.sin(s.x[..., 0] + phase[:, None]))
    o = make_regression_batch(RegressionConfig(x_dist="laplace", x_range=2.0), 0, 4, dtype=torch.float64)
    torch.testing.assert_close(o.x.flatten(1).norm(dim=1), torch.full((4,), 2.0, dtype=torch.float64))


def test_bad_configs_are_errors():
    with pytest.raises(ConfigError, match="sine"):
        RegressionConfig(function="sine")
    with pytest.raises(ConfigError, match="n_examples"):
        RegressionConfig(n_examples=0)
    with pytest.raises(ConfigError, match="x_dist"):
        RegressionConfig(x_dist="cauchy")
    with pytest.raises(ConfigError, match="int"):
        RegressionConfig(d=2.5)


def test_batch_seeds_are_disjoint_across_splits():
    train = {batch_seed(1, "train", i) for i in range(1000)}
    val = {batch_seed(1, "val", i) for i in range(1000)}
    assert len(train) == 1000 and not train & val
