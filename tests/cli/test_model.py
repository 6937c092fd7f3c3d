"""``statelab encode | mix | generate | score`` on a tiny byte-level model saved to a temporary directory."""

import json

import pytest
import torch
from typer.testing import CliRunner

from statelab.cli import app
from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.models.tokenizer import ByteTokenizer
from statelab.state.io import load_state, read_metadata, save_state
from statelab.state.mix import mix
from statelab.testing import assert_close

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    m = Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=ByteTokenizer.vocab_size, d_state=4)).eval()
    d = tmp_path_factory.mktemp("tiny")
    m.save_pretrained(d)
    ByteTokenizer().save(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    from statelab.models.loading import load_model

    return load_model(model_dir)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    r = run(*args)
    assert r.exit_code == 0, r.output
    return r


def byte_ids(text):
    return torch.tensor([ByteTokenizer().encode(text)])


def test_encode_writes_the_state_of_the_text(model_dir, model, tmp_path):
    out = tmp_path / "s.safetensors"
    r = ok("encode", model_dir, "--text", "Q: cat\nA: CAT\n", "-o", out, "--json")
    info = json.loads(r.output)
    assert info["n_tokens"] == 14 and info["tokens_read"] == 14 and info["fingerprint"] == model.fingerprint
    s = load_state(out, model)
    assert s.equal(model.encode(byte_ids("Q: cat\nA: CAT\n")))
    meta = read_metadata(out)
    assert meta["prompt"] == "Q: cat\nA: CAT\n" and json.loads(meta["token_ids"])[:2] == [81, 58]
    # from a file, continuing from the first state
    f = tmp_path / "more.txt"
    f.write_text("Q: dog\n")
    out2 = tmp_path / "s2.safetensors"
    ok("encode", model_dir, "--file", f, "--state", out, "-o", out2)
    whole = model.encode(byte_ids("Q: cat\nA: CAT\nQ: dog\n"))
    cont = load_state(out2)
    assert cont.n_tokens == whole.n_tokens == 21
    assert_close("continued state", whole.ssm, cont.ssm)


def test_mix_methods_from_the_command_line(model_dir, model, tmp_path):
    paths = []
    for i, t in enumerate(["Q: a\nA: A\n", "Q: b\nA: B\n", "Q: c\nA: C\n"]):
        p = tmp_path / f"{i}.safetensors"
        ok("encode", model_dir, "-t", t, "-o", p)
        paths.append(p)
    states = [load_state(p) for p in paths]
    out = tmp_path / "w.safetensors"
    r = ok("mix", *paths, "--method", "weighted", "--weights", "0.5,0.25,0.25", "-o", out, "--json")
    assert json.loads(r.output)["method"] == "weighted"
    assert_close("weighted", mix(states, "weighted", [0.5, 0.25, 0.25]).ssm, load_state(out).ssm)
    assert json.loads(read_metadata(out)["extra"])["mix"]["method"] == "weighted"
    ok("mix", *paths, "--method", "adecay", "--model", model_dir, "-o", out)
    assert_close("adecay", mix(states, "adecay", A=model.decay_A()).ssm, load_state(out).ssm)
    ok("mix", *paths[:2], "--method", "layers", "--base", paths[2], "--layers", "1", "--weights", "1,0", "-o", out)
    got = load_state(out)
    assert torch.equal(got.ssm[0], states[2].ssm[0]) and torch.equal(got.ssm[1], states[0].ssm[1])
    ok("mix", *paths, "-m", "softmax_topk", "--scores", "0.9,0.1,0.2", "--temperature", "0.05", "-k", "1", "-o", out)
    assert_close("top-1", states[0].ssm, load_state(out).ssm)


def test_generate_and_score_from_a_state(model_dir, model, tmp_path):
    sp = tmp_path / "skill.safetensors"
    ok("encode", model_dir, "-t", "Q: cat\nA: CAT\n\n", "-o", sp)
    r = ok("generate", model_dir, "--state", sp, "--prompt", "Q: dog\nA:", "-n", "6", "--json", "--no-stop-at-eos")
    info = json.loads(r.output)
    want, _, _ = model.generate(byte_ids("Q: dog\nA:"), 6, state=load_state(sp))
    assert info["token_ids"] == want[0].tolist()
    assert info["n_tokens"] == len("Q: cat\nA: CAT\n\n") + len("Q: dog\nA:") + 6
    plain = ok("generate", model_dir, "--prompt", "Q: dog\nA:", "-n", "6", "--no-stop-at-eos")
    assert plain.output.strip("\n") == ByteTokenizer().decode(
        [i for i in model.generate(byte_ids("Q: dog\nA:"), 6)[0][0].tolist() if i < 259]
    ).strip("\n")

    r = ok("score", model_dir, "--text", "Q: dog\nA: DOG\n", "--state", sp, "--json")
    info = json.loads(r.output)
    ref = model.score(byte_ids("Q: dog\nA: DOG\n"), state=load_state(sp))
    assert info["n_scored"] == 13 and len(info["tokens"]) == 13
    assert abs(info["perplexity"] - float(ref.perplexity[0])) < 1e-4
    assert_close("logprobs", ref.logprobs[0], torch.tensor([t["logprob"] for t in info["tokens"]]))
    human = ok("score", model_dir, "--text", "Q: dog\nA: DOG\n")
    assert human.output.startswith("perplexity ")


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["encode", "{m}", "-o", "{t}/x.safetensors"], "exactly one of --text or --file", 2),
        (["encode", "{t}/nope", "-t", "a", "-o", "{t}/x.safetensors"], "neither an existing directory", 1),
        (["mix", "{t}/missing.safetensors", "-o", "{t}/x.safetensors"], "does not exist", 1),
        (["mix", "{s}", "-o", "{t}/x.safetensors", "-m", "blend"], "unknown mixing method 'blend'", 2),
        (["mix", "{s}", "{s}", "-o", "{t}/x.safetensors", "-m", "adecay"], "needs --model", 2),
        (["mix", "{s}", "{s}", "-o", "{t}/x.safetensors", "--weights", "1,x"], "comma-separated numbers", 2),
        (["mix", "{s}", "{s}", "-o", "{t}/x.safetensors", "--weights", "1,2,3"], "weights must have shape", 2),
        (["mix", "{s}", "-o", "{t}/x.safetensors", "-m", "sum", "--scores", "1"], "takes no --scores", 2),
        (["generate", "{m}", "--prompt", ""], "--prompt is empty", 1),
        (["score", "{m}", "--text", "a"], "at least 2 tokens", 1),
        (["score", "{m}", "--text", "ab", "--state", "{t}/corrupt.safetensors"], "truncated", 1),
    ],
    ids=[
        "no-text", "no-model", "missing-state", "unknown-method", "adecay-no-model", "bad-weights",
        "weights-length", "option-not-taken", "empty-prompt", "short-score", "corrupt-state",
    ],
)  # fmt: skip
def test_errors_are_one_line(model_dir, model, tmp_path, args, message, code):
    s = tmp_path / "s.safetensors"
    save_state(model.encode(byte_ids("hello")), s)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x01\x00")
    r = run(*[a.format(m=model_dir, t=tmp_path, s=s) for a in args])
    assert r.exit_code == code, r.output  # 2: a usage error, 1: a runtime error (statelab.cli.common)
    assert message in r.output, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x.safetensors").exists()


def test_a_state_of_another_model_is_refused(model_dir, tmp_path):
    torch.manual_seed(1)
    other = Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=ByteTokenizer.vocab_size, d_state=4)).eval()
    p = tmp_path / "other.safetensors"
    save_state(other.encode(byte_ids("hi")), p)
    r = run("generate", model_dir, "--state", p, "--prompt", "x")
    assert r.exit_code == 1 and "state was made by model" in r.output


@pytest.mark.parametrize("cmd", ["encode", "mix", "generate", "score"])
def test_help_has_an_example(cmd):
    r = ok(cmd, "--help")
    assert "Example: statelab " + cmd in r.output


def test_mix_help_names_every_method():
    from statelab.state.mix import MIX_METHODS

    text = " ".join(ok("mix", "--help").output.split())
    assert all(name in text for name in MIX_METHODS), text


# ---- --tokenizer: a mamba_ssm checkpoint ships no tokenizer files ---------------------------------------------
@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from tests.models.test_tokenizer import write_byte_level_bpe

    return write_byte_level_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def mamba_ssm_dir(tmp_path_factory, bpe_dir):
    """A tiny Mamba-1 in mamba_ssm format (config.json + pytorch_model.bin, no tokenizer) sized for the BPE."""
    from statelab.models.tokenizer import load_tokenizer

    vocab = load_tokenizer(bpe_dir).vocab_size
    torch.manual_seed(2)
    c = Mamba1Config(d_model=16, n_layer=2, vocab_size=vocab, d_state=4, pad_vocab_size_multiple=8)
    m = Mamba1LM(c).eval()
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in m.hf_state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # mamba_ssm state dicts carry the tied head
    d = tmp_path_factory.mktemp("mamba_ssm")
    torch.save(sd, d / "pytorch_model.bin")
    cfg = {"d_model": 16, "d_intermediate": 0, "n_layer": 2, "vocab_size": vocab, "attn_layer_idx": [],
           "ssm_cfg": {"layer": "Mamba1", "d_state": 4}, "rms_norm": True, "residual_in_fp32": True,
           "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "args",
    [["encode", "-t", "hello", "-o", "{t}/x.safetensors"], ["generate", "-p", "hello"], ["score", "-t", "hello"]],
    ids=["encode", "generate", "score"],
)
def test_without_tokenizer_files_the_error_names_the_option(mamba_ssm_dir, tmp_path, args):
    r = run(args[0], mamba_ssm_dir, *[a.format(t=tmp_path) for a in args[1:]])
    assert r.exit_code == 1, r.output
    assert "has no tokenizer files" in r.output and "--tokenizer" in r.output, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x.safetensors").exists()


def test_tokenizer_option_equals_the_python_api(mamba_ssm_dir, bpe_dir, tmp_path):
    from statelab.models.loading import load_model
    from statelab.models.tokenizer import load_tokenizer

    m, tok = load_model(mamba_ssm_dir), load_tokenizer(bpe_dir)
    text = "Hello world, state soup!\n"
    ids = torch.tensor([tok.encode(text)])
    out = tmp_path / "s.safetensors"
    r = ok("encode", mamba_ssm_dir, "--tokenizer", bpe_dir, "-t", text, "-o", out, "--json")
    assert json.loads(r.output)["tokens_read"] == ids.shape[1] < len(text)  # BPE merges, not bytes
    assert load_state(out, m).equal(m.encode(ids))
    meta = read_metadata(out)
    assert json.loads(meta["token_ids"]) == ids[0].tolist() and meta["tokenizer_hash"] == tok.fingerprint

    r = ok("generate", mamba_ssm_dir, "--tokenizer", bpe_dir, "-p", text, "-n", "5", "--no-stop-at-eos", "--json")
    assert json.loads(r.output)["token_ids"] == m.generate(ids, 5).tokens[0].tolist()
    r = ok("score", mamba_ssm_dir, "--tokenizer", bpe_dir, "-t", text, "--state", out, "--json")
    ref = m.score(ids, state=m.encode(ids))
    assert abs(json.loads(r.output)["perplexity"] - float(ref.perplexity[0])) < 1e-4

    # 'byte' and a tokenizer.json file are accepted too
    ok("encode", mamba_ssm_dir, "--tokenizer", "byte", "-t", text, "-o", out)
    assert load_state(out, m).equal(m.encode(byte_ids(text)))
    ok("encode", mamba_ssm_dir, "--tokenizer", bpe_dir / "json" / "tokenizer.json", "-t", text, "-o", out)
    assert load_state(out, m).equal(m.encode(ids))


def test_a_tokenizer_larger_than_the_model_is_refused(model_dir, bpe_dir, tmp_path):
    r = run("encode", model_dir, "--tokenizer", bpe_dir, "-t", "hello", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 1 and "embeds only 259" in r.output and "--tokenizer" in r.output, r.output
    assert not (tmp_path / "x.safetensors").exists()
    r = run("score", model_dir, "--tokenizer", tmp_path / "nowhere", "-t", "hello")
    assert r.exit_code == 1 and "does not exist" in r.output, r.output


def test_every_text_command_shares_one_tokenizer_option():
    import typer

    root = typer.main.get_command(app)
    commands = [["encode"], ["generate"], ["score"], ["soup", "run"]]
    found = []
    for path in commands:
        cmd = root
        for name in path:
            cmd = cmd.commands[name]
        (param,) = [p for p in cmd.params if p.name == "tokenizer"]
        found.append((tuple(param.opts), param.help, param.default))
    assert len(set(found)) == 1 and found[0][0] == ("--tokenizer",) and found[0][2] is None, found


def test_soup_run_reads_the_tokenizer_option(model_dir, tmp_path):
    out = f"out_dir={json.dumps(str(tmp_path))}"
    r = run("soup", "run", "--model", model_dir, "--tokenizer", tmp_path / "nowhere", out, "progress=false")
    assert r.exit_code == 1 and "nowhere does not exist" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


# ---- mix from store entries ----------------------------------------------------------------------------------
def test_mix_takes_store_entries_besides_files(model_dir, model, tmp_path, monkeypatch):
    from statelab.state.store import StateStore

    texts = ["Q: a\nA: A\n", "Q: b\nA: B\n", "Q: c\nA: C\n"]
    states = [model.encode(byte_ids(t)) for t in texts]
    store = StateStore(tmp_path / "skills")
    for i, s in enumerate(states[:2]):
        store.add(s, name=f"upper/{i}", task="upper")
    f = tmp_path / "c.safetensors"
    states[2].save(f)
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for p, s in zip(files, states, strict=False):
        s.save(p)
    by_files, by_store = tmp_path / "files.safetensors", tmp_path / "store.safetensors"
    ok("mix", *files, f, "-m", "adecay", "--model", model_dir, "-o", by_files)
    r = ok("mix", "upper/0", "upper/1", f, "-s", store.path, "-m", "adecay", "--model", model_dir, "-o", by_store,
           "--json")  # fmt: skip
    assert json.loads(r.output)["inputs"] == 3
    assert load_state(by_store).equal(load_state(by_files)), "an entry mixes exactly like its state file"
    record = json.loads(read_metadata(by_store)["extra"])["mix"]
    assert record["inputs"] == ["upper/0", "upper/1", str(f)] and record["store"] == str(store.path)
    # an entry as --base; an entry id
    ok("mix", "upper/0", "upper/1", "-s", store.path, "-m", "layers", "--base", "2", "--layers", "1", "-o", by_store)
    got = load_state(by_store)
    mean_1 = (states[0].ssm[1] + states[1].ssm[1]) / 2
    assert torch.equal(got.ssm[0], states[1].ssm[0]) and torch.equal(got.ssm[1], mean_1)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "upper").mkdir()
    states[2].save(tmp_path / "upper" / "0")  # a file with an entry's name
    r = run("mix", "upper/0", "upper/1", "-s", store.path, "-o", by_store)
    assert r.exit_code == 2 and "both an entry" in r.output and "./upper/0" in r.output, r.output
    ok("mix", "./upper/0", "upper/1", "-s", store.path, "-o", by_store)  # ./ means the file
    assert_close("mean", mix([states[2], states[1]], "mean").ssm, load_state(by_store).ssm)
    r = run("mix", "upper/9", "upper/1", "-s", store.path, "-o", by_store)
    assert r.exit_code == 1 and "'upper/9' is neither an entry of" in r.output, r.output
    r = run("mix", "upper/0", "-s", tmp_path / "nowhere", "-o", by_store)
    assert r.exit_code == 1 and "does not exist" in r.output and not (tmp_path / "nowhere").exists(), r.output
    other = Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=ByteTokenizer.vocab_size, d_state=4))
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    r = run("mix", "upper/1", "-s", store.path, "--model", other_dir, "-o", by_store)
    assert r.exit_code == 1 and "was made by model" in r.output and len(r.output.strip().splitlines()) == 1, r.output
