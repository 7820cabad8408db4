"""How quantized weights are stored: codes plus per-group scales (and minimums), independent of
any module. Checkpoint readers hand these to the quantized layers without a floating-point copy
of the weight; the layers and `dequantize` share the formulas here.

- int8: w = q * scale, q in -127..127, one fp32 scale per output row and group of columns
  (ggml's Q8_0 is the case group = 32 with the scale stored in fp16).
- int4: w = q * scale + min, q in 0..15, fp16 scale and minimum per group; within a group of g
  weights byte j holds weight j in its low nibble and weight j + g/2 in its high one, which is
  ggml's Q4_0/Q4_1 block layout for g = 32 (ggml `src/ggml-common.h`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("int8", "int4")


@dataclass
class QuantizedTensor:
    """A [out, in] weight as codes and group parameters, in the buffers of the matching layer."""

    scheme: str                       # "int8" | "int4"
    shape: tuple[int, int]            # the float weight's [out, in]
    group_size: int
    weight: torch.Tensor              # int8 [out, in] or uint8 [out, in / 2]
    scales: torch.Tensor              # [out, in / group]
    mins: torch.Tensor | None = None  # int4 only

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.scheme == "int8":
            return dequantize_int8(self.weight, self.scales, self.group_size, dtype)
        return dequantize_int4(self.weight, self.scales, self.mins, self.group_size, dtype)

    def buffers(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight, "scales": self.scales}
        if self.mins is not None:
            out["mins"] = self.mins
        return out

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor]) -> "QuantizedTensor":
        """The inverse of `buffers`: scheme and group size follow from the shapes."""
        weight, scales, mins = buffers["weight"], buffers["scales"], buffers.get("mins")
        out = weight.shape[0]
        columns = weight.shape[1] * (2 if mins is not None else 1)
        return cls("int4" if mins is not None else "int8", (out, columns), columns // scales.shape[1],
                   weight, scales, mins)


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> QuantizedTensor:
    out, columns = w.shape
    g = group_size or columns
    groups = w.float().view(out, -1, g)
    scales = (groups.abs().amax(-1) / 127.0).clamp(min=1e-12)
    q = torch.round(groups / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).view(out, columns)
    return QuantizedTensor("int8", (out, columns), g, q, scales)


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> QuantizedTensor:
    out, columns = w.shape
    groups = w.float().view(out, -1, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8).half()
    mins = lo.half()
    # round against the fp16 parameters actually stored, so the codes absorb their rounding
    q = torch.round((groups - mins.float().unsqueeze(-1)) / scales.float().unsqueeze(-1)).clamp(0, 15)
    return QuantizedTensor("int4", (out, columns), group_size, pack_int4(q.to(torch.uint8).view(out, columns), group_size),
                           scales, mins)


def quantize(w: torch.Tensor, scheme: str, group_size: int | None = None) -> QuantizedTensor:
    return quantize_int8(w, group_size) if scheme == "int8" else quantize_int4(w, group_size or 32)


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes [out, in] (0..15) -> bytes [out, in / 2] in the half-split group layout."""
    halves = q.view(q.shape[0], -1, 2, group_size // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(q.shape[0], -1).contiguous()


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bytes [out, in / 2] -> codes [out, groups, group_size]."""
    p = packed.view(packed.shape[0], -1, group_size // 2)
    return torch.cat((p & 15, p >> 4), dim=-1)


def dequantize_int8(weight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    out, columns = weight.shape
    w = weight.view(out, -1, group_size).to(dtype) * scales.to(dtype).unsqueeze(-1)
    return w.view(out, columns)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    q = unpack_int4(packed, group_size).to(dtype)
    w = q * scales.to(dtype).unsqueeze(-1) + mins.to(dtype).unsqueeze(-1)
    return w.view(packed.shape[0], -1)


# ---- ggml blocks (GGUF) -------------------------------------------------------------------------

def from_ggml(kind: str, rows: torch.Tensor, columns: int) -> QuantizedTensor:
    """Rows of raw ggml blocks (uint8 [out, bytes per row]) of type Q8_0, Q4_0 or Q4_1 -> the
    matching layer buffers, copying bytes, never widening to floats."""
    out = rows.shape[0]
    blocks = rows.view(out, columns // 32, -1)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)    # [out, groups]
    if kind == "Q8_0":                                                    # {d; int8 qs[32]}
        q = blocks[..., 2:34].contiguous().view(torch.int8).reshape(out, columns)
        return QuantizedTensor("int8", (out, columns), 32, q, d.float())
    if kind == "Q4_0":                                                    # {d; qs[16]}, w = (q - 8) d
        packed = blocks[..., 2:18].reshape(out, columns // 2).contiguous()
        return QuantizedTensor("int4", (out, columns), 32, packed, d, (d.float() * -8).half())
    if kind == "Q4_1":                                                    # {d; m; qs[16]}, w = q d + m
        m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
        packed = blocks[..., 4:20].reshape(out, columns // 2).contiguous()
        return QuantizedTensor("int4", (out, columns), 32, packed, d, m)
    raise ValueError(f"no direct mapping for ggml type {kind}")


GGML_DIRECT = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4"}
