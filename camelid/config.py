"""ModelConfig: the one typed description of a LLaMA-family model, and the named sizes.

The same schema is written into camelid checkpoints, read from Hugging Face / Meta / GGUF
metadata by `camelid.checkpoint`, and printed by `camelid info`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from camelid.errors import CamelidError


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    vocab_size: int = 32000
    # FFN width. None: derived as in Meta's reference code from multiple_of and
    # ffn_dim_multiplier; checkpoints that state it (HF intermediate_size, GGUF
    # feed_forward_length) set it explicitly.
    hidden_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6  # LLaMA-1 1e-6, Llama-2 and later 1e-5
    rope_theta: float = 10000.0
    # RoPE rescaling, None for plain RoPE. {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (Llama-3.1), {"rope_type":
    # "linear", "factor"}, or {"rope_type": "freq_factors", "factors": [...]} (GGUF rope_freqs).
    rope_scaling: dict[str, float] | None = field(default=None, compare=True, hash=False)
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    head_dim_override: int | None = None
    # 0: a language model (the head gives a logit per vocabulary entry). N > 0: a sequence
    # scorer whose head gives N numbers per position, read at each sequence's last token: a
    # reward model has 1 (Ouyang et al., 2022), Hugging Face's LlamaForSequenceClassification.
    num_labels: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if self.head_dim_override is None and self.n_heads > 0 and self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads > 0 and self.n_heads % self.kv_heads:
            problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if self.num_labels < 0:
            problems.append(f"num_labels must be 0 (a language model) or positive (got {self.num_labels})")
        if self.num_labels and self.tie_embeddings:
            problems.append("a scoring head (num_labels > 0) cannot be tied to the embeddings")
        if self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope_scaling and self.rope_scaling.get("rope_type") not in ("llama3", "linear", "freq_factors"):
            problems.append(f"rope_scaling type {self.rope_scaling.get('rope_type')!r} is not supported "
                            "(llama3, linear, freq_factors)")
        if problems:
            raise CamelidError("model config: " + "; ".join(problems))

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // max(self.n_heads, 1)

    @property
    def ffn_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim, scaled, rounded up to multiple_of (paper section 2.2)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def num_params(self) -> int:
        """Exact parameter count (tests check it against a model built on the meta device)."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.kv_heads * hd * 2
        ffn = 3 * d * self.ffn_dim
        per_layer = attn + ffn + 2 * d
        head = 0 if self.tie_embeddings else self.head_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    @property
    def head_size(self) -> int:
        """The output head's rows: the vocabulary, or a scorer's labels."""
        return self.num_labels or self.vocab_size

    def kv_cache_bytes(self, batch: int, seq_len: int, bytes_per_value: int = 2) -> int:
        return 2 * self.n_layers * batch * seq_len * self.kv_heads * self.head_dim * bytes_per_value

    # ---- (de)serialization ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CamelidError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        missing = [n for n in ("dim", "n_layers", "n_heads") if n not in data]
        if missing:
            raise CamelidError(f"{where}: missing field(s) {missing}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _paper(dim: int, heads: int, layers: int) -> ModelConfig:
    # Table 2 of the paper; vocabulary 32000, context 2048, RMSNorm eps 1e-6.
    return ModelConfig(dim=dim, n_layers=layers, n_heads=heads, vocab_size=32000, norm_eps=1e-6,
                       max_seq_len=2048)


def _llama2(dim: int, heads: int, layers: int, kv: int | None = None,
            ffn_mult: float | None = None, multiple_of: int = 256) -> ModelConfig:
    return ModelConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, vocab_size=32000,
                       norm_eps=1e-5, max_seq_len=4096, ffn_dim_multiplier=ffn_mult,
                       multiple_of=multiple_of)


def _stories(dim: int, layers: int, heads: int, seq: int) -> ModelConfig:
    # Karpathy's llama2.c TinyStories models: multiple_of 32, eps 1e-5, Llama-2 tokenizer, the
    # output head tied to the embedding (hence "15M").
    return ModelConfig(dim=dim, n_layers=layers, n_heads=heads, vocab_size=32000,
                       multiple_of=32, norm_eps=1e-5, max_seq_len=seq, tie_embeddings=True)


SIZES: dict[str, ModelConfig] = {
    # LLaMA (Touvron et al., 2023), Table 2.
    "7B": _paper(4096, 32, 32),
    "13B": _paper(5120, 40, 40),
    "33B": _paper(6656, 52, 60),
    "65B": _paper(8192, 64, 80),
    # Later members of the family.
    "llama2-7B": _llama2(4096, 32, 32),
    "llama2-13B": _llama2(5120, 40, 40),
    "llama2-70B": _llama2(8192, 64, 80, kv=8, ffn_mult=1.3, multiple_of=4096),
    "llama3-8B": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                             ffn_dim_multiplier=1.3, multiple_of=1024, norm_eps=1e-5,
                             rope_theta=500000.0, max_seq_len=8192),
    # Llama-3.2-1B's shape (1.24B parameters, tied head), without its rope scaling: the ~1B
    # model of the GPU benchmarks.
    "llama3.2-1B": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                               hidden_dim=8192, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
                               tie_embeddings=True),
    "smollm2-135M": ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                                hidden_dim=1536, norm_eps=1e-5, rope_theta=100000.0,
                                max_seq_len=8192, tie_embeddings=True),
    "stories15M": _stories(288, 6, 6, 256),
    "stories42M": _stories(512, 8, 8, 1024),
    "stories110M": _stories(768, 12, 12, 1024),
    # Tiny shapes for tests and CPU smoke runs.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                        multiple_of=32, norm_eps=1e-5, max_seq_len=256),
    "tiny-tied": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                             multiple_of=32, norm_eps=1e-5, max_seq_len=256, tie_embeddings=True),
    "tiny-mha": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32,
                            max_seq_len=256),
}


def get_size(name: str) -> ModelConfig:
    """Look up a named size, case-insensitively ("7b", "llama2-7B", "tiny")."""
    for key, cfg in SIZES.items():
        if key.lower() == name.lower():
            return cfg
    raise CamelidError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}")
