"""GGUF (ggml's docs/gguf.md) through the `gguf` package: read llama-architecture files,
dequantizing each tensor as it is loaded, and write F32 / F16 / BF16 / Q8_0 files that llama.cpp
loads. q/k weights are stored in Meta's pair-rotating order, so they pass through unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import gguf
import numpy as np
import torch

from camelid.atomic import atomic_path
from camelid.checkpoint.base import Checkpoint
from camelid.checkpoint.names import refuse_scorer, rename
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.model import rope_inv_freq
from camelid.quant.blocks import GGML_DIRECT, QuantizedTensor, from_ggml
from camelid.tokenizer import Tokenizer, tokenizer_from_gguf

Q = gguf.GGMLQuantizationType
# What camelid reads (the `gguf` package dequantizes these in numpy).
READABLE = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
            Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
# What camelid writes, with the matching general.file_type.
WRITABLE = {"F32": (Q.F32, gguf.LlamaFileType.ALL_F32), "F16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
            "BF16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "Q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
ARCHITECTURES = ("llama",)


def open_gguf(path: Path) -> tuple[gguf.GGUFReader, dict[str, Any]]:
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CamelidError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # struct / numpy errors on a truncated or corrupt header
        raise CamelidError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e}); "
                           "download or convert it again") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CamelidError(f"{path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes} "
                               f"but the file has {size} bytes; download it again")
    return reader, meta


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, Any], where: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CamelidError(f"{where}: architecture {arch!r} is not supported; camelid runs "
                           f"{', '.join(ARCHITECTURES)} models")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise CamelidError(f"{where}: metadata key {arch}.{name} is missing")
        return value

    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", dim // n_heads)))
    embd = tensors.get("token_embd.weight")
    vocab = meta.get(f"{arch}.vocab_size") or (len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta
                                                else int(embd.shape[1]))
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": _f32(meta[f"{arch}.rope.scaling.factor"])}
    elif kind != "none":
        raise CamelidError(f"{where}: RoPE scaling {kind!r} is not supported (none, linear, and Llama-3 "
                           "rope_freqs are); running it as plain RoPE would be wrong on long inputs")
    if "rope_freqs.weight" in tensors:
        scaling = {"rope_type": "freq_factors", "factors": [float(x) for x in np.asarray(tensors["rope_freqs.weight"].data)]}
    kv = key("attention.head_count_kv", n_heads)
    if isinstance(kv, list):
        raise CamelidError(f"{where}: per-layer KV head counts are not supported")
    return ModelConfig(
        dim=dim, n_layers=int(key("block_count")), n_heads=n_heads, n_kv_heads=int(kv),
        vocab_size=int(vocab), hidden_dim=int(key("feed_forward_length")),
        norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(key("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_seq_len=int(key("context_length", 2048)), tie_embeddings="output.weight" not in tensors,
        head_dim_override=head_dim if head_dim != dim // n_heads else None)


def _f32(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.99999975e-06. Keep the decimal the
    writer meant (float32 has about 7 significant digits)."""
    return float(f"{float(value):.7g}")


def read_gguf(path: Path) -> Checkpoint:
    path = Path(path)
    reader, meta = open_gguf(path)
    by_name = {t.name: t for t in reader.tensors}
    config = config_from_gguf(meta, by_name, str(path))
    unreadable = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in READABLE})
    if unreadable:
        raise CamelidError(f"{path}: tensor type(s) {unreadable} are not supported; camelid reads "
                           f"{sorted(q.name for q in READABLE)}. Re-quantize with llama.cpp or convert from "
                           "the original weights")
    names: dict[str, str] = {}
    for gname in by_name:
        cname = rename(gname, "gguf", "camelid")
        if cname is not None:
            names[cname] = gname
        elif gname != "rope_freqs.weight":
            names[gname] = gname  # reported as unexpected by Checkpoint.check

    def read(name: str) -> torch.Tensor:
        t = by_name[names[name]]
        if t.tensor_type in (Q.F32, Q.F16):
            array = np.array(t.data)  # copy out of the read-only mmap
        else:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(array.reshape([int(d) for d in reversed(t.shape)]))

    def read_quantized(name: str) -> QuantizedTensor | None:
        t = by_name.get(names.get(name, ""))
        if t is None or t.tensor_type.name not in GGML_DIRECT or len(t.shape) != 2:
            return None
        rows = torch.from_numpy(np.array(t.data))  # [out, bytes per row], copied out of the mmap
        return from_ggml(t.tensor_type.name, rows, int(t.shape[0]))

    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    matrix_types = {t.tensor_type for t in reader.tensors if len(t.shape) > 1}
    float_types = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    dtype = float_types.get(matrix_types.pop()) if len(matrix_types) == 1 else None
    return Checkpoint(path=path, format="gguf", config=config, tokenizer=tokenizer_from_gguf(meta, str(path)),
                      names=list(names), read=read, dtype=dtype, read_quantized=read_quantized,
                      details={"tensor_types": types, "metadata": meta}, where=lambda _: str(path))


# ---- writing ----------------------------------------------------------------------------------

def write_gguf(path: Path, config: ModelConfig, tokenizer: Tokenizer | None,
               tensors: Iterable[tuple[str, torch.Tensor]], tensor_type: str = "F32",
               name: str = "camelid model") -> None:
    if tensor_type not in WRITABLE:
        raise CamelidError(f"GGUF tensor type {tensor_type!r} cannot be written; choose one of {list(WRITABLE)}")
    refuse_scorer(config, "GGUF", path)
    if tokenizer is None:
        raise CamelidError(f"{path}: GGUF files carry their tokenizer, and this checkpoint has none")
    qtype, file_type = WRITABLE[tensor_type]
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        if qtype == Q.Q8_0:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_config(writer, config)
        _write_tokenizer(writer, tokenizer.gguf_metadata())
        for cname, tensor in tensors:
            array = tensor.detach().to(torch.float32).cpu().numpy()
            _add_tensor(writer, rename(cname, "camelid", "gguf"), array, qtype)
        if config.rope_scaling and config.rope_scaling.get("rope_type") in ("llama3", "freq_factors"):
            # llama.cpp applies Llama-3.1 scaling as per-frequency divisors in a tensor.
            plain = rope_inv_freq(config.replace(rope_scaling=None), torch.device("cpu"))
            factors = plain / rope_inv_freq(config, torch.device("cpu"))
            writer.add_tensor("rope_freqs.weight", factors.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, qtype: Q) -> None:
    # Norms stay F32 (llama.cpp expects it); rows that are not whole Q8_0 blocks fall back to F16.
    if array.ndim == 1 or qtype == Q.F32:
        writer.add_tensor(name, array.astype(np.float32))
    elif qtype == Q.F16 or (qtype == Q.Q8_0 and array.shape[-1] % 32):
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def _write_config(writer: gguf.GGUFWriter, c: ModelConfig) -> None:
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if c.head_dim_override:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    if c.rope_scaling and c.rope_scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_scaling["factor"])


def _write_tokenizer(writer: gguf.GGUFWriter, meta: dict[str, Any]) -> None:
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif key.endswith("scores"):
            writer.add_array(key, [float(v) for v in value])
        elif key.endswith("token_type"):
            writer.add_array(key, [int(v) for v in value])
        else:
            writer.add_array(key, list(value))
