"""Attention over packed rows: scaled_dot_product_attention with a boolean block-diagonal causal
mask (what camelid's model does with `documents`) against flex_attention with a block mask
(torch.nn.attention.flex_attention; on CPU it runs only under torch.compile), and plain causal
SDPA over the same row as the floor (no document boundaries, the cost of not packing at all).

The stories15M attention shape (6 heads of 48, batch 8), sequences of 512 and 2048, each row
packed with examples of random lengths (1/8 to 1/2 of the row); the attention alone, forward
and forward + backward, fp32, 2 threads; the fastest of --rounds rounds of --steps steps counts.
The mask is built inside the timed call, as the model builds it every forward.

    python benchmarks/packing_attention.py [--threads 2] [--rounds 3] [--steps 5] [--seqs 512,2048] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from camelid.model.transformer import document_mask

HEADS, HEAD_DIM, BATCH = 6, 48, 8


def packed_documents(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        ids, d = [], 0
        while len(ids) < seq:
            ids += [d] * int(torch.randint(seq // 8, seq // 2, (1,), generator=gen))
            d += 1
        rows.append(ids[:seq])
    return torch.tensor(rows)


def timed(fn, q, k, v, rounds: int, steps: int, backward: bool) -> float:
    """Seconds per forward (+ backward), the fastest round."""
    def step():
        q.grad = k.grad = v.grad = None
        if backward:
            fn(q, k, v).sum().backward()
            return
        with torch.no_grad():   # flex_attention refuses inputs that require grad on CPU
            fn(q.detach(), k.detach(), v.detach())

    step()                                                           # warm-up (and compile)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if q.is_cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seqs", default="512,2048")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    # PyTorch 2.13 has no flex_attention backward on CPU: there it is timed forward only
    flex_backward = args.device != "cpu"
    print(f"ms per call, {args.device}, batch {BATCH}, {HEADS} heads of {HEAD_DIM}, fp32, {args.threads} threads")
    print(f"{'seq':>6} {'pass':>9} {'sdpa causal':>12} {'sdpa mask':>10} {'flex':>8} "
          f"{'mask/causal':>12} {'flex/mask':>10}")
    for seq in (int(s) for s in args.seqs.split(",")):
        gen = torch.Generator().manual_seed(seq)
        q, k, v = (torch.randn(BATCH, HEADS, seq, HEAD_DIM, generator=gen).to(args.device).requires_grad_()
                   for _ in range(3))
        docs = packed_documents(BATCH, seq, gen).to(args.device)

        def in_document(b, h, qi, ki):
            return (qi >= ki) & (docs[b, qi] == docs[b, ki])

        block = create_block_mask(in_document, BATCH, None, seq, seq, device=args.device)
        with torch.no_grad():
            qd, kd, vd = q.detach(), k.detach(), v.detach()
            torch.testing.assert_close(flex(qd, kd, vd, block_mask=block),
                                       F.scaled_dot_product_attention(qd, kd, vd, attn_mask=document_mask(docs)),
                                       atol=1e-4, rtol=1e-4)
        for backward in (False, True):
            causal = timed(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v,
                           args.rounds, args.steps, backward)
            masked = timed(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(docs)),
                           q, k, v, args.rounds, args.steps, backward)
            flexed = timed(lambda q, k, v: flex(q, k, v, block_mask=block), q, k, v, args.rounds, args.steps,
                           backward) if flex_backward or not backward else float("nan")
            print(f"{seq:>6} {'fwd+bwd' if backward else 'fwd':>9} {causal * 1e3:>12.1f} {masked * 1e3:>10.1f} "
                  f"{flexed * 1e3:>8.1f} {masked / causal:>12.2f} {flexed / masked:>10.2f}")


if __name__ == "__main__":
    main()
