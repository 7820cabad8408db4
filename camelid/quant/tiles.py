"""Quantized weights as tiles of 16 output rows: the layout camelid's decode kernels read on CPUs
with AVX-512 VNNI.

Decoding one token reads every weight once, so a product's speed is how few instructions each
code costs. Stored as the layers keep them (a row's codes together, GGUF's block order), each row
ends in a horizontal sum and applies its groups' scales itself; interleaving 16 rows, four code
bytes of each per 64-byte line, lets one byte product serve 16 outputs at once with a group's
scales one vector for all of them (llama.cpp's repacked Q4_0/Q8_0 formats do the same;
`kernels.cpp` has the layout and docs/profile-decode.md the measurements). Products on tiles
round the activations to int8 in blocks of 32, as the int4 kernels already did; for int8
weights that is new (the stored layout's kernel keeps float activations) and is what llama.cpp
does for Q8_0: each activation moves by at most 1/254 of its block's largest, and SmolLM2's
greedy tokens stayed those of transformers (`benchmarks/decode.py`).

The tiles are a copy made for the compiled decoder (its copy of the model holds them as
buffers, beside the stored codes that prefill, saving, dequantization and LoRA read), so a
decoded model holds its quantized weights twice. A layer's tiles remember the buffers they were
made from and their versions: `stale` tells when the stored codes were changed in place (or
replaced) since, which the generation engine checks as each generation starts
(`CompiledDecoder.matches`); a server's running batcher keeps the tiles it started with.
"""

from __future__ import annotations

import torch
from torch import nn

from camelid.quant import kernels
from camelid.quant.layers import Int4Linear, Int8Linear, QuantizedLinear, unchanged

NAMES = ("tile_codes", "tile_scales", "tile_mins")


def available() -> bool:
    return kernels.available() and torch.ops.camelid.has_tiles()


def tileable(layer: nn.Module) -> bool:
    """Whether `layer` is a quantized layer whose shape the tile kernels take: whole tiles of 16
    outputs; int8 groups of a multiple of 32 columns (GGUF's 32, camelid's per channel), int4
    groups of 32 or a multiple of 64 (each run of a group's lines then meets whole blocks of 32
    activations)."""
    if not (isinstance(layer, (Int4Linear, Int8Linear)) and layer.fused and layer.out_features % 16 == 0
            and layer.weight.device.type == "cpu"):
        return False
    g = layer.group_size
    return g % 32 == 0 if isinstance(layer, Int8Linear) else (g == 32 or g % 64 == 0)


def tile(layer: QuantizedLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes, scales, mins) as tiles: codes [out/16, bytes per row / 4, 16, 4] uint8 (int8's with
    the sign bit flipped, that is plus 128), scales and mins [out/16, groups, 16] in float16 (int4;
    int8 where its float32 scales are exact in float16, as Q8_0's are) or float32."""
    out = layer.out_features
    codes = layer.weight
    if isinstance(layer, Int8Linear):
        codes = codes.view(torch.uint8) ^ 0x80
    tiles = codes.reshape(out // 16, 16, -1, 4).transpose(1, 2).contiguous()

    def per_tile(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(out // 16, 16, -1).transpose(1, 2).contiguous()

    mins = getattr(layer, "mins", None)
    return tiles, per_tile(layer.scales.to(scales_dtype(layer))), None if mins is None else per_tile(mins)


def scales_dtype(layer: QuantizedLinear) -> torch.dtype:
    """The dtype of the tiles' scales: float16 where the layer's scales are exactly float16
    values (int4's always; int8 from GGUF's Q8_0), which halves what the kernels read besides the
    codes, else the layer's own. A model skeleton (compiled in another process, its values
    unknown) carries the choice made on the real weights (`record_scales_dtypes`)."""
    recorded = getattr(layer, "tile_scales_dtype", None)
    if recorded is not None:
        return recorded
    s = layer.scales
    return torch.float16 if s.dtype == torch.float32 and torch.equal(s.half().float(), s) else s.dtype


def record_scales_dtypes(model: nn.Module, skeleton: nn.Module) -> None:
    """Note on `skeleton` (a copy of `model`'s structure) each tileable layer's `scales_dtype`."""
    for m, k in zip(model.modules(), skeleton.modules()):
        if isinstance(m, QuantizedLinear) and tileable(m):
            k.tile_scales_dtype = scales_dtype(m)


def add_tiles(layers: list[QuantizedLinear], copy: bool = True) -> None:
    """Give each layer its tiles as buffers that are not saved with it, all in one allocation on
    huge pages where the OS gives them (`camelid::empty_huge`: the decode step streams through
    them, and 4 KiB pages slow that stream down). Tiles take the bytes of the stored buffers.
    Without `copy` (a compiling process, whose weights are never read) the tiles are empty
    tensors of the right shapes."""
    stored = [b for m in layers for b in (m.weight, m.scales, getattr(m, "mins", None)) if b is not None]
    arena = torch.ops.camelid.empty_huge(sum(_aligned(b.nbytes) for b in stored)) if copy and stored else None
    offset = 0
    for layer in layers:   # one layer's temporaries at a time
        for name, t in zip(NAMES, tile(layer) if copy else _shapes(layer)):
            if t is None:
                continue
            if arena is not None:
                t = arena[offset:offset + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
                offset += _aligned(t.nbytes)
            layer.register_buffer(name, t, persistent=False)
        layer.tiled_from = layer.stored_state() if copy else None


def _shapes(layer: QuantizedLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Uninitialised tensors shaped and typed as `tile(layer)`'s."""
    out, mins = layer.out_features, getattr(layer, "mins", None)
    codes = torch.empty(out // 16, layer.weight.nbytes // out // 4, 16, 4, dtype=torch.uint8)

    def per_tile(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(out // 16, t.shape[1], 16, dtype=dtype)

    return codes, per_tile(layer.scales, scales_dtype(layer)), None if mins is None else per_tile(mins, mins.dtype)


def _aligned(nbytes: int) -> int:
    return (nbytes + 63) // 64 * 64   # each tensor starts on a cache line


def has_tiles(layer: nn.Module) -> bool:
    return hasattr(layer, "tile_codes")


def stale(model: nn.Module) -> bool:
    """Whether any layer's stored codes, scales or minimums were changed in place, or replaced,
    since its tiles were made."""
    return any(has_tiles(m) and m.tiled_from is not None and not unchanged(m.tiled_from, m.stored_state())
               for m in model.modules())


class TiledHead:
    """A quantized layer that holds tiles (the output head of the compiled decoder's copy): its
    few-rows product (QuantizedLinear.product) reads them; anything else is the layer's own."""

    def few_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.camelid.gemv_tiles(x, self.tile_codes, self.tile_scales, getattr(self, "tile_mins", None),
                                            self.group_size)


class TiledInt8Head(TiledHead, Int8Linear):
    pass


class TiledInt4Head(TiledHead, Int4Linear):
    pass


def use_tiles(model: nn.Module, layers: list[QuantizedLinear], copy: bool = True) -> nn.Module:
    """Give `layers` (the products of the blocks that run as one call) and the model's output
    head tiles, in place, where the CPU and their shapes take them; the head also gets the
    forward that reads them. (`copy`: as add_tiles.)"""
    if not available():
        return model
    head = getattr(model, "output", None)
    heads = [head] if type(head) in (Int8Linear, Int4Linear) and tileable(head) else []
    add_tiles([m for m in layers if tileable(m)] + heads, copy)
    for h in heads:
        h.__class__ = TiledInt8Head if type(h) is Int8Linear else TiledInt4Head
    return model
