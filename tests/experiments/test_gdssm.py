import json
from pathlib import Path

import pytest
import torch

from statelab.errors import ConfigError
from statelab.experiments.gdssm import (
    BaselineSection,
    ExperimentConfig,
    GDSSMSection,
    RunSpec,
    SeqRegressor,
    TrainSection,
    build_model,
    canonical_parameters,
    load_config,
    model_inputs,
    plan_runs,
    run_experiment,
    train_run,
)
from statelab.layers.gd_ssm import GDSSM
from statelab.tasks.regression import RegressionConfig, batch_seed, make_regression_batch
from statelab.testing import assert_close

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "gdssm"


@pytest.fixture
def one_thread():
    """Training these tiny models is overhead-bound: one thread is several times faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["quick", "full", "smoke"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert cfg.task.d >= 1 and len(cfg.seeds) >= 2
    gdssm_runs = len(cfg.seeds) * (len(cfg.gdssm.depths) + len(cfg.gdssm.extra_init_scales))
    b = cfg.baselines
    baseline_runs = len(b.seeds or cfg.seeds) * len(b.models) * len(b.windows)
    assert len(plan_runs(cfg)) == gdssm_runs + baseline_runs


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[train]\nstepz = 3\n')
    with pytest.raises(ConfigError, match="stepz"):
        load_config(bad)
    bad.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(bad)
    bad.write_text('[baselines]\nmodels = ["rwkv"]\n')
    with pytest.raises(ConfigError, match="rwkv"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_model_inputs_formats():
    b = make_regression_batch(RegressionConfig(d=3, n_examples=4), 0, 2)
    assert model_inputs(RunSpec("gdssm", 0), b).shape == (2, 9, 3)
    flagged = model_inputs(RunSpec("lsa", 0), b)
    assert flagged.shape == (2, 9, 4) and torch.equal(flagged[0, :, -1], torch.tensor([0.0, 1] * 4 + [0]))
    windows = model_inputs(RunSpec("lsa", 0, window=True), b)
    assert windows.shape == (2, 4, 9) and torch.equal(windows[:, -1, 6:], b.query_x)


@pytest.mark.parametrize("mixer", ["lsa", "s5", "mamba1", "mamba2", "transformer"])
def test_seq_regressor_continuation(mixer):
    torch.manual_seed(0)
    model = SeqRegressor(mixer, 5, 2, width=16, layers=2, d_state=4, max_len=16).double()
    x = torch.randn(2, 11, 5, dtype=torch.float64)
    full, _ = model(x)
    a, st = model(x[:, :4])
    b, _ = model(x[:, 4:], st)
    assert_close(f"{mixer} continued", full, torch.cat([a, b], 1), rtol=1e-6, atol=1e-6)


def test_canonical_parameters_remove_the_scale_symmetry():
    model = GDSSM.from_gd(6.0, 10, 4)
    can = canonical_parameters(model.layers[0])
    assert_close("C", -0.6 * torch.eye(4), can["C"])
    with torch.no_grad():
        model.layers[0].w_q.mul_(2.0)
        model.layers[0].D.mul_(-3.0)
        model.layers[0].C.div_(-6.0)
    again = canonical_parameters(model.layers[0])
    for key in can:
        assert_close(key, can[key], again[key])


def _tiny(steps=300, gdssm=None, **kw):
    return ExperimentConfig(
        name="t", seeds=(0,), eta_tasks=4000, task=RegressionConfig(d=4, n_examples=4),
        gdssm=gdssm or GDSSMSection(init_scale=0.1),
        train=TrainSection(steps=steps, lr=4e-3, lr_recurrence=2e-3, eval_every=100, val_tasks=256,
                           test_tasks=256),
        **kw,
    )


def test_one_layer_gdssm_learns_in_context(one_thread):
    cfg = _tiny()
    val = make_regression_batch(cfg.task, batch_seed(0, "val", 0), 256)
    run = train_run(RunSpec("gdssm", 0), cfg, val)
    zero = 0.5 * val.query_y.pow(2).mean().item()
    assert run.curve[0][1] > 0.9 * zero
    assert run.curve[-1][1] < 0.75 * zero  # 1-step GD reaches ~0.49 of the zero predictor here


def test_build_model_is_reproducible_and_leaves_the_global_rng():
    cfg = _tiny()
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = build_model(RunSpec("gdssm", 3), cfg)
    b = build_model(RunSpec("gdssm", 3), cfg)
    assert torch.equal(torch.rand(1), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_run_experiment_writes_report_results_and_plots(tmp_path, one_thread):
    cfg = _tiny(steps=20, threads=2, gdssm=GDSSMSection(depths=(1, 2), extra_init_scales=(1.0,)),
                baselines=BaselineSection(models=("lsa",), windows=(True,), width=8, layers=1, d_state=4))
    root = run_experiment(cfg, out_dir=tmp_path, show_progress=False)
    assert torch.get_num_threads() == 1  # the config's thread count is not left behind
    results = json.loads((root / "results.json").read_text())
    assert results["meta"]["runs"] == 4 and results["meta"]["failures"] == 0
    labels = [r["label"] for r in results["runs"]]
    assert labels == ["gdssm-L1", "gdssm-L2", "gdssm-L1-init1", "lsa+window"]
    one = results["runs"][0]
    assert len(one["position_loss"]) == 4 and -1 <= one["pred_cos_gd1"] <= 1 and "canonical" in one
    assert abs(results["references"]["one_step_closed_form"]["eta"] - 4 / ((1 / 12) * 7.8)) < 1e-9
    report = (root / "report.md").read_text()
    assert "## GD-SSM trained from random initialisation" in report and "lsa+window" in report
    for png in ("training_curves.png", "positions.png", "depth.png", "baselines.png", "parameters.png"):
        assert (root / png).stat().st_size > 1000
    assert json.loads((root / "config.json").read_text())["train"]["steps"] == 20


def test_report_can_be_rebuilt_from_partial_results(tmp_path, one_thread):
    from statelab.experiments.gdssm import report_from_files

    cfg = _tiny(steps=10, gdssm=GDSSMSection(depths=(1,)),
                baselines=BaselineSection(models=("s5",), windows=(False,), width=8, layers=1, d_state=4))
    root = run_experiment(cfg, out_dir=tmp_path, show_progress=False)
    partial = json.loads((root / "results.partial.json").read_text())
    assert partial["meta"]["partial"] and partial["meta"]["done"] == 2
    (root / "results.json").unlink()
    (root / "report.md").unlink()
    partial["runs"] = partial["runs"][:1]
    partial["meta"]["done"] = 1
    (root / "results.partial.json").write_text(json.dumps(partial))
    report_from_files(root)
    report = (root / "report.md").read_text()
    assert "INTERRUPTED after 1 of 2 runs" in report
    assert "## Runs not finished (study interrupted)\n\ns5 seed 0" in report
    with pytest.raises(ConfigError, match="config.json"):
        report_from_files(tmp_path / "nowhere")
