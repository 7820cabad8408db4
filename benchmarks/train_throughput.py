"""Training throughput on the stories15M shape: camelid against transformers.LlamaForCausalLM.

dim 288, 6 layers, 6 heads, vocabulary 32000 (tied head, as llama2.c), sequence 256, batch 8,
random tokens; both take the same AdamW (0.9, 0.95, weight decay 0.1) and clip gradients at 1.0;
fp32, then bf16 autocast; 2 threads; one run. Each engine runs in a fresh process of its own
(warm-up steps, then --rounds rounds of --steps optimizer steps; the fastest round counts), so
that process-wide settings stay with the engine that makes them. A third column gives
transformers the allocator setting camelid makes, to show what that setting is worth.

    python benchmarks/train_throughput.py [--threads 2] [--rounds 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

SEQ, BATCH = 256, 8


class CamelidEngine:
    def __init__(self, dtype: str, run_dir: str, compile: bool = False):
        from camelid.train import Trainer, load_train_config

        cfg = load_train_config(None, ["--model.size=stories15M", "--data.synthetic=true", f"--data.seq_len={SEQ}",
                                       f"--train.micro_batch={BATCH}", f"--train.dtype={dtype}",
                                       "--train.warmup_steps=10", f"--run.dir={run_dir}", "--train.max_steps=1000",
                                       f"--train.compile={'true' if compile else 'false'}"])
        self.trainer = Trainer(cfg, log=False)

    def step(self) -> None:
        self.trainer.train_step()


class TransformersEngine:
    def __init__(self, dtype: str):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=288, intermediate_size=768, num_hidden_layers=6,
                          num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=SEQ,
                          rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="sdpa")
        self.model = LlamaForCausalLM(cfg).train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                     lr=5e-4, betas=(0.9, 0.95))
        self.bf16 = dtype == "bfloat16"
        self.gen = torch.Generator().manual_seed(0)

    def step(self) -> None:
        block = torch.randint(0, 32000, (BATCH, SEQ + 1), generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=block[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), block[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()


def measure(engine: str, dtype: str, rounds: int, steps: int, tmp: str) -> float:
    """Best tokens/s of `rounds` rounds of `steps` steps, after 3 warm-up steps."""
    e = TransformersEngine(dtype) if engine.startswith("transformers") else \
        CamelidEngine(dtype, tmp, compile=engine == "camelid+compile")
    for _ in range(3):
        e.step()
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            e.step()
        best = max(best, steps * BATCH * SEQ / (time.perf_counter() - t0))
    return best


def in_subprocess(engine: str, dtype: str, args) -> float:
    """Each engine runs in a fresh process, as its users would run it: process-wide settings
    (camelid's allocator tuning, see camelid/platform.py) stay with the engine that makes them."""
    cmd = [sys.executable, __file__, "--worker", engine, dtype, "--threads", str(args.threads),
           "--rounds", str(args.rounds), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        engine, dtype = args.worker
        if engine == "transformers+allocator":
            from camelid.platform import keep_freed_memory

            keep_freed_memory()
        tmp = tempfile.mkdtemp()
        try:
            print(measure(engine, dtype, args.rounds, args.steps, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    print(f"stories15M shape, sequence {SEQ}, batch {BATCH}, CPU, {args.threads} threads, tokens/s "
          f"(fastest of {args.rounds} rounds of {args.steps} steps, each engine in its own process)")
    engines = ("transformers", "camelid", "camelid+compile", "transformers+allocator")
    print(f"{'':10s}" + "".join(f"{e:>24s}" for e in engines))
    for dtype in ("float32", "bfloat16"):
        r = {e: in_subprocess(e, dtype, args) for e in engines}
        base = r["transformers"]
        print(f"{dtype:10s}" + "".join(f"{f'{r[e]:.0f} ({r[e] / base:.2f}x)':>24s}" for e in engines))
    print("ratios against transformers out of the box; transformers+allocator: transformers given camelid's allocator setting (glibc keeps freed memory for "
          "reuse instead of page-faulting it back in every step)")


if __name__ == "__main__":
    main()
