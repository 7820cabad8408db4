"""Int8Linear and Int4Linear: drop-in replacements for a bias-free nn.Linear.

Kernels, as measured on a 2-core AVX-512 CPU with torch 2.13 (benchmarks/decode.py): PyTorch's
`_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` ran a batch-1 product 2x and 4.5x
slower than fp32, while the same product written as dequantize-multiply-sum and compiled by
inductor streams the codes at memory bandwidth. So a single-row product inside a compiled graph
(the decode step, `LLM.compile`) takes that form, which inductor fuses into one pass over the
codes; everything else (prefill, eager decode) dequantizes the layer's weight and calls the
ordinary matrix product, which is compute-bound there anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from camelid.errors import CamelidError
from camelid.quant.blocks import QuantizedTensor, dequantize_int4, dequantize_int8


class QuantizedLinear(nn.Module):
    scheme = ""

    def __init__(self, q: QuantizedTensor):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = q.group_size
        for name, t in q.buffers().items():
            self.register_buffer(name, t)

    def stored(self) -> QuantizedTensor:
        return QuantizedTensor.from_buffers(dict(self.named_buffers()))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Linear(QuantizedLinear):
    scheme = "int8"

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[-2] == 1:
            if self.group_size == self.in_features:   # one scale per output: apply it after the sum
                return (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1) * self.scales[:, 0].to(x.dtype)
            # one reduction with the scale applied inside the loop (measured faster than a sum per
            # group followed by a second, scaled sum)
            g = self.group_size
            w = self.weight.view(self.out_features, -1, g).to(x.dtype) * self.scales.to(x.dtype).unsqueeze(-1)
            return (x.unflatten(-1, (-1, g)).unsqueeze(-3) * w).sum((-1, -2))
        return F.linear(x, self.dequantize(x.dtype))


class Int4Linear(QuantizedLinear):
    scheme = "int4"

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int4(self.weight, self.scales, self.mins, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[-2] == 1:
            # One reduction over the input with each code unpacked and dequantized inside the
            # loop: a broadcast shift (0 for the low half of a group, 4 for the high half)
            # instead of a concatenation, which inductor would materialise. (Applying scale and
            # minimum per group after partial sums measured slower: two reductions.)
            half = self.group_size // 2
            packed = self.weight.view(self.out_features, -1, 1, half)                  # [out, groups, 1, g/2]
            shifts = (torch.arange(2, device=x.device, dtype=torch.uint8) * 4).view(1, 1, 2, 1)
            q = ((packed >> shifts) & 15).to(x.dtype)                                   # [out, groups, 2, g/2]
            w = q * self.scales.to(x.dtype)[..., None, None] + self.mins.to(x.dtype)[..., None, None]
            xg = x.unflatten(-1, (-1, 2, half)).unsqueeze(-4)                           # [..., 1, groups, 2, g/2]
            return (xg * w).sum((-1, -2, -3))
        return F.linear(x, self.dequantize(x.dtype))


LAYERS = {"int8": Int8Linear, "int4": Int4Linear}


def layer_for(q: QuantizedTensor) -> QuantizedLinear:
    if q.scheme not in LAYERS:
        raise CamelidError(f"unknown quantization scheme {q.scheme!r}")
    return LAYERS[q.scheme](q)
