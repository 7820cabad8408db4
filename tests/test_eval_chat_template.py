"""`camelid eval --chat-template` and `--system-prompt`: every task kind asks in the model's chat
format (a system message with the system prompt and the task's description, few-shot examples as
earlier user/assistant turns, the question as the last user turn), checked on the exact rendered
text and on log-likelihoods computed by hand from the model's own logits; generation requests
are rendered conversations marked chat; code answers become programs from their Markdown block;
bad options are one line and exit code 2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from camelid.eval import Settings, evaluate
from camelid.eval.scoring import Scorer
from camelid.eval.tasks.base import MultipleChoiceTask, answer_code, code_blocks
from camelid.eval.tasks.paper import HumanEval, NaturalQuestions, WinoGrande
from camelid.generate import LLM, SamplingParams
from helpers import cli_error
from test_model import tiny

SYSTEM = "Be brief."


def turn(role: str, content: str) -> str:
    """One turn as the test tokenizer's ChatML template writes it (tests/helpers.py)."""
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


ASK = "<|im_start|>assistant\n"   # the generation prompt


@pytest.fixture(scope="module")
def llm(bpe_tokenizer):
    return LLM(tiny("tiny", seed=7), bpe_tokenizer, compile=False)


def by_hand(llm, context: str, continuation: str) -> float:
    """log P(continuation | context) from one forward pass: the context's markup as special
    tokens (no BOS: the test tokenizer adds none), the continuation as plain text."""
    tok = llm.tokenizer
    ctx, cont = tok.encode(context), tok.encode(continuation, special=False)
    assert tok.special_tokens()["<|im_start|>"] in ctx
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(torch.tensor([ctx + cont])).float(), -1)[0]
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- multiple choice ------------------------------------------------------------------------------

QUIZ = [("Question: Who wrote Hamlet?\nAnswer:", ["Shakespeare", "Marlowe"], 0),
        ("Question: Where is Elsinore?\nAnswer:", ["Norway", "Denmark", "Sweden"], 1),
        ("Question: What is the play within the play?\nAnswer:", ["The Mousetrap", "The Tempest"], 0)]


class Quiz(MultipleChoiceTask):
    """A multiple-choice task with a description, first-n examples and the paper's calibration."""
    name, fewshot_first_n, calibration = "quiz", True, "Answer:"
    description = "The following are questions about plays.\n\n"

    def docs(self):
        return [{"q": q, "choices": c, "gold": g} for q, c, g in QUIZ]

    def prompt(self, doc):
        return doc["q"]

    def choices(self, doc):
        return doc["choices"]

    def gold(self, doc):
        return doc["gold"]


def test_multiple_choice_in_chat_form_is_the_conversation_scored_by_hand(llm):
    """Document 0 with two examples (the first two others, in order): the exact ChatML text; each
    choice scored as the assistant's answer equals a forward pass; so do the calibration
    requests, whose only user turn is "Answer:" after the same system prompt."""
    out = evaluate(llm, [Quiz()], Settings(num_fewshot=2, chat_template=True, system_prompt=SYSTEM),
                   log_samples=True)
    rec = out["samples"]["quiz"][0]
    (q1, c1, g1), (q2, c2, g2) = QUIZ[1], QUIZ[2]
    expected = (turn("system", SYSTEM + "\n\nThe following are questions about plays.")
                + turn("user", q1) + turn("assistant", c1[g1]) + turn("user", q2) + turn("assistant", c2[g2])
                + turn("user", QUIZ[0][0]) + ASK)
    assert rec["context"] == expected and rec["continuations"] == QUIZ[0][1]
    conditional = [by_hand(llm, expected, c) for c in QUIZ[0][1]]
    assert rec["loglikelihoods"] == pytest.approx(conditional, abs=1e-4)
    unconditional_context = turn("system", SYSTEM) + turn("user", "Answer:") + ASK
    assert rec["unconditional_scored"] == {"context": unconditional_context, "continuations": QUIZ[0][1]}
    unconditional = [by_hand(llm, unconditional_context, c) for c in QUIZ[0][1]]
    assert rec["unconditional_loglikelihoods"] == pytest.approx(unconditional, abs=1e-4)
    calibrated = [a - b for a, b in zip(conditional, unconditional)]
    assert rec["acc_calibrated"] == float(calibrated.index(max(calibrated)) == 0)
    assert out["config"]["chat_template"] is True and out["config"]["system_prompt"] == SYSTEM


def test_a_system_prompt_without_the_chat_template_is_text_before_the_context(llm):
    out = evaluate(llm, [Quiz()], Settings(num_fewshot=1, system_prompt=SYSTEM), log_samples=True)
    rec = out["samples"]["quiz"][0]
    (q1, c1, g1) = QUIZ[1]
    assert rec["context"] == f"{SYSTEM}\n\nThe following are questions about plays.\n\n{q1} {c1[g1]}\n\n{QUIZ[0][0]}"
    assert rec["continuations"] == [" " + c for c in QUIZ[0][1]]
    assert rec["unconditional_scored"]["context"] == f"{SYSTEM}\n\nAnswer:"
    plain = evaluate(llm, [Quiz()], Settings(num_fewshot=1), log_samples=True)["samples"]["quiz"][0]
    assert plain["context"] == rec["context"][len(SYSTEM) + 2:] and plain["unconditional_scored"]["context"] == "Answer:"


def test_no_system_message_when_there_is_nothing_to_say(llm):
    task = Quiz()
    task.description = ""
    rec = evaluate(llm, [task], Settings(num_fewshot=0, chat_template=True), log_samples=True)["samples"]["quiz"][0]
    assert rec["context"] == turn("user", QUIZ[0][0]) + ASK


def test_winogrande_in_chat_form_scores_the_rest_of_the_sentence_as_the_answer(llm, tmp_path):
    """As lm-eval: the sentence up to each filled blank is the user's turn, its shared rest the
    assistant's answer (without the text form's leading space); the example is the gold
    option's sentence answered by its rest."""
    write_jsonl(tmp_path / "winogrande" / "dev.jsonl", [
        {"sentence": "The trophy does not fit in the suitcase because the _ is too big.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"}])
    write_jsonl(tmp_path / "winogrande" / "train_xl.jsonl", [
        {"sentence": "Hamlet trusted Horatio more than Polonius because _ was loyal.",
         "option1": "Horatio", "option2": "Polonius", "answer": "1"}])
    out = evaluate(llm, [WinoGrande(tmp_path)], Settings(num_fewshot=1, chat_template=True), log_samples=True)
    rec = out["samples"]["winogrande"][0]
    shot = turn("user", "Hamlet trusted Horatio more than Polonius because Horatio") + turn("assistant", "was loyal.")
    contexts = [shot + turn("user", f"The trophy does not fit in the suitcase because the {o}") + ASK
                for o in ("trophy", "suitcase")]
    assert rec["contexts"] == contexts and rec["continuation"] == "is too big."
    assert rec["loglikelihoods"] == pytest.approx([by_hand(llm, c, "is too big.") for c in contexts], abs=1e-4)


# ---- generation -----------------------------------------------------------------------------------

def nq(tmp_path: Path) -> NaturalQuestions:
    write_jsonl(tmp_path / "nq" / "NQ-open.dev.jsonl", [{"question": "who wrote hamlet", "answer": ["Shakespeare"]},
                                                        {"question": "where is elsinore", "answer": ["Denmark"]}])
    write_jsonl(tmp_path / "nq" / "NQ-open.train.jsonl", [{"question": "who killed polonius", "answer": ["Hamlet"]}])
    return NaturalQuestions(tmp_path)


def captured(monkeypatch, answers=None) -> list:
    seen = []

    def generate(self, requests):
        seen.extend(requests)
        return list(answers) if answers is not None else ["x"] * len(requests)

    monkeypatch.setattr(Scorer, "generate", generate)
    return seen


def test_generation_requests_are_conversations_marked_chat(llm, tmp_path, monkeypatch):
    """NQ one-shot: the description in the system message after the system prompt, the example as
    turns; the task's stop strings kept (they delimit the exact-match answer). As text, the
    system prompt is only put before the usual context."""
    seen = captured(monkeypatch)
    evaluate(llm, [nq(tmp_path)], Settings(num_fewshot=1, chat_template=True, system_prompt=SYSTEM))
    first = seen[0]
    assert first.chat and first.stop == ("\n", ".", ",") and first.max_new_tokens == 32
    assert first.context == (turn("system", f"{SYSTEM}\n\nAnswer these questions:")
                             + turn("user", "Q: who killed polonius?\nA:") + turn("assistant", "Hamlet")
                             + turn("user", "Q: who wrote hamlet?\nA:") + ASK)
    seen.clear()
    evaluate(llm, [nq(tmp_path)], Settings(num_fewshot=1, system_prompt=SYSTEM))
    assert not seen[0].chat
    assert seen[0].context == f"{SYSTEM}\n\nAnswer these questions:\nQ: who killed polonius?\nA: Hamlet\nQ: who wrote hamlet?\nA:"


def test_chat_generation_runs_on_the_conversation_tokenized_as_chat(llm, tmp_path):
    """End to end on the model: the generations equal the model's own on the conversation encoded
    with its markup as special tokens, stopped as the task says."""
    tok = llm.tokenizer
    out = evaluate(llm, [nq(tmp_path)], Settings(num_fewshot=0, chat_template=True), log_samples=True)
    conversations = [[{"role": "system", "content": "Answer these questions:"},
                      {"role": "user", "content": f"Q: {q}?\nA:"}] for q in ("who wrote hamlet", "where is elsinore")]
    said = [r.text for r in llm.generate_batch([tok.encode_chat(m) for m in conversations],
                                               SamplingParams(temperature=0.0, max_new_tokens=32, stop=("\n", ".", ",")))]
    assert [r["generations"][0] for r in out["samples"]["naturalquestions"]] == said


# ---- code -----------------------------------------------------------------------------------------

PROMPT = '''from typing import List


def double(x: int) -> int:
    return 2 * x


def doubled_sum(numbers: List[int]) -> int:
    """ The sum of the doubled numbers.
    >>> doubled_sum([1, 2])
    6
    """
'''
TEST = "def check(candidate):\n    assert candidate([1, 2]) == 6\n    assert candidate([]) == 0\n"
FULL = "def doubled_sum(numbers: List[int]) -> int:\n    return sum(double(n) for n in numbers)\n"
# (answer, passes): the answers an instruct model gives, and one wrong one that must fail
ANSWERS = [
    (f"Here is the function:\n```python\n{FULL}```\nIt uses the helper.", True),      # whole function: needs
    ("```python\nreturn sum(double(n) for n in numbers)\n```", True),                    # the prompt's import
    ("    return 2 * sum(numbers)\n", True),                                              # no fence: the body
    ("```python\ndef doubled_sum(numbers: List[int]) -> int:\n    return sum(numbers)\n```", False),   # wrong
    (f"```py\n{FULL}", True),                                                             # cut before the fence ends
    (f"Usage:\n```python\nprint(doubled_sum([1]))\n```\nCode:\n```python\n{FULL}```", True),   # the defining block
]


def humaneval(tmp_path: Path, n: int) -> HumanEval:
    write_jsonl(tmp_path / "humaneval" / "HumanEval.jsonl", [
        {"task_id": f"Test/{i}", "prompt": PROMPT, "entry_point": "doubled_sum", "test": TEST,
         "canonical_solution": "    return 2 * sum(numbers)\n"} for i in range(n)])
    return HumanEval(tmp_path)


def test_code_answers_become_programs(llm, tmp_path, monkeypatch):
    """Chat answers as instruct models write them: the requests ask with the prompt in a code block
    and stop only where the turn ends; each answer's program passes or fails as it should."""
    seen = captured(monkeypatch, [a for a, _ in ANSWERS])
    out = evaluate(llm, [humaneval(tmp_path, len(ANSWERS))], Settings(chat_template=True), log_samples=True)
    assert all(r.chat and r.stop == () and r.max_new_tokens == 768 for r in seen)
    assert seen[0].context == turn("user", f"Complete the following Python function.\n```python\n{PROMPT.strip()}\n```") + ASK
    records = out["samples"]["humaneval"]
    assert [r["passed"] for r in records] == [int(ok) for _, ok in ANSWERS], [r["results"] for r in records]
    whole = records[0]["programs"][0]
    assert whole.startswith("from typing import List\n") and "def double(x" in whole
    assert whole.count("def doubled_sum") == 1 and "return sum(double(n) for n in numbers)" in whole
    assert "    return sum(double(n) for n in numbers)" in records[1]["programs"][0]   # indented into the function
    assert out["results"]["humaneval"]["pass@1"] == pytest.approx(5 / 6)


def test_text_form_code_is_unchanged(llm, tmp_path, monkeypatch):
    """Without --chat-template the completion is appended to the prompt as before, with the
    paper's stop strings: a whole-function answer in a code block is not a program there."""
    seen = captured(monkeypatch, ["    return 2 * sum(numbers)\n", ANSWERS[0][0]])
    out = evaluate(llm, [humaneval(tmp_path, 2)], Settings(), log_samples=True)
    assert not seen[0].chat and seen[0].context == PROMPT and "\ndef" in seen[0].stop and seen[0].max_new_tokens == 384
    assert [r["passed"] for r in out["samples"]["humaneval"]] == [1, 0]
    assert "programs" not in out["samples"]["humaneval"][0]


@pytest.mark.parametrize("text,blocks,code", [
    ("```python\na = 1\n```\ntext\n```\nb = 2\n```", ["a = 1\n", "b = 2\n"], "a = 1\n"),
    ("no code here", [], "no code here"),
    ("  ```python\n  x = 1\n  ```", ["  x = 1\n"], "  x = 1\n"),
    ("```python\nunclosed = True\n", ["unclosed = True\n"], "unclosed = True\n"),
])
def test_code_blocks(text, blocks, code):
    assert code_blocks(text) == blocks and answer_code(text) == code


# ---- over a server ----------------------------------------------------------------------------------

def test_chat_form_through_a_server_equals_in_process(llm, tmp_path):
    """The server's tokenizer is read locally and renders the template: the same scores and the
    same generations as in process (the generation prompt sent as chat token ids)."""
    from camelid.eval.remote import RemoteScorer
    from test_serve_clients import serving

    settings = Settings(num_fewshot=1, chat_template=True, system_prompt=SYSTEM)
    here = evaluate(llm, [Quiz(), nq(tmp_path)], settings, log_samples=True)
    with serving(llm) as (port, _):
        there = evaluate(RemoteScorer(f"http://127.0.0.1:{port}/v1", llm.tokenizer, batch_size=2),
                         [Quiz(), nq(tmp_path)], settings, log_samples=True)
    for a, b in zip(here["samples"]["quiz"], there["samples"]["quiz"]):
        assert a["context"] == b["context"] and b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=1e-4)
    assert [r["generations"] for r in here["samples"]["naturalquestions"]] == \
        [r["generations"] for r in there["samples"]["naturalquestions"]]


# ---- the command line ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, bpe_tokenizer):
    """Tiny Hugging Face models: with no chat template, and with one that refuses system messages."""
    from helpers import random_hf_llama

    root = tmp_path_factory.mktemp("chat-models")
    none, strict = copy.copy(bpe_tokenizer), copy.copy(bpe_tokenizer)
    none.chat_template = None
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                            "supported') }}{% endif %}" + bpe_tokenizer.chat_template)
    random_hf_llama(root / "none", none)
    random_hf_llama(root / "strict", strict)
    return root


def quiz_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "quiz.jsonl", [{"query": q, "choices": c, "gold": g} for q, c, g in QUIZ])


def test_a_model_without_a_template_gets_the_built_in_format_with_a_note(model_dirs, tmp_path, capsys):
    from camelid.cli.main import main

    code = main(["eval", "--model", str(model_dirs / "none"), "--tasks", str(quiz_file(tmp_path)),
                 "--chat-template", "--system-prompt", SYSTEM, "--output", str(tmp_path / "o.json"),
                 "--log-samples"])
    assert code == 0
    assert "has no chat template of its own; --chat-template uses the built-in ChatML format" in capsys.readouterr().err
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["config"]["chat_format"] == "built-in ChatML" and out["config"]["system_prompt"] == SYSTEM
    assert out["samples"]["quiz"][0]["context"].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")


def test_tasks_the_chat_template_leaves_alone_are_named(model_dirs, tmp_path, capsys):
    """CrowS-Pairs scores whole sentences and the other section 5 tasks the paper's own prompts:
    the chat template does not apply to them, and the user is told so."""
    from camelid.cli.main import main
    from test_eval_bias import PAIRS, write_csv

    write_csv(tmp_path / "crows_pairs" / "crows_pairs_anonymized.csv", PAIRS)
    code = main(["eval", "--model", str(model_dirs / "none"), "--tasks", f"crows_pairs,{quiz_file(tmp_path)}",
                 "--data-dir", str(tmp_path), "--chat-template", "--output", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert code == 0 and "note: --chat-template leaves crows_pairs as they are" in err and "quiz" not in err.split(
        "leaves")[1].split("(")[0]
    code = main(["eval", "--model", str(model_dirs / "none"), "--tasks", "crows_pairs", "--data-dir", str(tmp_path),
                 "--system-prompt", "Be fair.", "--output", str(tmp_path / "o.json")])
    assert code == 0 and "note: --system-prompt leaves crows_pairs as they are" in capsys.readouterr().err


@pytest.mark.parametrize("model,extra,words", [
    ("strict", ["--chat-template"], ["--chat-template", "cannot render a system message", "System role not supported",
                                     "without --chat-template"]),
    ("none", ["--system-prompt", "  "], ["--system-prompt is empty"]),
])
def test_bad_chat_options_are_one_line(model_dirs, tmp_path, capsys, model, extra, words):
    err = cli_error(capsys, "eval", "--model", model_dirs / model, "--tasks", quiz_file(tmp_path),
                    "--output", tmp_path / "o.json", *extra)
    assert err.startswith("camelid eval: error: ")
    assert all(w in err for w in words), err
    assert not (tmp_path / "o.json").exists()


# ---- SmolLM2-135M-Instruct ------------------------------------------------------------------------------

# Problems SmolLM2-135M-Instruct solves in chat form, greedily, on this machine (2026-12-01);
# with the raw prompt it writes no function body for any of the 164 (README, Results).
SOLVED_IN_CHAT = ("HumanEval/23", "HumanEval/53")


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_humaneval_in_chat_form_writes_runnable_programs(smollm2):
    """The chat path on a few problems: every answer becomes a program that Python compiles
    (the Markdown is gone), and at least one passes its tests, which the raw path fails."""
    import ast

    task = HumanEval(None)
    task.__dict__["_eval_docs"] = [d for d in task.docs() if d["task_id"] in SOLVED_IN_CHAT]
    chat = evaluate(smollm2, [task], Settings(chat_template=True), log_samples=True)["samples"]["humaneval"]
    raw = evaluate(smollm2, [task], Settings(), log_samples=True)["samples"]["humaneval"]
    for rec in chat:
        ast.parse(rec["programs"][0])   # a SyntaxError here is a program built wrongly from the answer
    assert sum(r["passed"] for r in chat) >= 1 > sum(r["passed"] for r in raw), [r["completions"] for r in chat]
