"""Token shards: flat binary files of token ids (uint16 when the vocabulary fits, else uint32),
each document written as BOS + tokens + EOS, read back through memory maps. A manifest.json
beside them lists every shard with its token and document counts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from camelid.atomic import atomic_file, write_text_atomic
from camelid.errors import CamelidError

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class Shard:
    path: str          # relative to the manifest's directory
    tokens: int
    documents: int


@dataclass
class SourceShards:
    weight: float
    train: list[Shard] = field(default_factory=list)
    val: list[Shard] = field(default_factory=list)

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in getattr(self, split))


@dataclass
class Manifest:
    vocab_size: int
    dtype: str
    tokenizer: str                      # relative path of the tokenizer directory
    bos_id: int | None
    eos_id: int | None
    sources: dict[str, SourceShards]
    directory: Path = Path(".")

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        try:
            data = json.loads(path.read_text())
            sources = {name: SourceShards(weight=s["weight"], train=[Shard(**x) for x in s["train"]],
                                          val=[Shard(**x) for x in s["val"]]) for name, s in data["sources"].items()}
            return cls(vocab_size=data["vocab_size"], dtype=data["dtype"], tokenizer=data["tokenizer"],
                       bos_id=data.get("bos_id"), eos_id=data.get("eos_id"), sources=sources, directory=path.parent)
        except FileNotFoundError:
            raise CamelidError(f"{path}: no token manifest here; run `camelid data prepare RECIPE.toml` first") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CamelidError(f"{path}: not a valid token manifest ({e})") from None

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "directory"}
        write_text_atomic(self.directory / MANIFEST, json.dumps(data, indent=2) + "\n")

    def array(self, shard: Shard) -> np.ndarray:
        path = self.directory / shard.path
        expected = shard.tokens * np.dtype(self.dtype).itemsize
        if not path.exists() or path.stat().st_size != expected:
            raise CamelidError(f"{path}: missing or wrong size (expected {expected} bytes); prepare the data again")
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(shard.tokens,))

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy in nats of the token frequency distribution: the loss of a model that knows
        only how often each token occurs."""
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for source in self.sources.values():
            for shard in getattr(source, split):
                counts += np.bincount(self.array(shard), minlength=self.vocab_size)[: self.vocab_size]
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


class ShardWriter:
    """Appends documents' token arrays to numbered shard files of at most `max_tokens` tokens."""

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, max_tokens: int, root: Path):
        self.directory, self.prefix, self.dtype, self.max_tokens, self.root = directory, prefix, dtype, max_tokens, root
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[Shard] = []
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.docs = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens.astype(self.dtype, copy=False))
        self.buffered += len(tokens)
        self.docs += 1
        if self.buffered >= self.max_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.directory / f"{self.prefix}_{len(self.shards):05d}.bin"
        with atomic_file(path) as f:
            f.write(np.concatenate(self.buffer).tobytes())  # type: ignore[attr-defined]
        self.shards.append(Shard(str(path.relative_to(self.root)), self.buffered, self.docs))
        self.buffer, self.buffered, self.docs = [], 0, 0


def table1(manifest: Manifest, budget_tokens: int) -> str:
    """Sources as in Table 1 of the paper: sampling proportion, epochs at the budget ("–" when
    the recipe sets no budget_tokens), size."""
    def epochs(share: float, tokens: int) -> str:
        return f"{share * budget_tokens / tokens:8.2f}" if tokens and budget_tokens else f"{'–':>8s}"

    total_weight = sum(s.weight for s in manifest.sources.values())
    lines = [f"{'Dataset':20s} {'Sampling prop.':>14s} {'Epochs':>8s} {'Tokens':>14s} {'Documents':>10s}"]
    for name, s in manifest.sources.items():
        share = s.weight / total_weight
        tokens = s.tokens("train")
        docs = sum(x.documents for x in s.train)
        lines.append(f"{name:20s} {share:14.1%} {epochs(share, tokens)} {tokens:14,d} {docs:10,d}")
    total = sum(s.tokens("train") for s in manifest.sources.values())
    lines.append(f"{'total':20s} {1:14.1%} {epochs(1.0, total)} {total:14,d}")
    if not budget_tokens:
        lines.append("Epochs: set budget_tokens (the training budget) in the recipe to see passes over each source")
    return "\n".join(lines)
