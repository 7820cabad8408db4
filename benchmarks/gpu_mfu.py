"""Model FLOPs utilisation of camelid's trainer on one GPU: a LLaMA of about 1B parameters
(dim 2048, 18 layers, 16 heads, vocabulary 32000, untied head), sequence 2048, bf16 autocast,
torch.compile per block and selective activation checkpointing (the paper's recipe), AdamW,
random tokens.

MFU = FLOPs per token x tokens/s / the device's dense bf16 peak, with FLOPs per token =
6N + 6 x layers x heads x head_dim x seq (camelid.train.metrics.flops_per_token, torchtitan's
count; N without the embedding table). The peak comes from the device name (H100/H200 SXM
989 TFLOP/s, A100 312, ...), or --peak-flops; a PCIe part has a lower peak than its SXM name.

    python benchmarks/gpu_mfu.py [--steps 30] [--warmup 10] [--micro-batch 4] [--ac selective]
                                 [--no-compile] [--peak-flops 989e12]

Prints one line per measured step and then the median tokens/s, MFU and peak memory. The first
steps compile (a minute or two); they are not measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch

SHAPE = ["--model.size=7B", "--model.dim=2048", "--model.n_layers=18", "--model.n_heads=16", "--model.vocab_size=32000"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=10, help="steps before measuring (compilation happens here)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--ac", choices=["none", "selective", "full"], default="selective")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--peak-flops", type=float, default=0.0, help="device peak in FLOP/s (default: from its name)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_mfu: no CUDA device; this benchmark measures a GPU", file=sys.stderr)
        return 2

    from camelid.train import Trainer, load_train_config

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_train_config(None, [*SHAPE, "--data.synthetic=true", f"--data.seq_len={args.seq}",
                                       f"--model.max_seq_len={args.seq}", f"--train.micro_batch={args.micro_batch}",
                                       "--train.dtype=bfloat16", f"--train.activation_checkpointing={args.ac}",
                                       f"--train.compile={'false' if args.no_compile else 'true'}",
                                       f"--train.peak_flops={args.peak_flops}", "--train.device=cuda",
                                       "--train.warmup_steps=100", f"--train.max_steps={args.warmup + args.steps + 1}",
                                       f"--run.dir={run_dir}"])
        trainer = Trainer(cfg, log=False)
        if not trainer.peak:
            print(f"gpu_mfu: unknown peak for {torch.cuda.get_device_name()}; pass --peak-flops", file=sys.stderr)
            return 2
        print(f"{torch.cuda.get_device_name()}: {trainer.config.num_params() / 1e9:.2f}B parameters, "
              f"{trainer.flops_per_token / 1e9:.1f} GFLOP/token, peak {trainer.peak / 1e12:.0f} TFLOP/s, "
              f"batch {args.micro_batch} x {args.seq}, AC {args.ac}, compile {not args.no_compile}")
        for i in range(args.warmup):
            r = trainer.train_step()
            print(f"warm-up {i + 1}/{args.warmup}: loss {r['loss']:.3f}", file=sys.stderr)
        torch.cuda.reset_peak_memory_stats()
        rows = []
        for _ in range(args.steps):
            r = trainer.train_step()
            rows.append(r)
            print(f"step {r['step']}: loss {r['loss']:.3f}, {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}")
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    mfu = statistics.median(r["mfu"] for r in rows)
    print(f"median over {args.steps} steps: {tps:,.0f} tokens/s, MFU {mfu:.1%}, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
