"""A static key/value cache, allocated once by the caller for a given batch and length.

The caller sizes it for what it will actually generate (prompt + new tokens), not for the
model's maximum context: preallocating for the maximum batch and context is the classic
out-of-memory complaint about inference stacks (meta-llama/llama #67).

Each row of the cache belongs to one sequence and a token's slot is its position, so rows of one
batch can sit at different positions (prompts of different lengths decoding together, a server's
requests joining and leaving). `view` lends out some rows and the first slots of the cache, in
the same memory, so a step reads only the part in use.
"""

from __future__ import annotations

import torch
from torch import nn

from camelid.config import ModelConfig


class LayerKVCache(nn.Module):
    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, K, T, D] into the slots `positions` [B, T] (or [1, T] for every row) and
        return the whole cache of rows 0..B-1, for the caller's mask to pick from. Without
        positions the tokens go into slots 0..T-1 and only those come back (a prefill)."""
        B, T = k.size(0), k.size(2)
        if positions is None:
            if T > self.k.size(2):
                raise ValueError(f"KV cache overflow: {T} tokens for a cache of {self.k.size(2)} slots")
            self.k[:B, :, :T] = k
            self.v[:B, :, :T] = v
            return self.k[:B, :, :T], self.v[:B, :, :T]
        positions = positions.expand(B, T)
        rows = torch.arange(B, device=positions.device).unsqueeze(1).expand(B, T)
        # seen as [batch, slots, K, D], each (row, slot) pair addresses one token's K x D block
        self.k.transpose(1, 2).index_put_((rows, positions), k.transpose(1, 2))
        self.v.transpose(1, 2).index_put_((rows, positions), v.transpose(1, 2))
        return self.k[:B], self.v[:B]

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> "LayerKVCache":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.register_buffer("k", k, persistent=False)
        layer.register_buffer("v", v, persistent=False)
        return layer


class KVCache(nn.Module):
    """One LayerKVCache per transformer block."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.batch, self.max_len = batch, max_len
        self.layers = nn.ModuleList(
            LayerKVCache(batch, max_len, config.kv_heads, config.head_dim, dtype, device)
            for _ in range(config.n_layers))

    def view(self, rows: slice, length: int) -> "KVCache":
        """The same memory seen as `rows` (a slice of the batch) and the first `length` slots: a
        prefill writes one request's row through it, and a decode step reads only the slots in
        use instead of the whole context."""
        return KVCache.over([(layer.k[rows, :, :length], layer.v[rows, :, :length]) for layer in self.layers])

    @classmethod
    def over(cls, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> "KVCache":
        """A cache over existing key and value tensors [B, K, S, D], one pair per layer."""
        cache = cls.__new__(cls)
        nn.Module.__init__(cache)
        cache.batch, _, cache.max_len, _ = tensors[0][0].shape
        cache.layers = nn.ModuleList(LayerKVCache.over(k, v) for k, v in tensors)
        return cache

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
