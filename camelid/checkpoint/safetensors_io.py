"""Safetensors files, single or sharded with a `model.safetensors.index.json`, read lazily through
memory maps and written shard by shard, atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from camelid.errors import CamelidError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsFiles:
    """name -> tensor over one or several .safetensors files, opened on first use."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.exists():
            try:
                self.file_of = {k: self.directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
            except (json.JSONDecodeError, KeyError) as e:
                raise CamelidError(f"{index}: not a valid safetensors index ({e})") from None
        elif (self.directory / SINGLE).exists():
            self.file_of = {k: self.directory / SINGLE for k in self._open(self.directory / SINGLE).keys()}
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise CamelidError(f"{self.directory}: no .safetensors weights found")
            self.file_of = {k: f for f in files for k in self._open(f).keys()}
        self._handles: dict[Path, object] = {}

    def _open(self, path: Path):
        if not path.exists():
            raise CamelidError(f"{path}: weight file listed in the index is missing; download it again")
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CamelidError(f"{path}: not a valid safetensors file ({e}); it may be truncated or corrupt") from None

    def names(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        path = self.file_of[name]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        try:
            return self._handles[path].get_tensor(name)  # type: ignore[attr-defined]
        except (SafetensorError, OSError, ValueError) as e:
            raise CamelidError(f"{path}: cannot read tensor {name} ({e}); the file may be truncated") from None

    def dtype(self) -> torch.dtype | None:
        dtypes = {self.get(n).dtype for n in list(self.file_of)[:8]}
        return dtypes.pop() if len(dtypes) == 1 else None


def save_safetensors(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                     max_shard_bytes: int = 5 * 2**30, metadata: dict[str, str] | None = None) -> None:
    """Write tensors into `directory` as model.safetensors, or as numbered shards plus an index
    when they exceed max_shard_bytes (the Hugging Face layout). `directory` is expected to be
    a fresh temporary directory that the caller renames into place."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
        total += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE), metadata=meta)
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
