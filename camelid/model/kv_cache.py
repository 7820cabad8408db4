"""A static key/value cache, allocated once by the caller for a given batch and length.

The caller sizes it for what it will actually generate (prompt + new tokens), not for the
model's maximum context: preallocating for the maximum batch and context is the classic
out-of-memory complaint about inference stacks (meta-llama/llama #67).

A server that batches requests continuously (`camelid.serve`) keeps one cache with a row per
request slot: each row sits at its own position, so a decode step writes per-row slots (a 2-D
`start`), and `view` lends out a row for a prefill, or the rows and slots in use for a step.
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

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, K, T, D] into slots start..start+T-1 and return slots 0..start+T-1.

        With `start` a tensor of slot indices [T] (the static-shape path for torch.compile,
        as in gpt-fast) the whole cache comes back and the caller's mask hides unused slots.
        With `start` [B, T], row b writes its tokens into its own slots start[b]; rows 0..B-1
        come back whole, and again the caller's mask hides what each row must not see."""
        if isinstance(start, torch.Tensor) and start.dim() == 2:
            B = k.size(0)
            rows = torch.arange(B, device=start.device).unsqueeze(1).expand_as(start)  # [B, T]
            # seen as [batch, slots, K, D], each (row, slot) pair addresses one token's K x D block
            self.k.transpose(1, 2).index_put_((rows, start), k.transpose(1, 2))
            self.v.transpose(1, 2).index_put_((rows, start), v.transpose(1, 2))
            return self.k[:B], self.v[:B]
        if isinstance(start, torch.Tensor):
            self.k.index_copy_(2, start, k)
            self.v.index_copy_(2, start, v)
            return self.k, self.v
        end = start + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache overflow: slot {end - 1} requested, cache holds {self.k.size(2)}")
        self.k[: k.size(0), :, start:end] = k
        self.v[: v.size(0), :, start:end] = v
        return self.k[: k.size(0), :, :end], self.v[: v.size(0), :, :end]

    def view(self, rows: slice, length: int) -> "LayerKVCache":
        """This cache's `rows` and first `length` slots, sharing its memory (writes land here)."""
        return LayerKVCache._over(self.k[rows, :, :length], self.v[rows, :, :length])

    @classmethod
    def _over(cls, k: torch.Tensor, v: torch.Tensor) -> "LayerKVCache":
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
        prefill writes one request's row through it with the plain int `start`, and a decode step
        reads only the slots in use instead of the whole context."""
        cache = KVCache.__new__(KVCache)
        nn.Module.__init__(cache)
        cache.batch = len(range(*rows.indices(self.batch)))
        cache.max_len = min(length, self.max_len)
        cache.layers = nn.ModuleList(layer.view(rows, length) for layer in self.layers)
        return cache

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
