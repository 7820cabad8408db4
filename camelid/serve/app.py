"""The HTTP side: FastAPI routes in OpenAI's formats, request checks, server-sent events.

Every route only validates, encodes and waits; the Batcher's worker thread does all model work
and hands text back through `Event`s, which cross into the event loop with
`call_soon_threadsafe`. Every error, ours or FastAPI's, leaves as OpenAI's error body
{"error": {"message", "type", "param", "code"}}, so that clients show the message.

Bodies are read here rather than by FastAPI, whose parser answers "There was an error parsing
the body" to bytes that are not UTF-8 and to deep nesting alike: invalid UTF-8 becomes U+FFFD
(the project's rule for text; protocol.py does the same for lone surrogates), and each other
fault gets its own message.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import AsyncIterator, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from camelid.errors import CamelidError
from camelid.generate import LLM, SamplingParams
from camelid.serve.batcher import Batcher, Event, Job, QueueFull
from camelid.serve.metrics import CONTENT_TYPE, ServerMetrics
from camelid.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingFields,
                                    TokenizeRequest, valid_text)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DISCONNECT_POLL_S = 0.5         # how often a non-streaming request checks that its client is there

log = logging.getLogger("camelid.serve")
Body = TypeVar("Body", bound=BaseModel)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    # valid_text: a message that quotes the request must still encode as UTF-8
    body = {"error": valid_text({"message": message, "type": kind, "param": param, "code": code})}
    return JSONResponse(body, status_code=status)


def create_app(llm: LLM, batcher: Batcher, model_name: str, api_key: str | None = None) -> FastAPI:
    """The application; its lifespan starts and stops the batcher's worker thread. With
    `api_key`, every route but the chat page and /health wants `Authorization: Bearer KEY`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="camelid", lifespan=lifespan, docs_url=None, redoc_url=None)
    created = int(time.time())
    chat_page = (resources.files("camelid.serve") / "static" / "chat.html").read_text(encoding="utf-8")
    _install_error_handlers(app)
    metrics = ServerMetrics(batcher)
    if api_key:
        app.add_middleware(RequireKey, key=api_key)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(chat_page)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "camelid",
             "max_model_len": batcher.context}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_body(request, CompletionRequest)
        _check_model(body, model_name)
        _check_max_tokens(body.max_tokens, "max_tokens", batcher.context)
        prompt = _completion_prompt(body, llm)
        return await _answer(request, body, prompt, body.max_tokens or DEFAULT_COMPLETION_TOKENS,
                             batcher, model_name, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request, ChatCompletionRequest)
        _check_model(body, model_name)
        for name in ("max_completion_tokens", "max_tokens"):
            _check_max_tokens(getattr(body, name), name, batcher.context)
        prompt = _chat_ids(body.messages, llm)
        limit = body.max_completion_tokens or body.max_tokens or batcher.context  # up to the context
        return await _answer(request, body, prompt, limit, batcher, model_name, chat=True)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await _read_body(request, TokenizeRequest)
        _check_model(body, model_name)
        if body.messages is not None:
            ids = _chat_ids(body.messages, llm)
        else:
            ids = llm.encode_prompt(body.prompt) if body.add_special_tokens else \
                llm.tokenizer.encode(body.prompt, bos=False, eos=False)
        return {"tokens": ids, "count": len(ids), "max_model_len": batcher.context}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await _read_body(request, DetokenizeRequest)
        _check_model(body, model_name)
        _check_token_ids(body.tokens, llm, "tokens")
        return {"prompt": llm.tokenizer.decode(body.tokens)}

    # added last, so it runs first: it sees the key check's 401s too
    app.add_middleware(CountResponses, metrics=metrics, routes={getattr(r, "path", "") for r in app.routes})
    return app


# Plain ASGI middleware: Starlette's BaseHTTPMiddleware (@app.middleware) would hide a client's
# disconnect from the routes, which must see it to free the request's row.

class CountResponses:
    """Each response by route and status (a path no route serves counts as "other", so that
    stray requests cannot grow the metrics without bound)."""

    def __init__(self, app, metrics: ServerMetrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.routes else "other"

        async def sending(message):
            if message["type"] == "http.response.start":
                self.metrics.responded(path, message["status"])
            await send(message)

        await self.app(scope, receive, sending)


OPEN_PATHS = ("/", "/health")   # the chat page (which then sends the key itself) and liveness probes


class RequireKey:
    """401 with OpenAI's error body for a request without `Authorization: Bearer KEY`; the
    comparison takes the same time whatever the guess (hmac.compare_digest)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            return await self.app(scope, receive, send)
        message = ("no API key: send the header 'Authorization: Bearer KEY' (this server was started with "
                   "--api-key)" if not given else "the API key is wrong")
        await error_response(401, message, code="invalid_api_key")(scope, receive, send)


# ---- checks ---------------------------------------------------------------------------------------

async def _read_body(request: Request, model: type[Body]) -> Body:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
        log.warning("%s %s: the request body is not valid UTF-8; invalid bytes read as U+FFFD",
                    request.method, request.url.path)
    if not text.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # from _not_json
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply to be a request") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {_json_kind(data)}")
    clean = valid_text(data)
    if clean != data:
        log.warning("%s %s: the request has text that is not valid Unicode (lone surrogates); read as U+FFFD",
                    request.method, request.url.path)
    try:
        return model.model_validate(clean)
    except ValidationError as e:
        status, message, param = _validation_error(e.errors(include_url=False, include_input=False))
        raise ApiError(status, message, param) from None


def _not_json(constant: str):
    # Python's json reads NaN and Infinity, which JSON does not have (and which no range check admits)
    raise ValueError(f"{constant} is not a JSON number")


def _json_kind(value) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _validation_error(errors: list[dict]) -> tuple[int, str, str | None]:
    """pydantic's first complaint as (status, message naming the field, the field)."""
    first = errors[0]
    where = [part for part in first.get("loc", ()) if part != "body"]
    param = str(where[0]) if where else None
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in where).lstrip(".")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return 400, f"{path or 'request body'}: {message}", param


def _check_max_tokens(value: int | None, name: str, context: int) -> None:
    """A reply that could never fit is refused; one that fits only in part ends at the context
    with finish_reason "length", as any reply that reaches its limit does."""
    if value is not None and value >= context:
        raise ApiError(400, f"{name} is {value}, but this server's context is {context} tokens for the prompt "
                            f"and the reply together (camelid serve --context); ask for at most {context - 1}",
                       name, code="context_length_exceeded")


def _check_model(body: SamplingFields, model_name: str) -> None:
    if body.model is not None and body.model != model_name:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r} "
                            "(see /v1/models)", "model", code="model_not_found")


def _chat_ids(messages, llm: LLM) -> list[int]:
    """A conversation rendered with the model's chat template and its generation prompt."""
    try:
        return llm.tokenizer.encode_chat([m.as_template_input() for m in messages])
    except CamelidError as e:
        raise ApiError(400, str(e), "messages") from None


def _check_token_ids(ids: list[int], llm: LLM, param: str) -> None:
    vocab = llm.model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param)


def _completion_prompt(body: CompletionRequest, llm: LLM) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, f"one prompt per request, please (got a list of {len(prompt)})", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = llm.encode_prompt(prompt)
    else:
        _check_token_ids(prompt, llm, "prompt")
        ids = list(prompt)
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    return ids


# ---- answering ----------------------------------------------------------------------------------

async def _answer(request: Request, body: SamplingFields, prompt: list[int], max_tokens: int,
                  batcher: Batcher, model_name: str, chat: bool):
    param = "messages" if chat else "prompt"
    if len(prompt) >= batcher.context:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens but this server's context is "
                            f"{batcher.context} tokens (camelid serve --context); shorten the prompt", param,
                       code="context_length_exceeded")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(event: Event) -> None:  # on the worker thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is going down
            pass

    sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, max_new_tokens=max_tokens,
                              seed=body.seed, stop=tuple(body.stops))
    job = Job(prompt, sampling, deliver)
    try:
        batcher.submit(job)
    except QueueFull as e:
        raise ApiError(503, str(e), kind="server_overloaded", code="queue_full") from None
    formatter = _ChatFormat(model_name) if chat else _CompletionFormat(model_name)
    if body.stream:
        return _JobStream(job, _stream(events, formatter, body.include_usage))
    return await _collect(request, job, events, formatter)


class _JobStream(StreamingResponse):
    """Server-sent events for a job, which is cancelled however the response ends: Starlette
    cancels the response when the client disconnects, possibly before the first chunk."""

    def __init__(self, job: Job, chunks: AsyncIterator[str]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()  # a no-op once the job has finished


async def _collect(request: Request, job: Job, events: asyncio.Queue[Event], formatter: "_Format"):
    pieces = []
    next_check = time.monotonic() + DISCONNECT_POLL_S
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() >= next_check:  # on a clock: tokens may arrive faster than the poll
                next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    job.cancel()  # nobody will read the answer: give the row to someone else
                    log.info("%s %s: the client went away; request cancelled", request.method, request.url.path)
                    return error_response(499, "client closed the request")
            if event is None:
                continue
            if event.error:
                return error_response(event.status, event.error, kind="server_error")
            pieces.append(event.text)
            if event.finish_reason:
                return formatter.whole("".join(pieces), event)
    finally:
        job.cancel()  # a no-op once the job has finished


async def _stream(events: asyncio.Queue[Event], formatter: "_Format", include_usage: bool) -> AsyncIterator[str]:
    first = formatter.opening()
    if first:
        yield _sse(first)
    while True:
        event = await events.get()
        if event.error:
            yield _sse({"error": {"message": event.error, "type": "server_error", "param": None, "code": None}})
            break
        if event.text:
            yield _sse(formatter.chunk(event.text, None))
        if event.finish_reason:
            yield _sse(formatter.chunk("", event.finish_reason))
            if include_usage:
                yield _sse(formatter.usage_chunk(event))
            break
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


class _Format:
    """OpenAI's response and chunk objects for one endpoint; all chunks share one id."""

    prefix = object_name = chunk_name = ""

    def __init__(self, model_name: str):
        self.model = model_name
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def opening(self) -> dict | None:
        return None

    def usage_chunk(self, event: Event) -> dict:
        return {**self._envelope(self.chunk_name, []), "usage": _usage(event)}

    def whole(self, text: str, event: Event) -> dict:
        return {**self._envelope(self.object_name, [self.choice(text, event.finish_reason)]), "usage": _usage(event)}


class _CompletionFormat(_Format):
    prefix, object_name, chunk_name = "cmpl", "text_completion", "text_completion"

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        return self._envelope(self.chunk_name, [self.choice(text, finish_reason)])


class _ChatFormat(_Format):
    prefix, object_name, chunk_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def opening(self) -> dict:
        return self._envelope(self.chunk_name, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}])

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return self._envelope(self.chunk_name, [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}])


# ---- errors in OpenAI's shape -------------------------------------------------------------------

def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.kind, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 in its own shape; OpenAI clients expect 400 with a message
        return error_response(*_validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind=kind)
