"""Arguments shared by the commands that load a model."""

from __future__ import annotations

import argparse
import sys

import torch

from camelid.errors import CamelidError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, metavar="PATH",
                   help="a .gguf file, a Hugging Face / Meta / camelid model directory, or a known name "
                        "(smollm2-135m-instruct)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weight dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization: int8 per output channel, or int4 in groups (GGUF "
                        "Q8_0/Q4_0/Q4_1 weights are taken over as stored)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32 (default), 64 or 128")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="decode with a compiled step (the default where torch.compile works): after the first long "
                        "generation of a model a background process compiles its step, and later runs load it "
                        "from ~/.cache/camelid/compiled in a moment; --no-compile decodes eagerly")


def add_draft_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", metavar="PATH", default=None,
                   help="speculative decoding: a smaller model with the same tokenizer proposes tokens that "
                        "the model checks in one forward; the output is the same as without it")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft proposes per round (default 4)")
    p.add_argument("--draft-quantize", choices=["int8", "int4"], default=None, help="quantize the draft model")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CamelidError(f"--device {name!r}: not a device name (cpu, cuda, cuda:N, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CamelidError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def load_llm(args: argparse.Namespace):
    import camelid

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    llm = camelid.load(args.model, device=device, dtype=dtype, quantize=args.quantize,
                       group_size=getattr(args, "group_size", None), compile=args.compile,
                       progress=sys.stderr.isatty())
    if getattr(args, "draft", None):
        if args.draft_tokens < 1:
            raise CamelidError(f"--draft-tokens must be >= 1 (got {args.draft_tokens})")
        llm.use_draft(camelid.load(args.draft, device=device, dtype=dtype, quantize=args.draft_quantize,
                                   compile=args.compile), args.draft_tokens)
    return llm


def add_sampling_arguments(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=temperature, metavar="T",
                   help=f"sampling temperature; 0 is greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling threshold (default 0.9)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens only")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed, for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable); end-of-turn tokens always stop")


def sampling_params(args: argparse.Namespace):
    from camelid.generate import SamplingParams

    if args.max_new_tokens < 0:
        raise CamelidError(f"--max-new-tokens must be >= 0 (got {args.max_new_tokens})")
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, stop=tuple(args.stop))
