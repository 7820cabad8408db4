"""Int8Linear and Int4Linear: drop-in replacements for a bias-free nn.Linear.

Which kernel runs depends on how many rows the product has (the measurements behind these
choices are in docs/cpu-kernels.md):

- a few rows (decode, a batch of decodes, a speculative check; CPU): camelid's kernels
  (kernels.cpp), eager or inside a compiled step. They unpack the codes in registers, which
  neither PyTorch's packed int8/int4 products nor inductor's loop over packed nibbles do well;
  int4 rounds the activations to int8 first where the CPU has VNNI byte products, as llama.cpp
  does;
- without them (no compiler) one row inside a compiled graph takes the multiply-sum form, which
  inductor turns into one reduction that reads each weight once;
- many rows (prefill, scoring): the layer's weight is dequantized (camelid's kernel on CPU) and
  multiplied by the ordinary matrix product, which is compute-bound there. On a CPU that
  multiplies bfloat16 natively (AVX512-BF16, AMX) that product runs in bfloat16: the weights
  carry 4 or 8 bits, so bfloat16's 8-bit mantissa on the activations adds little (perplexity
  table in the README).
  Scoring runs the same layers thousands of times (evaluation, a DPO reference pass): inside
  `keep_dequantized(model)` each layer keeps the weight it dequantized, up to a memory budget,
  and drops it on leaving (docs/profile-prefill.md has the measurements).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from camelid.errors import CamelidError
from camelid.platform import native_bf16
from camelid.quant import kernels
from camelid.quant.blocks import QuantizedTensor

FUSED_ROWS = 16  # up to this many rows, camelid's kernels beat dequantize + matrix product (measured)
# Elements of float weight dequantized at once in a backward pass (16 MiB in fp32): large enough
# that the products stay efficient, small next to any layer of a model worth quantizing.
CHUNK_ELEMENTS = 1 << 22


NATIVE_BF16 = native_bf16("cpu")
# Bytes of dequantized weights that `keep_dequantized` holds at most by default: all of a small
# model's (SmolLM2-135M: 270 MB in bfloat16), a few layers of a 7B one, never a surprise.
KEEP_BUDGET = 1 << 30


class QuantizedLinear(nn.Module):
    scheme = ""
    lanes = 16  # the kernels' vector width: group sizes must be multiples of it (int4: twice it)

    def __init__(self, q: QuantizedTensor):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = q.group_size
        for name, t in q.buffers().items():
            self.register_buffer(name, t)
        # built (or found built) here, eagerly, never while torch.compile traces a forward
        self.fused = self.group_size % self.lanes == 0 and kernels.available()
        self.keep = False   # set by keep_dequantized: hold the many-rows weight between calls
        self.kept: tuple[tuple, torch.Tensor] | None = None   # (what the buffers were, the weight made of them)

    def stored(self) -> QuantizedTensor:
        return QuantizedTensor.from_buffers(dict(self.named_buffers()))

    def stored_state(self) -> tuple:
        """The stored buffers (codes, scales, minimums) with their version counters: what a weight
        derived from them (kept dequantized, or tiles) was made of (`unchanged`)."""
        return tuple((b, _version(b)) for b in (self.weight, self.scales, getattr(self, "mins", None)) if b is not None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

    def use_kernels(self, x: torch.Tensor) -> bool:
        return self.fused and x.device.type == "cpu"

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.use_kernels(self.weight) and dtype in (torch.float32, torch.bfloat16):
            return torch.ops.camelid.dequantize(self.weight, self.scales, getattr(self, "mins", None),
                                                self.group_size, dtype)
        return self.stored().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return DequantizedProduct.apply(x, self)
        return self.product(x)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels(x) and x.numel() <= FUSED_ROWS * self.in_features:
            return self.few_rows(x)
        if torch.compiler.is_compiling() and x.shape[-2] == 1:
            return self.one_row_compiled(x)
        dtype = torch.bfloat16 if NATIVE_BF16 and x.device.type == "cpu" and x.dtype == torch.float32 else x.dtype
        return F.linear(x.to(dtype), self.many_rows_weight(dtype)).to(x.dtype)

    def many_rows_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight: the one kept from an earlier call while `keep` is set and the
        buffers (codes, scales, minimums) are the same tensors, unchanged since (their version
        counters), else made now. Traced code (torch.compile) always dequantizes: nothing to
        keep between calls of a graph."""
        if torch.compiler.is_compiling():
            return self.dequantize(dtype)
        state = self.stored_state()
        kept = self.kept
        if kept is not None and kept[1].dtype == dtype and unchanged(kept[0], state):
            return kept[1]
        w = self.dequantize(dtype)
        keep = self.keep and all(v is not None for _, v in state)
        self.kept = (state, w) if keep else None
        return w

    def few_rows(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def one_row_compiled(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@contextlib.contextmanager
def keep_dequantized(model: nn.Module, budget: int = KEEP_BUDGET) -> Iterator[None]:
    """Inside, the quantized layers of `model` keep the weight they dequantize for a product of
    many rows (layer by layer in the model's order, as long as the kept weights fit in `budget`
    bytes; 0 keeps nothing); on leaving, every kept weight is dropped. For runs that score many
    batches with frozen weights: a weight changed meanwhile is dequantized afresh."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    itemsize = 2 if NATIVE_BF16 else 4   # the products' dtype on CPUs (see product)
    chosen, total = [], 0
    for layer in layers:
        size = itemsize * layer.out_features * layer.in_features
        if total + size <= budget and not layer.keep:   # an enclosing keep_dequantized owns the rest
            chosen.append(layer)
            total += size
    for layer in chosen:
        layer.keep = True
    try:
        yield
    finally:
        for layer in chosen:
            layer.keep, layer.kept = False, None


def unchanged(before: tuple, now: tuple) -> bool:
    """Whether two `stored_state`s are the same tensors at the same versions (a tensor without a
    version counter, made under inference_mode, cannot be changed in place outside it)."""
    return len(before) == len(now) and all(a is b and u == v for (a, u), (b, v) in zip(before, now))


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place change), None for a tensor made
    under inference_mode, which has none: its weight is then never kept."""
    try:
        return t._version
    except RuntimeError:
        return None


class DequantizedProduct(torch.autograd.Function):
    """x -> layer(x), differentiable in x only (QLoRA's frozen base, Dettmers et al. 2023).
    Forward runs the layer's inference product and saves no tensor, where autograd through
    F.linear would keep the whole dequantized weight until backward; backward computes
    grad_x = grad_y W with W dequantized again a block of output rows at a time. The codes are
    buffers and get no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.product(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer: QuantizedLinear = ctx.layer
        g = grad.reshape(-1, layer.out_features)
        # bf16/fp16 partial products are summed in fp32: with many blocks the rounding would add up
        total = torch.zeros(g.shape[0], layer.in_features, dtype=torch.float32, device=g.device)
        step = max(1, CHUNK_ELEMENTS // layer.in_features)
        for start in range(0, layer.out_features, step):
            stop = min(start + step, layer.out_features)
            total += g[:, start:stop] @ dequantize_rows(layer, start, stop, g.dtype)
        return total.to(grad.dtype).view(*grad.shape[:-1], layer.in_features), None


def dequantize_rows(layer: QuantizedLinear, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows start..stop of the layer's weight in `dtype` (the codes and scales of a row are
    contiguous, so a block of rows is a view of the buffers)."""
    bufs = {name: b[start:stop] for name, b in layer.named_buffers()}
    if layer.use_kernels(layer.weight) and dtype in (torch.float32, torch.bfloat16):
        return torch.ops.camelid.dequantize(bufs["weight"], bufs["scales"], bufs.get("mins"), layer.group_size, dtype)
    return QuantizedTensor.from_buffers(bufs).dequantize(dtype)


class Int8Linear(QuantizedLinear):
    scheme = "int8"

    def few_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.camelid.int8_gemv(x, self.weight, self.scales, self.group_size)

    def one_row_compiled(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size == self.in_features:   # one scale per output: apply it after the sum
            return (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1) * self.scales[:, 0].to(x.dtype)
        # one reduction with the scale applied inside the loop (measured faster than a sum per
        # group followed by a second, scaled sum)
        g = self.group_size
        w = self.weight.view(self.out_features, -1, g).to(x.dtype) * self.scales.to(x.dtype).unsqueeze(-1)
        return (x.unflatten(-1, (-1, g)).unsqueeze(-3) * w).sum((-1, -2))


class Int4Linear(QuantizedLinear):
    scheme = "int4"
    lanes = 32

    def few_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.camelid.int4_gemv(x, self.weight, self.scales, self.mins, self.group_size, True)

    def one_row_compiled(self, x: torch.Tensor) -> torch.Tensor:
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


LAYERS = {"int8": Int8Linear, "int4": Int4Linear}


def layer_for(q: QuantizedTensor) -> QuantizedLinear:
    if q.scheme not in LAYERS:
        raise CamelidError(f"unknown quantization scheme {q.scheme!r}")
    return LAYERS[q.scheme](q)
