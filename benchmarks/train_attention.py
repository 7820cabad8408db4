"""Attention's forward and backward for training on a CPU: SDPA (PyTorch's flash kernel) against
camelid's explicit attention (camelid.model.explicit_attention: scores, softmax and weighted sum
written out, the probabilities kept for a four-product backward), which camelid's trainers use
for bfloat16 on a CPU up to MAX_POSITIONS positions.

For each shape (batch, heads, positions, head size), causal, random inputs: the two take turns
for --rounds rounds, the fastest time of each counts; the ratio is SDPA's time over camelid's
(above 1: camelid faster). Shapes: stories15M's (6 heads of 48) at 256-1024 positions,
SmolLM2-135M's (9 of 64), a 7B's head size (128), and 2048 positions, past where it is used.

    python benchmarks/train_attention.py [--threads 2] [--rounds 5] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from camelid.model.explicit_attention import MAX_POSITIONS, KeptProbabilities, causal_bias

SHAPES = [(8, 6, 256, 48), (4, 6, 512, 48), (2, 6, 1024, 48), (8, 9, 256, 64), (4, 9, 512, 64), (8, 8, 128, 64),
          (1, 8, 1024, 128), (1, 9, 2048, 64)]


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def explicit(q, k, v):
    return KeptProbabilities.apply(q, k, v, causal_bias(q.size(2), q.dtype, q.device))


def forward_backward(fn, shape, dtype) -> float:
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)
    t0 = time.perf_counter()
    fn(q, k, v).backward(grad)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"attention forward + backward, causal, {args.dtype}, {args.threads} threads, fastest of {args.rounds}; "
          f"camelid's trainers use the explicit form up to {MAX_POSITIONS} positions")
    print(f"{'batch x heads x positions x head size':40s} {'SDPA ms':>9s} {'camelid ms':>11s} {'ratio':>7s}")
    for shape in SHAPES:
        best = {sdpa: float("inf"), explicit: float("inf")}
        for fn in best:
            forward_backward(fn, shape, dtype)   # warm-up
        for _ in range(args.rounds):
            for fn in best:
                best[fn] = min(best[fn], forward_backward(fn, shape, dtype))
        print(f"{' x '.join(map(str, shape)):40s} {best[sdpa] * 1e3:9.1f} {best[explicit] * 1e3:11.1f} "
              f"{best[sdpa] / best[explicit]:6.2f}x")


if __name__ == "__main__":
    main()
