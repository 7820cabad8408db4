"""The LLaMA model: layers, transformer and KV cache."""

from camelid.model.kv_cache import KVCache, LayerKVCache
from camelid.model.transformer import (Attention, FeedForward, RMSNorm, Transformer, TransformerBlock,
                                       apply_rope, causal_mask, rope_inv_freq, rope_tables)

__all__ = ["Attention", "FeedForward", "KVCache", "LayerKVCache", "RMSNorm", "Transformer",
           "TransformerBlock", "apply_rope", "causal_mask", "rope_inv_freq", "rope_tables"]
