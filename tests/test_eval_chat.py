"""Chat multiple choice in task files: {"messages", "choices", "gold"} scored with the model's
chat template, against plain "query" files rendered by hand and against one forward pass."""

import copy
import json

import pytest
import torch

from camelid.cli.main import main
from camelid.errors import CamelidError
from camelid.eval import Settings, evaluate
from camelid.eval.requests import chat_requests, encode_chat_pair
from camelid.generate import LLM
from test_model import tiny

QUESTIONS = [
    ([{"role": "user", "content": "Which work is this passage from?\n\nHAMLET.\nTo be, or not to be"}],
     ["Hamlet", "Macbeth", "The Tempest", "Othello"], 0),
    ([{"role": "system", "content": "Answer with a title."},
      {"role": "user", "content": "Which module defines def urlsplit(url)?"}],
     ["ast", "urllib.parse", "csv", "bdb"], 1),
    ([{"role": "user", "content": "Shall I compare thee to a"}], ["summer's day", "winter"], 0),
]
# a template without special tokens, so that a plain "query" file can say the same thing
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_file(tmp_path, name="chat"):
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"messages": m, "choices": c, "gold": g} for m, c, g in QUESTIONS])


def forward_loglikelihood(llm, context_ids, continuation_ids):
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(ids).float(), -1)[0]
    n = len(context_ids)
    return sum(logp[n - 1 + j, t].item() for j, t in enumerate(continuation_ids))


@pytest.fixture(scope="module")
def plain_llm(bpe_tokenizer):
    tok = copy.copy(bpe_tokenizer)
    tok.chat_template = PLAIN_TEMPLATE
    return LLM(tiny("tiny", seed=7), tok, compile=False)


@pytest.fixture(scope="module")
def chatml_llm(bpe_tokenizer):
    return LLM(tiny("tiny", seed=7), bpe_tokenizer, compile=False)


def test_chat_file_scores_as_the_query_file_rendered_by_hand(plain_llm, tmp_path):
    # the template writes "assistant: answer": the space it puts before an answer is scored, as
    # the plain file's " " + choice is
    plain = write_jsonl(tmp_path / "plain.jsonl", [
        {"query": "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:", "choices": c, "gold": g}
        for msgs, c, g in QUESTIONS])
    out = evaluate(plain_llm, [str(chat_file(tmp_path)), str(plain)], Settings(num_fewshot=0), log_samples=True)
    for chat, query in zip(out["samples"]["chat"], out["samples"]["plain"]):
        assert chat["loglikelihoods"] == pytest.approx(query["loglikelihoods"], abs=1e-5)
        assert chat["context"] == query["context"] and chat["continuations"] == query["continuations"]
    for metric in ("acc", "acc_norm"):
        assert out["results"]["chat"][metric] == out["results"]["plain"][metric]


def test_chat_markup_is_special_tokens_and_choices_follow_as_written(chatml_llm, tmp_path):
    tok = chatml_llm.tokenizer
    out = evaluate(chatml_llm, [str(chat_file(tmp_path))], Settings(num_fewshot=0), log_samples=True)
    for (messages, choices, _), rec in zip(QUESTIONS, out["samples"]["chat"]):
        context = tok.encode_chat(messages)
        assert tok.special_tokens()["<|im_start|>"] in context
        assert rec["context"] == tok.apply_chat_template(messages) and rec["continuations"] == choices
        reference = [forward_loglikelihood(chatml_llm, context, tok.encode(c, special=False)) for c in choices]
        assert rec["loglikelihoods"] == pytest.approx(reference, abs=1e-4)
    assert set(out["results"]["chat"]) >= {"acc", "acc_norm"} and out["results"]["chat"]["documents"] == 3


def test_chat_fewshot_examples_are_earlier_turns(chatml_llm, tmp_path):
    out = evaluate(chatml_llm, [str(chat_file(tmp_path))], Settings(num_fewshot=1), log_samples=True)
    for (messages, _, _), rec in zip(QUESTIONS, out["samples"]["chat"]):
        assert rec["context"].count("<|im_start|>assistant\n") == 2
        assert rec["context"].endswith(chatml_llm.tokenizer.apply_chat_template(messages[-1:]))


def test_a_token_across_the_boundary_joins_the_continuation(plain_llm):
    tok = plain_llm.tokenizer
    e = encode_chat_pair(tok, "user: Shall I com", "pare thee")
    assert tok.decode(e.context + e.continuation) == "user: Shall I compare thee"
    assert tok.decode(e.continuation).endswith("pare thee")


def test_llama2_format_one_bos_and_the_choice_as_written(spm_tokenizer):
    """No template and no ChatML tokens: Meta's [INST] format, which writes BOS itself (no second
    one) and puts a space between "[/INST]" and the answer, so the choice is scored after it."""
    tok = copy.copy(spm_tokenizer)
    tok.chat_template = None
    messages = QUESTIONS[0][0]
    choices = ["Hamlet", "The Tempest"]
    for choice, r in zip(choices, chat_requests(tok, messages, choices)):
        assert r.context == tok.apply_chat_template(messages) and r.context.endswith("[/INST]")
        e = encode_chat_pair(tok, r.context, r.continuation)
        assert e.context[0] == tok.bos_id and tok.bos_id not in e.context[1:]
        assert e.context == tok.encode_chat(messages)[:len(e.context)]
        assert r.continuation == " " + choice and tok.decode(e.continuation).strip() == choice


@pytest.mark.parametrize("record,message", [
    ({"messages": [], "choices": ["a"], "gold": 0}, r"bad\.jsonl:2: chat messages: expected a non-empty list"),
    ({"messages": [{"role": "narrator", "content": "q"}], "choices": ["a"], "gold": 0},
     r"bad\.jsonl:2: chat messages\[0\]"),
    ({"messages": [{"role": "user", "content": "q"}], "choices": ["a", "b"], "gold": 2},
     r"bad\.jsonl:2: gold 2 is out of range"),
    ({"messages": [{"role": "user", "content": "q"}], "gold": 0}, r"bad\.jsonl:2: missing field 'choices'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "choices": ["a"], "gold": 0}, r"bad\.jsonl:2: the last message is the assistant's"),
    ({"query": "q", "choices": ["a"], "gold": 0}, r"bad\.jsonl:2: missing field 'messages'"),
])
def test_broken_chat_task_files(tmp_path, record, message, chatml_llm):
    good = {"messages": [{"role": "user", "content": "q"}], "choices": ["a"], "gold": 0}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(CamelidError, match=message):
        evaluate(chatml_llm, [str(path)])


def test_cli_eval_scores_a_chat_file(tmp_path, capsys):
    from helpers import random_hf_llama, train_byte_bpe

    random_hf_llama(tmp_path / "m", train_byte_bpe())
    code = main(["eval", "--model", str(tmp_path / "m"), "--tasks", str(chat_file(tmp_path)),
                 "--output", str(tmp_path / "o.json")])
    assert code == 0
    results = json.loads((tmp_path / "o.json").read_text())["results"]["chat"]
    assert 0 <= results["acc"] <= 1 and 0 <= results["acc_norm"] <= 1 and results["documents"] == 3
    assert "acc_norm" in capsys.readouterr().out


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_chat_multiple_choice_matches_transformers(smollm2, smollm2_hf, tmp_path):
    """SmolLM2's own template (ChatML, with a default system prompt) tokenized by transformers:
    the same log-likelihoods as the model scored by hand on those ids."""
    model, hf_tok = smollm2_hf
    out = evaluate(smollm2, [str(chat_file(tmp_path))], Settings(num_fewshot=0), log_samples=True)
    for (messages, choices, _), rec in zip(QUESTIONS, out["samples"]["chat"]):
        context = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        context = list(context["input_ids"] if hasattr(context, "keys") else context)
        for choice, ll in zip(choices, rec["loglikelihoods"]):
            ids = torch.tensor([context + hf_tok.encode(choice, add_special_tokens=False)])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
            n = len(context)
            reference = sum(logp[n - 1 + j, t].item() for j, t in enumerate(ids[0, n:].tolist()))
            assert ll == pytest.approx(reference, abs=2e-3)


# ---- chat generation: {"messages", "answers"} ------------------------------------------------------

def test_chat_generation_answers_the_rendered_conversation_until_the_turn_ends(chatml_llm, tmp_path):
    """The request is the conversation as `camelid chat` encodes it (markup as special tokens),
    generated greedily; the answer is scored by exact match, so a file whose first answer is what
    the model says and whose second is not scores [1, 0]."""
    from camelid.generate import SamplingParams

    tok = chatml_llm.tokenizer
    conversations = [m for m, _, _ in QUESTIONS[:2]]
    said = [r.text for r in chatml_llm.generate_batch([tok.encode_chat(m) for m in conversations],
                                                      SamplingParams(temperature=0.0, max_new_tokens=64))]
    path = write_jsonl(tmp_path / "gen.jsonl", [{"messages": conversations[0], "answers": said[0]},
                                                {"messages": conversations[1], "answers": [said[1] + " not this"]}])
    out = evaluate(chatml_llm, [str(path)], Settings(num_fewshot=0), log_samples=True)
    records = out["samples"]["gen"]
    assert [r["generations"][0] for r in records] == said
    assert [r["exact_match"] for r in records] == [1.0, 0.0] and out["results"]["gen"]["exact_match"] == 0.5
    assert "preferred" not in records[0] and "preferred" not in out["results"]["gen"]   # no ranking in the file


def test_preferred_answers_are_right_answers_ranked_first(chatml_llm, tmp_path):
    """A record's "preferred" answers count as right (exact_match) and are reported as their own
    share; an answer that is right but not preferred scores exact_match 1, preferred 0."""
    from camelid.generate import SamplingParams

    tok = chatml_llm.tokenizer
    conversations = [m for m, _, _ in QUESTIONS[:3]]
    said = [r.text for r in chatml_llm.generate_batch([tok.encode_chat(m) for m in conversations],
                                                      SamplingParams(temperature=0.0, max_new_tokens=64))]
    rows = [{"messages": conversations[0], "answers": "other", "preferred": said[0]},      # preferred, given only there
            {"messages": conversations[1], "answers": [said[1], "other"], "preferred": ["other"]},   # right
            {"messages": conversations[2], "answers": "other", "preferred": "another"}]              # wrong
    out = evaluate(chatml_llm, [str(write_jsonl(tmp_path / "gen.jsonl", rows))], Settings(num_fewshot=0),
                   log_samples=True)
    records = out["samples"]["gen"]
    assert [(r["exact_match"], r["preferred"]) for r in records] == [(1.0, 1.0), (1.0, 0.0), (0.0, 0.0)]
    assert out["results"]["gen"]["preferred"] == pytest.approx(1 / 3)
    assert records[0]["gold"] == ["other", said[0]]


def test_chat_generation_fewshot_examples_are_earlier_turns(chatml_llm, tmp_path, monkeypatch):
    from camelid.eval.scoring import Scorer

    seen = []
    monkeypatch.setattr(Scorer, "generate", lambda self, requests: seen.extend(requests) or ["x"] * len(requests))
    rows = [{"messages": m, "answers": c[g]} for m, c, g in QUESTIONS]
    evaluate(chatml_llm, [str(write_jsonl(tmp_path / "gen.jsonl", rows))], Settings(num_fewshot=1))
    for (messages, choices, gold), request in zip(QUESTIONS, seen):
        assert request.chat and request.stop == ()
        assert request.context.count("<|im_start|>assistant\n") == 2
        assert request.context.endswith(chatml_llm.tokenizer.apply_chat_template(messages[-1:]))
        shot = [r for r in rows if r["messages"] != messages]
        assert any(f"{r['answers']}<|im_end|>" in request.context for r in shot)


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "q"}], "answers": []}, r"bad\.jsonl:2: 'answers' must be"),
    ({"messages": [{"role": "user", "content": "q"}], "answers": 3}, r"bad\.jsonl:2: field 'answers' must be"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answers": "a"},
     r"bad\.jsonl:2: the last message is the assistant's; leave the answer out \(the field 'answers' holds it\)"),
    ({"messages": [{"role": "user", "content": "q"}]}, r"bad\.jsonl:2: missing field 'answers'"),
    ({"messages": [{"role": "user", "content": "q"}], "answers": "a", "preferred": []},
     r"bad\.jsonl:2: 'preferred' must be a string or a non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}], "answers": "a", "preferred": [1]},
     r"bad\.jsonl:2: 'preferred' must be a string or a non-empty list"),
])
def test_broken_chat_generation_files(tmp_path, record, message, chatml_llm):
    good = {"messages": [{"role": "user", "content": "q"}], "answers": "a"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(CamelidError, match=message):
        evaluate(chatml_llm, [str(path)])
