"""The server admits what it promises and answers every bad request with a 4xx in OpenAI's error
shape, never a 500: admission counts free rows before the waiting line, text that is not valid
Unicode is read as U+FFFD (the project's rule), and a matrix per endpoint plus a property test
over arbitrary JSON keep it so. In-process (FastAPI's TestClient) with a tiny random model."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from camelid.generate import LLM, SamplingParams
from camelid.serve import Batcher, Job, QueueFull, create_app
from camelid.serve.protocol import ChatCompletionRequest, CompletionRequest
from test_model import tiny

CONTEXT = 64
MODEL = "tiny"


@pytest.fixture(scope="module")
def tiny_llm(bpe_tokenizer):
    return LLM(tiny("tiny"), bpe_tokenizer, compile=False)


@pytest.fixture(scope="module")
def client(tiny_llm):
    batcher = Batcher(tiny_llm.engine, tiny_llm.tokenizer, max_batch=2, context=CONTEXT, max_queue=4)
    # raise_server_exceptions: an exception that escapes a route fails the test (it would be a 500)
    with TestClient(create_app(tiny_llm, batcher, MODEL), raise_server_exceptions=True) as c:
        yield c


def post(client, path: str, body, **kwargs):
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"Content-Type": "application/json"}, **kwargs)
    # json.dumps escapes lone surrogates as \ud800, as any JSON encoder would send them
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}, **kwargs)


def assert_openai_error(r, status: int, param=None, words=()):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    message = error["message"]
    assert message and "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    return error


def quiet(caplog):
    """The server logged no error (a traceback) while answering."""
    return not [r for r in caplog.records if r.name.startswith(("camelid", "uvicorn", "fastapi"))
                and r.levelno >= logging.ERROR]


# ---- admission: rows first, then the waiting line ------------------------------------------------

def job(collect=None, tokens: int = 3) -> Job:
    return Job([5, 6], SamplingParams(temperature=0, max_new_tokens=tokens), collect or (lambda event: None))


@pytest.mark.parametrize("max_batch, max_queue, burst, accepted", [
    (4, 1, 4, 4),     # the issue's first case: two were refused while rows stood free
    (4, 8, 20, 12),   # its second: 9 served, 11 refused
    (1, 1, 3, 2),
])
def test_a_burst_takes_every_free_row_before_the_waiting_line(tiny_llm, max_batch, max_queue, burst, accepted):
    """Submitted faster than the worker takes them (here it has not taken any yet): the jobs
    that will get a row do not count against --max-queue."""
    batcher = Batcher(tiny_llm.engine, tiny_llm.tokenizer, max_batch=max_batch, context=CONTEXT, max_queue=max_queue)
    refusals = []
    for _ in range(burst):
        try:
            batcher.submit(job())
        except QueueFull as e:
            refusals.append(str(e))
    assert burst - len(refusals) == accepted
    while batcher.admitted < max_batch + max_queue:
        batcher.submit(job())
    with pytest.raises(QueueFull) as full:  # and one more than rows plus line is one too many
        batcher.submit(job())
    held = f"0 requests running and {max_batch + max_queue} waiting"
    assert all("busy" in m and held in m for m in refusals + [str(full.value)])


def test_the_503_message_counts_running_and_waiting_requests(tiny_llm):
    batcher = Batcher(tiny_llm.engine, tiny_llm.tokenizer, max_batch=4, context=CONTEXT, max_queue=1)
    for _ in range(2):
        batcher.submit(job(tokens=20))
    batcher.step()  # both in rows now; two rows free
    for _ in range(3):
        batcher.submit(job(tokens=20))
    with pytest.raises(QueueFull) as refused:
        batcher.submit(job())
    assert "2 requests running and 3 waiting" in str(refused.value)
    batcher.step()
    assert batcher.active == 4
    with pytest.raises(QueueFull) as refused:
        batcher.submit(job())
    assert "4 requests running and 1 waiting" in str(refused.value)
    assert "at most 4 running and 1 waiting" in str(refused.value)


def test_a_finished_or_cancelled_request_gives_its_place_back(tiny_llm):
    batcher = Batcher(tiny_llm.engine, tiny_llm.tokenizer, max_batch=1, context=CONTEXT, max_queue=1)
    done = []
    short = job(done.append, tokens=1)
    batcher.submit(short)
    gone = job(tokens=20)
    batcher.submit(gone)
    with pytest.raises(QueueFull):
        batcher.submit(job())
    batcher.step()                     # the one-token job ends at its prefill
    assert done and done[-1].finish_reason
    gone.cancel()                      # and the waiting one gives up
    batcher.submit(job())
    batcher.submit(job())              # one row, one place in line: both free again
    with pytest.raises(QueueFull):
        batcher.submit(job())


@pytest.mark.parametrize("max_batch, max_queue, burst, served", [(4, 1, 4, 4), (4, 8, 20, 12)])
def test_a_burst_of_http_requests_is_served_up_to_rows_plus_queue(tiny_llm, max_batch, max_queue, burst, served):
    """Simultaneous requests, each long enough to be still running when the last arrives (the
    decode step waits for a gate): every request is answered 200, or 503 only because rows and
    line are both full, and exactly max_batch + max_queue of them are served."""
    llm = LLM(tiny("tiny"), tiny_llm.tokenizer, compile=False)
    gate = threading.Event()
    decode = llm.engine.decode

    def gated_decode(*args, **kwargs):
        gate.wait(60)
        return decode(*args, **kwargs)

    llm.engine.decode = gated_decode
    batcher = Batcher(llm.engine, llm.tokenizer, max_batch=max_batch, context=CONTEXT, max_queue=max_queue)
    batcher.stop_ids = frozenset()  # no request may end early on a stop token
    body = {"prompt": [5, 17, 42], "max_tokens": 8, "temperature": 0}
    with TestClient(create_app(llm, batcher, MODEL)) as c, ThreadPoolExecutor(burst) as pool:
        try:
            futures = [pool.submit(post, c, "/v1/completions", body) for _ in range(burst)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until every request is either held or refused
                refused = sum(f.done() for f in futures)
                if refused + batcher.admitted == burst:
                    break
                time.sleep(0.02)
        finally:
            gate.set()
        answers = [f.result() for f in wait(futures, 120).done]
    assert len(answers) == burst
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * served + [503] * (burst - served), codes
    for r in answers:
        if r.status_code == 503:
            error = assert_openai_error(r, 503, words=["busy", f"at most {max_batch} running and {max_queue} waiting"])
            assert error["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 8


# ---- a matrix of bad requests per endpoint ----------------------------------------------------------

HI = [{"role": "user", "content": "hi"}]
DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

COMPLETIONS = [
    # (body, status, param, words in the message)
    (b'{"prompt": "hi", ', 400, None, ["not valid JSON", "line 1"]),
    (b"", 400, None, ["empty"]),
    (b"   ", 400, None, ["empty"]),
    ([1, 2, 3], 400, None, ["JSON object", "array"]),
    ("hi", 400, None, ["JSON object", "string"]),
    (None, 400, None, ["JSON object", "null"]),
    (b'{"prompt": "hi", "temperature": NaN}', 400, None, ["NaN", "not a JSON number"]),
    (b'{"prompt": "hi", "top_p": Infinity}', 400, None, ["Infinity"]),
    (DEEP, 400, None, ["nests too deeply"]),
    ({}, 400, "prompt", ["prompt", "required"]),
    ({"max_tokens": 4}, 400, "prompt", ["prompt"]),
    ({"prompt": 3}, 400, "prompt", ["prompt", "string"]),
    ({"prompt": [True]}, 400, "prompt", ["prompt"]),
    ({"prompt": [1, "a"]}, 400, "prompt", ["prompt"]),
    ({"prompt": [{"text": "hi"}]}, 400, "prompt", ["prompt"]),
    ({"prompt": [1, 10**9]}, 400, "prompt", ["outside the vocabulary"]),
    ({"prompt": [-1]}, 400, "prompt", ["outside the vocabulary"]),
    ({"prompt": [10**30]}, 400, "prompt", ["outside the vocabulary"]),
    ({"prompt": ""}, 400, "prompt", ["empty"]),
    ({"prompt": []}, 400, "prompt", ["empty"]),
    ({"prompt": "hello " * 200}, 400, "prompt", ["context", "shorten"]),
    ({"prompt": list(range(1, CONTEXT + 1))}, 400, "prompt", ["context"]),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model", ["gpt-4", "does not exist", MODEL]),
    ({"prompt": "hi", "model": 3}, 400, "model", ["model"]),
    ({"prompt": "hi", "temperature": -0.1}, 400, "temperature", ["temperature"]),
    ({"prompt": "hi", "temperature": 2.5}, 400, "temperature", ["temperature"]),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature", ["temperature"]),
    (b'{"prompt": "hi", "temperature": 1e400}', 400, "temperature", ["temperature", "finite"]),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p", ["top_p"]),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p", ["top_p"]),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ["max_tokens is 0", "echo"]),
    ({"prompt": "hi", "max_tokens": -5}, 400, "max_tokens", ["max_tokens"]),
    ({"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", ["max_tokens"]),
    ({"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens", ["max_tokens"]),
    ({"prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens", ["max_tokens", "context", str(CONTEXT - 1)]),
    ({"prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens", ["max_tokens", "--context"]),
    ({"prompt": "hi", "n": 0}, 400, "n", ["n"]),
    ({"prompt": "hi", "n": 129}, 400, "n", ["n", "128"]),
    ({"prompt": "hi", "n": 100}, 400, "n", ["n=100", "choices", "--max-batch"]),
    ({"prompt": ["a", "b", "c"], "n": 40}, 400, "n", ["3 prompts x n=40", "--max-queue"]),
    ({"prompt": [[5, 6], []]}, 400, "prompt", ["prompt"]),
    ({"prompt": ["hi", ""]}, 400, "prompt", ["prompt 1 is empty"]),
    ({"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty", ["presence_penalty"]),
    ({"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty", ["frequency_penalty"]),
    ({"prompt": "hi", "logit_bias": {"99999": 1}}, 400, "logit_bias", ["99999", "outside the vocabulary"]),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias", ["[-100, 100]"]),
    ({"prompt": "hi", "logit_bias": {"five": 1}}, 400, "logit_bias", ["logit_bias"]),
    ({"prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format", ["response_format.type"]),
    ({"prompt": "hi", "response_format": {"type": "json_schema"}}, 400, "response_format", ["json_schema"]),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     400, "response_format", ["not a usable JSON schema", "objekt"]),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "a"}}}},
     400, "response_format", ["not a usable JSON schema"]),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x y", "schema": {}}}},
     400, "response_format", ["name"]),
    ({"prompt": "hi", "seed": 2**70}, 400, "seed", ["seed"]),
    ({"prompt": "hi", "seed": "x"}, 400, "seed", ["seed"]),
    ({"prompt": "hi", "stop": 3}, 400, "stop", ["stop", "string"]),
    ({"prompt": "hi", "stop": ["a", 1]}, 400, "stop", ["stop"]),
    ({"prompt": "hi", "stream": "maybe"}, 400, "stream", ["stream"]),
    ({"prompt": "hi", "stream_options": {"include_usage": "x"}}, 400, "stream_options", ["include_usage"]),
    ({"prompt": "hi", "stream_options": 1}, 400, "stream_options", ["stream_options"]),
    ({"prompt": "hi", "logprobs": -1}, 400, "logprobs", ["logprobs"]),
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs", ["logprobs", "20"]),
    ({"prompt": "hi", "echo": [True]}, 400, "echo", ["echo"]),
    ({"prompt": "hi", "suffix": "x"}, 400, "suffix", ["not supported"]),
]

CHAT = [
    (b"{", 400, None, ["not valid JSON"]),
    (b"[]", 400, None, ["JSON object"]),
    ({}, 400, "messages", ["messages", "required"]),
    ({"messages": []}, 400, "messages", ["messages"]),
    ({"messages": "hi"}, 400, "messages", ["messages"]),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", ["messages[0].role"]),
    ({"messages": [{"content": "hi"}]}, 400, "messages", ["role", "required"]),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages", ["content"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages", ["content"]),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages", ["text"]),
    ({"messages": [None]}, 400, "messages", ["messages[0]"]),
    ({"messages": [{"role": "user", "content": "hi " * 200}]}, 400, "messages", ["context"]),
    ({"messages": HI, "model": "gpt-4"}, 404, "model", ["gpt-4"]),
    ({"messages": HI, "max_tokens": 0}, 400, "max_tokens", ["max_tokens is 0"]),
    ({"messages": HI, "max_tokens": 10**9}, 400, "max_tokens", ["max_tokens", "context"]),
    ({"messages": HI, "max_completion_tokens": 0}, 400, "max_completion_tokens", ["max_completion_tokens"]),
    ({"messages": HI, "max_completion_tokens": 10**9}, 400, "max_completion_tokens", ["context"]),
    ({"messages": HI, "temperature": 3}, 400, "temperature", ["temperature"]),
    ({"messages": HI, "n": 129}, 400, "n", ["n"]),
    ({"messages": HI, "n": 100}, 400, "n", ["n=100", "--max-batch"]),
    ({"messages": HI, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs", ["top_logprobs", "20"]),
    ({"messages": HI, "top_logprobs": -1, "logprobs": True}, 400, "top_logprobs", ["top_logprobs"]),
    ({"messages": HI, "top_logprobs": 2}, 400, "top_logprobs", ["needs logprobs"]),
    ({"messages": HI, "logprobs": "some"}, 400, "logprobs", ["logprobs"]),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "not json"}}},
     400, "response_format", ["schema"]),
    ({"messages": HI, "stop": {"a": 1}}, 400, "stop", ["stop"]),
]


@pytest.mark.parametrize("body, status, param, words", COMPLETIONS, ids=range(len(COMPLETIONS)))
def test_completions_matrix(client, caplog, body, status, param, words):
    assert_openai_error(post(client, "/v1/completions", body), status, param, words)
    assert quiet(caplog)


@pytest.mark.parametrize("body, status, param, words", CHAT, ids=range(len(CHAT)))
def test_chat_completions_matrix(client, caplog, body, status, param, words):
    assert_openai_error(post(client, "/v1/chat/completions", body), status, param, words)
    assert quiet(caplog)


@pytest.mark.parametrize("method, path, status, words", [
    ("POST", "/v1/models", 405, ["/v1/models", "not allowed"]),
    ("POST", "/health", 405, ["/health"]),
    ("GET", "/v1/completions", 405, ["/v1/completions"]),
    ("DELETE", "/v1/chat/completions", 405, ["/v1/chat/completions"]),
    ("GET", "/v1/no/such/route", 404, ["/v1/no/such/route", "not found"]),
])
def test_other_endpoints_matrix(client, method, path, status, words):
    assert_openai_error(client.request(method, path), status, None, words)


def test_the_get_endpoints_answer(client):
    assert client.get("/health").json() == {"status": "ok"}
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == MODEL and model["max_model_len"] == CONTEXT
    page = client.get("/")
    assert page.status_code == 200 and "max_model_len" in page.text  # the page keeps max_tokens within it
    # a query string changes nothing
    assert client.get("/health?x=%ff").json() == {"status": "ok"}


def test_refused_requests_leave_the_server_serving(client):
    for body, *_ in COMPLETIONS[:8]:
        post(client, "/v1/completions", body)
    r = post(client, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ---- text that is not valid Unicode: read as U+FFFD and served ----------------------------------------

@pytest.mark.parametrize("path, body, seen", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "a\ufffdb"),
    ("/v1/completions", {"prompt": ["\udfff hi"]}, "\ufffd hi"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, "hi"),
    ("/v1/completions", b'{"prompt": "a\xff\xfeb"}', "a\ufffd\ufffdb"),           # bytes that are not UTF-8
    ("/v1/completions", b'{"prompt": "a\xed\xa0\x80b"}', "a\ufffd\ufffd\ufffdb"),  # a surrogate, UTF-8 encoded
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "\ufffd"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]},
     "x\ufffd"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xc3("}]}', "\ufffd("),
])
@pytest.mark.parametrize("stream", [False, True])
def test_text_that_is_not_valid_unicode_is_served_as_replacement_characters(client, tiny_llm, caplog, path, body,
                                                                            seen, stream):
    """Before: a lone surrogate reached the tokenizer and the server answered a bare 500 with a
    traceback in its log; bytes that are not UTF-8 got "There was an error parsing the body"."""
    if isinstance(body, dict):
        body = {**body, "max_tokens": 3, "temperature": 0, "stream": stream,
                "stream_options": {"include_usage": True}}
    else:
        body = body[:-1] + b', "max_tokens": 3, "temperature": 0, "stream": %s, ' \
                           b'"stream_options": {"include_usage": true}}' % json.dumps(stream).encode()
    caplog.set_level(logging.WARNING, logger="camelid.serve")
    r = post(client, path, body)
    assert r.status_code == 200, r.text
    if "chat" in path:
        expected = len(tiny_llm.tokenizer.encode_chat([{"role": "user", "content": seen}]))
    else:
        expected = len(tiny_llm.encode_prompt(seen))
    if stream:
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
    else:
        usage = r.json()["usage"]
    assert usage["prompt_tokens"] == expected
    assert quiet(caplog)
    assert any("U+FFFD" in record.getMessage() for record in caplog.records)  # and the log says so


def test_an_error_that_quotes_bad_text_is_still_sent(client):
    error = assert_openai_error(post(client, "/v1/completions", {"prompt": "hi", "model": "m\ud800"}), 404, "model")
    assert "m\ufffd" in error["message"]


def test_the_request_models_clean_text_themselves():
    r = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "\ud800"}],
                                              "stop": "\udfff", "model": "\ud83d"})
    assert r.messages[0].content == "\ufffd" and r.stop == "\ufffd" and r.model == "\ufffd"
    assert CompletionRequest.model_validate({"prompt": ["a\ud800"]}).prompt == ["a\ufffd"]


# ---- property: arbitrary JSON-ish bodies give 200 or a clear 4xx ------------------------------------------

# text with lone surrogates (st.text leaves them out) and chat markup, and values of every JSON
# type, nested a little
CHARACTER = st.characters(exclude_categories=()) | st.characters(categories=["Cs"]) | st.sampled_from("<|>\\\"")
TEXT = st.lists(CHARACTER, max_size=12).map("".join)
SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) \
    | TEXT
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)
SMALL = st.integers(1, 6)
ROLE = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2)
# well-formed requests whose text is anything, and the same with any field possibly garbage
GOOD_SAMPLING = {"model": st.just(MODEL), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
                 "stop": TEXT | st.lists(TEXT, max_size=2), "seed": st.integers(0, 2**64 - 1),
                 "stream": st.booleans(), "max_tokens": SMALL}
ANY_SAMPLING = {key: value | JSONISH for key, value in GOOD_SAMPLING.items()} | {"n": st.just(1) | JSONISH}
GOOD_MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT | st.none() | PARTS})
ANY_MESSAGE = st.fixed_dictionaries({"role": ROLE | JSONISH, "content": TEXT | PARTS | JSONISH})
GOOD_PROMPT = TEXT | st.lists(st.integers(0, 511), min_size=1, max_size=4) | st.lists(TEXT, min_size=1, max_size=1)
COMPLETION_BODY = st.fixed_dictionaries({"prompt": GOOD_PROMPT}, optional=GOOD_SAMPLING) \
    | st.fixed_dictionaries({"prompt": GOOD_PROMPT | st.lists(st.integers(-2, 600), max_size=4)
                             | st.lists(TEXT, max_size=2) | JSONISH}, optional=ANY_SAMPLING)
CHAT_BODY = st.fixed_dictionaries({"messages": st.lists(GOOD_MESSAGE, min_size=1, max_size=3)},
                                  optional={**GOOD_SAMPLING, "max_completion_tokens": SMALL}) \
    | st.fixed_dictionaries({"messages": st.lists(ANY_MESSAGE | GOOD_MESSAGE, max_size=3) | JSONISH},
                            optional={**ANY_SAMPLING, "max_completion_tokens": SMALL | JSONISH})
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


def answers_cleanly(r) -> None:
    event(f"HTTP {r.status_code}")
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code == 200:
        assert r.text.endswith("data: [DONE]\n\n") or r.json()["choices"]
    else:
        assert_openai_error(r, r.status_code, r.json()["error"]["param"])


@PROPERTY
@given(body=COMPLETION_BODY | JSONISH)
def test_property_any_completion_body_gets_200_or_a_clear_4xx(client, body):
    if isinstance(body, dict) and body.get("max_tokens") is None:
        body["max_tokens"] = 2  # keep the served ones short: the default is 16 tokens
    answers_cleanly(post(client, "/v1/completions", body))


@PROPERTY
@given(body=CHAT_BODY | JSONISH)
def test_property_any_chat_body_gets_200_or_a_clear_4xx(client, body):
    if isinstance(body, dict) and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2  # the default is the whole context
    answers_cleanly(post(client, "/v1/chat/completions", body))


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=40) | TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_property_any_bytes_get_a_clear_answer(client, raw):
    r = post(client, "/v1/completions", b'{"max_tokens": 1, "prompt": "' + raw + b'"}')
    answers_cleanly(r)
    answers_cleanly(post(client, "/v1/chat/completions", raw))


@settings(max_examples=150, deadline=None)
@given(data=CHAT_BODY | COMPLETION_BODY | JSONISH)
def test_property_the_request_models_refuse_or_hold_valid_text(data):
    for model in (ChatCompletionRequest, CompletionRequest):
        try:
            parsed = model.model_validate(data)
        except ValidationError as e:
            assert e.errors()  # a clear refusal, field by field
        else:
            parsed.model_dump_json()  # every string in it encodes as UTF-8
