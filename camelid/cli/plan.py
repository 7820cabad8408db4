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

With --train it plans training instead: per device, for a micro-batch of --micro-batch
sequences of --seq-len tokens under a layout of --dp-replicate x --dp-shard x --tp devices
(FSDP2 shards over dp_shard, tensor + sequence parallelism over tp): fp32 parameters, gradients
and AdamW's two states, sharded; the weights gathered or cast to the compute dtype; the
activations the blocks save for the backward pass under each activation-checkpointing mode
(none, selective, full; --ac picks one); the largest transient (a chunk of the fused loss, or
the last block's backward); AdamW's temporary; the overhead (2GiB by default: CUDA context,
cuBLAS, NCCL buffers); the total; and a verdict listing the modes that fit. MODEL may then also
be a training recipe (CONFIG.toml), whose model, data.seq_len, train and parallel sections
give the defaults.

Sizes: GB, MB, TB and bare G, M, T are powers of ten (24GB = 24 * 10^9 bytes); GiB, MiB, TiB
are powers of two (24GiB = 24 * 2^30 bytes); a plain number is bytes. The formulas are in
camelid/memory.py and camelid/memory_train.py; benchmarks/memory.py checks them against
measured peaks.

examples:
  camelid plan 7B --memory 24GB
  camelid plan llama2-13B --memory 24GB --context 4096 --batch 2
  camelid plan 65B --memory 80GB --group-size 128
  camelid plan path/to/model.gguf --memory 8GiB --json
  camelid plan smollm2-135M --memory 512MB --activation-dtype float32 --overhead 0
  camelid plan 7B --train --memory 80GB --dp-shard 8
  camelid plan 65B --train --memory 80GB --dp-shard 64 --tp 8 --ac selective
  camelid plan recipes/llama-13b.toml --train --memory 80GB --dp-shard 16
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from camelid.config import SIZES, ModelConfig, get_size
from camelid.errors import CamelidError
from camelid.memory import (DEFAULT_OVERHEAD, DTYPE_BYTES, GROUP_SIZES, HEADROOM, Budget, Row, best, int4_problem,
                            parse_size, plan)
from camelid.memory_train import AC_MODES, TRAIN_DTYPES, TRAIN_OVERHEAD, Layout, TrainRow, plan_training

DEFAULT_CONTEXT = 2048
# flags of one mode only: (flag, argparse dest); their defaults are None so that a stray one is seen
INFERENCE_FLAGS = (("--batch", "batch"), ("--context", "context"), ("--group-size", "group_size"),
                   ("--activation-dtype", "activation_dtype"), ("--attention", "attention"),
                   ("--all-logits", "all_logits"))
TRAIN_FLAGS = (("--micro-batch", "micro_batch"), ("--seq-len", "seq_len"), ("--dp-replicate", "dp_replicate"),
               ("--dp-shard", "dp_shard"), ("--tp", "tp"), ("--ac", "ac"), ("--dtype", "dtype"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a named size (7B, 13B, ...) or a checkpoint path; with --train "
                                                  "also a training recipe (CONFIG.toml)")
    p.add_argument("--memory", required=True, metavar="SIZE",
                   help="memory of the card: 24GB (10^9 bytes), 24GiB (2^30 bytes), 80G, 512MB")
    p.add_argument("--batch", type=int, default=None, metavar="B", help="prompts generated together (default 1)")
    p.add_argument("--context", type=int, default=None, metavar="T",
                   help=f"tokens per row, prompt plus new ones (default {DEFAULT_CONTEXT}, or the model's "
                        "context if shorter)")
    p.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES,
                   help="int4 weights per fp16 scale and minimum (default 32)")
    p.add_argument("--activation-dtype", default=None, choices=list(DTYPE_BYTES),
                   help="what the int8 and int4 rows compute and cache in (default bfloat16, as on a GPU; "
                        "camelid on CPU uses float32)")
    p.add_argument("--overhead", default=None, metavar="SIZE",
                   help="fixed allowance for the CUDA context, cuBLAS workspaces and allocator slack "
                        "(default 1GiB, 2GiB with --train for NCCL's buffers too; 0 for the tensors alone)")
    p.add_argument("--attention", default=None, choices=["fused", "math"],
                   help="fused: SDPA's flash/memory-efficient kernels, which never store the T x T scores "
                        "(what camelid gets on CPU and CUDA); math: a backend that stores them in fp32")
    p.add_argument("--all-logits", action="store_true", default=None,
                   help="the prefill returns logits at every position (scoring) instead of the last one")
    p.add_argument("--cpu", action="store_true", default=None,
                   help="plan for this machine's CPU, where camelid's kernels run the int8/int4 layers: "
                        "prefill dequantizes in one pass (into bfloat16 where the CPU multiplies it natively) "
                        "and the head reads the codes directly")
    t = p.add_argument_group("training (--train)")
    t.add_argument("--train", action="store_true", help="plan a training step per device instead of generation")
    t.add_argument("--micro-batch", type=int, default=None, metavar="B",
                   help="sequences per forward/backward pass (default 1, or the recipe's train.micro_batch)")
    t.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help=f"tokens per sequence (default {DEFAULT_CONTEXT} or the model's context if shorter, or "
                        "the recipe's data.seq_len)")
    for flag, what in (("--dp-replicate", "data-parallel replicas (HSDP)"),
                       ("--dp-shard", "devices FSDP shards weights, gradients and AdamW states over"),
                       ("--tp", "tensor + sequence parallel devices")):
        t.add_argument(flag, type=int, default=None, metavar="N", help=f"{what} (default 1, or the recipe's)")
    t.add_argument("--ac", default=None, choices=AC_MODES,
                   help="activation checkpointing to plan (default: all three side by side)")
    t.add_argument("--dtype", default=None, choices=TRAIN_DTYPES,
                   help="bfloat16: autocast over fp32 master weights (default, or the recipe's train.dtype); "
                        "float32")
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


def fit_note(row: Budget, memory: int) -> str:
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


def print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def check_flags(args: argparse.Namespace) -> None:
    """Flags of the other mode are a mistake, not something to ignore silently."""
    if args.model.endswith(".toml") and not args.train:
        raise CamelidError(f"{args.model} is a training recipe: add --train to plan its training")
    stray = INFERENCE_FLAGS if args.train else TRAIN_FLAGS
    for flag, dest in stray:
        if getattr(args, dest) is not None:
            raise CamelidError(f"{flag} is for {'generation' if args.train else 'training'}: "
                               f"{'drop --train' if args.train else 'add --train'} or drop {flag}")


def main(args: argparse.Namespace) -> int:
    check_flags(args)
    memory = parse_size(args.memory, "--memory")
    if memory <= 0:
        raise CamelidError(f"--memory {args.memory!r}: must be more than 0 bytes")
    default_overhead = TRAIN_OVERHEAD if args.train else DEFAULT_OVERHEAD
    overhead = default_overhead if args.overhead is None else parse_size(args.overhead, "--overhead")
    return (main_train if args.train else main_generate)(args, memory, overhead)


def main_generate(args: argparse.Namespace, memory: int, overhead: int) -> int:
    args.batch = 1 if args.batch is None else args.batch
    args.group_size, args.activation_dtype = args.group_size or 32, args.activation_dtype or "bfloat16"
    args.attention, args.all_logits = args.attention or "fused", bool(args.all_logits)
    config, source = read_config(args.model)
    context = args.context if args.context is not None else min(DEFAULT_CONTEXT, config.max_seq_len)
    if context > config.max_seq_len:
        raise CamelidError(f"--context {context}: {args.model} has a context of {config.max_seq_len} tokens")
    args.cpu = bool(args.cpu)
    rows = plan(config, args.batch, context, args.activation_dtype, args.group_size, overhead,
                args.attention, args.all_logits, args.cpu)
    notes = [n for n in [int4_problem(config, args.group_size)] if n]
    choice, text = verdict(Path(args.model).name if "checkpoint" in source else args.model, rows, memory,
                           args.memory)
    if args.json:
        print(json.dumps({
            "model": args.model, "source": source, "params": config.num_params(), "config": config.to_dict(),
            "batch": args.batch, "context": context, "memory_bytes": memory, "headroom": HEADROOM,
            "group_size": args.group_size, "activation_dtype": args.activation_dtype,
            "attention": args.attention, "all_logits": args.all_logits, "cpu": args.cpu,
            "rows": [r.to_dict(memory) for r in rows], "notes": notes,
            "verdict": {"precision": choice.precision if choice else None,
                        "comfortable": bool(choice and choice.comfortable(memory)), "text": text}}, indent=2))
        return 0
    print(f"{args.model}: {config.num_params():,} parameters ({source}); batch {args.batch}, context {context} "
          f"tokens; memory {args.memory} = {gib(memory)}")
    print(f"int8: fp32 scale per output row; int4: fp16 scale and minimum per {args.group_size} weights "
          f"(--group-size), int8 head; both compute in {args.activation_dtype} (--activation-dtype)")
    header = ("precision", "compute", "weights", "KV cache", "activations", "overhead", "total", f"fits {args.memory}")
    print_table([header] + [(r.precision, r.activation_dtype, gib(r.weights), gib(r.kv_cache), gib(r.activations),
                             gib(r.overhead), gib(r.total), fit_note(r, memory)) for r in rows])
    for note in notes:
        print(note)
    print(f"float16 needs what bfloat16 does; tight: fits with less than {HEADROOM:.0%} of {args.memory} spare.")
    print(f"verdict: {text}.")
    return 0


# ---- training ------------------------------------------------------------------------------------

def read_training(args: argparse.Namespace) -> tuple[ModelConfig, str, dict]:
    """The model, where it came from, and the settings that flags left unset default to: a
    recipe's (its model section, data.seq_len, train and parallel sections) or the plain ones."""
    if args.model.endswith(".toml"):
        from camelid.train.config import load_train_config

        cfg = load_train_config(args.model)
        p = cfg.parallel
        return cfg.model.build(None), "recipe", {
            "micro_batch": cfg.train.micro_batch, "seq_len": cfg.data.seq_len, "dtype": cfg.train.dtype,
            "dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp,
            "ac": cfg.train.activation_checkpointing}
    config, source = read_config(args.model)
    return config, source, {"micro_batch": 1, "seq_len": min(DEFAULT_CONTEXT, config.max_seq_len),
                            "dtype": "bfloat16", "dp_replicate": 1, "dp_shard": 1, "tp": 1, "ac": None}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def train_verdict(name: str, rows: list[TrainRow], memory: int, memory_text: str, layout: Layout,
                  recipe_ac: str | None) -> str:
    """Which activation-checkpointing modes fit, with the headroom or tightly, and what the others need."""
    comfortable = [r.ac for r in rows if r.comfortable(memory)]
    tight = [r.ac for r in rows if r.fits(memory) and not r.comfortable(memory)]
    short = [r for r in rows if not r.fits(memory)]
    where = f"{name} on {devices(layout)} of {memory_text}"
    if not comfortable and not tight:
        needs = _join([f"{r.ac} needs {gib(r.total)}" for r in rows])
        return (f"{where} does not fit with any activation checkpointing ({needs} per device); shard further "
                "(--dp-shard, --tp) or lower --micro-batch or --seq-len")
    parts = []
    if comfortable:
        parts.append(f"activation checkpointing {_join(comfortable)} fit{'s' * (len(comfortable) == 1)} "
                     f"with {HEADROOM:.0%} to spare")
    if tight:
        parts.append(f"{_join(tight)} fit{'s' * (len(tight) == 1)}, with less than {HEADROOM:.0%} spare")
    if short:
        parts.append(_join([f"{r.ac} needs {gib(r.total)}" for r in short]))
    text = f"{where}: " + "; ".join(parts)
    chosen = next((r for r in rows if r.ac == recipe_ac), None)
    if chosen:
        text += f" (the recipe's {chosen.ac} {'fits' if chosen.fits(memory) else 'does not fit'})"
    return text


def devices(layout: Layout) -> str:
    return "one device" if layout.devices == 1 else f"{layout.devices} devices ({layout.describe()})"


def train_labels(rows: list[TrainRow], layout: Layout) -> list[tuple[str, str]]:
    """(label, TrainRow attribute) for each line of the table."""
    shards = layout.dp_shard * layout.tp
    shard = f"1/{shards}" if shards > 1 else "whole"
    if layout.fsdp:
        gathered = f"weights gathered by FSDP ({rows[0].dtype}: root + 2 blocks)"
    elif rows[0].dtype == "bfloat16":
        gathered = "bf16 weight copies (autocast)"
    else:
        gathered = "weights gathered (none without FSDP)"
    return [(f"parameters (fp32, {shard})", "parameters"), (f"gradients (fp32, {shard})", "gradients"),
            (f"AdamW states (2 x fp32, {shard})", "optimizer"), (gathered, "gathered"),
            ("activations saved for backward", "activations"),
            ("working set (loss chunk or block backward)", "working"), ("AdamW step temporary (*)", "update"),
            ("overhead", "overhead"), ("total", "total")]


def main_train(args: argparse.Namespace, memory: int, overhead: int) -> int:
    config, source, chosen = read_training(args)
    for key in chosen:
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    layout = Layout(chosen["dp_replicate"], chosen["dp_shard"], chosen["tp"])
    rows = plan_training(config, layout, chosen["micro_batch"], chosen["seq_len"], chosen["dtype"], overhead,
                         (args.ac,) if args.ac else AC_MODES)
    name = Path(args.model).name if source != "named size" else args.model
    recipe_ac = chosen["ac"] if source == "recipe" else None
    text = train_verdict(name, rows, memory, args.memory, layout, recipe_ac)
    if args.json:
        print(json.dumps({
            "mode": "train", "model": args.model, "source": source, "params": config.num_params(),
            "config": config.to_dict(), "layout": {**asdict(layout), "devices": layout.devices},
            **{k: chosen[k] for k in ("micro_batch", "seq_len", "dtype")},
            "memory_bytes": memory, "headroom": HEADROOM, "rows": [r.to_dict(memory) for r in rows],
            "verdict": {"fits": [r.ac for r in rows if r.fits(memory)],
                        "comfortable": [r.ac for r in rows if r.comfortable(memory)], "recipe_ac": recipe_ac,
                        "text": text}}, indent=2))
        return 0
    compute = "bfloat16 autocast over fp32 master weights" if chosen["dtype"] == "bfloat16" else "float32"
    print(f"{args.model}: {config.num_params():,} parameters ({source}); micro-batch {chosen['micro_batch']} x "
          f"{chosen['seq_len']} tokens in {compute}")
    print(f"layout: {devices(layout)}; memory per device {args.memory} = {gib(memory)}")
    print_train_table(rows, layout, memory, args.memory)
    print(f"verdict: {text}.")
    return 0


def print_train_table(rows: list[TrainRow], layout: Layout, memory: int, memory_text: str) -> None:
    table = [("per device", *(f"ac {r.ac}" for r in rows))]
    table += [(label, *(gib(getattr(r, attr)) for r in rows)) for label, attr in train_labels(rows, layout)]
    print_table(table + [(f"fits {memory_text}", *(fit_note(r, memory) for r in rows))])
    print("(*) only during optimizer.step, when the activations are gone: the total counts the larger of it\n"
          "    and the gathered weights + activations + working set.")
