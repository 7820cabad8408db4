"""Describe a model: its config, exact parameter count, and the memory its weights need at each
precision (plus the KV cache per token). NAME_OR_PATH is a named size (7B, 13B, 33B, 65B,
llama2-7B, llama3-8B, smollm2-135M, stories15M, tiny, ...) or a checkpoint.

examples:
  camelid info 7B
  camelid info 65B --json
  camelid info path/to/model.gguf
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from pathlib import Path
from typing import Any

import torch

from camelid.config import SIZES, ModelConfig, get_size
from camelid.errors import CamelidError
from camelid.model import Transformer

# Bytes per weight: int8 keeps one bf16 scale per output row; int4 one bf16 scale and zero per
# group of 32 weights (the finest grouping camelid offers).
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME_OR_PATH", help="a named size or a checkpoint path")
    p.add_argument("--json", action="store_true", help="print one JSON object (params, config, memory, ...)")


def count_params(config: ModelConfig) -> int:
    with torch.device("meta"):
        model = Transformer(config)
    return sum(p.numel() for p in model.parameters())


def _check_name(name: str) -> None:
    """A bare word that is neither a file here nor a name camelid knows was meant as a named
    size: say which sizes there are, rather than only that no such file exists."""
    from camelid.checkpoint.hub import MODEL_SUFFIXES, PYPI_MODELS

    if Path(name).expanduser().exists() or "/" in name or os.sep in name or name.lower() in PYPI_MODELS \
            or name.startswith((".", "~")) or name.lower().endswith(MODEL_SUFFIXES):
        return
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in SIZES], n=1, cutoff=0.5)
    hint = next((f" (did you mean {k}?)" for k in SIZES if close and k.lower() == close[0]), "")
    raise CamelidError(f"{name}: not a named size, nor a file or directory here{hint}; named sizes: "
                       f"{', '.join(SIZES)}; models camelid downloads by name: {', '.join(PYPI_MODELS)}; "
                       "or give a checkpoint path or a Hugging Face repository id (org/name)")


def describe(name: str) -> dict[str, Any]:
    source: dict[str, Any] = {}
    if any(k.lower() == name.lower() for k in SIZES) and not Path(name).exists():
        config = get_size(name)
        source = {"kind": "named size", "name": name}
    else:
        from camelid.checkpoint import read_checkpoint

        _check_name(name)
        ckpt = read_checkpoint(name)
        config = ckpt.config
        source = {"kind": "checkpoint", "format": ckpt.format, "path": str(ckpt.path),
                  "stored_dtype": str(ckpt.dtype).replace("torch.", "") if ckpt.dtype else "mixed/quantized"}
        if "tensor_types" in ckpt.details:
            source["tensor_types"] = ckpt.details["tensor_types"]
        if ckpt.tokenizer is not None:
            tok = ckpt.tokenizer
            source["tokenizer"] = {"type": type(tok).__name__, "vocab_size": tok.vocab_size,
                                   "bos": tok.token(tok.bos_id), "eos": tok.token(tok.eos_id),
                                   "chat_template": bool(tok.chat_template)}
    params = count_params(config)
    kv_per_token = config.kv_cache_bytes(1, 1, 2)
    return {"name": name, "params": params, "config": config.to_dict(),
            "derived": {"head_dim": config.head_dim, "kv_heads": config.kv_heads, "ffn_dim": config.ffn_dim},
            "memory_bytes": {k: int(params * v) for k, v in BYTES_PER_PARAM.items()},
            "kv_cache_bytes_per_token_bf16": kv_per_token, "source": source}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main(args: argparse.Namespace) -> int:
    d = describe(args.name)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    c, src = d["config"], d["source"]
    print(f"{d['name']}: {d['params']:,} parameters ({src.get('format', src['kind'])})")
    print(f"  shape: dim {c['dim']}, {c['n_layers']} layers, {c['n_heads']} heads "
          f"({d['derived']['kv_heads']} kv heads, head_dim {d['derived']['head_dim']}), "
          f"ffn {d['derived']['ffn_dim']}, vocab {c['vocab_size']}")
    print(f"  norm_eps {c['norm_eps']:g}, rope_theta {c['rope_theta']:g}, context {c['max_seq_len']}, "
          f"tied embeddings: {'yes' if c['tie_embeddings'] else 'no'}")
    print("  weights: " + ", ".join(f"{k} {_gib(v)}" for k, v in d["memory_bytes"].items()))
    print(f"  KV cache: {_gib(d['kv_cache_bytes_per_token_bf16'] * 1024)} per 1k tokens (bf16)")
    if "tensor_types" in src:
        print("  tensor types: " + ", ".join(f"{k} x{v}" for k, v in src["tensor_types"].items()))
    if "tokenizer" in src:
        t = src["tokenizer"]
        print(f"  tokenizer: {t['type']}, {t['vocab_size']} tokens, bos {t['bos']!r}, eos {t['eos']!r}, "
              f"chat template: {'yes' if t['chat_template'] else 'no (built-in format)'}")
    return 0
