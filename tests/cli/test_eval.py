"""``statelab eval FILE.jsonl`` through the statelab CLI: results equal statelab's Python scoring of the same items
(from the zero state, a stored skill and a soup), bad files and options are one-line errors (exit code 2 for a usage
error, 1 for a runtime error: statelab.cli.common)."""

import json

import pytest
import torch
from typer.testing import CliRunner

import statelab
from statelab.cli import app
from statelab.eval.dataset import read_items
from statelab.eval.scoring import GenRequest, encode_pair, generate_until
from statelab.state.store import StateStore

runner = CliRunner()
WORDS = ["lamp", "river", "stone", "green"]


@pytest.fixture(scope="module")
def embedded():
    return statelab.load_model("embedded"), statelab.load_tokenizer("embedded")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = []
    for i, w in enumerate(WORDS):
        rows.append({"prompt": f"Q: {w}\nA: ", "answer": w.upper(), "id": f"gen-{w}"})
        choices = [f" {w}", f" {w.capitalize()}", f" {w.upper()}"]
        rows.append({"context": f"Q: {w}\nA:", "choices": choices, "answer": 2})
        if i == 0:
            rows.append({"context": f"Q: {w}\nA: ", "answer": w.upper()})  # generation with "context"
    f = tmp_path_factory.mktemp("data") / "upper.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows[:5]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[5:]))
    return f


@pytest.fixture(scope="module")
def store(tmp_path_factory, embedded):
    model, tok = embedded
    st = StateStore(tmp_path_factory.mktemp("store") / "skills")
    for name, prompt in [("upper", "Q: bird\nA: BIRD\n\nQ: milk\nA: MILK\n\n"), ("lower", "Q: CAT\nA: cat\n\n")]:
        st.add(model.encode(torch.tensor([tok.encode(prompt)])), name=name, prompt=prompt)
    return st


def run(*args):
    return runner.invoke(app, ["eval", *[str(a) for a in args]])


def run_json(*args):
    limit = () if "--max-new-tokens" in args else ("--max-new-tokens", "8")  # answers are one short word
    r = run(*args, "--json", *limit)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@torch.no_grad()
def _plain_ll(model, tok, context, continuation, state):
    ctx, cont = encode_pair(tok, context, continuation)
    logits, _ = model(torch.tensor([ctx + cont]), state=state)
    logp = torch.log_softmax(logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def _check(result, items, model, tok, state):
    """Every item's output == statelab's Python scoring of that item alone from ``state``; metrics recomputed."""
    by_line = {r["line"]: r for r in result["items"]}
    assert sorted(by_line) == [it.line for it in items]
    gen_hits = acc = 0
    for it in items:
        r = by_line[it.line]
        assert r["kind"] == it.kind
        if it.kind == "generation":
            (alone,) = generate_until(model, tok, [(it.context, GenRequest(("\n",), 8))], state=state)
            assert r["output"] == alone
            assert r["correct"] == (alone.strip() == it.answer)
            gen_hits += r["correct"]
        else:
            want = [_plain_ll(model, tok, it.context, c, state) for c in it.choices]
            assert r["loglikelihoods"] == pytest.approx(want, rel=1e-5, abs=1e-4)
            assert r["prediction"] == max(range(len(want)), key=want.__getitem__)
            acc += r["correct"]
    n_gen = sum(it.kind == "generation" for it in items)
    assert result["generation"] == {"items": n_gen, "correct": gen_hits, "exact_match": gen_hits / n_gen}
    assert result["multiple_choice"]["acc"] == acc / len(WORDS)
    assert result["multiple_choice"]["chance"] == pytest.approx(1 / 3)
    return result["multiple_choice"]["acc"], result["generation"]["exact_match"]


def test_zero_state_skill_and_soup_equal_python_scoring(data, store, embedded):
    model, tok = embedded
    items = read_items(data)
    assert [it.line for it in items] == [1, 2, 3, 4, 5, 7, 8, 9, 10]  # line 6 is blank
    zero = run_json(data, "--model", "embedded", "--no-progress")
    assert zero["skill"] is None and zero["items"][0]["id"] == "gen-lamp"
    acc0, em0 = _check(zero, items, model, tok, None)

    skill = run_json(data, "--model", "embedded", "--skill", "upper", "-s", store.path)
    acc1, em1 = _check(skill, items, model, tok, store.get("upper", model))
    assert skill["skill"] == "upper"
    assert (acc1, em1) > (acc0, em0)  # two uppercase demonstrations in the state help

    soup = run_json(
        data, "--model", "embedded", "--soup", "upper", "--soup", "lower", "--mix", "weighted", "--weights",
        "0.7,0.3", "-s", store.path,
    )  # fmt: skip
    mixed = statelab.mix([store.get("upper"), store.get("lower")], "weighted", [0.7, 0.3])
    _check(soup, items, model, tok, mixed)
    assert soup["soup"] == ["upper", "lower"] and soup["mix"] == "weighted"
    assert run_json(data, "--model", "embedded", "--soup", "upper+lower", "-s", store.path)["soup"] == [
        "upper",
        "lower",
    ]


def test_table_and_generation_options(data, store, embedded):
    r = run(data, "--model", "embedded", "--skill", "upper", "-s", store.path, "--no-progress")
    assert r.exit_code == 0, r.output
    for text in ("exact match", "acc_norm", "chance", "skill upper", "items/s"):
        assert text in r.stdout
    model, tok = embedded
    # a stop string and a token limit of our own
    res = run_json(data, "--model", "embedded", "--stop", "A", "--max-new-tokens", "3")
    first = read_items(data)[0]
    (alone,) = generate_until(model, tok, [(first.context, GenRequest(("A",), 3))])
    assert res["items"][0]["output"] == alone and res["stop"] == ["A"] and len(tok.encode(alone)) <= 3
    # the byte tokenizer named explicitly is the embedded model's own: the same results
    again = run_json(data, "--model", "embedded", "--tokenizer", "byte", "--stop", "A", "--max-new-tokens", "3")
    assert again["items"] == res["items"]


BAD_FILES = [
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n', ":2: invalid JSON"),
    ('["a", "b"]\n', ":1: an item is a JSON object"),
    ('{"prompt": "a"}\n', ":1: a generation item needs 'answer'"),
    ('{"prompt": "a", "context": "b", "answer": "c"}\n', "exactly one of 'prompt' or 'context'"),
    ('{"prompt": "a", "answr": "c"}\n', "unknown key(s) ['answr']"),
    ('{"prompt": "a", "answer": 3}\n', "must be a string"),
    ('\n{"context": "a", "choices": [" x", " y"], "answer": 2}\n', ":2: answer must be the index"),
    ('{"context": "a", "choices": [" x", " y"], "answer": true}\n', "answer must be the index"),
    ('{"context": "a", "choices": " x", "answer": 0}\n', "choices must be a list of at least 2"),
    ('{"context": "a", "choices": [" x", ""], "answer": 0}\n', "non-empty strings"),
    ('{"choices": [" x", " y"], "answer": 0}\n', "needs 'context'"),
    ("\n\n", "no items"),
]


@pytest.mark.parametrize("content,message", BAD_FILES, ids=[f"bad-{i}" for i in range(len(BAD_FILES))])
def test_bad_file_is_one_line_with_exit_code_1(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    r = run(f, "--model", "does-not-exist")  # the file is checked before the model is loaded
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr
    assert str(f) in r.stderr


def test_bad_options_are_one_line_with_exit_codes_2_and_1(data, store, tmp_path):
    cases = [
        (["--skill", "upper", "--soup", "lower", "-s", store.path], "not both", 2),
        (["--skill", "upper"], "-s/--store", 2),
        (["-s", store.path], "only with --skill or --soup", 2),
        (["--skill", "nope", "-s", store.path], "'nope'", 1),
        (["--soup", "upper+", "-s", store.path], "NAME+NAME", 2),
        (["--skill", "upper", "-s", tmp_path / "nostore"], "no state store", 1),
        (["--soup", "upper+lower", "--weights", "1,x", "-s", store.path], "weights", 2),
    ]
    for extra, message, code in cases:
        r = run(data, "--model", "embedded", *extra)
        assert r.exit_code == code, (extra, r.output)
        assert r.stderr.count("\n") == 1 and message in r.stderr, (extra, r.stderr)
    r = run(tmp_path / "missing.jsonl", "--model", "embedded")
    assert r.exit_code == 1 and "missing.jsonl" in r.stderr and r.stderr.count("\n") == 1


def test_lm_eval_passthrough_reaches_lm_evals_parser():
    r = runner.invoke(app, ["lm-eval", "run", "--help"])
    assert r.exit_code == 0
    assert "--model_args" in r.output and "--include_path" in r.output
