"""RL from a reward (camelid.align): PPO's and GRPO's arithmetic against hand computations, the
reference's log-probs, the KL controllers, a tiny policy learning a toy reward, exact resume
after kill -9, and the refusals of bad settings and of a reward model with another tokenizer."""

import json
import math
from pathlib import Path

import pytest
import torch

from camelid.align import rl
from camelid.cli.main import main as cli
from camelid.align.ppo import PPOTrainer
from camelid.align.rewards import TokenReward, same_tokenizer
from camelid.align.rollout import Sequences, prompt_messages, token_figures
from camelid.checkpoint.native import write_native
from camelid.config import ModelConfig
from camelid.finetune.config import load_finetune_config
from camelid.lora import LoraSettings, adapters_disabled, apply_lora
from camelid.model import Transformer
from helpers import cli_error, straight_and_killed, train_byte_bpe, train_sentencepiece

EMPTY = Path(__file__).parent / "data" / "empty.toml"
WORDS = ["summer", "winds", "buds", "gold", "eye", "heaven", "nature", "death", "time", "life"]


def small_model(vocab: int, seed: int, num_labels: int = 0) -> Transformer:
    config = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=vocab, multiple_of=32,
                         norm_eps=1e-5, max_seq_len=128, num_labels=num_labels)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model


@pytest.fixture(autouse=True)
def keep_threads():
    """The runs here take one thread (train.threads = 1: on a shared machine, tiny matrices over
    two threads wait for each other); the rest of the suite keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm320"), vocab_size=320)


@pytest.fixture(scope="module")
def policy(tmp_path_factory, tokenizer):
    """A tiny camelid checkpoint (dim 32, 2 layers, a 320-token SentencePiece vocabulary)."""
    path = tmp_path_factory.mktemp("policy") / "model"
    path.mkdir()
    model = small_model(tokenizer.vocab_size, seed=3)
    write_native(path, model.config, tokenizer, model.state_dict().items())
    return path


def write_scorer(path: Path, tokenizer, seed: int = 5) -> Path:
    """A random reward model (num_labels = 1) whose scores spread (head of std 1)."""
    model = small_model(tokenizer.vocab_size, seed=seed, num_labels=1)
    with torch.no_grad():
        model.output.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    path.mkdir(parents=True)
    write_native(path, model.config, tokenizer, model.state_dict().items())
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n" for w in WORDS * 2))
    return path


def settings(policy, prompts, run_dir, *extra):
    return [f"--run.dir={run_dir}", f"--model.base={policy}", f"--data.train=[\"{prompts}\"]", "--data.seq_len=64",
            "--data.val_fraction=0.2", "--model.objective=ppo", "--model.method=full", "--train.dtype=float32",
            "--train.max_steps=6", "--train.lr=1e-2", "--train.warmup_steps=0", "--train.eval_interval=1000",
            "--train.eval_batches=1", "--checkpoint.interval=1000", "--rl.compile=false", "--rl.prompts_per_step=2",
            "--rl.completions_per_prompt=4", "--rl.max_new_tokens=8", "--rl.minibatch=4", "--rl.epochs=2",
            "--lora.rank=4", "--lora.dropout=0", "--train.threads=1", *extra]


def metrics(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward_mean" in r}


# ---- the arithmetic ---------------------------------------------------------------------------------

def test_gae_equals_a_hand_computation():
    rewards = torch.tensor([[0.1, -0.2, 1.5], [0.3, 0.7, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.2], [-0.1, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])       # the second completion is 2 tokens long
    gamma, lam = 0.9, 0.8
    adv, ret = rl.gae(rewards, values, mask, gamma, lam)
    # row 0: deltas backwards from the end, where the value after the last token is 0
    d2 = 1.5 - 0.2
    d1 = -0.2 + 0.9 * 0.2 - 0.4
    d0 = 0.1 + 0.9 * 0.4 - 0.5
    a2, a1 = d2, d1 + 0.72 * d2
    a0 = d0 + 0.72 * a1
    # row 1: the padding slot (value 9) is never seen
    e1 = 0.7 - 0.6
    e0 = 0.3 + 0.9 * 0.6 + 0.1
    b1, b0 = e1, e0 + 0.72 * e1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.2], [b0 - 0.1, b1 + 0.6, 0.0]]))


def test_the_clipped_objective_gives_no_gradient_where_the_ratio_is_clipped():
    old = torch.zeros(1, 5)
    # ratios 1.5 (A > 0: clipped), 0.5 (A < 0: clipped), 1.5 (A < 0: not), 1.1 (A > 0: inside), padding
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 1.1, 3.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, -2.0, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clip_frac = rl.policy_loss(logp, old, adv, mask, clip=0.2)
    loss.backward()
    # by hand: max(-A r, -A clip(r)) per token, averaged over the 4 real ones
    expected = (-1.0 * 1.2 + -1.0 * 0.8 * -1 + 2.0 * 1.5 + -0.5 * 1.1) / 4
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-6)
    assert float(clip_frac) == 0.5
    g = logp.grad[0]
    assert g[0] == 0 and g[1] == 0 and g[4] == 0
    # d/dlogp of -A r / 4 = -A r / 4
    torch.testing.assert_close(g[2:4], torch.tensor([2.0 * 1.5 / 4, -0.5 * 1.1 / 4]))


def test_the_value_loss_is_clipped_around_the_old_values():
    values = torch.tensor([[1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.3]])
    loss = rl.value_loss(values, old, returns, torch.tensor([[1, 1]]), clip=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24 (the clipped one: no gradient); token 1: 0.09
    assert math.isclose(float(loss.detach()), 0.5 * (3.24 + 0.09) / 2, rel_tol=1e-6)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5 * 2 * (0.0 - 0.3) / 2]]))


def test_the_kl_penalty_is_the_reference_log_prob_of_the_sampled_tokens():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.4, 0.0]])
    ref = logp.clone()
    ref[0, 1] = -3.5                                   # the reference differs on one sampled token only
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([0.7, -1.2])
    rewards = rl.shaped_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # -0.1 * (logp - ref) on each token, the score on each completion's last token
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.1 * 1.5, 0.7], [0.0, -1.2, 0.0]]))
    assert math.isclose(float(rl.sequence_kl(logp, ref, mask)), 1.5 / 2)
    k3 = rl.kl_k3(logp, ref)
    assert math.isclose(float(k3[0, 1]), math.exp(-1.5) - 1 + 1.5, rel_tol=1e-6)
    assert float(k3.abs().sum() - k3[0, 1]) == 0


def test_adaptive_and_fixed_kl_controllers():
    c = rl.kl_controller(0.1, target=6.0, horizon=10000)
    c.update(9.0, n_steps=64)                          # KL/target - 1 = 0.5, clipped to 0.2
    assert math.isclose(c.coef, 0.1 * (1 + 0.2 * 64 / 10000))
    before = c.coef
    c.update(5.0, n_steps=64)                          # -1/6, inside the clip
    assert math.isclose(c.coef, before * (1 - (1 / 6) * 64 / 10000))
    fixed = rl.kl_controller(0.1, target=0.0, horizon=10000)
    fixed.update(100.0, n_steps=64)
    assert fixed.coef == 0.1 and isinstance(fixed, rl.FixedKL) and not isinstance(fixed, rl.AdaptiveKL)


def test_grpo_group_advantages():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 1.0, 2.0, 2.0])
    adv = rl.group_advantages(scores, 4, eps=1e-4)
    # group 1: mean 0.5, population std 0.5; group 2: all alike, nothing to learn; group 3: mean 2, std sqrt(0.5)
    s = math.sqrt(0.5)
    expected = [0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001, 0, 0, 0, 0,
                1 / (s + 1e-4), -1 / (s + 1e-4), 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected))


def test_adapters_disabled_gives_the_base_and_restores_the_adapters():
    model = small_model(64, seed=1)
    tokens = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        plain = model(tokens)
        apply_lora(model, LoraSettings(rank=2, targets=("wq", "wv", "w2", "output")), seed=0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        adapted = model(tokens)
        with adapters_disabled(model):
            off = model(tokens)
        again = model(tokens)
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-6)
    assert (adapted - plain).abs().max() > 1e-2 and torch.equal(again, adapted)


def test_prompts_are_the_prompt_part_of_each_record_format():
    user = {"role": "user", "content": "Hi?"}
    answer = {"role": "assistant", "content": "Hello."}
    assert prompt_messages({"prompt": "Hi?", "completion": "Hello."}, "f:1") == [user]
    assert prompt_messages({"prompt": "Hi?"}, "f:1") == [user]
    assert prompt_messages({"prompt": "Hi?", "chosen": "a", "rejected": "b"}, "f:1") == [user]
    assert prompt_messages({"messages": [user], "chosen": [answer], "rejected": [answer]}, "f:1") == [user]
    assert prompt_messages({"messages": [user, answer, user, answer]}, "f:1") == [user, answer, user]
    assert prompt_messages({"instruction": "Add", "input": "1 2", "output": "3"}, "f:1") == [
        {"role": "user", "content": "Add\n\n1 2"}]
    from camelid.errors import CamelidError

    with pytest.raises(CamelidError, match="f:3: prompt message 0 .* is empty"):
        prompt_messages({"prompt": " ", "completion": "x"}, "f:3")
    with pytest.raises(CamelidError, match="f:4: no prompt"):
        prompt_messages({"text": "x"}, "f:4")


# ---- the trainer -------------------------------------------------------------------------------------

def test_rollout_log_probs_come_from_the_policy_and_the_base_for_the_sampled_tokens(policy, prompts, tmp_path):
    """LoRA: the reference is the base (adapters off); its log-probs of the sampled tokens equal a
    plain forward of the base's checkpoint, while the policy's differ once its adapters have moved."""
    import camelid

    cfg = load_finetune_config(None, settings(policy, prompts, tmp_path / "run", "--model.method=lora"))
    trainer = PPOTrainer(cfg, log=False, reward=TokenReward(7))
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    roll = trainer.rollout(trainer.train_loader.next_batch(), 4, seed=11)
    base = camelid.load(policy, compile=False).model
    seq = roll["seq"]
    with torch.no_grad():
        logits = base(seq.tokens)                                                   # [N, L, V]
    by_hand = torch.zeros(seq.mask.shape)
    for i, (p, c) in enumerate(zip(roll["rows"], roll["completions"])):
        for j, tok in enumerate(c):
            by_hand[i, j] = torch.log_softmax(logits[i, len(p) - 1 + j], -1)[tok]
    torch.testing.assert_close(roll["ref_logp"], by_hand, atol=1e-5, rtol=0)
    assert (roll["logp"] - roll["ref_logp"]).abs().max() > 1e-2
    assert roll["values"].abs().max() == 0     # the value head starts at zero
    # and the policy's own log-probs are its forward's, through the same layout
    with torch.no_grad():
        again = token_figures(trainer.model, Sequences.of(roll["rows"], roll["completions"]), 1.0).logp
    torch.testing.assert_close(roll["logp"], again, atol=1e-5, rtol=0)


def test_full_finetuning_keeps_its_reference_frozen(policy, prompts, tokenizer, tmp_path):
    scorer = write_scorer(tmp_path / "rm", tokenizer)
    cfg = load_finetune_config(None, settings(policy, prompts, tmp_path / "run", f"--rl.reward_model={scorer}"))
    trainer = PPOTrainer(cfg, log=False)
    before = {n: p.detach().clone() for n, p in trainer.reference.named_parameters()}
    trainer.train_step()
    record = trainer.train_step()
    assert all(torch.equal(p, before[n]) for n, p in trainer.reference.named_parameters())
    assert record["kl"] != 0


@pytest.mark.parametrize("objective, method", [("ppo", "full"), ("grpo", "lora")])
def test_a_tiny_policy_learns_to_say_a_token_with_bounded_kl(policy, prompts, tokenizer, tmp_path, objective, method):
    target = tokenizer.encode("gold")[-1]
    # a random model this small can only favour one token by much through its head: LoRA adapts it too
    extra = (["--train.lr=1e-2"] if method == "full" else
             ["--train.lr=3e-2", "--lora.targets=[\"wq\", \"wv\", \"w2\", \"output\"]"])
    cfg = load_finetune_config(None, settings(policy, prompts, tmp_path / "run", "--train.max_steps=50",
                                              f"--model.objective={objective}", f"--model.method={method}",
                                              "--rl.kl_coef=0.05", "--rl.max_new_tokens=12", *extra))
    trainer = PPOTrainer(cfg, log=False, reward=TokenReward(target))
    result = trainer.fit()
    m = metrics(tmp_path / "run")
    assert sorted(m) == list(range(1, 51))
    first = sum(m[s]["reward_mean"] for s in range(1, 11)) / 10
    last = sum(m[s]["reward_mean"] for s in range(41, 51)) / 10
    assert last > first + 0.3 and last > 0.5, (first, last)
    # the penalty holds the KL far below what saying the token everywhere costs (about 12 x log 320
    # = 69 nats); where it peaks depends on the optimizer's rounding over 50 steps at this learning
    # rate (fused AdamW: 21.4, foreach: under 20)
    assert max(r["kl"] for r in m.values()) < 30.0
    assert all(k in m[50] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "entropy", "clip_frac",
                                    "response_length", "rollout_s", "update_s", "rollout_tokens_per_s",
                                    "update_tokens_per_s", "kl_coef"))
    assert ("value_loss" in m[50]) == (objective == "ppo") and result["step"] == 50
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 10, 20, 30, 40, 50} and all(len(s) == 4 for s in samples)


@pytest.mark.slow
def test_kill_9_during_a_ppo_run_then_resume_gives_the_same_figures(policy, prompts, tokenizer, tmp_path):
    scorer = write_scorer(tmp_path / "rm", tokenizer)
    args = settings(policy, prompts, "{run}", "--train.max_steps=24", "--checkpoint.interval=8",
                    "--model.method=lora", f"--rl.reward_model={scorer}", "--rl.kl_target=1", "--rl.kl_horizon=100",
                    "--train.lr=3e-2", "--train.eval_interval=8", "--checkpoint.keep=1")
    straight, broken, logged = straight_and_killed(["finetune", EMPTY, *args], tmp_path, 11)
    assert 11 <= logged < 24, "the run was not interrupted mid-way"   # past the checkpoint at step 8
    keys = ("loss", "grad_norm", "reward_mean", "kl", "kl_coef", "entropy", "clip_frac", "value_loss",
            "response_length")
    a, b = metrics(straight), metrics(broken)
    assert list(a) == list(range(1, 25)) and list(b) == list(range(1, 25))
    assert {s: [r[k] for k in keys] for s, r in a.items()} == {s: [r[k] for k in keys] for s, r in b.items()}
    assert len({r["kl_coef"] for r in a.values()}) > 1     # the adaptive coefficient moved, and resumed
    assert (straight / "samples.jsonl").read_text() == (broken / "samples.jsonl").read_text()


def test_rerunning_a_finished_run_exports_again_without_a_step(policy, prompts, tokenizer, tmp_path, capsys):
    """The run's last checkpoint is at train.max_steps: the rerun takes no step, says so in the
    usual summary and exits 0 (it used to fail formatting the reward of a step it never took)."""
    args = settings(policy, prompts, tmp_path / "run", "--train.max_steps=2", "--checkpoint.interval=2",
                    f"--rl.reward_model={write_scorer(tmp_path / 'rm', tokenizer)}")
    assert cli(["finetune", str(EMPTY), *args]) == 0
    capsys.readouterr()
    assert cli(["finetune", str(EMPTY), *args]) == 0
    out, err = capsys.readouterr()
    assert "done: step 2" in out + err and "Traceback" not in err and "reward:" not in err
    assert list(metrics(tmp_path / "run")) == [1, 2]


def test_a_reward_model_with_another_tokenizer_is_refused_in_one_line(policy, prompts, tmp_path, capsys):
    other = train_byte_bpe()
    scorer = write_scorer(tmp_path / "rm", other)
    assert not same_tokenizer(other, train_sentencepiece(tmp_path / "spm", vocab_size=320))
    line = cli_error(capsys, "finetune", EMPTY, *settings(policy, prompts, tmp_path / "run",
                                                         f"--rl.reward_model={scorer}"))
    assert "rl.reward_model" in line and "tokenizer differs from the policy's" in line
    assert not (tmp_path / "run").exists()


def test_a_language_model_is_no_reward_model(policy, prompts, tmp_path, capsys):
    line = cli_error(capsys, "finetune", EMPTY, *settings(policy, prompts, tmp_path / "run",
                                                         f"--rl.reward_model={policy}"))
    assert "not a reward model" in line


@pytest.mark.parametrize("override, expected", [
    ("--rl.temperature=0", "rl.temperature must be above 0"),
    ("--rl.max_new_tokens=64", "leaves no room for a prompt"),
    ("--rl.kl_target=-1", "rl.kl_target must be 0"),
    ("--rl.minibatch=0", "rl.minibatch must be at least 1"),
    ("--train.compile=true", "train.compile"),
    ("--parallel.dp_shard=2", "runs in one process"),
])
def test_bad_rl_settings_are_refused_in_one_line(policy, prompts, tmp_path, capsys, override, expected):
    line = cli_error(capsys, "finetune", EMPTY, *settings(policy, prompts, tmp_path / "run"), override)
    assert expected in line and not (tmp_path / "run").exists()


def test_grpo_needs_a_group_and_ppo_a_reward_model(policy, prompts, tmp_path, capsys):
    line = cli_error(capsys, "finetune", EMPTY, *settings(policy, prompts, tmp_path / "run", "--model.objective=grpo",
                                                         "--rl.completions_per_prompt=1"))
    assert "rl.completions_per_prompt must be at least 2 (GRPO" in line
    line = cli_error(capsys, "finetune", EMPTY, *settings(policy, prompts, tmp_path / "run"))
    assert "rl.reward_model is empty" in line


@pytest.mark.parametrize("recipe", ["quickstart-ppo.toml", "quickstart-grpo.toml"])
def test_the_rl_recipes_pass_their_checks(recipe):
    cfg = load_finetune_config(Path(__file__).parent.parent / "recipes" / recipe)
    assert cfg.model.objective in ("ppo", "grpo") and cfg.rl.reward_model and cfg.data.builtin == "corpus-quiz"
