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
(LoRA layers, a float layer left unquantized, bfloat16 activations, a prefill)
takes the block's ordinary forward.
"""

from __future__ import annotations

import torch

from camelid.model.kv_cache import KVCache, LayerKVCache, PagedKVCache, PagedLayerKVCache
from camelid.model.transformer import Attention, FeedForward, RMSNorm, Rotary, Transformer, TransformerBlock
from camelid.quant import tiles
from camelid.quant.layers import Int4Linear, Int8Linear

PRODUCTS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


class QuantizedDecodeBlock(TransformerBlock):
    def forward(self, x: torch.Tensor, rotation: torch.Tensor, cache: LayerKVCache | None,
                positions: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        if not (torch.compiler.is_compiling() and takes_step(x, cache, positions)):
            return super().forward(x, rotation, cache, positions, mask)
        return self.step(x, rotation, cache, positions)

    def step(self, x: torch.Tensor, rotation: torch.Tensor, cache: LayerKVCache,
             positions: torch.Tensor) -> torch.Tensor:
        codes, scales, mins, groups = self.weights()
        return torch.ops.camelid.decode_block(
            x.contiguous(), self.attention_norm.weight, self.ffn_norm.weight, self.attention_norm.eps, codes, scales,
            mins, groups, True, rotation.contiguous(), cache.k, cache.v, positions.contiguous(), self.attention.n_heads,
            table_of(cache, x.size(0)))

    def weights(self) -> tuple[list, list, list, list]:
        """The products' codes, scales, minimums (int4) and group sizes, as tiles where they have them."""
        layers = [self.get_submodule(name) for name in PRODUCTS]
        int4 = isinstance(layers[0], Int4Linear)
        if tiles.has_tiles(layers[0]):
            codes, scales = [m.tile_codes for m in layers], [m.tile_scales for m in layers]
            mins = [m.tile_mins for m in layers] if int4 else []
        else:
            codes, scales = [m.weight for m in layers], [m.scales for m in layers]
            mins = [m.mins for m in layers] if int4 else []
        return codes, scales, mins, [m.group_size for m in layers]


def takes_step(x: torch.Tensor, cache, positions: torch.Tensor | None) -> bool:
    """Whether a block's input is what decode_block takes: one float32 token per row, a position
    each, a float32 cache, static or paged."""
    return (x.size(1) == 1 and positions is not None and type(cache) in (LayerKVCache, PagedLayerKVCache)
            and x.dtype == cache.k.dtype == torch.float32)


def table_of(cache: LayerKVCache | PagedLayerKVCache, rows: int) -> torch.Tensor | None:
    """A paged cache's block table for the step's rows (None for a static cache)."""
    return cache.table[:rows] if isinstance(cache, PagedLayerKVCache) else None


class DirectStep:
    """A decode step as plain calls, without a compiled graph, for a model whose every block runs
    as one kernel call: the embedding, one `decode_blocks` call for all the blocks (its weight
    lists made once, here), the final norm and the head. A graph around those calls adds only
    its own calling cost (flattening the model's tensors into its inputs, and its Python
    wrapper: about a sixth of a SmolLM2 int4 step, docs/profile-decode.md) and seconds of
    compiling."""

    def __init__(self, model: Transformer):
        self.model = model
        blocks = list(model.layers)
        weights = [block.weights() for block in blocks]
        self.norms = [n for b in blocks for n in (b.attention_norm.weight, b.ffn_norm.weight)]
        self.codes, self.scales, self.mins, self.groups = ([t for w in weights for t in w[i]] for i in range(4))
        self.eps, self.heads = blocks[0].attention_norm.eps, blocks[0].attention.n_heads

    @staticmethod
    def takes(model: torch.nn.Module) -> bool:
        return (type(model) is Transformer and len(model.layers) > 0
                and all(type(b) is QuantizedDecodeBlock for b in model.layers)
                and len({(b.attention_norm.eps, b.ffn_norm.eps, b.attention.n_heads) for b in model.layers}) == 1
                and type(model.tok_embeddings) is torch.nn.Embedding and type(model.norm) is RMSNorm)

    def suits(self, tokens: torch.Tensor, cache) -> bool:
        k = cache.layers[0].k
        return (type(cache) in (KVCache, PagedKVCache) and tokens.dim() == 2 and tokens.size(1) == 1
                and k.dtype == torch.float32 and k.device.type == "cpu")

    def __call__(self, model: Transformer, tokens: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache) -> torch.Tensor:
        """Logits [B, V] for tokens [B, 1] at positions [B, 1] (or [1, 1] for every row)."""
        m = self.model
        h = torch.ops.camelid.decode_blocks(
            m.tok_embeddings(tokens).float(), self.norms, self.eps, self.codes, self.scales, self.mins, self.groups,
            True, m.rope.rotation(positions).contiguous(), [c.k for c in cache.layers], [c.v for c in cache.layers],
            positions.contiguous(), self.heads, table_of(cache.layers[0], tokens.size(0)))
        return m.head(m.norm(h)[:, -1])


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


def use_decode_blocks(model: torch.nn.Module, copy_weights: bool = True) -> torch.nn.Module:
    """Give every block that can take it the one-call form, in place, and its products tiles
    where the CPU and their shapes take them (camelid/quant/tiles.py; without `copy_weights`,
    for a compiling process, empty ones)."""
    products = []
    for module in model.modules():
        if type(module) is TransformerBlock and fusable(module):
            module.__class__ = QuantizedDecodeBlock
            layers = [module.get_submodule(name) for name in PRODUCTS]
            if all(tiles.tileable(m) for m in layers):
                products += layers
    return tiles.use_tiles(model, products, copy_weights)
