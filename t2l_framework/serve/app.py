"""The FastAPI app: adapters from descriptions, OpenAI-compatible chat, a web page.

Routes: ``GET /`` (web page), ``GET /healthz``, ``GET /v1/models``, ``GET /v1/stats``,
``POST /v1/adapters`` (description -> adapter id), ``GET /v1/adapters/{id}`` (PEFT zip),
``POST /v1/chat/completions`` (``model``: 'base' | 't2l:<id>', or a ``description``),
``POST /v1/inspect`` (descriptions -> nearest training tasks, familiarity, adapter norms; with an
inspector). With an inspector, adapter answers carry ``familiarity`` (``serve/familiarity.py``).
Errors are JSON ``{"error": {"message", "type", "param"}}``: bad input (validation, ``T2LError``)
gets a 4xx with its message; anything else is a bug or a server fault and gets a 500 with a
generic body, its traceback in the log (``InternalErrors``).

Threads: the event loop owns the adapter cache and the batcher's state; every model and
hypernetwork call (decoding, adapter generation, the device side of a download) runs on the
batcher's one model thread. Two other threads touch the runtime, read-only: the tokenizer
thread (with its own tokenizer copy, ``T2LRuntime.request_encoder``) and the download thread
(zips a CPU copy made on the model thread, ``T2LRuntime.adapter_writer``). Routes read only
attributes fixed at load (names, identity).

Input budgets (see docs/security.md): a body limit (413), message and length limits in the
schemas, tokenising and model work off the event loop (``/healthz`` stays fast under abuse),
and, when bound to this machine only, a ``Host`` check against DNS rebinding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from t2l_framework.errors import T2LError
from t2l_framework.serve.adapters import Adapter, AdapterCache, adapter_id, adapter_zip
from t2l_framework.serve.batching import Batcher
from t2l_framework.serve.familiarity import InspectRequest, adapter_familiarity
from t2l_framework.serve.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit
from t2l_framework.serve.schemas import INVALID_UNICODE, AdapterRequest, ChatRequest

log = logging.getLogger("t2l.serve")
STATIC = Path(__file__).parent / "static"


class ApiError(HTTPException):
    """An HTTP error whose body names the offending request field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(status, message)
        self.param = param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


INTERNAL_ERROR = "internal server error (a bug or a server fault, not your request); the server log has the details"


class InternalErrors:
    """ASGI middleware: an exception that is not a user error becomes a 500 with a generic body
    (an internal message may hold paths or values that are not the client's business), and its
    traceback is logged here, once. User errors never get this far: the exception handlers inside
    answer ``T2LError`` and validation errors with a 4xx."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("internal error in %s %s", scope["method"], scope["path"])
            if started:  # too late for a status: let the server drop the connection
                raise
            await _error(500, INTERNAL_ERROR)(scope, receive, send)


class RequestLog:
    """ASGI middleware: one log line per request with status and latency (streams included)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def send_and_log(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status[0], (time.perf_counter() - t0) * 1000)

        await self.app(scope, receive, send_and_log)


class Service:
    """The runtime behind the routes: batcher, adapter cache and in-flight adapter generation."""

    def __init__(self, runtime, max_batch: int, window_s: float, cache_size: int):
        self.runtime = runtime
        self.batcher = Batcher(runtime, max_batch, window_s)
        self.cache = AdapterCache(cache_size)
        self.pending: dict[str, asyncio.Future] = {}
        # chat templates and tokenising are CPU work: one thread of their own, never the event loop,
        # with a tokenizer of its own (the model thread decodes with the runtime's)
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2l-tokenize")
        self.encode_request = runtime.request_encoder()

    async def encode(self, req: ChatRequest) -> list[int]:
        """Prompt token ids of a chat request (tokenised off the event loop); 400 when too long."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.tokenizing, self.encode_request, req.chat_messages(), req.max_tokens)
        except T2LError as exc:
            raise ApiError(400, str(exc), "messages") from None

    async def adapter(self, description: str) -> tuple[Adapter, bool]:
        """(adapter, was it cached) for a description; concurrent requests share one generation."""
        key = adapter_id(self.runtime.identity, description)
        item = self.cache.get(key)
        if item is not None:
            return item, True
        task = self.pending.get(key)
        fresh = task is None
        if fresh:
            # A task of its own: a client that goes away must not cancel it under other waiters.
            task = self.pending[key] = asyncio.create_task(self._generate(key, description))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # waiters may all be gone
        return await asyncio.shield(task), not fresh

    async def zip(self, item: Adapter) -> bytes:
        """The PEFT zip of a cached adapter: its CPU copy is made on the model thread (after the
        batch in flight), the files are written and zipped on a thread of their own."""
        write = await self.batcher.run_model(self.runtime.adapter_writer, item.weights)
        return await asyncio.to_thread(adapter_zip, write, item, self.runtime.name, self.runtime.identity)

    async def _generate(self, key: str, description: str) -> Adapter:
        try:
            t0 = time.perf_counter()
            weights = await self.batcher.run_model(self.runtime.adapters, [description])
            item = Adapter(key, description, weights, (time.perf_counter() - t0) * 1000)
            self.cache.put(item)
            return item
        finally:
            del self.pending[key]

    async def resolve(self, req: ChatRequest) -> tuple[str, Adapter | None]:
        """(model name to report, adapter or None for the base model) for a chat request."""
        if req.description is not None:
            if req.model == "base" or req.model.startswith("t2l:"):
                raise ApiError(400, f"model '{req.model}' conflicts with 'description': give a description "
                                    "(with model 't2l') or a model, not both", "model")
            item, _ = await self.adapter(req.description)
            return f"t2l:{item.id}", item
        if req.model == "base":
            return "base", None
        if req.model == "t2l":
            raise ApiError(400, "model 't2l' needs a 'description' field (or use model 't2l:<adapter id>')",
                           "description")
        if req.model.startswith("t2l:"):
            item = self.cache.get(req.model[4:])
            if item is None:
                raise ApiError(404, f"unknown adapter '{req.model}' (never generated, or evicted from the cache); "
                                    "POST /v1/adapters with its description again", "model")
            return req.model, item
        raise ApiError(404, f"unknown model '{req.model}'; use 'base', 't2l:<adapter id>' from POST /v1/adapters, "
                            "or send a 'description' field", "model")


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        return _error(400, f"malformed JSON body: {bad_json[0].get('ctx', {}).get('error', 'cannot parse')}")
    bad_text = [e for e in errors if e.get("type") in (INVALID_UNICODE, "string_unicode")]  # ours, pydantic's
    if bad_text:
        loc = ".".join(str(p) for p in bad_text[0].get("loc", ()) if p != "body")
        return _error(400, f"{loc}: not valid Unicode text (a lone surrogate?)", loc or None)
    parts, param = [], None
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        param = param or loc or None
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return _error(422, "; ".join(parts), param)


def _chunk(base: dict, delta: dict, finish_reason: str | None = None, **extra) -> str:
    body = {**base, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
    return f"data: {json.dumps(body)}\n\n"


def create_app(runtime, max_batch: int = 16, batch_window_ms: float = 30.0, cache_size: int = 128,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_hosts: list[str] | None = None,
               inspector=None) -> FastAPI:
    """The app for a loaded ``T2LRuntime``; ``max_batch=1`` serves requests one at a time.

    max_body_bytes: larger request bodies get 413 before they are parsed. allowed_hosts: the
    ``Host`` header values accepted (any port), None = any; ``t2l serve`` bound to localhost
    passes the loopback names so a foreign web page cannot reach the API by DNS rebinding.
    inspector: a ``runtime.inspection.Inspector`` for the run (None: no familiarity, 404 on /v1/inspect).
    """
    service = Service(runtime, max_batch, batch_window_ms / 1000, cache_size)

    @asynccontextmanager
    async def lifespan(app):
        await service.batcher.start()
        log.info("serving %s (base model %s), batches of up to %d", runtime.name, runtime.base_model_name,
                 service.batcher.max_batch)
        yield
        await service.batcher.stop()
        service.tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Text-to-LoRA", description="Adapters from task descriptions; OpenAI-compatible chat.",
                  lifespan=lifespan)
    app.state.service = service
    app.add_middleware(InternalErrors)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
    app.add_middleware(RequestLog)  # added last = outermost: refused requests are logged too

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc):
        return _validation_error(exc)

    @app.exception_handler(HTTPException)
    async def on_http(request, exc):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "param", None))

    @app.exception_handler(T2LError)
    async def on_t2l(request, exc):  # bad input found below the routes (e.g. by the runtime)
        return _error(400, str(exc))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "hypernetwork": runtime.name, "base_model": runtime.base_model_name}

    @app.get("/v1/stats")
    async def stats():
        return {"batching": {"max_batch": service.batcher.max_batch, **service.batcher.stats.as_dict()},
                "adapters": service.cache.stats()}

    @app.get("/v1/models")
    async def models():
        rows = [{"id": "base", "object": "model", "owned_by": "t2l", "description": runtime.base_model_name}]
        rows += [{"id": f"t2l:{a.id}", "object": "model", "owned_by": "t2l", "description": a.description,
                  "created": a.created} for a in reversed(service.cache.items.values())]
        return {"object": "list", "data": rows}

    @app.post("/v1/adapters")
    async def create_adapter(req: AdapterRequest):
        item, cached = await service.adapter(req.description)
        return {**item.info(runtime), "cached": cached, "familiarity": await adapter_familiarity(service, inspector, item)}

    @app.post("/v1/inspect")
    async def inspect(req: InspectRequest):
        if inspector is None:
            raise ApiError(404, "inspection is off for this server (the run's training data was not found, or "
                                "--no-familiarity)")
        rows = await service.batcher.run_model(inspector.inspect, req.descriptions, req.top)
        return {"object": "list", "hypernetwork": runtime.name, "data": rows}

    @app.get("/v1/adapters/{adapter}")
    async def download_adapter(adapter: str):
        item = service.cache.get(adapter.removeprefix("t2l:"))
        if item is None:
            raise ApiError(404, f"unknown adapter id '{adapter}' (never generated, or evicted from the cache); "
                                "POST /v1/adapters with its description again", "id")
        data = await service.zip(item)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="t2l-adapter-{item.id[:12]}.zip"'})

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        model, item = await service.resolve(req)
        ids = await service.encode(req)
        weights = item.weights if item else None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}
        t0 = time.perf_counter()
        if req.stream:
            return StreamingResponse(_stream(service, head, ids, weights, req, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done, batch_size = await service.batcher.generate(ids, weights, req.max_tokens, req.temperature)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "finish_reason": done.finish_reason}],
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                          "total_tokens": done.prompt_tokens + done.completion_tokens},
                "t2l": {"adapter_id": item.id if item else None, "batch_size": batch_size,
                        "familiarity": await adapter_familiarity(service, inspector, item) if item else None,
                        "latency_ms": round((time.perf_counter() - t0) * 1000, 1)}}

    return app


async def _stream(service: Service, head: dict, ids, weights, req: ChatRequest, t0: float):
    """Server-sent events: a role chunk, text deltas as decoded, a finish chunk, ``[DONE]``."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[str | None] = asyncio.Queue()
    task = asyncio.create_task(service.batcher.generate(
        ids, weights, req.max_tokens, req.temperature, on_text=lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d)))
    # Scheduled after every delta of this request, since those were queued before the batch ended.
    task.add_done_callback(lambda _: deltas.put_nowait(None))
    try:
        yield _chunk(head, {"role": "assistant", "content": ""})
        sent = ""
        while (delta := await deltas.get()) is not None:
            sent += delta
            yield _chunk(head, {"content": delta})
        try:
            done, batch_size = task.result()
        except T2LError as exc:  # headers are out: report in-band, as the status would have
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error'}})}\n\n"
            yield "data: [DONE]\n\n"
            return
        except Exception:  # noqa: BLE001 - a bug: generic in-band error, traceback in the log
            log.exception("streamed request failed")
            yield f"data: {json.dumps({'error': {'message': INTERNAL_ERROR, 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"
            return
        if done.text.startswith(sent) and len(done.text) > len(sent):
            yield _chunk(head, {"content": done.text[len(sent):]})
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        yield _chunk(head, {}, done.finish_reason, usage=usage,
                     t2l={"batch_size": batch_size, "latency_ms": round((time.perf_counter() - t0) * 1000, 1)})
        yield "data: [DONE]\n\n"
    finally:
        if not task.done():  # the client went away: drop the request if it has not run yet
            task.cancel()
