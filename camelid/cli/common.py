"""Arguments shared by the commands that load a model."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from camelid.checkpoint.hub import resolve
from camelid.errors import CamelidError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True, decoding: bool = True,
                        named_adapters: bool = False) -> None:
    """--model and the options of loading it; `decoding` adds --compile (commands that generate);
    `named_adapters` makes --adapter NAME=DIR, repeatable (the server's adapters beside the base)."""
    p.add_argument("--model", required=required, metavar="PATH",
                   help="a .gguf file, a Hugging Face / Meta / camelid model directory, or a known name "
                        "(smollm2-135m-instruct)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weight dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization: int8 per output channel, or int4 in groups (GGUF "
                        "Q8_0/Q4_0/Q4_1 weights are taken over as stored)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size: 32 (default), 64 or 128 (only with --quantize int4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    if named_adapters:
        p.add_argument("--adapter", metavar="NAME=DIR", action="append", default=None,
                       help="serve a LoRA adapter directory (Hugging Face PEFT's layout, from camelid finetune or "
                            "PEFT) beside the base model, as a model named NAME that requests choose by their "
                            "'model' field; repeat for several adapters of the same base, served together in one "
                            "batch. A DIR without NAME= is applied to the base model itself")
    else:
        p.add_argument("--adapter", metavar="DIR", default=None,
                       help="a LoRA adapter directory in Hugging Face PEFT's layout (adapter_config.json + "
                            "adapter_model.safetensors, from camelid finetune or PEFT), applied unmerged; works "
                            "with --quantize (camelid convert --adapter writes the merged model)")
    if not decoding:
        return
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="decode with a compiled step (the default where torch.compile works): after the first long "
                        "generation of a model a background process compiles its step, and later runs load it "
                        "from ~/.cache/camelid/compiled in a moment; --no-compile decodes eagerly")


def add_draft_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", metavar="PATH", default=None,
                   help="speculative decoding: a smaller model with the same tokenizer proposes tokens that "
                        "the model checks in one forward; the output is the same as without it")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="tokens the draft proposes per round (default 4; with --draft)")
    p.add_argument("--draft-quantize", choices=["int8", "int4"], default=None,
                   help="quantize the draft model (with --draft)")


DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise CamelidError(f"--device {name!r}: not a device camelid runs on (cpu, cuda, cuda:N, mps, auto)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CamelidError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CamelidError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                               f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CamelidError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def check_model_arguments(args: argparse.Namespace) -> torch.device:
    """The options of add_model_arguments and add_draft_arguments, checked before anything is
    loaded (load_llm checks them too, for commands with nothing else to check first). Returns
    the device."""
    from camelid.quant import GROUP_SIZES

    device = resolve_device(args.device)
    group_size = getattr(args, "group_size", None)
    if group_size is not None and args.quantize != "int4":
        raise CamelidError(f"--group-size {group_size}: only int4 weights come in groups; use it with --quantize "
                           "int4, or leave it out")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise CamelidError(f"--group-size {group_size}: must be one of {', '.join(map(str, GROUP_SIZES))}")
    if getattr(args, "draft", None) is None:
        for flag, value in (("--draft-tokens", getattr(args, "draft_tokens", None)),
                            ("--draft-quantize", getattr(args, "draft_quantize", None))):
            if value is not None:
                raise CamelidError(f"{flag}: only with --draft (a draft model for speculative decoding)")
    elif args.draft_tokens is not None and args.draft_tokens < 1:
        raise CamelidError(f"--draft-tokens must be >= 1 (got {args.draft_tokens})")
    if getattr(args, "adapter", None) is not None:  # its config is read now; its shapes once the base's config is
        from camelid.lora import check_adapter_dir

        try:
            check_adapter_dir(args.adapter)
        except CamelidError as e:
            raise CamelidError(f"--adapter: {e}") from None
    return device


def model_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """--dtype, by default float32 on CPU and bfloat16 on GPU."""
    return DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_llm(args: argparse.Namespace):
    import camelid

    device = check_model_arguments(args)
    dtype = model_dtype(args, device)
    draft_path = None
    if getattr(args, "draft", None):  # a missing draft is said before the model's minute of loading
        try:
            draft_path = resolve(args.draft)
        except CamelidError as e:
            raise CamelidError(f"--draft: {e}") from None
    llm = camelid.load(args.model, device=device, dtype=dtype, quantize=args.quantize,
                       group_size=getattr(args, "group_size", None), compile=args.compile,
                       progress=sys.stderr.isatty(), adapter=getattr(args, "adapter", None))
    if draft_path is not None:
        try:
            draft = camelid.load(draft_path, device=device, dtype=dtype, quantize=args.draft_quantize,
                                 compile=args.compile)
        except CamelidError as e:
            raise CamelidError(f"--draft: {e}") from None
        llm.use_draft(draft, args.draft_tokens or 4)
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
    """The sampling options as a SamplingParams, each checked under its option's name: call it
    before loading the model, so that a typo costs no loading time."""
    from camelid.generate import SamplingParams

    checks = (
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "must be >= 1"),
        ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
         "must be a number >= 0 (0 is greedy)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "must be in (0, 1]"),
        ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, "must be >= 1"),
        ("--seed", args.seed, args.seed is None or 0 <= args.seed < 2**64, "must be between 0 and 2**64 - 1"),
    )
    for flag, value, ok, rule in checks:
        if not ok:
            raise CamelidError(f"{flag} {value}: {rule}")
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, stop=tuple(args.stop))


# ---- text from the command line, stdin and files -------------------------------------------------

def lenient_stdin() -> None:
    """Let stdin hand undecodable bytes over as surrogates (made U+FFFD by `user_text`) instead
    of raising UnicodeDecodeError mid-read."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")


def user_text(text: str, where: str, args: argparse.Namespace, warned: set[str] | None = None) -> str:
    """`text` as typed or read (argv, stdin, a file) with invalid UTF-8 replaced by U+FFFD, the
    project's rule, and a warning on stderr naming `where` (once per `where` in `warned`)."""
    from camelid.tokenizer.text import has_invalid, replace_invalid

    if not has_invalid(text):
        return text
    if warned is None or where not in warned:
        print(f"camelid {getattr(args, 'command', '')}: warning: {where}: invalid UTF-8 replaced with U+FFFD",
              file=sys.stderr)
        if warned is not None:
            warned.add(where)
    return replace_invalid(text)


def read_text_file(path: str, where: str, args: argparse.Namespace) -> str:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        raise CamelidError(f"{where} {path}: no such file") from None
    except IsADirectoryError:
        raise CamelidError(f"{where} {path}: is a directory; give a text file") from None
    except PermissionError:
        raise CamelidError(f"{where} {path}: permission denied") from None
    return user_text(text, f"{where} {path}", args)
