"""Mamba-1 against transformers 5.23: same logits, same greedy tokens, checkpoints both ways, mamba_ssm format."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

from statelab.errors import CheckpointError  # noqa: E402
from statelab.models.loading import load_model  # noqa: E402
from statelab.models.mamba1 import Mamba1LM  # noqa: E402
from statelab.testing import assert_close  # noqa: E402

SHAPES = {
    "tied-auto": dict(vocab_size=37, hidden_size=24, state_size=5, num_hidden_layers=2, conv_kernel=4),
    "untied-rank3-odd": dict(vocab_size=41, hidden_size=21, state_size=3, num_hidden_layers=3, conv_kernel=3,
                             time_step_rank=3, tie_word_embeddings=False),
    "bias-noconvbias": dict(vocab_size=30, hidden_size=16, state_size=7, num_hidden_layers=2, conv_kernel=2,
                            expand=3, use_bias=True, use_conv_bias=False),
}  # fmt: skip


def _hf(name, seed=0):
    torch.manual_seed(seed)
    m = MambaForCausalLM(MambaConfig(**SHAPES[name])).eval()
    with torch.no_grad():  # larger Δ and non-trivial norms so that every parameter shows in the logits
        for layer in m.backbone.layers:
            layer.mixer.dt_proj.bias.add_(1.0)
            layer.norm.weight.uniform_(0.5, 1.5)
            if layer.mixer.conv1d.bias is not None:
                layer.mixer.conv1d.bias.normal_()
    return m


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    ref = _hf(request.param)
    d = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(d)
    return ref, load_model(d), d


def _ids(V, T=11, B=2, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_same_logits(pair):
    ref, ours, _ = pair
    x = _ids(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(x).logits
    got, state = ours(x)
    assert_close("logits", want, got, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert state.n_tokens == 11


def test_same_greedy_generation(pair):
    ref, ours, _ = pair
    x = _ids(ref.config.vocab_size, T=6, seed=2)
    with torch.no_grad():
        want = ref.generate(x, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x))[:, 6:]
    got, _, _ = ours.generate(x, max_new_tokens=8)
    assert torch.equal(want, got)


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    ref, ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = MambaForCausalLM.from_pretrained(tmp_path).eval()
    x = _ids(ref.config.vocab_size, seed=3)
    with torch.no_grad():
        want = back(x).logits
    got, _ = ours(x)
    assert_close("logits", want, got, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    again = load_model(tmp_path)
    assert again.fingerprint == ours.fingerprint


def test_mamba_ssm_format(tmp_path):
    ref = _hf("tied-auto")  # vocab 37, stored padded to 40 as mamba_ssm does
    c = ref.config
    sd = {}
    for k, v in ref.state_dict().items():
        if k == "backbone.embeddings.weight":
            v = torch.cat([v, torch.zeros(3, v.shape[1])])
            k = "backbone.embedding.weight"
        sd[k] = v.clone()
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # mamba_ssm state dicts carry the tied head
    torch.save(sd, tmp_path / "pytorch_model.bin")
    cfg = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": 37,
           "ssm_cfg": {"layer": "Mamba1", "d_state": c.state_size, "d_conv": c.conv_kernel}, "attn_layer_idx": [],
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
           "tie_embeddings": True}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_model(tmp_path)
    x = _ids(37, seed=4)
    with torch.no_grad():
        want = ref(x).logits
    got, _ = ours(x)
    assert got.shape[-1] == 40
    assert_close("logits", want, got[..., :37], rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_sharded_checkpoint(pair, tmp_path):
    ref, ours, d = pair
    tensors = load_file(str(d / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(tmp_path / f))
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    assert load_model(tmp_path).fingerprint == ours.fingerprint


def _broken(d, tmp_path, edit_tensors=None, edit_config=None):
    tmp_path.mkdir()
    tensors = load_file(str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(cfg)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_checkpoint_errors(pair, tmp_path):
    _, _, d = pair
    with pytest.raises(CheckpointError, match=r"missing weights \['layers.1.mixer.A_log'\]"):
        load_model(_broken(d, tmp_path / "a", lambda t: t.pop("backbone.layers.1.mixer.A_log")))
    with pytest.raises(CheckpointError, match=r"unexpected weights \['layers.0.mixer.extra'\]"):
        load_model(_broken(d, tmp_path / "b", lambda t: t.update({"backbone.layers.0.mixer.extra": torch.zeros(1)})))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(_broken(d, tmp_path / "c", edit_config=lambda c: c.update(state_size=c["state_size"] + 1)))
    with pytest.raises(CheckpointError, match="lacks required key"):
        load_model(_broken(d, tmp_path / "e", edit_config=lambda c: c.pop("hidden_size")))


def test_dtype_argument_keeps_decay_fp32(pair):
    _, _, d = pair
    m = load_model(d, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    assert m.layers[0].mixer.A_log.dtype == torch.float32 and m.layers[0].mixer.D.dtype == torch.float32
    x = _ids(m.config.vocab_size, T=4)
    logits, state = m(x)
    assert state.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert isinstance(m, Mamba1LM)
