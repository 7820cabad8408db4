"""Choosing the next token: pure functions of the logits.

Temperature 0 is greedy (argmax). Otherwise softmax(logits / T), optionally cut to the top k
tokens, then to the nucleus with Meta's `sample_top_p` rule: sort descending, and drop each
token whose preceding cumulative probability already exceeds p (so the token that crosses p
is kept), renormalise, draw.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from camelid.errors import CamelidError


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: the next-token rule (temperature, top_p, top_k) and when to stop
    (max_new_tokens, stop strings; a model's end-of-turn tokens always stop), with `seed` for
    reproducible draws. One object serves `LLM`, the server and evaluation."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (0 <= self.temperature < float("inf")):
            raise CamelidError(f"temperature must be a finite number >= 0 (got {self.temperature})")
        if not (0 < self.top_p <= 1):
            raise CamelidError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k is not None and self.top_k < 1:
            raise CamelidError(f"top_k must be >= 1 (got {self.top_k})")
        if self.max_new_tokens < 0:
            raise CamelidError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens})")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) for s in stop):
            raise CamelidError(f"stop must be a string or a list of strings (got {self.stop!r})")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def updated(self, **changes) -> "SamplingParams":
        """A copy with `changes` (the keyword arguments of the LLM methods), checked."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise CamelidError(f"unknown generation setting(s) {', '.join(unknown)}; "
                               f"choose among {', '.join(f.name for f in fields(self))}")
        return replace(self, **changes) if changes else self


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits outside the k largest per row set to -inf."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_probs(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Meta's sample_top_p mask applied to probs [B, V], renormalised, in vocabulary order."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs > p, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def next_token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution that `sample` draws from, for logits [B, V]."""
    logits = logits.float()
    # Shifted so that the largest is 0 before scaling, and the temperature kept above what
    # float32 rounds to 0: a tiny temperature then gives the others -inf (probability 0),
    # tending to greedy as it should, instead of inf - inf = nan.
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    probs = torch.softmax(logits, dim=-1)
    return top_p_probs(probs, params.top_p) if params.top_p < 1.0 else probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] for logits [B, V]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, params)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
