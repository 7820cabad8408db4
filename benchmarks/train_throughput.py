"""Training throughput on the stories15M shape: camelid against transformers.LlamaForCausalLM.

dim 288, 6 layers, 6 heads, vocabulary 32000 (tied head, as llama2.c), sequence 256, batch 8,
random tokens; both take the same AdamW (0.9, 0.95, weight decay 0.1) and clip gradients at 1.0;
fp32, then bf16 autocast; 2 threads; one run. After warm-up steps the engines take turns, and
each figure is the fastest of the rounds (a round = --steps optimizer steps).

    python benchmarks/train_throughput.py [--threads 2] [--rounds 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

SEQ, BATCH = 256, 8


class CamelidEngine:
    def __init__(self, dtype: str, run_dir: str):
        from camelid.train import Trainer, load_train_config

        cfg = load_train_config(None, ["--model.size=stories15M", "--data.synthetic=true", f"--data.seq_len={SEQ}",
                                       f"--train.micro_batch={BATCH}", f"--train.dtype={dtype}",
                                       "--train.warmup_steps=10", f"--run.dir={run_dir}", "--train.max_steps=1000"])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp()
    print(f"stories15M shape, sequence {SEQ}, batch {BATCH}, CPU, {args.threads} threads, tokens/s "
          f"(fastest of {args.rounds} rounds of {args.steps} steps)")
    print(f"{'':10s} {'transformers':>13s} {'camelid':>10s} {'ratio':>7s}")
    try:
        for dtype in ("float32", "bfloat16"):
            engines = {"transformers": TransformersEngine(dtype), "camelid": CamelidEngine(dtype, f"{tmp}/{dtype}")}
            for e in engines.values():
                for _ in range(3):
                    e.step()
            best = {name: 0.0 for name in engines}
            for _ in range(args.rounds):
                for name, e in engines.items():
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        e.step()
                    best[name] = max(best[name], args.steps * BATCH * SEQ / (time.perf_counter() - t0))
            print(f"{dtype:10s} {best['transformers']:13.0f} {best['camelid']:10.0f} "
                  f"{best['camelid'] / best['transformers']:7.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
