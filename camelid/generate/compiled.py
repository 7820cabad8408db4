"""A torch.compile'd decode step with static shapes (the gpt-fast recipe), for CPU and GPU.

Decoding one token is a chain of matrix-vector products bound by memory bandwidth. On CPU,
MKL's sgemv streams weights at about a third of this machine's bandwidth, while inductor turns
a product written as multiply-and-sum into one vectorised, parallel reduction that reads the
weight once at full speed. `GemvLinear` is a module swap that does exactly that, only inside a
compiled graph and only for single rows; everywhere else it is nn.Linear.

Shapes stay static across steps: the KV cache has a fixed length (rounded up to a bucket so
that different request lengths reuse one compiled graph), the slot index is a tensor, and the
attention mask covers the whole cache.
"""

from __future__ import annotations

import itertools
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from camelid.model import KVCache, Transformer
from camelid.quant.fuse import FuseSharedInputProducts

BUCKET = 256


class GemvLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[-2] == 1:
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return F.linear(x, self.weight)


def use_gemv_linears(model: Transformer) -> Transformer:
    """Swap every nn.Linear for a GemvLinear sharing its weight. A tied model's head becomes a
    GemvLinear over the embedding matrix too; it is set as a plain attribute, not registered as
    a submodule, so that the model's state dict keeps no separate `output.weight`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, _gemv_from(child.weight))
    if model.output is None:
        object.__setattr__(model, "output", _gemv_from(model.tok_embeddings.weight))
    return model


def _gemv_from(weight: torch.Tensor) -> GemvLinear:
    with torch.device("meta"):
        layer = GemvLinear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    return layer


def _own_code(method):
    """The bound method over a private copy of its code object. Dynamo keeps compiled graphs per
    code object and, with the module guards skipped above, would hand one decoder's graph to
    another decoder's model of a different structure (a float model's graph to an int8 one:
    KeyError 'weight'). Each decoder gets its own cache entry this way."""
    code = method.__func__.__code__
    func = types.FunctionType(code.replace(co_name=f"{code.co_name}_{next(_instances)}"), method.__func__.__globals__,
                              None, method.__func__.__defaults__, method.__func__.__closure__)
    return types.MethodType(func, method.__self__)


_instances = itertools.count()


class CompiledDecoder:
    """Owns the compiled step and the fixed-size KV cache it runs on.

    Cache lengths grow in powers of two (256, 512, ...) and a cache is reused for any shorter
    request, so a growing chat compiles a handful of shapes, not one per request. Should
    compilation fail (an unsupported platform, torch's recompile limit), decoding carries on
    eagerly with a warning."""

    def __init__(self, model: Transformer, mode: str | None = None):
        self.model = use_gemv_linears(model)
        self.cache: KVCache | None = None
        self.failed = False
        options = {
            # the model's modules do not change after compilation: skipping their guards saves
            # about a millisecond of guard checks per token on this CPU
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
            # the step's inputs have fixed shapes by construction: checking every buffer's size
            # and stride on each call costs about 0.3 ms per token for a 30-layer model
            "size_asserts": False,
            # a layer's quantized products that share an input run as one kernel call
            "post_grad_custom_post_pass": FuseSharedInputProducts(),
            # CUDA graphs replay the whole step with one launch on a GPU
            "triton.cudagraphs": mode == "reduce-overhead" or (
                mode is None and next(model.parameters()).device.type == "cuda"),
        }
        self._step = torch.compile(_own_code(self._forward), fullgraph=True, dynamic=False, options=options)

    def cache_for(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        c = self.cache
        if c is not None and c.batch == batch and c.max_len >= length and c.layers[0].k.dtype == dtype:
            return c
        size = max(BUCKET, 1 << (length - 1).bit_length())
        size = min(size, max(length, self.model.config.max_seq_len))
        self.cache = None  # one live cache: memory stays bounded
        self.cache = KVCache(self.model.config, batch, size, dtype=dtype, device=device)
        return self.cache

    def _forward(self, tokens: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.model(tokens, positions=positions, cache=cache, start=slot, mask=mask, last_only=True)

    def step(self, tokens: torch.Tensor, slot: int, positions: torch.Tensor, valid: torch.Tensor,
             cache: KVCache) -> torch.Tensor:
        """Logits [B, 1, V] for tokens [B, 1] written at cache slot `slot`; `valid` [B, S] marks the
        slots that are not padding."""
        slots = torch.arange(cache.max_len, device=tokens.device)
        mask = (valid & (slots <= slot)).unsqueeze(1).unsqueeze(1)  # [B, 1, 1, S]
        args = (tokens, torch.tensor([slot], device=tokens.device), positions, mask, cache)
        if not self.failed:
            try:
                return self._step(*args)
            except Exception as e:  # torch._dynamo / inductor errors: keep generating, eagerly
                self.failed = True
                warnings.warn(f"compiled decoding failed ({type(e).__name__}: {str(e)[:200]}); "
                              "continuing without compilation", stacklevel=2)
        return self._forward(*args)
