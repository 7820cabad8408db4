"""Convert a checkpoint between formats. The result is written beside DST and renamed into
place when complete, so an interrupted conversion never leaves a half-written model.

formats:
  camelid  camelid.json + model.safetensors + tokenizer (loads with no conversion)
  hf       Hugging Face: config.json + safetensors + tokenizer (q/k permuted for rotate-half RoPE)
  meta     Meta: params.json + consolidated.NN.pth (--shards N for model-parallel files)
  gguf     one .gguf file for llama.cpp: --gguf-type F32, F16, BF16 or Q8_0

--quantize int8|int4 (with --to camelid) writes a quantized camelid checkpoint: quantize once,
then every load is a plain read of the codes (GGUF Q8_0/Q4_0/Q4_1 blocks are kept as they are).
Options that would do nothing are refused: --group-size needs --quantize int4, --shards needs
--to meta, --gguf-type needs --to gguf. DST is checked before the source is read.

--adapter DIR merges a LoRA adapter (Hugging Face PEFT's layout: adapter_config.json +
adapter_model.safetensors, from camelid finetune or PEFT) into the weights as they are written,
W + scaling * B A, one tensor at a time; with --quantize the merged weights are quantized. An
adapter on the output head of a tied-embedding model gives a merged model with a head of its own.

examples:
  camelid convert path/to/Llama-2-7b-hf llama2-7b.gguf --to gguf --gguf-type Q8_0
  camelid convert model.gguf model-hf --to hf --dtype bfloat16
  camelid convert path/to/Llama-2-7b-hf llama2-7b-int4 --to camelid --quantize int4
  camelid convert smollm2-135m-instruct merged-hf --adapter runs/sft/adapter --to hf
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from camelid.atomic import check_destination
from camelid.checkpoint import FORMATS, read_checkpoint, write_checkpoint
from camelid.checkpoint.gguf import WRITABLE
from camelid.cli.common import DTYPES
from camelid.errors import CamelidError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="source checkpoint (any format camelid reads)")
    p.add_argument("dst", metavar="DST", help="destination file (gguf) or directory")
    p.add_argument("--to", required=True, choices=FORMATS, help="destination format")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weight dtype (default: the source's; float32 for quantized sources)")
    p.add_argument("--gguf-type", choices=list(WRITABLE), default=None,
                   help="GGUF tensor type (default: from --dtype); norms always stay F32")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization of the linear layers (only with --to camelid)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size: 32 (default), 64 or 128 (only with --quantize int4)")
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="merge this LoRA adapter (PEFT layout) into the weights written")
    p.add_argument("--shards", type=int, default=None, help="model-parallel files for --to meta (default 1)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")


def check_options(args: argparse.Namespace) -> None:
    """Every mistake in the options, before the source is read (which can take minutes)."""
    if args.shards is not None:
        if args.to != "meta":
            raise CamelidError(f"--shards splits Meta's consolidated.NN.pth files and does nothing with "
                               f"--to {args.to}; drop it or use --to meta")
        if args.shards < 1:
            raise CamelidError(f"--shards must be >= 1 (got {args.shards})")
    if args.gguf_type and args.to != "gguf":
        raise CamelidError("--gguf-type only applies with --to gguf")
    if args.quantize and args.to != "camelid":
        raise CamelidError("--quantize writes quantized camelid checkpoints only: add --to camelid")
    if args.group_size is not None:
        if args.quantize != "int4":
            raise CamelidError("--group-size sets int4's group size and does nothing "
                               f"{'with --quantize int8' if args.quantize else 'without --quantize int4'}; "
                               "drop it or add --quantize int4")
        from camelid.quant import GROUP_SIZES

        if args.group_size not in GROUP_SIZES:
            raise CamelidError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} "
                               f"(got {args.group_size})")
    if args.adapter is not None:
        from camelid.lora import check_adapter_dir

        try:
            check_adapter_dir(args.adapter)
        except CamelidError as e:
            raise CamelidError(f"--adapter: {e}") from None
    # GGUF is one file; every other format is a directory
    dst = check_destination(args.dst, "DST", directory=args.to != "gguf")
    if dst.exists() and not args.force and (dst.is_file() or any(dst.iterdir())):
        raise CamelidError(f"DST {dst}: already exists; choose another path or pass --force")


def main(args: argparse.Namespace) -> int:
    check_options(args)
    t0 = time.perf_counter()
    ckpt = read_checkpoint(args.src)
    merged = ""
    if args.adapter is not None:
        from camelid.lora import merged_checkpoint

        ckpt, merged = merged_checkpoint(ckpt, args.adapter), f" with adapter {args.adapter} merged"
    if args.quantize:
        from camelid.checkpoint import build_quantized_model, save_quantized
        dtype = DTYPES[args.dtype] if args.dtype else torch.float32
        model = build_quantized_model(ckpt, args.quantize, args.group_size, dtype=dtype, progress=sys.stderr.isatty())
        save_quantized(model, ckpt.tokenizer, args.dst, overwrite=args.force)
        print(f"wrote {args.dst} (camelid, {args.quantize}) from {ckpt.path} ({ckpt.format}){merged} in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
        return 0
    dst = write_checkpoint(ckpt, args.dst, args.to, dtype=DTYPES[args.dtype] if args.dtype else None,
                           gguf_type=args.gguf_type, shards=args.shards or 1, overwrite=args.force,
                           progress=sys.stderr.isatty())
    print(f"wrote {dst} ({args.to}) from {ckpt.path} ({ckpt.format}){merged} in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    return 0
