"""`camelid convert`, `camelid eval`, `camelid reward` and `camelid info` on bad input: one line on stderr naming
the file or option, exit code 2, no traceback, and options checked before the model is read
(the rows that pass a missing model would otherwise fail on the model, not the option).

Also: multiple-choice spacing, the records --log-samples writes, the standard error of one
document, Meta exports that keep the context length, and whole messages for paths and hub ids."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import camelid
from camelid.checkpoint import convert, read_checkpoint
from camelid.cli.main import main
from camelid.config import SIZES
from camelid.errors import CamelidError
from camelid.eval import Scorer, Settings, evaluate
from camelid.eval.requests import encode_pair
from camelid.generate import LLM
from helpers import cli_error, random_hf_llama
from test_model import tiny
from test_reward_model import native_scorer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("m") / "hf"
    random_hf_llama(d, bpe_tokenizer, max_position_embeddings=192)
    return d


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MISSING = "no-such-model"  # rows that use it prove the option is checked before the model is read


# ---- convert ------------------------------------------------------------------------------------------

def _file(d: Path, name: str = "f") -> Path:
    (d / name).write_text("x")
    return d / name


def _dir(d: Path, name: str = "out", files: bool = False) -> Path:
    (d / name).mkdir(exist_ok=True)
    if files:
        (d / name / "keep.txt").write_text("x")
    return d / name


CONVERT = [  # (argv from tmp_path and the model directory, words the message must hold)
    pytest.param(lambda d, m: ["convert", _dir(d, "conv") / "smol-meta", d / "o", "--to", "gguf"],
                 ["conv/smol-meta: no such file or directory", "has no smol-meta"], id="src-missing-path"),
    pytest.param(lambda d, m: ["convert", d / "nope.gguf", d / "o", "--to", "hf"], ["nope.gguf", "no such file"],
                 id="src-missing-file"),
    pytest.param(lambda d, m: ["convert", _dir(d, "empty"), d / "o", "--to", "hf"], ["empty", "not a model directory"],
                 id="src-not-a-model"),
    pytest.param(lambda d, m: ["convert", _file(d, "x.gguf"), d / "o", "--to", "hf"], ["x.gguf", "not a GGUF file"],
                 id="src-not-gguf"),
    pytest.param(lambda d, m: ["convert", MISSING, _dir(d), "--to", "gguf"], ["DST", "is a directory"],
                 id="gguf-dst-is-a-dir"),
    pytest.param(lambda d, m: ["convert", MISSING, _file(d) / "out.gguf", "--to", "gguf"],
                 ["DST", "is a file, not a directory"], id="dst-under-a-file"),
    pytest.param(lambda d, m: ["convert", MISSING, _file(d) / "out", "--to", "hf"],
                 ["DST", "is a file, not a directory"], id="dir-dst-under-a-file"),
    pytest.param(lambda d, m: ["convert", MISSING, _file(d), "--to", "meta"], ["DST", "is a file"],
                 id="dir-dst-is-a-file"),
    pytest.param(lambda d, m: ["convert", MISSING, _dir(d, files=True), "--to", "hf"], ["DST", "already exists"],
                 id="dst-exists"),
    pytest.param(lambda d, m: ["convert", MISSING, _file(d, "o.gguf"), "--to", "gguf"], ["DST", "already exists"],
                 id="gguf-dst-exists"),
    pytest.param(lambda d, m: ["convert", MISSING, d / "o", "--to", "camelid", "--group-size", "64"],
                 ["--group-size", "without --quantize int4"], id="group-size-alone"),
    pytest.param(lambda d, m: ["convert", MISSING, d / "o", "--to", "camelid", "--quantize", "int8", "--group-size",
                               "64"], ["--group-size", "with --quantize int8"], id="group-size-int8"),
    pytest.param(lambda d, m: ["convert", MISSING, d / "o", "--to", "camelid", "--quantize", "int4", "--group-size",
                               "48"], ["--group-size", "32, 64, 128"], id="group-size-value"),
    pytest.param(lambda d, m: ["convert", MISSING, d / "o", "--to", "hf", "--shards", "2"], ["--shards", "--to hf"],
                 id="shards-hf"),
    pytest.param(lambda d, m: ["convert", MISSING, d / "o.gguf", "--to", "gguf", "--shards", "1"],
                 ["--shards", "--to gguf"], id="shards-gguf"),
    pytest.param(lambda d, m: ["convert", MISSING, d / "o", "--to", "meta", "--shards", "0"], ["--shards", ">= 1"],
                 id="shards-zero"),
    pytest.param(lambda d, m: ["convert", MISSING, d / "o", "--to", "hf", "--gguf-type", "Q8_0"],
                 ["--gguf-type", "--to gguf"], id="gguf-type-hf"),
    pytest.param(lambda d, m: ["convert", MISSING, d / "o.gguf", "--to", "gguf", "--quantize", "int4"],
                 ["--quantize", "--to camelid"], id="quantize-gguf"),
    pytest.param(lambda d, m: ["convert", m, d / "o", "--to", "meta", "--shards", "3"], ["shards"],
                 id="shards-do-not-divide"),
]


@pytest.mark.parametrize("argv,words", CONVERT)
def test_convert_matrix(tmp_path, capsys, model_dir, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    err = cli_error(capsys, *(argv(Path("."), model_dir) if "conv" in str(words) else argv(tmp_path, model_dir)))
    assert err.startswith("camelid convert: error: ")
    for w in words:
        assert w in err, (w, err)


def test_convert_to_a_place_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # chmod does not stop root: say "no" for this directory the way the kernel would
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    err = cli_error(capsys, "convert", MISSING, locked / "o.gguf", "--to", "gguf")
    assert "DST" in err and "permission denied" in err


# ---- eval -----------------------------------------------------------------------------------------------

MC_ROW = {"query": "Shall I compare thee to a", "choices": ["summer's day", "winter"], "gold": 0}


def _task(d: Path) -> Path:
    return write_jsonl(d / "mc.jsonl", [MC_ROW])


def _eval(d: Path, *extra, model: str | Path = MISSING, tasks: Path | str | None = None, output: Path | None = None):
    return ["eval", "--model", model, "--tasks", _task(d) if tasks is None else tasks,
            "--output", output or d / "out.json", *extra]


EVAL = [
    pytest.param(lambda d, m: _eval(d, "--num-fewshot", "-1"), ["--num-fewshot", "at least 0"], id="fewshot-negative"),
    pytest.param(lambda d, m: _eval(d, "--batch-size", "0"), ["--batch-size", "at least 1"], id="batch-size-zero"),
    pytest.param(lambda d, m: _eval(d, "--samples", "0"), ["--samples", "at least 1"], id="samples-zero"),
    pytest.param(lambda d, m: _eval(d, "--limit", "0"), ["--limit", "at least 1"], id="limit-zero"),
    pytest.param(lambda d, m: _eval(d, "--temperature", "-0.5"), ["--temperature"], id="temperature-negative"),
    pytest.param(lambda d, m: _eval(d, "--temperature", "nan"), ["--temperature"], id="temperature-nan"),
    pytest.param(lambda d, m: _eval(d, "--system-prompt", ""), ["--system-prompt is empty"], id="system-prompt-empty"),
    pytest.param(lambda d, m: _eval(d, output=_dir(d)), ["--output", "is a directory"], id="output-is-a-dir"),
    pytest.param(lambda d, m: _eval(d, output=_file(d) / "out.json"), ["--output", "is a file, not a directory"],
                 id="output-under-a-file"),
    pytest.param(lambda d, m: _eval(d, tasks=" , "), ["--tasks", "at least one task"], id="no-tasks"),
    pytest.param(lambda d, m: _eval(d, tasks="boolqq"), ["unknown task 'boolqq'", "hellaswag"], id="unknown-task"),
    pytest.param(lambda d, m: _eval(d, tasks=d / "gone.jsonl"), ["gone.jsonl", "no such file"], id="task-file-missing"),
    pytest.param(lambda d, m: _eval(d, tasks=write_jsonl(d / "bad.jsonl", [dict(MC_ROW, gold=5)])),
                 ["bad.jsonl:1", "gold 5 is out of range"], id="task-gold-out-of-range"),
    pytest.param(lambda d, m: _eval(d, tasks=write_jsonl(d / "gen.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answers": "a"}])),
                 ["gen.jsonl:1", "the last message is the assistant's", "'answers'"], id="chat-generation-ends-with-answer"),
    pytest.param(lambda d, m: _eval(d, tasks=_write(d / "cut.jsonl", '{"query": "q", "choices": ["a"], "gold": 0}\n'
                                                                     '{"query": "unterminated')),
                 ["cut.jsonl:2", "Unterminated string starting at column"], id="task-json-cut"),
    pytest.param(lambda d, m: _eval(d, tasks=_write(d / "t.json", '{"examples": []}')), ["t.json", "examples"],
                 id="bigbench-empty"),
    pytest.param(lambda d, m: _eval(d, "--data-dir", d / "nowhere", tasks="boolq"), ["--data-dir", "nowhere"],
                 id="data-dir-missing"),
    pytest.param(lambda d, m: _eval(d, model=d / "gone"), ["gone: no such file or directory"], id="model-missing"),
    pytest.param(lambda d, m: _eval(d, "--compare", "papers"), ["--compare papers: unknown", "'paper'"],
                 id="compare-unknown"),
    pytest.param(lambda d, m: _eval(d, "--markdown", _dir(d)), ["--markdown", "is a directory"],
                 id="markdown-is-a-dir"),
    pytest.param(lambda d, m: _eval(d, "--markdown", d / "out.json"), ["--markdown", "the same file as --output"],
                 id="markdown-is-the-output"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("argv,words", EVAL)
def test_eval_matrix(tmp_path, capsys, model_dir, argv, words):
    err = cli_error(capsys, *argv(tmp_path, model_dir))
    assert err.startswith("camelid eval: error: ")
    for w in words:
        assert w in err, (w, err)
    assert "at at" not in err
    assert not (tmp_path / "out.json").exists()


# ---- reward ---------------------------------------------------------------------------------------------

PAIR_ROW = {"prompt": "Shall I compare thee", "chosen": "to a summer's day?", "rejected": "to a winter's night?"}


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("rm") / "scorer"
    native_scorer(d, bpe_tokenizer)
    return d


def _reward(d: Path, *extra, model: str | Path = MISSING, rows: list | None = None, src: Path | None = None):
    src = src or write_jsonl(d / "r.jsonl", [PAIR_ROW] if rows is None else rows)
    return ["reward", "--model", model, "--input", src, "--device", "cpu", *extra]


REWARD = [  # (argv from tmp_path, the language model and the scorer; words the message must hold)
    pytest.param(lambda d, m, s: _reward(d, src=d / "gone.jsonl"), ["--input", "gone.jsonl", "no such file"],
                 id="input-missing"),
    pytest.param(lambda d, m, s: _reward(d, src=_dir(d)), ["--input", "is a directory"], id="input-is-a-dir"),
    pytest.param(lambda d, m, s: _reward(d, src=_write(d / "r.jsonl", json.dumps(PAIR_ROW) + '\n{"prompt": "x",')),
                 ["r.jsonl:2", "not valid JSON", "JSONL"], id="not-json"),
    pytest.param(lambda d, m, s: _reward(d, rows=[["a", "b"]]), ["r.jsonl:1", "expected a JSON object, got list"],
                 id="not-an-object"),
    pytest.param(lambda d, m, s: _reward(d, rows=[{"question": "q", "answer": "a"}]),
                 ["r.jsonl:1", "no known shape", "'answer'", '"chosen", "rejected"', '{"text"}'], id="unknown-shape"),
    pytest.param(lambda d, m, s: _reward(d, rows=[{"prompt": "p", "chosen": "c"}]),
                 ["r.jsonl:1", "a preference pair without rejected"], id="pair-without-rejected"),
    pytest.param(lambda d, m, s: _reward(d, rows=[{"chosen": "c", "rejected": "r"}]),
                 ["r.jsonl:1", 'without "prompt" or "messages"'], id="pair-without-prompt"),
    pytest.param(lambda d, m, s: _reward(d, rows=[dict(PAIR_ROW, chosen=" ")]), ["r.jsonl:1", "'chosen' is empty"],
                 id="empty-chosen"),
    pytest.param(lambda d, m, s: _reward(d, rows=[dict(PAIR_ROW, rejected=[{"role": "user", "content": "x"}])]),
                 ["r.jsonl:1 (rejected)", "no assistant turn"], id="rejected-not-an-answer"),
    pytest.param(lambda d, m, s: _reward(d, rows=[PAIR_ROW, {"text": "t"}]),
                 ["r.jsonl:2", "a text to score in a file of preference pairs"], id="mixed-kinds"),
    pytest.param(lambda d, m, s: _reward(d, rows=[{"text": ""}]), ["r.jsonl:1", "'text' must be non-empty"],
                 id="empty-text"),
    pytest.param(lambda d, m, s: _reward(d, rows=[]), ["--input", "no records"], id="empty-file"),
    pytest.param(lambda d, m, s: _reward(d, rows=[dict(PAIR_ROW, rejected=PAIR_ROW["chosen"])]),
                 ["every pair's chosen equals its rejected"], id="only-ties"),
    pytest.param(lambda d, m, s: _reward(d, "--batch-size", "0"), ["--batch-size", ">= 1"], id="batch-size-zero"),
    pytest.param(lambda d, m, s: _reward(d, "--device", "foo"), ["--device", "foo"], id="device"),
    pytest.param(lambda d, m, s: _reward(d, "--group-size", "64"), ["--group-size", "--quantize int4"],
                 id="group-size-alone"),
    pytest.param(lambda d, m, s: _reward(d, "--output", _dir(d)), ["--output", "is a directory"], id="output-is-a-dir"),
    pytest.param(lambda d, m, s: _reward(d, "--output", d / "r.jsonl"), ["--output", "is the --input file"],
                 id="output-is-input"),
    pytest.param(lambda d, m, s: _reward(d, model=d / "gone"), ["gone: no such file or directory"], id="model-missing"),
    pytest.param(lambda d, m, s: _reward(d, model=m), ["a language model", "not a reward model"],
                 id="model-is-a-language-model"),
    pytest.param(lambda d, m, s: _reward(d, model=s, rows=[{"text": "thee " * 80}]),
                 ["r.jsonl:1", "more than the model's context of 64"], id="text-too-long"),
]


@pytest.mark.parametrize("argv,words", REWARD)
def test_reward_matrix(tmp_path, capsys, model_dir, scorer_dir, argv, words):
    err = cli_error(capsys, *argv(tmp_path, model_dir, scorer_dir))
    assert err.startswith("camelid reward: error: ")
    for w in words:
        assert w in err, (w, err)


# ---- info -----------------------------------------------------------------------------------------------

INFO = [
    pytest.param(lambda d: "7Q", ["7Q", "did you mean 7B?", *SIZES, "smollm2-135m-instruct"], id="unknown-size"),
    pytest.param(lambda d: _dir(d, "conv") / "smol-meta", ["smol-meta: no such file or directory"], id="missing-path"),
    pytest.param(lambda d: d / "missing.gguf", ["missing.gguf: no such file or directory"], id="missing-gguf"),
    pytest.param(lambda d: _file(d, "x.gguf"), ["x.gguf", "not a GGUF file"], id="not-gguf"),
    pytest.param(lambda d: _dir(d, "empty"), ["empty", "not a model directory"], id="empty-dir"),
    pytest.param(lambda d: _write(_dir(d, "meta") / "params.json", "{"), ["params.json", "cannot read"],
                 id="bad-params-json"),
]


@pytest.mark.parametrize("name,words", INFO)
def test_info_matrix(tmp_path, capsys, name, words):
    target = name(tmp_path)
    if isinstance(target, Path) and target.name == "params.json":
        target = target.parent
    err = cli_error(capsys, "info", target)
    assert err.startswith("camelid info: error: ")
    for w in words:
        assert w in err, (w, err)


# ---- names, paths and the hub -----------------------------------------------------------------------------

def test_a_relative_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path must not be looked up on the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conv").mkdir()
    for name in ("conv/smol-meta", "./smol-meta", "conv/sub/model", "org/model.gguf", "~/no/such/dir"):
        with pytest.raises(CamelidError, match=r"no such file or directory"):
            read_checkpoint(name)


def test_hub_failures_are_whole_sentences(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    long = ("An error happened while trying to locate the files on the Hub and we cannot find the appropriate "
            "snapshot folder for the specified revision on the local disk. Please check your internet connection "
            "and try again.")

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError(long)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CamelidError) as e:
        read_checkpoint("someorg/somemodel")
    text = str(e.value)
    assert text.startswith("someorg/somemodel: no such file or directory, and it could not be downloaded")
    assert "cannot be reached" in text and text.endswith("check the name and the network")

    def broken(*args, **kwargs):
        raise OSError("first line of a long story\nsecond line " + "x" * 500)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(CamelidError) as e:
        read_checkpoint("someorg/somemodel")
    assert "OSError: first line of a long story)" in str(e.value) and "second line" not in str(e.value)


# ---- multiple-choice spacing and what --log-samples shows ------------------------------------------------

@pytest.fixture(scope="module")
def llm(bpe_tokenizer):
    return LLM(tiny("tiny", seed=7), bpe_tokenizer, compile=False)


def reference(llm, context: str, continuation: str) -> float:
    e = encode_pair(llm.tokenizer, context, continuation)
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(torch.tensor([e.context + e.continuation])).float(), -1)[0]
    n = len(e.context)
    return sum(logp[n - 1 + j, t].item() for j, t in enumerate(e.continuation))


def test_choices_that_start_with_a_space_get_no_second_one(llm, tmp_path):
    """lm-evaluation-harness writes choices with their space (" Paris"): scored as written.
    Choices without one still get one; acc_norm counts characters without it."""
    rows = [{"query": "Shall I compare thee to a", "choices": [" summer's day", " winter"], "gold": 0},
            {"query": "Rough winds do shake the", "choices": ["darling buds", "\tsea"], "gold": 0}]
    path = write_jsonl(tmp_path / "spaced.jsonl", rows)
    out = evaluate(llm, [str(path)], Settings(num_fewshot=0), log_samples=True)
    first, second = out["samples"]["spaced"]
    assert first["context"] == "Shall I compare thee to a"
    assert first["continuations"] == [" summer's day", " winter"]
    assert second["continuations"] == [" darling buds", "\tsea"]
    assert first["loglikelihoods"] == pytest.approx([reference(llm, rows[0]["query"], c)
                                                     for c in rows[0]["choices"]], abs=1e-4)
    assert first["loglikelihoods"] != pytest.approx([reference(llm, rows[0]["query"], " " + c)
                                                     for c in rows[0]["choices"]], abs=1e-4)
    # the same documents written without the spaces score identically
    plain = write_jsonl(tmp_path / "plain.jsonl", [dict(rows[0], choices=["summer's day", "winter"])])
    again = evaluate(llm, [str(plain)], Settings(num_fewshot=0), log_samples=True)["samples"]["plain"][0]
    assert again["loglikelihoods"] == pytest.approx(first["loglikelihoods"], abs=1e-6)
    assert again["acc_norm"] == first["acc_norm"]


def test_few_shot_examples_follow_the_same_rule(llm, tmp_path):
    from camelid.eval.tasks.generic import JsonlMultipleChoice

    task = JsonlMultipleChoice(write_jsonl(tmp_path / "s.jsonl", [
        {"query": "Q: one\nA:", "choices": [" 1", " 2"], "gold": 0},
        {"query": "Q: two\nA:", "choices": [" 1", " 2"], "gold": 1}]))
    docs = task.docs()
    assert task.context(docs[0], 0, 1, seed=0, pool=docs) == "Q: two\nA: 2\n\nQ: one\nA:"


def test_log_samples_records_hold_the_exact_scored_strings(llm, tmp_path):
    """Trailing spaces of the context move into the continuation before scoring: the record
    shows the strings as scored."""
    from camelid.eval.tasks.generic import JsonlMultipleChoice

    task = JsonlMultipleChoice(write_jsonl(tmp_path / "t.jsonl", [
        {"query": "The capital of France is ", "choices": ["Paris", "Rome"], "gold": 0}]))
    task.calibration = "Answer:"
    _, (rec,) = task.evaluate(Scorer(llm), Settings(num_fewshot=0))
    assert rec["context"] == "The capital of France is"
    assert rec["continuations"] == ["  Paris", "  Rome"]
    assert rec["unconditional_scored"] == {"context": "Answer:", "continuations": [" Paris", " Rome"]}
    assert rec["loglikelihoods"][0] == pytest.approx(reference(llm, rec["context"], rec["continuations"][0]), abs=1e-4)


def test_winogrande_records_show_a_context_per_option(llm, tmp_path):
    from camelid.eval.tasks.paper import WinoGrande

    (tmp_path / "winogrande").mkdir()
    doc = {"sentence": "The trophy did not fit in the suitcase because the _ was too big.",
           "option1": "trophy", "option2": "suitcase", "answer": "1"}
    for name in ("dev.jsonl", "train_xl.jsonl"):
        write_jsonl(tmp_path / "winogrande" / name, [doc])
    _, (rec,) = WinoGrande(tmp_path).evaluate(Scorer(llm), Settings(num_fewshot=0))
    assert rec["contexts"] == ["The trophy did not fit in the suitcase because the trophy",
                               "The trophy did not fit in the suitcase because the suitcase"]
    assert rec["continuation"] == " was too big."


# ---- one document: no standard error, and strict JSON ------------------------------------------------------

def test_one_document_has_no_standard_error(model_dir, tmp_path, capsys):
    task = write_jsonl(tmp_path / "mc.jsonl", [MC_ROW, dict(MC_ROW, gold=1)])
    capsys.readouterr()
    code = main(["eval", "--model", str(model_dir), "--tasks", str(task), "--limit", "1", "--output",
                 str(tmp_path / "out.json"), "--log-samples", "--no-compile"])
    out, err = capsys.readouterr()
    assert code == 0, err
    text = (tmp_path / "out.json").read_text()

    def refuse(name):
        raise AssertionError(f"{name} in the JSON output")

    results = json.loads(text, parse_constant=refuse)["results"]["mc"]
    assert results["acc_stderr"] is None and results["acc_norm_stderr"] is None
    assert results["documents"] == 1 and math.isfinite(results["acc"])
    assert "nan" not in out.lower()
    row = next(cells for line in out.splitlines()   # the printed Markdown table's row
               if (cells := [c.strip() for c in line.strip("|").split("|")])[:2] == ["mc", "acc"])
    assert row[3] == "± –"
    sample = json.loads(text)["samples"]["mc"][0]
    assert sample["context"] == MC_ROW["query"] and sample["continuations"] == [" summer's day", " winter"]


# ---- Meta export keeps the context length --------------------------------------------------------------------

def test_meta_export_keeps_the_context_length(model_dir, tmp_path):
    assert read_checkpoint(model_dir).config.max_seq_len == 192
    convert(model_dir, tmp_path / "meta", to="meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert "max_seq_len" not in params  # Meta's loaders pass max_seq_len themselves
    assert read_checkpoint(tmp_path / "meta").config.max_seq_len == 192
    convert(tmp_path / "meta", tmp_path / "m.gguf", to="gguf")
    assert read_checkpoint(tmp_path / "m.gguf").config.max_seq_len == 192
    assert camelid.load(tmp_path / "m.gguf", compile=False).config.max_seq_len == 192
    # a Meta directory from elsewhere, without the file, still gets the usual guess
    (tmp_path / "meta" / "camelid_params.json").unlink()
    assert read_checkpoint(tmp_path / "meta").config.max_seq_len in (2048, 4096)
    (tmp_path / "meta" / "camelid_params.json").write_text('{"max_seq_len": "long"}')
    with pytest.raises(CamelidError, match=r"camelid_params\.json: max_seq_len must be a positive integer"):
        read_checkpoint(tmp_path / "meta")


def test_a_faulty_local_benchmark_file_is_an_error_not_replaced_by_the_hub_copy(tmp_path, monkeypatch):
    """The hub stands in only when the files are not there: a user's broken file must be named,
    not silently swapped for the hub's copy (which would measure a different data set)."""
    import huggingface_hub

    from camelid.eval.tasks import get_task

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: asked.append(a) or str(tmp_path))
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "val.jsonl").write_text('{"question": "is it", "passage": "p", "answer": true}\n{oops\n')
    with pytest.raises(CamelidError, match=r"val.jsonl:2: not valid JSON"):
        get_task("boolq", tmp_path).docs()
    assert asked == []
    with pytest.raises(CamelidError, match="could not fetch|no parquet files"):   # absent: the hub is asked
        get_task("boolq", tmp_path / "elsewhere").docs()
    assert len(asked) == 1
