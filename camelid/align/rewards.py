"""What RL optimises: a reward function scores completions of prompts, all as token ids.

    RewardFunction = Callable[[prompts: list[list[int]], completions: list[list[int]]], Tensor[N]]

Row i is completion i of prompt i (a prompt repeats for each of its completions). Two kinds:

- `TokenReward`: a rule, 1 when the completion contains a given token, else 0 (tests, demos);
- `ModelReward`: a reward model that scores token rows (anything with `score_tokens(rows) ->
  Tensor[N]`, the score at each row's last token), given prompt + completion.

A reward model reads the policy's token ids, so it must share the policy's tokenizer: anything
else is refused (`check_same_tokenizer`).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer

RewardFunction = Callable[[list[list[int]], list[list[int]]], torch.Tensor]

# Text whose ids two tokenizers must agree on to count as the same (words, digits, bytes, markup)
PROBE = "Shall I compare thee to a summer's day? 1609, caf\u00e9 \u4f60\u597d\n\tdef f(x): return x"


class Scorer(Protocol):
    def score_tokens(self, rows: list[list[int]]) -> torch.Tensor: ...


class TokenReward:
    """1.0 for a completion that contains `token`, else 0.0."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        return torch.tensor([float(self.token in c) for c in completions])


class ModelReward:
    """A reward model's score of prompt + completion (at the completion's last token)."""

    def __init__(self, model: Scorer):
        self.model = model

    def __call__(self, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        return self.model.score_tokens([list(p) + list(c) for p, c in zip(prompts, completions)]).float().cpu()


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give the same ids: the same vocabulary size, special ids and ids
    of PROBE."""
    def signature(t: Tokenizer):
        return t.vocab_size, t.bos_id, t.eos_id, t.encode(PROBE)

    return signature(a) == signature(b)


def check_same_tokenizer(policy: Tokenizer, reward: Tokenizer, where: str) -> None:
    if not same_tokenizer(policy, reward):
        raise CamelidError(f"{where}: its tokenizer differs from the policy's ({reward.vocab_size} tokens against "
                           f"{policy.vocab_size}, or other ids for the same text); a reward model reads the "
                           "policy's token ids, so train it from the same base (objective = \"reward\")")


class CheckpointScorer:
    """A scorer checkpoint (ModelConfig.num_labels = 1) scoring each row at its last token; a
    stand-in for camelid.align.reward_model.RewardModel, with the same `score_tokens`."""

    def __init__(self, model, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def score_tokens(self, rows: list[list[int]]) -> torch.Tensor:
        device = self.model.tok_embeddings.weight.device
        lengths = torch.tensor([len(r) for r in rows], device=device)
        tokens = torch.tensor([list(r) + [0] * (int(lengths.max()) - len(r)) for r in rows], device=device)
        hidden = self.model.hidden(tokens)                                            # [N, L, dim]
        last = hidden[torch.arange(len(rows), device=device), lengths - 1]            # [N, dim]
        return self.model.head(last)[:, 0].float()


def load_reward_model(path: str, policy_tokenizer: Tokenizer, device: torch.device,
                      dtype: torch.dtype = torch.float32, where: str = "rl.reward_model") -> ModelReward:
    """The reward model at `path` as a RewardFunction, refused in one line when it is no scorer or
    reads other token ids than the policy."""
    from camelid.checkpoint import build_model, read_checkpoint

    try:
        ckpt = read_checkpoint(path)
    except CamelidError as e:
        raise CamelidError(f"{where}: {e}") from None
    if ckpt.config.num_labels != 1:
        raise CamelidError(f"{where} {path}: not a reward model (a model with one score, num_labels = 1; this one "
                           f"has {ckpt.config.num_labels or 'none, a language model'}); make one with "
                           "model.objective = \"reward\"")
    if ckpt.tokenizer is None:
        raise CamelidError(f"{where} {path}: no tokenizer beside the weights, so its ids cannot be checked "
                           "against the policy's")
    check_same_tokenizer(policy_tokenizer, ckpt.tokenizer, f"{where} {path}")
    return ModelReward(CheckpointScorer(build_model(ckpt, dtype=dtype, device=device), ckpt.tokenizer))
