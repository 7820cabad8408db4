"""What generation and training plans share: sizes as people write them, and a total set
against a card.

A plan that fits to the last byte is not a plan that runs: a caching allocator fragments, so a
plan is only called comfortable when HEADROOM of the card is left over.
"""

from __future__ import annotations

import re
from dataclasses import asdict

from camelid.errors import CamelidError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.10      # below this share of the card spare, fragmentation can still end in OOM

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
          "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}


def parse_size(text: str, flag: str = "--memory") -> int:
    """Bytes in "24GB", "24GiB", "80G", "512MB", "1.5TB": GB, MB, TB and bare G/M/T are powers of
    ten (as cards and disks are sold), GiB, MiB, TiB powers of two; a plain number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).upper()
    if not match or unit not in _UNITS:
        raise CamelidError(f"{flag} {text!r}: not a size; write e.g. 24GB (10^9 bytes), 24GiB (2^30 bytes), "
                           "80G or 512MB")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_memory(text: str) -> int:
    """The card's memory (--memory): a size of more than nothing."""
    memory = parse_size(text, "--memory")
    if memory <= 0:
        raise CamelidError(f"--memory {text!r}: must be more than 0 bytes")
    return memory


def gib_bytes(gib: float) -> int:
    """Bytes in a number of GiB (2^30 bytes), as options that take GiB (camelid serve --kv-memory) read it."""
    return int(gib * 2**30)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


class Budget:
    """A plan's total set against a card: what is spare, whether it fits, and with headroom.
    Subclasses are dataclasses with a `total`; their fields named in LABELS are not byte counts."""

    LABELS: tuple[str, ...] = ()

    total: int

    def spare(self, memory: int) -> int:
        return memory - self.total

    def fits(self, memory: int) -> bool:
        return self.total <= memory

    def comfortable(self, memory: int) -> bool:
        return self.spare(memory) >= HEADROOM * memory

    def to_dict(self, memory: int | None = None) -> dict:
        d = {**asdict(self), "total": self.total}
        if memory is not None:
            d.update(fits=self.fits(memory), comfortable=self.comfortable(memory), spare=self.spare(memory))
        return {k if k in (*self.LABELS, "fits", "comfortable") else f"{k}_bytes": v for k, v in d.items()}
