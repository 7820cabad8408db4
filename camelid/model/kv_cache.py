"""A static key/value cache, allocated once by the caller for a given batch and length.

The caller sizes it for what it will actually generate (prompt + new tokens), not for the
model's maximum context: preallocating for the maximum batch and context is the classic
out-of-memory complaint about inference stacks (meta-llama/llama #67).
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
        as in gpt-fast) the whole cache comes back and the caller's mask hides unused slots."""
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


class KVCache(nn.Module):
    """One LayerKVCache per transformer block."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.batch, self.max_len = batch, max_len
        self.layers = nn.ModuleList(
            LayerKVCache(batch, max_len, config.kv_heads, config.head_dim, dtype, device)
            for _ in range(config.n_layers))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
