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


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """(cos, sin) of position * freq for positions [T] or [B, T], fp32, shaped
    [(B,) T, 1, D/2, 2] to broadcast over heads."""
    angles = positions.float().unsqueeze(-1) * inv_freq  # [(B,) T, D/2]
    return torch.stack((angles.cos(), angles.sin()), dim=-1).unsqueeze(-3)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, T, heads, D] by the angles in `rotation`,
    in fp32 as Meta does. Eagerly this is one complex multiply (Meta's formulation, and the
    fastest on CPU); inductor generates no code for complex numbers, so a compiled graph gets
    the same rotation written out in reals."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, heads, D/2, 2]
    if torch.compiler.is_compiling():
        a, b, cos, sin = pairs[..., 0], pairs[..., 1], rotation[..., 0], rotation[..., 1]
        rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    else:
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

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, cache: LayerKVCache | None,
                start: int | torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rotation), apply_rope(k, rotation)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if cache is not None:
            k, v = cache.update(start, k, v)  # [B, K, S, D]
        if T == 1 and torch.compiler.is_compiling():
            return self.wo(decode_attention(q, k, v, mask).reshape(B, 1, self.n_heads * self.head_dim))
        # Without a mask, T > 1 only happens for a prefill from position 0, where the causal
        # mask is the plain lower triangle: SDPA then skips the masked half and never
        # materialises a T x S mask (the paper's efficient causal attention).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token, written out so that a compiled decode step fuses it (an
    SDPA call per layer costs more than the arithmetic here). The query heads that share a
    key/value head are grouped instead of repeating k and v. q [B, H, 1, D] -> [B, H, D]."""
    B, H, _, D = q.shape
    K = k.shape[1]
    qg = q.view(B, K, H // K, D)                                               # [B, K, G, D]
    # products and sums rather than einsum: inductor lowers an einsum to a batched matrix
    # product call per layer, but fuses these into its own loops
    scores = (qg.float().unsqueeze(-2) * k.float().unsqueeze(2)).sum(-1) / math.sqrt(D)     # [B, K, G, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (weights.unsqueeze(-2) * v.float().transpose(-1, -2).unsqueeze(2)).sum(-1)         # [B, K, G, D]
    return out.reshape(B, H, D).type_as(q)


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
                start: int | torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rotation, cache, start, mask)
        return h + self.feed_forward(self.ffn_norm(h))


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
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, start: int | torch.Tensor = 0, mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_only) for tokens [B, T]; the arguments
        are those of `hidden`."""
        h = self.hidden(tokens, positions=positions, cache=cache, start=start, mask=mask)
        if last_only:
            h = h[:, -1:]
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection [vocab, dim] (the embedding matrix when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def hidden(self, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
               cache: KVCache | None = None, start: int | torch.Tensor = 0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states [B, T, dim] for tokens [B, T] (the input of the
        output head; training computes its loss from these without materialising logits).

        Without a cache this is the plain causal forward. With a cache, the T new tokens go into
        cache slots start..start+T-1 and attend to every slot before them. `positions` ([T] or
        [B, T]) are the RoPE positions, start.. by default; `mask` ([B or 1, 1, T, start+T],
        True = attend) replaces the causal rule, for left-padded batches. `start` may also be a
        tensor of the T slot indices (or [B, T] per-row slot indices, for continuous batching,
        see `kv_cache.py`): shapes then stay static (for torch.compile), attention
        spans the whole cache and `mask` ([B or 1, 1, T, cache length]) is required.
        """
        B, T = tokens.shape
        if isinstance(start, torch.Tensor):
            if mask is None:
                raise ValueError("a tensor `start` needs an explicit mask over the whole cache")
            positions = start if positions is None else positions
        elif positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        rotation = rope_tables(positions, rope_inv_freq(self.config, tokens.device))
        if mask is None and cache is not None and start > 0 and T > 1:  # int start
            mask = causal_mask(T, start, tokens.device)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, rotation, cache.layers[i] if cache is not None else None, start, mask)
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


def causal_mask(T: int, start: int, device: torch.device) -> torch.Tensor:
    """[T, start+T] bool: new token i (at slot start+i) sees slots 0..start+i, the cached prefix
    included (Meta's v1 mask assumed start == 0)."""
    slots = torch.arange(start + T, device=device)
    return slots.unsqueeze(0) <= (start + torch.arange(T, device=device)).unsqueeze(1)
