"""Text generation: sampling (pure functions), prefill/decode with a KV cache, the LLM object."""

from camelid.generate.engine import Stats, TokenGenerator
from camelid.generate.llm import LLM, GenerationResult, TextStream
from camelid.generate.sampling import SamplingParams, sample

__all__ = ["LLM", "GenerationResult", "SamplingParams", "Stats", "TextStream", "TokenGenerator", "sample"]
