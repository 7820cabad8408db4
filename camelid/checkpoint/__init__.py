"""Checkpoints: read Meta, Hugging Face, GGUF and camelid formats; write all four; convert.

    ckpt = read_checkpoint(path)                 # config, tokenizer, lazy weights
    model = build_model(ckpt, dtype, device)     # meta device + assign: one copy in memory
    model = build_quantized_model(ckpt, "int4")  # quantized one tensor at a time
    save_quantized(model, ckpt.tokenizer, dst)   # a quantized camelid checkpoint
    convert(src, dst, to="gguf", gguf_type="Q8_0")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from camelid.atomic import atomic_dir
from camelid.checkpoint.base import Checkpoint
from camelid.checkpoint.build import build_model, build_quantized_model
from camelid.checkpoint.gguf import read_gguf, write_gguf
from camelid.checkpoint.hf import read_hf, write_hf
from camelid.checkpoint.hub import resolve
from camelid.checkpoint.meta import read_meta, write_meta
from camelid.checkpoint.native import CONFIG as NATIVE_CONFIG
from camelid.checkpoint.names import refuse_scorer
from camelid.checkpoint.native import read_native, save_quantized, write_native
from camelid.errors import CamelidError

__all__ = ["Checkpoint", "build_model", "build_quantized_model", "convert", "detect_format", "read_checkpoint",
           "resolve", "save_quantized", "write_checkpoint"]

FORMATS = ("camelid", "hf", "meta", "gguf")


def detect_format(path: Path) -> str:
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise CamelidError(f"{path}: not a GGUF file; pass a .gguf file or a model directory")
    if not path.is_dir():
        raise CamelidError(f"{path}: no such file or directory")
    if (path / NATIVE_CONFIG).exists():
        return "camelid"
    if (path / "params.json").exists():
        return "meta"
    if (path / "config.json").exists():
        return "hf"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise CamelidError(f"{path}: not a model directory (no camelid.json, params.json, config.json or single .gguf)")


def read_checkpoint(name_or_path: str | os.PathLike[str]) -> Checkpoint:
    path = resolve(name_or_path)
    fmt = detect_format(path)
    if fmt == "gguf" and path.is_dir():
        path = next(path.glob("*.gguf"))
    return {"gguf": read_gguf, "hf": read_hf, "meta": read_meta, "camelid": read_native}[fmt](path)


def write_checkpoint(ckpt: Checkpoint, dst: str | os.PathLike[str], to: str, dtype: torch.dtype | None = None,
                     gguf_type: str | None = None, shards: int = 1, overwrite: bool = False,
                     progress: bool = False) -> Path:
    """Write the weights of `ckpt` (converted to `dtype`) in format `to`; atomically."""
    if to not in FORMATS:
        raise CamelidError(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    if to in ("gguf", "meta"):  # before anything is written
        refuse_scorer(ckpt.config, {"gguf": "GGUF", "meta": "Meta's format"}[to], ckpt.path)
    dst = Path(dst)
    dtype = dtype or ckpt.dtype or torch.float32
    tensors = ckpt.tensors(dtype=dtype, progress=progress)
    if to == "gguf":
        if dst.exists() and not overwrite:
            raise CamelidError(f"{dst}: already exists; choose another path or pass --force")
        gguf_type = gguf_type or {torch.float16: "F16", torch.bfloat16: "BF16"}.get(dtype, "F32")
        write_gguf(dst, ckpt.config, ckpt.tokenizer, tensors, tensor_type=gguf_type, name=ckpt.path.stem)
        return dst
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        if to == "hf":
            write_hf(tmp, ckpt.config, ckpt.tokenizer, tensors, dtype)
        elif to == "meta":
            write_meta(tmp, ckpt.config, ckpt.tokenizer, tensors, shards=shards)
        else:
            write_native(tmp, ckpt.config, ckpt.tokenizer, tensors)
    return dst


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str, **kwargs) -> Path:
    return write_checkpoint(read_checkpoint(src), dst, to, **kwargs)
