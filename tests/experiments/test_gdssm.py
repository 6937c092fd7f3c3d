import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from statelab.config import from_dict, read_config_file, to_dict
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


SHIPPED = sorted(p.name for p in CONFIGS.glob("*.toml"))

# What the experiment's own TOML reader (removed when GD-SSM moved onto statelab.config) built from each shipped
# config, written out field by field so that a change in how a file is read shows up here.
_FULL = ExperimentConfig(
    name="gdssm-full",
    seeds=(0, 1, 2),
    threads=1,
    workers=2,
    out_dir="runs",
    eta_tasks=100_000,
    task=RegressionConfig(
        d=10,
        n_examples=10,
        target="vector",
        function="linear",
        x_range=1.0,
        x_dist="uniform",
        w_scale=1.0,
        noise_std=0.0,
        n_distractors=0,
    ),
    train=TrainSection(
        steps=10_000,
        batch_size=64,
        lr=2e-4,
        lr_recurrence=1e-4,
        weight_decay=0.05,
        eval_every=250,
        val_tasks=2000,
        test_tasks=10_000,
        baseline_lr=1e-3,
    ),
    gdssm=GDSSMSection(depths=(1, 2, 3, 4), decay="real", backend="naive", init_scale=0.1, extra_init_scales=(1.0,)),
    baselines=BaselineSection(
        models=("lsa", "s5", "mamba1", "mamba2", "transformer"),
        windows=(False, True),
        width=32,
        layers=1,
        heads=2,
        d_state=16,
        seeds=(0, 1),
    ),
)
_NO_GDSSM = GDSSMSection(depths=(), decay="real", backend="naive", init_scale=1.0, extra_init_scales=())
EXPECTED = {
    "full.toml": _FULL,
    "quick.toml": ExperimentConfig(
        name="gdssm-quick",
        seeds=(0, 1),
        threads=1,
        workers=2,
        out_dir="runs",
        eta_tasks=20_000,
        task=_FULL.task,
        train=TrainSection(
            steps=800,
            batch_size=64,
            lr=4e-3,
            lr_recurrence=2e-3,
            weight_decay=0.05,
            eval_every=100,
            val_tasks=1000,
            test_tasks=4000,
            baseline_lr=2e-3,
        ),
        gdssm=GDSSMSection(depths=(1, 2), decay="real", backend="naive", init_scale=0.1, extra_init_scales=(1.0,)),
        baselines=dataclasses.replace(_FULL.baselines, seeds=()),
    ),
    "smoke.toml": ExperimentConfig(
        name="gdssm-smoke",
        seeds=(0, 1),
        threads=1,
        workers=1,
        out_dir="runs",
        eta_tasks=5000,
        task=RegressionConfig(
            d=4,
            n_examples=4,
            target="vector",
            function="linear",
            x_range=1.0,
            x_dist="uniform",
            w_scale=1.0,
            noise_std=0.0,
            n_distractors=0,
        ),
        train=TrainSection(
            steps=30,
            batch_size=16,
            lr=2e-3,
            lr_recurrence=1e-3,
            weight_decay=0.05,
            eval_every=10,
            val_tasks=64,
            test_tasks=128,
            baseline_lr=1e-3,
        ),
        gdssm=GDSSMSection(depths=(1, 2), decay="real", backend="naive", init_scale=1.0, extra_init_scales=()),
        baselines=BaselineSection(
            models=("lsa", "transformer"), windows=(False, True), width=8, layers=1, heads=2, d_state=4, seeds=()
        ),
    ),
    "full-baselines.toml": dataclasses.replace(
        _FULL,
        name="gdssm-full-baselines",
        seeds=(0,),
        workers=1,
        gdssm=_NO_GDSSM,
        baselines=dataclasses.replace(_FULL.baselines, models=("lsa", "s5", "transformer"), seeds=()),
    ),
    "full-baselines-mamba.toml": dataclasses.replace(
        _FULL,
        name="gdssm-full-baselines-mamba",
        seeds=(0,),
        workers=2,
        gdssm=_NO_GDSSM,
        baselines=dataclasses.replace(_FULL.baselines, models=("mamba2", "mamba1"), seeds=()),
    ),
}


def test_every_shipped_config_has_an_expected_value():
    assert sorted(EXPECTED) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_reads_as_before(name):
    cfg = load_config(CONFIGS / name)
    assert cfg == EXPECTED[name]
    # repr also tells 1 from 1.0 and a tuple from a list, which == on the dataclasses does not
    assert repr(cfg) == repr(EXPECTED[name])
    assert from_dict(ExperimentConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize("name", ["full", "quick", "full-baselines", "full-baselines-mamba"])
def test_committed_run_configs_read_back(name):
    """The config.json beside each committed report (what ``statelab gdssm report`` reads) is its shipped config."""
    saved = CONFIGS.parents[1] / "docs" / "gdssm" / name / "config.json"
    assert from_dict(ExperimentConfig, read_config_file(saved)) == EXPECTED[f"{name}.toml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_plan_every_run(name):
    cfg = load_config(CONFIGS / name)
    gdssm_runs = len(cfg.seeds) * (len(cfg.gdssm.depths) + len(cfg.gdssm.extra_init_scales))
    b = cfg.baselines
    baseline_runs = len(b.seeds or cfg.seeds) * len(b.models) * len(b.windows)
    assert len(plan_runs(cfg)) == gdssm_runs + baseline_runs > 0


def test_overrides_reach_nested_sections():
    cfg = load_config(
        CONFIGS / "smoke.toml",
        ["train.steps=7", "gdssm.depths=[3]", 'task.target="scalar"', "seeds=[4]", "baselines.windows=[true]"],
    )
    assert cfg == dataclasses.replace(
        EXPECTED["smoke.toml"],
        seeds=(4,),
        task=dataclasses.replace(EXPECTED["smoke.toml"].task, target="scalar"),
        train=dataclasses.replace(EXPECTED["smoke.toml"].train, steps=7),
        gdssm=dataclasses.replace(EXPECTED["smoke.toml"].gdssm, depths=(3,)),
        baselines=dataclasses.replace(EXPECTED["smoke.toml"].baselines, windows=(True,)),
    )


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ('name = "x"\n[train]\nstepz = 3\n', [], r"unknown config key\(s\) train\.stepz for TrainSection"),
        ("[gdssm]\ndepht = [1]\n", [], r"unknown config key\(s\) gdssm\.depht"),
        ("", ["baseline.width=4"], r"unknown config key\(s\) baseline for ExperimentConfig"),
        ('[train]\nsteps = "many"\n', [], "train.steps: expected an integer, got 'many'"),
        ("", ["train.lr=fast"], "train.lr: expected a number, got 'fast'"),
        ("[task]\nd = 2.0\n", [], "task.d: expected an integer, got 2.0"),
        ("[gdssm]\ndepths = [1, true]\n", [], r"gdssm.depths\[1\]: expected an integer, got True"),
        ("seeds = 3\n", [], "seeds: expected a list, got 3"),
        ("train = 3\n", [], "train: expected a table of TrainSection fields"),
        ('[task]\ntarget = "matrix"\n', [], "task.target: expected one of 'vector', 'scalar', got 'matrix'"),
        ('[baselines]\nmodels = ["rwkv"]\n', [], "unknown baseline 'rwkv'"),
        ("seeds = []\n", [], "must name at least one seed"),
    ],
    ids=[
        "unknown-key",
        "unknown-gdssm-key",
        "unknown-section-override",
        "bad-int",
        "bad-float-override",
        "float-for-int",
        "bool-in-int-list",
        "scalar-for-list",
        "value-for-table",
        "bad-literal",
        "bad-baseline",
        "no-seeds",
    ],
)
def test_bad_configs_are_refused_naming_the_key(tmp_path, text, overrides, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(bad, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_cli_passes_overrides_and_refuses_bad_keys(monkeypatch, tmp_path):
    import statelab.experiments.gdssm as gdssm
    from statelab.cli.gdssm import app

    seen = []
    monkeypatch.setattr(gdssm, "run_experiment", lambda cfg, out_dir, show_progress: seen.append(cfg) or tmp_path)
    smoke = str(CONFIGS / "smoke.toml")
    result = CliRunner().invoke(
        app,
        ["run", "--config", smoke, "train.steps=5", "seeds=[9]", "--seeds", "3,4", "--workers", "2", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    # --seeds wins over seeds=[9]
    assert seen == [
        dataclasses.replace(
            EXPECTED["smoke.toml"],
            seeds=(3, 4),
            workers=2,
            train=dataclasses.replace(EXPECTED["smoke.toml"].train, steps=5),
        )
    ]
    result = CliRunner().invoke(app, ["run", "--config", smoke, "train.stepz=5"])
    assert result.exit_code == 2 and "train.stepz" in result.output and len(seen) == 1


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
        name="t",
        seeds=(0,),
        eta_tasks=4000,
        task=RegressionConfig(d=4, n_examples=4),
        gdssm=gdssm or GDSSMSection(init_scale=0.1),
        train=TrainSection(steps=steps, lr=4e-3, lr_recurrence=2e-3, eval_every=100, val_tasks=256, test_tasks=256),
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
    cfg = _tiny(
        steps=20,
        threads=2,
        gdssm=GDSSMSection(depths=(1, 2), extra_init_scales=(1.0,)),
        baselines=BaselineSection(models=("lsa",), windows=(True,), width=8, layers=1, d_state=4),
    )
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

    cfg = _tiny(
        steps=10,
        gdssm=GDSSMSection(depths=(1,)),
        baselines=BaselineSection(models=("s5",), windows=(False,), width=8, layers=1, d_state=4),
    )
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


@pytest.mark.parametrize("kind", ["gdssm", "s5"])
def test_a_run_stopped_and_resumed_equals_one_run_bit_for_bit(tmp_path, one_thread, kind):
    """Through statelab.train: 30 steps in one go == 17 steps (checkpoint at 10), stop, resume to 30."""
    cfg = _tiny(
        steps=30,
        gdssm=GDSSMSection(depths=(2,), init_scale=0.1),
        baselines=BaselineSection(models=("s5",), windows=(False,), width=8, layers=1, d_state=4),
    )
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=10))
    val = make_regression_batch(cfg.task, batch_seed(0, "val", 0), 64)
    spec = RunSpec(kind, 0, depth=2)
    full = train_run(spec, cfg, val, out_dir=tmp_path / "full")
    part = train_run(spec, cfg, val, out_dir=tmp_path / "split", stop_after=17)
    assert [s for s, _ in part.curve] == [0, 10]
    resumed = train_run(spec, cfg, val, out_dir=tmp_path / "split")
    assert resumed.curve == full.curve and [s for s, _ in full.curve] == [0, 10, 20, 30]
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(next(iter(full.model.parameters())), next(iter(build_model(spec, cfg).parameters())))


def test_one_no_decay_rule_for_gdssm(tmp_path, one_thread):
    """The recurrence (Λ, log Δ) trains at lr_recurrence without decay; D (a vector) does not decay; W_q and C do."""
    from statelab.experiments.gdssm import train_config
    from statelab.train.loop import param_groups

    cfg = _tiny()
    tc = train_config(RunSpec("gdssm", 0), cfg, tmp_path)
    model = build_model(RunSpec("gdssm", 0), cfg)
    groups = param_groups(model, tc.optim.weight_decay, tc.optim.lr_scale)
    leaf = {id(p): n.rsplit(".", 1)[-1] for n, p in model.named_parameters()}
    got = [(sorted({leaf[id(p)] for p in g["params"]}), g["weight_decay"], g.get("lr_scale", 1.0)) for g in groups]
    assert got == [(["C", "w_q"], 0.05, 1.0), (["D"], 0.0, 1.0), (["lam", "log_step"], 0.0, 0.5)]
    assert tc.optim.lr * 0.5 == cfg.train.lr_recurrence and tc.optim.min_lr == tc.optim.lr


def _ddp_run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = _ddp_cfg()
        train_run(RunSpec("gdssm", 0, depth=2), cfg, make_regression_batch(cfg.task, 1, 8), out_dir=out_dir)
    finally:
        dist.destroy_process_group()


def _ddp_cfg():
    cfg = _tiny(steps=6, gdssm=GDSSMSection(depths=(2,), init_scale=0.1))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=8, eval_every=3))


def test_ddp_two_processes_match_one_process(tmp_path, one_thread):
    """Each of 2 processes takes half of every global batch of tasks; the trained model equals one process's."""
    import safetensors.torch
    import torch.multiprocessing as mp

    cfg = _ddp_cfg()
    spec = RunSpec("gdssm", 0, depth=2)
    single = train_run(spec, cfg, make_regression_batch(cfg.task, 1, 8), out_dir=tmp_path / "one")
    mp.spawn(_ddp_run, args=(2, str(tmp_path / "rdzv"), str(tmp_path / "two")), nprocs=2, join=True)
    ddp = build_model(spec, cfg)
    safetensors.torch.load_model(ddp, str(tmp_path / "two" / "final" / "model.safetensors"))
    for (name, a), (_, b) in zip(single.model.state_dict().items(), ddp.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"parameter {name}")
    assert not torch.equal(single.model.layers[0].C, build_model(spec, cfg).layers[0].C)
