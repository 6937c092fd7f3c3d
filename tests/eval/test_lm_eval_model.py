"""``--model statelab`` in lm-evaluation-harness: the real ``lm_eval`` command line and evaluator, offline, on the
small local tasks in ``tests/eval/data`` (multiple choice, generate_until, loglikelihood_rolling).

What lm-eval reports must equal statelab's own scoring of the same items: every log-likelihood (to round-off)
and greedy flag against one plain ``model(ids)`` pass per request, every generated string against generating
that request alone, and the task metrics recomputed from those numbers.
"""

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import statelab  # noqa: E402
from statelab.errors import ConfigError, StateMismatchError, StoreError  # noqa: E402
from statelab.eval.lm_eval_model import StatelabLM  # noqa: E402
from statelab.eval.scoring import encode_pair, generate_until, loglikelihood_rolling  # noqa: E402
from statelab.state.store import StateStore  # noqa: E402

DATA = Path(__file__).parent / "data"
TASKS = ["statelab_test_mc", "statelab_test_gen", "statelab_test_rolling"]
SKILL_PROMPT = "Q: bird\nA: BIRD\n\nQ: milk\nA: MILK\n\nQ: hand\nA: HAND\n\n"


@pytest.fixture(scope="module")
def embedded():
    return statelab.load_model("embedded"), statelab.load_tokenizer("embedded")


@pytest.fixture(scope="module")
def store(tmp_path_factory, embedded):
    model, tok = embedded
    st = StateStore(tmp_path_factory.mktemp("lmeval") / "skills")
    st.add(model.encode(torch.tensor([tok.encode(SKILL_PROMPT)])), name="upper", prompt=SKILL_PROMPT)
    st.add(model.encode(torch.tensor([tok.encode("Q: cat\nA: cat\n\n")])), name="lower")
    return st


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@torch.no_grad()
def _plain_ll(model, tok, context, continuation, state):
    """One plain pass over context + continuation from ``state``: (Σ log p, greedy)."""
    ctx, cont = encode_pair(tok, context, continuation)
    logits, _ = model(torch.tensor([ctx + cont]), state=state)
    logp = torch.log_softmax(logits[0].float(), -1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return (
        sum(float(logp[p, t]) for p, t in zip(pos, cont, strict=True)),
        all(int(logp[p].argmax()) == t for p, t in zip(pos, cont, strict=True)),
    )


def _arguments(sample):
    """A sample's request arguments as tuples: lm-eval keeps tuples in memory and writes
    ``{"gen_args_i": {"arg_0": ..., "arg_1": ...}}`` to its samples files."""
    a = sample["arguments"]
    if isinstance(a, dict):
        return [tuple(a[f"gen_args_{i}"].values()) for i in range(len(a))]
    return [tuple(x) for x in a]


def _check_against_statelab(model, tok, state, samples, results):
    """lm-eval's per-sample numbers and metrics == statelab's scoring of the same items."""
    mc = sorted(samples["statelab_test_mc"], key=lambda s: s["doc_id"])
    docs = _jsonl(DATA / "mc_upper.jsonl")[: len(mc)]  # the first docs (lm-eval's --limit)
    assert len(mc) == len(docs) >= 6
    acc = acc_norm = 0
    for s, doc in zip(mc, docs, strict=True):
        args = _arguments(s)
        assert [x for _, x in args] == [" " + c for c in doc["choices"]]
        got = [(float(r[0]), r[1] in (True, "True")) for r in s["filtered_resps"]]
        want = [_plain_ll(model, tok, c, x, state) for c, x in args]
        for (g_lp, g_greedy), (w_lp, w_greedy) in zip(got, want, strict=True):
            assert g_lp == pytest.approx(w_lp, rel=1e-5, abs=1e-4)
            assert g_greedy == w_greedy
        lps = [w for w, _ in want]
        acc += max(range(len(lps)), key=lps.__getitem__) == doc["answer"]
        normed = [lp / len(c) for lp, c in zip(lps, doc["choices"], strict=True)]
        acc_norm += max(range(len(lps)), key=normed.__getitem__) == doc["answer"]
    mc_acc = acc / len(docs)
    assert results["statelab_test_mc"]["acc,none"] == pytest.approx(mc_acc)
    assert results["statelab_test_mc"]["acc_norm,none"] == pytest.approx(acc_norm / len(docs))

    gen = sorted(samples["statelab_test_gen"], key=lambda s: s["doc_id"])
    docs = _jsonl(DATA / "gen_upper.jsonl")[: len(gen)]
    hits = 0
    for s, doc in zip(gen, docs, strict=True):
        ((context, kwargs),) = _arguments(s)
        (alone,) = generate_until(model, tok, [(context, kwargs)], state=state)
        assert s["filtered_resps"][0] == alone
        hits += alone == doc["answer"]
    assert results["statelab_test_gen"]["exact_match,none"] == pytest.approx(hits / len(docs))

    rolling = sorted(samples["statelab_test_rolling"], key=lambda s: s["doc_id"])
    texts = [d["text"] for d in _jsonl(DATA / "rolling.jsonl")][: len(rolling)]
    total = 0.0
    for s, text in zip(rolling, texts, strict=True):
        (alone,) = loglikelihood_rolling(model, tok, [text], state=state)
        bos_first, _ = _plain_ll(model, tok, "", text, state)  # the prefix token, then the whole text
        assert float(s["filtered_resps"][0]) == pytest.approx(alone, rel=1e-5, abs=1e-4)
        assert alone == pytest.approx(bos_first, rel=1e-5, abs=1e-4)
        total += alone
    n_bytes = sum(len(t.encode()) for t in texts)
    assert results["statelab_test_rolling"]["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2))
    return mc_acc


@pytest.mark.slow
def test_lm_eval_cli_with_a_skill_equals_statelab_scoring(tmp_path, embedded, store):
    """The real lm-eval command line (a subprocess, offline) with ``--model statelab`` and a stored skill."""
    model, tok = embedded
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "statelab.cli.lm_eval", "--model", "statelab",
        "--model_args", f"pretrained=embedded,skill=upper,store={store.path}",
        "--include_path", str(DATA), "--tasks", ",".join(TASKS),
        "--batch_size", "auto", "--device", "cpu", "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    # data_files in the task YAMLs are relative to the working directory
    proc = subprocess.run(cmd, cwd=DATA, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    report = json.loads(Path(results_file).read_text())
    assert report["config"]["model"] == "statelab"
    assert report["config"]["model_fingerprint"] == model.fingerprint
    assert report["config"]["statelab_skill"] == "upper"
    samples = {t: _jsonl(next(iter(glob.glob(str(out / "*" / f"samples_{t}_*.jsonl"))))) for t in TASKS}
    acc = _check_against_statelab(model, tok, store.get("upper", model), samples, report["results"])
    assert acc >= 0.75  # three uppercase demonstrations in the state: the model now picks the uppercase choice


def test_lm_eval_evaluator_equals_statelab_scoring(monkeypatch, embedded):
    """lm-eval's evaluator (in process, its built-in task index skipped) with the zero start state."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    model, tok = embedded
    monkeypatch.chdir(DATA)  # the task YAMLs name their data files relative to the working directory
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = StatelabLM(pretrained="embedded", batch_size="auto", batch_tokens=64)  # several buckets
    tasks = TaskManager(include_path=str(DATA), include_defaults=False).load(TASKS)
    res = evaluate(lm, tasks, bootstrap_iters=0, log_samples=True, limit=6)
    acc = _check_against_statelab(model, tok, None, res["samples"], res["results"])
    assert acc <= 0.5  # without the skill the model does not know which case is asked for


def test_registered_and_cached(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import CachingLM
    from lm_eval.api.registry import get_model

    assert get_model("statelab") is StatelabLM
    lm = StatelabLM(pretrained="embedded", batch_size=2)
    reqs = [Instance("loglikelihood", {}, ("Q: cat\nA:", x), i) for i, x in enumerate([" CAT", " cat", " Cat"])]
    direct = lm.loglikelihood(reqs)
    cached = CachingLM(lm, str(tmp_path / "cache.db"))
    assert cached.loglikelihood(reqs) == direct
    lm.model = None  # a second call must be answered from lm-eval's cache, without the model
    assert cached.loglikelihood(reqs) == direct


def test_model_args(embedded, store):
    model, _ = embedded
    with pytest.raises(ConfigError, match="unknown model_args"):
        StatelabLM(pretrained="embedded", temperature=0.5)
    with pytest.raises(ConfigError, match="dtype"):
        StatelabLM(pretrained="embedded", dtype="float64")
    with pytest.raises(ConfigError, match="batch_size"):
        StatelabLM(pretrained="embedded", batch_size="many")
    with pytest.raises(StoreError, match="'nope'"):
        StatelabLM(pretrained="embedded", skill="nope", store=str(store.path))
    lm = StatelabLM(
        pretrained="embedded", soup="upper+lower", mix="weighted", weights="0.25+0.75", store=str(store.path)
    )
    want = statelab.mix([store.get("upper"), store.get("lower")], "weighted", [0.25, 0.75])
    assert lm.start.equal(want) and lm.max_rows is None
    assert StatelabLM(pretrained="embedded", batch_size=8, max_batch_size=4).max_rows == 4
    if not torch.cuda.is_available():  # lm-eval's CLI asks for cuda:0 unless told otherwise
        assert StatelabLM(pretrained="embedded", device="cuda:0").model.device.type == "cpu"


def test_bfloat16_with_a_skill(embedded, store):
    """A skill is verified against the fp32 weights it was made with, then cast with the model."""
    model, tok = embedded
    lm = StatelabLM(pretrained="embedded", dtype="bfloat16", skill="upper", store=str(store.path))
    assert lm.model.dtype == torch.bfloat16 and lm.start.fingerprint == lm.model.fingerprint != model.fingerprint
    # the dtype of the bf16 model's own states (Mamba-1 keeps them in bf16, Mamba-2 in fp32)
    assert lm.start.dtype == lm.model.encode(torch.tensor([[81]])).dtype
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, ("Q: lamp\nA:", x), i) for i, x in enumerate([" LAMP", " lamp"])]
    got = [lp for lp, _ in lm.loglikelihood(reqs)]
    fp32 = [_plain_ll(model, tok, "Q: lamp\nA:", x, store.get("upper"))[0] for x in [" LAMP", " lamp"]]
    assert got == pytest.approx(fp32, rel=0.05, abs=0.5)
    # a state of another model is still refused, naming both fingerprints
    other = statelab.Mamba1LM(statelab.Mamba1Config(d_model=8, n_layer=1, vocab_size=259))
    foreign = StateStore(store.path.parent / "foreign")
    foreign.add(other.encode(torch.tensor([[1, 2, 3]])), name="x")
    with pytest.raises(StateMismatchError, match=other.fingerprint):
        StatelabLM(pretrained="embedded", dtype="bfloat16", skill="x", store=str(foreign.path))
