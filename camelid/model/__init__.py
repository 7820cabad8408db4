"""The LLaMA model: layers, transformer and KV cache."""

from camelid.model.kv_cache import KVCache, LayerKVCache
from camelid.model.transformer import (Attention, FeedForward, RMSNorm, Rotary, RotaryTable, Transformer,
                                       TransformerBlock, rope_inv_freq)

__all__ = ["Attention", "FeedForward", "KVCache", "LayerKVCache", "RMSNorm", "Rotary", "RotaryTable", "Transformer",
           "TransformerBlock", "rope_inv_freq"]
