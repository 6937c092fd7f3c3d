"""Request checking for /v1/completions and /v1/skills: every refusal names the field and the fix."""

import math
import re

import pytest

from statelab.serve.protocol import (
    ApiError,
    Limits,
    check_prompt_lengths,
    parse_completion,
    parse_skill_add,
    parse_skill_search,
)

LIMITS = Limits(max_prompt_tokens=100, max_tokens=50, max_rows=8, vocab_size=259)


def test_defaults_follow_openai():
    r = parse_completion({"prompt": "hi"}, LIMITS)
    assert r.prompts == ("hi",) and r.n == 1 and not r.stream
    p = r.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.logprobs, p.seed) == (16, 1.0, 1.0, (), None, None)


def test_every_field():
    body = {
        "model": "m",
        "prompt": ["a", [1, 2, 3]],
        "max_tokens": 0,
        "temperature": 0,
        "top_p": 0.5,
        "n": 2,
        "stop": "\n",
        "seed": 5,
        "logprobs": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u",
        "soup": {"entries": ["a", "b"], "method": "weighted", "weights": [0.25, 0.75]},
        "return_token_ids": True,
        "echo": False,
        "best_of": 1,
        "presence_penalty": 0.0,
        "frequency_penalty": 0,
        "logit_bias": {},
        "suffix": None,
    }
    r = parse_completion(body, LIMITS)
    assert r.prompts == ("a", (1, 2, 3)) and r.include_usage and r.return_token_ids
    assert r.params.stop == ("\n",) and r.params.top_p == 0.5 and r.params.logprobs == 3
    assert r.soup.entries == ("a", "b") and r.soup.weights == (0.25, 0.75) and r.soup.method == "weighted"
    assert parse_completion({"prompt": [5, 6]}, LIMITS).prompts == ((5, 6),)


BAD = {
    "not-an-object": ([1, 2], "JSON object", "invalid_json"),
    "no-prompt": ({}, "'prompt' is required", "missing_parameter"),
    "empty-prompt": ({"prompt": ""}, "prompt 0 is empty", "invalid_value"),
    "prompt-type": ({"prompt": 3}, "'prompt' must be", "invalid_type"),
    "prompt-mixed": ({"prompt": ["a", 3]}, "'prompt' must be", "invalid_type"),
    "token-out-of-vocab": ({"prompt": [1, 300]}, "outside [0, 259)", "invalid_value"),
    "temperature-nan": ({"prompt": "a", "temperature": math.nan}, "finite", "invalid_value"),
    "temperature-negative": ({"prompt": "a", "temperature": -0.1}, "[0, 2]", "invalid_value"),
    "temperature-string": ({"prompt": "a", "temperature": "hot"}, "a number", "invalid_type"),
    "top-p-zero": ({"prompt": "a", "top_p": 0}, "(0, 1]", "invalid_value"),
    "top-p-above-one": ({"prompt": "a", "top_p": 1.5}, "(0, 1]", "invalid_value"),
    "n-zero": ({"prompt": "a", "n": 0}, "'n' must be >= 1", "invalid_value"),
    "n-float": ({"prompt": "a", "n": 1.5}, "an integer", "invalid_type"),
    "n-too-many-rows": ({"prompt": ["a", "b"], "n": 5}, "at most 8", "invalid_value"),
    "max-tokens-negative": ({"prompt": "a", "max_tokens": -1}, ">= 0", "invalid_value"),
    "max-tokens-too-large": ({"prompt": "a", "max_tokens": 51}, "--max-tokens", "invalid_value"),
    "max-tokens-bool": ({"prompt": "a", "max_tokens": True}, "an integer", "invalid_type"),
    "stop-type": ({"prompt": "a", "stop": [1]}, "'stop' must be", "invalid_type"),
    "stop-empty": ({"prompt": "a", "stop": [""]}, "must not be empty", "invalid_value"),
    "logprobs-too-many": ({"prompt": "a", "logprobs": 21}, "<= 20", "invalid_value"),
    "seed-negative": ({"prompt": "a", "seed": -1}, ">= 0", "invalid_value"),
    "unknown-field": ({"prompt": "a", "temprature": 0}, "'temprature'", "unknown_parameter"),
    "echo": ({"prompt": "a", "echo": True}, "'echo' is not supported", "unsupported_parameter"),
    "best-of": ({"prompt": "a", "best_of": 3}, "'best_of' is not supported", "unsupported_parameter"),
    "penalty": ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    "stream-options-alone": ({"prompt": "a", "stream_options": {}}, "only allowed with stream", "invalid_value"),
    "skill-and-soup": ({"prompt": "a", "skill": "x", "soup": {"entries": ["y"]}}, "not both", "invalid_value"),
    "soup-no-entries": ({"prompt": "a", "soup": {"entries": []}}, "non-empty list", "invalid_type"),
    "soup-weights": (
        {"prompt": "a", "soup": {"entries": ["x", "y"], "weights": [1]}},
        "one weight per",
        "invalid_value",
    ),
    "soup-unknown": ({"prompt": "a", "soup": {"entries": ["x"], "mix": "mean"}}, "unknown field", "invalid_value"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_refusals(case):
    body, message, code = BAD[case]
    with pytest.raises(ApiError, match=re.escape(message)) as info:
        parse_completion(body, LIMITS)
    assert info.value.status == 400 and info.value.code == code
    err = info.value.body()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


def test_prompt_length_limit():
    check_prompt_lengths([[1] * 100], LIMITS)
    with pytest.raises(ApiError, match="101 tokens, more than this server's limit of 100") as info:
        check_prompt_lengths([[1] * 3, [1] * 101], LIMITS)
    assert info.value.code == "context_length_exceeded"


def test_skill_bodies():
    assert parse_skill_add({"name": "a", "prompt": "p", "tags": ["t"]})["tags"] == ["t"]
    with pytest.raises(ApiError, match="'name' is required"):
        parse_skill_add({"prompt": "p"})
    with pytest.raises(ApiError, match="'tags' must be"):
        parse_skill_add({"name": "a", "prompt": "p", "tags": "t"})
    assert parse_skill_search({"prompt": "p"})["k"] == 5
    with pytest.raises(ApiError, match="'k' must be >= 1"):
        parse_skill_search({"prompt": "p", "k": 0})
