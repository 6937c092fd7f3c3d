"""The HTTP face of ``statelab serve``: a FastAPI app around one :class:`~statelab.serve.engine.Engine`.

Routes:

* ``POST /v1/completions``: OpenAI's completions (fields in :mod:`statelab.serve.protocol`), streamed over SSE
  (``data: {...}`` chunks, then ``data: [DONE]``) with ``stream: true``; statelab's ``skill`` / ``soup`` start
  every prompt from a stored state.
* ``GET /v1/models``: the served model, with its limits and the prefix cache's counters.
* ``GET /v1/skills``, ``POST /v1/skills`` (encode a prompt with the model and store the state),
  ``DELETE /v1/skills/{name}``, ``POST /v1/skills/search`` (few-shot text -> closest stored skills, with scores
  and their prompts).
* ``GET /metrics``: Prometheus text, or JSON with ``?format=json``.

Every refusal is OpenAI's error body with a 4xx status, and the server goes on serving. A client that
disconnects (streamed or not) cancels its request, which frees its rows before the engine's next step.

fastapi, uvicorn and sse-starlette are the ``serve`` extra (``pip install 'statelab[serve]'``); they are imported
when an app is built, never when statelab is imported.
"""

# no ``from __future__ import annotations`` here: FastAPI reads the handlers' ``Request`` annotations at runtime,
# and ``Request`` is imported inside create_app (the web stack is optional)
import asyncio
import json
import logging
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from statelab.errors import ConfigError, StateMismatchError, StoreError
from statelab.serve.cache import PrefixCache, state_digest
from statelab.serve.engine import Delta, Engine, Failure, GenerationRequest, embedding_rows
from statelab.serve.metrics import RequestCounts, metrics_json, render_prometheus
from statelab.serve.protocol import (
    ApiError,
    Choice,
    Limits,
    check_prompt_lengths,
    chunk_body,
    completion_body,
    error_body,
    new_id,
    parse_completion,
    parse_skill_add,
    parse_skill_search,
    usage_body,
)

__all__ = ["ServeConfig", "create_app", "BackgroundServer", "require_serve_extra", "default_model_id"]

log = logging.getLogger("statelab.serve")


def require_serve_extra() -> None:
    """Raise ``ImportError`` with the install command unless fastapi, uvicorn and sse-starlette import."""
    missing = []
    for mod, pkg in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("sse_starlette", "sse-starlette")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise ImportError(
            f"statelab serve needs {', '.join(missing)}: install the serve extra, pip install 'statelab[serve]'"
        )


@dataclass(frozen=True)
class ServeConfig:
    """Server settings (the options of ``statelab serve``).

    Attributes:
        model_id: the name ``/v1/models`` reports and requests may give as ``model``.
        max_batch: rows decoded together at most.
        cache_bytes: prefix-cache budget (0 = no cache).
        block_tokens: tokens between cached states.
        max_prompt_tokens: longest prompt accepted.
        max_tokens: most new tokens per choice.
        max_rows: most choices per request (prompts x n).
        prefill_tokens: padded tokens per prefill batch at most.
    """

    model_id: str
    max_batch: int = 16
    cache_bytes: int = 1 << 30
    block_tokens: int = 64
    max_prompt_tokens: int = 8192
    max_tokens: int = 2048
    max_rows: int = 256
    prefill_tokens: int = 16384


def create_app(model: Any, tokenizer: Any, config: ServeConfig, store: Any = None) -> Any:
    """A FastAPI app serving ``model`` (its engine thread starts and stops with the app's lifespan).

    Args:
        model: a statelab model.
        tokenizer: its tokenizer.
        config: limits and sizes.
        store: a ``StateStore`` for skills and soups, or ``None`` (then skill requests are refused, naming ``-s``).
    """
    require_serve_extra()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    engine = Engine(
        model,
        tokenizer,
        max_batch=config.max_batch,
        cache=PrefixCache(config.cache_bytes, config.block_tokens),
        prefill_tokens=config.prefill_tokens,
    )
    limits = Limits(
        max_prompt_tokens=config.max_prompt_tokens,
        max_tokens=config.max_tokens,
        max_rows=config.max_rows,
        vocab_size=embedding_rows(model),
    )
    counts = RequestCounts()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="statelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.config = config
    app.state.store = store
    app.add_middleware(_CountResponses, counts=counts)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> Any:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(msg, "invalid_request_error", code), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> Any:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        msg = f"{where}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(msg, "invalid_request_error", "invalid_value", where or None), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> Any:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {e}", "server_error", "internal_error"), status_code=500)

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def need_store() -> Any:
        if store is None:
            raise ApiError(
                "this server has no skill store; start it with statelab serve -s STORE",
                code="no_store",
                param="skill",
            )
        return store

    def resolve_start(skill: str | None, soup: Any) -> tuple[Any, str]:
        """``(start state or None, its cache identity)``; runs in a worker thread (store I/O, mixing)."""
        if skill is None and soup is None:
            return None, "none"
        from statelab.eval.skills import start_state

        st = need_store()
        names, param = ([skill], "skill") if skill is not None else (list(soup.entries), "soup.entries")
        for name in names:
            if name not in st:
                raise ApiError(
                    f"unknown skill {name!r}: no entry of that name in the store; GET /v1/skills lists them",
                    status=404,
                    code="skill_not_found",
                    param=param,
                )
        try:
            if skill is not None:
                state = start_state(model, store=st, skill=skill)
            else:
                state = start_state(
                    model,
                    store=st,
                    soup=names,
                    mix=soup.method,
                    weights=None if soup.weights is None else list(soup.weights),
                )
        except StateMismatchError as e:
            raise ApiError(str(e), code="state_mismatch", param=param) from None
        except ConfigError as e:
            raise ApiError(str(e), code="invalid_value", param="soup" if soup is not None else "skill") from None
        except StoreError as e:
            raise ApiError(str(e), status=404, code="skill_not_found", param=param) from None
        return state, state_digest(state)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = parse_completion(await read_json(request), limits)
        if req.model is not None and req.model != config.model_id:
            raise ApiError(
                f"model {req.model!r} is not served here; this server serves {config.model_id!r}",
                status=404,
                code="model_not_found",
                param="model",
            )
        prompts = [list(p) if isinstance(p, tuple) else tokenizer.encode(p) for p in req.prompts]
        check_prompt_lengths(prompts, limits)
        start, key = await asyncio.to_thread(resolve_start, req.skill, req.soup)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | Failure] = asyncio.Queue()

        def sink(event: Delta | Failure) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        greq = GenerationRequest(prompts, req.params, sink, n=req.n, start=start, start_key=key)
        if not engine.running:
            raise ApiError("the server is shutting down", status=503, code="unavailable", type="server_error")
        try:
            engine.submit(greq)
        except StateMismatchError as e:  # start_state checked it already; the engine checks again before queueing
            raise ApiError(str(e), code="state_mismatch", param="soup" if req.soup is not None else "skill") from None
        rid, now = new_id(), int(time.time())
        choices = {i: Choice(i) for i in range(greq.num_choices)}

        if req.stream:

            async def events():
                finished, failed = 0, False
                try:
                    while finished < len(choices):
                        ev = await queue.get()
                        if isinstance(ev, Failure):
                            failed = True
                            yield {"data": json.dumps(error_body(ev.message, "server_error", "engine_error"))}
                            break
                        choices[ev.index].add(ev)
                        finished += ev.finish_reason is not None
                        if ev.text or ev.finish_reason or ev.logprobs or req.return_token_ids:
                            yield {"data": json.dumps(chunk_body(rid, config.model_id, now, ev, req.return_token_ids))}
                    if req.include_usage and not failed:
                        usage = usage_body(list(choices.values()), req.n)
                        body = {
                            "id": rid,
                            "object": "text_completion",
                            "created": now,
                            "model": config.model_id,
                            "choices": [],
                            "usage": usage,
                        }
                        yield {"data": json.dumps(body)}
                    yield {"data": "[DONE]"}
                finally:
                    greq.cancel()  # a no-op once every choice is done; frees the rows of a client that left

            return EventSourceResponse(events(), sep="\n", ping=600)

        async def collect() -> Failure | None:
            finished = 0
            while finished < len(choices):
                ev = await queue.get()
                if isinstance(ev, Failure):
                    return ev
                choices[ev.index].add(ev)
                finished += ev.finish_reason is not None
            return None

        async def client_gone() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.2)

        collector = asyncio.ensure_future(collect())
        watcher = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not collector.done():
                collector.cancel()
                greq.cancel()
        if collector.cancelled():
            return JSONResponse(error_body("client disconnected", "invalid_request_error", "cancelled"), 499)
        failure = collector.result()
        if failure is not None:
            return JSONResponse(error_body(failure.message, "server_error", "engine_error"), status_code=500)
        return completion_body(rid, config.model_id, list(choices.values()), req.n, req.return_token_ids, now)

    @app.get("/v1/models")
    async def models() -> Any:
        info = {
            "id": config.model_id,
            "object": "model",
            "created": created,
            "owned_by": "statelab",
            "statelab": {
                "arch": getattr(model, "arch", None),
                "fingerprint": model.fingerprint,
                "max_batch": config.max_batch,
                "max_prompt_tokens": config.max_prompt_tokens,
                "max_tokens": config.max_tokens,
                "store": None if store is None else str(store.path),
                "prefix_cache": engine.cache.stats(),
            },
        }
        return {"object": "list", "data": [info]}

    @app.get("/metrics")
    async def metrics(format: str = "prometheus") -> Any:
        data = metrics_json(counts, engine)
        if format == "json":
            return data
        if format != "prometheus":
            raise ApiError(f"format must be 'prometheus' or 'json', got {format!r}", param="format")
        return PlainTextResponse(render_prometheus(data), media_type="text/plain; version=0.0.4")

    def entry_body(e: Any) -> dict[str, Any]:
        return {
            "id": e.name,
            "object": "skill",
            "entry_id": e.id,
            "task": e.task,
            "tags": list(e.tags),
            "description": e.description,
            "prompt": e.prompt,
            "shots": e.shots,
            "n_tokens": e.n_tokens,
            "created": e.created,
            "fingerprint": e.fingerprint,
            "compatible": e.fingerprint == model.fingerprint,
        }

    async def encode(text: str, param: str) -> Any:
        ids = tokenizer.encode(text)
        if not ids:
            raise ApiError(f"'{param}' tokenizes to no tokens", param=param)
        check_prompt_lengths([ids], limits)

        def run(m: Any) -> Any:
            import torch

            return m.encode(torch.tensor([ids], dtype=torch.long, device=m.device))

        return await asyncio.wrap_future(engine.call(run)), ids

    @app.get("/v1/skills")
    async def list_skills() -> Any:
        st = need_store()
        entries = await asyncio.to_thread(st.list)
        return {"object": "list", "data": [entry_body(e) for e in entries]}

    @app.post("/v1/skills", status_code=201)
    async def add_skill(request: Request) -> Any:
        st = need_store()
        args = parse_skill_add(await read_json(request))
        if await asyncio.to_thread(st.__contains__, args["name"]):
            raise ApiError(
                f"a skill named {args['name']!r} exists; DELETE /v1/skills/{args['name']} first or pick another name",
                status=409,
                code="skill_exists",
                param="name",
            )
        state, _ = await encode(args["prompt"], "prompt")
        try:
            entry = await asyncio.to_thread(lambda: st.add(state.to(device="cpu"), **args))
        except StoreError as e:  # another client took the name meanwhile (409), or the state cannot be stored
            taken = await asyncio.to_thread(st.__contains__, args["name"])
            raise ApiError(
                str(e), status=409 if taken else 400, code="skill_exists" if taken else "store_error"
            ) from None
        return entry_body(entry)

    @app.delete("/v1/skills/{name}")
    async def remove_skill(name: str) -> Any:
        st = need_store()
        if not await asyncio.to_thread(st.__contains__, name):
            raise ApiError(f"unknown skill {name!r}; GET /v1/skills lists them", status=404, code="skill_not_found")
        entry = await asyncio.to_thread(st.remove, name)
        return {"id": entry.name, "object": "skill", "deleted": True}

    @app.post("/v1/skills/search")
    async def search_skills(request: Request) -> Any:
        st = need_store()
        args = parse_skill_search(await read_json(request))
        state, _ = await encode(args["prompt"], "prompt")

        def run() -> list[dict[str, Any]]:
            try:
                hits = st.search(state.to(device="cpu"), k=args["k"], threshold=args["threshold"], task=args["task"])
            except StoreError as e:
                raise ApiError(str(e), status=404, code="no_skills") from None
            return [{"id": h.name, "score": h.score, "task": h.task, "prompt": st.entry(h.id).prompt} for h in hits]

        return {"object": "list", "data": await asyncio.to_thread(run)}

    return app


class _CountResponses:
    """ASGI middleware counting responses by route and status (streams pass through untouched)."""

    def __init__(self, app: Any, counts: RequestCounts) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.counts.add(_route(scope.get("path", "")), status["code"])


def _route(path: str) -> str:
    if path in ("/v1/completions", "/v1/models", "/v1/skills", "/v1/skills/search", "/metrics"):
        return path
    if path.startswith("/v1/skills/"):
        return "/v1/skills/{name}"
    return "other"


class BackgroundServer:
    """Run an app under uvicorn on ``host`` in a background thread (tests, benchmarks, notebooks).

    ``port=0`` picks a free port; the bound socket is handed to uvicorn, so there is no race for it. Use as a
    context manager, or ``start()`` / ``stop()``; ``url`` is ``http://host:port``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        require_serve_extra()
        import uvicorn

        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        # proto must say TCP: asyncio sets TCP_NODELAY only on sockets that do, and without it every keep-alive
        # response waits ~40 ms for a delayed ACK between its header and body writes
        self.sock = socket.socket(family, kind, proto)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(addr)
        self.host, self.port = self.sock.getsockname()[:2]
        cfg = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(cfg)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="statelab-uvicorn", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def run(self) -> None:
        """Serve on the calling thread until interrupted (uvicorn then handles Ctrl-C and SIGTERM)."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def default_model_id(model: str) -> str:
    """The id ``/v1/models`` reports for a ``--model`` argument: ``embedded``, or the directory's name."""
    return "embedded" if model == "embedded" else Path(model).expanduser().resolve().name or str(model)
