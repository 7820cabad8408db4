"""Prefill and incremental decode with a static KV cache, for a batch of prompts.

Prompts of different lengths are left-padded: every row writes cache slot t at step t, each row
has its own RoPE positions (slot minus its padding), and a mask hides the padding slots. A
padding query row attends to itself only, so no row of the attention is empty (an all-masked
row would give NaN, which would then leak through the cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from camelid.errors import CamelidError
from camelid.generate.sampling import SamplingParams, sample
from camelid.model import KVCache, Transformer

if TYPE_CHECKING:
    from camelid.generate.compiled import CompiledDecoder


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    rows: int = 0

    @property
    def decode_tps(self) -> float:
        # each row's first new token comes out of the prefill; each later one costs a decode step
        return max(self.new_tokens - self.rows, 0) / self.decode_s if self.decode_s else 0.0


@dataclass
class TokenGenerator:
    """Iterate to get, per step, each row's new token (None once the row has finished).

    A row finishes on a stop token (which is yielded, so the caller can tell why), after
    max_new_tokens, or when the caller calls `finish(row)` (a stop string was seen)."""

    model: Transformer
    prompts: Sequence[Sequence[int]]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    seed: int | None = None
    pad_id: int = 0
    decoder: "CompiledDecoder | None" = None  # compiled decode step; eager when None
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        if not self.prompts or any(len(p) == 0 for p in self.prompts):
            raise CamelidError("generate: every prompt needs at least one token")
        longest = max(len(p) for p in self.prompts)
        limit = self.model.config.max_seq_len
        if longest >= limit:
            raise CamelidError(f"generate: the prompt has {longest} tokens but the model's context is {limit}")
        self.max_new_tokens = max(0, min(self.max_new_tokens, limit - longest))
        self.done = [False] * len(self.prompts)

    def finish(self, row: int) -> None:
        self.done[row] = True

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        model, B = self.model, len(self.prompts)
        param = model.tok_embeddings.weight
        device = param.device
        L = max(len(p) for p in self.prompts)
        pad = torch.tensor([L - len(p) for p in self.prompts], device=device)
        tokens = torch.tensor([[self.pad_id] * (L - len(p)) + list(p) for p in self.prompts], device=device)
        total = L + self.max_new_tokens
        dtype = _activation_dtype(param.dtype)
        if self.decoder is not None:
            cache = self.decoder.cache_for(B, total, dtype, device)
        else:
            cache = KVCache(model.config, B, total, dtype=dtype, device=device)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=device).manual_seed(self.seed)

        padded = bool(pad.any())
        slots = torch.arange(cache.max_len, device=device)
        valid = slots.unsqueeze(0) >= pad.unsqueeze(1)  # [B, cache length]: not a padding slot
        positions = mask = None
        if padded:
            positions = (slots[:L].unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # [B, L]
            causal = slots[:L].unsqueeze(0) <= slots[:L].unsqueeze(1)           # [L, L]
            mask = (causal & valid[:, None, :L]) | torch.eye(L, dtype=torch.bool, device=device)
            mask = mask.unsqueeze(1)                                            # [B, 1, L, L]

        t0 = time.perf_counter()
        logits = model(tokens, positions=positions, cache=cache, start=0, mask=mask, last_only=True)
        next_tokens = sample(logits[:, -1], self.sampling, generator)
        ids = next_tokens.tolist()
        self.stats.prompt_tokens += sum(len(p) for p in self.prompts)
        self.stats.rows += B
        self.stats.prefill_s += time.perf_counter() - t0

        t0 = time.perf_counter()
        try:
            yield from self._decode(ids, next_tokens, cache, L, pad, padded, valid, generator)
        finally:
            self.stats.decode_s += time.perf_counter() - t0

    def _decode(self, ids, next_tokens, cache, L, pad, padded, valid, generator) -> Iterator[list[int | None]]:
        model = self.model
        for step in range(self.max_new_tokens):
            out: list[int | None] = []
            for b, tok in enumerate(ids):
                if self.done[b]:
                    out.append(None)
                    continue
                out.append(tok)
                self.stats.new_tokens += 1
                if tok in self.stop_ids or step == self.max_new_tokens - 1:
                    self.done[b] = True
            yield out
            if all(self.done):
                break
            slot = L + step
            if self.decoder is not None:
                logits = self.decoder.step(next_tokens.unsqueeze(1), slot, (slot - pad).unsqueeze(1), valid, cache)
            else:
                step_positions = (slot - pad).unsqueeze(1) if padded else None
                step_mask = valid[:, None, None, : slot + 1] if padded else None
                logits = model(next_tokens.unsqueeze(1), positions=step_positions, cache=cache, start=slot,
                               mask=step_mask, last_only=True)
            next_tokens = sample(logits[:, -1], self.sampling, generator)
            ids = next_tokens.tolist()


def _activation_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return weight_dtype if weight_dtype.is_floating_point else torch.float32
