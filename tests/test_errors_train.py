"""`camelid train`, `camelid quickstart` and `camelid plan` over bad input: each mistake ends in
exit code 2 and one line on stderr naming the key, option or file at fault, before any work is
done; a run that diverged fails instead of reporting success, and metrics.jsonl stays strict
JSON; a recipe's [sample] prompts are generated from at the end of `camelid train`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from camelid.cli.main import main
from camelid.data.shards import table1
from camelid.train.metrics import MetricsLog

from helpers import cli_error

EMPTY = str(Path(__file__).parent / "data" / "empty.toml")
RECIPES = Path(__file__).parent.parent / "recipes"

# A run of a few seconds: the tiny model on synthetic tokens.
SYNTHETIC = ["--data.synthetic=true", "--model.size=tiny", "--data.seq_len=16", "--train.micro_batch=2",
             "--train.dtype=float32", "--train.max_steps=2", "--train.warmup_steps=1", "--train.eval_batches=1",
             "--checkpoint.interval=1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prepared):
    """A run directory whose newest checkpoint is step 2 of the tiny model on the prepared data."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", EMPTY, f"--run.dir={run}", f"--data.path={prepared.directory}", *SYNTHETIC[1:]]) == 0
    return run


def fill(argv: list[str], **places: object) -> list[str]:
    return [a.format(**places) for a in argv]


# (argv after `camelid train`, words the one line must hold). {run} is a fresh run directory,
# {data} the prepared two-source data (sources "prose" and "code"), {file} an existing file,
# {finished} a run directory with a checkpoint at step 2 of the tiny model.
TRAIN_ROWS = [
    # mixture weights (data prepare refuses the same)
    (["--data.weights.code=-0.5"], ["data.weights.code", "positive", "-0.5"]),
    (["--data.weights.prose=0"], ["data.weights.prose", "positive"]),
    (["--data.weights.prose=nan"], ["data.weights.prose"]),
    (["--data.weights.prose=lots"], ["data.weights.prose", "positive"]),
    (["--data.weights.books=1"], ["data.weights.books", "no source 'books'", "prose, code"]),
    # the run directory and the config file
    (["--run.dir={file}"], ["run.dir", "is a file"]),
    (["--run.dir={file}/run"], ["run.dir", "is a file, not a directory"]),
    # settings the schema refuses before anything is loaded
    (["--train.log_interval=0"], ["train.log_interval", "positive"]),
    (["--train.log_interval=-1"], ["train.log_interval", "positive"]),
    (["--train.eval_interval=0"], ["train.eval_interval", "positive"]),
    (["--train.eval_batches=0"], ["train.eval_batches", "positive"]),
    (["--train.eval_batches=-3"], ["train.eval_batches", "positive"]),
    (["--train.threads=-1"], ["train.threads"]),
    (["--train.warmup_steps=-10"], ["train.warmup_steps"]),
    (["--train.max_steps=0"], ["train.max_steps", "positive"]),
    (["--train.micro_batch=0"], ["train.micro_batch", "positive"]),
    (["--train.batch_tokens=-1"], ["train.batch_tokens"]),
    (["--train.lr=nan"], ["train.lr", "finite"]),
    (["--train.lr=inf"], ["train.lr", "finite"]),
    (["--train.lr=0"], ["train.lr", "positive"]),
    (["--train.beta2=1.0"], ["train.beta1 and train.beta2"]),
    (["--train.eps=0"], ["train.eps", "positive"]),
    (["--train.weight_decay=-0.1"], ["train.weight_decay"]),
    (["--train.grad_clip=0"], ["train.grad_clip", "positive"]),
    (["--train.activation_checkpointing=most"], ["train.activation_checkpointing", "selective"]),
    (["--train.optimizer=sgd"], ["train.optimizer"]),
    (["--train.dtype=fp8"], ["train.dtype"]),
    (["--train.peak_flops=-1"], ["train.peak_flops"]),
    (["--train.lrr=1"], ["unknown key", "lrr"]),
    (["--data.seq_len=100000"], ["data.seq_len 100000", "model.max_seq_len 256"]),
    (["--data.seq_len=257"], ["data.seq_len 257", "model.max_seq_len 256"]),
    (["--data.seq_len=0"], ["data.seq_len", "positive"]),
    (["--model.norm_eps=inf"], ["model.norm_eps", "finite"]),
    (["--model.size=huge"], ["unknown model size 'huge'"]),
    (["--checkpoint.interval=0"], ["checkpoint.interval", "positive"]),
    (["--checkpoint.keep=0"], ["checkpoint.keep", "at least 1"]),
    (["--checkpoint.export=onnx"], ["checkpoint.export"]),
    (["--stability.spike_factor=1"], ["stability.spike_factor", "above 1"]),
    (["--stability.spike_patience=0"], ["stability.spike_patience"]),
    (["--stability.max_rollbacks=-1"], ["stability.max_rollbacks"]),
    (["--sample.max_new_tokens=0"], ["sample.max_new_tokens", "positive"]),
    (["--sample.temperature=-1"], ["sample.temperature"]),
    (["--data.synthetic=true", "--data.weights.prose=1"], ["data.weights", "synthetic"]),
    (["--data.synthetic=true", "--sample.prompts=['hi']"], ["sample.prompts", "synthetic"]),
    (["--data.path={run}/nowhere"], ["nowhere"]),
    # the device
    pytest.param(["--train.device=cuda"], ["train.device 'cuda'", "CUDA is not available", "--train.device=cpu"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["--train.device=cuda:99"], ["train.device 'cuda:99'"]),
    (["--train.device=gpu"], ["train.device 'gpu'", "not a device name"]),
    # resuming a run: another model shape, or a step already past train.max_steps
    (["--run.dir={finished}", "--model.dim=128"], ["run.dir", "step_00000002", "model.dim 64 -> 128",
                                                   "another run.dir"]),
    (["--run.dir={finished}", "--model.n_layers=3"], ["run.dir", "model.n_layers 2 -> 3"]),
    (["--run.dir={finished}", "--train.max_steps=1"], ["run.dir", "step 2", "train.max_steps 1"]),
]


@pytest.mark.parametrize("argv, words", TRAIN_ROWS)
def test_train_refuses_bad_input_with_one_line(capsys, tmp_path, prepared, finished_run, argv, words):
    (tmp_path / "a-file").write_text("x")
    run = tmp_path / "run"
    places = dict(run=run, data=prepared.directory, file=tmp_path / "a-file", finished=finished_run)
    before = sorted(p.name for p in finished_run.rglob("*"))
    args = fill([f"--run.dir={run}", f"--data.path={prepared.directory}", *SYNTHETIC[1:], *argv], **places)
    err = cli_error(capsys, "train", EMPTY, *args)
    assert err.startswith("camelid train: error: ")
    for word in words:
        assert word.format(**places) in err, err
    assert not run.exists()  # refused before any work: nothing written
    assert sorted(p.name for p in finished_run.rglob("*")) == before  # a refused resume changes nothing


@pytest.mark.parametrize("recipe, words", [
    ("{dir}", ["is a directory", "TOML file"]),
    ("{dir}/missing.toml", ["missing.toml", "no such file"]),
    ("{dir}/bad.toml", ["bad.toml", "not valid TOML"]),
    ("{dir}/long.toml", ["long.toml", "data.seq_len 512", "model.max_seq_len 256"]),
])
def test_train_refuses_bad_recipe_files(capsys, tmp_path, recipe, words):
    (tmp_path / "bad.toml").write_text("[train\nmax_steps = 3\n")
    (tmp_path / "long.toml").write_text('[data]\nsynthetic = true\nseq_len = 512\n[model]\nsize = "tiny"\n')
    err = cli_error(capsys, "train", recipe.format(dir=tmp_path), f"--run.dir={tmp_path / 'run'}")
    for word in words:
        assert word in err, err


def test_a_recipe_that_is_not_utf8_is_read_with_replacement_characters(capsys, tmp_path):
    recipe = tmp_path / "latin1.toml"
    recipe.write_bytes(b"# caf\xe9\n[data]\nsynthetic = true\n[train]\nmax_stepz = 2\n")
    capsys.readouterr()
    assert main(["train", str(recipe), f"--run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "latin1.toml: not valid UTF-8" in err[0] and "max_stepz" in err[1]


def run_fails(capsys, *argv: str) -> tuple[str, str]:
    """A run that trained and then failed: exit code 2, no traceback; its progress lines, then
    the error as the last line."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    *progress, last = err.splitlines()
    assert last.startswith("camelid train: error: ")
    return "\n".join(progress), last


def test_a_diverging_run_fails_and_its_metrics_are_strict_json(capsys, tmp_path):
    run = tmp_path / "run"
    argv = ["train", EMPTY, f"--run.dir={run}", *SYNTHETIC, "--train.max_steps=12", "--train.lr=1e6",
            "--train.log_interval=1", "--checkpoint.interval=6"]
    progress, err = run_fails(capsys, *argv)
    assert "diverged" in err and "of 12 steps were skipped" in err and "train.lr (1e+06)" in err
    assert str(run) in err and "done" not in progress and "not finite; the step is skipped" in progress

    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")

    rows = [json.loads(line, parse_constant=reject) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r.get("event") == "skip_nonfinite"]
    assert len(skipped) > 6 and any(r["loss"] is None or r["grad_norm"] is None for r in skipped)
    assert not (run / "model").exists()  # nothing to show for it
    # rerunning resumes at the end and says the same
    assert "diverged" in run_fails(capsys, *argv)[1]


def test_metrics_write_non_finite_numbers_as_null(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None, "grad_norm": None,
                                                                    "lr": 1e-3}
    assert log.plot() is None  # no finite loss to draw, and no error


def test_train_generates_from_the_recipe_sample_prompts(capsys, tmp_path, prepared):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[sample]\nprompts = ["Shall I", "def f"]\nmax_new_tokens = 5\ntemperature = 0.0\n')
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(recipe), f"--run.dir={run}", f"--data.path={prepared.directory}",
                 *SYNTHETIC[1:]]) == 0
    out, err = capsys.readouterr()
    saved = json.loads((run / "samples.json").read_text())
    assert [s["prompt"] for s in saved["samples"]] == ["Shall I", "def f"]
    assert saved["max_new_tokens"] == 5 and saved["temperature"] == 0.0
    for s in saved["samples"]:
        assert f"--- {s['prompt']}{s['text']}" in out
    assert "samples.json" in err and "done: step 2" in err


def test_the_data_report_shows_a_dash_without_a_budget(prepared):
    text = table1(prepared, 0)
    assert "nan" not in text and "–" in text and "budget_tokens" in text
    assert "–" not in table1(prepared, 100_000)


@pytest.mark.parametrize("argv, words", [
    (["--max-steps", "0"], ["train.max_steps", "positive"]),
    (["--train.lr=-1"], ["train.lr", "positive"]),
    (["--train.log_interval=0"], ["train.log_interval"]),
    (["--data.seq_len=4096"], ["data.seq_len 4096", "model.max_seq_len 512"]),
    (["--dir", "{file}"], ["--dir", "is a file"]),
    (["--train.nope=1"], ["unknown key", "nope"]),
])
def test_quickstart_checks_its_settings_before_preparing_data(capsys, tmp_path, argv, words):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "qs"
    err = cli_error(capsys, "quickstart", "--dir", str(out), *fill(argv, file=tmp_path / "a-file"))
    for word in words:
        assert word in err, err
    assert not out.exists()  # the data was not prepared


@pytest.mark.parametrize("argv, words", [
    (["tiny", "--train", "--memory", "1GB", "--seq-len", "100000"], ["--seq-len 100000", "256"]),
    (["{dir}", "--train", "--memory", "1GB"], ["not a model directory"]),
    (["{dir}/recipes.toml", "--train", "--memory", "1GB"], ["recipes.toml: is a directory"]),
    (["{dir}/long.toml", "--train", "--memory", "1GB"], ["data.seq_len 512", "model.max_seq_len 256"]),
    (["{dir}/bad.toml", "--train", "--memory", "1GB"], ["train.log_interval"]),
    (["7B", "--train", "--memory", "0GB"], ["--memory"]),
])
def test_plan_refuses_bad_input_with_one_line(capsys, tmp_path, argv, words):
    (tmp_path / "long.toml").write_text('[data]\nsynthetic = true\nseq_len = 512\n[model]\nsize = "tiny"\n')
    (tmp_path / "bad.toml").write_text('[data]\nsynthetic = true\n[train]\nlog_interval = 0\n')
    (tmp_path / "recipes.toml").mkdir()
    err = cli_error(capsys, "plan", *fill(argv, dir=tmp_path))
    for word in words:
        assert word in err, err


def plan_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_of_a_cpu_recipe_has_no_cuda_overhead(capsys, tmp_path, monkeypatch):
    recipe = tmp_path / "cpu.toml"
    recipe.write_text('[data]\nsynthetic = true\n[train]\ndevice = "cpu"\ndtype = "float32"\n')
    out = plan_json(capsys, str(recipe), "--train", "--memory", "1GB")
    assert out["device"] == "cpu" and {r["overhead_bytes"] for r in out["rows"]} == {0}
    # train.device = auto trains where `camelid train` would: here, or on a GPU when there is one
    for cuda, overhead in ((False, 0), (True, 2 * 2**30)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        out = plan_json(capsys, str(RECIPES / "quickstart-train.toml"), "--train", "--memory", "8GB")
        assert out["device"] == ("cuda" if cuda else "cpu") and out["dtype"] in ("float32", "bfloat16")
        assert {r["overhead_bytes"] for r in out["rows"]} == {overhead}
    out = plan_json(capsys, "tiny", "--train", "--memory", "1GB")  # a size, no recipe: a GPU's
    assert {r["overhead_bytes"] for r in out["rows"]} == {2 * 2**30}


@pytest.mark.parametrize("argv, tight", [
    (["7B", "--memory", "80GB"], False),
    (["65B", "--memory", "80GB"], True),                      # int8 fits, tightly
    (["7B", "--train", "--memory", "80GB", "--dp-shard", "8"], False),
])
def test_plan_explains_tight_only_when_a_row_is_tight(capsys, argv, tight):
    capsys.readouterr()
    assert main(["plan", *argv]) == 0
    out = capsys.readouterr().out
    rows_say_tight = any("tight, " in line for line in out.splitlines())
    assert rows_say_tight == tight and ("tight: fits with less than" in out) == tight, out


def test_rerunning_a_finished_run_reports_its_validation_loss(capsys, tmp_path):
    """The quickstart prints the validation loss of the run it resumed; a finished run resumed at
    its end has trained nothing, yet it still has one (it had none, and the quickstart failed)."""
    argv = ["train", EMPTY, f"--run.dir={tmp_path / 'run'}", *SYNTHETIC]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "done: step 2, validation loss" in err
