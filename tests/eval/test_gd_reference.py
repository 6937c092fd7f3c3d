import pytest
import torch

from statelab.errors import ConfigError
from statelab.eval.gd_reference import (
    bayes_predict,
    gd_predict,
    gd_prefix_predict,
    gd_weights,
    least_squares_predict,
    one_step_loss,
    one_step_optimum,
    optimal_gd_lr,
    prefix_loss,
    ridge_predict,
    zero_predictor_loss,
)
from statelab.tasks.regression import RegressionConfig, make_regression_batch


def test_analytic_one_step_optimum_of_the_default_task():
    opt = one_step_optimum(d=10, n=10, x_range=1.0)
    assert abs(opt.eta - 6.06) < 0.005
    assert abs(opt.loss - 0.2062) < 5e-5
    assert abs(zero_predictor_loss(10) - 0.4167) < 5e-5
    assert one_step_loss(opt.eta, 10, 10) == pytest.approx(opt.loss)
    assert one_step_loss(opt.eta * 1.1, 10, 10) > opt.loss


def test_monte_carlo_optimum_agrees_with_the_closed_form_and_multi_step_values():
    cfg = RegressionConfig()
    one = optimal_gd_lr(cfg, 1, n_tasks=20000, seed=1)
    assert abs(one.eta - 6.06) < 0.1 and abs(one.loss - 0.2062) < 0.002
    two = optimal_gd_lr(cfg, 2, n_tasks=20000, seed=1)
    assert abs(two.eta - 5.98) < 0.15 and abs(two.loss - 0.157) < 0.003


def test_empirical_loss_of_gd_matches_expected():
    cfg = RegressionConfig(target="scalar")
    b = make_regression_batch(cfg, 11, 20000, dtype=torch.float64)
    pred = gd_predict(b.context_x, b.context_y, b.query_x, 6.06)
    assert abs(0.5 * (pred - b.query_y).pow(2).mean().item() - 0.2062) < 0.006


def test_gd_weights_follow_the_recursion_and_prefix_form():
    b = make_regression_batch(RegressionConfig(d=4, n_examples=6), 0, 3, dtype=torch.float64)
    x, y, eta = b.context_x, b.context_y, 2.0
    w1 = gd_weights(x, y, eta, 1)
    torch.testing.assert_close(w1, eta / 6 * torch.einsum("bne,bnd->bed", y, x))
    cov = torch.einsum("bnd,bne->bde", x, x) / 6
    ycx = torch.einsum("bne,bnd->bed", y, x) / 6
    w2 = w1 @ (torch.eye(4, dtype=torch.float64) - eta * cov) + eta * ycx
    torch.testing.assert_close(gd_weights(x, y, eta, 2), w2)
    prefix = gd_prefix_predict(b.x, y, eta / 6, steps=2)
    torch.testing.assert_close(prefix[:, 2], gd_predict(x[:, :3], y[:, :3], b.x[:, 3], eta / 6 * 3, 2))


def test_prefix_loss_at_full_context_is_the_one_step_loss():
    assert prefix_loss(0.6, 10, 10) == pytest.approx(one_step_loss(6.0, 10, 10))
    assert prefix_loss(0.6, 1, 10) == pytest.approx(0.386, abs=1e-3)


def test_least_squares_ridge_and_bayes():
    cfg = RegressionConfig(d=4, n_examples=8, target="scalar")
    b = make_regression_batch(cfg, 0, 5, dtype=torch.float64)
    exact = torch.einsum("bed,bd->be", b.w, b.query_x)
    torch.testing.assert_close(least_squares_predict(b.context_x, b.context_y, b.query_x), exact)
    torch.testing.assert_close(bayes_predict(cfg, b.context_x, b.context_y, b.query_x), exact)
    torch.testing.assert_close(ridge_predict(b.context_x, b.context_y, b.query_x, 1e-10), exact)
    far = ridge_predict(b.context_x, b.context_y, b.query_x, 1e6)
    assert far.abs().max() < 1e-4
    with pytest.raises(ConfigError):
        ridge_predict(b.context_x, b.context_y, b.query_x, 0.0)
    with pytest.raises(ConfigError):
        bayes_predict(RegressionConfig(n_distractors=1), b.context_x, b.context_y, b.query_x)
