"""camelid's own format: camelid.json (the ModelConfig) + model.safetensors in camelid's names and
Meta's q/k layout + the tokenizer files. Loading is an mmap and an assign: no conversion.

A quantized checkpoint (camelid.json has "quantization") stores each quantized layer as its
buffers, `X.weight` (codes), `X.scales` and, for int4, `X.mins`, and a tied model's quantized
head as `output.*`. Read as floats it dequantizes, so converting it to other formats works;
`save_quantized` writes one from a quantized model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from camelid.atomic import atomic_dir
from camelid.checkpoint.base import Checkpoint
from camelid.checkpoint.safetensors_io import SafetensorsFiles, save_safetensors
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.model import Transformer
from camelid.quant.blocks import QuantizedTensor
from camelid.quant.layers import QuantizedLinear
from camelid.tokenizer import Tokenizer, has_tokenizer, load_tokenizer

CONFIG = "camelid.json"
VERSION = 1


def read_native(directory: Path) -> Checkpoint:
    directory = Path(directory)
    path = directory / CONFIG
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CamelidError(f"{path}: cannot read ({e})") from None
    if meta.get("format") != "camelid" or "config" not in meta:
        raise CamelidError(f"{path}: not a camelid checkpoint description (no format/config keys)")
    if meta.get("version", 0) > VERSION:
        raise CamelidError(f"{path}: written by a newer camelid (format version {meta['version']}); upgrade camelid")
    config = ModelConfig.from_dict(meta["config"], where=f"{path} config")
    files = SafetensorsFiles(directory)
    tokenizer = load_tokenizer(directory) if has_tokenizer(directory) else None
    where = lambda n: str(files.file_of.get(n, directory))  # noqa: E731
    if "quantization" not in meta:
        return Checkpoint(path=directory, format="camelid", config=config, tokenizer=tokenizer, names=files.names(),
                          read=files.get, dtype=files.dtype(), where=where)
    stored = set(files.names())

    def read_quantized(name: str) -> QuantizedTensor | None:
        stem = name.removesuffix(".weight")
        if f"{stem}.scales" not in stored:
            return None
        parts = ("weight", "scales", "mins") if f"{stem}.mins" in stored else ("weight", "scales")
        return QuantizedTensor.from_buffers({p: files.get(f"{stem}.{p}") for p in parts})

    def read(name: str):
        q = read_quantized(name)
        return files.get(name) if q is None else q.dequantize(files.get("tok_embeddings.weight").dtype)

    # the buffers beside the codes, and a tied model's quantized head, are not weights of the config
    names = [n for n in files.names() if not n.endswith((".scales", ".mins"))
             and not (config.tie_embeddings and n.startswith("output."))]
    return Checkpoint(path=directory, format="camelid", config=config, tokenizer=tokenizer, names=names, read=read,
                      dtype=files.get("tok_embeddings.weight").dtype, where=where, read_quantized=read_quantized,
                      details={"quantization": meta["quantization"]})


def write_native(directory: Path, config: ModelConfig, tokenizer: Tokenizer | None,
                 tensors: Iterable[tuple[str, torch.Tensor]], extra: dict | None = None) -> None:
    save_safetensors(directory, tensors)
    meta = {"format": "camelid", "version": VERSION, "config": config.to_dict(), **(extra or {})}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)


def save_quantized(model: Transformer, tokenizer: Tokenizer | None, dst: str | Path, overwrite: bool = False) -> None:
    """Write a quantized model as a camelid checkpoint directory (atomically) that
    `camelid.load` reads back quantized, byte for byte."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise CamelidError("save_quantized: the model has no quantized layers; use camelid convert for float models")
    schemes = sorted({m.scheme for m in layers})
    groups = sorted({m.group_size for m in layers})
    # the main scheme: int4 when any layer is int4 (its 8-bit tensors were kept from the source)
    info = {"scheme": schemes[-1] if "int4" not in schemes else "int4", "layers": schemes, "group_sizes": groups}
    with atomic_dir(Path(dst), overwrite=overwrite) as tmp:
        write_native(tmp, model.config, tokenizer, model.state_dict().items(), extra={"quantization": info})
