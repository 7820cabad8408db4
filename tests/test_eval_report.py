"""Evaluation reports: the Markdown results table for a hand-made results dict (exact text, the
standard error shown, "–" where there is none); the LLaMA paper's numbers beside a run's results
(the right number for the task, metric, few-shot k and samples, percentages turned into
fractions, a task file named like a benchmark left alone); the data file itself (every number
names its table and page and maps to a camelid task); and `camelid eval --compare paper
--markdown` end to end on a tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from camelid.cli.main import main
from camelid.eval import compare, format_results, paper_results, results_table
from camelid.eval.report import SCALE, SIZES, comparison_table, markdown_table
from camelid.eval.tasks import BUILTIN
from helpers import random_hf_llama
from test_eval_bias import PAIRS, write_csv

ROOT = Path(__file__).resolve().parent.parent

RESULTS = {
    "boolq": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.625, "acc_norm_stderr": None,
              "acc_calibrated": 0.75, "acc_calibrated_stderr": 0.0125, "documents": 8},
    "my|task": {"exact_match": 1.0, "exact_match_stderr": None, "documents": 1},
}


# ---- the Markdown results table ------------------------------------------------------------------------

def test_results_table_exact_text():
    assert results_table(RESULTS, {"boolq": 0}) == "\n".join([
        "| task     | metric         |  value |   stderr | documents | few-shot |",
        "|----------|----------------|-------:|---------:|----------:|---------:|",
        "| boolq    | acc            | 0.5000 | ± 0.1000 |         8 |        0 |",
        "|          | acc_norm       | 0.6250 |      ± – |           |          |",
        "|          | acc_calibrated | 0.7500 | ± 0.0125 |           |          |",
        "| my\\|task | exact_match    | 1.0000 |      ± – |         1 |        – |",
    ])


def test_format_results_reads_an_evaluate_output_and_a_metric_without_stderr():
    out = {"results": {"ppl": {"bits_per_byte": 1.23456, "documents": 3}}, "n-shot": {"ppl": 0}, "seconds": {}}
    assert format_results(out).splitlines()[2] == "| ppl  | bits_per_byte | 1.2346 |        |         3 |        0 |"


def test_markdown_table_aligns_numbers_right():
    assert markdown_table(["a", "n"], [["x", "1"], ["yyyy", "22"]], right={1}) == "\n".join([
        "| a    |   n |", "|------|----:|", "| x    |   1 |", "| yyyy |  22 |"])


# ---- the comparison -------------------------------------------------------------------------------------

def _run(results, n_shot, tasks=None, samples=1, num_fewshot=None):
    return {"results": results, "n-shot": n_shot,
            "config": {"tasks": tasks or list(results), "samples": samples, "num_fewshot": num_fewshot}}


def _row(rows, task, metric):
    (row,) = [r for r in rows if r.task == task and r.metric == metric]
    return row


def test_each_metric_meets_the_paper_number_for_its_protocol():
    rows = compare(_run({"boolq": RESULTS["boolq"],
                         "crows_pairs": {"stereotype": 0.6, "stereotype_stderr": 0.02, "stereotype_religion": 0.7,
                                         "stereotype_religion_stderr": 0.05, "documents": 10},
                         "winogrande": {"acc": 0.55, "acc_stderr": 0.01, "documents": 10}},
                        {"boolq": 0, "crows_pairs": 0, "winogrande": 0}))
    assert [(r.task, r.metric) for r in rows] == [
        ("boolq", "acc"), ("boolq", "acc_norm"), ("boolq", "acc_calibrated"), ("crows_pairs", "stereotype"),
        ("crows_pairs", "stereotype_religion"), ("winogrande", "acc")]
    # BoolQ: the paper's calibrated protocol only (section 3), Table 3 on page 4, percent -> fraction
    assert _row(rows, "boolq", "acc").paper is None and _row(rows, "boolq", "acc_norm").paper is None
    boolq = _row(rows, "boolq", "acc_calibrated")
    assert (boolq.paper.table, boolq.paper.page, boolq.paper.values["7B"]) == (3, 4, 76.5)
    assert [boolq.paper.scaled(s) for s in SIZES] == pytest.approx([0.765, 0.781, 0.831, 0.853])
    assert (boolq.value, boolq.stderr, boolq.num_fewshot) == (0.75, 0.0125, 0)
    # CrowS-Pairs: LLaMA-65B only (Table 12)
    religion = _row(rows, "crows_pairs", "stereotype_religion")
    assert religion.paper.scaled("65B") == pytest.approx(0.790) and religion.paper.scaled("7B") is None
    assert _row(rows, "crows_pairs", "stereotype").paper.scaled("65B") == pytest.approx(0.666)
    assert _row(rows, "winogrande", "acc").paper.scaled("33B") == pytest.approx(0.760)


@pytest.mark.parametrize("k, expected", [(0, 0.168), (1, 0.187), (5, 0.220), (64, 0.261), (3, None)])
def test_closed_book_qa_is_compared_at_the_runs_few_shot_k(k, expected):
    nq = {"exact_match": 0.2, "exact_match_stderr": 0.01, "documents": 50}
    (row,) = compare(_run({"naturalquestions": nq}, {"naturalquestions": k}, tasks=["nq"]))
    if expected is None:
        assert row.paper is None and row.why == "paper: 0/1/5/64-shot, 1 sample"
    else:
        assert row.paper.table == 4 and row.paper.scaled("7B") == pytest.approx(expected)


@pytest.mark.parametrize("asked", [{"chat_template": True}, {"system_prompt": "You are a pirate."}])
def test_a_run_in_chat_form_or_with_a_system_prompt_meets_no_paper_number(asked):
    """The paper asked base models in plain text: another protocol is not like with like."""
    run = _run({"boolq": RESULTS["boolq"]}, {"boolq": 0})
    run["config"].update(asked)
    row = _row(compare(run), "boolq", "acc_calibrated")
    assert row.paper is None and row.why == "paper: plain-text prompts, no chat template or system prompt"
    assert "chat template or system prompt" in comparison_table(compare(run))


def test_a_limited_run_keeps_the_number_and_says_it_is_a_subset():
    run = _run({"boolq": RESULTS["boolq"]}, {"boolq": 0})
    run["config"]["limit"] = 3
    row = _row(compare(run), "boolq", "acc_calibrated")
    assert row.paper.values["7B"] == 76.5 and row.why == "this run: the first 3 documents only"
    assert "Table 3, p. 4; this run: the first 3 documents only" in comparison_table(compare(run))


def test_the_few_shot_k_of_an_older_output_comes_from_its_config_or_the_tasks_default():
    mmlu = {"acc": 0.3, "acc_stderr": 0.01, "documents": 100}
    older = {"results": {"mmlu": mmlu}, "config": {"tasks": ["mmlu"], "num_fewshot": None, "samples": 1}}
    assert _row(compare(older), "mmlu", "acc").paper.scaled("65B") == pytest.approx(0.634)   # 5-shot by default
    older["config"]["num_fewshot"] = 0
    assert _row(compare(older), "mmlu", "acc").paper is None


def test_sampled_answers_meet_only_the_majority_vote_numbers():
    gsm = {"exact_match": 0.2, "exact_match_stderr": 0.01, "maj1@100": 0.2, "maj1@100_stderr": 0.01, "documents": 9}
    rows = compare(_run({"gsm8k": gsm}, {"gsm8k": 8}, samples=100))
    # with 100 samples exact_match is the majority answer too: not the paper's greedy column
    assert _row(rows, "gsm8k", "exact_match").paper is None
    assert _row(rows, "gsm8k", "maj1@100").paper.scaled("65B") == pytest.approx(0.697)
    greedy = compare(_run({"gsm8k": {"exact_match": 0.1, "documents": 9}}, {"gsm8k": 8}))
    assert greedy[0].paper.table == 7 and greedy[0].paper.scaled("13B") == pytest.approx(0.178)


def test_a_task_file_named_like_a_benchmark_is_not_the_benchmark():
    rows = compare(_run({"boolq": RESULTS["boolq"]}, {"boolq": 0}, tasks=["/data/mine/boolq.jsonl"]))
    assert all(r.paper is None and r.why == "" for r in rows)


def test_fraction_units_stay_as_printed():
    if "truthfulqa_gen" not in BUILTIN:
        pytest.skip("truthfulqa_gen is not registered in this checkout yet")
    truthful = {"truthful": 0.4, "truthful_stderr": 0.02, "documents": 10}
    rows = compare(_run({"truthfulqa_gen": truthful}, {"truthfulqa_gen": 0}))
    assert rows[0].paper.unit == "fraction" and rows[0].paper.scaled("65B") == pytest.approx(0.57)


def test_comparison_table_exact_text():
    rows = compare(_run({"boolq": {"acc": 0.5, "acc_stderr": 0.1, "acc_calibrated": 0.75,
                                   "acc_calibrated_stderr": None, "documents": 8}}, {"boolq": 0}))
    assert comparison_table(rows) == "\n".join([
        "| task  | few-shot | metric         |  value |   stderr | LLaMA 7B | LLaMA 13B | LLaMA 33B | LLaMA 65B "
        "| paper         |",
        "|-------|---------:|----------------|-------:|---------:|---------:|----------:|----------:|----------:"
        "|---------------|",
        "| boolq |        0 | acc            | 0.5000 | ± 0.1000 |        – |         – |         – |"
        "         – |               |",
        "|       |          | acc_calibrated | 0.7500 |      ± – |    0.765 |     0.781 |     0.831 |     0.853 "
        "| Table 3, p. 4 |",
    ])


def test_an_unknown_comparison_is_refused():
    from camelid.errors import CamelidError

    with pytest.raises(CamelidError, match="--compare papers: unknown; the one comparison is 'paper'"):
        compare(_run({}, {}), "papers")


# ---- the data file ---------------------------------------------------------------------------------------

PAGES = {3: 4, 4: 4, 5: 5, 6: 5, 7: 6, 8: 6, 9: 7, 11: 8, 12: 9, 13: 10, 14: 10}   # arXiv 2302.13971v1
PENDING = {"winogender", "truthfulqa_gen", "realtoxicityprompts"}   # written by other branches


def test_every_number_names_its_table_and_page_and_a_camelid_task():
    entries = paper_results()
    assert {e.table for e in entries} == set(PAGES)
    for e in entries:
        assert e.page == PAGES[e.table], e
        assert e.unit in SCALE and e.values and set(e.values) <= set(SIZES), e
        assert all(isinstance(v, float) and 0 <= v * SCALE[e.unit] <= 1 for v in e.values.values()), e
        if e.task in BUILTIN:
            continue
        assert e.task in PENDING, f"{e.label}: no camelid task {e.task!r}"
    settings = [(e.task, e.metric, e.num_fewshot, e.samples) for e in entries]
    assert len(settings) == len(set(settings)), "two numbers for one task, metric and setting"


@pytest.mark.parametrize("task", sorted(PENDING))
def test_the_tasks_still_being_written_map_once_registered(task):
    if task not in BUILTIN:
        pytest.skip(f"{task} is not registered in this checkout yet")
    assert any(e.task == task for e in paper_results())


def test_numbers_as_printed_in_the_paper():
    """A few numbers per table, read off the paper again by hand."""
    by_label = {e.label: e for e in paper_results()}
    assert by_label["OBQA"].values == {"7B": 57.2, "13B": 56.4, "33B": 58.6, "65B": 60.2}
    assert by_label["TriviaQA 64-shot"].values["65B"] == 73.0
    assert by_label["RACE-high"].values["65B"] == 51.6
    assert by_label["MATH +maj1@256"].values["7B"] == 6.9
    assert by_label["MBPP pass@80"].values["33B"] == 73.4
    assert by_label["MMLU Average"].values == {"7B": 35.1, "13B": 46.9, "33B": 57.8, "65B": 63.4}
    assert by_label["RealToxicityPrompts Respectful"].values["65B"] == 0.141
    assert by_label["WinoGender his/him/he (gotcha)"].values["65B"] == 63.3
    assert by_label["TruthfulQA Truthful*Inf"].values["7B"] == 0.29


def test_the_data_file_is_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "paper_results.json" in package_data["camelid.eval"]


@pytest.mark.slow
def test_an_installed_package_finds_the_numbers(tmp_path):
    """Build the wheel (from a copy, so that the build leaves nothing in the checkout), unpack it
    alone into a directory, and read the numbers from there."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "camelid", src / "camelid", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(src)], check=True, timeout=600, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("camelid-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    script = ("import camelid, sys; from camelid.eval import paper_results; "
              "assert camelid.__file__.startswith(sys.argv[1]), camelid.__file__; print(len(paper_results()))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "site")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(paper_results())


# ---- camelid eval --compare paper --markdown ---------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("report") / "hf"
    random_hf_llama(d, bpe_tokenizer, max_position_embeddings=192)
    return d


def test_eval_compare_paper_prints_and_writes_the_report(model_dir, tmp_path, capsys):
    write_csv(tmp_path / "crows_pairs" / "crows_pairs_anonymized.csv", PAIRS)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"query": q, "choices": ["yes", "no"], "gold": g}) + "\n"
                          for q, g in (("Is the sky blue?", 0), ("Is snow black?", 1), ("Is fire hot?", 0))))
    capsys.readouterr()
    (tmp_path / "prose.txt").write_text("The quality of mercy is not strained. " * 4)
    code = main(["eval", "--model", str(model_dir), "--tasks", f"crows_pairs,{mc},{tmp_path / 'prose.txt'}",
                 "--data-dir", str(tmp_path),
                 "--num-fewshot", "1", "--output", str(tmp_path / "out.json"), "--markdown", str(tmp_path / "out.md"),
                 "--compare", "paper", "--no-compile"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["n-shot"] == {"crows_pairs": 0, "mc": 1, "prose": 0}   # no examples to draw, or none to use
    assert out["format_version"] == 1 and out["camelid_version"] and out["date"].endswith("+00:00")
    assert out["results"]["crows_pairs"]["documents"] == len(PAIRS)
    stereotype = out["results"]["crows_pairs"]["stereotype"]
    cells = {tuple(c.strip() for c in line.strip("|").split("|")) for line in printed.splitlines() if "|" in line}
    assert ("crows_pairs", "0", "stereotype", f"{stereotype:.4f}",
            f"± {out['results']['crows_pairs']['stereotype_stderr']:.4f}", "–", "–", "–", "0.666",
            "Table 12, p. 9") in cells
    assert ("mc", "1", "acc", f"{out['results']['mc']['acc']:.4f}",
            f"± {out['results']['mc']['acc_stderr']:.4f}", "–", "–", "–", "–", "") in cells
    report = (tmp_path / "out.md").read_text()
    assert report.startswith(f"# camelid eval: {model_dir}")
    assert format_results(out) in report and "## Compared with the LLaMA paper" in report
    assert comparison_table(compare(out)) in report and comparison_table(compare(out)) in printed
    assert "out.md" in err
