import json

from typer.testing import CliRunner

from statelab.cli import app
from statelab.experiments.birdie_sweep import BirdieSweepConfig, sweep_configs, sweep_table


def test_a_sweep_tabulates_each_setting(tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text(
        f"""name = "sw"
out_dir = "{tmp_path}"
workers = 1
[base]
d_model = 16
n_layer = 2
d_state = 16
seq_len = 160
batch_size = 2
token_budget = 600
seeds = [0]
arms = ["ntp"]
finetune_steps = 1
n_eval_examples = 2
phonebook_entries = 2
phonebook_queries = [1]
mqar_pairs = 4
mqar_queries = 1
[[settings]]
label = "small"
[[settings]]
label = "two layers more"
n_layer = 4
"""
    )
    result = CliRunner().invoke(app, ["birdie", "sweep", "--config", str(toml), "--no-progress"])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert "| small | ntp | gated_ssm 16 x 2 |" in table and "| two layers more | ntp | gated_ssm 16 x 4 |" in table
    rows = json.loads((tmp_path / "sw" / "results.json").read_text())["rows"]
    assert [r["n_params"] for r in rows][0] < [r["n_params"] for r in rows][1]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[settings]]\nlabel = "x"\nmagic = 1\n')
    result = CliRunner().invoke(app, ["birdie", "sweep", "--config", str(bad)])
    assert result.exit_code == 2 and "magic" in result.output and "Traceback" not in result.output
    bad.write_text('[base]\nworkers = 3\n[[settings]]\nlabel = "x"\n')
    result = CliRunner().invoke(app, ["birdie", "sweep", "--config", str(bad)])
    assert result.exit_code == 2 and "sweep field" in result.output


def row(**metrics):
    base = {"label": "s", "arm": "ntp", "model": "m", "n_params": 10, "counted_tokens": 100.0, "train_s": 1.0}
    return {**base, "n_seeds": 1, **{k: (v, 0.0) for k, v in metrics.items()}}


def test_the_table_marks_twice_chance_and_dashes_what_a_run_did_not_measure():
    cfg = BirdieSweepConfig(settings=({"label": "s"},))
    common = dict(phonebook_q1=0.3, mqar=0.25, bits_per_byte=2.0)
    lines = sweep_table(cfg, [row(zs_phonebook=0.1, zs_mqar=0.1, **common)])
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[-3:] == ["no", "yes", "1"] and cells.count("–") == 2
    lines = sweep_table(cfg, [row(zs_phonebook=0.1, zs_mqar=0.1, zt_phonebook=0.2, zt_mqar=0.4, **common)])
    assert [c.strip() for c in lines[2].split("|")[1:-1]][-3:-1] == ["yes", "yes"]
    lines = sweep_table(cfg, [row(zs_phonebook=0.5, zs_mqar=0.19, zt_phonebook=0.2, zt_mqar=0.1, **common)])
    assert [c.strip() for c in lines[2].split("|")[1:-1]][-3] == "no"


def test_settings_override_the_base_and_unknown_fields_are_refused():
    cfg = BirdieSweepConfig(
        base={"d_model": 32, "seeds": [0]}, settings=({"label": "a"}, {"label": "b", "d_model": 48})
    )
    (la, a), (lb, b) = sweep_configs(cfg)
    assert (la, a.d_model, a.name) == ("a", 32, "birdie-sweep/0") and (lb, b.d_model) == ("b", 48)


def test_every_shipped_birdie_config_builds():
    from pathlib import Path

    from statelab.config import from_dict, read_config_file
    from statelab.experiments.birdie import BirdieExperimentConfig

    files = sorted((Path(__file__).parents[2] / "configs" / "birdie").glob("*.toml"))
    assert {f.stem for f in files} >= {"quick", "full", "study", "sweep", "sweep2", "sweep3"}
    for f in files:
        data = read_config_file(f)
        if f.stem.startswith("sweep"):
            assert len(sweep_configs(from_dict(BirdieSweepConfig, data))) >= 2
        else:
            assert from_dict(BirdieExperimentConfig, data).seeds == (0, 1, 2)
