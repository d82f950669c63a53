"""The OpenAI-compatible HTTP server (FastAPI) in front of the batched engine.

    GET  /v1/models                 the one model served
    POST /v1/completions            text in, text out (SSE with "stream": true)
    POST /v1/chat/completions       messages rendered with the model directory's chat template
    GET  /health, GET /metrics      liveness; Prometheus counters and gauges
    GET  /                          the chat page

Limits answer like OpenAI does: 401 without the API key (when one is set), 400 for bad or too large
requests and for API fields it does not implement, 404 for another model's name, 413 for oversized
bodies, 429 when the queue is full, 504 past the per-request timeout (a stream ends with
finish_reason "length" instead), 503 while the model loads.

Message text is always plain text (Tokenizer.encode_chat): it can never forge a chat turn. Prompts are
measured before they are tokenized and tokenized off the event loop, so one huge prompt stalls nobody.
A client that disconnects, streaming or not, cancels its request: its batch slot (or queue place) is
freed at the next step. Connections that send their request head or body too slowly are closed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable
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
    max_queue: int = 256  # requests waiting for a slot; more get 429
    max_body_bytes: int = 1_000_000
    timeout_s: float = 600.0
    prefill_chunk: int = 256
    header_timeout_s: float = 10.0  # a connection must send a whole request head within this, else it is closed
    body_timeout_s: float = 30.0  # and the body within this once the head is in (else 408)
    allowed_hosts: tuple[str, ...] = ()  # when set, other Host headers get 400 (DNS rebinding; see cmd_serve)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/models": "models",
             "/health": "health", "/metrics": "metrics", "/": "page"}


class _Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("commonlm_requests", "HTTP requests answered, by HTTP status",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("commonlm_generations", "Generations ended, by finish reason (timeout, cancelled, "
                                "stop, length)", ["reason"], registry=r)
        self.tokens = Counter("commonlm_tokens", "Tokens processed", ["kind"], registry=r)
        self.latency = Histogram("commonlm_request_seconds", "Request latency", ["endpoint"], registry=r)
        self.ttft = Histogram("commonlm_time_to_first_token_seconds", "Time to first token", registry=r)
        Gauge("commonlm_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("commonlm_batch_size", "Requests in the running batch", registry=r).set_function(lambda: engine.active)


SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]


class _Guard:
    """ASGI middleware in front of every request, before any parsing: the Host check (DNS rebinding), the API
    key, the body's size (413, also for chunked bodies) and time (408, a slowly trickled body), security
    headers, and the count of every answer by status for /metrics.

    The body is read here in full and handed on: what follows sees a complete body, and after it, the
    client's disconnect (which the non-streaming path watches for)."""

    def __init__(self, app, settings: ServeSettings, metrics: _Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_secured(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            refused = self._refusal(scope)
            if refused is None:
                body, refused = await self._read_body(scope, receive)
                if body is None and refused is None:
                    return  # the client left before sending its request
            if refused is not None:
                return await refused(scope, receive, send_secured)
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()  # after the body: waits for the client to disconnect
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send_secured)
        finally:
            self.metrics.requests.labels(ENDPOINTS.get(scope["path"], "other"), str(status)).inc()

    def _refusal(self, scope) -> JSONResponse | None:
        headers = dict(scope.get("headers") or [])
        settings = self.settings
        if settings.allowed_hosts:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in settings.allowed_hosts:
                return error_response(400, f"Host header {host!r} is not this server's: serving without an API key "
                                      f"on the loopback address, it answers only {', '.join(settings.allowed_hosts)}"
                                      " (a page on another site could otherwise reach it through DNS rebinding)")
        path = scope["path"]
        if settings.api_key and (path.startswith("/v1") or path == "/metrics"):
            header = headers.get(b"authorization", b"").decode("latin-1")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
                return error_response(401, "missing or wrong API key (Authorization: Bearer ...)",
                                      "authentication_error", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return error_response(413, f"request body over {settings.max_body_bytes} bytes")
        return None

    async def _read_body(self, scope, receive) -> tuple[bytes | None, JSONResponse | None]:
        limit, timeout = self.settings.max_body_bytes, self.settings.body_timeout_s
        deadline = time.monotonic() + timeout
        body, more = bytearray(), True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                return None, error_response(408, f"the request body did not arrive within {timeout:g}s",
                                            headers={"Connection": "close"})
            if message["type"] == "http.disconnect":
                return None, None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return None, error_response(413, f"request body over {limit} bytes", headers={"Connection": "close"})
        return bytes(body), None


def _slow_client_guard(header_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request head. uvicorn alone only times out idle
    keep-alive connections, and any byte resets that timer: 200 connections trickling headers were held
    75 s. Here a connection that has not sent a whole request head `header_timeout` seconds after it
    opened (or after its previous answer) is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class SlowClientGuard(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            if getattr(self, "_head_deadline", None) is not None:
                self._head_deadline.cancel()
            self._head_deadline = self.loop.call_later(header_timeout, self._head_too_slow)

        def _head_too_slow(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            if getattr(self, "_head_deadline", None) is not None:
                self._head_deadline.cancel()
            super().connection_lost(exc)

    return SlowClientGuard


def server_config(app, host: str, port: int, settings: ServeSettings, **kwargs):
    """The uvicorn configuration every server of ours runs with (the CLI's and the tests')."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning",
                          http=_slow_client_guard(settings.header_timeout_s), **kwargs)


def _page_with_policy() -> HTMLResponse:
    """The chat page with a Content-Security-Policy that allows its own inline script and style (by hash)
    and nothing else: no other scripts, no framing by other sites, requests only to this server."""
    html = resources.files("commonlm.serve").joinpath("chat.html").read_text(encoding="utf-8")

    def digest(tag: str) -> str:
        inline = re.search(f"<{tag}>(.*?)</{tag}>", html, re.S).group(1)
        return "'sha256-" + base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode() + "'"

    policy = (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
              "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return HTMLResponse(html, headers={"Content-Security-Policy": policy})


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
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout=remaining)
                except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
                    raise TimeoutError from None
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
    tokenizer = lm.tokenizer

    async def lifespan(app: FastAPI):
        if own_engine:
            engine.start()
        yield
        if own_engine:
            engine.stop()

    app = FastAPI(title="CommonLM", version="1", lifespan=lifespan)
    app.add_middleware(_Guard, settings=settings, metrics=metrics)
    app.state.engine, app.state.settings = engine, settings

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        # loc is ("body", field, index, ...); union members add their type names ("function-after[...]")
        names = [str(p) for p in first.get("loc", ())[1:] if not (isinstance(p, str) and "[" in p)]
        param = ".".join(names) or None
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        return error_response(400, f"{param or 'body'}: {message}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    def check_request(body: Sampling) -> None:
        if body.model is not None and body.model != settings.model_name:
            raise APIError(404, f"model '{body.model}' does not exist; this server serves '{settings.model_name}'",
                           param="model", code="model_not_found")
        refused = body.refusal()
        if refused is not None:
            raise APIError(400, refused[1], param=refused[0])

    def too_long(n: int, at_least: bool = False) -> APIError:
        return APIError(400, f"prompt has {'at least ' if at_least else ''}{n} tokens; this server accepts at most "
                        f"{max_prompt}", param="messages", code="context_length_exceeded")

    async def tokenize(fn, *args) -> list[int]:
        """Off the event loop: a long prompt must not stall other requests (the tokenizer lets go of the GIL)."""
        try:
            return await asyncio.to_thread(fn, *args)
        except UserError as e:  # a chat template's raise_exception, a control token it cannot keep plain
            raise APIError(400, str(e), param="messages") from None

    def check_and_start(prompt_ids: list[int], body: Sampling) -> _Generation:
        n = len(prompt_ids)
        if n == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if n > max_prompt:
            raise too_long(n)
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > settings.max_tokens:
            raise APIError(400, f"max_tokens={asked} exceeds this server's limit of {settings.max_tokens}",
                           param="max_tokens")
        if asked is not None and n + asked > context:
            raise APIError(400, f"prompt ({n} tokens) + max_tokens ({asked}) exceeds the context of {context}",
                           param="max_tokens", code="context_length_exceeded")
        max_tokens = asked or min(settings.max_tokens, context - n)
        if engine.queued(extra=1) > settings.max_queue:
            raise APIError(429, "server busy: too many queued requests, retry later", "rate_limit_error")
        return _Generation(engine, lm, prompt_ids, body, max_tokens, time.monotonic() + settings.timeout_s)

    def usage(prompt_ids: list[int], gen: _Generation) -> dict[str, int]:
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": gen.completion_tokens,
                "total_tokens": len(prompt_ids) + gen.completion_tokens}

    async def respond(request: Request, endpoint: str, prompt_ids: list[int], body: Sampling, chat: bool,
                      prefix: str = ""):
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

        def record(reason: str) -> None:
            metrics.finished.labels(reason).inc()
            metrics.latency.labels(endpoint).observe(time.monotonic() - started)
            metrics.tokens.labels("completion").inc(gen.completion_tokens)
            if gen.first_token_at is not None:
                metrics.ttft.observe(gen.first_token_at - started)

        if not body.stream:
            collect = asyncio.ensure_future(_collect(gen))
            left = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({collect, left}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                left.cancel()
                if not collect.done():  # the client went away: stop generating, free the slot or queue place
                    collect.cancel()
            if collect.cancelled():
                record("cancelled")
                return Response(status_code=499)  # nobody reads it
            try:
                text = prefix + collect.result()
            except TimeoutError:
                record("timeout")
                raise APIError(504, f"request took longer than {settings.timeout_s:g}s", "timeout") from None
            record(gen.finish_reason or "stop")
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": settings.model_name,
                                 "choices": [choice(text, gen.finish_reason, False)],
                                 "usage": usage(prompt_ids, gen)})

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(choices: list[dict], extra: dict | None = None) -> str:
            data = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                    "model": settings.model_name, "choices": choices, **(extra or {})}
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            reason = "cancelled"
            try:
                if chat:
                    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                elif prefix:
                    yield chunk([choice(prefix, None, True)])
                try:
                    async for piece in gen.pieces():
                        yield chunk([choice(piece, None, True)])
                    reason = gen.finish_reason
                except TimeoutError:  # ends like a reply cut at max_tokens, but by time: "length", then [DONE]
                    gen.finish_reason, reason = "length", "timeout"
                yield chunk([choice(None if chat else "", gen.finish_reason, True)])
                if include_usage:
                    yield chunk([], {"usage": usage(prompt_ids, gen)})
                yield "data: [DONE]\n\n"
            except APIError as e:
                reason = "error"
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind}})}\n\n"
            finally:
                record(reason)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "commonlm", "max_model_len": context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_request(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):
            if any(not 0 <= t < tokenizer.vocab_size for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
            ids, text = list(prompt), tokenizer.decode(prompt)
        else:
            if tokenizer.min_tokens(prompt) > max_prompt:  # known too long without tokenizing a megabyte
                raise too_long(tokenizer.min_tokens(prompt), at_least=True)
            ids, text = await tokenize(tokenizer.encode, prompt, body.allow_special_tokens), prompt
        return await respond(request, "completions", ids, body, chat=False, prefix=text if body.echo else "")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_request(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        least = tokenizer.min_tokens("".join(m["content"] for m in messages))
        if least > max_prompt:  # known too long without rendering and tokenizing a megabyte
            raise too_long(least, at_least=True)
        ids = await tokenize(tokenizer.encode_chat, messages)
        return await respond(request, "chat", ids, body, chat=True)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queue_depth": engine.queue_depth,
                "batch_size": engine.active}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=PROMETHEUS_TYPE)

    page = _page_with_policy()

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page

    return app


async def _collect(gen: _Generation) -> str:
    return "".join([piece async for piece in gen.pieces()])


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body was read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Loading:
    """What the port answers while the model loads: 503 with Retry-After, so clients and health checks can
    tell "starting" from "down" (a refused port). `app` is set once the model is ready."""

    def __init__(self) -> None:
        self.app = None

    async def __call__(self, scope, receive, send):
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            response = JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        else:
            response = error_response(503, "the model is still loading; retry in a few seconds", "server_error",
                                      code="model_loading", headers={"Retry-After": "5"})
        await response(scope, receive, send)


def start_http(app, host: str, port: int, settings: ServeSettings):
    """uvicorn on a background thread, once it listens: (server, thread). A port that cannot be had is a
    one-line error."""
    import threading

    import uvicorn

    server = uvicorn.Server(server_config(app, host, port, settings, lifespan="off"))
    web = threading.Thread(target=server.run, name="commonlm-http", daemon=True)
    web.start()
    while not server.started:
        if not web.is_alive():
            raise UserError(f"could not serve on {host}:{port} (is the port in use? try another --port)")
        time.sleep(0.05)
    return server, web


def serve(load: Callable[[], LanguageModel], settings: ServeSettings, host: str, port: int) -> None:
    """Serve until Ctrl-C or SIGTERM: HTTP on a background thread, decoding on this one.

    The port is taken first and answers 503 while `load()` loads the model (seconds to minutes), so a port
    in use is said at once, and a client can tell "loading" from "down".

    The engine decodes on the thread that loaded the model. PyTorch's OpenMP pool belongs to the thread
    that runs a parallel op; a second thread doing so gets a second pool, and next to the first one its
    decoding was ~40% slower here (25.5 against 17.5 ms per token, GPT-2-small shape in bf16 on 2 cores).
    On Ctrl-C or SIGTERM the server stops taking requests and finishes the ones in flight; a second
    one stops at once.
    """
    import signal

    front = _Loading()
    server, web = start_http(front, host, port, settings)
    try:
        lm = load()
        engine = Engine(lm.model, max_batch=settings.max_batch, prefill_chunk=settings.prefill_chunk)
        front.app = create_app(lm, settings, engine)
    except BaseException:
        server.should_exit = True
        web.join(timeout=10)
        raise

    def stop(signum, frame):
        # Only a flag: an exception raised here would land mid-step and could drop a token already made.
        if server.should_exit:
            raise KeyboardInterrupt  # asked twice: stop now
        server.should_exit = True  # uvicorn takes no new requests and ends once those in flight are done

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    engine.run(keep_going=web.is_alive)  # decodes until the HTTP thread has finished
