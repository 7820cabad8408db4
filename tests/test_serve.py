"""camelid serve: the per-row KV cache writes, the continuous batcher against one-prompt-at-a-time
generation, and a real server (a `camelid serve` subprocess with SmolLM2) spoken to by the official
openai client and by raw httpx requests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import pytest
import torch

from camelid.cli.main import main
from camelid.generate import LLM, SamplingParams
from camelid.model import KVCache
from camelid.serve import Batcher, Event, Job, QueueFull
from test_model import tiny

MODEL_NAME = "smol"


# ---- the KV cache's per-row slots ---------------------------------------------------------------

def test_per_row_slots_write_each_row_at_its_own_position():
    model = tiny()
    cache = KVCache(model.config, batch=3, max_len=8)
    layer = cache.layers[0]
    K, D = layer.k.shape[1], layer.k.shape[3]
    k = torch.randn(2, K, 1, D)
    v = torch.randn(2, K, 1, D)
    slots = torch.tensor([[5], [2]])
    keys, values = layer.update(slots, k, v)
    assert keys.shape == (2, K, 8, D)                      # rows 0..1, every slot
    torch.testing.assert_close(layer.k[0, :, 5], k[0, :, 0])
    torch.testing.assert_close(layer.v[1, :, 2], v[1, :, 0])
    assert layer.k.count_nonzero() == k.count_nonzero()    # nothing else was touched


def test_a_cache_view_shares_memory_with_the_cache():
    model = tiny()
    cache = KVCache(model.config, batch=3, max_len=8)
    view = cache.view(slice(1, 2), 8)
    assert view.batch == 1 and view.max_len == 8
    k = torch.ones(1, view.layers[0].k.shape[1], 3, view.layers[0].k.shape[3])
    view.layers[0].update(None, k, k)
    assert cache.layers[0].k[1, :, :3].eq(1).all() and cache.layers[0].k[[0, 2]].eq(0).all()


# ---- the batcher, driven step by step -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llm(bpe_tokenizer):
    return LLM(tiny("tiny"), bpe_tokenizer, compile=False)


class Collector:
    def __init__(self):
        self.text, self.done = "", None

    def __call__(self, event: Event) -> None:
        assert self.done is None, "an event after the last one"
        self.text += event.text
        if event.finish_reason or event.error:
            self.done = event


def run_to_completion(batcher: Batcher, collectors, steps: int = 500) -> None:
    for _ in range(steps):
        if all(c.done for c in collectors):
            return
        batcher.step()
    raise AssertionError("the batcher did not finish every job")


def test_batched_decode_equals_each_prompt_alone(tiny_llm):
    """Prompts of different lengths and budgets, admitted at different steps, some into rows that
    earlier requests used (stale cache contents), decode exactly as each would alone."""
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [99], [3, 4], [200, 201, 202, 203], [1] * 20]
    budgets = [12, 3, 9, 14, 5, 8]
    batcher = Batcher(tiny_llm.engine, tiny_llm.tokenizer, max_batch=3, context=64, max_queue=8)
    collectors = [Collector() for _ in prompts]
    greedy = SamplingParams(temperature=0)
    for p, n, c in list(zip(prompts, budgets, collectors))[:2]:
        batcher.submit(Job(p, greedy.updated(max_new_tokens=n), c))
    batcher.step()
    batcher.step()
    for p, n, c in list(zip(prompts, budgets, collectors))[2:]:  # four more, for one free row
        batcher.submit(Job(p, greedy.updated(max_new_tokens=n), c))
    run_to_completion(batcher, collectors)
    for p, n, c in zip(prompts, budgets, collectors):
        alone = tiny_llm.generate_batch([p], max_new_tokens=n, temperature=0)[0]
        assert (c.text, c.done.finish_reason, c.done.completion_tokens) == \
               (alone.text, alone.finish_reason, len(alone.tokens))
        assert c.done.prompt_tokens == len(p)


@pytest.mark.slow
def test_the_batcher_decodes_with_the_compiled_step(bpe_tokenizer):
    """The server's batcher runs the generation core's compiled step (rows and windows rounded
    up to few shapes), and its tokens are those of each prompt alone, eagerly."""
    llm = LLM(tiny("tiny"), bpe_tokenizer, compile=False).compile(background=False, cache_dir=None)
    eager = LLM(tiny("tiny"), bpe_tokenizer, compile=False)
    batcher = Batcher(llm.engine, llm.tokenizer, max_batch=2, context=64)
    prompts, budgets = [[5, 17, 42], [7, 8, 9, 10, 11]], [12, 6]
    collectors = [Collector() for _ in prompts]
    for p, n, c in zip(prompts, budgets, collectors):
        batcher.submit(Job(p, SamplingParams(temperature=0, max_new_tokens=n), c))
    run_to_completion(batcher, collectors)
    assert llm.engine.decode_steps["eager"] == 0 and llm.engine.decode_steps["compiled"] > 0
    for p, n, c in zip(prompts, budgets, collectors):
        assert c.text == eager.generate_batch([p], max_new_tokens=n, temperature=0)[0].text


def test_seeded_sampling_does_not_depend_on_batch_mates(tiny_llm):
    sampling = SamplingParams(temperature=0.9, top_p=0.95)
    batcher = Batcher(tiny_llm.engine, tiny_llm.tokenizer, max_batch=4, context=64)
    collectors = [Collector() for _ in range(4)]
    for i, c in enumerate(collectors):
        batcher.submit(Job([5, 17, 42 + i], sampling.updated(max_new_tokens=10, seed=i), c))
    run_to_completion(batcher, collectors)
    for i, c in enumerate(collectors):
        alone = tiny_llm.generate_batch([[5, 17, 42 + i]], max_new_tokens=10, temperature=0.9, top_p=0.95,
                                        seed=i)[0]
        assert c.text == alone.text


def test_stop_strings_end_the_text_before_them(tiny_llm):
    prompt = [5, 17, 42]
    free = tiny_llm.generate_batch([prompt], max_new_tokens=16, temperature=0)[0]
    stop = free.text[len(free.text) // 2:][:3]
    assert stop
    batcher = Batcher(tiny_llm.engine, tiny_llm.tokenizer, max_batch=2, context=64)
    c = Collector()
    batcher.submit(Job(prompt, SamplingParams(temperature=0, max_new_tokens=16, stop=stop), c))
    run_to_completion(batcher, [c])
    expected = tiny_llm.generate_batch([prompt], max_new_tokens=16, temperature=0, stop=[stop])[0]
    assert c.text == expected.text and stop not in c.text and c.done.finish_reason == "stop"


def test_a_cancelled_job_frees_its_row_and_hears_nothing_more(tiny_llm):
    batcher = Batcher(tiny_llm.engine, tiny_llm.tokenizer, max_batch=1, context=64, max_queue=1)
    first, second = Collector(), Collector()
    job = Job([5, 17, 42], SamplingParams(temperature=0, max_new_tokens=50), first)
    batcher.submit(job)
    batcher.step()
    assert batcher.active == 1
    job.cancel()
    batcher.submit(Job([7, 8], SamplingParams(temperature=0, max_new_tokens=3), second))
    run_to_completion(batcher, [second])
    assert first.done is None and second.done.completion_tokens == 3 and batcher.active == 0


def test_the_waiting_line_is_bounded(tiny_llm):
    batcher = Batcher(tiny_llm.engine, tiny_llm.tokenizer, max_batch=1, context=64, max_queue=1)
    batcher.submit(Job([5], SamplingParams(0, max_new_tokens=3), Collector()))  # for the row
    batcher.submit(Job([6], SamplingParams(0, max_new_tokens=3), Collector()))  # and the line
    with pytest.raises(QueueFull, match="busy"):
        batcher.submit(Job([7], SamplingParams(0, max_new_tokens=3), Collector()))


# ---- the command line -----------------------------------------------------------------------------

def test_serve_with_a_bad_path_says_so_in_one_line(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing.gguf" in err


def test_serve_refuses_a_bad_batch_size(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "m.gguf"), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


# ---- a real server ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_path, tmp_path, *flags: str, timeout: float = 90.0):
    """A `camelid serve` subprocess on a free loopback port; yields its base URL once /health
    answers, and stops it (SIGTERM, then SIGKILL) at the end."""
    import httpx

    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "camelid.cli.main", "serve", "--model", str(model_path),
                                 "--port", str(port), "--model-name", MODEL_NAME, *flags],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"camelid serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).json() == {"status": "ok"}:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"camelid serve did not answer /health in {timeout} s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    # eager decoding: these tests check the API, and a background compilation would only compete
    # with the test suite for the CPU (the batcher's compiled step is tested in-process above)
    with running_server(smollm2_gguf, tmp_path_factory.mktemp("serve"), "--max-batch", "8",
                        "--context", "512", "--no-compile") as url:
        yield url


@pytest.fixture(scope="module")
def one_slot_server(smollm2_gguf, tmp_path_factory):
    """One row and a waiting line of one: what a full queue and a freed slot need."""
    with running_server(smollm2_gguf, tmp_path_factory.mktemp("serve1"), "--max-batch", "1",
                        "--max-queue", "1", "--context", "1024", "--no-compile") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120)


COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9,"  # greedy SmolLM2 keeps counting: a reply that never ends


def real_server(test):
    """Marks for a test that talks to a `camelid serve` subprocess running SmolLM2."""
    return pytest.mark.slow(pytest.mark.real_model(pytest.mark.multiproc(test)))


@real_server
def test_models_health_and_chat_page(server, client):
    import httpx

    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME] and models.data[0].object == "model"
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and "src=\"http" not in page.text  # self-contained


@real_server
def test_completion_equals_in_process_greedy(client, smollm2):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL_NAME
    assert r.choices[0].text == smollm2.generate(prompt, max_new_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(smollm2.encode_prompt(prompt)) and r.usage.completion_tokens == 8
    streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    chunks = [c for c in streamed]
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 2


@real_server
def test_chat_equals_in_process_chat(client, smollm2):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = "".join(smollm2.chat_stream(messages, max_new_tokens=24, temperature=0))
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected and "Paris" in expected
    assert r.usage.prompt_tokens == len(smollm2.tokenizer.encode_chat(messages))
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


@real_server
def test_stop_strings_are_cut_and_held_back_across_chunks(client, smollm2):
    prompt = "The capital of France is"
    expected = smollm2.generate(prompt, max_new_tokens=12, temperature=0, stop=["answer"])
    for stream in (False, True):
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                      stop=["answer", "zzz"], stream=stream)
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == expected and "answer" not in text and "answ" not in "".join(
            c.choices[0].text for c in chunks[-2:])
        assert chunks[-1].choices[0].finish_reason == "stop"


@real_server
def test_32_concurrent_clients_get_their_own_greedy_answers(client, smollm2):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3,"]
    expected = {p: smollm2.generate(p, max_new_tokens=8, temperature=0) for p in prompts}

    def ask(i: int) -> tuple[str, str]:
        p = prompts[i % len(prompts)]
        if i % 2:
            chunks = client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=8, temperature=0, stream=True)
            return p, "".join(c.choices[0].text for c in chunks)
        return p, client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len(answers) == 32
    for p, text in answers:
        assert text == expected[p], p


@real_server
def test_json_schema_answers_of_smollm2_follow_the_schema(client):
    """Structured output on the real model, through the official client: sampled at temperature
    1, every answer parses and validates."""
    import jsonschema

    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
              "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20},
                             "population": {"type": "integer", "minimum": 0, "maximum": 40000000}}}
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Describe the capital of France as JSON."}],
        temperature=1.0, seed=1, n=4, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    assert len(r.choices) == 4
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)


@real_server
def test_echo_logprobs_of_smollm2_equal_camelid_eval(client, smollm2):
    """lm-evaluation-harness's local-completions request, through the official client."""
    from camelid.eval.requests import encode_pair
    from camelid.eval.scoring import Scorer

    pairs = [encode_pair(smollm2.tokenizer, "The capital of France is", c) for c in (" Paris", " a cheese")]
    expected = Scorer(smollm2).loglikelihood_tokens(pairs)
    for pair, (loglikelihood, greedy) in zip(pairs, expected):
        r = client.completions.create(model=MODEL_NAME, prompt=pair.context + pair.continuation, max_tokens=0,
                                      echo=True, logprobs=1, temperature=0)
        scored = r.choices[0].logprobs.token_logprobs[len(pair.context):]
        assert sum(scored) == pytest.approx(loglikelihood, abs=1e-4)
    assert expected[0][0] > expected[1][0]


@real_server
def test_camelid_eval_through_the_server_equals_in_process_on_smollm2(server, smollm2, tmp_path):
    """Issue 16's remote backend: a multiple-choice file scored through `camelid serve` gives the
    in-process log-likelihoods within 1e-4, hence the same accuracy."""
    from camelid.eval import evaluate
    from camelid.eval.remote import RemoteScorer

    path = tmp_path / "capitals.jsonl"
    docs = [("The capital of France is", ["Paris", "Rome", "Berlin"], 0),
            ("The capital of Italy is", ["Madrid", "Rome", "Paris"], 1),
            ("The largest planet is", ["Mars", "Venus", "Jupiter"], 2)]
    path.write_text("".join(json.dumps({"query": q, "choices": c, "gold": g}) + "\n" for q, c, g in docs))
    remote = RemoteScorer(f"{server}/v1", smollm2.tokenizer)
    here = evaluate(smollm2, [str(path)], log_samples=True)
    there = evaluate(remote, [str(path)], log_samples=True)
    task = next(iter(here["results"]))
    assert there["results"][task]["acc"] == here["results"][task]["acc"]
    for a, b in zip(here["samples"][task], there["samples"][task]):
        assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=1e-4)


@real_server
def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=7, **kwargs).choices[0].text
    b = client.completions.create(seed=7, **kwargs).choices[0].text
    assert a == b


BAD_REQUESTS = [
    # (endpoint, body, status, param)
    ("completions", b'{"prompt": "hi", ', 400, None),                                        # invalid JSON
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("completions", {"prompt": "hello " * 600}, 400, "prompt"),                              # over --context 512
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * 600}]}, 400, "messages"),
    ("completions", {"prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    ("completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 100}, 400, "n"),
    ("completions", {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("completions", {"prompt": [1, 10**9]}, 400, "prompt"),                                  # not a token id
    ("completions", {"prompt": "hi", "stop": 3}, 400, "stop"),
    ("completions", {"prompt": ["a", ""]}, 400, "prompt"),
    ("completions", {"max_tokens": 4}, 400, "prompt"),                                      # no prompt
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("completions", [1, 2, 3], 400, None),                                                  # not an object
]


@real_server
def test_bad_requests_get_openai_style_errors(server):
    import httpx

    with httpx.Client(base_url=f"{server}/v1", timeout=30) as http:
        for endpoint, body, status, param in BAD_REQUESTS:
            if isinstance(body, bytes):
                r = http.post(endpoint, content=body, headers={"Content-Type": "application/json"})
            else:
                r = http.post(endpoint, json=body)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert error["message"] and error["type"] and error["param"] == param, (body, error)
        r = http.get("/no/such/route")
        assert r.status_code == 404 and r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}  # and the server is fine


@real_server
def test_a_full_queue_answers_503_and_a_disconnect_frees_the_slot(one_slot_server):
    import httpx

    endless = {"prompt": COUNTING, "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=f"{one_slot_server}/v1", timeout=60) as http, ExitStack() as streams:
        running = streams.enter_context(http.stream("POST", "completions", json=endless))
        assert running.status_code == 200
        lines = running.iter_lines()               # kept: a dropped iterator closes the stream
        next(lines)                                # it holds the only row now
        waiting = streams.enter_context(http.stream("POST", "completions", json=endless))
        assert waiting.status_code == 200          # accepted, waiting for the row
        refused = http.post("completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and "busy" in refused.json()["error"]["message"]
    # Both clients went away mid-stream: their jobs are dropped, and a new request gets the row
    # at once, not after the 1000 tokens the first one asked for (a minute on this CPU). The
    # server learns of a disconnect asynchronously, so a request sent in that instant may still
    # find the line full.
    t0 = time.monotonic()
    while True:
        r = httpx.post(f"{one_slot_server}/v1/completions", timeout=20,
                       json={"prompt": "hi", "max_tokens": 4, "temperature": 0})
        if r.status_code != 503 or time.monotonic() - t0 > 3:
            break
        time.sleep(0.1)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - t0 < 15


@real_server
def test_a_client_that_gives_up_on_a_plain_request_frees_the_slot(one_slot_server):
    import httpx

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{one_slot_server}/v1/completions", json={"prompt": COUNTING, "max_tokens": 1000,
                                                              "temperature": 0}, timeout=2)
    r = httpx.post(f"{one_slot_server}/v1/chat/completions", timeout=20,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
