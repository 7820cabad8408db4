"""What every reader returns.

A reader opens the files lazily (mmap) and returns a `Checkpoint`: the config, the tokenizer and
a `read(name)` that yields one tensor at a time in camelid's names and q/k layout, checked
against the shapes the config implies as it is read (`camelid.checkpoint.build` turns them into
a model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from tqdm import tqdm

from camelid.checkpoint.names import expected_shapes
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.quant.blocks import QuantizedTensor
from camelid.tokenizer import Tokenizer

# Buffers that some checkpoints carry but that are derived, not learned (Meta's rope.freqs).
IGNORED = ("rope.freqs",)

Shaped = TypeVar("Shaped", torch.Tensor, QuantizedTensor)


@dataclass
class Checkpoint:
    path: Path
    format: str                             # "gguf" | "hf" | "meta" | "camelid"
    config: ModelConfig
    tokenizer: Tokenizer | None
    names: list[str]                        # camelid weight names present in the files
    read: Callable[[str], torch.Tensor]     # one weight, camelid layout, stored dtype (dequantized)
    dtype: torch.dtype | None = None        # the stored dtype when all matrices share one
    details: dict[str, Any] = field(default_factory=dict)
    where: Callable[[str], str] = str       # which file holds a weight, for error messages
    # a weight as stored codes and scales, where the file holds it in a layout camelid's
    # quantized layers use as is (GGUF Q8_0/Q4_0/Q4_1, quantized camelid checkpoints); else None
    read_quantized: Callable[[str], QuantizedTensor | None] = lambda name: None

    def check(self) -> None:
        """Missing, unexpected and mis-shaped weights, all reported at once."""
        want = expected_shapes(self.config)
        have = [n for n in self.names if n not in IGNORED]
        missing = [n for n in want if n not in have]
        unexpected = [n for n in have if n not in want]
        problems = []
        if missing:
            problems.append(f"missing weights {_brief(missing)}")
        if unexpected:
            problems.append(f"unexpected weights {_brief(unexpected)}")
        if problems:
            raise CamelidError(f"{self.path}: " + "; ".join(problems) +
                               "; the checkpoint does not match its config")

    def shape_error(self, name: str, got, want) -> CamelidError:
        return CamelidError(f"{self.where(name)}: weight {name} has shape {list(got)} but the config implies "
                            f"{list(want)}{self.details.get('shape_hint', '')}")

    def weights(self, desc: str = "", progress: bool = False) -> Iterator[tuple[str, tuple[int, ...]]]:
        """After `check`: each weight of the config that the files hold, in file order, with the
        shape the config implies (hand both to `checked`); a progress bar over them."""
        self.check()
        want = expected_shapes(self.config)
        names = [n for n in self.names if n in want]
        for name in tqdm(names, desc=desc or f"loading {self.path.name}", unit="tensor", disable=not progress,
                         leave=False):
            yield name, want[name]

    def checked(self, name: str, weight: Shaped, shape: tuple[int, ...]) -> Shaped:
        """`weight` (a tensor, or stored codes) if it has the `shape` the config implies, else
        the error that names its file."""
        if tuple(weight.shape) != shape:
            raise self.shape_error(name, weight.shape, shape)
        return weight

    def tensors(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Validated weights one at a time, converted to dtype/device."""
        for name, shape in self.weights(progress=progress):
            t = self.checked(name, self.read(name), shape)
            yield name, t.to(device=device, dtype=dtype or t.dtype)


def _brief(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"
