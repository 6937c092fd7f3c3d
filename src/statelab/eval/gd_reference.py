"""Reference learners for in-context linear regression: k-step gradient descent, ridge / least squares, Bayes.

Everything here is closed-form linear algebra in float64, the ground truth the GD-SSM layer
(:mod:`statelab.layers.gd_ssm`) and trained sequence models are measured against.

Setting (von Oswald et al., arXiv 2212.07677; GD-SSM, arXiv 2410.11687): context ``(x_i, y_i)``, i = 1..N, linear
model ``ŷ = W x``, loss ``L(W) = (1/2N) Σ ‖W x_i − y_i‖²``. From ``W_0 = 0``, one GD step with learning rate η gives
``W_1 = (η/N) Σ y_i x_iᵀ``; in general ``W_{t+1} = W_t (I − η Σ̂) + η Ĉ`` with ``Σ̂ = XᵀX/N``, ``Ĉ = YᵀX/N``.

For ``x ~ U(−r/2, r/2)^d`` (σ² = r²/12), ``w ~ N(0, s² I)``, no noise, the expected ½·MSE per output dimension of
k-step GD is ``L_k(η) = ½ s² σ² E tr (I − η Σ̂)^{2k}``; for k = 1 it is
``½ s² σ² d [1 − 2ησ² + η²σ⁴ (d + N − 0.2)/N]`` (the 0.2 is from E x⁴ = 9σ⁴/5), minimised at
``η* = N / (σ² (d + N − 0.2))``: η* = 6.06, L* = 0.2062 for d = N = 10, r = 1 (zero predictor: 0.4167).

Letters: B tasks, N context examples, d input width, E target width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from statelab.errors import ConfigError
from statelab.tasks.regression import RegressionConfig, make_regression_batch

__all__ = [
    "GDOptimum",
    "gd_weights",
    "gd_predict",
    "gd_prefix_predict",
    "one_step_loss",
    "one_step_optimum",
    "prefix_loss",
    "gd_expected_loss",
    "optimal_gd_lr",
    "ridge_predict",
    "least_squares_predict",
    "bayes_predict",
    "zero_predictor_loss",
]


@dataclass(frozen=True)
class GDOptimum:
    """The best learning rate of k-step GD and its expected loss (½·MSE per output dimension)."""

    steps: int
    eta: float
    loss: float


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2]:
        raise ConfigError(
            f"expected x [B, N, d] and y [B, N, E] with equal B, N; got {tuple(x.shape)}, {tuple(y.shape)}"
        )


def gd_weights(
    x: torch.Tensor, y: torch.Tensor, eta: float, steps: int, w0: torch.Tensor | None = None
) -> torch.Tensor:
    """Weights after ``steps`` full-batch GD steps on ``(1/2N) Σ ‖W x_i − y_i‖²`` from ``w0`` (default 0).

    Args:
        x: ``[B, N, d]`` context inputs. y: ``[B, N, E]`` context targets.
    Returns:
        ``[B, E, d]`` in float64.
    """
    _check_xy(x, y)
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    x64, y64 = x.double(), y.double()
    n = x.shape[1]
    w = x64.new_zeros(x.shape[0], y.shape[2], x.shape[2]) if w0 is None else w0.double()
    for _ in range(steps):
        resid = y64 - torch.einsum("bed,bnd->bne", w, x64)
        w = w + (eta / n) * torch.einsum("bne,bnd->bed", resid, x64)
    return w


def gd_predict(x: torch.Tensor, y: torch.Tensor, x_q: torch.Tensor, eta: float, steps: int = 1) -> torch.Tensor:
    """Prediction ``W_k x_q`` of k-step GD: ``[B, E]`` (float64). ``x_q: [B, d]``."""
    return torch.einsum("bed,bd->be", gd_weights(x, y, eta, steps), x_q.double())


def gd_prefix_predict(x: torch.Tensor, y: torch.Tensor, c: float, steps: int = 1) -> torch.Tensor:
    """For every prefix i = 1..N, k-step GD with a fixed step ``c`` per example, applied to ``x_{i+1}``.

    On the prefix of i examples the step is ``W ← W + c Σ_{j≤i} (y_j − W x_j) x_jᵀ`` (a sum, not a mean: the
    learning rate is ``c·i``). This is what the constructed GD-SSM computes at window i; with ``c = η/N`` the last
    window is exactly k-step GD with learning rate η.

    Args:
        x: ``[B, N + 1, d]`` inputs including the query as the last row. y: ``[B, N, E]`` context targets.
    Returns:
        ``[B, N, E]``: row ``i - 1`` predicts ``y_{i+1}`` (the last row predicts the query).
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[1] != y.shape[1] + 1:
        raise ConfigError(f"expected x [B, N+1, d] and y [B, N, E]; got {tuple(x.shape)}, {tuple(y.shape)}")
    n = y.shape[1]
    out = []
    for i in range(1, n + 1):
        w = gd_weights(x[:, :i], y[:, :i], c * i, steps)
        out.append(torch.einsum("bed,bd->be", w, x[:, i].double()))
    return torch.stack(out, dim=1)


def zero_predictor_loss(d: int, x_range: float = 1.0, w_scale: float = 1.0) -> float:
    """Expected ½·MSE of predicting 0: ``½ s² σ² d`` (0.4167 for d = 10, r = 1)."""
    return 0.5 * w_scale**2 * (x_range / 2) ** 2 / 3 * d


def one_step_loss(eta: float, d: int, n: int, x_range: float = 1.0, w_scale: float = 1.0) -> float:
    """Expected ½·MSE of one GD step with learning rate η (uniform inputs, Gaussian weights, no noise)."""
    s2 = (x_range / 2) ** 2 / 3
    return 0.5 * w_scale**2 * s2 * d * (1 - 2 * eta * s2 + eta**2 * s2**2 * (d + n - 0.2) / n)


def one_step_optimum(d: int, n: int, x_range: float = 1.0, w_scale: float = 1.0) -> GDOptimum:
    """Closed-form optimum of one GD step: ``η* = N/(σ²(d + N − 0.2))``, ``L* = ½s²σ²d(1 − N/(d + N − 0.2))``."""
    s2 = (x_range / 2) ** 2 / 3
    eta = n / (s2 * (d + n - 0.2))
    loss = 0.5 * w_scale**2 * s2 * d * (1 - n / (d + n - 0.2))
    return GDOptimum(steps=1, eta=eta, loss=loss)


def prefix_loss(c: float, i: int, d: int, x_range: float = 1.0, w_scale: float = 1.0) -> float:
    """Expected ½·MSE predicting ``x_{i+1}``'s label with ``c Σ_{j≤i} y_j x_jᵀ`` (one step of coefficient c).

    ``L_i(c) = ½s²σ²d[1 − 2ciσ² + c²iσ⁴(d + i − 0.2)]``; the best coefficient is ``1/(σ²(d + i − 0.2))``.
    """
    s2 = (x_range / 2) ** 2 / 3
    return 0.5 * w_scale**2 * s2 * d * (1 - 2 * c * i * s2 + c**2 * i * s2**2 * (d + i - 0.2))


def _sample_covariance_eigs(config: RegressionConfig, n_tasks: int, seed: int) -> torch.Tensor:
    """Eigenvalues of ``Σ̂ = XᵀX/N`` for ``n_tasks`` draws of the context inputs: ``[n_tasks, d]`` float64."""
    batch = make_regression_batch(config, seed, n_tasks, dtype=torch.float64)
    x = batch.context_x
    cov = torch.einsum("bnd,bne->bde", x, x) / config.n_examples
    return torch.linalg.eigvalsh(cov)


def gd_expected_loss(eta: float, steps: int, eigs: torch.Tensor, x_variance: float, w_scale: float = 1.0) -> float:
    """Expected ½·MSE of k-step GD, ``½ s² σ² E tr(I − ηΣ̂)^{2k}``, averaged over sampled eigenvalues ``[T, d]``.

    Exact in expectation over the weights and the query (independent, zero-mean, covariance σ²I); the only Monte
    Carlo error is over the context inputs.
    """
    return float(0.5 * w_scale**2 * x_variance * ((1 - eta * eigs) ** (2 * steps)).sum(-1).mean())


def optimal_gd_lr(config: RegressionConfig, steps: int, n_tasks: int = 100_000, seed: int = 0) -> GDOptimum:
    """Learning rate minimising the expected loss of ``steps``-step GD on ``config``'s linear task.

    The loss is convex in η; its derivative is bisected on sampled covariance eigenvalues. Needs uniform inputs
    (the query must be independent of the context); use an empirical scan on a batch otherwise.
    """
    if config.function != "linear" or config.x_dist != "uniform" or config.noise_std > 0 or config.n_distractors:
        raise ConfigError("optimal_gd_lr needs the noiseless linear task with uniform inputs and no distractors")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    eigs = _sample_covariance_eigs(config, n_tasks, seed)

    def slope(eta: float) -> float:
        return float((-2 * steps * eigs * (1 - eta * eigs) ** (2 * steps - 1)).sum(-1).mean())

    lo, hi = 0.0, 1.0 / float(eigs.mean())
    while slope(hi) < 0:
        lo, hi = hi, 2 * hi
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if slope(mid) < 0:
            lo = mid
        else:
            hi = mid
    eta = 0.5 * (lo + hi)
    return GDOptimum(steps=steps, eta=eta, loss=gd_expected_loss(eta, steps, eigs, config.x_variance, config.w_scale))


def ridge_predict(x: torch.Tensor, y: torch.Tensor, x_q: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge regression ``W = YᵀX (XᵀX + λI)⁻¹`` applied to ``x_q``: ``[B, E]`` float64. Needs ``λ > 0``."""
    _check_xy(x, y)
    if lam <= 0:
        raise ConfigError(f"ridge needs lam > 0 (use least_squares_predict for lam = 0), got {lam}")
    x64, y64 = x.double(), y.double()
    gram = torch.einsum("bnd,bne->bde", x64, x64) + lam * torch.eye(x.shape[2], dtype=torch.float64)
    rhs = torch.einsum("bnd,bne->bde", x64, y64)
    w_t = torch.linalg.solve(gram, rhs)
    return torch.einsum("bd,bde->be", x_q.double(), w_t)


def least_squares_predict(x: torch.Tensor, y: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least squares (the λ → 0 limit of ridge) applied to ``x_q``: ``[B, E]`` float64."""
    _check_xy(x, y)
    w_t = torch.linalg.pinv(x.double()) @ y.double()
    return torch.einsum("bd,bde->be", x_q.double(), w_t)


def bayes_predict(config: RegressionConfig, x: torch.Tensor, y: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """Posterior-mean prediction under the task prior ``w ~ N(0, s²I)``, Gaussian noise: ridge with ``λ = σ_n²/s²``.

    Without noise it is the minimum-norm interpolant (``λ → 0``). Bayes-optimal for the ½·MSE loss. Defined for
    the linear task without distractors (with distractors the posterior is a mixture, not ridge).
    """
    if config.function != "linear" or config.n_distractors:
        raise ConfigError("bayes_predict is defined for the linear task without distractors")
    if config.noise_std == 0:
        return least_squares_predict(x, y, x_q)
    return ridge_predict(x, y, x_q, config.noise_std**2 / max(config.w_scale, 1e-12) ** 2)
