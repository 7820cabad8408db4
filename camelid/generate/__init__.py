"""Text generation: sampling (pure functions), the generation core (prefill and decode over a
static KV cache, compiled steps), the LLM object (generate, stream, chat)."""

from camelid.generate.core import Engine, activation_dtype
from camelid.generate.engine import Stats, TokenGenerator
from camelid.generate.llm import LLM, GenerationResult, TextStream
from camelid.generate.sampling import SamplingParams, sample

__all__ = ["LLM", "Engine", "GenerationResult", "SamplingParams", "Stats", "TextStream", "TokenGenerator",
           "activation_dtype", "sample"]
