"""`camelid finetune`: full and LoRA runs on the pretraining trainer, what they leave behind,
exact resume after kill -9, and the refusals of its settings."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

import camelid
from camelid.checkpoint.native import write_native
from camelid.cli.main import main as cli
from camelid.finetune.config import load_finetune_config
from camelid.finetune.trainer import FinetuneTrainer
from helpers import cli_error, straight_and_killed
from test_model import tiny

EMPTY = Path(__file__).parent / "data" / "empty.toml"


@pytest.fixture(scope="module")
def base(tmp_path_factory, spm_tokenizer):
    """A tiny camelid checkpoint with a SentencePiece tokenizer (no chat template: Llama-2's
    [INST] format)."""
    path = tmp_path_factory.mktemp("base") / "model"
    path.mkdir()
    model = tiny("tiny", seed=3)
    assert model.config.vocab_size == spm_tokenizer.vocab_size
    write_native(path, model.config, spm_tokenizer, model.state_dict().items())
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Conversations whose answers follow a rule (the number after the question's word)."""
    words = ["summer", "winds", "buds", "gold", "eye", "heaven", "nature", "death", "time", "life"]
    path = tmp_path_factory.mktemp("sft") / "chats.jsonl"
    rows = []
    for i in range(60):
        w = words[i % len(words)]
        rows.append({"messages": [{"role": "system", "content": "Answer briefly."},
                                  {"role": "user", "content": f"Which number goes with {w}?"},
                                  {"role": "assistant", "content": f"{w} {i % 7}"},
                                  {"role": "user", "content": "And twice that?"},
                                  {"role": "assistant", "content": str(2 * (i % 7))}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def settings(base, chats, run_dir, *extra):
    return [f"--run.dir={run_dir}", f"--model.base={base}", f"--data.train=[\"{chats}\"]", "--data.seq_len=128",
            "--data.val_fraction=0.2", "--train.micro_batch=4", "--train.dtype=float32", "--train.max_steps=6",
            "--train.eval_interval=3", "--train.eval_batches=2", "--checkpoint.interval=3", "--lora.rank=4",
            "--lora.dropout=0.1", *extra]


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "lr" in r}


def test_lora_trains_the_adapters_only_and_leaves_the_base_bit_for_bit(base, chats, tmp_path):
    cfg = load_finetune_config(None, settings(base, chats, tmp_path / "run", "--train.lr=1e-2"))
    trainer = FinetuneTrainer(cfg, log=False)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters) and frozen
    trainer.train_step()
    assert all((p.grad is not None) == p.requires_grad for p in trainer.model.parameters())
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in frozen.items())
    assert all(not torch.equal(after[n], t) for n, t in adapters.items() if "lora_B" in n)
    logged = losses(tmp_path / "run")     # step 1 ran outside fit, unlogged
    assert sorted(logged) == [2, 3, 4, 5, 6] and logged[6][0] < logged[2][0]


def test_finetune_command_writes_adapter_merged_model_and_resumes(base, chats, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["finetune", str(EMPTY), *settings(base, chats, run, "--sample.prompts=[\"Which number goes with gold?\"]",
                                                  "--sample.max_new_tokens=4")]) == 0
    out = capsys.readouterr()
    assert "--- Which number goes with gold?" in out.out
    report = json.loads((run / "data.json").read_text())
    assert report["train"]["kept"] == 48 and report["val"]["kept"] == 12
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert not (run / "checkpoints" / "step_00000006" / "model.safetensors").exists()  # adapters only
    # the merged model equals the base with the adapters applied unmerged
    tokens = torch.tensor([[1, 17, 99, 230, 5, 61, 7]])
    merged = camelid.load(run / "model", compile=False)
    unmerged = camelid.load(base, adapter=run / "adapter", compile=False)
    plain = camelid.load(base, compile=False)
    with torch.no_grad():
        a, b, c = merged.model(tokens), unmerged.model(tokens), plain.model(tokens)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - c).abs().max() > 1e-4  # the adapters did something
    # the same command again: resumes at the end, nothing more to train
    assert cli(["finetune", str(EMPTY), *settings(base, chats, run)]) == 0
    assert "resuming from" in capsys.readouterr().err


def test_full_finetuning_trains_every_weight(base, chats, tmp_path):
    cfg = load_finetune_config(None, settings(base, chats, tmp_path / "run", "--model.method=full", "--train.lr=1e-3",
                                              "--train.max_steps=2"))
    trainer = FinetuneTrainer(cfg, log=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert all(p.requires_grad for p in trainer.model.parameters())
    trainer.fit()
    model_dir = trainer.export()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert camelid.load(model_dir, compile=False).model.layers[0].attention.wq.weight.shape == before[
        "layers.0.attention.wq.weight"].shape
    assert not (tmp_path / "run" / "adapter").exists()


def test_kill_9_during_a_lora_run_then_resume_gives_the_same_losses(base, chats, tmp_path):
    args = settings(base, chats, "{run}", "--train.max_steps=40", "--checkpoint.interval=10", "--train.log_interval=1",
                    "--train.eval_interval=1000")
    straight, broken, logged = straight_and_killed(["finetune", EMPTY, *args], tmp_path, 23)
    assert 23 <= logged < 40, "the run was not interrupted mid-way"   # between the 20th-step checkpoint and the end
    a, b = losses(straight), losses(broken)
    assert list(a) == list(range(1, 41)) and a == b  # every step's loss and gradient norm (dropout on), bit for bit


@pytest.mark.parametrize("override, expected", [
    ("--model.method=lorra", "model.method must be one of full, lora, qlora"),
    ("--lora.targets=[\"wq\", \"attn\"]", "lora.targets: choose among"),
    ("--lora.rank=0", "lora.rank must be at least 1"),
    ("--data.overflow=cut", "data.overflow must be truncate or drop"),
    ("--data.train_on=user", "data.train_on must be assistant or all"),
    ("--data.builtin=corpus-quiz", "give the instruction data one way"),
    ("--model.group_size=64", "model.group_size sets int4's groups"),
    ("--parallel.dp_shard=2", "runs in one process"),
    ("--data.val_fraction=0", "validation needs held-out examples"),
    ("--model.bogus=1", "unknown key(s) ['bogus']"),
])
def test_bad_settings_are_refused_in_one_line(base, chats, tmp_path, capsys, override, expected):
    line = cli_error(capsys, "finetune", EMPTY, *settings(base, chats, tmp_path / "run"), override)
    assert expected in line and not (tmp_path / "run").exists()


def test_a_base_that_is_not_a_model_is_named(chats, tmp_path, capsys):
    line = cli_error(capsys, "finetune", EMPTY, *settings(tmp_path / "nowhere", chats, tmp_path / "run"))
    assert "model.base" in line and "nowhere" in line


def test_a_resumed_run_must_keep_its_method(base, chats, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["finetune", str(EMPTY), *settings(base, chats, run, "--train.max_steps=3")]) == 0
    line = cli_error(capsys, "finetune", EMPTY, *settings(base, chats, run, "--train.max_steps=6", "--lora.rank=8"))
    assert "step_00000003" in line and "another run.dir" in line


def test_win_rates_count_a_tie_as_half():
    from camelid.finetune.evaluation import win_rates

    before = {"q": [1, 0, 0, 1, 0], "mc": [1.0]}
    after = {"q": [1, 1, 0, 0, 1]}
    scores = [1, 1, 1 / 2, 0, 1 / 2]   # per question: a win 1, a tie 1/2, a loss 0
    stderr = statistics.stdev(scores) / math.sqrt(5)
    assert win_rates(before, after) == {"q": {"win_rate": pytest.approx(statistics.mean(scores)),
                                              "win_rate_stderr": pytest.approx(stderr), "wins": 2, "ties": 2,
                                              "losses": 1}}
    # graded answers (0 wrong, 1 right, 2 right and preferred): a preferred answer beats a plain right one
    figures = win_rates({"q": [1, 2, 0, 1]}, {"q": [2, 1, 1, 1]})["q"]
    assert (figures["win_rate"], figures["wins"], figures["ties"], figures["losses"]) == ((2 + 1 / 2) / 4, 2, 1, 1)
    assert win_rates({"q": [1]}, {"q": [2]})["q"]["win_rate_stderr"] is None   # one question: no spread to measure
    with pytest.raises(ValueError):   # other questions than the base answered: never compared
        win_rates({"q": [1, 0]}, {"q": [1]})


def test_answers_by_generation_get_the_win_rate_against_the_base(base, chats, tmp_path, capsys):
    questions = tmp_path / "answers.jsonl"
    rows = [json.loads(line) for line in chats.read_text().splitlines()][:12]
    # every other question prefers its one right answer: graded 0 or 2 there, 0 or 1 elsewhere
    questions.write_text("".join(json.dumps({"messages": r["messages"][:2], "answers": r["messages"][2]["content"],
                                             **({"preferred": r["messages"][2]["content"]} if i % 2 else {})}) + "\n"
                                 for i, r in enumerate(rows)))
    run = tmp_path / "run"
    assert cli(["finetune", str(EMPTY), *settings(base, chats, run, "--train.lr=2e-2", "--model.method=full",
                                                  f"--evaluate.tasks=[\"{questions}\"]")]) == 0
    out = capsys.readouterr().out
    record = json.loads((run / "evaluation.json").read_text())
    before, after = record["outcomes"]["before"]["answers"], record["outcomes"]["after"]["answers"]
    assert len(before) == len(after) == 12
    for grades in (before, after):
        assert set(grades[0::2]) <= {0.0, 1.0} and set(grades[1::2]) <= {0.0, 2.0}
    figures = record["after"]["answers"]
    wins = sum(a > b for a, b in zip(after, before))
    losses = sum(a < b for a, b in zip(after, before))
    assert (figures["wins"], figures["losses"], figures["ties"]) == (wins, losses, 12 - wins - losses)
    assert figures["win_rate"] == pytest.approx((wins + (12 - wins - losses) / 2) / 12)
    assert figures["exact_match"] == pytest.approx(sum(g > 0 for g in after) / 12)
    assert figures["preferred"] == pytest.approx(sum(g == 2 for g in after) / 12)
    assert f"{wins} better, {12 - wins - losses} the same, {losses} worse" in out
