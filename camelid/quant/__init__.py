"""Weight-only quantization as module swaps: the model code stays as it is.

- int8: one scale per output channel (or per group of columns, which is how GGUF's Q8_0 blocks
  map in unchanged);
- int4: groups of 32, 64 or 128 columns with a scale and a minimum each, two weights per byte
  (GGUF's Q4_0 and Q4_1 map in with their own scales).

Kernels, as measured on a 2-core AVX-512 CPU with torch 2.13 (benchmarks/decode.py): PyTorch's
`_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` ran a batch-1 product 2x and 4.5x
slower than fp32, while the same product written as dequantize-multiply-sum and compiled by
inductor streams the int8/int4 weights at memory bandwidth. So a single-row product inside a
compiled graph (the decode step, `LLM.compile`) takes that form; everything else (prefill,
eager decode) dequantizes the layer's weight and calls the ordinary matrix product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from camelid.errors import CamelidError

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size or in_features          # default: one scale per output channel
        groups = in_features // self.group_size
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight.view(self.out_features, -1, self.group_size).to(dtype)
        return (w * self.scales.to(dtype).unsqueeze(-1)).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[-2] == 1:
            if self.group_size == self.in_features:   # scale once per output, after the sum
                return (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1) * self.scales[:, 0].to(x.dtype)
            return (x.unsqueeze(-2) * self.dequantize(x.dtype)).sum(-1)
        return F.linear(x, self.dequantize(x.dtype))

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int | None = None) -> "Int8Linear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, group_size, device=weight.device)
        w = weight.float().view(out_features, -1, layer.group_size)
        scales = (w.abs().amax(-1) / 127.0).clamp(min=1e-12)
        layer.weight = torch.round(w / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).view(out_features, -1)
        layer.scales = scales
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int4Linear(nn.Module):
    """Asymmetric 4-bit groups: w = q * scale + min, q in 0..15. Within a group of g weights,
    byte j holds weight j in its low nibble and weight j + g/2 in its high one: ggml's Q4_0/Q4_1
    layout for g = 32, so those blocks map in byte for byte, and each half of a group is a run of
    contiguous lanes for the vectorised reduction."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 32,
                 device: torch.device | str | None = None):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise CamelidError(f"int4: {in_features} columns do not split into groups of {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("mins", torch.empty(out_features, groups, dtype=torch.float16, device=device))

    def _halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        packed = self.weight.view(self.out_features, -1, self.group_size // 2)  # [out, groups, g/2]
        return packed & 15, packed >> 4

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        lo, hi = self._halves()
        q = torch.cat((lo, hi), dim=-1).to(dtype)                                # [out, groups, g]
        w = q * self.scales.to(dtype).unsqueeze(-1) + self.mins.to(dtype).unsqueeze(-1)
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[-2] == 1:
            # One reduction over the input dimension with each code unpacked inside the loop: a
            # broadcast shift (0 for the low half of a group, 4 for the high half) instead of a
            # concatenation, which inductor would materialise.
            half = self.group_size // 2
            packed = self.weight.view(self.out_features, -1, 1, half)                # [out, groups, 1, g/2]
            shifts = (torch.arange(2, device=x.device, dtype=torch.uint8) * 4).view(1, 1, 2, 1)
            q = ((packed >> shifts) & 15).to(x.dtype)                                 # [out, groups, 2, g/2]
            w = q * self.scales.to(x.dtype)[..., None, None] + self.mins.to(x.dtype)[..., None, None]
            xg = x.unflatten(-1, (-1, 2, half)).unsqueeze(-4)                        # [..., 1, groups, 2, g/2]
            return (xg * w).sum((-1, -2, -3))
        return F.linear(x, self.dequantize(x.dtype))

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 32) -> "Int4Linear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, group_size, device=weight.device)
        w = weight.float().view(out_features, -1, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        scales = ((hi - lo) / 15.0).clamp(min=1e-8)
        q = torch.round((w - lo.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
        layer.set_codes(q.view(out_features, in_features), scales, lo)
        return layer

    def set_codes(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
        """Pack codes q [out, in] (0..15) with their group scales and minimums."""
        halves = q.view(self.out_features, -1, 2, self.group_size // 2)
        self.weight = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(self.out_features, -1).contiguous()
        self.scales = scales.to(torch.float16).contiguous()
        self.mins = mins.to(torch.float16).contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def quantized_layer(scheme: str, in_features: int, out_features: int, group_size: int | None,
                    device: torch.device | str | None = "meta") -> nn.Module:
    if scheme == "int8":
        return Int8Linear(in_features, out_features, group_size, device=device)
    if scheme == "int4":
        return Int4Linear(in_features, out_features, group_size or 32, device=device)
    raise CamelidError(f"quantize={scheme!r}: choose one of {SCHEMES}")


def linear_names(model: nn.Module) -> list[str]:
    """The weight-bearing linear layers a scheme replaces: every nn.Linear of the blocks and
    the output head (embeddings and norms stay in floating point)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def swap(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None) -> nn.Module:
    """Replace the linear layers of a loaded floating-point model in place."""
    if scheme not in SCHEMES:
        raise CamelidError(f"quantize={scheme!r}: choose one of {SCHEMES}")
    if scheme == "int4" and group_size not in (None, *GROUP_SIZES):
        raise CamelidError(f"int4 group size must be one of {GROUP_SIZES} (got {group_size})")
    cls = Int8Linear if scheme == "int8" else Int4Linear
    for name in linear_names(model):
        weight = model.get_submodule(name).weight.detach()
        swap(model, name, cls.from_float(weight, group_size) if group_size else cls.from_float(weight))
    if getattr(model, "output", 1) is None:  # a tied head gets its own quantized copy
        model.output = cls.from_float(model.tok_embeddings.weight.detach(), *([group_size] if group_size else []))
    return model
