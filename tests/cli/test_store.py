import json

import pytest
import torch
from typer.testing import CliRunner

from statelab.cli import app
from statelab.state.core import State
from statelab.state.io import load_state, save_state
from statelab.state.store import StateStore

FP = "ab" * 32
runner = CliRunner()


def task_state(task, seed, fp=FP):
    base = torch.randn(6, 1, 8, 4, generator=torch.Generator().manual_seed(100 + task))
    g = torch.Generator().manual_seed(seed)
    return State(
        arch="mamba1", ssm=base + 0.3 * torch.randn(6, 1, 8, 4, generator=g), conv=torch.randn(6, 1, 8, 3, generator=g),
        sum_delta=torch.rand(6, 1, 8, generator=g), n_tokens=12, fingerprint=fp,
    )  # fmt: skip


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture
def files(tmp_path):
    paths = {}
    for task in range(3):
        for seed in range(2):
            p = tmp_path / f"t{task}-{seed}.safetensors"
            save_state(task_state(task, 10 * task + seed), p, prompt=f"prompt {task}/{seed}")
            paths[(task, seed)] = p
    return paths


def test_add_list_show_get_rm(tmp_path, files):
    store = tmp_path / "store"
    for (task, seed), p in files.items():
        r = run("store", "add", p, "--name", f"t{task}-{seed}", "--task", f"t{task}", "--tag", "demo", "--shots", 4,
                "--store", store)  # fmt: skip
        assert r.exit_code == 0, r.output
    r = run("store", "list", "--store", store, "--task", "t1", "--json")
    assert r.exit_code == 0 and [e["name"] for e in json.loads(r.output)] == ["t1-0", "t1-1"]
    r = run("store", "list", "--store", store)
    assert r.exit_code == 0 and "t2-1" in r.output
    r = run("store", "show", "t0-1", "--store", store, "--json")
    shown = json.loads(r.output)
    assert shown["prompt"] == "prompt 0/1" and shown["shots"] == 4 and shown["tags"] == ["demo"]
    out = tmp_path / "out.safetensors"
    assert run("store", "get", "t0-1", out, "--store", store).exit_code == 0
    assert load_state(out).equal(task_state(0, 1))
    r = run("store", "rm", "t0-1", "t0-0", "--store", store, "--json")
    assert json.loads(r.output) == {"removed": ["t0-1", "t0-0"]}
    assert len(StateStore(store)) == 4


def test_search_check_export_import(tmp_path, files, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("STATELAB_STORE", str(store))
    for (task, seed), p in files.items():
        assert run("store", "add", p, "-n", f"t{task}-{seed}", "--task", f"t{task}").exit_code == 0
    query = tmp_path / "q.safetensors"
    save_state(task_state(2, 999), query)
    for index in ("exact", "sketch", "faiss", "usearch"):
        r = run("search", query, "-k", 2, "--index", index, "--json")
        assert r.exit_code == 0, r.output
        assert [h["task"] for h in json.loads(r.output)] == ["t2", "t2"]
    r = run("search", query, "-k", 2, "--layers", "0,1")
    assert r.exit_code == 0 and "t2-" in r.output
    r = run("search", query, "--threshold", 1.5)
    assert r.exit_code == 0 and "no match" in r.output
    r = run("store", "check", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True
    assert run("store", "export", tmp_path / "a.tar").exit_code == 0
    r = run("store", "import", tmp_path / "a.tar", "--store", tmp_path / "copy", "--json")
    assert r.exit_code == 0 and len(json.loads(r.output)["imported"]) == 6


def test_errors_are_one_line_and_exit_1(tmp_path, files):
    store = tmp_path / "store"
    p = files[(0, 0)]
    assert run("store", "add", p, "-n", "a", "-s", store).exit_code == 0
    assert run("store", "init", "-s", tmp_path / "empty").exit_code == 0
    cases = [
        (("store", "add", p, "-n", "a", "-s", store), "already has an entry named 'a'"),
        (("store", "add", tmp_path / "missing.safetensors", "-n", "b", "-s", store), "does not exist"),
        (("store", "show", "nope", "-s", store), "no entry named 'nope'"),
        (("search", p, "-s", tmp_path / "empty"), "is empty"),
        (("search", p, "-s", tmp_path / "emtpy"), "no state store at"),
        (("search", p, "-s", store, "--index", "annoy"), "unknown index"),
        (("store", "import", tmp_path / "missing.tar", "-s", store), "cannot read archive"),
    ]
    for args, message in cases:
        r = run(*args)
        assert r.exit_code == 1, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
        assert "Traceback" not in r.output
    r = run("search", p, "-s", store, "--layers", "x")  # a usage error
    assert r.exit_code == 2 and r.output.strip() == "error: --layers must be comma-separated integers, got 'x'"
    blob = next((store / "blobs").glob("*/*.safetensors"))
    blob.write_bytes(blob.read_bytes()[:-10])
    r = run("store", "check", "-s", store)
    assert r.exit_code == 1 and "PROBLEMS" in r.output
    r = run("store", "check", "--repair", "-s", store)
    assert r.exit_code == 0 and "dropped entries ['a']" in r.output


@pytest.mark.parametrize(
    "command", [("store", "add"), ("store", "list"), ("store", "show"), ("store", "get"), ("store", "rm"),
                ("store", "check"), ("store", "export"), ("store", "import"), ("search",)]
)  # fmt: skip
def test_every_help_has_an_example(command):
    r = run(*command, "--help")
    assert r.exit_code == 0 and "Example: statelab " + " ".join(command) in " ".join(r.output.split())


# ---- ingest, search by text: a tiny byte-level model of each architecture -------------------------------------
def _save_model(d, arch):
    from statelab.models.mamba1 import Mamba1Config, Mamba1LM
    from statelab.models.mamba2 import Mamba2Config, Mamba2LM
    from statelab.models.tokenizer import ByteTokenizer

    V = ByteTokenizer.vocab_size
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if arch == "mamba1":
            m = Mamba1LM(Mamba1Config(d_model=16, n_layer=3, vocab_size=V, d_state=4))
        else:
            m = Mamba2LM(Mamba2Config(vocab_size=V, d_model=16, n_layer=3, d_state=8, head_dim=8, n_groups=1))
    m.save_pretrained(d)
    ByteTokenizer().save(d)
    return d


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def model_dir(request, tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp(request.param), request.param)


PROMPTS = [
    {"name": "upper-a", "prompt": "Q: cat\nA: CAT\n\nQ: dog\nA: DOG\n\n", "task": "upper", "tags": ["case", "demo"]},
    {"name": "upper-b", "prompt": "Q: sun\nA: SUN\n\n", "task": "upper", "description": "one shot", "shots": 1},
    {"name": "lower-a", "prompt": "Q: CAT\nA: cat\n\nQ: SEA\nA: sea\n\nQ: RED\nA: red\n\n", "task": "lower"},
    {"name": "x", "prompt": "x"},
    {"name": "long", "prompt": "Q: tree\nA: TREE\n\n" * 12, "task": "upper", "tags": ["long"]},
]


def _jsonl(path, objs, blank_line=True):
    lines = [json.dumps(o) for o in objs]
    if blank_line:
        lines.insert(2, "   ")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_ingest_equals_adding_each_encoded_prompt(tmp_path, model_dir):
    """Same entries and states as StateStore.add of model.encode, prompt by prompt (states at fp32 round-off:
    the batched pass groups rows into one matrix product; token counts and metadata exact)."""
    from statelab.models.loading import load_model
    from statelab.models.tokenizer import ByteTokenizer
    from statelab.testing import assert_close

    f = _jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    store = tmp_path / "bulk"
    r = run("store", "ingest", f, "-s", store, "--model", model_dir, "--batch-tokens", 64, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["added"] == 5 and info["names"] == [p["name"] for p in PROMPTS]
    assert info["tokens"] == sum(len(p["prompt"].encode()) for p in PROMPTS)
    m, tok = load_model(model_dir), ByteTokenizer()
    one, bulk = StateStore(tmp_path / "one"), StateStore(store)
    for p in PROMPTS:
        state = m.encode(torch.tensor([tok.encode(p["prompt"])]))
        fields = {k: v for k, v in p.items() if k not in ("name", "prompt")}
        want = one.add(state, name=p["name"], prompt=p["prompt"], **fields).to_dict()
        got = bulk.entry(p["name"]).to_dict()
        for key in ("id", "created", "blob", "nbytes"):  # the blob hashes the state's bytes: round-off differs
            want.pop(key), got.pop(key)
        assert got == want, p["name"]
        s = bulk.get(p["name"], m)
        for part in ("ssm", "conv", "sum_delta"):
            assert_close(f"{p['name']}.{part}", getattr(state, part), getattr(s, part))
        assert s.tokens == state.tokens
    r = run("store", "ingest", _jsonl(tmp_path / "more.jsonl", [{"name": "y", "prompt": "yy"}]), "-s", store,
            "--model", model_dir)  # fmt: skip
    assert r.exit_code == 0 and "added 1 entries" in r.stdout and "tok/s" in r.stdout, r.output
    assert bulk.check().ok and len(bulk) == 6


def _bad_files():
    ok = [json.dumps(p) for p in PROMPTS[:2]]
    return [
        ("json", [*ok, '{"name": "a", "prompt": '], "line 3: invalid JSON"),
        ("no-prompt", [*ok, '{"name": "a"}'], "line 3: no 'prompt'; every line needs a name and a prompt"),
        ("no-name", [*ok, '{"prompt": "a"}'], "line 3: no 'name'"),
        ("not-object", [*ok, '["a", "b"]'], "line 3: expected a JSON object"),
        ("duplicate", [*ok, '{"name": "upper-a", "prompt": "b"}'], "line 3: name 'upper-a' is already used on line 1"),
        ("tags-type", [*ok, '{"name": "a", "prompt": "b", "tags": "x"}'], "line 3: 'tags' must be a list"),
        ("tag-type", [*ok, '{"name": "a", "prompt": "b", "tags": ["x", 3]}'], "line 3: 'tags' must be a list of non-"),
        ("task-type", [*ok, '{"name": "a", "prompt": "b", "task": 7}'], "line 3: 'task' must be a str"),
        ("prompt-type", [*ok, '{"name": "a", "prompt": ["b"]}'], "line 3: 'prompt' must be a str"),
        ("empty-prompt", [*ok, '{"name": "a", "prompt": ""}'], "line 3: 'prompt' is empty"),
        ("unknown-key", [*ok, '{"name": "a", "prompt": "b", "tag": "x"}'], "line 3: unknown key(s) ['tag']"),
        ("shots", [*ok, '{"name": "a", "prompt": "b", "shots": -2}'], "line 3: 'shots' must be >= 0"),
        ("in-store", [*ok, '{"name": "old", "prompt": "b"}'], "line 3: store"),
        ("empty-file", ["", "  "], "holds no prompts"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _bad_files(), ids=lambda c: c[0])
def test_ingest_bad_file_is_one_line_and_adds_nothing(tmp_path, case):
    from statelab.models.loading import load_model

    name, lines, message = case
    model_dir = _save_model(tmp_path / "m", "mamba1")
    store = tmp_path / "store"
    StateStore(store).add(load_model(model_dir).encode(torch.tensor([[1, 2, 3]])), name="old")
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    r = run("store", "ingest", f, "-s", store, "--model", model_dir)
    assert r.exit_code == 1, r.output
    assert message in r.output and str(f) in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    assert [e.name for e in StateStore(store).list()] == ["old"] and StateStore(store).check().ok


def test_search_by_text_equals_search_by_state_file_and_carries_prompts(tmp_path, model_dir):
    from statelab.models.loading import load_model
    from statelab.models.tokenizer import ByteTokenizer

    store = tmp_path / "s"
    assert (
        run("store", "ingest", _jsonl(tmp_path / "p.jsonl", PROMPTS), "-s", store, "--model", model_dir).exit_code == 0
    )
    text = "Q: box\nA: BOX\n\n"
    query = tmp_path / "q.safetensors"
    load_model(model_dir).encode(torch.tensor([ByteTokenizer().encode(text)])).save(query)
    by_text = run("search", "--text", text, "--model", model_dir, "-s", store, "-k", 3, "--json")
    by_file = run("search", query, "-s", store, "-k", 3, "--json")
    assert by_text.exit_code == 0 and by_file.exit_code == 0, by_text.output + by_file.output
    hits = json.loads(by_text.output)
    assert hits == json.loads(by_file.output) and len(hits) == 3
    prompts = {p["name"]: p["prompt"] for p in PROMPTS}
    assert all(h["prompt"] == prompts[h["name"]] for h in hits)
    table = run("search", "--text", text, "--model", model_dir, "-s", store, "-k", 5)
    assert table.exit_code == 0 and "prompt" in table.output and "Q: cat\\nA: CAT" in table.output, table.output
    # a query file checked against --model
    assert run("search", query, "--model", model_dir, "-s", store, "--json").exit_code == 0


@pytest.mark.parametrize(
    "args, message, code",
    [
        ([], "give a query: a state file, or --text with --model", 2),
        (["{q}", "--text", "x", "--model", "{m}"], "not both", 2),
        (["--text", "x"], "--text needs --model", 2),
        (["{q}", "--tokenizer", "byte"], "--tokenizer only applies to --text", 2),
        (["--text", "", "--model", "{m}"], "--text is empty", 1),
    ],
    ids=["none", "both", "no-model", "tokenizer-without-text", "empty"],
)
def test_search_query_errors(tmp_path, args, message, code):
    m = _save_model(tmp_path / "m", "mamba1")
    q = tmp_path / "q.safetensors"
    save_state(task_state(0, 1), q)
    r = run("search", "-s", tmp_path / "s", *[a.format(q=q, m=m) for a in args])
    assert r.exit_code == code and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_ingest_and_search_share_the_tokenizer_option():
    import typer

    root = typer.main.get_command(app)
    found = []
    for path in (["encode"], ["store", "ingest"], ["search"]):
        cmd = root
        for name in path:
            cmd = cmd.commands[name]
        (param,) = [p for p in cmd.params if p.name == "tokenizer"]
        found.append((tuple(param.opts), param.help, param.default))
    assert len(set(found)) == 1 and found[0][0] == ("--tokenizer",), found
