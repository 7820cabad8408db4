"""The generation core: a model stepping over a KV cache (static, or paged for the server), each
row at its own position.

Every inference user of a model runs it through one `Engine`:

- `LLM.generate`, `stream` and `chat` (`TokenGenerator`): one prefill of all prompts, then
  decode steps;
- speculative decoding: the target checks a chunk of drafted tokens, the draft decodes;
- evaluation scoring: hidden states of contexts, then of their continuations;
- the server: each request prefilled into its own row's blocks of a paged cache (after the
  blocks of a prefix it shares with earlier requests), then decode steps over all rows.

A row's tokens occupy its cache slots 0, 1, 2, ... (a token's slot is its position,
`Transformer.hidden`), so rows decode side by side at different positions. Prompts of different
lengths are prefilled together padded on the right: causal attention keeps a row's padding out
of its prompt's view, and its first decode steps overwrite the padding's slots before anything
attends to them. Nothing is padded on the left, so no row needs a mask or shifted positions.

Decode steps take the compiled step (`camelid.generate.compiled`) once it is built for their
shape, and run eagerly until then.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from camelid.generate.compiled import CompiledDecoder, bucket
from camelid.model import KVCache, Transformer


@dataclass
class Warmup:
    seconds: float = 0.0
    steps: int = 0  # decode steps whose time went to `seconds` (a step's first compiled run)


def activation_dtype(model: Transformer) -> torch.dtype:
    """The dtype of activations and of the KV cache: the float dtype the weights are stored in
    (quantized models keep their embedding in floating point)."""
    weight = model.tok_embeddings.weight
    return weight.dtype if weight.is_floating_point() else torch.float32


class Engine:
    """One model's prefill and decode over KV caches it allocates; compiled decode steps when
    `compile` is set (built in the background, see `CompiledDecoder`)."""

    def __init__(self, model: Transformer):
        self.model = model
        self.compiled: CompiledDecoder | None = None
        self._compile_settings: dict | None = None
        self._cache: KVCache | None = None      # kept between calls when compiled: see new_cache
        self._cache_lent = False
        self._lock = threading.Lock()
        self.decode_steps = {"compiled": 0, "eager": 0}  # how the decode steps ran, since the start
        # Time spent making compiled steps ready (loaded from disk or compiled here, and each
        # one's first run), since the start: it is no measure of decoding speed.
        self.warmup = Warmup()

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return activation_dtype(self.model)

    @property
    def config(self):
        return self.model.config

    def compile(self, mode: str | None = None, background: bool = True, cache_dir: Path | None = None) -> None:
        """Decode with compiled steps from now on (see `CompiledDecoder`); should that fail to
        set up, decoding stays eager, with a warning."""
        self._compile_settings = {"mode": mode, "background": background, "cache_dir": cache_dir}
        try:
            self.compiled = CompiledDecoder(self.model, **self._compile_settings)
        except Exception as e:  # a module the decoder cannot copy or pickle, say
            self.compiled = self._compile_settings = None
            warnings.warn(f"compiled decoding is unavailable ({type(e).__name__}: {str(e)[:200]}); decoding "
                          "eagerly", stacklevel=2)

    def modules_changed(self) -> None:
        """The model's modules were swapped (LoRA adapters attached): compiled steps are made
        afresh for the model as it is now."""
        if self._compile_settings is not None:
            self.compile(**self._compile_settings)

    # ---- caches --------------------------------------------------------------------------------------
    def new_cache(self, rows: int, length: int) -> KVCache:
        """A cache for `rows` sequences of up to `length` tokens, for the caller alone until it
        calls `release`. With compilation its length is rounded up to a bucket, and one cache is
        kept for the next call of the same shape, so that later requests reuse both it and its
        compiled step."""
        if self.compiled is None:
            return self.allocate(rows, length)
        if not self.compiled.matches(self.model):  # the model was changed (quantized, cast): start afresh
            self.compile(**self._compile_settings)
            if self.compiled is None:
                return self.allocate(rows, length)
        length = bucket(length, self.config.max_seq_len)
        with self._lock:
            c = self._cache
            if self._cache_lent:    # another generation holds it (threads, a stream not read to the end)
                return self.allocate(rows, length)
            if c is None or c.batch != rows or c.max_len != length or c.layers[0].k.dtype != self.dtype:
                self._cache = None  # freed before the next one is allocated
                self._cache = self.allocate(rows, length)
            self._cache_lent = True
            return self._cache

    def release(self, cache: KVCache) -> None:
        """The caller of `new_cache` is done with `cache` (and with decoding, for now)."""
        with self._lock:
            if cache is self._cache:
                self._cache_lent = False
        self.pause()

    def pause(self) -> None:
        """Decoding pauses: the compiled steps asked for meanwhile start building, in the
        background (see `CompiledDecoder.start_builds`)."""
        if self.compiled is not None:
            self.compiled.start_builds()

    def allocate(self, rows: int, length: int) -> KVCache:
        """A cache of exactly `rows` x `length`, for the caller alone."""
        with torch.inference_mode():  # every cache alike, so that compiled steps fit them all
            return KVCache(self.config, rows, length, dtype=self.dtype, device=self.device)

    # ---- steps ---------------------------------------------------------------------------------------
    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(h)

    def prefill(self, prompts: Sequence[Sequence[int]], cache: KVCache, pad_id: int = 0) -> torch.Tensor:
        """Write the prompts into rows 0..B-1 of `cache` from slot 0 and return the logits [B, V]
        after each prompt's last token (the head runs there only). Prompts are padded on the
        right (see the module's doc)."""
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        tokens = torch.tensor([list(p) + [pad_id] * (longest - len(p)) for p in prompts], device=self.device)
        h = self.extend(tokens, None, cache)                                             # [B, L, dim]
        last = h[torch.arange(len(prompts), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        return self.head(last)

    def extend(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        """Hidden states [B, T, dim] of chunks `tokens` [B, T] at `positions` [B, T] (None: from
        slot 0), written into `cache`'s rows and attending to what the rows hold before them;
        without a cache, the plain causal forward. Eager: chunk lengths vary."""
        return self.model.hidden(tokens, positions, cache)

    def decode(self, tokens: torch.Tensor, positions: Sequence[int] | torch.Tensor, cache: KVCache,
               compile: bool = True) -> torch.Tensor:
        """Logits [B, V] for one new token per row (`tokens` [B]) at its row's position, written
        into rows 0..B-1 of `cache` and attending to everything before it there. The compiled
        step serves it once built for this shape; `compile` False asks not to start a build for
        a shape not built yet (a short generation). Eagerly otherwise."""
        tokens = tokens.view(-1, 1)
        positions = torch.as_tensor(positions, device=self.device).view(-1, 1)
        if self.compiled is not None:
            new_shape = not self.compiled.ready(tokens, cache)
            t0 = time.perf_counter()
            logits = self.compiled.step(tokens, positions, cache, build=compile)
            if new_shape:
                self.warmup.seconds += time.perf_counter() - t0
                self.warmup.steps += logits is not None
            if logits is not None:
                self.decode_steps["compiled"] += 1
                return logits
        self.decode_steps["eager"] += 1
        return self.head(self.extend(tokens, positions, cache)[:, -1])
