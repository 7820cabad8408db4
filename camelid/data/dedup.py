"""Deduplication stages, each in two passes over a source (observe every document, then filter):

- exact document dedup: keep the first copy of each document (hash of the normalised text);
- line-level dedup (CCNet, Wenzek et al., 2020): drop lines that occur in several documents;
- near-duplicate removal with MinHash LSH (the paper: books sharing more than 90% content).

Exact and line hashes are spilled to on-disk shards by hash value and resolved one shard at a
time, so memory stays bounded however large the corpus is. The MinHash LSH index is in memory
(datasketch can keep it in Redis or Cassandra for corpora beyond one machine).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camelid.data.filters import Drop


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class HashShards:
    """(hash, document index) pairs spilled to `n` files by hash; read back one shard at a time."""

    def __init__(self, directory: Path, n: int = 16, buffer: int = 1 << 16):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.n, self.buffer = n, buffer
        self.pending: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        for k in range(n):
            (self.directory / f"{k:03d}.bin").write_bytes(b"")

    def add(self, h: int, doc: int) -> None:
        bucket = self.pending[h % self.n]
        bucket.append((h, doc))
        if len(bucket) >= self.buffer:
            self._flush(h % self.n)

    def _flush(self, k: int) -> None:
        if self.pending[k]:
            with open(self.directory / f"{k:03d}.bin", "ab") as f:
                f.write(np.array(self.pending[k], dtype=np.uint64).tobytes())
            self.pending[k] = []

    def shards(self):
        """Yield (hashes, docs) arrays, one shard at a time."""
        for k in range(self.n):
            self._flush(k)
            pairs = np.fromfile(self.directory / f"{k:03d}.bin", dtype=np.uint64).reshape(-1, 2)
            yield pairs[:, 0], pairs[:, 1]


# ---- exact documents -------------------------------------------------------------------------------

@dataclass
class ExactDedupConfig:
    normalize: bool = True   # compare lower-cased text with collapsed whitespace
    shards: int = 16


def _squash(text: str) -> str:
    return " ".join(text.lower().split())


class ExactDedup:
    def __init__(self, cfg: ExactDedupConfig, workdir: Path):
        self.cfg = cfg
        self.table = HashShards(workdir / "exact", cfg.shards)
        self.drop: np.ndarray = np.empty(0, dtype=np.uint64)

    def observe(self, index: int, text: str) -> None:
        self.table.add(hash64(_squash(text) if self.cfg.normalize else text), index)

    def finish(self) -> None:
        drops = []
        for hashes, docs in self.table.shards():
            if not len(hashes):
                continue
            order = np.lexsort((docs, hashes))          # by hash, then by document
            h, d = hashes[order], docs[order]
            repeat = np.concatenate([[False], h[1:] == h[:-1]])
            drops.append(d[repeat])                      # every copy after the first
        self.drop = np.sort(np.concatenate(drops)) if drops else self.drop

    def __call__(self, index: int, text: str) -> str | Drop:
        i = np.searchsorted(self.drop, index)
        return Drop("duplicate") if i < len(self.drop) and self.drop[i] == index else text


# ---- lines -------------------------------------------------------------------------------------------

@dataclass
class LineDedupConfig:
    min_documents: int = 2        # a line seen in this many documents is a duplicate
    keep_first: bool = False      # CCNet removes every copy (boilerplate); True keeps the first
    min_line_chars: int = 0       # shorter lines are never touched
    shards: int = 16


_DIGITS = re.compile(r"\d")


def line_key(line: str) -> str:
    """CCNet's normalisation before hashing: lower case, digits to 0, spaces collapsed."""
    return _DIGITS.sub("0", " ".join(line.lower().split()))


class LineDedup:
    def __init__(self, cfg: LineDedupConfig, workdir: Path):
        self.cfg = cfg
        self.table = HashShards(workdir / "lines", cfg.shards)
        self.dup_hashes = np.empty(0, dtype=np.uint64)
        self.first_doc = np.empty(0, dtype=np.uint64)

    def _keys(self, text: str):
        for line in text.split("\n"):
            if len(line.strip()) >= max(self.cfg.min_line_chars, 1):
                yield line, hash64(line_key(line))

    def observe(self, index: int, text: str) -> None:
        for h in {h for _, h in self._keys(text)}:   # count documents, not occurrences
            self.table.add(h, index)

    def finish(self) -> None:
        hashes_out, first_out = [], []
        for hashes, docs in self.table.shards():
            if not len(hashes):
                continue
            order = np.lexsort((docs, hashes))
            h, d = hashes[order], docs[order]
            unique, start, counts = np.unique(h, return_index=True, return_counts=True)
            dup = counts >= self.cfg.min_documents
            hashes_out.append(unique[dup])
            first_out.append(d[start[dup]])
        if hashes_out:
            h, f = np.concatenate(hashes_out), np.concatenate(first_out)
            order = np.argsort(h)
            self.dup_hashes, self.first_doc = h[order], f[order]

    def __call__(self, index: int, text: str) -> str | Drop:
        kept = []
        for line in text.split("\n"):
            if len(line.strip()) >= max(self.cfg.min_line_chars, 1):
                h = hash64(line_key(line))
                i = np.searchsorted(self.dup_hashes, h)
                if i < len(self.dup_hashes) and self.dup_hashes[i] == h and \
                        not (self.cfg.keep_first and self.first_doc[i] == index):
                    continue
            kept.append(line)
        text = "\n".join(kept)
        return text if text.strip() else Drop("all_lines_duplicate")


# ---- near duplicates -----------------------------------------------------------------------------------

@dataclass
class NearDedupConfig:
    threshold: float = 0.9        # estimated Jaccard similarity of word n-gram sets
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1


class NearDedup:
    """Greedy MinHash LSH: a document whose signature matches an earlier kept document at the
    threshold or above is dropped."""

    def __init__(self, cfg: NearDedupConfig, workdir: Path | None = None):
        from datasketch import MinHashLSH

        self.cfg = cfg
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        self.duplicates: set[int] = set()
        self._hashes = {}

    def signature(self, text: str):
        from datasketch import MinHash

        words = text.lower().split()
        n = self.cfg.ngram
        grams = {" ".join(words[i:i + n]).encode() for i in range(max(len(words) - n + 1, 1))}
        m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed)
        m.update_batch(list(grams))
        return m

    def observe(self, index: int, text: str) -> None:
        m = self.signature(text)
        for other in self.lsh.query(m):
            if m.jaccard(self._hashes[other]) >= self.cfg.threshold:
                self.duplicates.add(index)
                return
        self.lsh.insert(index, m)
        self._hashes[index] = m

    def finish(self) -> None:
        self._hashes.clear()

    def __call__(self, index: int, text: str) -> str | Drop:
        return Drop("near_duplicate") if index in self.duplicates else text
