"""Clients that misbehave at the socket level, against a real uvicorn server (in a thread, tiny
model): one that sends its body slowly or never gets a 408 within the bound, and one that opens
a stream and never reads it holds no row: its request runs to its end, its blocks come back,
and others are served meanwhile."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

import camelid.serve.app as serve_app
from camelid.generate import LLM
from camelid.serve import Batcher, create_app
from test_model import tiny


@pytest.fixture(scope="module")
def tiny_llm(bpe_tokenizer):
    return LLM(tiny("tiny"), bpe_tokenizer, compile=False)


@contextmanager
def serving(llm: LLM):
    batcher = Batcher(llm.engine, llm.tokenizer, max_batch=2, context=256, max_queue=2)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(llm, batcher, "tiny"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1], batcher
    finally:
        server.should_exit = True
        thread.join(10)


def raw_request(port: int, head: bytes, receive_buffer: int | None = None) -> socket.socket:
    client = socket.socket()
    if receive_buffer:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    client.connect(("127.0.0.1", port))
    client.sendall(head)
    return client


def read_all(client: socket.socket, timeout: float) -> bytes:
    client.settimeout(timeout)
    data = b""
    while True:
        chunk = client.recv(65536)
        if not chunk:
            return data
        data += chunk


def completion(port: int) -> dict:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                   json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_body_sent_slowly_gets_408_in_bounded_time_and_others_are_served(tiny_llm, monkeypatch):
    monkeypatch.setattr(serve_app, "BODY_TIMEOUT_S", 1.0)
    with serving(tiny_llm) as (port, _):
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        t0 = time.monotonic()
        slow = raw_request(port, head + body[:5])          # the rest never comes
        assert completion(port)["choices"][0]["finish_reason"] == "length"   # served meanwhile
        answer = read_all(slow, timeout=10)
        assert time.monotonic() - t0 < 5
        status, _, rest = answer.partition(b"\r\n")
        assert b" 408 " in status, answer[:300]
        error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert "did not arrive in full within 1 s" in error["message"] and error["code"] == "request_timeout"


def test_a_stream_never_read_holds_no_row_and_gives_its_blocks_back(tiny_llm):
    with serving(tiny_llm) as (port, batcher):
        body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 200, "temperature": 0, "stream": True,
                           "logprobs": 5}).encode()   # large chunks: the socket buffers fill
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        start = batcher.generated_tokens
        stuck = raw_request(port, head + body, receive_buffer=1024)
        try:
            deadline = time.monotonic() + 60
            while batcher.generated_tokens - start < 200 or batcher.active:
                assert time.monotonic() < deadline, "the unread stream's request did not run to its end"
                time.sleep(0.05)
            assert batcher.pool.used == 0       # every block back in the pool
            assert len(completion(port)["choices"]) == 1   # and the server answers others
        finally:
            stuck.close()
