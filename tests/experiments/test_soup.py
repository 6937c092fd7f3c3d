"""The State Soup experiment end to end on a tiny random Hugging Face Mamba checkpoint, and its scoring primitive."""

import json

import pytest
import torch
from typer.testing import CliRunner

from statelab.errors import ConfigError
from statelab.experiments.soup import ICL_METHODS, load_soup_config

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
    # the retrieval choice: every option validated and tested, the chosen one recorded in the store and used by it
    from statelab.state.retrieval import FEATURES, layer_options

    opts = res["retrieval_options"]
    assert len(opts) == len(layer_options(3)) * len(FEATURES)
    choice = res["retrieval_choice"]
    assert res["layers_default"] == choice["layers"] and choice["feature"] in FEATURES
    best = max(o["validation"] for o in opts)
    chosen = [o for o in opts if (o["layers"], o["feature"]) == (choice["layers"], choice["feature"])]
    assert len(chosen) == 1 and chosen[0]["validation"] == best
    assert chosen[0]["test"] == res["retrieval_by_k"]
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
    recorded = store.retrieval(res["fingerprint"])
    assert list(recorded.layers) == choice["layers"] and recorded.feature == choice["feature"]
    assert "(chosen)" in report and "| validation |" in report
    assert res["threads"]["threads"] >= 1 and res["threads"]["how"] in (
        "measured",
        "no idle core to add (statelab.threads.available_cores)",
    )
    assert "retrieval top-1" in result.output


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


@pytest.fixture(scope="module")
def tiny_runner(hf_dir, tmp_path_factory):
    """A runner on the tiny checkpoint with its library built (TINY config)."""
    from statelab import tasks as suite
    from statelab.experiments.soup import LineProgress, SoupRunner, load_task_data
    from statelab.models.loading import load_model
    from statelab.models.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("runs")
    cfg = load_soup_config(None, [*TINY, f"out_dir={json.dumps(str(out))}", "name=unit"])
    model, tok = load_model(hf_dir).eval(), load_tokenizer(hf_dir)
    runner = SoupRunner(cfg, model, tok, load_task_data(cfg), suite.DEFAULT_TEMPLATE)
    runner.build_library(LineProgress(enabled=False))
    return runner


def test_the_retrieval_choice_never_reads_the_test_queries(tiny_runner):
    """The choice (and its validation table) is the same whatever the test split holds."""
    import dataclasses

    from statelab.experiments.soup import LineProgress, SoupRunner

    r = tiny_runner
    r.choose_retrieval()
    other_tasks = [dataclasses.replace(t, test=tuple(reversed(t.train))[:5]) for t in r.tasks]
    cfg = dataclasses.replace(r.cfg, name="unit2")
    r2 = SoupRunner(cfg, r.model, r.prompter.tokenizer, other_tasks, r.prompter.template)
    r2.build_library(LineProgress(enabled=False))
    r2.choose_retrieval()
    assert r2.choice.validation == r.choice.validation
    assert (r2.choice.layers, r2.choice.feature) == (r.choice.layers, r.choice.feature)
    assert r2.choice.digest == r.choice.digest  # the statistics too
    # store.search with the recorded choice ranks as the bulk scores of the retrieval study do
    from statelab.state.retrieval import per_layer, predict

    queries = r.encode_many(
        [r.prompter.demos(t.test[:2]) for t in r.tasks] + [r.prompter.demos(t.test[2:3]) for t in r.tasks]
    )
    lib, tasks, _ = r._lib_rows()
    bulk = predict(per_layer(lib), tasks, per_layer(queries), r.choice.layers, r.choice.feature)
    assert [r.top1(q)[1] for q in queries] == bulk
    # queries are the library prompts' own prefixes: (tasks x sets) x the k below library_shots
    v_states, v_tasks, v_groups = r.validation
    assert len(v_states) == 3 * 2 * 2 and v_groups[:2] == [0, 0] and v_tasks[0] == r.tasks[0].name


def test_prefix_states_equal_their_prompts_encoded_alone(tiny_runner):
    from statelab.experiments.soup import LineProgress

    r = tiny_runner
    texts = ["Q: cat\nA: CAT\n\nQ: sun\nA: SUN\n\n", "Q: a\nA: A\n\nQ: bb\nA: BB\n\nQ: c\nA: C\n\n"]
    prefixes = [["Q: cat\nA: CAT\n\n"], ["Q: a\nA: A\n\n"]]
    p = LineProgress(enabled=False)
    full, pre = r.encode_with_prefixes(texts, prefixes, p, p.add_task("x", 4))
    alone = r.encode_many(texts + [p[0] for p in prefixes])
    for got, want in zip(full + [pre[0][0], pre[1][0]], alone, strict=True):
        assert got.tokens == want.tokens
        torch.testing.assert_close(got.ssm, want.ssm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.conv, want.conv, atol=1e-5, rtol=1e-5)


def test_skill_then_query_is_the_concatenated_prompt(tiny_runner):
    """ "retrieved skill, then the query" reads the query from the skill's state: the state of skill text + query
    text in one pass (each row from its own start state)."""
    r = tiny_runner
    skills_text = ["Q: cat\nA: CAT\n\n", "Q: dog\nA: g\n\nQ: sun\nA: n\n\n"]
    queries = ["Q: sea\nA: SEA\n\n", "Q: a\nA: a\n\nQ: tree\nA: e\n\n"]
    skills = r.encode_many(skills_text)
    got = r.encode_from(skills, queries)
    want = r.encode_many([a + b for a, b in zip(skills_text, queries, strict=True)])
    for g, w in zip(got, want, strict=True):
        assert g.tokens == w.tokens
        torch.testing.assert_close(g.ssm, w.ssm, atol=1e-5, rtol=1e-5)


def test_line_progress_prints_when_piped(capsys, monkeypatch):
    from statelab.experiments import soup

    clock = iter([0.0, 5.0, 12.0, 13.0])
    monkeypatch.setattr(soup.time, "perf_counter", lambda: next(clock))
    p = soup.LineProgress(every=10.0)
    bar = p.add_task("skill library", total=3)
    p.advance(bar)  # 5 s: too soon for a line
    p.advance(bar)  # 12 s: a line
    p.advance(bar)  # done
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "skill library: 3 to do",
        "skill library: 2/3, 12 s (0.2/s)",
        "skill library: 3/3 in 13.0 s (0.2/s)",
    ]


def test_thread_choice_for_a_run(tiny_runner, monkeypatch):
    import dataclasses

    from statelab.experiments.soup import set_threads

    before = torch.get_num_threads()
    try:
        cfg = tiny_runner.cfg
        assert cfg.threads == 0
        monkeypatch.setenv("STATELAB_THREADS", "1")
        assert set_threads(cfg, tiny_runner.model) == {"threads": 1, "seconds": {}, "how": "STATELAB_THREADS"}
        monkeypatch.delenv("STATELAB_THREADS")
        assert set_threads(dataclasses.replace(cfg, threads=1), tiny_runner.model)["how"] == "config"
        got = set_threads(cfg, tiny_runner.model)
        assert got["how"] in ("measured", "no idle core to add (statelab.threads.available_cores)")
        assert torch.get_num_threads() == got["threads"]
    finally:
        torch.set_num_threads(before)


def test_pick_threads_measures_and_sets(tiny_runner):
    from statelab.experiments.soup import pick_threads

    before = torch.get_num_threads()
    try:
        got = pick_threads(tiny_runner.model, candidates=[1, 2], tokens=64)
        assert set(got["seconds"]) == {"1", "2"} and all(v > 0 for v in got["seconds"].values())
        assert got["threads"] == min((1, 2), key=lambda n: got["seconds"][str(n)])
        assert torch.get_num_threads() == got["threads"]
    finally:
        torch.set_num_threads(before)


def test_missed_targets_say_what_was_measured_against_them():
    from statelab.experiments.soup import ICL_METHODS, SoupResults, targets

    cfg = load_soup_config(None, [])
    icl = dict.fromkeys(ICL_METHODS, 0.5) | {"k-shot prompt": 0.52, "32-shot prompt": 0.56}
    opts = [
        {"layers": [1], "feature": "raw", "validation": 0.8, "test": {"2": 0.84}},
        {"layers": [2], "feature": "unit", "validation": 0.7, "test": {"2": 0.88}},
    ]
    res = SoupResults("m", "f" * 64, ["a", "b"], [1], retrieval_options=opts, retrieval_by_k={"2": 0.84}, icl_mean=icl)
    lines = targets(res, cfg)
    assert (
        lines[0].startswith("retrieval top-1 at k=2 >= 90%: 84.0% (not met); the best option") and "88.0%" in lines[0]
    )
    assert "(not met); the 32-shot prompt itself scores 56.0%, +4.0 points" in lines[1]
    res.retrieval_by_k = {"2": 0.95}
    res.icl_mean = icl | {"likeliest skill, then the query": 0.6}
    lines = targets(res, cfg)
    assert lines[0].endswith("(met)") and lines[1].endswith("(met)")


def test_likeliest_skill_is_the_start_that_best_explains_the_prompt(tiny_runner):
    """ "likeliest skill, then the query": among the top tasks' best entries and no skill, the start under which
    the prompt's own answers are likeliest (each scored alone here), and the prompt read from it."""
    r = tiny_runner
    demos = list(r.tasks[1].train[:2])
    text = r.prompter.demos(demos)
    q = r.encode_many([text])[0]
    got = r.likeliest_then(q, demos)
    firsts: dict[str, str] = {}
    for h in r.store.search(q, k=len(r.store)):
        firsts.setdefault(h.task, h.name)
    starts = [r.store.get(name) for name in list(firsts.values())[: r.cfg.skill_candidates]]
    starts.append(r.model.zero_state(1))
    assert len(starts) == 4  # 3 tasks in the tiny config, all candidates, and no skill
    ids = torch.tensor([r.prompter.ids(text)])
    answers = torch.zeros(ids.shape[1] - 1, dtype=torch.float64)  # positions of the answers and their newline
    for x, y in demos:
        start = text.index(f"A: {y}\n", text.index(f"Q: {x}\n")) + 3
        answers[start - 1 : start - 1 + len(y) + 1] = 1
    scores = [float((r.model.score(ids, st).logprobs[0].double() * answers).sum()) for st in starts]
    best = starts[max(range(len(starts)), key=lambda i: scores[i])]
    want = r.model.encode(ids, state=best)
    assert got.tokens == want.tokens
    torch.testing.assert_close(got.ssm, want.ssm, atol=1e-5, rtol=1e-5)
