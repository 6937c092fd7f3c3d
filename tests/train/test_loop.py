"""The training loop: schedule, parameter groups, bit-exact resume (after a stop and after SIGKILL),
DDP with 2 processes == 1 process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from statelab.errors import CheckpointError, ConfigError
from statelab.train.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from statelab.train.config import load_train_config
from statelab.train.loop import build_model, lr_at, param_groups, read_metrics, train

TEXT = "the quick brown fox jumps over the lazy dog. " * 40 + "pack my box with five dozen liquor jugs. " * 40


def tiny_cfg(tmp_path: Path, name: str, *extra: str):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    return load_train_config(
        None,
        [
            "model.arch=mamba1",
            "model.config={ d_model = 16, n_layer = 2, vocab_size = 259, d_state = 4 }",
            "data.source=text",
            f"data.options.path={json.dumps(str(corpus))}",
            "data.seq_len=24",
            "optim.lr=1e-2",
            "optim.min_lr=1e-3",
            "optim.warmup_steps=2",
            "run.max_steps=6",
            "run.global_batch_size=4",
            "run.micro_batch_size=2",
            "run.checkpoint_every=2",
            "run.keep_checkpoints=2",
            "run.log_every=1",
            "run.threads=2",
            "run.progress=false",
            f"run.out_dir={json.dumps(str(tmp_path / name))}",
            *extra,
        ],
    )


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"parameter {k} differs"


def test_lr_schedule_warmup_then_cosine(tmp_path):
    cfg = tiny_cfg(tmp_path, "s", "run.max_steps=102", "optim.warmup_steps=2")
    lrs = [lr_at(s, cfg) for s in range(102)]
    assert lrs[0] == pytest.approx(0.5e-2) and lrs[1] == pytest.approx(1e-2)
    assert lrs[2] == pytest.approx(1e-2)
    assert all(x >= y for x, y in zip(lrs[2:], lrs[3:], strict=False))
    assert lrs[-1] == pytest.approx(1e-3, rel=1e-2)
    assert lrs[52] == pytest.approx(0.5 * (1e-2 + 1e-3))


def test_no_weight_decay_on_decay_parameters(tmp_path):
    model = build_model(tiny_cfg(tmp_path, "g").model, seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    dec = {names[id(p)] for p in decay["params"]}
    nod = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for n in nod | dec:
        leaf = n.rsplit(".", 1)[-1]
        if leaf in ("A_log", "D", "bias") or "norm" in n:
            assert n in nod, n
    assert any(n.endswith("A_log") for n in nod) and any(n.endswith(".D") for n in nod)
    assert any(n.endswith("in_proj.weight") for n in dec)
    assert len(dec) + len(nod) == len(list(model.parameters()))


def test_model_init_is_a_pure_function_of_the_seed(tmp_path):
    section = tiny_cfg(tmp_path, "i").model
    before = torch.get_rng_state()
    a, b, c = build_model(section, 1), build_model(section, 1), build_model(section, 2)
    params_equal(a, b)
    assert not torch.equal(a.embedding.weight, c.embedding.weight)
    assert torch.equal(before, torch.get_rng_state())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the tiny config trained 6 steps in one go."""
    return train(tiny_cfg(tmp_path_factory.mktemp("ref"), "full"))


def test_training_lowers_loss_and_writes_artifacts(uninterrupted):
    res = uninterrupted
    recs = read_metrics(res.out_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3, [r["loss"] for r in recs]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in recs)
    assert recs[-1]["tokens"] == 6 * 4 * 24
    assert (res.out_dir / "loss.png").stat().st_size > 1000
    assert [s for s, _ in list_checkpoints(res.out_dir)] == [4, 6]  # keep_checkpoints=2
    from statelab.models.loading import load_model
    from statelab.models.tokenizer import load_tokenizer

    reloaded = load_model(res.out_dir / "final")
    x = torch.tensor([load_tokenizer(res.out_dir / "final").encode("the lazy dog")])
    assert torch.equal(reloaded(x)[0], res.model(x)[0])


def test_resume_after_stop_is_bit_exact(tmp_path, uninterrupted):
    full = uninterrupted
    cfg = tiny_cfg(tmp_path, "split")
    part = train(cfg, stop_after=3)  # checkpoints at 2; step 3 is lost as if the process had died
    assert part.step == 3 and read_checkpoint(latest_checkpoint(cfg.run.out_dir)).step == 2
    resumed = train(cfg)
    assert resumed.resumed_from == 2 and resumed.step == 6
    params_equal(full.model, resumed.model)
    a = read_metrics(full.out_dir / "metrics.jsonl")
    b = read_metrics(resumed.out_dir / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]
    oa = json.loads((full.out_dir / "checkpoints/step-00000006/trainer.json").read_text())
    ob = json.loads((resumed.out_dir / "checkpoints/step-00000006/trainer.json").read_text())
    assert oa["files"]["optimizer.safetensors"] == ob["files"]["optimizer.safetensors"]
    assert oa["files"]["model.safetensors"] == ob["files"]["model.safetensors"]


def test_resume_after_sigkill_is_bit_exact(tmp_path, uninterrupted):
    """A real process killed with SIGKILL right after a checkpoint, resumed here, ends bit-identical."""
    full = uninterrupted
    cfg_file = tmp_path / "killed.json"
    from statelab.train.config import to_dict

    cfg_file.write_text(json.dumps(to_dict(tiny_cfg(tmp_path, "killed", "run.max_steps=6"))))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "statelab.train", str(cfg_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    out_dir = tmp_path / "killed"
    deadline = time.monotonic() + 120
    try:
        while not list_checkpoints(out_dir) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert list_checkpoints(out_dir), proc.stderr.read().decode() if proc.poll() is not None else "timeout"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    step = list_checkpoints(out_dir)[-1][0]
    resumed = train(tiny_cfg(tmp_path, "killed"))
    assert resumed.resumed_from == step and resumed.step == 6
    params_equal(full.model, resumed.model)


def test_resume_refuses_a_changed_config(tmp_path):
    train(tiny_cfg(tmp_path, "r"), stop_after=2)
    with pytest.raises(ConfigError, match="optim.lr"):
        train(tiny_cfg(tmp_path, "r", "optim.lr=5e-3"))
    # a cosmetic change is fine
    assert train(tiny_cfg(tmp_path, "r", "run.log_every=3"), stop_after=3).resumed_from == 2


def test_corrupt_checkpoint_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path, "c")
    train(cfg, stop_after=2)
    f = latest_checkpoint(cfg.run.out_dir) / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(cfg)


def _ddp_worker(rank: int, world: int, init_file: str, cfg_json: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from statelab.train.config import TrainConfig, from_dict

        train(from_dict(TrainConfig, json.loads(cfg_json)))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    from statelab.models.loading import load_model
    from statelab.train.config import to_dict

    # one process accumulates 2 micro-batches of 2; two processes take 1 micro-batch of 2 each: same global batch
    single = train(tiny_cfg(tmp_path, "single", "run.max_steps=3", "run.checkpoint_every=0"))
    cfg = tiny_cfg(tmp_path, "ddp", "run.max_steps=3", "run.checkpoint_every=0", "run.threads=1")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rdzv"), json.dumps(to_dict(cfg))), nprocs=2, join=True)
    ddp = load_model(tmp_path / "ddp" / "final")
    sa, sb = single.model.state_dict(), ddp.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k}")
    a = read_metrics(tmp_path / "single" / "metrics.jsonl")
    b = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert not torch.equal(sa["embedding.weight"], build_model(cfg.model, 0).state_dict()["embedding.weight"])


def test_forget_gate_rows_get_no_weight_decay_and_the_other_rows_do():
    """One AdamW step with zero gradients changes a parameter by its weight decay alone: with lr 1 and decay 0.5
    every decayed row halves, the gated SSM's forget-gate rows (W_f, fused with W_i, W_z, W_o) stay as they were."""
    from statelab.layers.gated_ssm import GatedSSMLayer
    from statelab.train.config import ModelSection
    from statelab.train.loop import RowDecayAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(GatedSSMLayer(d_model=8, d_state=6), GatedSSMLayer(d_model=8, d_state=6))
    groups = param_groups(model, 0.5)
    assert len(groups) == 3 and groups[2]["weight_decay"] == 0.0 and groups[2]["row_weight_decay"] == 0.5
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in groups[2]["params"]] == ["0.in_proj.weight", "1.in_proj.weight"]
    assert groups[2]["decay_rows"] == [[[0, 18]], [[0, 18]]]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = RowDecayAdamW(groups, lr=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for i in range(2):
        w, w0 = model[i].in_proj.weight, before[f"{i}.in_proj.weight"]
        assert torch.equal(w[18:], w0[18:])  # W_f: no decay
        assert torch.equal(w[:18], w0[:18] * 0.5)  # W_i, W_z, W_o decay
        assert torch.equal(model[i].out_proj.weight, before[f"{i}.out_proj.weight"] * 0.5)
        assert torch.equal(model[i].in_proj.bias, before[f"{i}.in_proj.bias"])
    # the registered Birdie model carries the same exemption through the one rule
    birdie = build_model(ModelSection("birdie", {"d_model": 8, "n_layer": 2, "d_state": 6, "vocab_size": 300}), 0)
    rows = [g for g in param_groups(birdie, 0.1) if "decay_rows" in g]
    assert len(rows) == 1 and len(rows[0]["params"]) == 2 and rows[0]["decay_rows"][0] == [[0, 18]]


def test_lr_scale_groups_and_decay_names(tmp_path):
    """GD-SSM's recurrence (lam, log_step) gets its own rate and no decay; its matrices decay."""
    from statelab.layers.gd_ssm import GDSSM, GDSSMConfig

    model = GDSSM(GDSSMConfig(d=3, num_layers=1))
    groups = param_groups(model, 0.05, {"lam": 0.5, "log_step": 0.5})
    names = {id(p): n.rsplit(".", 1)[-1] for n, p in model.named_parameters()}
    got = [(sorted(names[id(p)] for p in g["params"]), g["weight_decay"], g.get("lr_scale", 1.0)) for g in groups]
    assert got == [(["C", "w_q"], 0.05, 1.0), (["D"], 0.0, 1.0), (["lam", "log_step"], 0.0, 0.5)]


def test_a_resumed_run_accepts_a_checkpoint_older_than_a_new_config_key(tmp_path):
    """A checkpoint written before a config key existed resumes when the key has its default value."""
    from statelab.train.config import TrainConfig, to_dict
    from statelab.train.loop import _config_diff

    now = to_dict(tiny_cfg(tmp_path, "o"))
    old = json.loads(json.dumps(now))
    del old["run"]["max_tokens"], old["optim"]["lr_scale"]
    assert _config_diff(old, now, to_dict(TrainConfig())) == []
    changed = json.loads(json.dumps(now))
    changed["run"]["max_tokens"] = 5
    assert _config_diff(old, changed, to_dict(TrainConfig())) == ["run.max_tokens"]
