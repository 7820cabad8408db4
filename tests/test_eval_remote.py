"""camelid eval with an OpenAI-compatible server as the model (`--model openai:URL`): through
camelid's own server (uvicorn in a thread, tiny model) the log-likelihoods equal in-process
scoring within 1e-4 and the accuracy is the same; a server that answers without
log-probabilities, with errors, or not at all gets a message naming it."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from fastapi import FastAPI

import camelid.eval.remote as remote
from camelid.errors import CamelidError
from camelid.eval import evaluate
from camelid.eval.requests import Loglikelihood, Rolling, encode_pair
from camelid.eval.scoring import Scorer
from camelid.eval.remote import RemoteScorer
from camelid.generate import LLM
from test_serve_clients import serving
from test_model import tiny


@pytest.fixture(scope="module")
def tiny_llm(bpe_tokenizer):
    return LLM(tiny("tiny"), bpe_tokenizer, compile=False)


@pytest.fixture(scope="module")
def server(tiny_llm):
    with serving(tiny_llm) as (port, _):
        yield f"http://127.0.0.1:{port}/v1"


PAIRS = [("The king is", " dead"), ("To be, or not to be:", " that is the question"), ("A horse!", " a horse!")]


def test_loglikelihoods_through_the_server_equal_in_process_scoring(server, tiny_llm):
    remote_scorer = RemoteScorer(server, tiny_llm.tokenizer, batch_size=2, concurrency=2)
    assert remote_scorer.context() == 256
    requests = [Loglikelihood(c, x) for c, x in PAIRS]
    here, there = Scorer(tiny_llm).loglikelihood(requests), remote_scorer.loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(here, there):
        assert b == pytest.approx(a, abs=1e-4) and greedy_a == greedy_b
    rolling = [Rolling("Shall I compare thee to a summer's day? Thou art more lovely and more temperate.")]
    (a, n), = Scorer(tiny_llm).loglikelihood_rolling(rolling, stride=200)
    (b, m), = remote_scorer.loglikelihood_rolling(rolling)
    assert n == m and b == pytest.approx(a, abs=1e-4)


def test_a_multiple_choice_file_scores_the_same_through_the_server(server, tiny_llm, tmp_path):
    path = tmp_path / "questions.jsonl"
    docs = [{"query": q, "choices": ["a sword", "a horse", "a crown"], "gold": i % 3}
            for i, q in enumerate(["Richard wants", "The king's gift is", "Macbeth sees"])]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    here = evaluate(tiny_llm, [str(path)], log_samples=True)
    there = evaluate(RemoteScorer(server, tiny_llm.tokenizer, batch_size=2), [str(path)], log_samples=True)
    task = path.stem if path.stem in here["results"] else next(iter(here["results"]))
    assert here["results"][task] == there["results"][task]
    assert there["config"]["model"] == server


def test_generation_through_the_server_equals_in_process(server, tiny_llm):
    from camelid.eval.requests import Generate

    requests = [Generate("Once upon a time", max_new_tokens=6), Generate("The king", stop=("\n",), max_new_tokens=5)]
    assert RemoteScorer(server, tiny_llm.tokenizer).generate(requests) == Scorer(tiny_llm).generate(requests)


# ---- servers that fail -------------------------------------------------------------------------------

@contextmanager
def stand_in(app: FastAPI):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(5)


def failing_app(status: int, body: dict, calls: list) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions():
        from fastapi.responses import JSONResponse

        calls.append(1)
        return JSONResponse(body, status_code=status)

    return app


@pytest.mark.parametrize("status, body, tries, words", [
    (200, {"choices": [{"index": 0, "text": "x", "logprobs": None}]}, 1, ["no log-probabilities", "echo"]),
    (401, {"error": {"message": "the API key is wrong"}}, 1, ["refused", "401", "the API key is wrong"]),
    (503, {"error": {"message": "busy"}}, 5, ["failed 5 times", "503", "busy"]),
    (200, {"choices": []}, 1, ["0 choices for 1 prompts"]),
])
def test_a_failing_server_is_named_with_what_went_wrong(bpe_tokenizer, monkeypatch, status, body, tries, words):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    calls: list = []
    with stand_in(failing_app(status, body, calls)) as url:
        with pytest.raises(CamelidError) as e:
            RemoteScorer(url, bpe_tokenizer).loglikelihood_tokens([encode_pair(bpe_tokenizer, "a", " b")])
    assert url in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert len(calls) == tries   # retried only what may pass


def test_an_unreachable_server_is_said_at_once(bpe_tokenizer):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(CamelidError, match=f"127.0.0.1:{port}.*cannot reach"):
        RemoteScorer(f"http://127.0.0.1:{port}/v1", bpe_tokenizer).context()


# ---- the command line -----------------------------------------------------------------------------

def test_camelid_eval_scores_a_server_as_the_model(server, tiny_llm, tmp_path, capsys):
    from test_errors_generate import run

    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    tiny_llm.tokenizer.save(tokenizer_dir)
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"query": q, "choices": ["yes", "no"], "gold": 0}) + "\n"
                            for q in ["Is the king dead?", "Is Yorick alive?"]))
    code, out, err = run(capsys, "eval", "--model", f"openai:{server}", "--tokenizer", str(tokenizer_dir),
                         "--tasks", str(path), "--output", str(tmp_path / "out.json"), "--batch-size", "2")
    assert code == 0, err
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["config"]["model"] == server and written["results"]
    assert written["results"] == evaluate(tiny_llm, [str(path)])["results"]


@pytest.mark.parametrize("extra, words", [
    ([], ["give --tokenizer"]),
    (["--tokenizer", "TOK", "--quantize", "int8"], ["--quantize", "the server decides"]),
    (["--tokenizer", "TOK", "--concurrency", "0"], ["--concurrency"]),
    (["--tokenizer", "TOK", "--rate", "0"], ["--rate above 0"]),
    (["--tokenizer", "TOK", "--rate", "fast"], ["--rate", "'fast'"]),
    (["--tokenizer", "/nowhere/model"], ["/nowhere/model"]),
])
def test_bad_server_options_are_one_line(tmp_path, capsys, tiny_llm, extra, words):
    from test_errors_generate import one_line_error

    (tmp_path / "tok").mkdir()
    tiny_llm.tokenizer.save(tmp_path / "tok")
    (tmp_path / "q.jsonl").write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    argv = ["eval", "--model", "openai:http://127.0.0.1:9/v1", "--tasks", str(tmp_path / "q.jsonl"),
            "--output", str(tmp_path / "o.json")] + [str(tmp_path / "tok") if a == "TOK" else a for a in extra]
    one_line_error(capsys, argv, words)


def test_an_unreachable_server_is_one_line(tmp_path, capsys, tiny_llm):
    from test_errors_generate import one_line_error

    (tmp_path / "tok").mkdir()
    tiny_llm.tokenizer.save(tmp_path / "tok")
    (tmp_path / "q.jsonl").write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    one_line_error(capsys, ["eval", "--model", "openai:http://127.0.0.1:9/v1", "--tokenizer", str(tmp_path / "tok"),
                            "--tasks", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "o.json")],
                   ["http://127.0.0.1:9/v1", "cannot reach"])


def test_text_prompts_find_the_continuation_by_its_offsets(server, tiny_llm):
    """For servers that take no token ids (llama-cpp-python's): the server tokenizes the whole
    text; the continuation is the tokens from the context's end on."""
    requests = [Loglikelihood(c, x) for c, x in PAIRS]
    here = Scorer(tiny_llm).loglikelihood(requests)
    there = RemoteScorer(server, tiny_llm.tokenizer, batch_size=2, text=True).loglikelihood(requests)
    for (a, _), (b, _) in zip(here, there):
        assert b == pytest.approx(a, abs=1e-4)
