"""The batched engine: ragged batches, seeded sampling, the prefix cache, stop strings and cancellation, each
checked against ``model.generate`` on the prompt alone."""

import time

import pytest
import torch

import statelab
from statelab.errors import StateMismatchError
from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.models.mamba2 import Mamba2Config, Mamba2LM
from statelab.models.tokenizer import ByteTokenizer
from statelab.serve.cache import PrefixCache
from statelab.serve.engine import Engine, SamplingParams, _first_stop, _stable_end
from tests.serve._serving import collect, reference, run, submit

TOK = ByteTokenizer()
EOS = TOK.eos_token_id
TEXT = "Q: France\nA: Paris\n\nQ: Japan\nA: Tokyo\n\nQ: Italy\nA: Rome\n\nQ: Spain\nA:"


def _mamba2() -> Mamba2LM:
    torch.manual_seed(3)
    cfg = Mamba2Config(vocab_size=TOK.vocab_size, d_model=32, n_layer=2, d_state=8, head_dim=8, d_conv=4)
    m = Mamba2LM(cfg)
    with torch.no_grad():
        for b in m.layers:
            b.mixer.dt_bias.add_(1.0)
            b.mixer.chunk_size = 16
    return m.eval()


def _mamba1() -> Mamba1LM:
    torch.manual_seed(4)
    return Mamba1LM(Mamba1Config(vocab_size=TOK.vocab_size, d_model=32, n_layer=2, d_state=8)).eval()


# the embedded model (whatever its architecture) and a tiny random model of each architecture
MODELS = {
    "embedded": lambda: statelab.load_model("embedded"),
    "mamba1-tiny": _mamba1,
    "mamba2-tiny": _mamba2,
}


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def embedded():
    return statelab.load_model("embedded")


def _ids(text: str) -> list[int]:
    return TOK.encode(text)


# the prefill reads a prompt in one pass with logits everywhere, or (large batches) without the head and then its
# last token: logit_floats=0 forces the second way
PREFILL = {"one-pass": 1 << 30, "head-on-last-token": 0}


@pytest.mark.parametrize("logit_floats", list(PREFILL.values()), ids=list(PREFILL))
def test_concurrent_greedy_rows_equal_generate(model, logit_floats):
    """Seven rows of awkward prompt lengths and budgets through three slots: rows join and leave between steps,
    and each gets exactly the tokens of generate on its prompt alone."""
    prompts = [TEXT[:n] for n in (1, 3, 4, 17, 40, 64, len(TEXT))]
    budgets = [12, 5, 30, 1, 20, 9, 16]
    with Engine(model, TOK, max_batch=3, logit_floats=logit_floats) as eng:
        pending = [
            submit(eng, [_ids(p)], SamplingParams(max_tokens=b, temperature=0))
            for p, b in zip(prompts, budgets, strict=True)
        ]
        got = [collect(*x)[0][0] for x in pending]
        stats = eng.stats.snapshot()
    for p, b, c in zip(prompts, budgets, got, strict=True):
        assert c.token_ids == reference(model, _ids(p), b, EOS), p
        assert c.finish_reason in ("length", "stop")
        assert c.text == TOK.decode(c.token_ids)
    assert 1 < stats["decode_batch_max"] <= 3  # batched, never beyond --max-batch


def test_prompt_list_and_n_choices(embedded):
    """Two prompts x n=2: choices are ordered prompt-major and each equals its prompt's greedy tokens; the prompt
    of several choices is read once."""
    prompts = [_ids("Q: cat\nA:"), _ids(TEXT)]
    with Engine(embedded, TOK, max_batch=8) as eng:
        choices = run(eng, prompts, SamplingParams(max_tokens=10, temperature=0), n=2)
        read = eng.stats.snapshot()["prompt_tokens_read"]
    assert [c.index for c in choices] == [0, 1, 2, 3]
    for c in choices:
        assert c.token_ids == reference(embedded, prompts[c.index // 2], 10, EOS)
    assert read == sum(map(len, prompts))


def test_seeded_sampling_is_per_request(embedded):
    """A seeded request gives the same tokens alone and in a batch with other sampled and greedy rows, and choice
    j equals generate(seed=seed + j) with the same temperature and top_p."""
    ids = _ids("Q: dog\nA:")
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=11)
    with Engine(embedded, TOK, max_batch=8) as eng:
        alone = run(eng, [ids], params, n=2)
        others = [
            submit(eng, [_ids(TEXT[:k])], SamplingParams(max_tokens=30, temperature=t, seed=k))
            for k, t in ((20, 1.0), (9, 0.0), (33, 0.7))
        ]
        mine = submit(eng, [ids], params, n=2)
        together = collect(*mine)[0]
        for x in others:
            collect(*x)
        assert eng.stats.snapshot()["decode_batch_max"] > 2
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for j, c in enumerate(alone):
        assert c.token_ids == reference(embedded, ids, 24, EOS, temperature=0.9, top_p=0.9, seed=11 + j)
    assert alone[0].token_ids != alone[1].token_ids  # two seeds, two samples


@pytest.mark.parametrize("logit_floats", list(PREFILL.values()), ids=list(PREFILL))
def test_prefix_cache_on_equals_off(model, logit_floats):
    """Prompts that share blocks, end exactly on a block boundary or are shorter than a block give the same
    tokens with the cache as without; repeated prompts read only what follows their cached blocks."""
    K = 8
    base = _ids(TEXT)  # 62 tokens
    prompts = {
        "boundary": base[:24],  # 3 blocks exactly
        "longer": base[:24] + _ids(" and more"),
        "other-tail": base[:16] + _ids("Q: Peru\nA:"),
        "short": base[:5],
        "full": base,
    }
    params = SamplingParams(max_tokens=12, temperature=0)
    with Engine(model, TOK, max_batch=4) as off:
        want = {k: run(off, [p], params)[0].token_ids for k, p in prompts.items()}
    cache = PrefixCache(64 << 20, K)
    with Engine(model, TOK, max_batch=4, cache=cache, logit_floats=logit_floats) as on:
        for rnd in range(2):
            for name, p in prompts.items():
                before = on.stats.snapshot()["prompt_tokens_read"]
                c = run(on, [p], params)[0]
                read = on.stats.snapshot()["prompt_tokens_read"] - before
                assert c.token_ids == want[name], (rnd, name)
                assert read + c.cached_tokens == len(p)
                if rnd == 1:  # every full block was kept in round 0; its last token is read again
                    assert c.cached_tokens == max(len(p) // K * K - 1, 0), name
        assert on.stats.snapshot()["prompt_tokens_cached"] > 0
    stats = cache.stats()
    assert stats["hits"] > 0 and stats["prompts_shorter_than_a_block"] == 2
    assert cache.block_keys("none", prompts["boundary"])[-1] in cache  # a prompt ending on a boundary is kept


def test_prefix_cache_from_a_start_state(embedded):
    """Prompts read from a skill's state equal generate(state=skill), and never reuse prefixes read from the zero
    state (the start state is part of the key)."""
    skill = embedded.encode(torch.tensor([_ids("Q: cat\nA: tac\n\nQ: dog\nA: god\n\n")]))
    ids = _ids(TEXT[:40])
    params = SamplingParams(max_tokens=10, temperature=0)
    with Engine(embedded, TOK, cache=PrefixCache(16 << 20, 8)) as eng:
        plain = run(eng, [ids], params)[0]
        first = run(eng, [ids], params, start=skill)[0]
        again = run(eng, [ids], params, start=skill.clone())[0]
    assert plain.token_ids == reference(embedded, ids, 10, EOS)
    assert first.token_ids == reference(embedded, ids, 10, EOS, state=skill)
    assert first.token_ids != plain.token_ids
    assert first.cached_tokens == 0  # the zero-state prefix was cached, but it is another start
    assert again.cached_tokens == 39 and again.token_ids == first.token_ids


def test_stop_strings_cut_the_text_and_the_stream_never_shows_them(embedded):
    ids = _ids(TEXT)
    full = TOK.decode(reference(embedded, ids, 40, EOS))
    stop = full[12:14]  # a stop string that occurs in the greedy text
    cut = full.index(stop)
    with Engine(embedded, TOK) as eng:
        (c,), deltas = collect(*submit(eng, [ids], SamplingParams(max_tokens=40, temperature=0, stop=("zzz", stop))))
    assert c.text == full[:cut] and c.finish_reason == "stop"
    assert "".join(d.text for d in deltas) == c.text
    assert all(stop not in d.text for d in deltas)
    assert len(c.token_ids) < 40


def test_stream_helpers():
    assert _first_stop("abcabc", ("ca", "b")) == 1
    assert _first_stop("abc", ("x",)) is None
    assert _stable_end("hello wor", ("world",)) == len("hello ")  # "wor" may become "world"
    assert _stable_end("hello", ("lo!", "o")) == 3  # "lo" may become "lo!"; "o" itself would have matched
    assert _stable_end("ab\ufffd", ()) == 2  # an unfinished UTF-8 character
    assert _stable_end("", ("x",)) == 0


def test_cancel_frees_the_row_and_the_engine_goes_on(embedded):
    with Engine(embedded, TOK) as eng:
        req, events = submit(eng, [_ids(TEXT)], SamplingParams(max_tokens=2000, temperature=0))
        events.get(timeout=30)
        assert eng.active_rows == 1
        req.cancel()
        deadline = time.monotonic() + 10
        while eng.active_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.active_rows == 0
        assert eng.stats.snapshot()["rows_cancelled"] == 1
        c = run(eng, [_ids("hi")], SamplingParams(max_tokens=3, temperature=0))[0]
        assert c.token_ids == reference(embedded, _ids("hi"), 3, EOS)


def test_max_tokens_zero_and_logprobs(embedded):
    ids = _ids(TEXT[:30])
    with Engine(embedded, TOK) as eng:
        (empty,) = run(eng, [ids], SamplingParams(max_tokens=0, temperature=0, logprobs=2))
        (c,) = run(eng, [ids], SamplingParams(max_tokens=6, temperature=0, logprobs=3))
    assert empty.text == "" and empty.token_ids == [] and empty.finish_reason == "length"
    # the log-probabilities are the model's at each position of prompt + generated tokens
    seq = torch.tensor([ids + c.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(embedded(seq)[0][0].float(), -1)
    for i, lp in enumerate(c.logprobs):
        row = logp[len(ids) - 1 + i]
        assert lp.token_id == c.token_ids[i] and lp.top[0][0] == lp.token_id  # greedy: the most likely token
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        assert [t for t, _, _ in lp.top] == row.topk(3).indices.tolist()
        assert lp.offset == len(TOK.decode(c.token_ids[:i]))


def test_a_foreign_start_state_is_refused_at_submit(embedded):
    """A start state of another model is refused before it is queued; the engine keeps serving."""
    torch.manual_seed(0)
    other = type(embedded)(embedded.config).eval()  # same architecture and shapes, other weights
    foreign = other.encode(torch.tensor([_ids("hello")]))
    with Engine(embedded, TOK) as eng:
        with pytest.raises(StateMismatchError, match="not by this model"):
            submit(eng, [_ids("hi")], SamplingParams(max_tokens=3, temperature=0), start=foreign)
        assert eng.waiting_rows == 0
        c = run(eng, [_ids("hi")], SamplingParams(max_tokens=3, temperature=0))[0]
    assert c.token_ids == reference(embedded, _ids("hi"), 3, EOS)
