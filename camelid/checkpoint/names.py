"""Weight names across formats, and the rotary permutation of Hugging Face q/k weights.

camelid uses Meta's names and Meta's pair-rotating q/k layout; GGUF keeps that layout under its
own names; Hugging Face permutes q/k so that RoPE can rotate halves.
"""

from __future__ import annotations

import re

import torch

from camelid.config import ModelConfig
from camelid.errors import CamelidError

# camelid (Meta) name, Hugging Face name, GGUF name; {i} is the layer index.
TABLE = [
    ("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "model.norm.weight", "output_norm.weight"),
    ("output.weight", "lm_head.weight", "output.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
]
FORMATS = {"camelid": 0, "hf": 1, "gguf": 2}


def _compile(column: int) -> list[tuple[re.Pattern[str], int]]:
    return [(re.compile("^" + re.escape(row[column]).replace(r"\{i\}", r"(\d+)") + "$"), k)
            for k, row in enumerate(TABLE)]


_PATTERNS = {fmt: _compile(col) for fmt, col in FORMATS.items()}


def rename(name: str, src: str, dst: str) -> str | None:
    """Translate a weight name between formats; None if `src` has no such weight."""
    for pattern, row in _PATTERNS[src]:
        m = pattern.match(name)
        if m:
            target = TABLE[row][FORMATS[dst]]
            return target.replace("{i}", m.group(1)) if m.groups() else target
    return None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """camelid weight name -> shape, for validating a checkpoint against its config."""
    d, hd, v, f = config.dim, config.head_dim, config.vocab_size, config.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d), "norm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.head_size, d)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (config.n_heads * hd, d),
            p + "attention.wk.weight": (config.kv_heads * hd, d),
            p + "attention.wv.weight": (config.kv_heads * hd, d),
            p + "attention.wo.weight": (d, config.n_heads * hd),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "feed_forward.w3.weight": (f, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    return shapes


def refuse_scorer(config: ModelConfig, fmt: str, where: object) -> None:
    """GGUF and Meta's format describe language models only: llama.cpp and Meta's code have no
    scoring head, so a file with one would load as a broken language model."""
    if config.num_labels:
        raise CamelidError(f"{where}: a reward model (a scoring head of {config.num_labels} label(s)) cannot be "
                           f"written as {fmt}, whose readers have no such head; use --to hf "
                           "(LlamaForSequenceClassification) or --to camelid")


def qk_heads(name: str, config: ModelConfig) -> int | None:
    """How many heads a q/k weight holds (n_kv_heads for wk: the GQA trap, llama.cpp #2376)."""
    if name.endswith("attention.wq.weight"):
        return config.n_heads
    if name.endswith("attention.wk.weight"):
        return config.kv_heads
    return None


def meta_to_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Pairs (2i, 2i+1) of each head -> halves (i, i + D/2), as transformers' converter permutes."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)
