"""Weights become a model without a second copy in memory.

Both builders create the model on the meta device and put each weight in place as it is read,
checked against the shape the config implies: `build_model` assign-loads float tensors, so peak
memory is one model plus one tensor; `build_quantized_model` quantizes each linear weight (or,
where the file already stores it as Q8_0/Q4_0/Q4_1 blocks or camelid codes, takes it over as is)
and swaps it in before the next one is read, so peak memory is the quantized model plus one
float tensor.
"""

from __future__ import annotations

import torch

from camelid.checkpoint.base import Checkpoint
from camelid.model import Transformer
from camelid.quant import check_scheme, head_scheme, linear_names, swap
from camelid.quant.blocks import QuantizedTensor, quantize
from camelid.quant.layers import layer_for


def build_model(ckpt: Checkpoint, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                progress: bool = False) -> Transformer:
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    state = dict(ckpt.tensors(dtype, device, progress))
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def stored_or_quantized(ckpt: Checkpoint, name: str, scheme: str, group_size: int | None,
                        float_weight=None) -> QuantizedTensor:
    """The weight `name` in `scheme`. A stored int4 layout is kept for int4; a stored 8-bit
    layout (Q8_0, int8) is kept for both schemes, as llama.cpp's Q4 files keep their 8-bit
    tensors: narrowing it would lose precision for no speed that matters here."""
    q = ckpt.read_quantized(name)
    if q is not None and (q.scheme == "int8" or scheme == "int4") and (
            group_size is None or q.group_size == group_size or q.scheme != scheme):
        return q
    w = float_weight() if float_weight is not None else (q.dequantize() if q is not None else ckpt.read(name))
    return quantize(w, scheme, group_size)


def build_quantized_model(ckpt: Checkpoint, scheme: str, group_size: int | None = None,
                          dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                          progress: bool = False) -> Transformer:
    check_scheme(scheme, group_size, ckpt.config.dim)
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    quantized = {f"{n}.weight" for n in linear_names(model)}
    float_state = {}
    for name, shape in ckpt.weights(f"loading {ckpt.path.name} as {scheme}", progress):
        if name in quantized:
            q = stored_or_quantized(ckpt, name, *(head_scheme(scheme, group_size) if name == "output.weight"
                                                  else (scheme, group_size)))
            swap(model, name.removesuffix(".weight"), layer_for(ckpt.checked(name, q, shape)).to(device))
        else:
            t = ckpt.checked(name, ckpt.read(name), shape)
            float_state[name] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(float_state, assign=True, strict=False)
    if model.output is None:  # tied head: its own quantized copy (stored in quantized checkpoints)
        q = ckpt.read_quantized("output.weight") or stored_or_quantized(
            ckpt, "tok_embeddings.weight", *head_scheme(scheme, group_size),
            lambda: float_state["tok_embeddings.weight"].float())
        model.output = layer_for(q).to(device)
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"quantized load left weights unset: {leftover[:4]}")
    return model.eval().requires_grad_(False)
