"""The server's OpenAI API surface beyond plain text: logprobs and top_logprobs (equal to the
model's own log-probabilities and to `camelid eval`'s log-likelihoods), echo, n, several
prompts in one request, presence/frequency penalties and logit_bias (equal to `LLM.generate`
with the same settings), and response_format through constrained decoding (every sample
parses and validates). In-process, tiny model."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from fastapi.testclient import TestClient

from camelid.eval.requests import encode_pair
from camelid.eval.scoring import Scorer
from camelid.generate import LLM, SamplingParams
from camelid.serve import Batcher, create_app
from test_model import tiny
from test_serve_errors import post

MODEL = "tiny"
PERSON = {  # bounded: any path through it ends within the token budget
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["king", "fool", "ghost"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny_llm(bpe_tokenizer):
    return LLM(tiny("tiny"), bpe_tokenizer, compile=False)


@pytest.fixture(scope="module")
def client(tiny_llm):
    batcher = Batcher(tiny_llm.engine, tiny_llm.tokenizer, max_batch=4, context=256, max_queue=8)
    with TestClient(create_app(tiny_llm, batcher, MODEL)) as c:
        yield c


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def model_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """log p(token t+1 | tokens ..t) for each t, by one plain forward pass: [T-1]."""
    with torch.inference_mode():
        logp = torch.log_softmax(llm.model(torch.tensor([ids]))[0].float(), dim=-1)
    return logp[:-1].gather(-1, torch.tensor(ids[1:]).view(-1, 1)).squeeze(-1)


# ---- logprobs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("context, continuation", [("The king is", " dead"), ("To be, or not", " to be, that is")])
def test_echo_logprobs_equal_camelid_eval_loglikelihoods(client, tiny_llm, context, continuation):
    """What lm-evaluation-harness's local-completions sends: the whole text as token ids, echo,
    logprobs 1, max_tokens 0; the continuation's log-likelihood is the sum over its tokens."""
    pair = encode_pair(tiny_llm.tokenizer, context, continuation)
    (expected, greedy), = Scorer(tiny_llm).loglikelihood_tokens([pair])
    body = ok(post(client, "/v1/completions", {"prompt": pair.context + pair.continuation, "max_tokens": 0,
                                               "echo": True, "logprobs": 1, "temperature": 0}))
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(pair.context) + len(pair.continuation) and lp["token_logprobs"][0] is None
    scored = lp["token_logprobs"][len(pair.context):]
    assert sum(scored) == pytest.approx(expected, abs=1e-4)
    tops = lp["top_logprobs"][len(pair.context):]
    assert greedy == all(t >= max(top.values()) - 1e-6 for t, top in zip(scored, tops))
    assert choice["text"] == tiny_llm.tokenizer.decode(pair.context + pair.continuation)
    assert body["usage"]["completion_tokens"] == 0 and choice["finish_reason"] == "length"


@pytest.mark.parametrize("stop_next", [False, True])
def test_lm_evals_request_scores_the_continuation_whatever_comes_next(client, tiny_llm, stop_next):
    """lm-evaluation-harness's local-completions sends max_tokens 1 and reads token_logprobs
    [ctxlen:-1]: one entry past the prompt must be there, even when the next token is a stop
    token (forced here), which ends the text but still has its log-probability."""
    pair = encode_pair(tiny_llm.tokenizer, "The king is", " dead")
    (expected, _), = Scorer(tiny_llm).loglikelihood_tokens([pair])
    request = {"prompt": pair.context + pair.continuation, "max_tokens": 1, "echo": True, "logprobs": 1,
               "temperature": 0}
    if stop_next:
        request["logit_bias"] = {str(tiny_llm.tokenizer.eos_id): 100}
    choice = ok(post(client, "/v1/completions", request))["choices"][0]
    assert choice["finish_reason"] == ("stop" if stop_next else "length")
    token_logprobs = choice["logprobs"]["token_logprobs"]
    assert len(token_logprobs) == len(pair.context) + len(pair.continuation) + 1
    assert sum(token_logprobs[len(pair.context):-1]) == pytest.approx(expected, abs=1e-4)


def test_logprobs_of_a_vocabulary_padded_beyond_the_tokenizer(bpe_tokenizer):
    """Models pad their embedding past the tokenizer's last id (Qwen2.5: 151,936 for 151,665):
    those ids may rank among the top log-probabilities and still have a text (empty)."""
    from helpers import train_byte_bpe

    small = train_byte_bpe(480)
    llm = LLM(tiny("tiny"), small, compile=False)   # 512 embeddings, 480 tokens
    with TestClient(create_app(llm, Batcher(llm.engine, small, max_batch=2, context=128), MODEL)) as c:
        body = ok(post(c, "/v1/completions", {"prompt": [5, 6, 505], "max_tokens": 3, "echo": True, "logprobs": 20,
                                              "logit_bias": {"507": 100}, "temperature": 0}))
        lp = body["choices"][0]["logprobs"]
        assert lp["tokens"][2] == "" and lp["tokens"][-1] == "" and len(lp["top_logprobs"][1]) >= 1
        chat = ok(post(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                   "logprobs": True, "top_logprobs": 20, "temperature": 0}))
        assert len(chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20


def test_echo_with_a_completion_gives_prompt_and_new_token_logprobs(client, tiny_llm):
    prompt = "Once upon a time"
    body = ok(post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "echo": True, "logprobs": 2,
                                               "temperature": 0}))
    choice = body["choices"][0]
    ids = tiny_llm.encode_prompt(prompt)
    out = tiny_llm.generate_batch([ids], max_new_tokens=5, temperature=0)[0]
    assert choice["text"] == prompt + out.text
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 5
    reference = model_logprobs(tiny_llm, ids + out.tokens)
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), reference, atol=1e-4, rtol=0)
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])   # keyed by text; a piece of a character as bytes:\xNN
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_generated_token_logprobs_are_the_models_and_top_logprobs_rank_them(client, tiny_llm):
    messages = [{"role": "user", "content": "Name a play."}]
    body = ok(post(client, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0,
                                                    "logprobs": True, "top_logprobs": 3}))
    content = body["choices"][0]["logprobs"]["content"]
    prompt = tiny_llm.tokenizer.encode_chat(messages)
    out = tiny_llm.generate_batch([prompt], max_new_tokens=6, temperature=0)[0]
    text = b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace")
    assert text == out.text == body["choices"][0]["message"]["content"]
    assert all(e["token"].startswith("bytes:\\x") or e["token"] == bytes(e["bytes"]).decode() for e in content)
    reference = model_logprobs(tiny_llm, prompt + out.tokens)[len(prompt) - 1:]
    torch.testing.assert_close(torch.tensor([e["logprob"] for e in content]), reference, atol=1e-4, rtol=0)
    tokens = tiny_llm.tokenizer.token_bytes()
    for entry, token in zip(content, out.tokens):
        assert bytes(entry["bytes"]) == tokens[token]
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)  # greedy: the top one
        ranks = [t["logprob"] for t in entry["top_logprobs"]]
        assert ranks == sorted(ranks, reverse=True)


def test_logprobs_stream_with_their_tokens(client, tiny_llm):
    with client.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0,
                                                        "logprobs": 0, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    whole = ok(post(client, "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "temperature": 0, "logprobs": 0}))
    assert streamed == pytest.approx(whole["choices"][0]["logprobs"]["token_logprobs"], abs=1e-6)
    assert len(streamed) == 5


# ---- n and several prompts ---------------------------------------------------------------------------

def test_n_choices_are_numbered_reproducible_with_a_seed_and_differ(client, tiny_llm):
    request = {"prompt": "Hi", "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 7}
    first, again = ok(post(client, "/v1/completions", request)), ok(post(client, "/v1/completions", request))
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in again["choices"]]
    assert len(set(texts)) == 3, texts   # each choice draws on its own
    assert first["usage"]["prompt_tokens"] == len(tiny_llm.encode_prompt("Hi"))   # once, whatever n
    assert first["usage"]["completion_tokens"] == 24


def test_several_prompts_in_one_request_each_answered_as_alone(client, tiny_llm):
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    body = ok(post(client, "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0, "n": 2}))
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for p, prompt in enumerate(prompts):
        expected = tiny_llm.generate_batch([prompt], max_new_tokens=6, temperature=0)[0].text
        assert [c["text"] for c in body["choices"][2 * p:2 * p + 2]] == [expected, expected]
    assert body["usage"]["prompt_tokens"] == 9   # each prompt once, whatever n


def test_n_choices_stream_with_their_indexes_and_usage(client):
    request = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 1.0, "seed": 3,
               "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=request) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts, finished = {0: "", 1: ""}, set()
    for c in chunks[:-1]:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finished.add(choice["index"])
    assert finished == {0, 1} and chunks[-1]["usage"]["completion_tokens"] == 10
    whole = ok(post(client, "/v1/chat/completions", {**request, "stream": False}))
    assert [c["message"]["content"] for c in whole["choices"]] == [texts[0], texts[1]]


# ---- penalties and logit_bias --------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"presence_penalty": -1.5, "frequency_penalty": 0.5},
])
def test_penalties_equal_llm_generate_with_the_same_settings(client, tiny_llm, settings):
    prompt, draw = [5, 6, 7, 8, 9], {"temperature": 0.8, "top_p": 1.0, "seed": 11, "max_new_tokens": 48}
    body = ok(post(client, "/v1/completions", {"prompt": prompt, "temperature": 0.8, "top_p": 1.0, "seed": 11,
                                               "max_tokens": 48, **settings}))
    expected = tiny_llm.generate_batch([prompt], SamplingParams(**draw, **settings))[0]
    plain = tiny_llm.generate_batch([prompt], SamplingParams(**draw))[0]
    assert expected.tokens != plain.tokens   # the penalty changes something here
    assert body["choices"][0]["text"] == expected.text


def test_logit_bias_forces_and_forbids_tokens(client, tiny_llm):
    messages = [{"role": "user", "content": "Hi"}]
    prompt, token_bytes = tiny_llm.tokenizer.encode_chat(messages), tiny_llm.tokenizer.token_bytes()

    def drawn(**settings) -> list[bytes]:
        body = ok(post(client, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "logprobs": True,
                                                        **settings}))
        return [bytes(e["bytes"]) for e in body["choices"][0]["logprobs"]["content"]]

    assert drawn(temperature=0, logit_bias={"300": 100}) == [token_bytes[300]] * 8
    plain = tiny_llm.generate_batch([prompt], max_new_tokens=8, temperature=1.0, seed=1)[0].tokens
    assert drawn(temperature=1.0, seed=1) == [token_bytes[t] for t in plain]   # what the ban must change
    banned = drawn(temperature=1.0, seed=1, logit_bias={str(t): -100 for t in plain})
    assert not set(banned) & {token_bytes[t] for t in plain}


# ---- structured output ---------------------------------------------------------------------------------

def test_fifty_seeded_samples_at_temperature_1_all_follow_the_schema(client):
    form = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    documents = []
    for seed in range(10):
        body = ok(post(client, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "A character, as JSON."}], "temperature": 1.0, "seed": seed,
            "n": 5, "max_tokens": 200, "response_format": form}))
        for choice in body["choices"]:
            assert choice["finish_reason"] == "stop", choice
            documents.append(json.loads(choice["message"]["content"]))
    assert len(documents) == 50
    for document in documents:
        jsonschema.validate(document, PERSON)
    assert len({json.dumps(d, sort_keys=True) for d in documents}) > 10   # sampled, not one fixed answer


def test_json_object_gives_an_object_and_streams_the_same(client):
    request = {"prompt": "Data:", "temperature": 0.8, "seed": 5, "max_tokens": 200,
               "response_format": {"type": "json_object"}}
    body = ok(post(client, "/v1/completions", request))
    text = body["choices"][0]["text"]
    if body["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:   # out of tokens mid-object: still a prefix of one
        assert text.startswith("{")
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text


def test_a_text_response_format_changes_nothing(client, tiny_llm):
    body = ok(post(client, "/v1/completions", {"prompt": [5, 6], "max_tokens": 6, "temperature": 0,
                                               "response_format": {"type": "text"}}))
    assert body["choices"][0]["text"] == tiny_llm.generate_batch([[5, 6]], max_new_tokens=6, temperature=0)[0].text
