"""In-context regression tasks: a pure function of ``(config, seed)``.

The linear task follows von Oswald et al. (arXiv 2212.07677) and the GD-SSM code (arXiv 2410.11687): each task
draws a weight matrix ``w ~ N(0, w_scale² I)`` and ``N + 1`` inputs ``x ~ U(-r/2, r/2)^d`` (the last one is the
query); targets are ``y = w x`` (vector, ``w: [d, d]``) or ``y = w·x`` (scalar, ``w: [1, d]``), optionally with
Gaussian label noise and with some context labels replaced by N(0, 1) distractors. The sine task (scalar ``x``)
draws ``y = a·sin(x + φ)`` with ``a ~ U(0.1, 0.5)`` and ``φ ~ U(0, π)``.

Letters: B tasks in a batch, N context examples, d input width, E target width (d for vector, 1 for scalar).

Worked example::

    >>> cfg = RegressionConfig(d=2, n_examples=3, target="scalar")
    >>> b = make_regression_batch(cfg, seed=0, batch_size=4)
    >>> b.x.shape, b.y.shape, interleave(b).shape
    (torch.Size([4, 4, 2]), torch.Size([4, 4, 1]), torch.Size([4, 7, 2]))

The interleaved sequence is ``x_1, y_1, ..., x_N, y_N, x_q`` with a scalar ``y`` placed in the last coordinate of
an otherwise zero token; there is no placeholder token for the query's label.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Literal

import torch

from statelab.errors import ConfigError

__all__ = [
    "RegressionConfig",
    "RegressionBatch",
    "make_regression_batch",
    "interleave",
    "concatenate",
    "product_tokens",
    "half_mse",
    "batch_seed",
]

_X_DISTS = ("uniform", "normal", "laplace", "exponential")


@dataclass(frozen=True)
class RegressionConfig:
    """One in-context regression task family.

    Attributes:
        d: input width (1 for ``function="sine"``).
        n_examples: context examples N per task (the query is one more input).
        target: ``"vector"`` (``y ∈ R^d``) or ``"scalar"`` (``y ∈ R``).
        function: ``"linear"`` or ``"sine"``.
        x_range: r; inputs are U(-r/2, r/2) (the GD-SSM code uses r = 1, not U(-1, 1) as its docstrings say).
        x_dist: ``"uniform"`` or, for out-of-distribution tests, ``"normal" | "laplace" | "exponential"``,
            each normalised per task by the Frobenius norm of its ``[N + 1, d]`` inputs and multiplied by r.
        w_scale: standard deviation of the task weights.
        noise_std: standard deviation of Gaussian label noise on the context labels.
        n_distractors: context labels (the first ones) replaced by N(0, 1) draws.
    """

    d: int = 10
    n_examples: int = 10
    target: Literal["vector", "scalar"] = "vector"
    function: Literal["linear", "sine"] = "linear"
    x_range: float = 1.0
    x_dist: Literal["uniform", "normal", "laplace", "exponential"] = "uniform"
    w_scale: float = 1.0
    noise_std: float = 0.0
    n_distractors: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = {"d": int, "n_examples": int, "n_distractors": int}.get(f.name)
            if want is int and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"RegressionConfig.{f.name} must be an int, got {value!r}")
            if f.name in ("x_range", "w_scale", "noise_std") and not isinstance(value, int | float):
                raise ConfigError(f"RegressionConfig.{f.name} must be a number, got {value!r}")
        if self.d < 1 or self.n_examples < 1:
            raise ConfigError(f"d and n_examples must be >= 1, got d={self.d}, n_examples={self.n_examples}")
        if self.target not in ("vector", "scalar"):
            raise ConfigError(f"target must be 'vector' or 'scalar', got {self.target!r}")
        if self.function not in ("linear", "sine"):
            raise ConfigError(f"function must be 'linear' or 'sine', got {self.function!r}")
        if self.x_dist not in _X_DISTS:
            raise ConfigError(f"x_dist must be one of {_X_DISTS}, got {self.x_dist!r}")
        if self.function == "sine" and (self.d != 1 or self.target != "scalar"):
            raise ConfigError(f"the sine task needs d=1 and target='scalar', got d={self.d}, {self.target!r}")
        if not 0 <= self.n_distractors <= self.n_examples:
            raise ConfigError(f"n_distractors must be in [0, {self.n_examples}], got {self.n_distractors}")
        if self.x_range <= 0 or self.w_scale < 0 or self.noise_std < 0:
            raise ConfigError("x_range must be > 0, w_scale and noise_std >= 0")

    @property
    def e(self) -> int:
        """Target width E: d for vector targets, 1 for scalar ones."""
        return self.d if self.target == "vector" else 1

    @property
    def x_variance(self) -> float:
        """Per-coordinate variance σ² of the uniform inputs, (r/2)²/3 (= 1/12 for r = 1)."""
        return (self.x_range / 2) ** 2 / 3


@dataclass(frozen=True)
class RegressionBatch:
    """A batch of tasks. The last row of ``x`` and ``y`` is the query.

    Attributes:
        x: ``[B, N + 1, d]`` inputs.
        y: ``[B, N + 1, E]`` targets (the query's is the label to predict, never shown to a model).
        w: ``[B, E, d]`` task weights (linear tasks) or ``[B, 2]`` (amplitude, phase) for sine tasks.
    """

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor

    @property
    def context_x(self) -> torch.Tensor:
        """``[B, N, d]``"""
        return self.x[:, :-1]

    @property
    def context_y(self) -> torch.Tensor:
        """``[B, N, E]``"""
        return self.y[:, :-1]

    @property
    def query_x(self) -> torch.Tensor:
        """``[B, d]``"""
        return self.x[:, -1]

    @property
    def query_y(self) -> torch.Tensor:
        """``[B, E]``"""
        return self.y[:, -1]


def batch_seed(run_seed: int, split: str, index: int) -> int:
    """A seed for batch ``index`` of ``split`` ("train", "val", "test", ...), disjoint across splits.

    Derived by hashing, so train and evaluation batches never share a generator stream.
    """
    digest = hashlib.sha256(f"{run_seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _inputs(cfg: RegressionConfig, gen: torch.Generator, batch_size: int) -> torch.Tensor:
    shape = (batch_size, cfg.n_examples + 1, cfg.d)
    r = cfg.x_range
    if cfg.x_dist == "uniform":
        return (torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5) * r
    if cfg.x_dist == "normal":
        raw = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif cfg.x_dist == "laplace":
        u = torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5
        raw = -torch.sign(u) * torch.log1p(-2 * u.abs())
    else:
        u = torch.rand(shape, generator=gen, dtype=torch.float64)
        raw = -torch.log1p(-u)
    norm = raw.flatten(1).norm(dim=1).clamp_min(1e-12)
    return raw / norm[:, None, None] * r


def make_regression_batch(
    config: RegressionConfig, seed: int, batch_size: int, dtype: torch.dtype = torch.float32
) -> RegressionBatch:
    """Draw ``batch_size`` tasks; the same ``(config, seed, batch_size)`` always gives the same batch.

    Sampling is done in float64 with a local generator and cast to ``dtype`` at the end.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    gen = torch.Generator().manual_seed(int(seed))
    x = _inputs(config, gen, batch_size)
    if config.function == "linear":
        w = torch.randn(batch_size, config.e, config.d, generator=gen, dtype=torch.float64) * config.w_scale
        y = torch.einsum("bed,bnd->bne", w, x)
    else:
        amp = torch.rand(batch_size, generator=gen, dtype=torch.float64) * 0.4 + 0.1
        phase = torch.rand(batch_size, generator=gen, dtype=torch.float64) * math.pi
        w = torch.stack([amp, phase], dim=1)
        y = amp[:, None, None] * torch.sin(x + phase[:, None, None])
    if config.noise_std > 0:
        noise = torch.randn(y.shape, generator=gen, dtype=torch.float64) * config.noise_std
        noise[:, -1] = 0.0
        y = y + noise
    if config.n_distractors > 0:
        k = config.n_distractors
        y = y.clone()
        y[:, :k] = torch.randn(batch_size, k, config.e, generator=gen, dtype=torch.float64)
    return RegressionBatch(x=x.to(dtype), y=y.to(dtype), w=w.to(dtype))


def _y_tokens(batch: RegressionBatch) -> torch.Tensor:
    """Context labels as d-wide tokens: vector y as is, scalar y in the last coordinate. ``[B, N, d]``"""
    B, n1, d = batch.x.shape
    e = batch.y.shape[-1]
    if e == d:
        return batch.context_y
    out = batch.x.new_zeros(B, n1 - 1, d)
    out[..., -1] = batch.context_y[..., 0]
    return out


def interleave(batch: RegressionBatch) -> torch.Tensor:
    """Tokens ``x_1, y_1, ..., x_N, y_N, x_q``: ``[B, 2N + 1, d]``."""
    B, n1, d = batch.x.shape
    n = n1 - 1
    tokens = batch.x.new_empty(B, 2 * n + 1, d)
    tokens[:, 0 : 2 * n : 2] = batch.context_x
    tokens[:, 1 : 2 * n : 2] = _y_tokens(batch)
    tokens[:, -1] = batch.query_x
    return tokens


def concatenate(batch: RegressionBatch) -> torch.Tensor:
    """Tokens ``(x_i, y_i)`` and the query ``(x_q, 0)``: ``[B, N + 1, d + E]``."""
    y = batch.y.clone()
    y[:, -1] = 0.0
    return torch.cat([batch.x, y], dim=-1)


def product_tokens(batch: RegressionBatch) -> torch.Tensor:
    """Constructed tokens ``u_i = [x_i·y_i; x_{i+1}]`` for scalar targets (GD-SSM ``constructed-token``).

    Returns ``[B, N, 2d]``.

    ``x_{N+1}`` is the query, so token i carries the example i and the input whose label comes next.
    """
    if batch.y.shape[-1] != 1:
        raise ConfigError(f"product tokens need scalar targets, got target width {batch.y.shape[-1]}")
    return torch.cat([batch.context_x * batch.context_y, batch.x[:, 1:]], dim=-1)


def half_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """½·squared error per output dimension, averaged over everything: ``½·mean((pred - target)²)``.

    For vector targets this is the GD-SSM code's loss divided by d, so scalar and vector tasks share one scale:
    the zero predictor scores ½·d·σ² = d/24 (0.4167 at d = 10) in both settings.
    """
    if pred.shape != target.shape:
        raise ConfigError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return 0.5 * (pred - target).pow(2).mean()
