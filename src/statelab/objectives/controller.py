"""The Birdie controller (arXiv 2411.01030, §3.2 and A.1): a reward-driven mixture over objective configs.

At each evaluation the controller receives the per-config validation loss, turns the change since the last
evaluation into a reward per config, refits a small causal reward model over the history of
``(loss, action) -> reward`` rows, scores random candidate mixtures with it and plays the mean of the best ones.

* Reward (code's sign: lower loss is positive)::

      ratio = (new - old) / old,  S = sqrt(old · new),  r = clip(-100 e · tanh(e · S · ratio³), -1, 1)

  with NaN -> 0; the total reward is the sum over classes of the mean reward within each class. Worked values:
  4.5 -> 4.2 gives +0.952, 2.0 -> 2.1 gives -0.189, 3.0 -> 2.0 gives +1.0.
* Reward model: a gated SSM over evaluation steps (:class:`RewardModel`), with the statelab state API: the history
  is run once and every candidate is scored as one more step from the history state.
* Schedule: evaluations at steps 10, 50, 250, 500, 1000, 1500, 2000 and then every 1000 of 32,000, scaled to the
  run; uniform (over classes) until 250/32,000 of training; an explicit, logged ε-exploration mixture after that.

Every evaluation writes one JSON line (losses, rewards, action, ε, whether it explored, the reward model's fit
loss and the spread of candidate scores) so the run can be audited and plotted (:func:`plot_action_log`).

All alternatives share the :class:`MixturePolicy` interface: :class:`FixedPolicy` (UL2-style ratios, uniform over
classes or over configs, next-token only), :class:`BirdieController`, and two ablations that use the same
validation losses without a reward model: :class:`LossProportionalPolicy` and
:class:`ExpWeightsPolicy`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from statelab.errors import ConfigError
from statelab.layers.norm import RMSNorm
from statelab.objectives.base import ObjectiveConfig
from statelab.objectives.grid import class_uniform_probs
from statelab.ops.linear_scan import linear_scan

__all__ = [
    "reward",
    "total_reward",
    "eval_schedule",
    "RewardModel",
    "ControllerConfig",
    "MixturePolicy",
    "FixedPolicy",
    "BirdieController",
    "LossProportionalPolicy",
    "ExpWeightsPolicy",
    "plot_action_log",
]

PAPER_STEPS = 32_000
PAPER_WARMUP = 250


def reward(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Per-config reward from the old and new validation losses (any matching shapes); NaN -> 0."""
    old = np.asarray(old, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ratio = (new - old) / old
        s = np.sqrt(old * new)
        r = np.clip(-100.0 * math.e * np.tanh(math.e * s * ratio**3), -1.0, 1.0)
    return np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)


def total_reward(r: np.ndarray, class_names: Sequence[str]) -> float:
    """Sum over classes of the mean reward within each class."""
    r = np.asarray(r, dtype=np.float64)
    names = np.asarray(class_names)
    return float(sum(r[names == c].mean() for c in dict.fromkeys(class_names)))


def eval_schedule(total_steps: int) -> list[int]:
    """The paper's evaluation steps (10, 50, 250, 500, 1000, 1500, 2000, then every 1000 of 32,000) scaled to
    ``total_steps``, rounded, at least 1 and distinct."""
    paper = [10, 50, 250, 500, 1000, 1500, 2000, *range(3000, PAPER_STEPS + 1, 1000)]
    s = total_steps / PAPER_STEPS
    return sorted({max(1, round(p * s)) for p in paper if round(p * s) <= total_steps})


class _GatedBlock(nn.Module):
    """``K = σ(W_K x)``, ``u = W_u x ⊙ σ(W_g x) ⊙ (1 - K)``, ``h_t = K_t ⊙ h_{t-1} + u_t``, gated output, residual."""

    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.norm = RMSNorm(d, 1e-6, style="torch", init=0.1)
        self.proj = nn.Linear(d, 4 * n)
        self.out = nn.Linear(n, d)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, u, g, o = self.proj(self.norm(x)).chunk(4, dim=-1)
        log_k = nn.functional.logsigmoid(k)
        u = u * torch.sigmoid(g) * (1 - torch.sigmoid(k))
        scan = linear_scan(log_k, u, h0, output_final_state=True)
        h, last = scan.y, scan.final_state
        return x + self.out(h * torch.sigmoid(o)), last


class RewardModel(nn.Module):
    """Causal gated-SSM reward model over evaluation rows (paper A.1.5).

    ``forward(rows [B, T, 2N], state=None) -> (rewards [B, T, N], state)``; row ``t`` is
    ``[loss before action t, action t]``, each half with its own RMSNorm. ``state`` is a ``[layers, B, n_state]``
    tensor, the state after the last row; it is never modified in place.
    """

    def __init__(self, n_configs: int, hidden: int = 256, n_state: int = 512, n_layers: int = 4) -> None:
        super().__init__()
        self.n_configs, self.n_state = n_configs, n_state
        self.norm_loss = RMSNorm(n_configs, 1e-6, style="torch", init=0.1)
        self.norm_action = RMSNorm(n_configs, 1e-6, style="torch", init=0.1)
        self.inp = nn.Linear(2 * n_configs, hidden)
        self.blocks = nn.ModuleList(_GatedBlock(hidden, n_state) for _ in range(n_layers))
        self.head = nn.Linear(hidden, n_configs)

    def zero_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(len(self.blocks), batch_size, self.n_state)

    def forward(self, rows: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if rows.dim() != 3 or rows.shape[-1] != 2 * self.n_configs:
            raise ValueError(f"rows must be [B, T, {2 * self.n_configs}], got {tuple(rows.shape)}")
        if state is None:
            state = self.zero_state(rows.shape[0])
        n = self.n_configs
        x = self.inp(torch.cat([self.norm_loss(rows[..., :n]), self.norm_action(rows[..., n:])], dim=-1))
        new = []
        for i, blk in enumerate(self.blocks):
            x, h = blk(x, state[i])
            new.append(h)
        return self.head(x), torch.stack(new)


@dataclass(frozen=True)
class ControllerConfig:
    """Settings of the Birdie controller (defaults: the paper's and the public code's values).

    Attributes:
        total_steps: training steps of the run (the schedules scale with it).
        n_candidates: random mixtures scored per decision (paper 2,048).
        top_k: best candidates averaged into the action.
        hidden, n_state, n_layers: reward model size.
        fit_steps: full-batch AdamW steps per refit; lr, weight_decay: its optimiser; max_rows: history kept.
        explore: use the ε-exploration mixture (public code); the schedule is ε = 1 for the first 5% of training,
            0.5 until 10%, then a cosine decay to ``epsilon_final`` at 55%.
        loss_weighted_candidates: multiply candidates by the current loss vector (public code; off by default).
        seed: seed of the controller's own generator.
    """

    total_steps: int = PAPER_STEPS
    n_candidates: int = 2048
    top_k: int = 8
    hidden: int = 256
    n_state: int = 512
    n_layers: int = 4
    fit_steps: int = 200
    lr: float = 5e-4
    weight_decay: float = 0.1
    max_rows: int = 2048
    explore: bool = True
    epsilon_final: float = 0.2
    loss_weighted_candidates: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.n_candidates < 1 or not 1 <= self.top_k <= self.n_candidates:
            raise ConfigError(
                f"controller needs total_steps >= 1 and 1 <= top_k <= n_candidates, got {self.total_steps}, "
                f"{self.top_k}, {self.n_candidates}"
            )

    @property
    def warmup_steps(self) -> int:
        return max(1, round(PAPER_WARMUP * self.total_steps / PAPER_STEPS))

    def epsilon(self, step: int) -> float:
        f = step / self.total_steps
        if f < 0.05:
            return 1.0
        if f < 0.10:
            return 0.5
        if f >= 0.55:
            return self.epsilon_final
        c = 0.5 * (1 + math.cos(math.pi * (f - 0.10) / 0.45))
        return self.epsilon_final + (0.5 - self.epsilon_final) * c


class MixturePolicy:
    """Chooses the probability vector over configs; ``update`` is called at every evaluation step."""

    def __init__(self, configs: Sequence[ObjectiveConfig], log_path: str | Path | None = None) -> None:
        self.configs = list(configs)
        self.class_names = [c.class_name for c in self.configs]
        self.log_path = Path(log_path) if log_path else None
        self.records: list[dict[str, Any]] = []
        self.action = class_uniform_probs(self.configs)

    def _log(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    def update(self, step: int, losses: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything later decisions depend on (arrays, tensors and plain data; a resumed training run restores
        it with :meth:`load_state_dict` and decides exactly as if it had not stopped)."""
        return {"records": self.records, "action": self.action.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the JSONL log is rewritten to hold exactly the restored records."""
        self.records = list(state["records"])
        self.action = np.array(state["action"], dtype=np.float64)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in self.records))


class FixedPolicy(MixturePolicy):
    """A fixed mixture (next-token only, UL2-style ratios, uniform over classes or configs); logs like Birdie."""

    def __init__(
        self, configs: Sequence[ObjectiveConfig], probs: np.ndarray, log_path: str | Path | None = None
    ) -> None:
        super().__init__(configs, log_path)
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != (len(self.configs),) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"probs must be {len(self.configs)} non-negative numbers with a positive sum")
        self.action = p / p.sum()

    def update(self, step: int, losses: np.ndarray) -> np.ndarray:
        self._log({"step": step, "losses": np.asarray(losses, float).tolist(), "action": self.action.tolist()})
        return self.action


def _finite(losses: np.ndarray, n: int) -> np.ndarray:
    loss = np.asarray(losses, dtype=np.float64)
    if loss.shape != (n,):
        raise ValueError(f"losses must have one value per config ({n}), got {loss.shape}")
    return np.where(np.isfinite(loss), loss, np.nanmean(loss))


class LossProportionalPolicy(MixturePolicy):
    """Ablation: play each config in proportion to its current validation loss (harder configs more often),
    mixed with ``floor`` of the class-uniform mixture. No reward model, no memory."""

    def __init__(
        self, configs: Sequence[ObjectiveConfig], floor: float = 0.1, log_path: str | Path | None = None
    ) -> None:
        super().__init__(configs, log_path)
        if not 0.0 <= floor <= 1.0:
            raise ConfigError(f"floor must lie in [0, 1], got {floor}")
        self.floor = floor

    def update(self, step: int, losses: np.ndarray) -> np.ndarray:
        loss = np.clip(_finite(losses, len(self.configs)), 1e-9, None)
        self.action = (1 - self.floor) * loss / loss.sum() + self.floor * class_uniform_probs(self.configs)
        self._log({"step": step, "losses": loss.tolist(), "action": self.action.tolist(), "mode": "loss_prop"})
        return self.action


class ExpWeightsPolicy(MixturePolicy):
    """Ablation: exponential weights on the per-config reward, the full-information form of
    EXP3 (every config's validation loss is observed at each evaluation, so no importance weighting is needed).

    ``log w_i += eta · r_i`` at each evaluation, starting from the class-uniform mixture; the action is
    ``(1 - gamma) · w / Σ w + gamma · class-uniform``. No reward model: a config is favoured when its own loss
    drops, whatever caused the drop.
    """

    def __init__(
        self,
        configs: Sequence[ObjectiveConfig],
        eta: float = 1.0,
        gamma: float = 0.1,
        log_path: str | Path | None = None,
    ) -> None:
        super().__init__(configs, log_path)
        if eta <= 0 or not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"need eta > 0 and gamma in [0, 1], got {eta}, {gamma}")
        self.eta, self.gamma = eta, gamma
        self.log_w = np.log(class_uniform_probs(self.configs))
        self.prev_loss: np.ndarray | None = None

    def update(self, step: int, losses: np.ndarray) -> np.ndarray:
        loss = _finite(losses, len(self.configs))
        rec: dict[str, Any] = {"step": step, "losses": loss.tolist(), "mode": "exp_weights"}
        if self.prev_loss is not None:
            r = reward(self.prev_loss, loss)
            self.log_w = self.log_w + self.eta * r
            rec["reward"] = r.tolist()
            rec["total_reward"] = total_reward(r, self.class_names)
        self.prev_loss = loss
        w = np.exp(self.log_w - self.log_w.max())
        self.action = (1 - self.gamma) * w / w.sum() + self.gamma * class_uniform_probs(self.configs)
        rec["action"] = self.action.tolist()
        self._log(rec)
        return self.action

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "log_w": self.log_w.copy(), "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.log_w = np.array(state["log_w"], dtype=np.float64)
        self.prev_loss = state["prev_loss"]


class BirdieController(MixturePolicy):
    """The reward-driven controller. ``update(step, losses)`` returns the action to sample with until the next
    evaluation."""

    def __init__(
        self,
        configs: Sequence[ObjectiveConfig],
        config: ControllerConfig = ControllerConfig(),
        log_path: str | Path | None = None,
    ) -> None:
        super().__init__(configs, log_path)
        self.cfg = config
        n = len(self.configs)
        self.rng = np.random.default_rng(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            self.model = RewardModel(n, config.hidden, config.n_state, config.n_layers)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
        )
        counts = Counter(self.class_names)
        self.class_weight = torch.tensor([1.0 / counts[c] for c in self.class_names])
        self.X: list[np.ndarray] = []
        self.Y: list[np.ndarray] = []
        self.prev_loss: np.ndarray | None = None
        self.prev_action: np.ndarray | None = None
        self.overhead_s = 0.0
        self._fit_iter = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "rng": self.rng.bit_generator.state,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "X": list(self.X),
            "Y": list(self.Y),
            "prev_loss": self.prev_loss,
            "prev_action": self.prev_action,
            "overhead_s": self.overhead_s,
            "fit_iter": self._fit_iter,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rng.bit_generator.state = state["rng"]
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.X, self.Y = list(state["X"]), list(state["Y"])
        self.prev_loss, self.prev_action = state["prev_loss"], state["prev_action"]
        self.overhead_s = float(state["overhead_s"])
        self._fit_iter = int(state["fit_iter"])

    # -- pieces -------------------------------------------------------------------------------------------
    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.tensor(np.stack(self.X[-self.cfg.max_rows :]), dtype=torch.float32)[None]
        Y = torch.tensor(np.stack(self.Y[-self.cfg.max_rows :]), dtype=torch.float32)[None]
        return X, Y

    def fit(self) -> float:
        """Refit the reward model on the whole history (warm start); returns the final MSE."""
        X, Y = self._rows()
        lo, hi, up = 5e-7, self.cfg.lr, 100
        loss = torch.tensor(float("nan"))
        self.model.train()
        for _ in range(self.cfg.fit_steps):
            # the cyclic schedule runs on across refits (warm start of model, optimiser and schedule)
            i = self._fit_iter
            self._fit_iter += 1
            # cyclic learning rate, exp_range-style: a triangle whose peak decays with the cycle count
            cycle = i // (2 * up)
            tri = 1 - abs(i / up - 2 * cycle - 1)
            for g in self.opt.param_groups:
                g["lr"] = lo + (hi - lo) * max(0.0, tri) * (0.99999**i)
            pred, _ = self.model(X)
            loss = torch.mean((pred - Y) ** 2)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        return float(loss.detach())

    def candidates(self, loss_now: np.ndarray) -> np.ndarray:
        """``[M, N]`` random mixtures: uniform on the simplex, half of them sharpened by a 4th power."""
        n = len(self.configs)
        c = self.rng.dirichlet(np.ones(n), size=self.cfg.n_candidates)
        half = self.cfg.n_candidates // 2
        c[half:] = c[half:] ** 4
        if self.cfg.loss_weighted_candidates:
            c = c * np.nan_to_num(loss_now, nan=0.0)[None]
        c = c + 1e-12
        return c / c.sum(1, keepdims=True)

    @torch.no_grad()
    def score(self, loss_now: np.ndarray, cands: np.ndarray) -> np.ndarray:
        """Class-weighted predicted reward of each candidate ``[M]``, read at the candidate's own row (the step
        after the history), not at a padding row."""
        self.model.eval()
        n_hist = len(self.X[-self.cfg.max_rows :])
        state = None
        if n_hist:
            X, _ = self._rows()
            _, state = self.model(X)
            state = state.expand(-1, cands.shape[0], -1)
        row = np.concatenate([np.broadcast_to(loss_now, cands.shape), cands], axis=1)
        pred, _ = self.model(torch.tensor(row, dtype=torch.float32)[:, None], state)
        return (pred[:, -1] * self.class_weight).sum(-1).numpy()

    def explore_action(self) -> np.ndarray:
        """1-2 random classes get 80% of the mass (even within them); the rest is spread uniformly over classes."""
        classes = list(dict.fromkeys(self.class_names))
        k = int(self.rng.integers(1, min(2, len(classes)) + 1))
        pick = set(self.rng.choice(len(classes), size=k, replace=False).tolist())
        counts = Counter(self.class_names)
        hot = np.array([1.0 / counts[c] if classes.index(c) in pick else 0.0 for c in self.class_names])
        return 0.8 * hot / hot.sum() + 0.2 * class_uniform_probs(self.configs)

    # -- the evaluation call ------------------------------------------------------------------------------
    def update(self, step: int, losses: np.ndarray) -> np.ndarray:
        # the reward model's matrices are tiny: one thread is fastest and leaves the others to training
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._update(step, losses)
        finally:
            torch.set_num_threads(threads)

    def _update(self, step: int, losses: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        loss_now = _finite(losses, len(self.configs))
        rec: dict[str, Any] = {"step": step, "losses": loss_now.tolist()}
        if self.prev_loss is not None and self.prev_action is not None:
            r = reward(self.prev_loss, loss_now)
            self.X.append(np.concatenate([self.prev_loss, self.prev_action]))
            self.Y.append(r)
            rec["reward"] = r.tolist()
            rec["total_reward"] = total_reward(r, self.class_names)
            rec["fit_mse"] = self.fit()
        eps = self.cfg.epsilon(step) if self.cfg.explore else 0.0
        rec["epsilon"] = eps
        rec["explored"] = False
        if step < self.cfg.warmup_steps or not self.X:
            action = class_uniform_probs(self.configs)
            rec["mode"] = "uniform"
        else:
            cands = self.candidates(loss_now)
            s = self.score(loss_now, cands)
            top = np.argsort(-s)[: self.cfg.top_k]
            action = cands[top].mean(0)
            action = action / action.sum()
            rec["mode"] = "reward_model"
            rec["score_std"] = float(s.std())
            rec["score_top"] = float(s[top].mean())
            rec["score_mean"] = float(s.mean())
            if self.rng.random() < eps:
                action = self.explore_action()
                rec["explored"] = True
        self.prev_loss, self.prev_action = loss_now, action
        self.action = action
        rec["action"] = action.tolist()
        dt = time.perf_counter() - t0
        self.overhead_s += dt
        rec["controller_s"] = dt
        if not self.records:
            rec["controller_config"] = asdict(self.cfg)
        self._log(rec)
        return action


def plot_action_log(
    records: Sequence[dict[str, Any]], class_names: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """Stacked area plot of the probability of each objective class over training steps (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    acts = np.array([r["action"] for r in records])
    classes = list(dict.fromkeys(class_names))
    names = np.asarray(class_names)
    per_class = np.stack([acts[:, names == c].sum(1) for c in classes])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.stackplot(steps, per_class, labels=classes, step="post")
    ax.set_xlabel("training step")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.set_title(title or "objective mixture")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
