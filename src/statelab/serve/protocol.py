"""The wire format of ``statelab serve``: request checking and response bodies, OpenAI's completions format.

Nothing here touches the network or the model, so every rule can be tested directly. A request that breaks a
rule raises :class:`ApiError`, which the app turns into OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

Fields of ``POST /v1/completions`` (OpenAI's, with their defaults):
``model`` (optional here; must name the served model), ``prompt`` (a string, a list of strings, a list of token
ids or a list of such lists), ``max_tokens`` (16), ``temperature`` (1.0, in [0, 2]), ``top_p`` (1.0, in (0, 1]),
``n`` (1), ``stop`` (a string or up to 16 strings), ``seed``, ``logprobs`` (0-20), ``stream``,
``stream_options`` (``{"include_usage": bool}``), ``user``. OpenAI fields this server does not implement are
refused unless they hold their neutral value (``echo: false``, ``best_of: 1``, ``suffix: null``,
``presence_penalty: 0``, ``frequency_penalty: 0``, ``logit_bias: {}``), so nothing asked for is silently
ignored. statelab's fields: ``skill`` (a store entry to start every prompt from), ``soup`` (``{"entries": [...],
"method": "mean", "weights": [...]}``: a mix of store entries to start from) and ``return_token_ids`` (each
choice also carries its ``token_ids``, as vLLM's extension does).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from statelab.serve.engine import Delta, SamplingParams, TokenLogprob

__all__ = [
    "ApiError",
    "Limits",
    "Soup",
    "CompletionRequest",
    "parse_completion",
    "check_prompt_lengths",
    "parse_skill_add",
    "parse_skill_search",
    "Choice",
    "completion_body",
    "chunk_body",
    "logprobs_body",
    "usage_body",
    "error_body",
    "new_id",
]

MAX_STOP = 16
MAX_LOGPROBS = 20
MAX_SEED = 2**62  # choice j seeds its generator with seed + j: keep the sum inside torch's seed range

_NEUTRAL = {
    "echo": (False,),
    "best_of": (None, 1),
    "suffix": (None,),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
}
_FIELDS = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logprobs",
    "stream",
    "stream_options",
    "user",
    "skill",
    "soup",
    "return_token_ids",
    *_NEUTRAL,
}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status``, a message naming the fix, OpenAI's ``type``, the offending
    ``param`` and a short machine-readable ``code``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        code: str = "invalid_value",
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.type = type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What the server accepts: ``max_prompt_tokens`` per prompt, ``max_tokens`` per choice, ``max_rows`` choices
    per request (prompts x n), ``vocab_size`` for token-id prompts."""

    max_prompt_tokens: int
    max_tokens: int
    max_rows: int = 256
    vocab_size: int | None = None


@dataclass(frozen=True)
class Soup:
    """A start state mixed from store entries: ``statelab.mix(states, method, weights)``."""

    entries: tuple[str, ...]
    method: str = "mean"
    weights: tuple[float, ...] | None = None


@dataclass(frozen=True)
class CompletionRequest:
    """A checked ``/v1/completions`` body. ``prompts`` hold strings or token-id lists, as given."""

    prompts: tuple[str | tuple[int, ...], ...]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    model: str | None
    skill: str | None
    soup: Soup | None
    return_token_ids: bool


def _type_error(name: str, want: str, got: Any) -> ApiError:
    return ApiError(f"'{name}' must be {want}, got {_show(got)}", code="invalid_type", param=name)


def _show(v: Any) -> str:
    s = repr(v) if not isinstance(v, str) else f'"{v}"'
    return s if len(s) <= 60 else s[:57] + "..."


def _int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _type_error(name, "an integer", v)
    if lo is not None and v < lo:
        raise ApiError(f"'{name}' must be >= {lo}, got {v}", param=name)
    if hi is not None and v > hi:
        raise ApiError(f"'{name}' must be <= {hi}, got {v}", param=name)
    return v


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _type_error(name, "a number", v)
    v = float(v)
    if not math.isfinite(v):
        raise ApiError(f"'{name}' must be a finite number, got {v}", param=name)
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(name, "true or false", v)
    return v


def _str(body: dict, name: str, required: bool = False) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise ApiError(f"'{name}' is required", code="missing_parameter", param=name)
        return None
    if not isinstance(v, str):
        raise _type_error(name, "a string", v)
    if required and not v:
        raise ApiError(f"'{name}' must not be empty", param=name)
    return v


def _is_neutral(v: Any, neutral: tuple) -> bool:
    for n in neutral:
        if n is None or isinstance(n, bool):
            if v is n:
                return True
        elif isinstance(n, int):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == n:
                return True
        elif isinstance(v, type(n)) and v == n:
            return True
    return False


def _object(raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(raw).__name__}", code="invalid_json")
    return raw


def _prompts(v: Any, vocab_size: int | None) -> tuple[str | tuple[int, ...], ...]:
    want = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if v is None:
        raise ApiError("'prompt' is required", code="missing_parameter", param="prompt")
    if isinstance(v, str):
        items: list[Any] = [v]
    elif isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        items = [v]
    elif isinstance(v, list) and v:
        items = v
    else:
        raise _type_error("prompt", want, v)
    out: list[str | tuple[int, ...]] = []
    for i, p in enumerate(items):
        if isinstance(p, str):
            if not p:
                raise ApiError(
                    f"prompt {i} is empty; give at least one token (a skill's state alone carries no next-token "
                    "prediction)",
                    param="prompt",
                )
            out.append(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad = [t for t in p if t < 0 or (vocab_size is not None and t >= vocab_size)]
            if bad:
                raise ApiError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}", param="prompt")
            out.append(tuple(p))
        else:
            raise _type_error("prompt", want, v)
    return tuple(out)


def _stop(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _type_error("stop", "a string or a list of strings", v)
    if len(items) > MAX_STOP:
        raise ApiError(f"'stop' takes at most {MAX_STOP} strings, got {len(items)}", param="stop")
    if any(not s for s in items):
        raise ApiError("'stop' strings must not be empty", param="stop")
    return tuple(items)


def _soup(v: Any) -> Soup | None:
    if v is None:
        return None
    want = 'an object {"entries": [names], "method": "mean", "weights": [numbers]}'
    if not isinstance(v, dict):
        raise _type_error("soup", want, v)
    unknown = sorted(set(v) - {"entries", "method", "weights"})
    if unknown:
        raise ApiError(f"'soup' has unknown field(s) {unknown}; it takes entries, method, weights", param="soup")
    entries = v.get("entries")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) and e for e in entries):
        raise _type_error("soup.entries", "a non-empty list of store entry names", entries)
    method = v.get("method", "mean")
    if not isinstance(method, str) or not method:
        raise _type_error("soup.method", "a mixing method name", method)
    weights = v.get("weights")
    if weights is not None:
        if not isinstance(weights, list) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights
        ):
            raise _type_error("soup.weights", "a list of numbers", weights)
        if not all(math.isfinite(w) for w in weights):
            raise ApiError("'soup.weights' must be finite numbers", param="soup.weights")
        if len(weights) != len(entries):
            raise ApiError(
                f"'soup.weights' needs one weight per entry ({len(entries)}), got {len(weights)}",
                param="soup.weights",
            )
        weights = tuple(float(w) for w in weights)
    return Soup(tuple(entries), method, weights)


def parse_completion(raw: Any, limits: Limits) -> CompletionRequest:
    """Check a ``/v1/completions`` body against the rules in the module doc and ``limits``.

    Raises ``ApiError`` (400) naming the field and the fix for an unknown field, a wrong type, a value out of
    range, an unsupported OpenAI option or too many choices. Prompt length is checked after tokenizing
    (:func:`check_prompt_lengths`).
    """
    body = _object(raw)
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ApiError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))}", code="unknown_parameter", param=unknown[0]
        )
    for name, neutral in _NEUTRAL.items():
        if name in body and not _is_neutral(body[name], neutral):
            raise ApiError(
                f"'{name}' is not supported by statelab serve (only {neutral[-1]!r}); leave it out",
                code="unsupported_parameter",
                param=name,
            )
    model = _str(body, "model")
    prompts = _prompts(body.get("prompt"), limits.vocab_size)
    max_tokens = _int(body, "max_tokens", min(16, limits.max_tokens), lo=0)
    assert max_tokens is not None
    if max_tokens > limits.max_tokens:
        raise ApiError(
            f"'max_tokens' is {max_tokens}, more than this server's limit of {limits.max_tokens} "
            "(statelab serve --max-tokens)",
            param="max_tokens",
        )
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise ApiError(f"'temperature' must lie in [0, 2], got {temperature}", param="temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(f"'top_p' must lie in (0, 1], got {top_p}", param="top_p")
    n = _int(body, "n", 1, lo=1)
    assert n is not None
    if n * len(prompts) > limits.max_rows:
        raise ApiError(
            f"{len(prompts)} prompt(s) x n={n} asks for {n * len(prompts)} choices; at most {limits.max_rows} "
            "per request",
            param="n",
        )
    seed = _int(body, "seed", None, lo=0, hi=MAX_SEED)
    logprobs = _int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
    stream = _bool(body, "stream", False)
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise ApiError("'stream_options' is only allowed with stream: true", param="stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise _type_error("stream_options", 'an object {"include_usage": bool}', opts)
        include_usage = _bool(opts, "include_usage", False)
    _str(body, "user")
    skill = _str(body, "skill")
    if skill is not None and not skill:
        raise ApiError("'skill' must name a store entry", param="skill")
    soup = _soup(body.get("soup"))
    if skill is not None and soup is not None:
        raise ApiError("give 'skill' or 'soup', not both", param="soup")
    return CompletionRequest(
        prompts=prompts,
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=_stop(body.get("stop")),
            logprobs=logprobs,
            seed=seed,
        ),
        n=n,
        stream=stream,
        include_usage=include_usage,
        model=model,
        skill=skill,
        soup=soup,
        return_token_ids=_bool(body, "return_token_ids", False),
    )


def check_prompt_lengths(token_prompts: Sequence[Sequence[int]], limits: Limits) -> None:
    """Refuse a prompt longer than ``limits.max_prompt_tokens`` or one that tokenizes to nothing."""
    for i, p in enumerate(token_prompts):
        if len(p) > limits.max_prompt_tokens:
            raise ApiError(
                f"prompt {i} has {len(p)} tokens, more than this server's limit of {limits.max_prompt_tokens} "
                "(statelab serve --max-prompt-tokens)",
                code="context_length_exceeded",
                param="prompt",
            )
        if not p:
            raise ApiError(f"prompt {i} tokenizes to no tokens; give at least one", param="prompt")


def parse_skill_add(raw: Any) -> dict[str, Any]:
    """``POST /v1/skills`` body: ``name`` and ``prompt`` (required), ``task``, ``tags``, ``description``,
    ``shots``; returns them as keyword arguments for ``StateStore.add`` plus ``prompt``."""
    body = _object(raw)
    unknown = sorted(set(body) - {"name", "prompt", "task", "tags", "description", "shots"})
    if unknown:
        raise ApiError(f"unknown parameter(s) {', '.join(map(repr, unknown))}", code="unknown_parameter")
    tags = body.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise _type_error("tags", "a list of non-empty strings", tags)
    return {
        "name": _str(body, "name", required=True),
        "prompt": _str(body, "prompt", required=True),
        "task": _str(body, "task"),
        "tags": tags,
        "description": _str(body, "description"),
        "shots": _int(body, "shots", None, lo=0),
    }


def parse_skill_search(raw: Any) -> dict[str, Any]:
    """``POST /v1/skills/search`` body: ``prompt`` (few-shot text, required), ``k`` (5), ``threshold``,
    ``task``."""
    body = _object(raw)
    unknown = sorted(set(body) - {"prompt", "k", "threshold", "task"})
    if unknown:
        raise ApiError(f"unknown parameter(s) {', '.join(map(repr, unknown))}", code="unknown_parameter")
    threshold = body.get("threshold")
    if threshold is not None:
        threshold = _number(body, "threshold", 0.0)
    return {
        "prompt": _str(body, "prompt", required=True),
        "k": _int(body, "k", 5, lo=1, hi=1000),
        "threshold": threshold,
        "task": _str(body, "task"),
    }


def new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


@dataclass
class Choice:
    """A choice being assembled from its deltas."""

    index: int
    text: str = ""
    token_ids: list[int] | None = None
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.token_ids = [*(self.token_ids or []), *d.token_ids]
        if d.logprobs is not None:
            self.logprobs = [*(self.logprobs or []), *d.logprobs]
        self.finish_reason = d.finish_reason
        self.prompt_tokens, self.cached_tokens = d.prompt_tokens, d.cached_tokens
        self.completion_tokens = d.completion_tokens


def logprobs_body(items: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI's completions ``logprobs`` object: ``tokens``, ``token_logprobs``, ``top_logprobs`` (one
    ``{text: logprob}`` per token) and ``text_offset``."""
    if items is None:
        return None
    return {
        "tokens": [t.text for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [{text: lp for _, text, lp in t.top} for t in items],
        "text_offset": [t.offset for t in items],
    }


def usage_body(choices: Sequence[Choice], n: int) -> dict[str, Any]:
    """Token counts: each prompt counted once (its ``n`` choices share one read), every choice's tokens."""
    firsts = [c for c in choices if c.index % n == 0]
    prompt = sum(c.prompt_tokens for c in firsts)
    completion = sum(c.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)},
    }


def completion_body(
    rid: str, model: str, choices: Sequence[Choice], n: int, with_ids: bool, created: int | None = None
) -> dict[str, Any]:
    """The whole response of a non-streamed completion."""
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        item: dict[str, Any] = {
            "text": c.text,
            "index": c.index,
            "logprobs": logprobs_body(c.logprobs),
            "finish_reason": c.finish_reason,
        }
        if with_ids:
            item["token_ids"] = list(c.token_ids or [])
        out.append(item)
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": out,
        "usage": usage_body(choices, n),
    }


def chunk_body(rid: str, model: str, created: int, d: Delta, with_ids: bool) -> dict[str, Any]:
    """One streamed chunk: a choice's delta (text, log-probabilities, finish reason)."""
    item: dict[str, Any] = {
        "text": d.text,
        "index": d.index,
        "logprobs": logprobs_body(d.logprobs),
        "finish_reason": d.finish_reason,
    }
    if with_ids:
        item["token_ids"] = list(d.token_ids)
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [item]}
