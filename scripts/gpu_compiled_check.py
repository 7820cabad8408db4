"""GPU check of the compiled decode path (run on a CUDA machine; prints one line per check).

1. Greedy tokens of a tiny model: eager vs compiled (inductor + CUDA graphs, compiled ahead of
   time and saved), fp32 and bf16.
2. A Llama-3.2-1B-shaped model in bf16 (random weights): the first process compiles and saves
   its decode step; a second process loads it. Prints the time to the first decoded token of
   each and the decode speed.

    python scripts/gpu_compiled_check.py            # both parts
    python scripts/gpu_compiled_check.py --part 2 --cache DIR   # (the second process)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import torch


def tiny_check() -> None:
    from camelid.config import get_size
    from camelid.generate import Engine, SamplingParams, TokenGenerator
    from camelid.model import Transformer

    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Transformer(get_size("tiny"))
        model.to_empty(device="cuda")
        model.init_weights(seed=0)
        model = model.to(dtype).eval().requires_grad_(False)
        prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12]]

        def run(engine):
            out = [[], []]
            for step in TokenGenerator(engine, prompts, 40, SamplingParams(temperature=0)):
                for row, tok in enumerate(step):
                    if tok is not None:
                        out[row].append(tok)
            return out

        eager = run(Engine(model))
        compiled_engine = Engine(model)
        compiled_engine.compile(background=False, cache_dir=None)
        compiled = run(compiled_engine)
        same = sum(a == b for ra, rb in zip(eager, compiled) for a, b in zip(ra, rb))
        print(f"tiny {dtype}: compiled steps {compiled_engine.decode_steps}, failed={compiled_engine.compiled.failed}, "
              f"greedy tokens equal to eager: {same}/{sum(map(len, eager))}", flush=True)


def big(cache: str) -> None:
    from camelid.config import get_size
    from camelid.generate import Engine, SamplingParams, TokenGenerator
    from camelid.model import Transformer

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(get_size("llama3.2-1B"))
    model.to_empty(device="cuda")
    model.init_weights(seed=0)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    engine = Engine(model)
    from pathlib import Path

    engine.compile(background=False, cache_dir=Path(cache))
    ids = torch.randint(0, model.config.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    gen = TokenGenerator(engine, [ids], 2, SamplingParams(temperature=0))
    list(gen)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    best = 0.0
    for _ in range(3):
        gen = TokenGenerator(engine, [ids], 256, SamplingParams(temperature=0))
        list(gen)
        torch.cuda.synchronize()
        best = max(best, gen.stats.decode_tps)
    print(f"1B bf16: {engine.compiled.counts}, build + first decode step {first:.1f} s, decode {best:.1f} tokens/s, "
          f"steps {engine.decode_steps}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    if args.part == 2:
        return big(args.cache)
    tiny_check()
    cache = tempfile.mkdtemp()
    big(cache)                      # compiles and saves
    subprocess.run([sys.executable, __file__, "--part", "2", "--cache", cache], check=True)  # loads


if __name__ == "__main__":
    main()
