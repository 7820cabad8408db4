"""Batch-1 decode speed of a ~1B model on one GPU against the memory-bandwidth roofline.

The model has Llama-3.2-1B's shape (`camelid info llama3.2-1B`: 1.24B parameters) with random
weights (speed does not depend on the values). Each precision decodes with camelid's compiled
step (inductor + CUDA graphs); the roofline is the bytes one step must read (every weight once,
plus the KV cache so far) divided by the bandwidth this GPU actually reaches on a large copy,
measured in the same run. Goal (issue 5): bf16 at 80% of the roofline or better.

    python benchmarks/gpu_decode.py [--prompt 128] [--new 256] [--precisions bf16,int8,int4]
"""

from __future__ import annotations

import argparse
import time

import torch


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Bytes/s of a device-to-device copy (read + write both count), best of 10."""
    n = int(gib * 2**30) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def build(precision: str, device: torch.device, size: str):
    from camelid.config import get_size
    from camelid.model import Transformer
    from camelid.quant import quantize_model

    with torch.device("meta"):
        model = Transformer(get_size(size))
    model.to_empty(device=device)
    model.init_weights(seed=0)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    if precision != "bf16":
        quantize_model(model, precision)
    return model


def decode_speed(model, prompt: int, new: int) -> tuple[float, float]:
    from camelid.generate import Engine, SamplingParams, TokenGenerator

    engine = Engine(model)
    engine.compile(background=False)
    ids = torch.randint(0, model.config.vocab_size, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    best = 0.0
    for _ in range(3):  # the first run compiles
        gen = TokenGenerator(engine, [ids], new, SamplingParams(temperature=0), frozenset())
        for _ in gen:
            pass
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = max(best, gen.stats.decode_tps)
    return best, gen.stats.prefill_tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--precisions", default="bf16,int8,int4")
    parser.add_argument("--size", default="llama3.2-1B", help="a named size (tiny for a CPU smoke run)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_decode.py needs a CUDA GPU (or --device cpu --size tiny for a smoke run)")
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else 32e9   # this CPU's measured figure
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.size}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'precision':10s} {'weights GB':>10s} {'decode tok/s':>12s} {'roofline tok/s':>14s} {'of roofline':>11s} "
          f"{'prefill tok/s':>13s}")
    for precision in args.precisions.split(","):
        model = build(precision, device, args.size)
        # every weight is read once per step, except an untied embedding: only its rows are gathered
        weight_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                           if not (n == "tok_embeddings.weight" and model.output is not None))
        cfg = model.config
        mean_context = args.prompt + args.new / 2
        kv_bytes = 2 * cfg.n_layers * mean_context * cfg.kv_heads * cfg.head_dim * 2
        roofline = bandwidth / (weight_bytes + kv_bytes)
        tps, prefill = decode_speed(model, args.prompt, args.new)
        print(f"{precision:10s} {weight_bytes / 1e9:10.2f} {tps:12.1f} {roofline:14.1f} {tps / roofline:11.0%} "
              f"{prefill:13.1f}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
