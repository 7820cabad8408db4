"""Meta's release format: params.json + consolidated.NN.pth, one file per model-parallel rank.

Shards split wq/wk/wv/w1/w3/output along dim 0 (column-parallel), wo/w2 along dim 1
(row-parallel), and tok_embeddings along dim 1 in LLaMA-1/2 (ParallelEmbedding) but along dim 0
in Llama-3 (VocabParallelEmbedding); norms are replicated. Rather than trusting a table, each
weight is concatenated along the one axis whose sum gives the shape the config implies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from camelid.checkpoint.base import Checkpoint
from camelid.checkpoint.names import expected_shapes, refuse_scorer
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer, has_tokenizer, load_tokenizer

SHARD = re.compile(r"consolidated\.(\d+)\.pth$")
# Settings params.json cannot hold. Meta's loaders build ModelArgs(max_seq_len=...,
# max_batch_size=..., **params), so a max_seq_len key there would be a duplicate argument;
# the context length the model was trained for goes beside it instead, and is read back.
EXTRA = "camelid_params.json"
# Split axis of each weight when writing shards (Meta's reference layout).
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def shard_files(directory: Path) -> list[Path]:
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := SHARD.search(p.name)))
    if not found:
        raise CamelidError(f"{directory}: no consolidated.NN.pth files next to params.json")
    numbers = [n for n, _ in found]
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        raise CamelidError(f"{directory}: model-parallel shard(s) {['consolidated.%02d.pth' % n for n in missing]} "
                           f"missing ({len(found)} of {max(numbers) + 1} present); download them again")
    return [p for _, p in found]


def config_from_params(params: dict[str, Any], vocab_from_tokenizer: int | None, where: str) -> ModelConfig:
    params = dict(params)
    vocab = params.pop("vocab_size", -1)
    if vocab is None or vocab <= 0:  # LLaMA-1 writes -1: the tokenizer decides
        if vocab_from_tokenizer is None:
            raise CamelidError(f"{where}: vocab_size is {vocab} and no tokenizer.model was found to take it from")
        vocab = vocab_from_tokenizer
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise CamelidError(f"{where}: missing field(s) {missing}")
    scaling = None
    if params.get("use_scaled_rope"):  # Llama-3.1's defaults
        scaling = {"rope_type": "llama3", "factor": float(params.get("rope_scaling_factor", 8.0)),
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0}
    eps = float(params.get("norm_eps", 1e-6))
    return ModelConfig(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab,
        multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=eps, rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling,
        max_seq_len=int(params.get("max_seq_len", 8192 if vocab > 100_000 else 4096 if eps == 1e-5 else 2048)))


def read_meta(directory: Path) -> Checkpoint:
    directory = Path(directory)
    params_path = directory / "params.json"
    try:
        params = json.loads(params_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CamelidError(f"{params_path}: cannot read ({e})") from None
    if not isinstance(params, dict):
        raise CamelidError(f"{params_path}: expected a JSON object, got {type(params).__name__}")
    extra_path = directory / EXTRA
    if "max_seq_len" not in params and extra_path.exists():
        try:
            extra = json.loads(extra_path.read_text())
            context = extra["max_seq_len"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CamelidError(f"{extra_path}: cannot read the context length ({type(e).__name__}: {e}); "
                               "fix or delete the file") from None
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise CamelidError(f"{extra_path}: max_seq_len must be a positive integer (got {context!r})")
        params["max_seq_len"] = context
    files = shard_files(directory)
    # LLaMA-1's release keeps tokenizer.model one level up, beside the size folders.
    tok_dir = next((d for d in (directory, directory.parent) if has_tokenizer(d)), None)
    tokenizer = load_tokenizer(tok_dir) if tok_dir else None
    config = config_from_params(params, tokenizer.vocab_size if tokenizer else None, str(params_path))
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise CamelidError(f"{f}: cannot read PyTorch weights ({e}); the file may be truncated") from None
    want = expected_shapes(config)

    def read(name: str) -> torch.Tensor:
        parts = [s[name] for s in shards if name in s]
        if len(parts) != len(shards):
            raise CamelidError(f"{directory}: weight {name} is missing from some of the {len(shards)} shards")
        return merge(parts, want.get(name), name)

    names = [n for n in shards[0]]
    hint = f" ({len(files)} shard file(s) found: is one missing, or does params.json disagree?)"
    dtypes = {t.dtype for t in shards[0].values() if t.dim() > 1}
    return Checkpoint(path=directory, format="meta", config=config, tokenizer=tokenizer, names=names, read=read,
                      dtype=dtypes.pop() if len(dtypes) == 1 else None, details={"shape_hint": hint, "shards": len(files)},
                      where=lambda _: str(params_path.parent))


def merge(parts: list[torch.Tensor], shape: tuple[int, ...] | None, name: str) -> torch.Tensor:
    if len(parts) == 1 or parts[0].dim() == 1:
        return parts[0]  # unsharded, or a replicated norm
    if shape is not None:
        for axis in range(parts[0].dim()):
            if sum(p.shape[axis] for p in parts) == shape[axis] and \
                    all(p.shape[1 - axis] == shape[1 - axis] for p in parts):
                return torch.cat(parts, dim=axis)
    # Shapes disagree with the config: concatenate the usual way and let the shape check report it.
    return torch.cat(parts, dim=1 if name.endswith(ROW_PARALLEL) else 0)


def ffn_params(config: ModelConfig) -> tuple[int, float | None]:
    """multiple_of and ffn_dim_multiplier that make Meta's formula give this config's FFN width
    (Hugging Face and GGUF state the width; params.json can only derive it)."""
    target = config.ffn_dim
    base = int(2 * (4 * config.dim) / 3)
    candidates = [(config.multiple_of, config.ffn_dim_multiplier)]
    candidates += [(m, None) for m in (256, 1024, 4096, 512, 128, 64, 32, 16, 8, 4, 2, 1)]
    candidates += [(1, (target + 0.5) / base)]
    for multiple_of, multiplier in candidates:
        if config.replace(hidden_dim=None, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).ffn_dim == target:
            return multiple_of, multiplier
    raise CamelidError(f"FFN width {target} cannot be expressed by Meta's params.json; "
                       "export to Hugging Face or GGUF instead")


def write_meta(directory: Path, config: ModelConfig, tokenizer: Tokenizer | None,
               tensors: Iterable[tuple[str, torch.Tensor]], shards: int = 1) -> None:
    """Write params.json, `shards` consolidated.NN.pth files and the tokenizer into `directory`."""
    refuse_scorer(config, "Meta's format", directory)
    if config.rope_scaling and config.rope_scaling.get("rope_type") != "llama3":
        raise CamelidError("Meta's params.json can only express Llama-3.1 RoPE scaling")
    multiple_of, multiplier = ffn_params(config)
    if config.tie_embeddings:
        raise CamelidError("Meta's format has no tied embeddings; export this model to Hugging Face or GGUF")
    if config.head_dim_override:
        raise CamelidError("Meta's params.json cannot state a head_dim other than dim / n_heads; "
                           "export this model to Hugging Face or GGUF")
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, t in tensors:
        if t.dim() == 1:
            for p in parts:
                p[name] = t.clone()
            continue
        axis = 1 if name.endswith(ROW_PARALLEL) else 0
        if t.shape[axis] % shards:
            raise CamelidError(f"{name}: dimension {t.shape[axis]} does not split into {shards} shards")
        for p, chunk in zip(parts, t.chunk(shards, dim=axis)):
            p[name] = chunk.clone()
    for k, p in enumerate(parts):
        torch.save(p, directory / f"consolidated.{k:02d}.pth")
    # Exactly the keys Meta's ModelArgs takes: it is built as ModelArgs(max_seq_len=...,
    # **params), so max_seq_len must not be here, and Llama-2's has no rope_theta field.
    params: dict[str, Any] = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
                              "vocab_size": config.vocab_size, "multiple_of": multiple_of,
                              "norm_eps": config.norm_eps}
    if config.kv_heads != config.n_heads:
        params["n_kv_heads"] = config.kv_heads
    if config.rope_theta != 10000.0:
        params["rope_theta"] = config.rope_theta
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    if config.rope_scaling:
        params["use_scaled_rope"] = True
        params["rope_scaling_factor"] = config.rope_scaling["factor"]
    (directory / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    (directory / EXTRA).write_text(json.dumps({"max_seq_len": config.max_seq_len}, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
