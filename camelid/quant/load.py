"""Load a checkpoint straight into a quantized model, one tensor at a time.

The model is built on the meta device; each linear weight is read, quantized (or, where the file
already stores it as Q8_0/Q4_0/Q4_1 blocks or camelid codes, taken over as is) and swapped in
before the next one is read, so peak memory is the quantized model plus one float tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from camelid.checkpoint import Checkpoint
from camelid.checkpoint.names import expected_shapes
from camelid.errors import CamelidError
from camelid.model import Transformer
from camelid.quant import check_scheme, head_scheme, linear_names, swap
from camelid.quant.blocks import QuantizedTensor, quantize
from camelid.quant.layers import QuantizedLinear, layer_for


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
    ckpt.check()
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    quantized = {f"{n}.weight" for n in linear_names(model)}
    want = expected_shapes(ckpt.config)
    float_state = {}
    bar = tqdm([n for n in ckpt.names if n in want], desc=f"loading {ckpt.path.name} as {scheme}",
               unit="tensor", disable=not progress, leave=False)
    for name in bar:
        if name in quantized:
            q = stored_or_quantized(ckpt, name, *(head_scheme(scheme, group_size) if name == "output.weight"
                                                  else (scheme, group_size)))
            if q.shape != want[name]:
                raise ckpt.shape_error(name, q.shape, want[name])
            swap(model, name.removesuffix(".weight"), layer_for(q).to(device))
        else:
            t = ckpt.read(name)
            if tuple(t.shape) != want[name]:
                raise ckpt.shape_error(name, t.shape, want[name])
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



def save_quantized(model: Transformer, tokenizer, dst, overwrite: bool = False) -> None:
    """Write a quantized model as a camelid checkpoint directory (atomically) that
    `camelid.load` reads back quantized, byte for byte."""
    from camelid.atomic import atomic_dir
    from camelid.checkpoint.native import write_native

    schemes = sorted({m.scheme for m in model.modules() if isinstance(m, QuantizedLinear)})
    if not schemes:
        raise CamelidError("save_quantized: the model has no quantized layers; use camelid convert for float models")
    groups = sorted({m.group_size for m in model.modules() if isinstance(m, QuantizedLinear)})
    # the main scheme: int4 when any layer is int4 (its 8-bit tensors were kept from the source)
    info = {"scheme": schemes[-1] if "int4" not in schemes else "int4", "layers": schemes, "group_sizes": groups}
    with atomic_dir(Path(dst), overwrite=overwrite) as tmp:
        write_native(tmp, model.config, tokenizer, model.state_dict().items(), extra={"quantization": info})
