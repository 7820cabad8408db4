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


# ---- paged: blocks of one pool, lent to rows through a block table --------------------------------

class PagedLayerKVCache(nn.Module):
    """One layer's share of a PagedKVCache: the pool's blocks [num_blocks, block_size, K, D] and
    the rows' block table [B, blocks] (a row's slot s lives in block table[row, s // block_size]
    at offset s % block_size). `update` is LayerKVCache's, so the model cannot tell the two apart:
    a row's keys come back in slot order, [B, K, blocks * block_size, D]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.table = table
        self.block_size = k.size(1)

    def update(self, positions: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = k.size(0), k.size(2)
        table = self.table[:B]
        prefill = positions is None
        if prefill:
            if T > table.size(1) * self.block_size:
                raise ValueError(f"KV cache overflow: {T} tokens for {table.size(1)} blocks of {self.block_size}")
            positions = torch.arange(T, device=k.device).unsqueeze(0)
        positions = positions.expand(B, T)
        blocks = table.gather(1, torch.div(positions, self.block_size, rounding_mode="floor"))
        offsets = positions % self.block_size
        self.k.index_put_((blocks, offsets), k.transpose(1, 2))
        self.v.index_put_((blocks, offsets), v.transpose(1, 2))
        keys, values = (self._rows(pool, table) for pool in (self.k, self.v))
        return (keys[:, :, :T], values[:, :, :T]) if prefill else (keys, values)

    def _rows(self, pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Each row's blocks gathered in slot order: [B, K, blocks * block_size, D]."""
        B, n = table.shape
        return pool[table].view(B, n * self.block_size, *pool.shape[2:]).transpose(1, 2)


class PagedKVCache(nn.Module):
    """A KV cache whose memory is a pool of fixed-size blocks shared by all rows: a row holds
    the blocks its table names, so memory follows what each sequence uses rather than rows x
    context, and rows may share blocks (a common prefix computed once). Block 0 is scratch: a
    table entry no block was lent to points there, and an idle row's throw-away writes land
    there. Which blocks a row gets is the caller's business (`camelid.generate.paging.BlockPool`);
    this only stores and gathers them."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, rows: int, max_blocks: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if num_blocks < 2 or block_size < 1 or rows < 1 or max_blocks < 1:
            raise ValueError("a paged cache needs at least 2 blocks (block 0 is scratch), a block size, rows and "
                             "blocks per row of at least 1")
        shape = (num_blocks, block_size, config.kv_heads, config.head_dim)
        with torch.inference_mode(False):   # a caller assigns blocks in and out of inference mode
            table = torch.zeros(rows, max_blocks, dtype=torch.long, device=device)
        self._wire([(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                    for _ in range(config.n_layers)], table)

    @property
    def batch(self) -> int:
        return self.table.size(0)

    @property
    def max_len(self) -> int:
        """The slots a row's table addresses (the model masks each row's slots beyond its position)."""
        return self.table.size(1) * self.block_size

    def assign(self, row: int, blocks: list[int]) -> None:
        """Lend `blocks` to `row`, in slot order; its other entries point at the scratch block."""
        if len(blocks) > self.table.size(1):
            raise ValueError(f"{len(blocks)} blocks for a row of at most {self.table.size(1)}")
        self.table[row] = 0
        if blocks:
            self.table[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)

    def view(self, rows: slice, length: int) -> "PagedKVCache":
        """The same pool seen by `rows` through the first blocks that hold `length` slots: a step
        gathers only the blocks in use."""
        n = min(self.table.size(1), -(-length // self.block_size))
        return PagedKVCache.over([(layer.k, layer.v) for layer in self.layers], self.table[rows, :n])

    @classmethod
    def over(cls, pools: list[tuple[torch.Tensor, torch.Tensor]], table: torch.Tensor) -> "PagedKVCache":
        """A cache over existing pools [num_blocks, block_size, K, D] (a key and a value pool per
        layer) and a block table [rows, blocks]."""
        cache = cls.__new__(cls)
        nn.Module.__init__(cache)
        cache._wire(pools, table)
        return cache

    def _wire(self, pools: list[tuple[torch.Tensor, torch.Tensor]], table: torch.Tensor) -> None:
        self.table = table
        self.layers = nn.ModuleList(PagedLayerKVCache(k, v, table) for k, v in pools)
        self.num_blocks, self.block_size = pools[0][0].shape[:2]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
