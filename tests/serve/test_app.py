"""The real server (uvicorn on 127.0.0.1, a free port) with real clients (the ``openai`` package and httpx):
answers equal ``model.generate`` token for token, streamed equals not streamed, skills and soups equal
generating from the stored states, the prefix cache changes nothing, concurrent clients are batched and get
their one-at-a-time answers, bad requests get OpenAI-style 4xx errors and the server keeps serving, and a client
that disconnects mid-stream frees its row."""

import json
import threading
import time

import httpx
import pytest
import torch
from openai import OpenAI

import statelab
from statelab.models.tokenizer import ByteTokenizer
from statelab.serve.app import BackgroundServer, ServeConfig, create_app
from statelab.state.store import StateStore
from tests.serve._serving import reference

TOK = ByteTokenizer()
EOS = TOK.eos_token_id
UPPER = "Q: cat\nA: CAT\n\nQ: dog\nA: DOG\n\nQ: sun\nA: SUN\n\n"
LOWER = "Q: CAT\nA: cat\n\nQ: DOG\nA: dog\n\nQ: SUN\nA: sun\n\n"
TEXT = "Q: France\nA: Paris\n\nQ: Japan\nA: Tokyo\n\nQ: Italy\nA: Rome\n\nQ: Spain\nA:"
MAX_PROMPT = 400


def _ids(text: str) -> list[int]:
    return TOK.encode(text)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model = statelab.load_model("embedded")  # the reference; each server loads its own copy
    store = StateStore(tmp_path_factory.mktemp("serve") / "skills")
    for name, text in (("upper", UPPER), ("lower", LOWER)):
        store.add(model.encode(torch.tensor([_ids(text)])), name=name, prompt=text, task=name)
    torch.manual_seed(1)
    other = statelab.Mamba1LM(statelab.Mamba1Config(d_model=128, n_layer=4, vocab_size=264, d_state=16)).eval()
    store.add(other.encode(torch.tensor([_ids(UPPER)])), name="foreign", prompt=UPPER)
    limits = {"max_prompt_tokens": MAX_PROMPT, "max_tokens": 3000, "max_batch": 8}
    cached = ServeConfig("embedded", cache_bytes=64 << 20, block_tokens=16, **limits)
    plain = ServeConfig("embedded", cache_bytes=0, **limits)
    with (
        BackgroundServer(create_app(statelab.load_model("embedded"), TOK, cached, store=store)) as server,
        BackgroundServer(create_app(statelab.load_model("embedded"), TOK, plain)) as nocache,
    ):
        yield {
            "model": model,
            "store": store,
            "url": server.url,
            "nocache": nocache.url,
            "client": OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0),
        }


def _complete(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _metrics(url: str) -> dict:
    return httpx.get(url + "/metrics", params={"format": "json"}, timeout=10).json()


def test_models(env):
    assert [m.id for m in env["client"].models.list().data] == ["embedded"]


@pytest.mark.parametrize("text", ["Q: sky\nA:", TEXT, "x"], ids=["short", "long", "one-token"])
def test_greedy_equals_generate(env, text):
    r = env["client"].completions.create(
        model="embedded", prompt=text, max_tokens=24, temperature=0, extra_body={"return_token_ids": True}
    )
    want = reference(env["model"], _ids(text), 24, EOS)
    (choice,) = r.choices
    assert choice.model_extra["token_ids"] == want
    assert choice.text == TOK.decode(want)
    assert r.usage.prompt_tokens == len(_ids(text)) and r.usage.completion_tokens == len(want)


def test_stream_equals_non_stream(env):
    args = {
        "model": "embedded",
        "prompt": TEXT,
        "max_tokens": 40,
        "temperature": 0.8,
        "seed": 3,
        "logprobs": 2,
        "stop": ["\n\nQ"],
        "extra_body": {"return_token_ids": True},
    }
    whole = env["client"].completions.create(**args)
    chunks = list(env["client"].completions.create(stream=True, stream_options={"include_usage": True}, **args))
    parts = [c.choices[0] for c in chunks if c.choices]
    (w,) = whole.choices
    assert "".join(p.text for p in parts) == w.text
    assert [t for p in parts for t in p.model_extra["token_ids"]] == w.model_extra["token_ids"]
    assert [t for p in parts for t in p.logprobs.tokens] == w.logprobs.tokens
    assert [x for p in parts for x in p.logprobs.token_logprobs] == w.logprobs.token_logprobs
    assert [x for p in parts for x in p.logprobs.top_logprobs] == w.logprobs.top_logprobs
    assert parts[-1].finish_reason == w.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    want = reference(env["model"], _ids(TEXT), 40, EOS, temperature=0.8, seed=3)
    assert w.model_extra["token_ids"] == want[: len(w.model_extra["token_ids"])]
    # the wire format: SSE data lines, ending with [DONE]
    body = {"prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", env["url"] + "/v1/completions", json=body) as r:
        lines = [x for x in r.iter_lines() if x]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"


def test_prompt_list_and_n(env):
    r = _complete(env["url"], prompt=["Q: sky\nA:", "hello"], n=2, max_tokens=6, temperature=0)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    for c in r["choices"]:
        assert c["text"] == TOK.decode(reference(env["model"], _ids(["Q: sky\nA:", "hello"][c["index"] // 2]), 6, EOS))
    assert r["usage"]["prompt_tokens"] == len(_ids("Q: sky\nA:")) + len(_ids("hello"))


def test_skill_equals_generating_from_the_stored_state(env):
    state = env["store"].get("upper", env["model"])
    r = env["client"].completions.create(
        model="embedded",
        prompt="Q: pig\nA:",
        max_tokens=12,
        temperature=0,
        extra_body={"skill": "upper", "return_token_ids": True},
    )
    want = reference(env["model"], _ids("Q: pig\nA:"), 12, EOS, state=state)
    assert r.choices[0].model_extra["token_ids"] == want
    assert want != reference(env["model"], _ids("Q: pig\nA:"), 12, EOS)


def test_soup_equals_generating_from_the_mixed_state(env):
    states = [env["store"].get(n, env["model"]) for n in ("upper", "lower")]
    soup = {"entries": ["upper", "lower"], "method": "weighted", "weights": [0.7, 0.3]}
    r = _complete(env["url"], prompt="Q: pig\nA:", max_tokens=12, temperature=0, soup=soup, return_token_ids=True)
    mixed = statelab.mix(states, method="weighted", weights=[0.7, 0.3])
    assert r["choices"][0]["token_ids"] == reference(env["model"], _ids("Q: pig\nA:"), 12, EOS, state=mixed)


def test_skills_add_list_search_use_remove(env):
    url, prompt = env["url"], "Q: Peru\nA: Lima\n\nQ: Chile\nA: Santiago\n\n"
    r = httpx.post(url + "/v1/skills", json={"name": "capitals", "prompt": prompt, "task": "capital"}, timeout=30)
    assert r.status_code == 201 and r.json()["n_tokens"] == len(_ids(prompt))
    again = httpx.post(url + "/v1/skills", json={"name": "capitals", "prompt": "x"}, timeout=30)
    assert again.status_code == 409 and again.json()["error"]["code"] == "skill_exists"
    listed = {s["id"]: s for s in httpx.get(url + "/v1/skills").json()["data"]}
    assert listed["capitals"]["prompt"] == prompt and listed["capitals"]["compatible"]
    assert not listed["foreign"]["compatible"]
    hits = httpx.post(url + "/v1/skills/search", json={"prompt": "Q: Cuba\nA: Havana\n\n", "k": 3}).json()["data"]
    assert len(hits) == 3 and hits[0]["score"] >= hits[-1]["score"]
    assert {h["id"] for h in hits} <= {"capitals", "upper", "lower"}
    assert all(h["prompt"] == listed[h["id"]]["prompt"] for h in hits)
    # the added skill is the model's state after the prompt
    stored = env["store"].get("capitals", env["model"])
    assert stored.equal(env["model"].encode(torch.tensor([_ids(prompt)])))
    out = _complete(url, prompt="Q: Cuba\nA:", max_tokens=8, temperature=0, skill="capitals", return_token_ids=True)
    assert out["choices"][0]["token_ids"] == reference(env["model"], _ids("Q: Cuba\nA:"), 8, EOS, state=stored)
    assert httpx.delete(url + "/v1/skills/capitals").json() == {"id": "capitals", "object": "skill", "deleted": True}
    gone = httpx.delete(url + "/v1/skills/capitals")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "skill_not_found"


def test_prefix_cache_on_equals_off(env):
    base = TEXT * 2  # 136 tokens: 8 blocks of 16 and a tail
    prompts = [base[:64], base[:64] + "Q: Peru\nA:", base, base[:100] + "x", base[:10], base[:64]]
    seen = []
    for p in prompts:
        on = _complete(env["url"], prompt=p, max_tokens=10, temperature=0, return_token_ids=True)
        off = _complete(env["nocache"], prompt=p, max_tokens=10, temperature=0, return_token_ids=True)
        assert on["choices"][0]["token_ids"] == off["choices"][0]["token_ids"], p
        assert off["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        seen.append(on["usage"]["prompt_tokens_details"]["cached_tokens"])
    # base[:64] is 4 whole blocks: a later prompt starts from the state after 63 tokens and reads token 64 again
    assert seen[1] == 63 and seen[2] >= 63 and seen[4] == 0 and seen[5] == 63
    stats = env["client"].models.list().data[0].model_extra["statelab"]["prefix_cache"]
    assert stats["hits"] > 0 and stats["bytes"] > 0 and 0 < stats["hit_rate"] < 1


def test_eight_concurrent_clients_get_their_one_at_a_time_answers(env):
    jobs = [
        {"prompt": TEXT[: 10 + 7 * i], "max_tokens": 14 + i, "temperature": 0.0 if i % 2 else 0.9, "seed": i}
        for i in range(8)
    ]
    alone = [_complete(env["url"], return_token_ids=True, **j)["choices"][0]["token_ids"] for j in jobs]
    before = _metrics(env["url"])["engine"]["decode_batch_histogram"]
    barrier, out = threading.Barrier(8), [None] * 8

    def client(i: int) -> None:
        c = OpenAI(base_url=env["url"] + "/v1", api_key="x", max_retries=0)
        barrier.wait()
        r = c.completions.create(model="embedded", extra_body={"return_token_ids": True}, **jobs[i])
        out[i] = r.choices[0].model_extra["token_ids"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == alone
    after = _metrics(env["url"])["engine"]["decode_batch_histogram"]
    batched = sum(after[b] - before[b] for b in after if b not in ("1",))
    assert batched > 0  # decode steps that ran more than one row


def _bad_cases():
    long = "y" * (MAX_PROMPT + 1)
    return {
        "unknown-skill": ({"prompt": "a", "skill": "nope"}, 404, "skill_not_found"),
        "skill-of-another-model": ({"prompt": "a", "skill": "foreign"}, 400, "state_mismatch"),
        "soup-with-another-model": ({"prompt": "a", "soup": {"entries": ["upper", "foreign"]}}, 400, "state_mismatch"),
        "unknown-mix-method": ({"prompt": "a", "soup": {"entries": ["upper"], "method": "nope"}}, 400, "invalid_value"),
        "temperature-nan": ({"prompt": "a", "temperature": float("nan")}, 400, "invalid_value"),
        "temperature-negative": ({"prompt": "a", "temperature": -1}, 400, "invalid_value"),
        "temperature-type": ({"prompt": "a", "temperature": "warm"}, 400, "invalid_type"),
        "top-p": ({"prompt": "a", "top_p": 1.01}, 400, "invalid_value"),
        "n-zero": ({"prompt": "a", "n": 0}, 400, "invalid_value"),
        "max-tokens-negative": ({"prompt": "a", "max_tokens": -2}, 400, "invalid_value"),
        "max-tokens-too-large": ({"prompt": "a", "max_tokens": 3001}, 400, "invalid_value"),
        "prompt-too-long": ({"prompt": long}, 400, "context_length_exceeded"),
        "prompt-type": ({"prompt": {"text": "a"}}, 400, "invalid_type"),
        "other-model": ({"prompt": "a", "model": "gpt-4"}, 404, "model_not_found"),
        "malformed-json": (b'{"prompt": "a",', 400, "invalid_json"),
        "not-utf8": (b"\xff\xfe", 400, "invalid_json"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()), ids=list(_bad_cases()))
def test_bad_requests_get_4xx_and_the_server_keeps_serving(env, case):
    body, status, code = _bad_cases()[case]
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {}
    if not kw:
        kw = {"content": json.dumps(body), "headers": {"content-type": "application/json"}}
    r = httpx.post(env["url"] + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error"
    ok = _complete(env["url"], prompt="hi", max_tokens=2, temperature=0)
    assert ok["choices"][0]["finish_reason"] in ("length", "stop")


def test_other_routes_answer_in_the_same_error_format(env):
    r = httpx.get(env["url"] + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(env["url"] + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(env["nocache"] + "/v1/skills")
    assert r.status_code == 400 and "-s STORE" in r.json()["error"]["message"]
    r = httpx.post(env["url"] + "/v1/skills", json={"name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_disconnect_mid_stream_frees_the_row(env):
    url = env["url"]
    cancelled = _metrics(url)["engine"]["rows_cancelled"]
    body = {"prompt": TEXT, "max_tokens": 3000, "temperature": 0.7, "seed": 1, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: {") for x in got)
        assert _metrics(url)["engine"]["active_rows"] == 1
    t0 = time.monotonic()
    while _metrics(url)["engine"]["active_rows"] and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    m = _metrics(url)["engine"]
    assert m["active_rows"] == 0 and m["rows_cancelled"] == cancelled + 1
    assert _complete(url, prompt="hi", max_tokens=2, temperature=0)["choices"]


def test_disconnect_while_waiting_for_a_whole_completion_frees_the_row(env):
    url = env["url"]
    cancelled = _metrics(url)["engine"]["rows_cancelled"]
    body = {"prompt": TEXT, "max_tokens": 3000, "temperature": 0.7, "seed": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    t0 = time.monotonic()
    while _metrics(url)["engine"]["rows_cancelled"] == cancelled and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    m = _metrics(url)["engine"]
    assert m["active_rows"] == 0 and m["rows_cancelled"] == cancelled + 1


def test_metrics_prometheus_text(env):
    r = httpx.get(env["url"] + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for name in (
        "statelab_active_rows",
        "statelab_prefix_cache_hits_total",
        "statelab_prefix_cache_misses_total",
        "statelab_prefix_cache_hit_rate",
        "statelab_prefix_cache_bytes",
        'statelab_decode_batch_rows_bucket{le="+Inf"}',
        "statelab_decode_batch_rows_count",
    ):
        assert name in values, name
    assert values['statelab_decode_batch_rows_bucket{le="+Inf"}'] == values["statelab_decode_batch_rows_count"]
    assert any(k.startswith('statelab_http_requests_total{route="/v1/completions",status="200"}') for k in values)
