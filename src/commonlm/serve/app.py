"""The OpenAI-compatible HTTP server (FastAPI) in front of the batched engine.

    GET  /v1/models                 the one model served
    POST /v1/completions            text in, text out (SSE with "stream": true)
    POST /v1/chat/completions       messages rendered with the model directory's chat template
    GET  /health, GET /metrics      liveness; Prometheus counters and gauges
    GET  /                          the chat page

Limits answer like OpenAI does: 401 without the API key (when one is set), 400 for bad or too large
requests, 413 for oversized bodies, 429 when the queue is full, 504 past the per-request timeout.
A client that disconnects mid-stream cancels its request, which frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from commonlm.api import LanguageModel
from commonlm.errors import UserError
from commonlm.infer.engine import Engine
from commonlm.infer.engine import Request as EngineRequest
from commonlm.infer.generate import TextStream
from commonlm.serve.schemas import ChatRequest, CompletionRequest, Sampling


@dataclass
class ServeSettings:
    model_name: str = "commonlm"
    api_key: str | None = None
    max_batch: int = 16
    max_prompt_tokens: int = 0  # 0: the model's context minus one
    max_tokens: int = 2048  # the most a request may ask for
    max_queue: int = 256  # waiting requests beyond the running batch; more get 429
    max_body_bytes: int = 1_000_000
    timeout_s: float = 600.0
    prefill_chunk: int = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class _Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("commonlm_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.tokens = Counter("commonlm_tokens", "Tokens processed", ["kind"], registry=r)
        self.latency = Histogram("commonlm_request_seconds", "Request latency", ["endpoint"], registry=r)
        self.ttft = Histogram("commonlm_time_to_first_token_seconds", "Time to first token", registry=r)
        Gauge("commonlm_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("commonlm_batch_size", "Requests in the running batch", registry=r).set_function(lambda: engine.active)


class _BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, before parsing them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


class _Generation:
    """One request in flight: engine tokens -> text pieces, with stop strings, timeout and cancellation."""

    def __init__(self, engine: Engine, lm: LanguageModel, prompt_ids: list[int], body: Sampling, max_tokens: int,
                 deadline: float):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(lm.tokenizer, body.stops())
        self.deadline = deadline
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        request = EngineRequest(
            prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
            top_p=body.top_p, seed=body.seed, stop_ids=lm.tokenizer.stop_ids,
            repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
        )
        put = self.queue.put_nowait
        self.seq = engine.submit(
            request,
            on_token=lambda t: self.loop.call_soon_threadsafe(put, t),
            on_finish=lambda reason: self.loop.call_soon_threadsafe(put, ("finish", reason)),
        )

    async def pieces(self):
        try:
            while True:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                item = await asyncio.wait_for(self.queue.get(), timeout=remaining)
                if isinstance(item, tuple):
                    if item[1] == "error":
                        raise APIError(500, "the engine failed on this request (see the server log)", "server_error")
                    piece = self.text.finish()
                    if piece:
                        yield piece
                    self.finish_reason = "stop" if self.text.stopped or item[1] == "stop" else "length"
                    return
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                self.completion_tokens += 1
                piece = self.text.push(item)
                if piece:
                    yield piece
                if self.text.stopped:
                    self.finish_reason = "stop"
                    return
        finally:
            self.seq.cancel()  # no-op when it already finished; frees the slot when the client went away


def create_app(lm: LanguageModel, settings: ServeSettings | None = None, engine: Engine | None = None) -> FastAPI:
    """The HTTP app. Without an `engine`, it makes one and runs it on its own thread while the app runs;
    with one, the caller runs it (see `serve`)."""
    settings = settings or ServeSettings()
    own_engine = engine is None
    engine = engine or Engine(lm.model, max_batch=settings.max_batch, prefill_chunk=settings.prefill_chunk)
    context = engine.max_len
    max_prompt = min(settings.max_prompt_tokens or context - 1, context - 1)
    metrics = _Metrics(engine)

    async def lifespan(app: FastAPI):
        if own_engine:
            engine.start()
        yield
        if own_engine:
            engine.stop()

    app = FastAPI(title="CommonLM", version="1", lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    app.state.engine, app.state.settings = engine, settings

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, f"{param or 'body'}: {first.get('msg')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        protected = request.url.path.startswith("/v1") or request.url.path == "/metrics"
        if settings.api_key and protected:
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
                return error_response(401, "missing or wrong API key (Authorization: Bearer ...)",
                                      "authentication_error", code="invalid_api_key")
        try:
            return await call_next(request)
        except APIError as e:
            return error_response(e.status, e.message, e.kind, e.param, e.code)

    def check_and_start(prompt_ids: list[int], body: Sampling) -> _Generation:
        n = len(prompt_ids)
        if n == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if n > max_prompt:
            raise APIError(400, f"prompt has {n} tokens; this server accepts at most {max_prompt}",
                           param="messages", code="context_length_exceeded")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > settings.max_tokens:
            raise APIError(400, f"max_tokens={asked} exceeds this server's limit of {settings.max_tokens}",
                           param="max_tokens")
        if asked is not None and n + asked > context:
            raise APIError(400, f"prompt ({n} tokens) + max_tokens ({asked}) exceeds the context of {context}",
                           param="max_tokens", code="context_length_exceeded")
        max_tokens = asked or min(settings.max_tokens, context - n)
        if engine.queue_depth >= settings.max_queue:
            raise APIError(429, "server busy: too many queued requests, retry later", "rate_limit_error")
        return _Generation(engine, lm, prompt_ids, body, max_tokens, time.monotonic() + settings.timeout_s)

    def usage(prompt_ids: list[int], gen: _Generation) -> dict[str, int]:
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": gen.completion_tokens,
                "total_tokens": len(prompt_ids) + gen.completion_tokens}

    async def respond(endpoint: str, prompt_ids: list[int], body: Sampling, chat: bool, prefix: str = ""):
        started = time.monotonic()
        gen = check_and_start(prompt_ids, body)
        metrics.tokens.labels("prompt").inc(len(prompt_ids))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, stream: bool) -> dict[str, Any]:
            if chat:
                content = {"content": text} if text is not None else {}
                return {"index": 0, ("delta" if stream else "message"): (
                    content if stream else {"role": "assistant", "content": text}), "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        def record(status: int) -> None:
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.monotonic() - started)
            metrics.tokens.labels("completion").inc(gen.completion_tokens)
            if gen.first_token_at is not None:
                metrics.ttft.observe(gen.first_token_at - started)

        if not body.stream:
            try:
                text = prefix + "".join([piece async for piece in gen.pieces()])
            except TimeoutError:
                record(504)
                raise APIError(504, f"request took longer than {settings.timeout_s:g}s", "timeout") from None
            record(200)
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": settings.model_name,
                                 "choices": [choice(text, gen.finish_reason, False)],
                                 "usage": usage(prompt_ids, gen)})

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(choices: list[dict], extra: dict | None = None) -> str:
            data = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                    "model": settings.model_name, "choices": choices, **(extra or {})}
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            status = 200
            try:
                if chat:
                    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                elif prefix:
                    yield chunk([choice(prefix, None, True)])
                async for piece in gen.pieces():
                    yield chunk([choice(piece, None, True)])
                yield chunk([choice(None if chat else "", gen.finish_reason, True)])
                if include_usage:
                    yield chunk([], {"usage": usage(prompt_ids, gen)})
                yield "data: [DONE]\n\n"
            except TimeoutError:
                status = 504
                err = {"error": {"message": f"request took longer than {settings.timeout_s:g}s", "type": "timeout"}}
                yield f"data: {json.dumps(err)}\n\n"
            except APIError as e:
                status = e.status
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind}})}\n\n"
            finally:
                record(status)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "commonlm", "max_model_len": context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):
            if any(not 0 <= t < lm.tokenizer.vocab_size for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {lm.tokenizer.vocab_size})", param="prompt")
            ids, text = list(prompt), lm.tokenizer.decode(prompt)
        else:
            ids, text = lm.tokenizer.encode(prompt), prompt
        return await respond("completions", ids, body, chat=False, prefix=text if body.echo else "")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        return await respond("chat", lm.tokenizer.encode(prompt), body, chat=True)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queue_depth": engine.queue_depth,
                "batch_size": engine.active}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=PROMETHEUS_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("commonlm.serve").joinpath("chat.html").read_text(encoding="utf-8")

    return app


def serve(lm: LanguageModel, settings: ServeSettings, host: str, port: int) -> None:
    """Serve until Ctrl-C or SIGTERM: HTTP on a background thread, decoding on this one.

    The engine decodes on the thread that loaded the model. PyTorch's OpenMP pool belongs to the thread
    that runs a parallel op; a second thread doing so gets a second pool, and next to the first one its
    decoding was ~40% slower here (25.5 against 17.5 ms per token, GPT-2-small shape in bf16 on 2 cores).
    On Ctrl-C or SIGTERM the server stops taking requests and finishes the ones in flight; a second
    one stops at once.
    """
    import signal
    import threading

    import uvicorn

    engine = Engine(lm.model, max_batch=settings.max_batch, prefill_chunk=settings.prefill_chunk)
    server = uvicorn.Server(uvicorn.Config(create_app(lm, settings, engine), host=host, port=port,
                                          log_level="warning"))
    web = threading.Thread(target=server.run, name="commonlm-http", daemon=True)
    web.start()
    while not server.started:
        if not web.is_alive():
            raise UserError(f"could not serve on {host}:{port} (is the port in use? try another --port)")
        time.sleep(0.05)

    def stop(signum, frame):
        # Only a flag: an exception raised here would land mid-step and could drop a token already made.
        if server.should_exit:
            raise KeyboardInterrupt  # asked twice: stop now
        server.should_exit = True  # uvicorn takes no new requests and ends once those in flight are done

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    engine.run(keep_going=web.is_alive)  # decodes until the HTTP thread has finished
