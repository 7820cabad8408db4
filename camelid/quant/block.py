"""A quantized transformer block as one kernel call, for the compiled decode step.

Decoding one token runs each block as a dozen small operations (two norms, four products,
RoPE, the cache write, attention, SwiGLU, two residuals). In a compiled step each is a call from
inductor's Python wrapper, and on a small model those calls' fixed costs, not the products,
were the largest share of a step outside them; the attention also read every slot of the
static cache rather than the slots up to each row's position (docs/profile-decode.md has the
profile before and after). `camelid::decode_block` (kernels.cpp) does the whole block in one
call with the same math. The compiled decoder swaps it in, as it swaps in the other layers for
inductor (`camelid.model.inductor`): only the class of a block changes, and only where every
product of the block runs on camelid's kernels with one scheme; anything else
(LoRA layers, a float layer left unquantized, a paged cache, bfloat16 activations, a prefill)
takes the block's ordinary forward.
"""

from __future__ import annotations

import torch

from camelid.model.kv_cache import LayerKVCache
from camelid.model.transformer import Attention, FeedForward, Rotary, TransformerBlock
from camelid.quant import tiles
from camelid.quant.layers import Int4Linear, Int8Linear

PRODUCTS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


class QuantizedDecodeBlock(TransformerBlock):
    def forward(self, x: torch.Tensor, rotation: torch.Tensor, cache: LayerKVCache | None,
                positions: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        if not (torch.compiler.is_compiling() and x.size(1) == 1 and positions is not None
                and type(cache) is LayerKVCache and x.dtype == cache.k.dtype == torch.float32):
            return super().forward(x, rotation, cache, positions, mask)
        layers = [self.get_submodule(name) for name in PRODUCTS]
        int4 = isinstance(layers[0], Int4Linear)
        if tiles.has_tiles(layers[0]):
            codes, scales = [m.tile_codes for m in layers], [m.tile_scales for m in layers]
            mins = [m.tile_mins for m in layers] if int4 else []
        else:
            codes, scales = [m.weight for m in layers], [m.scales for m in layers]
            mins = [m.mins for m in layers] if int4 else []
        return torch.ops.camelid.decode_block(
            x.contiguous(), self.attention_norm.weight, self.ffn_norm.weight, self.attention_norm.eps, codes, scales,
            mins, [m.group_size for m in layers], True, rotation.contiguous(), cache.k, cache.v, positions.contiguous(),
            self.attention.n_heads)


def fusable(block: torch.nn.Module) -> bool:
    """Whether `block` is a plain LLaMA block whose products all run on camelid's kernels (one
    scheme; one group size among the products that share an input) with float32 norms."""
    if not isinstance(block, TransformerBlock) or not isinstance(block.attention, Attention) \
            or not isinstance(block.feed_forward, FeedForward) or not isinstance(block.attention.rotary, Rotary):
        return False
    layers = [block.get_submodule(name) for name in PRODUCTS]
    kinds = {type(m) for m in layers}
    return (len(kinds) == 1 and kinds <= {Int4Linear, Int8Linear} and all(m.fused for m in layers)
            and len({m.group_size for m in layers[:3]}) == len({m.group_size for m in layers[4:6]}) == 1
            and block.attention_norm.weight.dtype == block.ffn_norm.weight.dtype == torch.float32)


def use_decode_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Give every block that can take it the one-call form, in place, and its products tiles
    where the CPU and their shapes take them (camelid/quant/tiles.py)."""
    products = []
    for module in model.modules():
        if type(module) is TransformerBlock and fusable(module):
            module.__class__ = QuantizedDecodeBlock
            layers = [module.get_submodule(name) for name in PRODUCTS]
            if all(tiles.tileable(m) for m in layers):
                products += layers
    return tiles.use_tiles(model, products)
