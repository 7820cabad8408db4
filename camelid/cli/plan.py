"""Plan the memory a model needs on a card before loading it, and say whether it fits. MODEL is a
named size (7B, 13B, 33B, 65B, llama2-7B, llama3-8B, smollm2-135M, tiny, ...) or a checkpoint (a
GGUF file, a Hugging Face, Meta or camelid directory), of which only the config is read; with
--train it may also be a training recipe (CONFIG.toml), whose model, data.seq_len, train and
parallel sections give the defaults; one whose train.device is cpu (or auto, on a machine
without CUDA) is planned without the CUDA overhead.

generation (camelid plan MODEL): at each precision (float32, bfloat16, int8, int4) the weights,
the KV cache for --context tokens (prompt plus generated ones) of --batch rows, the peak
activations of a prefill that fills the context, a fixed overhead and the total; the verdict
names the best precision that fits with 10% to spare (with less, allocator fragmentation can
still end in out-of-memory). Below it, serving: what each precision leaves of the card for
camelid serve's paged KV cache (the weights, the prefill's activations and the overhead taken,
10% of the card kept spare), as the --kv-memory to give camelid serve, the pool's blocks of
--block-size tokens, the tokens they hold, and how many requests of the whole --context fit at
once (shorter requests take fewer blocks, so more of them fit).

training (camelid plan MODEL --train): per device, for a micro-batch of --micro-batch sequences
of --seq-len tokens under --dp-replicate x --dp-shard x --tp devices (FSDP2 shards over dp_shard,
tensor + sequence parallelism over tp): fp32 parameters, gradients and AdamW's two states, the
weights gathered or cast to the compute dtype, the activations saved for the backward pass
under each activation-checkpointing mode (none, selective, full; --ac picks one), the largest
transient, AdamW's step temporary, the overhead and the total; the verdict lists the modes that
fit.

finetuning (camelid plan MODEL --finetune full|lora|qlora): one device, a micro-batch as for
--train. full is pretraining's step. lora: the base frozen in the compute dtype, fp32 adapters
of rank --rank (default 16) on wq, wk, wv, wo, w1, w2, w3 with their gradients and AdamW states,
what the adapted blocks save under each checkpointing mode, the loss's and the last block's
transients. qlora: the same over an int4 base (groups of --group-size weights with an fp16
scale and minimum, the head int8), plus one layer dequantized at a time. MODEL may be a finetune
recipe (CONFIG.toml: model.base and model.method, the lora section, data.seq_len, the train
section), whose method --finetune without a value takes. Defaults otherwise: sequences of 1024
tokens (the model's context if shorter), micro-batch 1, bfloat16, LoRA dropout on.

Sizes: GB, MB, TB and bare G, M, T are powers of ten (24GB = 24 * 10^9 bytes); GiB, MiB, TiB
are powers of two (24GiB = 24 * 2^30 bytes); a plain number is bytes. What each line counts
and why is in camelid/plan/; docs/plan.md sets the plans against measured peaks.

examples:
  camelid plan 7B --memory 24GB
  camelid plan llama2-13B --memory 24GB --context 4096 --batch 2
  camelid plan 65B --memory 80GB --group-size 128
  camelid plan path/to/model.gguf --memory 8GiB --json
  camelid plan smollm2-135M --memory 512MB --activation-dtype float32 --overhead 0
  camelid plan llama3-8B --memory 24GB --context 8192 --block-size 32
  camelid plan 7B --train --memory 80GB --dp-shard 8
  camelid plan 65B --train --memory 80GB --dp-shard 64 --tp 8 --ac selective
  camelid plan recipes/llama-13b.toml --train --memory 80GB --dp-shard 16
  camelid plan 7B --finetune qlora --memory 24GB --seq-len 512
  camelid plan 65B --finetune qlora --memory 48GB --seq-len 512 --ac full --group-size 64
  camelid plan 7B --finetune lora --memory 24GB --rank 64 --json
  camelid plan 7B --finetune full --memory 80GB --dp-shard 8
  camelid plan recipes/smollm2-lora.toml --finetune --memory 8GB
"""

from __future__ import annotations

import argparse
import json

from camelid.errors import CamelidError
from camelid.plan import (AC_MODES, DEFAULT_BLOCK_SIZE, DTYPE_BYTES, HEADROOM, TRAIN_DTYPES, Budget, GenerationReport,
                          Layout, TrainingReport, TrainRow, generation_report, gib, training_report)
from camelid.plan.finetune import METHODS
from camelid.plan.report import FinetuneReport, finetune_report
from camelid.quant import GROUP_SIZES

USAGE = """%(prog)s MODEL --memory SIZE [generation options] [--overhead SIZE] [--json]
       %(prog)s MODEL --train --memory SIZE [training options] [--overhead SIZE] [--json]
       %(prog)s MODEL --finetune full|lora|qlora --memory SIZE [training options] [--rank R] [--json]"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = USAGE
    p.add_argument("model", metavar="MODEL", help="a named size (7B, 13B, ...) or a checkpoint path; with --train "
                                                  "also a training recipe (CONFIG.toml)")
    p.add_argument("--memory", required=True, metavar="SIZE",
                   help="memory of the card: 24GB (10^9 bytes), 24GiB (2^30 bytes), 80G, 512MB")
    p.add_argument("--overhead", default=None, metavar="SIZE",
                   help="fixed allowance for the CUDA context, cuBLAS workspaces and allocator slack "
                        "(default 1GiB, 2GiB with --train for NCCL's buffers too, none for a recipe that trains "
                        "on a CPU; 0 for the tensors alone)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    # Every option of one mode defaults to None, so that one given in the other mode is seen.
    g = p.add_argument_group("generation options (without --train)")
    generation = [
        g.add_argument("--batch", type=int, metavar="B", help="prompts generated together (default 1)"),
        g.add_argument("--context", type=int, metavar="T",
                       help="tokens per row, prompt plus new ones (default 2048, or the model's context if shorter)"),
        g.add_argument("--group-size", type=int, choices=GROUP_SIZES,
                       help="int4 weights per fp16 scale and minimum (default 32)"),
        g.add_argument("--activation-dtype", choices=list(DTYPE_BYTES),
                       help="what the int8 and int4 rows compute and cache in (default bfloat16, as on a GPU; "
                            "camelid on CPU uses float32)"),
        g.add_argument("--attention", choices=["fused", "math"],
                       help="fused: SDPA's flash/memory-efficient kernels, which never store the T x T scores "
                            "(what camelid gets on CPU and CUDA); math: a backend that stores them in fp32"),
        g.add_argument("--all-logits", action="store_true", default=None,
                       help="the prefill returns logits at every position (scoring) instead of the last one"),
        g.add_argument("--cpu", action="store_true", default=None,
                       help="plan for this machine's CPU, where camelid's kernels run the int8/int4 layers: "
                            "prefill dequantizes in one pass (into bfloat16 where the CPU multiplies it "
                            "natively) and the head reads the codes directly"),
        g.add_argument("--block-size", type=int, metavar="TOKENS",
                       help=f"tokens per block of camelid serve's KV pool, as its --block-size (default "
                            f"{DEFAULT_BLOCK_SIZE}); a request's last block is partly empty"),
    ]
    t = p.add_argument_group("training options (with --train)")
    t.add_argument("--train", action="store_true", help="plan a training step per device instead of generation")
    training = [
        t.add_argument("--micro-batch", type=int, metavar="B",
                       help="sequences per forward/backward pass (default 1, or the recipe's train.micro_batch)"),
        t.add_argument("--seq-len", type=int, metavar="T",
                       help="tokens per sequence (default 2048 or the model's context if shorter, or the "
                            "recipe's data.seq_len)"),
        *(t.add_argument(flag, type=int, metavar="N", help=f"{what} (default 1, or the recipe's)")
          for flag, what in (("--dp-replicate", "data-parallel replicas (HSDP)"),
                             ("--dp-shard", "devices FSDP shards weights, gradients and AdamW states over"),
                             ("--tp", "tensor + sequence parallel devices"))),
        t.add_argument("--ac", choices=AC_MODES, help="activation checkpointing to plan (default: all three side "
                                                      "by side)"),
        t.add_argument("--dtype", choices=TRAIN_DTYPES,
                       help="bfloat16: autocast over fp32 master weights (default, or the recipe's train.dtype); "
                            "float32"),
    ]
    f = p.add_argument_group("finetuning options (with --finetune, besides the training options)")
    f.add_argument("--finetune", nargs="?", const="", metavar="METHOD",
                   help=f"plan finetuning one device: {', '.join(METHODS)} (without a value: a finetune recipe's "
                        "model.method)")
    rank = f.add_argument("--rank", type=int, metavar="R", help="LoRA rank (default 16, or the recipe's lora.rank)")
    group_size = generation[2]
    p.set_defaults(mode_options={"generation": generation, "train": training,
                                 "finetune": [*training, rank, group_size]})


def mode_of(args: argparse.Namespace) -> str:
    if args.train and args.finetune is not None:
        raise CamelidError("--train and --finetune plan different things: give one of them")
    return "train" if args.train else "generation" if args.finetune is None else "finetune"


def given_options(args: argparse.Namespace) -> dict:
    """The options of the chosen mode that were given; one of another mode is a mistake, not
    something to ignore silently."""
    mode = mode_of(args)
    if args.model.endswith(".toml") and mode == "generation":
        raise CamelidError(f"{args.model} is a recipe: add --train (a training recipe) or --finetune (a finetune "
                           "recipe) to plan it")
    mine = args.mode_options[mode]
    for action in [a for options in args.mode_options.values() for a in options if a not in mine]:
        if getattr(args, action.dest) is not None:
            flag = action.option_strings[0]
            wanted = [m for m, options in args.mode_options.items() if action in options]
            hint = {"generation": "drop --train and --finetune", "train": "add --train",
                    "finetune": "add --finetune METHOD"}
            raise CamelidError(f"{flag} is not for {mode}: {' or '.join(hint[m] for m in wanted)}, or drop {flag}")
    options = {a.dest: getattr(args, a.dest) for a in mine if getattr(args, a.dest) is not None}
    if mode == "finetune":
        if args.finetune and args.finetune not in METHODS:
            raise CamelidError(f"--finetune {args.finetune!r}: choose one of {', '.join(METHODS)}")
        options["method"] = args.finetune or None
    return options


def main(args: argparse.Namespace) -> int:
    options = given_options(args)
    mode = mode_of(args)
    report = {"generation": generation_report, "train": training_report,
              "finetune": finetune_report}[mode](args.model, args.memory, args.overhead, **options)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        {"generation": print_generation, "train": print_training, "finetune": print_finetune}[mode](report)
    return 0


def fit_note(row: Budget, memory: int) -> str:
    spare = row.spare(memory)
    if not row.fits(memory):
        return f"no, {gib(-spare)} short"
    share = f"{gib(spare)} spare ({spare / memory:.0%})"
    return f"yes, {share}" if row.comfortable(memory) else f"tight, {share}"


def print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def print_generation(r: GenerationReport) -> None:
    print(f"{r.model}: {r.config.num_params():,} parameters ({r.source}); batch {r.batch}, context {r.context} "
          f"tokens; memory {r.memory_text} = {gib(r.memory)}")
    print(f"int8: fp32 scale per output row; int4: fp16 scale and minimum per {r.group_size} weights "
          f"(--group-size), int8 head; both compute in {r.activation_dtype} (--activation-dtype)")
    header = ("precision", "compute", "weights", "KV cache", "activations", "overhead", "total",
              f"fits {r.memory_text}")
    print_table([header] + [(row.precision, row.activation_dtype, gib(row.weights), gib(row.kv_cache),
                             gib(row.activations), gib(row.overhead), gib(row.total), fit_note(row, r.memory))
                            for row in r.rows])
    for note in r.notes:
        print(note)
    print("float16 needs what bfloat16 does.")
    print_tight_legend(r.rows, r.memory, r.memory_text)
    print(f"verdict: {r.verdict}.")
    print_serving(r)


def print_serving(r: GenerationReport) -> None:
    """camelid serve's KV pool in what each precision leaves of the card."""
    print(f"\nserving (camelid serve): the KV pool in what each row leaves of {r.memory_text} beside its weights,\n"
          f"activations and overhead, with {HEADROOM:.0%} kept spare; blocks of {r.block_size} tokens (--block-size), "
          f"{r.pools[0][1].request_blocks:,} to a request of {r.context} tokens")
    table = [("precision", "camelid serve", "KV pool", "blocks", "tokens", f"requests of {r.context} tokens")]
    for row, (kv_gib, pool) in zip(r.rows, r.pools):
        flag = f"--kv-memory {kv_gib:.2f}" if pool.requests else f"too small (one request needs {gib(pool.min_bytes)})"
        table.append((row.precision, flag, gib(pool.nbytes), f"{pool.blocks:,}", f"{pool.tokens:,}",
                      f"{pool.requests:,}"))
    print_table(table)


def print_tight_legend(rows: list[Budget], memory: int, memory_text: str) -> None:
    """What "tight" means, when a row says it."""
    if any(row.fits(memory) and not row.comfortable(memory) for row in rows):
        print(f"tight: fits with less than {HEADROOM:.0%} of {memory_text} spare.")


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


def print_training(r: TrainingReport) -> None:
    compute = "bfloat16 autocast over fp32 master weights" if r.dtype == "bfloat16" else "float32"
    print(f"{r.model}: {r.config.num_params():,} parameters ({r.source}); micro-batch {r.micro_batch} x "
          f"{r.seq_len} tokens in {compute}")
    where = "" if r.device == "cuda" else " (CPU: no CUDA overhead)"
    print(f"layout: {r.layout.describe()}{where}; memory per device {r.memory_text} = {gib(r.memory)}")
    table = [("per device", *(f"ac {row.ac}" for row in r.rows))]
    table += [(label, *(gib(getattr(row, attr)) for row in r.rows)) for label, attr in train_labels(r.rows, r.layout)]
    print_table(table + [(f"fits {r.memory_text}", *(fit_note(row, r.memory) for row in r.rows))])
    print("(*) only during optimizer.step, when the activations are gone: the total counts the larger of it\n"
          "    and the gathered weights + activations + working set.")
    print_tight_legend(r.rows, r.memory, r.memory_text)
    print(f"verdict: {r.verdict}.")


def print_finetune(r: FinetuneReport) -> None:
    s = r.settings
    compute = "bfloat16 autocast over fp32 master weights" if s["dtype"] == "bfloat16" else "float32"
    if r.method != "full":
        base = (f"{s['quantize']} (groups of {s['group_size']}, head int8)" if r.method == "qlora" and
                s["quantize"] == "int4" else s["quantize"] if r.method == "qlora" else s["dtype"])
        compute = (f"base frozen in {base}, {r.rows[0].trainable_params:,} adapter weights (rank {s['rank']} on "
                   f"{', '.join(s['targets'])}) in fp32, computing in {s['dtype']}")
    print(f"{r.model}: {r.config.num_params():,} parameters ({r.source}); {r.method} finetuning, micro-batch "
          f"{s['micro_batch']} x {s['seq_len']} tokens; {compute}")
    layout = Layout(s["dp_replicate"], s["dp_shard"], s["tp"])
    where = "" if s["device"] == "cuda" else " (CPU: no CUDA overhead)"
    print(f"layout: {layout.describe()}{where}; memory per device {r.memory_text} = {gib(r.memory)}")
    if r.method == "full":
        labels = [("weights (fp32)" if layout.dp_shard * layout.tp == 1 else "weights (fp32, sharded)", "weights"),
                  *[x for x in train_labels(r.rows, layout) if x[1] not in ("parameters", "total")]]
    else:
        labels = [(f"frozen base ({s['quantize'] if r.method == 'qlora' else s['dtype']})", "weights"),
                  ("adapters (fp32)", "adapters"), ("adapter gradients (fp32)", "gradients"),
                  ("AdamW states (2 x fp32)", "optimizer"),
                  *([("adapter casts (autocast)", "gathered")] if s["dtype"] == "bfloat16" else []),
                  ("activations saved for backward", "activations"),
                  ("working set (loss, block backward" + (", a layer dequantized)" if r.method == "qlora" else ")"),
                   "working"), ("AdamW step temporary (*)", "update"), ("overhead", "overhead")]
    table = [("", *(f"ac {row.ac}" for row in r.rows))]
    table += [(label, *(gib(getattr(row, attr)) for row in r.rows)) for label, attr in labels + [("total", "total")]]
    print_table(table + [(f"fits {r.memory_text}", *(fit_note(row, r.memory) for row in r.rows))])
    print("(*) only during optimizer.step, when the activations are gone: the total counts the larger of it\n"
          "    and the rest of the step.")
    print_tight_legend(r.rows, r.memory, r.memory_text)
    print(f"verdict: {r.verdict}.")
