"""Reward models and DPO (camelid.align): the losses against hand computations, the LoRA reference
with its adapters off, the trainers on a tiny model (a loadable num_labels=1 checkpoint, the
precomputed reference kept across a resume, exact resume after kill -9) and the refusals of
their settings."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import camelid
from camelid.align import losses
from camelid.align.dpo import DPOTrainer, completion_logps
from camelid.align.losses import (bradley_terry_loss, dpo_loss, head_sequence_logps, preference_accuracy,
                                  sequence_logps)
from camelid.align.pairwise import RewardTrainer, pair_scores
from camelid.align.preference import Pair, PairLoader
from camelid.checkpoint import build_model, read_checkpoint
from camelid.checkpoint.native import write_native
from camelid.cli.main import main as cli
from camelid.config import get_size
from camelid.errors import CamelidError
from camelid.finetune.config import load_finetune_config
from camelid.finetune.data import IGNORE, Example
from camelid.finetune.trainer import FinetuneTrainer
from camelid.lora import LoraSettings, adapters_disabled, apply_lora, read_adapter
from camelid.model import Transformer
from helpers import cli_error, straight_and_killed, logged_losses
from test_model import tiny

EMPTY = Path(__file__).parent / "data" / "empty.toml"
LOG2 = float(torch.tensor(2.0).log())   # log 2 in float32, as the loss computes it


# ---- the losses by hand --------------------------------------------------------------------------

def test_bradley_terry_loss_and_gradients_equal_a_hand_computation():
    rc = torch.tensor([1.5, -0.2, 0.3, 40.0], requires_grad=True)
    rr = torch.tensor([0.5, 0.4, 0.3, -40.0], requires_grad=True)
    loss = bradley_terry_loss(rc, rr)
    loss.sum().backward()
    for i, (c, r) in enumerate(zip(rc.tolist(), rr.tolist())):
        d = c - r
        assert loss[i].item() == pytest.approx(math.log1p(math.exp(-d)), rel=1e-6, abs=1e-30)
        assert rc.grad[i].item() == pytest.approx(-1 / (1 + math.exp(d)), rel=1e-6, abs=1e-30)
        assert rr.grad[i].item() == pytest.approx(1 / (1 + math.exp(d)), rel=1e-6, abs=1e-30)
    assert preference_accuracy(rc, rr).tolist() == [1.0, 0.0, 0.5, 1.0]


def test_dpo_losses_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.2])
    beta, eps = 0.3, 0.1
    m = [((-10 + 11) - (-12 + 11.5)), ((-4 + 4.5) - (-3 + 3.2))]      # 1.5, 0.3
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-beta * x)) for x in m], rel=1e-6)
    assert chosen.tolist() == pytest.approx([beta * 1, beta * 0.5]) and rejected.tolist() == pytest.approx(
        [beta * -0.5, beta * 0.2])
    cdpo = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)[0]
    assert cdpo.tolist() == pytest.approx([(1 - eps) * math.log1p(math.exp(-beta * x))
                                           + eps * math.log1p(math.exp(beta * x)) for x in m], rel=1e-6)
    ipo = dpo_loss(pc, pr, rc, rr, beta, kind="ipo")[0]
    assert ipo.tolist() == pytest.approx([(x - 1 / (2 * beta)) ** 2 for x in m], rel=1e-6)
    # the policy equal to its reference: log 2, exactly
    same = torch.tensor([-7.25, -3.5, -100.0])
    assert dpo_loss(same, same + 1, same, same + 1, beta=0.1)[0].tolist() == [LOG2] * 3
    with pytest.raises(ValueError, match="hinge"):
        dpo_loss(pc, pr, rc, rr, beta, kind="hinge")


def tiny_lm(seed: int, vocab: int = 64) -> Transformer:
    model = Transformer(replace(get_size("tiny"), vocab_size=vocab, max_seq_len=128))
    model.init_weights(seed=seed)
    return model


def example(ids, prompt):
    return Example(ids, [False] * prompt + [True] * (len(ids) - prompt))


# chosen and rejected of different lengths: the batch pads all four rows to 16 tokens
PAIRS = [Pair(example([1, 5, 6, 7, 8, 2], 3), example([1, 5, 6, 9, 9, 9, 9, 11, 12, 2], 3), 3),
         Pair(example([1, 4, 8, 20, 21, 22, 23, 24, 25, 26, 27, 2], 5), example([1, 4, 8, 20, 21, 3, 2], 5), 5)]


def hand_logp(model: Transformer, ex: Example) -> torch.Tensor:
    """One row alone, unpadded: the sum of log p(token k | tokens before k) over its marked tokens."""
    logp = torch.log_softmax(model(torch.tensor([ex.ids]))[0].float(), dim=-1)
    return sum(logp[k - 1, ex.ids[k]] for k in range(1, len(ex.ids)) if ex.trainable[k])


def test_dpo_loss_and_gradients_equal_a_hand_computation_on_a_tiny_model(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK", 5)   # several chunks of positions through the head
    policy, reference, beta = tiny_lm(0), tiny_lm(1), 0.4
    batch = next(PairLoader(PAIRS, seq_len=64, batch_size=2, shuffle=False).one_pass())
    assert batch.inputs.shape == (4, 16)
    with torch.no_grad():
        ref = completion_logps(reference, batch)
    pc, pr = completion_logps(policy, batch).chunk(2)
    loss = dpo_loss(pc, pr, *ref.chunk(2), beta)[0].mean()
    loss.backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    hand = 0
    for pair in PAIRS:
        with torch.no_grad():
            ref_c, ref_r = hand_logp(reference, pair.chosen), hand_logp(reference, pair.rejected)
        x = beta * ((hand_logp(policy, pair.chosen) - ref_c) - (hand_logp(policy, pair.rejected) - ref_r))
        hand = hand + torch.log1p(torch.exp(-x)) / len(PAIRS)
    hand.backward()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_chunked_log_probs_equal_the_dense_ones(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK", 3)
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    targets[:, :2] = IGNORE
    targets[2] = IGNORE                               # a row with nothing scored sums to 0
    a = head_sequence_logps(lambda h: F.linear(h, weight), hidden, targets, 50)
    (a * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    b = sequence_logps(F.linear(hidden, weight), targets)
    (b * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
    torch.testing.assert_close(a, b)
    assert a[2].item() == 0
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_the_reward_is_read_at_each_rows_last_token():
    model = tiny_lm(2)
    model.output = torch.nn.Linear(64, 1, bias=False)
    model.config = model.config.replace(num_labels=1)
    batch = next(PairLoader(PAIRS, seq_len=64, batch_size=2, shuffle=False).one_pass())
    chosen, rejected = pair_scores(model, batch)
    with torch.no_grad():
        for i, pair in enumerate(PAIRS):
            for scores, ex in ((chosen, pair.chosen), (rejected, pair.rejected)):
                alone = model(torch.tensor([ex.ids]))[0, -1, 0]
                torch.testing.assert_close(scores[i], alone, atol=1e-5, rtol=1e-5)


def test_the_lora_reference_is_the_base_with_the_adapters_off():
    base, model = tiny_lm(3), tiny_lm(3)
    apply_lora(model, LoraSettings(rank=4, targets=("wq", "wv", "w2", "output")), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)                       # adapters that change the model
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = next(PairLoader(PAIRS, seq_len=64, batch_size=2, shuffle=False).one_pass())
    with torch.no_grad():
        assert not torch.allclose(model(tokens), base(tokens))
        with adapters_disabled(model):
            assert torch.equal(model(tokens), base(tokens))
            assert torch.equal(completion_logps(model, batch), completion_logps(base, batch))
        assert not torch.allclose(model(tokens), base(tokens))   # on again
        with pytest.raises(RuntimeError), adapters_disabled(model):
            raise RuntimeError("inside")
        assert not torch.allclose(model(tokens), base(tokens))   # on again after an error too


# ---- the trainers on a tiny model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory, spm_tokenizer):
    path = tmp_path_factory.mktemp("base") / "model"
    path.mkdir()
    model = tiny("tiny", seed=3)
    write_native(path, model.config, spm_tokenizer, model.state_dict().items())
    return path


WORDS = ["summer", "winds", "buds", "gold", "eye", "heaven", "nature", "death", "time", "life"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The right number after a word chosen over a wrong one (and a longer answer)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"Which number goes with {WORDS[i % 10]}?", "chosen": f"{WORDS[i % 10]} {i % 7}",
             "rejected": f"{WORDS[i % 10]} {(i + 3) % 7}, I think"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def settings(base, pairs, run_dir, objective, *extra):
    return [f"--run.dir={run_dir}", f"--model.base={base}", f"--data.train=[\"{pairs}\"]", "--data.seq_len=64",
            "--data.val_fraction=0.2", "--train.micro_batch=4", "--train.dtype=float32", "--train.max_steps=4",
            "--train.eval_interval=2", "--train.eval_batches=2", "--checkpoint.interval=2", "--lora.rank=4",
            "--lora.dropout=0.1", f"--model.objective={objective}", "--train.lr=1e-2", *extra]


def test_a_lora_reward_run_writes_a_loadable_scorer(base, pairs, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["finetune", str(EMPTY), *settings(base, pairs, run, "reward")]) == 0
    out = capsys.readouterr().out
    assert "val preference pairs" in out and "accuracy" in out
    ckpt = read_checkpoint(run / "model")
    assert ckpt.config.num_labels == 1 and not ckpt.config.tie_embeddings
    model = build_model(ckpt)
    assert model.output.weight.shape == (1, 64)
    # the adapter: PEFT's layout with the score head as modules_to_save, read back whole
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"] and config["task_type"] == "SEQ_CLS"
    _, state = read_adapter(run / "adapter", ckpt.config)
    assert torch.equal(state["output.weight"], model.output.weight)
    with pytest.raises(CamelidError, match="a reward model's adapter"):
        camelid.load(base, adapter=run / "adapter", compile=False)
    # the figures before and after; the logged steps carry accuracy and margin
    record = json.loads((run / "evaluation.json").read_text())
    assert set(record["before"]["val preference pairs"]) == {"accuracy", "margin"}
    assert set(record["after"]["val preference pairs"]) == {"accuracy", "margin"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(0 <= r["accuracy"] <= 1 and "margin" in r for r in steps)
    assert [r["step"] for r in rows if "val_accuracy" in r] == [2, 4]
    assert json.loads((run / "data.json").read_text())["train"] == {"kept": 32, "truncated": 0, "dropped": 0,
                                                                   "ties": 0}


def test_a_full_reward_model_learns_the_rule_and_its_export_scores_as_trained(base, pairs, tmp_path):
    cfg = load_finetune_config(None, settings(base, pairs, tmp_path / "run", "reward", "--model.method=full",
                                              "--train.lr=2e-3", "--train.max_steps=12", "--train.eval_interval=100"))
    trainer = RewardTrainer(cfg, log=False)
    assert trainer.model.output.weight.shape == (1, 64) and trainer.model.output.weight.requires_grad
    std = trainer.model.output.weight.std().item()
    assert 0.5 / math.sqrt(65) < std < 2 / math.sqrt(65)          # N(0, 1 / (dim + 1))
    before = trainer.figures("val")
    trainer.fit()
    trainer.export()
    mine = trainer.figures("val")
    loaded = trainer.figures("val", model=trainer.result_model())
    assert loaded == pytest.approx(mine, rel=1e-5, abs=1e-6)
    assert mine["accuracy"] == 1.0 and mine["loss"] < before["loss"]


def test_dpo_with_lora_starts_at_log_2_exactly_and_its_precomputed_twin_agrees(base, pairs, tmp_path):
    args = settings(base, pairs, tmp_path / "a", "dpo", "--lora.dropout=0")
    adapters = DPOTrainer(load_finetune_config(None, args), log=False)
    assert adapters.reference is None
    first = adapters.train_step()
    assert first["loss"] == LOG2 and first["rewards_accuracy"] == 0.5 and first["rewards_margin"] == 0
    assert first["logps_chosen"] < 0 and first["logps_rejected"] < 0
    args = settings(base, pairs, tmp_path / "b", "dpo", "--lora.dropout=0", "--dpo.reference=precomputed")
    precomputed = DPOTrainer(load_finetune_config(None, args), log=False)
    assert set(precomputed.reference) == {"train", "val"}
    second = precomputed.train_step()
    assert second["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert second["logps_chosen"] == pytest.approx(first["logps_chosen"], rel=1e-5)
    # with the chosen answers' per-token NLL added (Llama 3's DPO)
    args = settings(base, pairs, tmp_path / "c", "dpo", "--lora.dropout=0", "--dpo.nll_coef=0.2")
    trainer = DPOTrainer(load_finetune_config(None, args), log=False)
    batch = next(trainer._loader("val", 0).one_pass())
    with torch.no_grad():
        terms = trainer.pair_terms(batch)
    tokens = (batch.targets[:batch.pairs] != IGNORE).sum(-1)
    torch.testing.assert_close(terms["nll_chosen"], -terms["logps_chosen"] / tokens)
    torch.testing.assert_close(terms["loss"], LOG2 + 0.2 * terms["nll_chosen"])


def test_the_precomputed_reference_is_kept_across_a_resume_and_refused_for_other_data(base, pairs, tmp_path,
                                                                                      monkeypatch):
    run = tmp_path / "run"
    args = settings(base, pairs, run, "dpo", "--model.method=full", "--train.lr=1e-3", "--train.max_steps=2")
    trainer = DPOTrainer(load_finetune_config(None, args), log=False)
    assert trainer.reference_mode == "precomputed" and (run / "reference.pt").exists()
    trainer.fit()
    saved = (run / "reference.pt").read_bytes()

    def recompute(*a):
        raise AssertionError("the reference was computed again")

    monkeypatch.setattr(DPOTrainer, "_logps_of", recompute)
    resumed = DPOTrainer(load_finetune_config(None, args[:-1] + ["--train.max_steps=3"]), log=False)
    assert resumed.step == 2 and (run / "reference.pt").read_bytes() == saved
    for split, logps in trainer.reference.items():
        assert torch.equal(resumed.reference[split], logps)
    other = tmp_path / "other.jsonl"
    other.write_text(pairs.read_text().replace("I think", "I guess"))
    with pytest.raises(CamelidError, match="reference.pt holds the reference of other pairs"):
        DPOTrainer(load_finetune_config(None, [a.replace(str(pairs), str(other)) for a in args]), log=False)


def test_kill_9_during_a_dpo_run_then_resume_gives_the_same_losses(base, pairs, tmp_path):
    args = settings(base, pairs, "{run}", "dpo", "--train.max_steps=20", "--checkpoint.interval=5",
                    "--train.eval_interval=1000", "--train.lr=2e-3")
    straight, broken, logged = straight_and_killed(["finetune", str(EMPTY), *args], tmp_path, 13)
    assert 13 <= logged < 20, "the run was not interrupted mid-way"   # between the 10th-step checkpoint and the end

    def figures(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["grad_norm"], r["rewards_margin"]) for r in rows if "lr" in r}

    a, b = figures(straight), figures(broken)
    assert list(a) == list(range(1, 21)) and a == b   # dropout on: bit for bit, the random state restored too
    assert logged_losses(straight)[20][0] < LOG2


def test_a_run_directory_keeps_its_objective(base, pairs, tmp_path):
    run, sft = tmp_path / "run", tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                           for r in map(json.loads, pairs.read_text().splitlines())))
    args = settings(base, sft, run, "sft", "--train.max_steps=1", "--checkpoint.interval=1")
    FinetuneTrainer(load_finetune_config(None, args), log=False).fit()
    with pytest.raises(CamelidError, match="'objective': 'sft'.*'objective': 'dpo'.*another run.dir"):
        DPOTrainer(load_finetune_config(None, settings(base, pairs, run, "dpo")), log=False)
    # a reward model has another head: refused by its shape
    with pytest.raises(CamelidError, match=r"holds another model \(model.num_labels 0 -> 1\)"):
        RewardTrainer(load_finetune_config(None, settings(base, pairs, run, "reward")), log=False)


# ---- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective, override, expected", [
    ("dpo", "--data.format=chat", "trains on preference pairs; use data.format = \"preference\""),
    ("dpo", "--dpo.loss=hinge", "dpo.loss must be one of sigmoid, ipo"),
    ("dpo", "--dpo.beta=0", "dpo.beta must be positive"),
    ("dpo", "--dpo.label_smoothing=0.5", "dpo.label_smoothing must be in [0, 0.5)"),
    ("dpo", "--dpo.reference=base", "dpo.reference must be one of auto, precomputed"),
    ("reward", "--sample.prompts=[\"Which number goes with gold?\"]", "a reward model scores text"),
    ("reward", "--lora.targets=[\"wq\", \"output\"]", "remove \"output\""),
    ("reward", "--evaluate.tasks=[\"hellaswag\"]", "no language-model head"),
    ("reward", "--checkpoint.export=[\"gguf\"]", "exported to Hugging Face (\"hf\") only"),
    ("dpo", "--parallel.dp_shard=2", "runs in one process"),
    ("sft", "--data.format=preference", "preference pairs train model.objective"),
])
def test_bad_settings_are_refused_in_one_line(base, pairs, tmp_path, capsys, objective, override, expected):
    line = cli_error(capsys, "finetune", EMPTY, *settings(base, pairs, tmp_path / "run", objective), override,
                     *(["--model.method=full"] if "dp_shard" in override else []))
    assert expected in line and not (tmp_path / "run").exists()


def test_builtin_data_must_suit_the_objective(base, tmp_path, capsys):
    common = [f"--run.dir={tmp_path / 'run'}", f"--model.base={base}"]
    line = cli_error(capsys, "finetune", EMPTY, *common, "--model.objective=dpo", "--data.builtin=corpus-quiz")
    assert "use data.builtin = \"corpus-preferences\"" in line
    line = cli_error(capsys, "finetune", EMPTY, *common, "--data.builtin=corpus-preferences")
    assert "instruction finetuning takes data.builtin = \"corpus-quiz\"" in line


def test_instruction_finetuning_on_pairs_names_the_file(base, pairs, tmp_path, capsys):
    line = cli_error(capsys, "finetune", EMPTY, *settings(base, pairs, tmp_path / "run", "sft"))
    assert f"{pairs}:1" in line and "a preference pair" in line
