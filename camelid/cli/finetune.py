"""Finetune a model: fully, with LoRA adapters on a frozen base, or with QLoRA (adapters on a
frozen int4/int8 base), on instructions (model.objective = "sft") or on preference pairs: a
reward model ("reward", Bradley-Terry) or the model itself with DPO ("dpo"). CONFIG.toml holds
the sections run, model (base, method, objective), lora, data, train, checkpoint, parallel,
stability, sample, evaluate and dpo (see recipes/quickstart-sft.toml, quickstart-reward.toml,
quickstart-dpo.toml, docs/finetuning.md and docs/alignment.md); any key can be overridden on the
command line as --section.key=value. Running the same command again resumes from the newest
complete checkpoint in run.dir, exactly where the interrupted run was.

instruction data (data.train, data.val: JSONL or Parquet files, one example per line/row):
  chat        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  alpaca      {"instruction": "...", "input": "...", "output": "..."}   (input may be empty or absent)
  prompt_completion  {"prompt": "...", "completion": "..."}
rendered with the base model's own chat template (the one `camelid chat` uses; a model without
one gets its vocabulary's built-in format, Llama-2's [INST] for a plain SentencePiece vocabulary).
The loss covers what the assistant says (data.train_on = "all": every token). data.hf_dataset
reads a Hugging Face dataset instead; data.builtin = "corpus-quiz" builds the demo's questions.

model.objective: sft (the above), or ppo / grpo: reinforcement learning from a reward model
(rl.reward_model, which must share the policy's tokenizer) on prompts: the prompt part of the
data's records (chat, alpaca, prompt_completion, or preference {"prompt" | "messages", "chosen",
"rejected"}; {"prompt": "..."} alone too) or data.builtin's questions. Each step samples
rl.completions_per_prompt completions of rl.prompts_per_step prompts with the generation core,
then takes rl.epochs passes of rl.minibatch-completion updates: PPO with a value head, GAE and a
KL penalty to the reference (LoRA: the base, adapters off; full: a frozen copy), or GRPO (group
advantages, no critic). See docs/rl.md and recipes/quickstart-ppo.toml.

preference pairs (objectives reward and dpo; data.format = "preference", detected by its keys):
  {"prompt": "..." | [messages], "chosen": "...", "rejected": "..."}  ("messages" may replace "prompt";
  chosen and rejected may be an assistant message or a list of messages)
rendered after one shared prompt with the same chat template; a malformed record is an error
naming its file and line, a tie (chosen renders as rejected) is skipped and counted in data.json.
data.builtin = "corpus-preferences" builds the demo's pairs (the quiz's right answer over a wrong one).
  reward  a new one-output score head read at the last token, loss -log sigmoid(r_chosen - r_rejected);
          run.dir/model is a camelid checkpoint with num_labels = 1
  dpo     [dpo] beta, loss (sigmoid | ipo), label_smoothing (cDPO), reference (auto: lora/qlora the
          base with the adapters off, full precomputed once into run.dir/reference.pt)

Full finetuning runs under torchrun too (FSDP, parallel.dp_shard); LoRA and QLoRA, and the reward,
dpo, ppo and grpo objectives, in one process.

writes into run.dir:
  data.json         examples kept, truncated and dropped (train and held out)
  metrics.jsonl     one JSON object per logged step (step, loss, lr, grad_norm, tokens_per_s, ...),
                    validation (val_loss, val_ppl); reward: accuracy, margin, rewards_chosen/_rejected;
                    dpo: rewards_chosen/_rejected/_accuracy/_margin, logps_chosen/_rejected/_accuracy
                    (validation: the same with val_); loss.png; tensorboard/
  checkpoints/      step_NNNNNNNN/ (full: a camelid model; lora/qlora: adapter/ in PEFT's layout)
                    plus trainer.pt (optimizer, loader, random state)
  adapter/          lora/qlora: the adapters alone, in Hugging Face PEFT's layout
                    (camelid generate --model BASE --adapter RUN_DIR/adapter; peft loads it too)
  model/            the finetuned model, adapters merged: camelid chat --model RUN_DIR/model
                    (also model-hf/, model.gguf, model-meta/ with checkpoint.export = ["hf", ...])
  evaluation.json   [evaluate] tasks (and data.builtin's held-out questions) before and after;
                    tasks answered by generation (the demo's heldout-answers): each answer's
                    grade by the task's rule (0 wrong, 1 right, 2 right and preferred) and
                    the win rate of the result's answers against the base's (wins, ties,
                    losses by grade); reward, dpo: the held-out pairs' accuracy and margin too
  reference.pt      dpo with a precomputed reference: its log-probabilities of every pair
  samples.json      the answers to the [sample] prompts (also printed)
  samples.jsonl     ppo/grpo: a few sampled completions with their rewards, every rl.sample_interval steps
                    (metrics.jsonl then holds reward_mean, kl, kl_coef, entropy, clip_frac, value_loss,
                    response_length, rollout_s, update_s, rollout_tokens_per_s, update_tokens_per_s)

examples:
  camelid finetune recipes/quickstart-sft.toml
  camelid finetune recipes/smollm2-lora.toml --train.max_steps=50
  camelid finetune recipes/quickstart-reward.toml
  camelid finetune recipes/quickstart-dpo.toml --dpo.beta=0.2
  camelid finetune recipes/quickstart-ppo.toml          (after the SFT and reward-model demos)
  camelid finetune recipes/quickstart-grpo.toml
  camelid finetune my.toml --model.base=path/to/Llama-2-7b-hf --model.method=qlora --data.train='["sft.jsonl"]'
  torchrun --nproc-per-node=4 -m camelid finetune my.toml --model.method=full --parallel.dp_shard=4
"""

from __future__ import annotations

import argparse
import sys

from camelid.align import preference
from camelid.align.dpo import DPOTrainer
from camelid.align.pairwise import PairwiseTrainer, RewardTrainer
from camelid.align.ppo import PPOTrainer
from camelid.cli.train import report_done
from camelid.distributed.runtime import shutdown
from camelid.finetune import evaluation
from camelid.finetune.config import FinetuneConfig, load_finetune_config
from camelid.finetune.trainer import ADAPTER, FinetuneTrainer, write_data_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.toml", help="finetuning recipe")
    p.set_defaults(accepts_overrides=True)


def base_load(cfg: FinetuneConfig) -> dict:
    """camelid.load's arguments for the base as finetuning holds it."""
    m = cfg.model
    return {"path": m.base, **({"quantize": m.quantize, "group_size": m.group_size} if m.method == "qlora" else {})}


def result_load(cfg: FinetuneConfig, trainer: FinetuneTrainer) -> dict:
    """...and for the result: QLoRA's adapters over the same quantized base, else the merged model."""
    if cfg.model.method == "qlora":
        return {**base_load(cfg), "adapter": trainer.run_dir / ADAPTER}
    return {"path": trainer.run_dir / "model"}


# model.objective -> its trainer
TRAINERS: dict[str, type[FinetuneTrainer]] = {"sft": FinetuneTrainer, "reward": RewardTrainer, "dpo": DPOTrainer,
                                              "ppo": PPOTrainer, "grpo": PPOTrainer}


def main(args: argparse.Namespace) -> int:
    cfg = load_finetune_config(args.config, args.overrides)
    try:
        trainer = TRAINERS[cfg.model.objective](cfg)
        pairwise = isinstance(trainer, PairwiseTrainer)
        tasks = list(cfg.evaluate.tasks) + trainer.heldout_tasks
        record = evaluation.saved(trainer.run_dir) if trainer.main else {}
        e = cfg.evaluate
        if trainer.main:
            write_data_report(trainer.run_dir, trainer.data_report)
            if pairwise:
                print(preference.describe(trainer.data_report), file=sys.stderr)
            else:
                say_data(trainer.data_report)
            if (tasks or pairwise) and "before" not in record:
                before, outcomes = evaluation.run_tasks(tasks, e.limit, e.num_fewshot, str(trainer.device),
                                                        **base_load(cfg)) if tasks else ({}, {})
                if pairwise and not trainer.resumed_from:   # the figures of the model as built
                    before.update(trainer.heldout_figures())
                record = {"tasks": tasks, "before": before, "outcomes": {"before": outcomes}}
                evaluation.save(trainer.run_dir, record)
        result = trainer.fit()
        model_dir = trainer.export()
        if trainer.main:
            extra = f"\n  adapter    {trainer.run_dir / ADAPTER}" if cfg.adapters else ""
            if tasks or pairwise:
                after, outcomes = evaluation.run_tasks(tasks, e.limit, e.num_fewshot, str(trainer.device),
                                                       **result_load(cfg, trainer)) if tasks else ({}, {})
                for task, figures in evaluation.win_rates(record.get("outcomes", {}).get("before", {}),
                                                          outcomes).items():
                    after[task].update(figures)
                record.setdefault("outcomes", {})["after"] = outcomes
                if pairwise:
                    after.update(trainer.heldout_figures(trainer.result_model()))
                record["after"] = after
                evaluation.save(trainer.run_dir, record)
                print(evaluation.side_by_side(record.get("before", {}), record["after"]), flush=True)
                extra += f"\n  evaluation {trainer.run_dir / evaluation.EVALUATION}"
            if "reward_mean" in result:
                if result["reward_mean"] is not None:   # None: a finished run rerun, no step taken
                    val = f", validation {result['val_reward_mean']:.4f}" if "val_reward_mean" in result else ""
                    print(f"reward: {result['reward_mean']:.4f} at the last step{val}", file=sys.stderr)
                extra += f"\n  rollouts   {trainer.run_dir / 'samples.jsonl'}"
            report_done(trainer, result, model_dir, extra)
        trainer.runtime.barrier()  # the other ranks wait while rank 0 evaluates and samples
    finally:
        shutdown()
    return 0


def say_data(report: dict) -> None:
    def counts(c: dict) -> str:
        dropped = f", {c['dropped']} dropped" if c.get("dropped") else ""
        return f"{c['kept']:,} examples ({c.get('truncated', 0)} truncated{dropped})"

    print(f"data: train {counts(report['train'])}, held out {counts(report['val'])}, "
          f"sequences of {report['seq_len']} tokens{' packed' if report['packing'] else ''}", file=sys.stderr)
