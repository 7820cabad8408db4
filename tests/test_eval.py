"""Evaluation: request scoring, metrics by hand, few-shot, task files, the paper's tasks, the sandbox."""

import json
import math
import socket
from pathlib import Path

import pytest
import torch

from camelid.cli.main import main
from camelid.errors import CamelidError
from camelid.eval import Scorer, Settings, evaluate, get_task, metrics
from camelid.eval.requests import Loglikelihood, Rolling, encode_pair
from camelid.eval.sandbox import Limits, run_python
from camelid.generate import LLM
from test_model import tiny


@pytest.fixture(scope="module")
def llm(bpe_tokenizer):
    return LLM(tiny("tiny", seed=7), bpe_tokenizer, compile=False)


def reference_loglikelihood(llm, context, continuation):
    """Straight from the model: one forward pass over context + continuation."""
    e = encode_pair(llm.tokenizer, context, continuation)
    ids = torch.tensor([e.context + e.continuation])
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(ids).float(), -1)[0]
    n = len(e.context)
    return sum(logp[n - 1 + j, t].item() for j, t in enumerate(e.continuation))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC = [{"query": "Shall I compare thee to a", "choices": ["summer's day", "winter", "rough wind blowing"], "gold": 0},
      {"query": "Rough winds do shake the", "choices": ["darling buds", "sea"], "gold": 0},
      {"query": "And summer's lease hath all too", "choices": ["short a date", "long", "much"], "gold": 0},
      {"query": "Question: what fades?\nAnswer:", "choices": ["thy eternal summer", "nothing"], "gold": 1}]


def test_scorer_equals_one_forward_per_request(llm):
    requests = [Loglikelihood(d["query"], " " + c) for d in MC for c in d["choices"]]
    requests += [Loglikelihood("", "Shall I compare"), Loglikelihood("Shall I compare ", "thee")]
    got = Scorer(llm, batch_size=2).loglikelihood(requests)
    for r, (ll, _) in zip(requests, got):
        assert ll == pytest.approx(reference_loglikelihood(llm, r.context, r.continuation), abs=1e-4)


def test_tokenization_at_the_boundary(bpe_tokenizer):
    tok = bpe_tokenizer
    e = encode_pair(tok, "Shall I compare ", "thee")   # the trailing space moves to the continuation
    assert tok.decode(e.context) == "Shall I compare" and tok.decode(e.continuation) == " thee"
    e = encode_pair(tok, "Shall I com", "pare thee")    # a token across the boundary joins the continuation
    assert tok.decode(e.context + e.continuation) == "Shall I compare thee"
    assert tok.decode(e.continuation).startswith(" comp") or tok.decode(e.continuation).startswith(" com")
    assert encode_pair(tok, "", "Shall").context == [tok.bos_id]   # an empty context scores from BOS


def test_multiple_choice_metrics_by_hand(llm, tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", MC)
    out = evaluate(llm, [str(path)], Settings(num_fewshot=0), log_samples=True)
    acc, acc_norm = [], []
    for doc, rec in zip(MC, out["samples"]["mc"]):
        ll = [reference_loglikelihood(llm, doc["query"], " " + c) for c in doc["choices"]]
        assert rec["loglikelihoods"] == pytest.approx(ll, abs=1e-4)
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == doc["gold"]))
        normed = [v / len(c) for v, c in zip(ll, doc["choices"])]
        acc_norm.append(float(max(range(len(ll)), key=normed.__getitem__) == doc["gold"]))
    assert out["results"]["mc"]["acc"] == pytest.approx(sum(acc) / 4)
    assert out["results"]["mc"]["acc_norm"] == pytest.approx(sum(acc_norm) / 4)
    assert out["results"]["mc"]["documents"] == 4 and "acc_stderr" in out["results"]["mc"]


def test_calibrated_accuracy_by_hand(llm, tmp_path):
    from camelid.eval.tasks.generic import JsonlMultipleChoice

    task = JsonlMultipleChoice(write_jsonl(tmp_path / "c.jsonl", MC))
    task.calibration = "Answer:"
    results, records = task.evaluate(Scorer(llm), Settings(num_fewshot=0))
    hits = []
    for doc, rec in zip(MC, records):
        cond = [reference_loglikelihood(llm, doc["query"], " " + c) for c in doc["choices"]]
        uncond = [reference_loglikelihood(llm, "Answer:", " " + c) for c in doc["choices"]]
        score = [a - b for a, b in zip(cond, uncond)]
        hits.append(float(max(range(len(score)), key=score.__getitem__) == doc["gold"]))
        assert rec["acc_calibrated"] == hits[-1]
    assert results["acc_calibrated"] == pytest.approx(sum(hits) / len(hits))


def test_winogrande_partial_scoring_by_hand(llm, tmp_path):
    from camelid.eval.tasks.paper import WinoGrande

    (tmp_path / "winogrande").mkdir()
    doc = {"sentence": "The trophy did not fit in the suitcase because the _ was too big.",
           "option1": "trophy", "option2": "suitcase", "answer": "1"}
    write_jsonl(tmp_path / "winogrande" / "dev.jsonl", [doc])
    write_jsonl(tmp_path / "winogrande" / "train_xl.jsonl", [doc])
    results, (rec,) = WinoGrande(tmp_path).evaluate(Scorer(llm), Settings(num_fewshot=0))
    ll = [reference_loglikelihood(llm, "The trophy did not fit in the suitcase because the " + o, " was too big.")
          for o in ("trophy", "suitcase")]
    assert rec["loglikelihoods"] == pytest.approx(ll, abs=1e-4)
    assert results["acc"] == float(ll[0] > ll[1])


def test_rolling_loglikelihood_windows(llm):
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 6
    tok = llm.tokenizer
    ids = [tok.bos_id] + tok.encode(text, special=False)
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(torch.tensor([ids])).float(), -1)[0]
    full = sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    (whole, n), = Scorer(llm).loglikelihood_rolling([Rolling(text)])
    assert n == len(ids) - 1 and whole == pytest.approx(full, abs=1e-3)
    # with a short window every token is still predicted exactly once, from at most 32 tokens
    (windowed, n2), = Scorer(llm, max_length=32).loglikelihood_rolling([Rolling(text)], stride=16)
    assert n2 == n and windowed != pytest.approx(full, abs=1e-3)
    expected = 0.0
    for end in range(1, len(ids), 16):
        stop = min(end + 16, len(ids))
        begin = max(0, stop - 1 - 32)
        with torch.no_grad():
            lp = torch.log_softmax(llm.model(torch.tensor([ids[begin:stop - 1]])).float(), -1)[0]
        expected += sum(lp[i - begin - 1, ids[i]].item() for i in range(end, stop))
    assert windowed == pytest.approx(expected, abs=1e-3)


def test_generation_exact_match(llm, tmp_path):
    prompt = "Shall I compare thee"
    greedy = llm.generate(prompt, max_new_tokens=64, temperature=0, stop=["\n"]).strip()
    rows = [{"prompt": prompt, "answers": ["something else", greedy.upper() + "."]},
            {"prompt": prompt, "answers": "certainly not this"}]
    out = evaluate(llm, [str(write_jsonl(tmp_path / "gen.jsonl", rows))], Settings(), log_samples=True)
    assert [r["exact_match"] for r in out["samples"]["gen"]] == [1.0, 0.0]


def test_metric_functions():
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.exact_match("an apple.", ["Apple", "pear"]) == 1.0
    assert metrics.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert metrics.pass_at_k(5, 4, 2) == 1.0
    assert metrics.majority(["12", "7", "12.0", "7"], metrics.last_number) == "12"
    assert metrics.last_number("so 1,234.50 apples") == "1234.5"
    assert metrics.boxed("thus $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert metrics.normalize_math("\\dfrac12") == metrics.normalize_math("\\frac{1}{2}")
    values = [1.0, 0.0] * 50
    assert metrics.bootstrap_stderr(values) == pytest.approx(0.05, abs=0.01)
    assert metrics.acc_norm([-3.0, -4.0], ["ab", "abcdefgh"], 1) == 1.0


def test_fewshot_is_seeded_and_never_the_document_itself(tmp_path):
    from camelid.eval.tasks.generic import JsonlMultipleChoice

    task = JsonlMultipleChoice(write_jsonl(tmp_path / "fs.jsonl", MC))
    pool = task.docs()
    for i, doc in enumerate(pool):
        ctx = task.context(doc, i, 2, seed=1, pool=pool)
        assert ctx.count(doc["query"]) == 1 and ctx.endswith(doc["query"])
        assert ctx.count("\n\n") >= 2
        assert ctx == task.context(doc, i, 2, seed=1, pool=pool)
    assert any(task.context(d, i, 2, seed=1, pool=pool) != task.context(d, i, 2, seed=2, pool=pool)
               for i, d in enumerate(pool))


@pytest.mark.parametrize("line,message", [
    ('{"query": "q", "choices": ["a"], "gold": 0}\n{"query": broken}', r"bad\.jsonl:2: not valid JSON"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', r"bad\.jsonl:1: gold 2 is out of range"),
    ('{"query": "q", "gold": 0}', r"bad\.jsonl:1: missing field 'choices'"),
])
def test_broken_task_files(tmp_path, line, message, llm, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(CamelidError, match=message):
        evaluate(llm, [str(path)])


def test_cli_exit_code_for_a_broken_task(tmp_path, capsys):
    from helpers import random_hf_llama, train_byte_bpe

    random_hf_llama(tmp_path / "m", train_byte_bpe())
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 5}\n')
    capsys.readouterr()
    code = main(["eval", "--model", str(tmp_path / "m"), "--tasks", str(tmp_path / "bad.jsonl"),
                 "--output", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:1: gold 5 is out of range" in err and "Traceback" not in err


# ---- the paper's tasks, on tiny files in their published formats -------------------------------------

def paper_files(root: Path) -> None:
    w = lambda rel, rows: (root / rel).parent.mkdir(parents=True, exist_ok=True) or write_jsonl(root / rel, rows)  # noqa: E731
    boolq = [{"question": "is the sky blue", "passage": "The sky is blue.", "label": True},
             {"question": "is grass red", "passage": "Grass is green.", "label": False}]
    w("boolq/val.jsonl", boolq), w("boolq/train.jsonl", boolq)
    piqa = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid."}] * 2
    for stem in ("valid", "train"):
        w(f"piqa/{stem}.jsonl", piqa)
        (root / f"piqa/{stem}-labels.lst").write_text("0\n0\n")
    siqa = [{"context": "Tracy gave Sam a gift.", "question": "How does Sam feel?", "answerA": "happy",
             "answerB": "sad", "answerC": "angry"}] * 2
    for stem in ("dev", "train"):
        w(f"siqa/{stem}.jsonl", siqa)
        (root / f"siqa/{stem}-labels.lst").write_text("1\n1\n")
    hs = [{"activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he", "label": 0,
           "endings": ["fries it [title] well.", "eats the shell.", "sleeps.", "runs away."]}] * 2
    w("hellaswag/hellaswag_val.jsonl", hs), w("hellaswag/hellaswag_train.jsonl", hs)
    arc = [{"question": {"stem": "What is hot?", "choices": [{"text": "sun", "label": "A"}, {"text": "ice", "label": "B"}]},
            "answerKey": "A"}] * 2
    for part in ("Easy", "Challenge"):
        for split in ("Test", "Train"):
            w(f"arc/ARC-{part}/ARC-{part}-{split}.jsonl", arc)
    w("openbookqa/Main/test.jsonl", arc), w("openbookqa/Main/train.jsonl", arc)
    nq = [{"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]}] * 2
    w("nq/NQ-open.dev.jsonl", nq), w("nq/NQ-open.train.jsonl", nq)
    (root / "triviaqa").mkdir()
    for stem in ("dev", "train"):
        (root / f"triviaqa/unfiltered-web-{stem}.json").write_text(json.dumps({"Data": [
            {"Question": "Who wrote Hamlet?", "Answer": {"Aliases": ["Shakespeare"], "Value": "William Shakespeare"}}]}))
    for split in ("test", "train"):
        for level in ("high", "middle"):
            (root / f"race/{split}/{level}").mkdir(parents=True)
            (root / f"race/{split}/{level}/1.txt").write_text(json.dumps(
                {"article": "Tom has a cat.", "questions": ["What does Tom have?"],
                 "options": [["a dog", "a cat", "a car", "a hat"]], "answers": ["B"]}))
    for split in ("test", "train"):
        (root / f"math/{split}/algebra").mkdir(parents=True)
        (root / f"math/{split}/algebra/1.json").write_text(json.dumps(
            {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "level": "Level 1", "type": "Algebra"}))
    gsm = [{"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"}] * 2
    w("gsm8k/test.jsonl", gsm), w("gsm8k/train.jsonl", gsm)
    w("mbpp/mbpp.jsonl", [{"task_id": i, "text": "Write a function add(a, b).", "code": "def add(a, b):\n    return a + b",
                          "test_list": ["assert add(1, 2) == 3"], "test_setup_code": ""} for i in (2, 3, 4, 11, 12)])
    for split in ("dev", "test"):
        (root / f"mmlu/data/{split}").mkdir(parents=True)
        (root / f"mmlu/data/{split}/astronomy_{split}.csv").write_text(
            '"What orbits Earth?",Moon,Sun,Mars,Venus,A\n"What is hot?",Ice,Snow,Sun,Rain,C\n')


def test_paper_tasks_read_their_published_formats(tmp_path, llm):
    paper_files(tmp_path)
    expect = {
        "boolq": "The sky is blue.\nQuestion: is the sky blue?\nAnswer:",
        "piqa": "Question: Open a jar\nAnswer:",
        "siqa": "Question: Tracy gave Sam a gift. How does Sam feel?\nAnswer:",
        "hellaswag": "Cooking: A man cracks an egg. He",
        "arc_easy": "Question: What is hot?\nAnswer:",
        "openbookqa": "Question: What is hot?\nAnswer:",
        "naturalquestions": "Answer these questions:\nQ: who wrote hamlet?\nA:",
        "race_high": "Article: Tom has a cat.\n\nQuestion: What does Tom have?\nAnswer:",
        "mmlu": "The following are multiple choice questions (with answers) about astronomy.\n\n",
    }
    for name, start in expect.items():
        task = get_task(name, tmp_path)
        doc = task.docs()[0]
        assert task.context(doc, 0, 0, 1, []).startswith(start), name
    assert get_task("hellaswag", tmp_path).choices(get_task("hellaswag", tmp_path).docs()[0])[0] == "fries it. well."
    assert get_task("siqa", tmp_path).gold(get_task("siqa", tmp_path).docs()[0]) == 0
    assert get_task("race_middle", tmp_path).gold(get_task("race_middle", tmp_path).docs()[0]) == 1
    mmlu = get_task("mmlu", tmp_path)
    ctx = mmlu.context(mmlu.docs()[1], 1, 5, 1, mmlu.fewshot_docs())
    # the first dev examples, minus the one identical to the evaluated question
    assert ctx.count("Answer:") == 2 and "What orbits Earth?\nA. Moon" in ctx and ctx.endswith("D. Rain\nAnswer:")
    gsm = get_task("gsm8k", tmp_path)
    assert gsm.target(gsm.docs()[0]) == "2 + 3 = 5 The answer is 5." and gsm.answers(gsm.docs()[0]) == ["5"]
    assert get_task("math", tmp_path).answers(get_task("math", tmp_path).docs()[0]) == ["2"]
    assert get_task("triviaqa", tmp_path).answers(get_task("triviaqa", tmp_path).docs()[0]) == [
        "Shakespeare", "William Shakespeare"]
    out = evaluate(llm, ["boolq", "piqa", "hellaswag", "arc_challenge", "openbookqa", "mmlu", "triviaqa", "gsm8k",
                         "math", "mbpp", "race_high"], Settings(limit=1, num_fewshot=1), data_dir=tmp_path)
    assert set(out["results"]) >= {"boolq", "mmlu", "mbpp", "gsm8k"}
    assert "acc_calibrated" in out["results"]["boolq"] and "pass@1" in out["results"]["mbpp"]
    with pytest.raises(CamelidError, match=r"task siqa: needs dev\.jsonl"):
        get_task("siqa", tmp_path / "nowhere").docs()


def test_mmlu_reports_table_9s_subject_groups(tmp_path, llm):
    """acc_<group> is the share of right answers among that group's questions (the MMLU authors'
    grouping of the 57 subjects); a subject outside the list counts only in the overall acc."""
    from camelid.eval.tasks.paper import MMLU_GROUP_OF, MMLU_GROUPS

    assert len(MMLU_GROUP_OF) == 57 and {g: len(s.split()) for g, s in MMLU_GROUPS.items()} == {
        "humanities": 13, "stem": 18, "social_sciences": 12, "other": 14}
    subjects = {"astronomy": "stem", "philosophy": "humanities", "sociology": "social_sciences",
                "virology": "other", "made_up_subject": None}
    for split in ("dev", "test"):
        (tmp_path / f"mmlu/data/{split}").mkdir(parents=True)
        for subject in subjects:
            (tmp_path / f"mmlu/data/{split}/{subject}_{split}.csv").write_text(
                '"What orbits Earth?",Moon,Sun,Mars,Venus,A\n"What is hot?",Ice,Snow,Sun,Rain,C\n'
                '"Which is a colour?",Red,Two,Run,Up,A\n')
    out = evaluate(llm, ["mmlu"], Settings(num_fewshot=1), data_dir=tmp_path, log_samples=True)
    res, records = out["results"]["mmlu"], out["samples"]["mmlu"]
    assert [r["subject"] for r in records] == [s for s in sorted(subjects) for _ in range(3)]
    for subject, group in subjects.items():
        if group:
            right = [r["acc"] for r in records if r["subject"] == subject]
            assert res[f"acc_{group}"] == pytest.approx(sum(right) / 3)
    assert res["acc"] == pytest.approx(sum(r["acc"] for r in records) / 15)


def test_pass_at_k_goes_up_to_the_samples_drawn_and_mbpp_reports_table_8s_pass_at_80(tmp_path, monkeypatch):
    import camelid.eval.tasks.base as base
    from camelid.eval.sandbox import Result

    paper_files(tmp_path)
    monkeypatch.setattr(base, "run_python", lambda program, limits: Result(
        "passed" if "return a + b" in program else "failed", ""))

    class Canned:   # 20 of 80 completions right, for each problem
        def generate(self, requests):
            return ["    return a + b\n" if i % 4 == 0 else "    return a - b\n" for i in range(len(requests))]

    mbpp = get_task("mbpp", tmp_path)
    results, _ = mbpp.evaluate(Canned(), Settings(samples=80, limit=1))
    assert set(results) == {"pass@1", "pass@10", "pass@80", "pass@1_stderr", "pass@10_stderr", "pass@80_stderr"}
    assert results["pass@1"] == pytest.approx(0.25) and results["pass@80"] == 1.0
    assert results["pass@10"] == pytest.approx(metrics.pass_at_k(80, 20, 10))


# ---- code execution ----------------------------------------------------------------------------------

@pytest.mark.parametrize("program,status,detail", [
    ("while True:\n    pass\n", "timeout", "wall-clock"),
    ("import os\nwhile True:\n    os.fork()\n", "failed", "os.fork is not allowed"),
    ("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\n", "failed", "subprocess.Popen is not allowed"),
    ("x = bytearray(20 * 2**30)\n", "failed", "MemoryError"),
    ("assert 1 + 1 == 2\nopen('scratch.txt', 'w').write('fine')\n", "passed", ""),
])
def test_sandbox_stops_bad_programs(program, status, detail):
    r = run_python(program, Limits(timeout=2))
    assert r.status == status and detail in r.detail


def test_sandbox_protects_files_and_network(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    for program in (f"import os\nos.remove({str(victim)!r})", f"open({str(victim)!r}, 'w').write('gone')",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                    f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
                    f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"):
        result = run_python(program, Limits(timeout=3))
        assert result.status == "failed" and "not allowed" in result.detail, program
    server.settimeout(0.2)
    with pytest.raises(socket.timeout):
        server.accept()
    assert victim.read_text() == "keep"


def test_code_task_records_failures_and_carries_on(llm, monkeypatch):
    task = get_task("humaneval")
    docs = task.docs()[:4]
    monkeypatch.setattr(type(task), "docs", lambda self: docs)
    answers = [docs[0]["canonical_solution"], "    while True:\n        pass\n", "    import os\n    os.remove('/etc/hostname')\n",
               "    return None\n"]
    monkeypatch.setattr(Scorer, "generate", lambda self, requests: answers)
    monkeypatch.setattr(type(task), "limits", Limits(timeout=2))
    results, records = task.evaluate(Scorer(llm), Settings())
    assert [r["results"][0]["status"] for r in records] == ["passed", "timeout", "failed", "failed"]
    assert results["pass@1"] == 0.25


@pytest.mark.slow
def test_every_humaneval_reference_solution_passes_in_the_sandbox():
    task = get_task("humaneval")
    docs = task.docs()
    assert len(docs) == 164
    failed = [d["task_id"] for d in docs if not run_python(task.program(d, d["canonical_solution"]), task.limits).passed]
    assert failed == []


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_loglikelihoods_match_transformers(smollm2, smollm2_hf):
    hf_model, _ = smollm2_hf
    requests = [Loglikelihood("The capital of France is", " Paris"), Loglikelihood("The capital of France is", " Lyon"),
                Loglikelihood("Hello wor", "ld, how are you?"),          # " world" merges across the boundary
                Loglikelihood("Question: 2+2=\nAnswer: ", "4"), Loglikelihood("", "Once upon a time")]
    got = Scorer(smollm2, batch_size=3).loglikelihood(requests)
    merged = encode_pair(smollm2.tokenizer, "Hello wor", "ld, how are you?")
    assert smollm2.tokenizer.decode(merged.continuation[:1]) == " world"
    for r, (ll, _) in zip(requests, got):
        e = encode_pair(smollm2.tokenizer, r.context, r.continuation)
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(torch.tensor([e.context + e.continuation])).logits.float(), -1)[0]
        ref = sum(logp[len(e.context) - 1 + j, t].item() for j, t in enumerate(e.continuation))
        assert abs(ll - ref) < 1e-3, (r, ll, ref)
    assert math.isfinite(got[0][0]) and got[0][1]  # " Paris" is the greedy continuation
