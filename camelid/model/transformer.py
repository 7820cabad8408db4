"""The LLaMA transformer, leaf to root (Touvron et al., 2023, section 2.2).

Pre-norm RMSNorm, rotary position embeddings on adjacent pairs (Meta's convention; Hugging Face
checkpoints are permuted on the way in and out), grouped-query attention through
`scaled_dot_product_attention`, SwiGLU feed-forward, no biases.

The model knows nothing about devices, dtypes, parallelism, optimizers or file formats. It is
built on the meta device and then either initialised (`init_weights`) or assign-loaded by
`camelid.checkpoint`. Weight names are Meta's (`layers.0.attention.wq.weight`, ...).

Shapes: B batch, T new tokens, S keys (cached + new), H query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from camelid.config import ModelConfig
from camelid.model.kv_cache import KVCache, LayerKVCache


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019), computed in fp32 and cast back before the gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ---- rotary position embeddings (Su et al., 2021) -------------------------------------------

def rope_inv_freq(config: ModelConfig, device: torch.device) -> torch.Tensor:
    """1 / theta^(2i/D) in fp32, rescaled when the config carries `rope_scaling`:
    "llama3" (Llama-3.1's smooth long-context scaling), "linear" (position interpolation), or
    explicit per-frequency divisors (GGUF's `rope_freqs` tensor)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    s = config.rope_scaling
    if not s:
        return inv_freq
    kind = s.get("rope_type")
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "freq_factors":
        return inv_freq / torch.tensor(s["factors"], device=device, dtype=torch.float32)
    if kind == "llama3":
        old_len, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
        return torch.where(wavelen < old_len / high, inv_freq,
                           torch.where(wavelen > old_len / low, inv_freq / s["factor"], blended))
    raise ValueError(f"unknown rope_scaling type {kind!r}")


class RotaryTable:
    """cos and sin of position x frequency, fp32, [positions, D/2, 2]: computed once per device
    for the model's context (or longer, when asked) and looked up by position afterwards, rather
    than recomputed in every forward. Not a buffer: derived, never saved, and free of the meta
    device that models are built on."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.tables: dict[torch.device, torch.Tensor] = {}

    def table(self, device: torch.device, length: int = 0) -> torch.Tensor:
        t = self.tables.get(device)
        if t is None or t.size(0) < length:
            n = max(length, self.config.max_seq_len)
            # an ordinary tensor even when first asked for under inference_mode, so that training
            # can save it for backward later
            with torch.inference_mode(False), torch.no_grad():
                angles = torch.arange(n, device=device, dtype=torch.float32).unsqueeze(-1) * rope_inv_freq(
                    self.config, device)
                t = self.tables[device] = torch.stack((angles.cos(), angles.sin()), dim=-1)
        return t

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotation for `positions` ([T] or [B, T]), shaped [(B,) T, 1, D/2, 2] to broadcast
        over heads."""
        return self.table(positions.device)[positions].unsqueeze(-3)


class Rotary(nn.Module):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, T, heads, D] by the angles of `rotation`,
    in fp32 as Meta does: one complex multiply, Meta's formulation and the fastest eagerly on CPU.
    (Inductor generates no code for complex numbers: `camelid.model.inductor` swaps in the same
    rotation written in reals for compiled graphs.)"""

    def forward(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, heads, D/2, 2]
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotation))
        return rotated.flatten(-2).type_as(x)


# ---- attention and feed-forward ---------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.rotary = Rotary()

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, cache: LayerKVCache | None,
                positions: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = self.rotary(q, rotation), self.rotary(k, rotation)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if cache is not None:
            k, v = cache.update(positions, k, v)  # [B, K, S, D]
        y = self.attend(q, k, v, mask)                                       # [B, H, T, D]
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # Without a mask the T queries sit at positions 0..T-1 over the same T keys: the causal
        # mask is the plain lower triangle, which SDPA skips without ever materialising a T x T
        # mask (the paper's efficient causal attention).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.size(2) > 1,
                                              enable_gqa=self.n_heads != self.n_kv_heads)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, cache: LayerKVCache | None,
                positions: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rotation, cache, positions, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """The boolean attention mask [B, 1, T, T] of packed rows: causal, and within the document
    (documents [B, T], an id per token) only. The diagonal is always allowed, so no query row
    is fully masked (which would make SDPA's softmax NaN)."""
    T = documents.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    same = documents.unsqueeze(-1) == documents.unsqueeze(-2)            # [B, T, T]
    return (same & causal).unsqueeze(1)


# ---- the whole model ----------------------------------------------------------------------------

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Tied models (SmolLM2, Llama-3.2) reuse the embedding matrix as the output head and have
        # no `output` weight at all, so assign-loading cannot untie them.
        # A scorer (config.num_labels, a reward model) has a head of num_labels rows instead.
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.head_size, bias=False)
        self.rope = RotaryTable(config)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, documents: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T]; the arguments are those of `hidden`."""
        return self.head(self.hidden(tokens, positions, cache, documents))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The output projection of hidden states [..., dim] to logits [..., vocab] (a scorer's
        [..., num_labels])."""
        return F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection [vocab, dim] (the embedding matrix when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
               cache: KVCache | None = None, documents: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states [B, T, dim] for tokens [B, T] (the input of the
        output head; training computes its loss from these without materialising logits).

        `positions` [B, T] (or [1, T] for every row) says where each token sits: its RoPE
        position and, with a cache, the slot its key and value are written to; a token sees
        the cache slots up to its own position (earlier tokens, and the chunk's own tokens
        before it). None means 0..T-1 in every row: the plain causal forward, and with a cache
        a prefill into slots 0..T-1. Rows of a batch may sit at different positions (prompts of
        different lengths decoding together); whatever a row holds in slots beyond its position
        is never seen, so stale slots need no clearing.

        `documents` [B, T] (training only, no cache) packs several examples into a row: token i
        sees token j <= i only where documents[b, i] == documents[b, j], a block-diagonal causal
        mask, so packed examples never attend to one another; `positions` then restart at 0 for
        every example.
        """
        B, T = tokens.shape
        mask = None
        if positions is not None and (positions.dim() != 2 or positions.size(-1) != T):
            raise ValueError(f"positions must be [B, {T}] or [1, {T}] for tokens {list(tokens.shape)} "
                             f"(got {list(positions.shape)})")
        if documents is not None:
            if cache is not None or documents.shape != tokens.shape:
                raise ValueError(f"documents must be [B, T] like tokens {list(tokens.shape)}, without a cache "
                                 f"(got {list(documents.shape)})")
            mask = document_mask(documents)
        if positions is None:
            rotation = self.rope.table(tokens.device, T)[:T].unsqueeze(-3)
        else:
            rotation = self.rope.rotation(positions)
            if cache is not None:
                slots = torch.arange(cache.max_len, device=tokens.device)
                mask = (slots <= positions.unsqueeze(-1)).unsqueeze(1)  # [B or 1, 1, T, S]
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, rotation, cache.layers[i] if cache is not None else None, positions, mask)
        return self.norm(h)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Fresh weights after `to_empty`: N(0, std) everywhere, the residual output projections
        (wo, w2) scaled by 1/sqrt(2 * n_layers) as in GPT-2, RMSNorm gains at one."""
        gen = torch.Generator(device=self.tok_embeddings.weight.device)
        if seed is not None:
            gen.manual_seed(seed)
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight")):
                p.normal_(0.0, residual_std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)

