"""The State Soup experiment end to end on a tiny random Hugging Face Mamba checkpoint, and its scoring primitive."""

import json

import pytest
import torch
from typer.testing import CliRunner

from statelab.errors import ConfigError
from statelab.experiments.soup import ICL_METHODS, Prompter, exact_match, load_soup_config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from statelab.models.tokenizer import ByteTokenizer

    d = tmp_path_factory.mktemp("hf_tiny")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = transformers.MambaConfig(
            vocab_size=259, hidden_size=16, state_size=4, num_hidden_layers=3, expand=2, conv_kernel=4
        )
        transformers.MambaForCausalLM(cfg).save_pretrained(d)
    ByteTokenizer().save(d)
    return d


TINY = [
    "tasks=['uppercase', 'first_letter', 'reverse']",
    "library_sets=2",
    "library_shots=3",
    "retrieval_shots=[1, 2]",
    "retrieval_queries=2",
    "icl_shots=1",
    "icl_items=2",
    "icl_prompts=2",
    "composition_sequences=2",
    "composition_chunks=2",
    "composition_chunk_tokens=12",
    "composition_continuation_tokens=16",
    "cross_pairs=[['uppercase', 'first_letter'], ['uppercase', 'no_such_task']]",
    "cross_items=2",
    "progress=false",
]


def test_soup_cli_runs_on_a_hf_checkpoint(hf_dir, tmp_path):
    from statelab.cli import app

    args = ["soup", "run", "--model", str(hf_dir), f"out_dir={json.dumps(str(tmp_path))}", "name=tiny", *TINY]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "tiny"
    res = json.loads((run / "results.json").read_text())
    assert res["tasks"] == ["uppercase", "first_letter", "reverse"]
    assert set(res["retrieval_by_k"]) == {"1", "2"}
    assert set(res["retrieval_by_layer"]) == {"0", "1", "2"}
    assert res["layers_default"] == [1]  # middle third of 3 layers
    for v in res["retrieval_by_k"].values():
        assert v in (0.0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0)  # 3 tasks x 2 queries
    assert set(res["icl_mean"]) == set(ICL_METHODS)
    assert all(0.0 <= v <= 1.0 for v in res["icl_mean"].values())
    comp = res["composition"]
    assert set(comp) == {"full pass", "adecay", "adecay (conv context)", "mean", "last chunk", "no context"}
    assert all(v > 1.0 for v in comp.values())
    assert res["composition_scored_tokens"] >= 2
    assert [c["pair"] for c in res["cross"]] == [["uppercase", "first_letter"]]  # the pair with an absent task skipped
    for png in ("retrieval_vs_k.png", "accuracy_by_method.png", "library_pca.png", "composition.png"):
        assert (run / png).stat().st_size > 1000, png
    report = (run / "report.md").read_text()
    headings = ("## Retrieval", "## Few-shot accuracy", "## Ordered composition", "## Cross-task mixing")
    for heading in headings:
        assert heading in report
    # a user's checkpoint is not judged against the embedded demo's targets
    assert "## Targets" not in report and "met" not in result.output
    assert json.loads((run / "config.json").read_text())["library_shots"] == 3
    from statelab.state.store import StateStore

    store = StateStore(run / "library")
    assert len(store) == 6 and {e.task for e in store.list()} == set(res["tasks"])
    assert "retrieval top-1" in result.output


def test_exact_match_agrees_with_greedy_generation(hf_dir):
    from statelab.models.loading import load_model
    from statelab.models.tokenizer import load_tokenizer

    model = load_model(hf_dir).eval()
    tok = load_tokenizer(hf_dir)
    prefix = model.encode(torch.tensor([tok.encode("Q: cat\nA: CAT\n\n")]))
    items = []
    for word in ("dog", "sunflower", "a"):
        q = tok.encode(f"Q: {word}\nA: ")
        gen, _, _ = model.generate(torch.tensor([q]), max_new_tokens=3, state=prefix)
        items.append((q, gen[0].tolist()))
    # the model's own greedy continuation is an exact match; changing its last token breaks it
    assert exact_match(model, prefix, items) == [True, True, True]
    broken = [(q, a[:-1] + [(a[-1] + 1) % 256]) for q, a in items]
    assert exact_match(model, prefix, broken) == [False, False, False]
    # right padding in a batch changes nothing: batched == one by one
    assert exact_match(model, prefix, items + broken) == [exact_match(model, prefix, [it])[0] for it in items + broken]


def test_prompter_splits_the_template():
    from statelab.models.tokenizer import ByteTokenizer

    p = Prompter("Q: {x}\nA: {y}\n\n", ByteTokenizer())
    assert p.demos([("cat", "CAT")]) == "Q: cat\nA: CAT\n\n"
    assert p.query("dog") == "Q: dog\nA: " and p.answer("DOG") == "DOG\n"
    q, a = p.item("dog", "DOG")
    assert bytes(q + a) == b"Q: dog\nA: DOG\n"
    with pytest.raises(ConfigError):
        Prompter("{y} then {x}", ByteTokenizer())


@pytest.mark.parametrize(
    "override, message",
    [
        ("library_sets=0", "library_sets"),
        ("retrieval_shots=[]", "retrieval_shots"),
        ("query_weight=2.0", "query_weight"),
        ("template='no fields'", "template"),
        ("nonsense=1", "unknown config key"),
        ("icl_items=many", "expected an integer"),
    ],
)
def test_bad_soup_configs(override, message):
    with pytest.raises(ConfigError, match=message):
        load_soup_config(None, [override])


def test_unknown_task_is_named(hf_dir, tmp_path):
    from statelab.experiments.soup import load_task_data

    with pytest.raises(ConfigError, match="no_such_task"):
        load_task_data(load_soup_config(None, ["tasks=['uppercase', 'no_such_task']"]))


def test_soup_run_with_a_users_jsonl_task(hf_dir, tmp_path, monkeypatch):
    """A JSONL file of {"input", "output"} pairs is a task beside the built-in ones; the report names the file and
    judges nothing against the demo's targets."""
    from statelab.cli import app
    from statelab.experiments.soup import load_task_data
    from statelab.tasks.user import load_jsonl_task, task_file_digest

    words = ["cat", "dog", "sun", "sea", "tree", "book", "lamp", "road", "milk", "hand", "door", "bird", "fish"]
    words += ["rain", "snow", "wind", "leaf", "rock", "sand", "star", "moon", "ship", "coin", "bell", "rope"]
    task_file = tmp_path / "shout.jsonl"
    task_file.write_text("\n".join(json.dumps({"input": w, "output": w.upper() + "!"}) for w in words) + "\n")
    monkeypatch.chdir(tmp_path)  # relative task files are read from the working directory
    tiny = [a for a in TINY if not a.startswith("tasks=")] + ["tasks=['shout.jsonl', 'uppercase', 'reverse']"]
    args = ["soup", "run", "--model", str(hf_dir), f"out_dir={json.dumps(str(tmp_path))}", "name=user", *tiny]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "user" / "results.json").read_text())
    assert res["tasks"] == ["shout", "uppercase", "reverse"]
    data = {t.name: t for t in load_task_data(load_soup_config(None, tiny))}
    task = load_jsonl_task(task_file)
    assert set(data["shout"].train) == set(task.pool("train")) and set(data["shout"].test) == set(task.pool("test"))
    assert not set(data["shout"].train) & set(data["shout"].test)
    from statelab.state.store import StateStore

    assert {e.task for e in StateStore(tmp_path / "user" / "library").list()} == {"shout", "uppercase", "reverse"}
    report = (tmp_path / "user" / "report.md").read_text()
    assert "## Targets" not in report and "met" not in result.output
    assert f"`shout.jsonl`: sha256 `{task_file_digest(task_file)[:16]}`" in report


def test_task_files_in_the_config_are_checked(tmp_path, monkeypatch):
    from statelab.experiments.soup import load_task_data, uses_demo_targets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "uppercase.jsonl").write_text('{"input": "a", "output": "A"}\n')
    (tmp_path / "bad.jsonl").write_text('{"input": "a", "output": "A"}\n{"input": "a", "output": "B"}\n')
    with pytest.raises(ConfigError, match="does not exist"):
        load_task_data(load_soup_config(None, ["tasks=['missing.jsonl', 'reverse']"]))
    with pytest.raises(ConfigError, match="named \\['uppercase'\\]"):
        load_task_data(load_soup_config(None, ["tasks=['uppercase.jsonl', 'uppercase']"]))
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        load_task_data(load_soup_config(None, ["tasks=['bad.jsonl', 'reverse']"]))
    assert uses_demo_targets(load_soup_config(None, []))
    assert not uses_demo_targets(load_soup_config(None, ["model='some/dir'"]))
    assert not uses_demo_targets(load_soup_config(None, ["tasks=['uppercase.jsonl', 'reverse']"]))
