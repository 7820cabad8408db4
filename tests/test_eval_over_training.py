"""`camelid eval --model RUN_DIR/checkpoints` (the paper's Figure 2): on a tiny run trained a few
steps with a checkpoint every 2, a row per complete checkpoint with the step and the tokens the
trainer logged, each value equal to evaluating that checkpoint alone and to a hand computation
from its own log-probabilities; a PNG and a Markdown table beside OUT.json; a rerun evaluates
nothing cached, but a new checkpoint, task or setting; incomplete checkpoints are skipped with a
note; an empty run is one line and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import camelid
from camelid.cli.main import main
from camelid.eval import evaluate
from camelid.eval import over_training
from camelid.eval.requests import encode_pair
from camelid.train import Trainer
from helpers import cli_error
from test_train import config

LINES = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate:",
         "Rough winds do shake the darling buds of May,", "And summer's lease hath all too short a date;",
         "def f1(x):", "    return x * 1"]
QUESTIONS = [{"query": LINES[i], "choices": [" " + LINES[(i + j) % len(LINES)] for j in (1, 2, 3)],
              "gold": 0} for i in range(len(LINES))]
TOKENS_PER_STEP = 4 * 32   # test_train's TINY: micro_batch 4 x seq_len 32


def train(run_root: Path, prepared, steps: int) -> Path:
    """A tiny run (or its resumption) to `steps`, a checkpoint every 2 steps, all kept."""
    Trainer(config(run_root, prepared, f"--train.max_steps={steps}", "--checkpoint.interval=2",
                   "--checkpoint.keep=10"), log=False).fit()
    return run_root / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared):
    return train(tmp_path_factory.mktemp("over_training"), prepared, 6)


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the tiny run that a test may change."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def eval_argv(model, tasks, output, *extra):
    return ["eval", "--model", str(model), "--tasks", ",".join(map(str, tasks)), "--output", str(output),
            "--device", "cpu", "--no-compile", *extra]


def hand_loglikelihoods(llm, questions) -> list[list[float]]:
    """Each choice's summed log-probability after its query, from the model's own logits."""
    out = []
    for q in questions:
        scores = []
        for choice in q["choices"]:
            pair = encode_pair(llm.tokenizer, q["query"], choice)
            ids = pair.context + pair.continuation
            with torch.inference_mode():
                logp = torch.log_softmax(llm.model(torch.tensor([ids]))[0].float(), dim=-1)
            scores.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(pair.context), len(ids))))
        out.append(scores)
    return out


def acc_norm(loglikelihoods, questions) -> float:
    """The share of questions whose gold choice has the best log-likelihood per character
    (without the leading space)."""
    right = 0
    for ll, q in zip(loglikelihoods, questions):
        per_char = [v / len(c.lstrip(" ")) for v, c in zip(ll, q["choices"])]
        right += max(range(len(ll)), key=per_char.__getitem__) == q["gold"]
    return right / len(questions)


def test_a_row_per_checkpoint_equal_to_evaluating_each_alone(run, task, tmp_path, capsys):
    out = tmp_path / "over.json"
    assert main(eval_argv(run / "checkpoints", [task], out, "--log-samples")) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["checkpoints"]
    logged = {r["step"]: r["tokens"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "tokens" in r}
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert [r["tokens"] for r in rows] == [logged[2], logged[4], logged[6]] == [2 * TOKENS_PER_STEP,
                                                                              4 * TOKENS_PER_STEP,
                                                                              6 * TOKENS_PER_STEP]
    seen = []
    for row in rows:   # each row from its own checkpoint: the log-likelihoods differ from step to step
        llm = camelid.load(Path(row["path"]), compile=False)
        alone = evaluate(llm, [str(task)])["results"]["lines"]
        assert row["results"]["lines"] == pytest.approx(alone)
        hand = hand_loglikelihoods(llm, QUESTIONS)
        logged_ll = [v for s in row["samples"]["lines"] for v in s["loglikelihoods"]]
        assert logged_ll == pytest.approx([v for ll in hand for v in ll], abs=1e-3)
        assert row["results"]["lines"]["acc_norm"] == pytest.approx(acc_norm(hand, QUESTIONS))
        assert all(hand[0][0] != pytest.approx(earlier, abs=1e-3) for earlier in seen)
        seen.append(hand[0][0])
    assert result["results"] == rows[-1]["results"]      # the newest checkpoint's, as one model's OUT.json
    assert result["chance"] == {"lines": pytest.approx(1 / 3)}   # three choices each: the plot's floor
    table = (tmp_path / "over.md").read_text()

    def cells(text: str) -> list[list[str]]:   # the Markdown table's rows, cells stripped of their padding
        return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]

    expected = [["step", "tokens", "lines acc_norm"]] + [
        [str(r["step"]), f"{r['tokens']:,}",
         f"{r['results']['lines']['acc_norm']:.4f} ± {r['results']['lines']['acc_norm_stderr']:.4f}"] for r in rows]
    assert [c for c in cells(table) if not set(c[0]) <= set("-:")] == expected
    assert [c for c in cells(printed) if not set(c[0]) <= set("-:")] == expected
    assert (tmp_path / "over.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_evaluates_only_what_is_new(run, task, tmp_path, prepared, monkeypatch, capsys):
    calls: list[tuple[str, list[str]]] = []
    real = over_training.evaluate

    def counting(llm, tasks, *args, **kwargs):
        calls.append((Path(llm.source).name, [t.name for t in tasks]))
        return real(llm, tasks, *args, **kwargs)

    monkeypatch.setattr(over_training, "evaluate", counting)
    out = tmp_path / "over.json"
    assert main(eval_argv(run, [task], out)) == 0                     # the run directory itself
    assert calls == [(f"step_0000000{s}", ["lines"]) for s in (2, 4, 6)]
    first = json.loads(out.read_text())["checkpoints"]

    calls.clear()
    assert main(eval_argv(run / "checkpoints", [task], out)) == 0
    assert calls == [] and capsys.readouterr().err.count("(cached)") == 3
    assert json.loads(out.read_text())["checkpoints"] == [{**r, "cached": ["lines"]} for r in first]

    train(run.parent, prepared, 8)                                    # the run goes on: step 8 is new
    assert main(eval_argv(run, [task], out)) == 0
    assert calls == [("step_00000008", ["lines"])]
    assert [r["step"] for r in json.loads(out.read_text())["checkpoints"]] == [2, 4, 6, 8]

    calls.clear()                                                     # a task added: only it is evaluated
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS[:3]))
    assert main(eval_argv(run, [task, other], out)) == 0
    assert calls == [(f"step_0000000{s}", ["other"]) for s in (2, 4, 6, 8)]

    calls.clear()                                                     # a setting changed: all again
    assert main(eval_argv(run, [task], out, "--limit", "2")) == 0
    assert calls == [(f"step_0000000{s}", ["lines"]) for s in (2, 4, 6, 8)]

    calls.clear()                                                     # a task file rewritten: all again
    task.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS[1:]))
    assert main(eval_argv(run, [task], out)) == 0
    assert len(calls) == 4


def test_a_metric_that_is_not_finite_is_null_in_every_output(run, task, tmp_path, monkeypatch, capsys):
    """A diverged checkpoint's perplexity is infinite: JSON has no such number, so it is written
    as null (in OUT.json and in the cache), not a crash after all the work."""
    real = over_training.evaluate

    def diverged(llm, tasks, *args, **kwargs):
        out = real(llm, tasks, *args, **kwargs)
        out["results"]["lines"]["acc_norm"] = float("inf")
        return out

    monkeypatch.setattr(over_training, "evaluate", diverged)
    out = tmp_path / "over.json"
    assert main(eval_argv(run, [task], out)) == 0
    rows = json.loads(out.read_text())["checkpoints"]
    assert [r["results"]["lines"]["acc_norm"] for r in rows] == [None, None, None]
    assert main(eval_argv(run, [task], out)) == 0 and capsys.readouterr().err.count("(cached)") == 3


def test_a_benchmarks_files_rewritten_are_evaluated_again(run, tmp_path, monkeypatch):
    from camelid.eval.tasks import get_task

    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    (data / "piqa" / "valid.jsonl").write_text(json.dumps({"goal": "Open a jar", "sol1": "Twist", "sol2": "Eat"}) + "\n")
    (data / "piqa" / "valid-labels.lst").write_text("0\n")
    _, checkpoints, _ = over_training.find_checkpoints(run)
    task, settings = get_task("piqa", data), over_training.Settings()
    before = over_training.cache_key(task, checkpoints[0], settings, {}, data)
    (data / "piqa" / "valid-labels.lst").write_text("1\n")
    assert over_training.cache_key(task, checkpoints[0], settings, {}, data) != before


def test_incomplete_checkpoints_are_skipped_with_a_note(run, task, tmp_path, capsys):
    checkpoints = run / "checkpoints"
    shutil.copytree(checkpoints / "step_00000006", checkpoints / ".step_00000008.x1y2.tmp")   # killed mid-save
    shutil.copytree(checkpoints / "step_00000006", checkpoints / "step_00000010")
    (checkpoints / "step_00000010" / "trainer.pt").unlink()                                  # no trainer state
    out = tmp_path / "over.json"
    capsys.readouterr()
    assert main(eval_argv(checkpoints, [task], out)) == 0
    err = capsys.readouterr().err
    assert [r["step"] for r in json.loads(out.read_text())["checkpoints"]] == [2, 4, 6]
    assert ".step_00000008.x1y2.tmp: an incomplete checkpoint" in err
    assert "step_00000010: an incomplete checkpoint (no trainer.pt" in err
    assert len(json.loads(out.read_text())["skipped"]) == 2


def test_a_run_with_nothing_to_evaluate_is_one_line(tmp_path, task, capsys):
    empty = tmp_path / "run" / "checkpoints"
    empty.mkdir(parents=True)
    err = cli_error(capsys, *eval_argv(empty, [task], tmp_path / "o.json"))
    assert "no complete checkpoints" in err and str(empty) in err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text("")
    err = cli_error(capsys, *eval_argv(bare, [task], tmp_path / "o.json"))
    assert "a training run without a checkpoints/ directory" in err
    half = tmp_path / "half" / "checkpoints" / "step_00000002"
    half.mkdir(parents=True)
    err = cli_error(capsys, *eval_argv(half.parent, [task], tmp_path / "o.json"))
    assert "no complete checkpoints" in err


def test_the_demo_task_holds_each_line_end_and_its_own_words_reordered():
    """examples/verse_tasks.py (the README's demo task): the true ending of each line among
    orderings of the same words, so that token frequencies alone score at chance."""
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location(
        "verse_tasks", Path(__file__).resolve().parent.parent / "examples" / "verse_tasks.py")
    verse_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verse_tasks)
    play = ("CHARMIAN.\nGood, sir, give me good fortune, and I will give you wine.\n\n[Enter ENOBARBUS.]\n\n"
            "ENOBARBUS.\nBring in the banquet quickly; wine enough for all of us\n   Pros. The howr's now come "
            "to tell thee more")
    assert [line for line in verse_tasks.verse_lines(play) if line] == [
        "Good, sir, give me good fortune, and I will give you wine.",
        "Bring in the banquet quickly; wine enough for all of us"]
    records = verse_tasks.word_order_task([play], 10, 3, random.Random(0))
    assert len(records) == 2
    for r in records:
        line = r["query"] + " " + r["choices"][r["gold"]]
        assert line in play and len(r["query"].split()) == len(line.split()) // 2
        assert len(set(r["choices"])) == 4
        assert all(sorted(c.split()) == sorted(r["choices"][r["gold"]].split()) for c in r["choices"])
