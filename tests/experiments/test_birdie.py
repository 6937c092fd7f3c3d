import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from statelab.cli import app
from statelab.errors import ConfigError
from statelab.experiments.birdie import (
    BirdieExperimentConfig,
    arm_arch,
    check_held_out,
    evaluation_needles,
    generated_accuracy,
    load_corpus,
    mqar_example,
    phonebook_example,
    recall_probes,
    run_experiment,
)
from statelab.objectives import VOCAB, pack_example


def decode(ids):
    return bytes(int(i) for i in ids if i < 256).decode()


def test_corpus_is_real_text_from_package_data():
    text = load_corpus()
    assert text.shape[0] > 1_000_000 and text.max() < 256
    assert decode(text[:14]) == "First Citizen:"


def test_phonebook_answers_are_in_the_prompt():
    ex, mask = phonebook_example(5, 2, seed=0)
    prompt, answer = decode(ex.input), decode(ex.target)
    assert prompt.startswith("Find: ") and "Phonebook:\n" in prompt and ex.target[-1] == VOCAB.eos
    nums = answer.split(", ")
    assert len(nums) == 2 and all(f": {n}\n" in prompt for n in nums)
    assert mask.sum() == 20  # ten digits per number
    assert len(pack_example(ex)[0]) < 256


def test_mqar_values_match_their_keys():
    ex, mask = mqar_example(8, 4, seed=1)
    prompt, answer = decode(ex.input), decode(ex.target)
    pairs = dict(p.split(":") for p in prompt.split("\n")[0][len("pairs: ") :].split())
    keys = prompt.split("\n")[1][len("query: ") :].split()
    assert answer.split() == [pairs[k] for k in keys]
    assert mask.sum() == 8


def test_config_rejects_unknown_arms():
    with pytest.raises(ConfigError, match="unknown arms"):
        BirdieExperimentConfig(arms=("ntp", "magic"))


def tiny(tmp_path, **changes):
    base = dict(
        name="t",
        out_dir=str(tmp_path),
        d_model=16,
        n_layer=2,
        d_state=16,
        seq_len=160,
        batch_size=2,
        token_budget=600,
        seeds=(0,),
        arms=("ntp", "ul2", "birdie"),
        n_val_per_config=1,
        n_evals=2,
        controller_hidden=8,
        controller_state=8,
        controller_fit_steps=2,
        controller_candidates=16,
        finetune_steps=1,
        n_eval_examples=2,
        phonebook_entries=2,
        phonebook_queries=(1, 2),
        mqar_pairs=4,
        mqar_queries=2,
        workers=1,
    )
    return BirdieExperimentConfig(**{**base, **changes})


def test_tiny_study_writes_a_report(tmp_path):
    out = run_experiment(tiny(tmp_path), show_progress=False)
    res = json.loads((out / "results.json").read_text())
    assert res["failures"] == [] and [r["arm"] for r in res["runs"]] == ["ntp", "ul2", "birdie"]
    for r in res["runs"]:
        assert r["counted_tokens"] >= 600
        assert all(0 <= r["metrics"][m] <= 1 for m in ("phonebook_q1", "phonebook_q2", "mqar", "copying"))
        m = r["metrics"]
        assert m["phonebook"] == pytest.approx((m["phonebook_q1"] + m["phonebook_q2"]) / 2)
    ul2 = [r for r in res["runs"] if r["arm"] == "ul2"][0]
    assert set(ul2["class_tokens"]) == {"infilling", "prefix_lm"}
    birdie = [r for r in res["runs"] if r["arm"] == "birdie"][0]
    assert abs(sum(birdie["final_mixture"].values()) - 1) < 1e-6
    report = (out / "report.md").read_text()
    assert "| birdie |" in report and "| ntp |" in report and "| ul2 |" in report
    assert (out / "metrics.png").stat().st_size > 0 and (out / "mixture_birdie_s0.png").exists()


def test_worker_processes_give_the_same_records_as_one_process(tmp_path):
    cfg = dict(arms=("ntp", "birdie"), seeds=(0, 1))
    one = json.loads((run_experiment(tiny(tmp_path / "a", **cfg), False) / "results.json").read_text())
    two = json.loads((run_experiment(tiny(tmp_path / "b", workers=2, **cfg), False) / "results.json").read_text())
    assert two["failures"] == []
    assert [(r["arm"], r["seed"]) for r in two["runs"]] == [("ntp", 0), ("birdie", 0), ("ntp", 1), ("birdie", 1)]
    for a, b in zip(one["runs"], two["runs"], strict=True):
        assert a["metrics"] == b["metrics"] and a["losses"] == b["losses"] and a["class_tokens"] == b["class_tokens"]


def test_generated_accuracy_scores_what_the_model_generates():
    """A model that always emits the same digit gets exactly the share of that digit in the answers."""
    items = [phonebook_example(3, 2, seed=i) for i in range(4)]

    class Sevens(torch.nn.Module):
        def generate(self, prompt, n):
            from statelab.models.base import Generation

            B = prompt.shape[0]
            return Generation(torch.full((B, n), ord("7")), None, torch.full((B,), n))

    digits = np.concatenate([ex.target[m] for ex, m in items])
    assert generated_accuracy(Sevens(), items, 256) == pytest.approx(np.mean(digits == ord("7")))


@pytest.mark.parametrize(
    ("override", "message"),
    [("phonebook_queries=[9]", "phonebook_queries"), ('arms=["magic"]', "unknown arms"), ("lr=fast", "lr: expected")],
)
def test_cli_refuses_a_bad_config_in_one_line(override, message):
    quick = Path(__file__).parents[2] / "configs" / "birdie" / "quick.toml"
    result = CliRunner().invoke(app, ["birdie", "run", "--config", str(quick), override])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_an_arm_stopped_and_resumed_equals_one_run_bit_for_bit(tmp_path):
    """Through statelab.train: the controlled bidirectional arm trained to its budget in one go equals the same
    arm stopped after 5 steps (checkpoints every step), resumed: parameters, losses, mixtures and the controller's
    log (reward model refits and decisions after the stop included)."""
    import torch

    from statelab.experiments.birdie import split_corpus, train_arm

    cfg = tiny(tmp_path, arms=("birdie",), token_budget=2600, n_evals=8, finetune_steps=0)
    train_text, val_text = split_corpus()
    full, rec_full = train_arm("birdie", 0, cfg, train_text, val_text, tmp_path / "full")
    (tmp_path / "split").mkdir()
    train_arm("birdie", 0, cfg, train_text, val_text, tmp_path / "split", stop_after=5)
    resumed, rec = train_arm("birdie", 0, cfg, train_text, val_text, tmp_path / "split")
    assert rec["steps"] == rec_full["steps"] > 5 and rec["counted_tokens"] == rec_full["counted_tokens"] >= 2600
    assert rec["losses"] == rec_full["losses"] and rec["class_tokens"] == rec_full["class_tokens"]
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    logs = [
        [json.loads(x) for x in (d / "mixture_birdie_s0.jsonl").read_text().splitlines()]
        for d in (tmp_path / "full", tmp_path / "split")
    ]
    strip = [[{k: v for k, v in r.items() if k != "controller_s"} for r in log] for log in logs]
    assert strip[0] == strip[1] and sum(r["mode"] == "reward_model" for r in strip[0]) >= 2
    assert any(r["step"] > 5 and "fit_mse" in r for r in strip[0])


def test_recall_probes_ask_for_a_value_that_is_in_their_context():
    cfg = BirdieExperimentConfig(phonebook_entries=4, phonebook_queries=(1,), mqar_pairs=6, mqar_queries=2)
    for ex, mask in recall_probes("phonebook", cfg, seed=5, n=4):
        prompt, number = decode(ex.input), decode(ex.target[mask])
        name = prompt.rsplit("\n", 1)[1][: -len(": ")]
        assert prompt.startswith("Phonebook:\n") and prompt.endswith(f"\n\n{name}: ") and "Find" not in prompt
        assert f"\n{name}: {number}\n" in prompt and len(number) == 10
    for ex, mask in recall_probes("mqar", cfg, seed=5, n=4):
        prompt, value = decode(ex.input), decode(ex.target[mask])
        pairs, key = prompt.split("\n")
        assert key.endswith(":") and f" {key}{value}" in pairs and len(value) == 2 and "query" not in prompt
    with pytest.raises(ConfigError, match="task"):
        recall_probes("squad", cfg, seed=0, n=1)


@pytest.mark.parametrize("arch", ["gated_ssm", "mamba2", "transformer"])
def test_causal_reading_generates_what_greedy_full_passes_generate(arch):
    """generated_accuracy(reading="causal") scores the tokens that re-running the whole sequence and taking the
    argmax would produce: a target equal to those tokens scores 1, one digit changed scores less."""
    from statelab.layers.protocol import Segments
    from statelab.models.birdie_models import BirdieLM, BirdieModelConfig
    from statelab.objectives.base import Example

    torch.manual_seed(0)
    model = BirdieLM(BirdieModelConfig(arch=arch, vocab_size=VOCAB.size, d_model=32, n_layer=2, d_state=32)).eval()
    items = []
    for i in range(3):
        context = np.frombuffer(f"pairs: ab:1{i} cd:2{i}\ncd:".encode(), dtype=np.uint8).astype(np.int64)
        seq = torch.from_numpy(np.concatenate([[VOCAB.begin], context]))[None]
        with torch.no_grad():
            for _ in range(4):
                start = torch.zeros_like(seq, dtype=torch.bool)
                start[:, 0] = True
                logits, _ = model(seq, segments=Segments(start, torch.zeros_like(start)))
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        items.append((Example(context, seq[0, -4:].numpy()), np.ones(4, dtype=bool)))
    assert generated_accuracy(model, items, 64, reading="causal") == 1.0
    ex, mask = items[0]
    wrong = ex.target.copy()
    wrong[0] += 1
    assert generated_accuracy(model, [(Example(ex.input, wrong), mask)], 64, reading="causal") == 0.75
    with pytest.raises(ConfigError, match="reading"):
        generated_accuracy(model, items, 64, reading="sideways")


def test_no_evaluation_number_or_pairs_line_is_in_the_records_corpus():
    cfg = BirdieExperimentConfig(corpus="records", corpus_bytes=200_000, seeds=(0, 1), n_eval_examples=8)
    needles = evaluation_needles(cfg)
    assert sum(n.isdigit() and len(n) == 10 for n in needles) >= 8 * 4
    assert sum(n.startswith("pairs: ") for n in needles) >= 8
    assert check_held_out(cfg) == len(needles)


def test_a_study_on_the_records_corpus_with_the_reference_arms(tmp_path):
    cfg = tiny(
        tmp_path, corpus="records", corpus_bytes=50_000, arms=("ntp", "mamba2_ntp", "transformer_ntp"), d_model=32
    )
    assert [arm_arch(a, cfg) for a in cfg.arms] == ["gated_ssm", "mamba2", "transformer"]
    res = json.loads((run_experiment(cfg, show_progress=False) / "results.json").read_text())
    assert res["failures"] == [] and res["held_out_checked"] > 0
    assert len({r["n_params"] for r in res["runs"]}) == 3
    for r in res["runs"]:
        assert r["counted_tokens"] >= cfg.token_budget
        assert all(0 <= r["metrics"][m] <= 1 for m in ("zs_phonebook", "zs_mqar", "zsp_phonebook", "zsp_mqar"))
    report = (tmp_path / "t" / "report.md").read_text()
    assert "records corpus" in report and "| transformer_ntp |" in report and "mamba2, " in report
    with pytest.raises(ConfigError, match="corpus"):
        tiny(tmp_path, corpus="wikipedia")
