"""Choosing the next token: pure functions of the logits.

Temperature 0 is greedy (argmax). Otherwise softmax(logits / T), optionally cut to the top k
tokens, then to the nucleus with Meta's `sample_top_p` rule: sort descending, and drop each
token whose preceding cumulative probability already exceeds p (so the token that crosses p
is kept), renormalise, draw.

Before either, `shape_logits` applies OpenAI's logit_bias and presence/frequency penalties,
which depend on what a row has generated so far.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

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
    # OpenAI's definitions: a token's logit is lowered by presence_penalty once it has been
    # generated and by frequency_penalty for each time; logit_bias adds to given tokens' logits
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias) pairs; a dict is accepted

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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise CamelidError(f"{name} must be in [-2, 2] (got {getattr(self, name)})")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        bias = tuple(sorted((int(t), float(b)) for t, b in bias))
        if any(not -100 <= b <= 100 for _, b in bias) or any(t < 0 for t, _ in bias):
            raise CamelidError("logit_bias maps token ids (>= 0) to biases in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def shapes(self) -> bool:
        """Whether `shape_logits` changes anything."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty)

    def updated(self, **changes) -> "SamplingParams":
        """A copy with `changes` (the keyword arguments of the LLM methods), checked."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise CamelidError(f"unknown generation setting(s) {', '.join(unknown)}; "
                               f"choose among {', '.join(f.name for f in fields(self))}")
        return replace(self, **changes) if changes else self


def shape_logits(logits: torch.Tensor, params: SamplingParams, generated: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits [B, V] (float32, a new tensor) with `params`' logit_bias added and its penalties
    applied, each row's from the tokens it has `generated` (its prompt's do not count, as in
    vLLM and OpenAI); `logits` itself as it is when nothing applies."""
    if not params.shapes:
        return logits
    logits = logits.float().clone()
    vocab = logits.size(-1)
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=logits.device)
        logits[:, ids] += torch.tensor([b for _, b in params.logit_bias], device=logits.device)
    if params.presence_penalty or params.frequency_penalty:
        for row, tokens in enumerate(generated):
            if tokens:
                counts = torch.bincount(torch.tensor(tokens, device=logits.device), minlength=vocab)[:vocab].float()
                logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (its raw distribution: before temperature,
    penalties or a grammar, as vLLM reports them and as evaluation scores), with the `top` most
    likely tokens at that step as (id, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """For logits [T, V] and the token that followed at each of the T steps."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device).view(-1, 1)).squeeze(-1).tolist()
    best = logp.topk(top, dim=-1) if top > 0 else None
    out = []
    for t, token in enumerate(tokens):
        ranked = tuple(zip(best.indices[t].tolist(), best.values[t].tolist())) if best is not None else ()
        out.append(TokenLogprob(int(token), chosen[t], ranked))
    return out


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
