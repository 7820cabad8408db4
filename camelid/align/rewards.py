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

from camelid.align.reward_model import RewardModel, same_tokenizer, tokenizer_difference  # noqa: F401
from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer

RewardFunction = Callable[[list[list[int]], list[list[int]]], torch.Tensor]

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


def check_same_tokenizer(policy: Tokenizer, reward: Tokenizer, where: str) -> None:
    difference = tokenizer_difference(policy, reward)
    if difference:
        raise CamelidError(f"{where}: its tokenizer differs from the policy's ({difference}); a reward model reads "
                           "the policy's token ids, so train it from the same base (objective = \"reward\")")


def load_reward_model(path: str, policy_tokenizer: Tokenizer, device: torch.device,
                      dtype: torch.dtype = torch.float32, where: str = "rl.reward_model") -> ModelReward:
    """The reward model at `path` as a RewardFunction, refused in one line when it is no scorer or
    reads other token ids than the policy."""
    try:
        model = RewardModel.load(path, device=device, dtype=dtype)   # refuses a language model unread
    except CamelidError as e:
        raise CamelidError(f"{where}: {e}") from None
    if model.config.num_labels != 1:
        raise CamelidError(f"{where} {path}: not a reward model of one score (it has {model.config.num_labels} "
                           "labels); make one with model.objective = \"reward\"")
    check_same_tokenizer(policy_tokenizer, model.tokenizer, f"{where} {path}")
    return ModelReward(model)
