import json

import numpy as np
import pytest
import torch

from statelab.errors import ConfigError
from statelab.objectives import CopyingObjectiveConfig, DeshufflingConfig, InfillingConfig, birdie_grid
from statelab.objectives.controller import (
    BirdieController,
    ControllerConfig,
    ExpWeightsPolicy,
    FixedPolicy,
    LossProportionalPolicy,
    RewardModel,
    eval_schedule,
    plot_action_log,
    reward,
    total_reward,
)

WORKED = [
    (4.5, 4.2, 0.952),
    (0.6, 0.5207, 0.954),
    (2.0, 1.9, 0.180),
    (2.0, 1.95, 0.023),
    (2.0, 2.1, -0.189),
    (3.0, 2.0, 1.0),
    (1.0, 0.99, 0.0007),
]


@pytest.mark.parametrize(("old", "new", "want"), WORKED, ids=[f"{a}->{b}" for a, b, _ in WORKED])
def test_reward_worked_values(old, new, want):
    assert reward(np.array([old]), np.array([new]))[0] == pytest.approx(want, abs=5e-4)


def test_reward_nan_and_total():
    r = reward(np.array([2.0, np.nan, 2.0]), np.array([1.9, 1.0, 2.1]))
    assert r[1] == 0.0
    assert total_reward(np.array([1.0, 0.0, 0.5]), ["a", "a", "b"]) == pytest.approx(0.5 + 0.5)


def test_eval_schedule_scales_the_papers():
    assert eval_schedule(32_000)[:8] == [10, 50, 250, 500, 1000, 1500, 2000, 3000]
    assert len(eval_schedule(32_000)) == 37  # 7 early ones, then every 1000 from 3000
    s = eval_schedule(3200)
    assert s[:3] == [1, 5, 25] and s[-1] == 3200 and s == sorted(set(s))


def test_reward_model_is_causal_and_continues_from_its_state():
    torch.manual_seed(0)
    rm = RewardModel(5, hidden=16, n_state=8, n_layers=2)
    x = torch.randn(2, 7, 10)
    full, st = rm(x)
    a, s1 = rm(x[:, :4])
    b, s2 = rm(x[:, 4:], s1)
    torch.testing.assert_close(torch.cat([a, b], 1), full)
    torch.testing.assert_close(s2, st)
    x2 = x.clone()
    x2[:, 5] += 1.0
    torch.testing.assert_close(rm(x2)[0][:, :5], full[:, :5])


def small_cfg(**kw):
    base = dict(
        total_steps=1000,
        n_candidates=128,
        top_k=8,
        hidden=32,
        n_state=32,
        n_layers=2,
        fit_steps=40,
        lr=3e-3,
        explore=False,
        seed=0,
    )
    base.update(kw)
    return ControllerConfig(**base)


CONFIGS = [
    InfillingConfig(rate=0.15),
    InfillingConfig(rate=0.5),
    CopyingObjectiveConfig(length=(8, 16)),
    CopyingObjectiveConfig(length=(16, 32)),
    DeshufflingConfig(fraction=0.5),
    DeshufflingConfig(fraction=1.0),
]


def run_synthetic(ctrl, best=3, n_evals=20, seed=0):
    """Training on config j lowers every loss by G[j]; config ``best`` helps most."""
    rng = np.random.default_rng(seed)
    G = np.full((6, 6), 0.01)
    G[best] = 0.1
    loss = np.full(6, 3.0)
    actions = []
    for e in range(n_evals):
        a = ctrl.update(step=10 * e, losses=loss)
        actions.append(a)
        loss = loss * (1 - a @ G) * (1 + 0.002 * rng.standard_normal(6))
    return np.array(actions)


def test_controller_moves_probability_toward_the_most_useful_objective(tmp_path):
    ctrl = BirdieController(CONFIGS, small_cfg(), log_path=tmp_path / "log.jsonl")
    acts = run_synthetic(ctrl)
    uniform = 1 / 6
    assert acts[0][3] == pytest.approx(uniform)
    assert acts[-6:, 3].mean() > 3 * uniform
    # every decision is logged, and the reward model's scores differ across candidates (not all ties)
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(recs) == 20
    rm_recs = [r for r in recs if r["mode"] == "reward_model"]
    assert rm_recs and all(r["score_std"] > 0 for r in rm_recs)
    # the mixture moves at every evaluation once the reward model plays
    acts_rm = np.array([r["action"] for r in rm_recs])
    moves = np.abs(np.diff(acts_rm, axis=0)).sum(1)
    assert min(moves) > 0
    plot_action_log(recs, [c.class_name for c in CONFIGS], tmp_path / "mix.png")
    assert (tmp_path / "mix.png").stat().st_size > 1000


def test_exploration_is_explicit_and_logged():
    ctrl = BirdieController(CONFIGS, small_cfg(explore=True))
    run_synthetic(ctrl, n_evals=4)
    assert ctrl.cfg.epsilon(0) == 1.0 and ctrl.cfg.epsilon(999) == pytest.approx(0.2)
    explored = [r for r in ctrl.records if r["explored"]]
    assert explored  # epsilon is 1 for the first 5% of steps
    a = np.array(explored[0]["action"])
    assert a.sum() == pytest.approx(1) and a.max() > 0.2


def test_fixed_policy_keeps_its_mixture():
    g = birdie_grid(256)
    p = np.zeros(len(g))
    p[0] = 1
    pol = FixedPolicy(g, p)
    assert np.array_equal(pol.update(10, np.ones(len(g))), p)
    with pytest.raises(ValueError):
        FixedPolicy(g, np.ones(3))


def test_loss_proportional_policy_favours_the_hardest_configs():
    pol = LossProportionalPolicy(CONFIGS, floor=0.1)
    loss = np.array([1.0, 4.0, 1.0, 1.0, 1.0, np.nan])
    a = pol.update(0, loss)
    assert a.sum() == pytest.approx(1) and a.argmax() == 1
    assert a[5] > 0  # a NaN loss is replaced by the mean, never dropped
    with pytest.raises(ConfigError):
        LossProportionalPolicy(CONFIGS, floor=2.0)


def test_exp_weights_policy_moves_toward_the_config_whose_loss_drops_most():
    """Each config's training lowers its own loss; config 4's loss drops fastest."""
    pol = ExpWeightsPolicy(CONFIGS, eta=2.0, gamma=0.1)
    speed = np.array([0.01, 0.01, 0.01, 0.01, 0.2, 0.01])
    loss = np.full(6, 3.0)
    first = pol.update(0, loss)
    for e in range(1, 10):
        loss = loss * (1 - speed * pol.action * 6)
        pol.update(10 * e, loss)
    assert first[4] == pytest.approx(first[0])  # starts class-uniform
    assert pol.action.argmax() == 4 and pol.action[4] > 0.5
    assert pol.action.min() >= 0.1 * min(first) - 1e-12  # the gamma floor keeps every config alive
    assert len(pol.records) == 10 and "reward" in pol.records[-1]
