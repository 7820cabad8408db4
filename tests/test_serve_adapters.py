"""camelid serve --adapter NAME=DIR: several LoRA adapters of one base served together, each
chosen by a request's `model` field, in one batch; each answer equals the model with only its
adapter loaded, and the prefix cache never lends one adapter's blocks to another. In-process,
tiny model; the CLI's refusals in test_errors_generate.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from camelid.cli.serve import _adapters, _attach
from camelid.errors import CamelidError
from camelid.generate import LLM
from camelid.lora import load_adapter
from camelid.serve import Batcher, create_app
from test_lora_multi import save_adapters
from test_model import tiny
from test_serve_errors import assert_openai_error, post

PROMPT = list(range(5, 45))   # 40 tokens: full blocks of 16 that the prefix cache would share


@pytest.fixture(scope="module")
def served(tmp_path_factory, bpe_tokenizer):
    dirs = save_adapters(tmp_path_factory.mktemp("adapters"), "tiny")[:2]
    llm = LLM(tiny("tiny"), bpe_tokenizer, compile=False)
    named, plain = _adapters([f"poet={dirs[0]}", f"clerk={dirs[1]}"], "base")
    assert plain is None
    adapters = _attach(llm, named, max_batch=4)
    batcher = Batcher(llm.engine, llm.tokenizer, max_batch=4, context=128, max_queue=8)
    with TestClient(create_app(llm, batcher, "base", adapters=adapters)) as client:
        yield client, batcher, dirs


def reference(bpe_tokenizer, adapter_dir, prompt, n) -> str:
    model = tiny("tiny") if adapter_dir is None else load_adapter(tiny("tiny"), adapter_dir)
    return LLM(model, bpe_tokenizer, compile=False).generate_batch([prompt], max_new_tokens=n, temperature=0)[0].text


def test_each_request_gets_its_adapter_in_one_batch_and_blocks_are_not_shared_across_adapters(served, bpe_tokenizer):
    client, batcher, dirs = served
    names = ["base", "poet", "clerk", "poet", "base", "clerk"]
    want = {name: reference(bpe_tokenizer, d, PROMPT, 12) for name, d in [("base", None), ("poet", dirs[0]),
                                                                            ("clerk", dirs[1])]}
    assert len(set(want.values())) == 3   # the adapters change the answers
    hits = batcher.pool.hits
    with ThreadPoolExecutor(len(names)) as pool:
        bodies = list(pool.map(lambda name: post(client, "/v1/completions", {
            "model": name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}).json(), names))
    for name, body in zip(names, bodies):
        assert body["model"] == name and body["choices"][0]["text"] == want[name], (name, body)
    assert batcher.pool.hits > hits   # requests of one adapter did share their prompt's blocks
    assert batcher.pool.used == 0


def test_echo_logprobs_through_an_adapter_that_adapts_the_head(served, bpe_tokenizer):
    """The second adapter targets the output head, which scoring runs over many positions at once."""
    import torch

    client, _, dirs = served
    body = post(client, "/v1/completions", {"model": "clerk", "prompt": PROMPT, "max_tokens": 1, "echo": True,
                                            "logprobs": 1, "temperature": 0})
    assert body.status_code == 200, body.text
    got = body.json()["choices"][0]["logprobs"]["token_logprobs"][1:len(PROMPT)]
    model = load_adapter(tiny("tiny"), dirs[1])
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([PROMPT]))[0].float(), dim=-1)
    want = logp[:-1].gather(-1, torch.tensor(PROMPT[1:]).view(-1, 1)).squeeze(-1)
    torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=0)


def test_models_lists_the_adapters_and_an_unknown_name_is_refused(served):
    client, _, _ = served
    listed = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["base", "poet", "clerk"]
    assert listed[1]["parent"] == "base" and "parent" not in listed[0]
    r = post(client, "/v1/chat/completions", {"model": "painter", "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(r, 404, "model", ["'painter'", "'base', 'poet', 'clerk'"])


@pytest.mark.parametrize("values, words", [
    (["=dir"], ["NAME=DIR"]),
    (["poet="], ["NAME=DIR"]),
    (["base=/x"], ["'base' is taken"]),
    (["a=/nowhere/adapter"], ["--adapter a", "/nowhere/adapter"]),
    (["/one", "/two"], ["NAME=DIR instead"]),
])
def test_bad_adapter_options_are_refused_before_loading(values, words):
    with pytest.raises(CamelidError) as e:
        _adapters(values, "base")
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_directory_with_an_equals_sign_is_a_directory():
    assert _adapters(["runs/lr=3e-4/adapter"], "base") == ({}, "runs/lr=3e-4/adapter")


def test_a_name_given_twice_is_refused(served):
    _, _, dirs = served
    with pytest.raises(CamelidError, match="'poet' is taken"):
        _adapters([f"poet={dirs[0]}", f"poet={dirs[1]}"], "base")
