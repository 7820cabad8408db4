"""Which blocks of a paged KV cache (`camelid.model.PagedKVCache`) each sequence holds: a pool
of fixed-size blocks lent out and given back, with reference counts, and a prefix cache, so
that sequences starting with the same tokens (a system prompt, a chat's earlier turns,
few-shot examples) share the blocks that hold them instead of computing them again.

A full block is known by its tokens and everything before them (a key chained from the
previous block's, as vLLM's and SGLang's prefix caches do): only a block whose whole prefix
matches is reused. A block whose last holder gave it back keeps its contents and stays findable
until the pool needs it for something else; those are reclaimed least recently used first.
What a block holds depends on the weights too: a `salt` (the LoRA adapter a request runs with)
starts the chain, so that requests share blocks only with requests of the same salt.
Block 0 is never lent (it is the cache's scratch block).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Sequence

Key = tuple[int, tuple[int, ...]]   # (the previous block's key's hash, this block's tokens)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2 or block_size < 1:
            raise ValueError("a block pool needs at least 2 blocks (block 0 is scratch) of at least 1 slot")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._idle: OrderedDict[int, None] = OrderedDict()   # unheld blocks that hold a known prefix, LRU first
        self._key_of: dict[int, Key] = {}
        self._block_of: dict[Key, int] = {}
        self.queried = 0     # full blocks of the tokens given to `match` ...
        self.hits = 0        # ... and those found (hits / queried: the prefix cache's hit rate)

    @property
    def capacity(self) -> int:
        """Blocks that can be lent (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks that `allocate` can hand out now: free ones and unheld cached ones."""
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        return self.capacity - self.available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks for a caller's sole use (reference count 1), or None (nothing taken) when
        fewer are available. Free blocks go first; then cached ones, least recently used
        first, which forget the prefix they held."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._idle.popitem(last=False)
                del self._block_of[self._key_of.pop(block)]
            self.refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Give blocks back: each one's count drops, and a block nobody holds is free again, or
        stays in the prefix cache (most recently used) when it holds a known prefix."""
        for block in blocks:
            if self.refs[block] <= 0:
                raise ValueError(f"block {block} is given back but nobody holds it")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self._key_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)

    def match(self, tokens: Sequence[int], count: bool = True, salt: int = 0) -> list[int]:
        """The blocks holding the longest run of `tokens`' leading full blocks that the cache
        knows, each now held once more by the caller (release them with the rest). A caller that
        needs the logits after a prompt's last token passes the prompt without it, so that at
        least that token is computed, in a block of its own rather than a shared one. `count`
        False leaves the hit-rate counters alone (a second look for the same request)."""
        out: list[int] = []
        keys = self._keys(tokens, salt)
        self.queried += len(keys) if count else 0
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            self.hits += count
            if self.refs[block] == 0:
                del self._idle[block]
            self.refs[block] += 1
            out.append(block)
        return out

    def register(self, tokens: Sequence[int], blocks: Sequence[int], salt: int = 0) -> None:
        """Record that `blocks` hold `tokens` from slot 0 (their full blocks become findable by
        `match`). A prefix another block already holds keeps that block."""
        for key, block in zip(self._keys(tokens, salt), blocks):
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key

    def _keys(self, tokens: Sequence[int], salt: int) -> list[Key]:
        keys, parent = [], salt
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            key = (parent, tuple(tokens[start:start + self.block_size]))
            keys.append(key)
            parent = hash(key)
        return keys
