"""Plan the memory to generate with a model on one card, at each precision, before loading it:
weights, KV cache, the peak activations of the prefill, a fixed runtime overhead, the total,
whether it fits --memory, and a verdict naming the best precision that fits with 10% to spare
(with less, allocator fragmentation can still end in out-of-memory). MODEL is a named size (7B,
13B, 33B, 65B, llama2-7B, llama3-8B, smollm2-135M, tiny, ...) or a checkpoint (a GGUF file, a
Hugging Face, Meta or camelid directory), of which only the config is read.

The context is prompt plus generated tokens: camelid sizes its KV cache to exactly that, and the
plan takes the worst case of a prompt that fills it, prefilled in one step. Quantized rows
compute in --activation-dtype: bfloat16 by default, as on a GPU (camelid on CPU computes in
float32). int8 stores a byte per weight and an fp32 scale per output row; int4 half a byte per
weight and an fp16 scale and minimum per group of --group-size weights, with the output head in
int8; embeddings and norms stay in the activation dtype.

Sizes: GB, MB, TB and bare G, M, T are powers of ten (24GB = 24 * 10^9 bytes); GiB, MiB, TiB
are powers of two (24GiB = 24 * 2^30 bytes); a plain number is bytes. The formulas are in
camelid/memory.py; benchmarks/memory.py checks them against measured peaks.

examples:
  camelid plan 7B --memory 24GB
  camelid plan llama2-13B --memory 24GB --context 4096 --batch 2
  camelid plan 65B --memory 80GB --group-size 128
  camelid plan path/to/model.gguf --memory 8GiB --json
  camelid plan smollm2-135M --memory 512MB --activation-dtype float32 --overhead 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from camelid.config import SIZES, ModelConfig, get_size
from camelid.errors import CamelidError
from camelid.memory import DTYPE_BYTES, GROUP_SIZES, HEADROOM, Row, best, int4_problem, parse_size, plan

DEFAULT_CONTEXT = 2048


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a named size (7B, 13B, ...) or a checkpoint path")
    p.add_argument("--memory", required=True, metavar="SIZE",
                   help="memory of the card: 24GB (10^9 bytes), 24GiB (2^30 bytes), 80G, 512MB")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="prompts generated together (default 1)")
    p.add_argument("--context", type=int, default=None, metavar="T",
                   help=f"tokens per row, prompt plus new ones (default {DEFAULT_CONTEXT}, or the model's "
                        "context if shorter)")
    p.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES,
                   help="int4 weights per fp16 scale and minimum (default 32)")
    p.add_argument("--activation-dtype", default="bfloat16", choices=list(DTYPE_BYTES),
                   help="what the int8 and int4 rows compute and cache in (default bfloat16, as on a GPU; "
                        "camelid on CPU uses float32)")
    p.add_argument("--overhead", default="1GiB", metavar="SIZE",
                   help="fixed allowance for the CUDA context, cuBLAS workspaces and allocator slack "
                        "(default 1GiB; 0 for the tensors alone)")
    p.add_argument("--attention", default="fused", choices=["fused", "math"],
                   help="fused: SDPA's flash/memory-efficient kernels, which never store the T x T scores "
                        "(what camelid gets on CPU and CUDA); math: a backend that stores them in fp32")
    p.add_argument("--all-logits", action="store_true",
                   help="the prefill returns logits at every position (scoring) instead of the last one")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def read_config(name: str) -> tuple[ModelConfig, str]:
    """The config of a named size or a checkpoint, without reading any weights."""
    if any(k.lower() == name.lower() for k in SIZES) and not Path(name).exists():
        return get_size(name), "named size"
    from camelid.checkpoint import read_checkpoint

    try:
        ckpt = read_checkpoint(name)
    except CamelidError as e:
        if Path(name).exists():
            raise
        raise CamelidError(f"{e}; named sizes: {', '.join(SIZES)}") from None
    return ckpt.config, f"{ckpt.format} checkpoint"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def fit_note(row: Row, memory: int) -> str:
    spare = row.spare(memory)
    if not row.fits(memory):
        return f"no, {gib(-spare)} short"
    share = f"{gib(spare)} spare ({spare / memory:.0%})"
    return f"yes, {share}" if row.comfortable(memory) else f"tight, {share}"


def verdict(name: str, rows: list[Row], memory: int, memory_text: str) -> tuple[Row | None, str]:
    choice, comfortable = best(rows, memory)
    if choice is None:
        return None, (f"{name} does not fit in {memory_text} at any precision ({rows[-1].precision} needs "
                      f"{gib(rows[-1].total)}); lower --context or --batch, or use a bigger card")
    text = f"{name} runs in {choice.precision} on {memory_text} with {gib(choice.spare(memory))} to spare"
    if not comfortable:
        return choice, text + f", less than the {HEADROOM:.0%} of headroom allocator fragmentation may need"
    better = [r for r in rows[:rows.index(choice)] if r.fits(memory)]
    if better:
        text += (f" ({better[-1].precision} would fit too, but with only {gib(better[-1].spare(memory))}: "
                 f"under {HEADROOM:.0%})")
    return choice, text


def main(args: argparse.Namespace) -> int:
    memory = parse_size(args.memory, "--memory")
    if memory <= 0:
        raise CamelidError(f"--memory {args.memory!r}: must be more than 0 bytes")
    overhead = parse_size(args.overhead, "--overhead")
    config, source = read_config(args.model)
    context = args.context if args.context is not None else min(DEFAULT_CONTEXT, config.max_seq_len)
    if context > config.max_seq_len:
        raise CamelidError(f"--context {context}: {args.model} has a context of {config.max_seq_len} tokens")
    rows = plan(config, args.batch, context, args.activation_dtype, args.group_size, overhead,
                args.attention, args.all_logits)
    notes = [n for n in [int4_problem(config, args.group_size)] if n]
    choice, text = verdict(Path(args.model).name if "checkpoint" in source else args.model, rows, memory,
                           args.memory)
    if args.json:
        print(json.dumps({
            "model": args.model, "source": source, "params": config.num_params(), "config": config.to_dict(),
            "batch": args.batch, "context": context, "memory_bytes": memory, "headroom": HEADROOM,
            "group_size": args.group_size, "activation_dtype": args.activation_dtype,
            "attention": args.attention, "all_logits": args.all_logits,
            "rows": [r.to_dict(memory) for r in rows], "notes": notes,
            "verdict": {"precision": choice.precision if choice else None,
                        "comfortable": bool(choice and choice.comfortable(memory)), "text": text}}, indent=2))
        return 0
    print(f"{args.model}: {config.num_params():,} parameters ({source}); batch {args.batch}, context {context} "
          f"tokens; memory {args.memory} = {gib(memory)}")
    print(f"int8: fp32 scale per output row; int4: fp16 scale and minimum per {args.group_size} weights "
          f"(--group-size), int8 head; both compute in {args.activation_dtype} (--activation-dtype)")
    header = ("precision", "compute", "weights", "KV cache", "activations", "overhead", "total", f"fits {args.memory}")
    table = [header] + [(r.precision, r.activation_dtype, gib(r.weights), gib(r.kv_cache), gib(r.activations),
                         gib(r.overhead), gib(r.total), fit_note(r, memory)) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    for note in notes:
        print(note)
    print(f"float16 needs what bfloat16 does; tight: fits with less than {HEADROOM:.0%} of {args.memory} spare.")
    print(f"verdict: {text}.")
    return 0
