"""Generating for a batch of prompts: one prefill, then a decode step per new token, through the
generation core (`camelid.generate.core`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from camelid.errors import CamelidError
from camelid.generate.core import Engine
from camelid.generate.sampling import SamplingParams, sample, shape_logits

# Generations shorter than this never start a compilation: its cost would not pay back.
COMPILE_AFTER = 32


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    rows: int = 0
    first_token_s: float = 0.0  # from the call to the first new token (the prefill and its sampling)
    # Loading or compiling decode steps and their first runs (`Engine.warmup`): kept out of
    # decode_s, with the tokens those steps made, so that decode_tps measures decoding alone.
    warmup_s: float = 0.0
    warmup_tokens: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # each row's first new token comes out of the prefill; each later one costs a decode step
        tokens = self.new_tokens - self.rows - self.warmup_tokens
        return max(tokens, 0) / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class TokenGenerator:
    """Iterate to get, per step, each row's new token (None once the row has finished).

    A row finishes on a stop token (which is yielded, so the caller can tell why), after
    max_new_tokens, or when the caller calls `finish(row)` (a stop string was seen)."""

    engine: Engine
    prompts: Sequence[Sequence[int]]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    seed: int | None = None
    pad_id: int = 0
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        if not self.prompts or any(len(p) == 0 for p in self.prompts):
            raise CamelidError("generate: every prompt needs at least one token")
        longest = max(len(p) for p in self.prompts)
        limit = self.engine.config.max_seq_len
        if longest >= limit:
            raise CamelidError(f"generate: the prompt has {longest} tokens but the model's context is {limit}")
        self.max_new_tokens = max(0, min(self.max_new_tokens, limit - longest))
        vocab = self.engine.config.vocab_size
        if any(t >= vocab for t, _ in self.sampling.logit_bias):
            raise CamelidError(f"generate: logit_bias names a token id outside the vocabulary (0..{vocab - 1})")
        self.done = [False] * len(self.prompts)
        self.generated: list[list[int]] = [[] for _ in self.prompts]  # what the penalties count

    def finish(self, row: int) -> None:
        self.done[row] = True

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        engine = self.engine
        t0 = time.perf_counter()
        cache = engine.new_cache(len(self.prompts), max(len(p) for p in self.prompts) + self.max_new_tokens)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=engine.device).manual_seed(self.seed)
        try:
            next_tokens = self._sample(engine.prefill(self.prompts, cache, self.pad_id), generator)
        except BaseException:
            engine.release(cache)
            raise
        ids = next_tokens.tolist()
        self.stats.prefill_s += time.perf_counter() - t0
        self.stats.first_token_s = self.stats.prefill_s
        self.stats.prompt_tokens += sum(len(p) for p in self.prompts)
        self.stats.rows += len(self.prompts)

        positions = [len(p) for p in self.prompts]  # where each row's next token goes
        compile = self.max_new_tokens >= COMPILE_AFTER
        t0, warmup_s = time.perf_counter(), engine.warmup.seconds
        try:
            for step in range(self.max_new_tokens):
                yield self._emit(ids, last=step == self.max_new_tokens - 1)
                if all(self.done):
                    break
                warmup_steps = engine.warmup.steps
                logits = engine.decode(next_tokens, positions, cache, compile=compile)
                if engine.warmup.steps != warmup_steps:  # this step's tokens came with the warm-up
                    self.stats.warmup_tokens += self.done.count(False)
                positions = [p + 1 for p in positions]
                next_tokens = self._sample(logits, generator)
                ids = next_tokens.tolist()
        finally:
            warmup_s = engine.warmup.seconds - warmup_s
            self.stats.warmup_s += warmup_s
            self.stats.decode_s += time.perf_counter() - t0 - warmup_s
            engine.release(cache)

    def _sample(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return sample(shape_logits(logits, self.sampling, self.generated), self.sampling, generator)

    def _emit(self, ids: list[int], last: bool) -> list[int | None]:
        out: list[int | None] = []
        for b, tok in enumerate(ids):
            if self.done[b]:
                out.append(None)
                continue
            out.append(tok)
            if self.sampling.shapes:
                self.generated[b].append(tok)
            self.stats.new_tokens += 1
            if tok in self.stop_ids or last:
                self.done[b] = True
        return out
