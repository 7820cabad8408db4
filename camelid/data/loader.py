"""The training loader: fixed windows of seq_len + 1 tokens cut from each source's token stream
(documents already carry BOS/EOS, so windows pack several documents), sources drawn by weight.

Every window is a pure function of (seed, draw number): the source of draw i comes from a
generator seeded by (seed, i); within a source, windows are visited in a fresh random order
every epoch. The loader's whole state is therefore a few integers (`state_dict`), restoring them
resumes exactly, and data-parallel rank r simply takes draws r, r + world, r + 2 world, ...

Ranks advance in whole rounds of `world` draws, so after every batch all ranks hold the same
state, and world ranks taking n rows each consume exactly the draws one process taking
n x world rows would: the global batch, and so the loss curve, does not depend on how many
ranks share it, and a checkpoint resumes at another world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from camelid.data.shards import Manifest
from camelid.errors import CamelidError


@dataclass
class SourceStream:
    name: str
    shards: list[np.ndarray]
    offsets: np.ndarray        # start of each shard in the concatenated stream
    windows: int               # whole windows in the stream

    def window(self, k: int, length: int) -> np.ndarray:
        start = k * length
        shard = int(np.searchsorted(self.offsets, start, side="right") - 1)
        out, need, pos = [], length, start - int(self.offsets[shard])
        while need:
            piece = self.shards[shard][pos: pos + need]
            out.append(piece)
            need -= len(piece)
            shard, pos = shard + 1, 0
        return np.concatenate(out) if len(out) > 1 else np.asarray(out[0])


class PackedLoader:
    def __init__(self, manifest: Manifest, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, weights: dict[str, float] | None = None):
        if split not in ("train", "val"):
            raise CamelidError(f"loader: split must be train or val (got {split!r})")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.streams: list[SourceStream] = []
        probs = []
        for name, src in manifest.sources.items():
            shards = [manifest.array(s) for s in getattr(src, split)]
            sizes = np.array([len(s) for s in shards], dtype=np.int64)
            total = int(sizes.sum())
            windows = total // (seq_len + 1)
            if windows == 0:
                if split == "val" and total == 0:
                    continue
                raise CamelidError(f"{manifest.directory}: source {name!r} has {total} {split} tokens, fewer than "
                                   f"one window of {seq_len + 1}; lower data.seq_len or add data")
            self.streams.append(SourceStream(name, shards, np.concatenate([[0], np.cumsum(sizes)[:-1]]), windows))
            probs.append((weights or {}).get(name, src.weight))
        if not self.streams:
            raise CamelidError(f"{manifest.directory}: no {split} data")
        self.probs = np.array(probs, dtype=np.float64) / sum(probs)
        self.cumulative = np.cumsum(self.probs)
        self.draw = 0                                   # global draw counter (all ranks)
        self.used = [0] * len(self.streams)             # windows consumed per source, all epochs
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # ---- the deterministic schedule ----------------------------------------------------------
    def source_of(self, draw: int) -> int:
        u = np.random.default_rng([self.seed, draw]).random()
        return int(min(np.searchsorted(self.cumulative, u, side="right"), len(self.streams) - 1))

    def _order(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != s}
            self._perm_cache[key] = np.random.default_rng([self.seed, s, epoch, 7]).permutation(self.streams[s].windows)
        return self._perm_cache[key]

    def _take(self) -> np.ndarray | None:
        """The next draw's window; None when the draw belongs to another rank."""
        s = self.source_of(self.draw)
        n = self.used[s]
        self.used[s] += 1
        mine = self.draw % self.world_size == self.rank
        self.draw += 1
        if not mine:
            return None
        stream = self.streams[s]
        epoch, k = divmod(n, stream.windows)
        return stream.window(int(self._order(s, epoch)[k]), self.seq_len + 1)

    def next_batch(self, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs and targets [rows, seq_len] (targets are inputs shifted by one); rows defaults
        to batch_size. Each row takes one round of world draws and keeps this rank's."""
        out = []
        while len(out) < (rows or self.batch_size):
            for _ in range(self.world_size):
                w = self._take()
                if w is not None:
                    out.append(w.astype(np.int64))
        block = torch.from_numpy(np.stack(out))
        return block[:, :-1], block[:, 1:]

    def __iter__(self):
        while True:
            yield self.next_batch()

    # ---- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"draw": self.draw, "used": list(self.used), "seed": self.seed,
                "sources": [s.name for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if state["sources"] != [s.name for s in self.streams]:
            raise CamelidError(f"loader state is for sources {state['sources']}, the data has "
                               f"{[s.name for s in self.streams]}")
        self.draw, self.used = state["draw"], list(state["used"])

    def epochs(self) -> dict[str, float]:
        return {s.name: u / s.windows for s, u in zip(self.streams, self.used)}


class SyntheticLoader:
    """Uniformly random tokens (for throughput benchmarks); same interface and exact resume.

    Row i of the stream is row i % batch_size of block i // batch_size, a block being drawn from
    a generator seeded by (seed, block): rows are dealt to data-parallel ranks in rounds as in
    PackedLoader, so a row's tokens do not depend on the number of ranks."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.draw = 0
        self._block: tuple[int, torch.Tensor] | None = None

    def _row(self, i: int) -> torch.Tensor:
        b, j = divmod(i, self.batch_size)
        if self._block is None or self._block[0] != b:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            self._block = (b, torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=g))
        return self._block[1][j]

    def next_batch(self, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        while len(out) < (rows or self.batch_size):
            for _ in range(self.world_size):
                if self.draw % self.world_size == self.rank:
                    out.append(self._row(self.draw))
                self.draw += 1
        block = torch.stack(out)
        return block[:, :-1], block[:, 1:]

    def state_dict(self) -> dict:
        return {"draw": self.draw}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints before the row-wise stream counted batches of batch_size rows
        self.draw = state["draw"] if "draw" in state else state["step"] * self.batch_size
