"""Hugging Face LLaMA checkpoints: config.json + safetensors (or pytorch_model*.bin) + tokenizer.

q_proj/k_proj are permuted for rotate-half RoPE; they are un-permuted on read and permuted again
on write, with n_kv_heads for k_proj. Both are pure reshapes, so a round trip is bit-exact.

A scorer (ModelConfig.num_labels > 0, a reward model) is transformers'
LlamaForSequenceClassification: the same body, its head `score.weight` [num_labels, dim] instead
of `lm_head`, never tied, and `pad_token_id` in config.json, by which transformers finds each
row's last token (the rightmost one that is not padding) to read the score at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from camelid.checkpoint.base import Checkpoint
from camelid.checkpoint.names import hf_to_meta_qk, meta_to_hf_qk, qk_heads, rename
from camelid.checkpoint.safetensors_io import SafetensorsFiles, save_safetensors
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer, has_tokenizer, load_tokenizer

MODEL_TYPES = ("llama",)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
SCORER = "LlamaForSequenceClassification"
SCORE = "score.weight"   # a scorer's head, camelid's output.weight


def hf_num_labels(cfg: dict[str, Any]) -> int | None:
    """0 for a language model; a LlamaForSequenceClassification's labels, as transformers counts
    them (id2label, else num_labels), or None where its config.json says neither."""
    if SCORER not in (cfg.get("architectures") or []):
        return 0
    if isinstance(cfg.get("id2label"), dict) and cfg["id2label"]:
        return len(cfg["id2label"])
    return int(cfg["num_labels"]) if isinstance(cfg.get("num_labels"), int) else None


def config_from_hf(cfg: dict[str, Any], where: str, num_labels: int = 0) -> ModelConfig:
    if cfg.get("model_type") not in MODEL_TYPES:
        raise CamelidError(f"{where}: model_type {cfg.get('model_type')!r} is not supported; camelid runs "
                           f"{', '.join(MODEL_TYPES)} models")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CamelidError(f"{where}: {flag}=true is not supported (LLaMA has no biases)")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in cfg]
    if missing:
        raise CamelidError(f"{where}: missing field(s) {missing}")
    rope = cfg.get("rope_parameters") or {}  # transformers >= 5 nests theta and scaling here
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind == "llama3":
            scaling = {"rope_type": "llama3", **{k: float(scaling[k]) for k in (
                "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
        elif kind == "linear":
            scaling = {"rope_type": "linear", "factor": float(scaling["factor"])}
        else:
            raise CamelidError(f"{where}: rope scaling {kind!r} is not supported (llama3, linear)")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or dim // heads
    return ModelConfig(
        dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, vocab_size=cfg["vocab_size"],
        hidden_dim=cfg.get("intermediate_size"), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))), rope_scaling=scaling,
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        # a sequence classifier has no lm_head to tie: a reward model made from a tied base
        # (SmolLM2) keeps tie_word_embeddings=true in its config, which means nothing there
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)) and not num_labels,
        head_dim_override=head_dim if head_dim != dim // heads else None, num_labels=num_labels)


def read_hf(directory: Path) -> Checkpoint:
    directory = Path(directory)
    cfg_path = directory / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CamelidError(f"{cfg_path}: cannot read the model config ({e})") from None
    num_labels = hf_num_labels(cfg)
    config = config_from_hf(cfg, str(cfg_path), 1 if num_labels is None else num_labels)
    get, hf_names, where, dtype = _weights(directory)
    if num_labels is None and SCORE in hf_names:  # the config does not say: the head's rows do
        config = config.replace(num_labels=get(SCORE).shape[0])
    names: dict[str, str] = {}
    for hname in hf_names:
        if hname.endswith("rotary_emb.inv_freq"):
            continue
        names[_camelid_name(hname, config)] = hname
    if config.tie_embeddings:
        names.pop("output.weight", None)  # some writers store the tied head twice

    def read(name: str) -> torch.Tensor:
        t = get(names[name])
        heads = qk_heads(name, config)
        return hf_to_meta_qk(t, heads) if heads else t

    tokenizer = load_tokenizer(directory) if has_tokenizer(directory) else None
    return Checkpoint(path=directory, format="hf", config=config, tokenizer=tokenizer, names=list(names),
                      read=read, dtype=dtype, where=lambda n: where(names.get(n, n)))


def _camelid_name(hname: str, config: ModelConfig) -> str:
    if config.num_labels and hname == SCORE:
        return "output.weight"
    return rename(hname, "hf", "camelid") or hname


def _hf_name(name: str, config: ModelConfig) -> str:
    if config.num_labels and name == "output.weight":
        return SCORE
    return rename(name, "camelid", "hf") or name


def _weights(directory: Path):
    """(get, names, where, dtype) over safetensors, else pytorch_model*.bin files."""
    if list(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").exists():
        files = SafetensorsFiles(directory)
        return files.get, files.names(), lambda n: str(files.file_of.get(n, directory)), files.dtype()
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise CamelidError(f"{directory}: no model.safetensors or pytorch_model.bin weights found")
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for b in bins:
        try:
            part = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CamelidError(f"{b}: cannot read PyTorch weights ({e})") from None
        state.update(part)
        origin.update({k: b for k in part})
    dtypes = {t.dtype for t in state.values() if t.dim() > 1}
    return state.__getitem__, list(state), lambda n: str(origin.get(n, directory)), \
        (dtypes.pop() if len(dtypes) == 1 else None)


def hf_config(config: ModelConfig, tokenizer: Tokenizer | None, dtype: torch.dtype) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": [SCORER if config.num_labels else "LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": DTYPE_NAMES.get(dtype, "float32"), "use_cache": True,
    }
    s = config.rope_scaling
    if s and s["rope_type"] in ("llama3", "linear"):
        cfg["rope_scaling"] = dict(s)
        if "original_max_position_embeddings" in s:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(s["original_max_position_embeddings"])
    elif s:
        raise CamelidError("Hugging Face config.json has no place for per-frequency RoPE factors; "
                           "export this model to GGUF or the camelid format instead")
    if tokenizer is not None:
        cfg.update({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})
    if config.num_labels:
        # as transformers writes them; without pad_token_id it scores only batches of one row
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
        if tokenizer is not None:
            cfg["pad_token_id"] = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return cfg


def write_hf(directory: Path, config: ModelConfig, tokenizer: Tokenizer | None,
             tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
    """Write into `directory` (a fresh temporary directory the caller moves into place)."""
    def hf_tensors():
        for name, t in tensors:
            heads = qk_heads(name, config)
            yield _hf_name(name, config), (meta_to_hf_qk(t, heads) if heads else t)

    save_safetensors(directory, hf_tensors())
    (directory / "config.json").write_text(json.dumps(hf_config(config, tokenizer, dtype), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    if tokenizer is not None and not config.num_labels:  # a scorer generates nothing
        gen = {"bos_token_id": tokenizer.bos_id,
               "eos_token_id": sorted(tokenizer.stop_ids) if len(tokenizer.stop_ids) > 1 else tokenizer.eos_id}
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
