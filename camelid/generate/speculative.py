"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a small draft model proposes
k tokens one at a time, the target model scores all of them in one forward, and a rejection rule
keeps a prefix. Greedy output is exactly the target's own greedy output; sampled output has
exactly the target's distribution. The gain is that the target reads its weights once per round
instead of once per token.

Both models keep a static KV cache holding every committed token but the last; a rejected
proposal is undone by moving the cache's end back (the stale slots are overwritten later and
never attended, since attention only reaches slots before the write position).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from camelid.errors import CamelidError
from camelid.generate.core import Engine
from camelid.generate.engine import Stats
from camelid.generate.sampling import SamplingParams, next_token_probs
from camelid.model import KVCache


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, drafted: int, generator: torch.Generator | None,
                       ) -> tuple[bool, int]:
    """The rejection rule for one drafted token: accept it with probability min(1, p/q); on
    rejection draw from the normalised residual max(0, p - q). p and q are the target's and the
    draft's distributions [V] at this position. Returns (accepted, token)."""
    u = torch.rand((), generator=generator, device=p.device)
    if u * q[drafted] <= p[drafted]:
        return True, drafted
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    if total <= 0:  # p == q: the rejection cannot happen; guard against rounding
        residual, total = p, p.sum()
    return False, int(torch.multinomial(residual / total, 1, generator=generator))


@dataclass
class Rounds:
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class SpeculativeGenerator:
    """The TokenGenerator interface for one prompt: iterate to get [token] per new token. The
    draft shares the target's tokenizer (`LLM.use_draft` checks it)."""

    target: Engine
    draft: Engine
    prompts: Sequence[Sequence[int]]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    seed: int | None = None
    num_draft: int = 4
    stats: Stats = field(default_factory=Stats)
    rounds: Rounds = field(default_factory=Rounds)

    def __post_init__(self) -> None:
        if len(self.prompts) != 1 or not self.prompts[0]:
            raise CamelidError("speculative decoding takes one non-empty prompt at a time")
        if self.num_draft < 1:
            raise CamelidError(f"draft tokens per round must be >= 1 (got {self.num_draft})")
        if self.sampling.shapes:  # the acceptance rule compares the two models' own distributions
            raise CamelidError("speculative decoding does not take logit_bias or presence/frequency penalties; "
                               "generate without a draft model to use them")
        limit = min(self.target.config.max_seq_len, self.draft.config.max_seq_len)
        if len(self.prompts[0]) >= limit:
            raise CamelidError(f"generate: the prompt has {len(self.prompts[0])} tokens but the context is {limit}")
        self.max_new_tokens = max(0, min(self.max_new_tokens, limit - len(self.prompts[0]) - self.num_draft - 1))
        self.done = False

    def finish(self, row: int) -> None:
        self.done = True

    @staticmethod
    def _forward(engine: Engine, cache: KVCache, tokens: list[int], start: int) -> torch.Tensor:
        """Logits [T, V] (fp32) for a chunk at positions start..; a single token takes the
        engine's decode step (compiled, when it is built)."""
        x = torch.tensor([tokens], device=engine.device)
        if start == 0:
            return engine.head(engine.extend(x, None, cache))[0].float()
        if len(tokens) == 1:
            return engine.decode(x[0], [start], cache).float()
        positions = torch.arange(start, start + len(tokens), device=engine.device).unsqueeze(0)
        return engine.head(engine.extend(x, positions, cache))[0].float()

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.sampling.greedy else next_token_probs(logits, self.sampling)  # argmax is all greedy needs

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator(device=self.target.device)
        if self.seed is not None:
            gen.manual_seed(self.seed)
        seq = list(self.prompts[0])
        length = len(seq) + self.max_new_tokens + self.num_draft + 1
        caches = [engine.new_cache(1, length) for engine in (self.target, self.draft)]
        try:
            yield from self._rounds(seq, caches, gen)
        finally:
            self.target.release(caches[0])
            self.draft.release(caches[1])

    def _rounds(self, seq: list[int], caches: list[KVCache], gen: torch.Generator) -> Iterator[list[int]]:
        t0 = time.perf_counter()
        if len(seq) > 1:  # both caches hold all committed tokens but the last
            self._forward(self.target, caches[0], seq[:-1], 0)
            self._forward(self.draft, caches[1], seq[:-1], 0)
        self.stats.prompt_tokens, self.stats.prefill_s = len(seq), time.perf_counter() - t0
        t0, warmup_s = time.perf_counter(), self.target.warmup.seconds + self.draft.warmup.seconds
        target_len = draft_len = len(seq) - 1
        produced = 0
        while produced < self.max_new_tokens and not self.done:
            k = min(self.num_draft, self.max_new_tokens - produced)
            proposals, q = [], []
            feed = seq[draft_len:]
            for _ in range(k):   # the draft catches up on the committed tokens it lacks, then proposes
                probs = self._probs(self._forward(self.draft, caches[1], feed, draft_len)[-1:])[0]
                draft_len += len(feed)
                token = int(probs.argmax()) if self.sampling.greedy else int(torch.multinomial(probs, 1, generator=gen))
                proposals.append(token)
                q.append(probs)
                feed = [token]
            p = self._probs(self._forward(self.target, caches[0], seq[target_len:] + proposals, target_len))
            p = p[-(k + 1):]                                                  # [k + 1, V]
            new = []
            for i, token in enumerate(proposals):
                if self.sampling.greedy:   # exact: keep the draft's token while the target agrees
                    accepted, token = int(p[i].argmax()) == token, int(p[i].argmax())
                else:
                    accepted, token = accept_or_resample(p[i], q[i], token, gen)
                new.append(token)
                if not accepted:
                    break
            else:   # every proposal accepted: the target's next distribution gives one more for free
                new.append(int(p[k].argmax()) if self.sampling.greedy else int(torch.multinomial(p[k], 1, generator=gen)))
            self.rounds.drafted += k
            self.rounds.accepted += len(new) - 1 if len(new) <= k else k
            old = len(seq)
            for token in new[: self.max_new_tokens - produced]:
                seq.append(token)
                produced += 1
                self.stats.new_tokens += 1
                if produced == 1:
                    self.stats.first_token_s = self.stats.prefill_s + time.perf_counter() - t0
                yield [token]
                if token in self.stop_ids or self.done:
                    self.done = True
                    break
            target_len = len(seq) - 1
            draft_len = min(draft_len, old + len(new) - 1, len(seq) - 1)
        # compiled steps made ready meanwhile are no measure of decoding (their tokens, a few
        # inside a round, stay counted)
        self.stats.warmup_s = self.target.warmup.seconds + self.draft.warmup.seconds - warmup_s
        self.stats.decode_s = time.perf_counter() - t0 - self.stats.warmup_s
