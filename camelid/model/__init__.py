"""The LLaMA model: layers, transformer and KV cache."""

from camelid.model.kv_cache import KVCache, LayerKVCache, PagedKVCache, PagedLayerKVCache
from camelid.model.transformer import (Attention, FeedForward, RMSNorm, Rotary, RotaryTable, Transformer,
                                       TransformerBlock, rope_inv_freq)

__all__ = ["Attention", "FeedForward", "KVCache", "LayerKVCache", "PagedKVCache", "PagedLayerKVCache", "RMSNorm",
           "Rotary", "RotaryTable", "Transformer", "TransformerBlock", "rope_inv_freq"]
