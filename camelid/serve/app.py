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
import threading
import time
from collections import OrderedDict
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
from camelid.generate.constrained import GrammarVocabulary
from camelid.serve.batcher import Batcher, Event, Job, QueueFull
from camelid.serve.metrics import CONTENT_TYPE, ServerMetrics
from camelid.serve.responses import ChatFormat, Choice, CompletionFormat, Format
from camelid.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingFields,
                                    TokenizeRequest, valid_text)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DISCONNECT_POLL_S = 0.5         # how often a non-streaming request checks that its client is there
BODY_TIMEOUT_S = 30.0           # how long a request's body may take to arrive

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


def create_app(llm: LLM, batcher: Batcher, model_name: str, api_key: str | None = None,
               adapters: dict[str, int] | None = None, start_worker: bool = True) -> FastAPI:
    """The application; its lifespan starts and stops the batcher's worker thread, unless
    `start_worker` is False (the caller runs `batcher.run()` on a thread of its choosing). With
    `api_key`, every route but the chat page and /health wants `Authorization: Bearer KEY`.
    `adapters`: LoRA adapters attached to the model (`camelid.lora.attach_adapters`), each a
    model of its own that requests choose by name, as vLLM's LoRA modules are chosen."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_worker:
            batcher.start()
        yield
        if start_worker:
            batcher.stop()

    app = FastAPI(title="camelid", lifespan=lifespan, docs_url=None, redoc_url=None)
    created = int(time.time())
    chat_page = (resources.files("camelid.serve") / "static" / "chat.html").read_text(encoding="utf-8")
    _install_error_handlers(app)
    metrics = ServerMetrics(batcher)
    server = _Server(llm, batcher, model_name, adapters or {})
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
        served = [{"id": model_name, "object": "model", "created": created, "owned_by": "camelid",
                   "max_model_len": batcher.context}]
        served += [{**served[0], "id": name, "parent": model_name} for name in adapters or {}]
        return {"object": "list", "data": served}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_body(request, CompletionRequest)
        server.adapter(body)
        _check_max_tokens(body.max_tokens, "max_tokens", batcher.context)
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens is 0: no completion, which only makes sense with echo (the prompt's "
                                "log-probabilities); ask for at least 1 token", "max_tokens")
        _check_choices(len(body.prompts), body.n, batcher)
        prompts, texts = _completion_prompts(body, llm)
        limit = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
        return await _answer(request, body, prompts, limit, server, chat=False, echo=texts if body.echo else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request, ChatCompletionRequest)
        server.adapter(body)
        for name in ("max_completion_tokens", "max_tokens"):
            _check_max_tokens(getattr(body, name), name, batcher.context)
        if body.max_tokens == 0:
            raise ApiError(400, "max_tokens is 0: ask for at least 1 token", "max_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        _check_choices(1, body.n, batcher)
        prompt = _chat_ids(body.messages, llm)
        limit = body.max_completion_tokens or body.max_tokens or batcher.context  # up to the context
        return await _answer(request, body, [prompt], limit, server, chat=True)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await _read_body(request, TokenizeRequest)
        server.adapter(body)
        if body.messages is not None:
            ids = _chat_ids(body.messages, llm)
        else:
            ids = llm.encode_prompt(body.prompt) if body.add_special_tokens else \
                llm.tokenizer.encode(body.prompt, bos=False, eos=False)
        return {"tokens": ids, "count": len(ids), "max_model_len": batcher.context}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await _read_body(request, DetokenizeRequest)
        server.adapter(body)
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


class _Server:
    """What the answering routes share: the model, its batcher, and for structured output the
    vocabulary as the grammar engine reads it (built on first use) and the grammars compiled."""

    GRAMMARS_KEPT = 64   # grammars kept, by schema (made and checked once): clients tend to send the same few

    def __init__(self, llm: LLM, batcher: Batcher, model_name: str, adapters: dict[str, int]):
        self.llm, self.batcher, self.model_name, self.adapters = llm, batcher, model_name, adapters
        self._vocabulary: GrammarVocabulary | None = None
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def adapter(self, body) -> int:
        """The adapter index a request's `model` names (-1: the base, also when it names none)."""
        if body.model is None or body.model == self.model_name:
            return -1
        if body.model in self.adapters:
            return self.adapters[body.model]
        names = ", ".join(repr(n) for n in [self.model_name, *self.adapters])
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {names} (see /v1/models)",
                       "model", code="model_not_found")

    @property
    def vocabulary(self) -> GrammarVocabulary:
        with self._lock:
            if self._vocabulary is None:
                try:
                    self._vocabulary = GrammarVocabulary(self.llm.tokenizer, self.llm.model.config.vocab_size)
                except CamelidError:
                    raise
                except Exception as e:  # a vocabulary the grammar engine cannot index
                    raise CamelidError(f"structured output is unavailable with this model's tokenizer "
                                       f"({type(e).__name__}: {e})") from None
            return self._vocabulary

    def grammar(self, schema: dict | None) -> str:
        """The grammar for `schema` (None: any JSON object); CamelidError for a schema that is not usable."""
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        grammar = self.vocabulary.json_grammar(schema)
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > self.GRAMMARS_KEPT:
                self._grammars.popitem(last=False)
        return grammar


# ---- checks ---------------------------------------------------------------------------------------

async def _read_body(request: Request, model: type[Body]) -> Body:
    try:  # a client that sends its body slowly, or never, holds a connection but not for ever
        raw = await asyncio.wait_for(request.body(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive in full within {BODY_TIMEOUT_S:g} s; "
                            "send it at once, with its Content-Length", code="request_timeout") from None
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


def _completion_prompts(body: CompletionRequest, llm: LLM) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids, and its text (what echo puts first)."""
    prompts, texts = [], []
    for i, prompt in enumerate(body.prompts):
        where = "the prompt" if len(body.prompts) == 1 else f"prompt {i}"
        if isinstance(prompt, str):
            ids = llm.encode_prompt(prompt)
        else:
            _check_token_ids(prompt, llm, "prompt")
            ids = list(prompt)
        if not ids:
            raise ApiError(400, f"{where} is empty", "prompt")
        prompts.append(ids)
        texts.append(prompt if isinstance(prompt, str) else llm.tokenizer.decode(ids))
    return prompts, texts


# ---- answering ----------------------------------------------------------------------------------

async def _answer(request: Request, body: SamplingFields, prompts: list[list[int]], max_tokens: int,
                  server: "_Server", chat: bool, echo: list[str] | None = None):
    """Submit a job per prompt and per n (its choices), and answer with all of them, as one JSON
    body or as one stream of server-sent events."""
    adapter = server.adapter(body)
    param = "messages" if chat else "prompt"
    batcher = server.batcher
    for prompt in prompts:
        if len(prompt) >= batcher.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens but this server's context is "
                                f"{batcher.context} tokens (camelid serve --context); shorten the prompt", param,
                           code="context_length_exceeded")
    bias = _logit_bias(body, server.llm)
    grammar = await _grammar(body, server)
    top = _top_logprobs(body)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def deliverer(index: int):
        def deliver(event: Event) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed: the server is going down
                pass
        return deliver

    jobs, choices = [], []
    for p, prompt in enumerate(prompts):
        for j in range(body.n):
            index = p * body.n + j
            seed = None if body.seed is None else (body.seed + j) % 2**64   # n different draws, reproducibly
            sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, max_new_tokens=max_tokens,
                                      seed=seed, stop=tuple(body.stops), presence_penalty=body.presence_penalty,
                                      frequency_penalty=body.frequency_penalty, logit_bias=bias)
            jobs.append(Job(prompt, sampling, deliverer(index), logprobs=top,
                            prompt_logprobs=top if echo is not None else None,
                            constraint=_constraint(server, grammar), adapter=adapter))
            choices.append(Choice(index, prompt, echo[p] if echo is not None else None))
    try:
        for job in jobs:
            batcher.submit(job)
    except QueueFull as e:
        for job in jobs:
            job.cancel()
        raise ApiError(503, str(e), kind="server_overloaded", code="queue_full") from None
    formatter = (ChatFormat if chat else CompletionFormat)(body.model or server.model_name, server.llm.tokenizer,
                                                          top is not None)
    if body.stream:
        return _JobStream(jobs, _stream(events, formatter, choices, prompts, body.include_usage))
    return await _collect(request, jobs, events, formatter, choices, prompts)


def _check_choices(prompts: int, n: int, batcher: Batcher) -> None:
    """A request may ask for as many choices as the server holds at once (rows and waiting line)."""
    most = len(batcher.rows) + batcher.max_queue
    if prompts * n > most:
        what = f"{prompts} prompts x n={n}" if prompts > 1 else f"n={n}"
        raise ApiError(400, f"{what} asks for {prompts * n} choices, more than this server holds at once ({most}: "
                            "camelid serve --max-batch and --max-queue); ask for fewer", "n")


def _logit_bias(body: SamplingFields, llm: LLM) -> dict[int, float]:
    bias = body.logit_bias or {}
    _check_token_ids(list(bias), llm, "logit_bias")
    return bias


def _top_logprobs(body: SamplingFields) -> int | None:
    """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


async def _grammar(body: SamplingFields, server: "_Server") -> str | None:
    """The compiled grammar of the request's response_format, if it asks for JSON."""
    form = body.response_format
    if form is None or not form.constrained:
        return None
    try:  # off the event loop: a large schema takes a moment to compile
        return await asyncio.to_thread(server.grammar, form.schema)
    except CamelidError as e:
        raise ApiError(400, f"response_format: {e}", "response_format") from None


def _constraint(server: "_Server", grammar: str | None):
    if grammar is None:
        return None
    try:
        return server.vocabulary.constraint(grammar)
    except CamelidError as e:
        raise ApiError(400, f"response_format: {e}", "response_format") from None


class _JobStream(StreamingResponse):
    """Server-sent events for a request's jobs, which are cancelled however the response ends:
    Starlette cancels the response when the client disconnects, possibly before the first chunk."""

    def __init__(self, jobs: list[Job], chunks: AsyncIterator[str]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.jobs = jobs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for job in self.jobs:
                job.cancel()  # a no-op once the job has finished


async def _collect(request: Request, jobs: list[Job], events: asyncio.Queue[tuple[int, Event]], formatter: Format,
                   choices: list[Choice], prompts: list[list[int]]):
    next_check = time.monotonic() + DISCONNECT_POLL_S
    unfinished = len(choices)
    try:
        while unfinished:
            try:
                index, event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() >= next_check:  # on a clock: tokens may arrive faster than the poll
                next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    log.info("%s %s: the client went away; request cancelled", request.method, request.url.path)
                    return error_response(499, "client closed the request")
            if event is None:
                continue
            if event.error:
                return error_response(event.status, event.error, kind="server_error")
            choices[index].add(event)
            unfinished -= bool(event.finish_reason)
        return formatter.whole(choices, prompts)
    finally:
        for job in jobs:
            job.cancel()  # nobody will read the rest: give the rows to others (a no-op once finished)


async def _stream(events: asyncio.Queue[tuple[int, Event]], formatter: Format, choices: list[Choice],
                  prompts: list[list[int]], include_usage: bool) -> AsyncIterator[str]:
    for choice in choices:
        first = formatter.opening(choice)
        if first:
            yield _sse(first)
    unfinished = len(choices)
    while unfinished:
        index, event = await events.get()
        if event.error:
            yield _sse({"error": {"message": event.error, "type": "server_error", "param": None, "code": None}})
            break
        choice = choices[index]
        text, logprobs = event.text, choice.new_logprobs(event)
        if choice.echo is not None:   # the prompt comes first, with its own log-probabilities
            text, choice.echo = choice.echo + text, None
        if text or logprobs:
            yield _sse(formatter.chunk(choice, text, logprobs, None))
        if event.finish_reason:
            choice.add(Event(finish_reason=event.finish_reason, completion_tokens=event.completion_tokens))
            unfinished -= 1
            yield _sse(formatter.chunk(choice, "", [], event.finish_reason))
    else:
        if include_usage:
            yield _sse(formatter.usage_chunk(choices, prompts))
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


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
