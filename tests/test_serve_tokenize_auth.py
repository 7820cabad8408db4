"""The server's /tokenize and /detokenize (vLLM's shapes) and --api-key (Bearer token, 401 in
OpenAI's error shape otherwise, the chat page and /health open). In-process, tiny model."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from camelid.generate import LLM
from camelid.serve import Batcher, create_app
from test_model import tiny
from test_serve_errors import assert_openai_error, post

MODEL, KEY = "tiny", "s3cret-key"


@pytest.fixture(scope="module")
def tiny_llm(bpe_tokenizer):
    return LLM(tiny("tiny"), bpe_tokenizer, compile=False)


def app(llm, api_key=None):
    return TestClient(create_app(llm, Batcher(llm.engine, llm.tokenizer, max_batch=2, context=64), MODEL,
                                 api_key=api_key), raise_server_exceptions=True)


def test_tokenize_and_detokenize_round_trip(tiny_llm):
    with app(tiny_llm) as client:
        r = post(client, "/tokenize", {"prompt": "Hello, llama!"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == tiny_llm.encode_prompt("Hello, llama!") and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == 64
        bare = post(client, "/tokenize", {"prompt": "Hello, llama!", "add_special_tokens": False}).json()["tokens"]
        assert bare == tiny_llm.tokenizer.encode("Hello, llama!", bos=False, eos=False)
        messages = [{"role": "user", "content": "Hi!"}]
        chat = post(client, "/tokenize", {"messages": messages}).json()["tokens"]
        assert chat == tiny_llm.tokenizer.encode_chat(messages)    # what /v1/chat/completions prefills
        r = post(client, "/detokenize", {"tokens": bare})
        assert r.status_code == 200 and r.json() == {"prompt": tiny_llm.tokenizer.decode(bare)}


@pytest.mark.parametrize("path, body, param, words", [
    ("/tokenize", {}, None, ["either 'prompt'", "or 'messages'"]),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, None, ["not both"]),
    ("/tokenize", {"prompt": "a", "model": "other"}, "model", ["does not exist"]),
    ("/detokenize", {"tokens": [1, 99999]}, "tokens", ["99999", "outside the vocabulary"]),
    ("/detokenize", {"tokens": "abc"}, "tokens", ["tokens"]),
])
def test_bad_tokenize_requests_get_a_4xx_naming_the_field(tiny_llm, path, body, param, words):
    with app(tiny_llm) as client:
        status = 404 if param == "model" else 400
        assert_openai_error(post(client, path, body), status, param, words)


def test_the_api_key_is_required_where_the_server_has_one(tiny_llm):
    with app(tiny_llm, api_key=KEY) as client:
        body = {"prompt": "Hi", "max_tokens": 2}
        error = assert_openai_error(post(client, "/v1/completions", body), 401, None, ["Authorization: Bearer"])
        assert error["code"] == "invalid_api_key"
        wrong = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert_openai_error(wrong, 401, None, ["wrong"])
        assert client.get("/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        ok = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
        assert client.post("/tokenize", json={"prompt": "a"}).status_code == 401
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    with app(tiny_llm) as client:   # no key set: nothing asked for
        assert client.get("/v1/models").status_code == 200


def test_metrics_in_prometheus_format_count_what_the_server_did(tiny_llm):
    """After two completions sharing a prompt: requests by route and status, tokens in and out,
    the latency histograms and the prefix cache's hits, in the text format a Prometheus server
    parses."""
    from prometheus_client.parser import text_string_to_metric_families

    with app(tiny_llm, api_key=KEY) as client:
        auth = {"Authorization": f"Bearer {KEY}"}
        prompt = list(range(5, 45))                     # 40 tokens: two full blocks of 16, then 8
        for _ in range(2):
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0},
                            headers=auth)
            assert r.status_code == 200
        assert client.post("/v1/completions", json={"prompt": prompt}).status_code == 401
        client.get("/no/such/route", headers=auth)
        assert client.get("/metrics").status_code == 401       # behind the key like the API
        r = client.get("/metrics", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}

    def value(name, **labels):
        return samples[name, tuple(sorted((k, str(v)) for k, v in labels.items()))]

    assert value("camelid_http_requests_total", path="/v1/completions", status=200) == 2
    assert value("camelid_http_requests_total", path="/v1/completions", status=401) == 1
    assert value("camelid_http_requests_total", path="other", status=404) == 1
    assert value("camelid_prompt_tokens_total") == 80
    assert value("camelid_prompt_tokens_computed_total") == 40 + 8       # the second found two blocks
    assert value("camelid_prefix_cache_hits_total") == 2 and value("camelid_prefix_cache_queries_total") == 4
    assert value("camelid_prefix_cache_hit_rate") == 0.5
    assert 2 <= value("camelid_generation_tokens_total") <= 6
    assert value("camelid_time_to_first_token_seconds_count") == 2
    assert value("camelid_time_per_output_token_seconds_count") == value("camelid_generation_tokens_total") - 2
    assert value("camelid_requests_running") == 0 and value("camelid_requests_waiting") == 0
    assert value("camelid_kv_cache_blocks_used") == 0 and value("camelid_kv_cache_blocks") == 2 * 4
