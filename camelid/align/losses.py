"""The losses of learning from preferences, as pure functions of tensors.

A preference pair is a prompt x with a preferred completion y_w ("chosen") and a dispreferred
one y_l ("rejected"). Two ways to learn from such pairs:

- a reward model r(x, y), trained with the Bradley-Terry likelihood of the preferences
  (Bradley and Terry, 1952), as in Stiennon et al. (2020, "Learning to summarize from human
  feedback") and Ouyang et al. (2022, "InstructGPT", eq. 1): loss -log sigmoid(r_w - r_l);
- the policy itself, with Direct Preference Optimization (Rafailov et al., 2023, "Direct
  Preference Optimization: Your Language Model is Secretly a Reward Model", eq. 7), whose
  implicit reward is beta * log(pi(y|x) / ref(y|x)), and its variants: conservative DPO (cDPO,
  Mitchell, 2023, "A note on DPO with noisy preferences") and IPO (Azar et al., 2023, "A General
  Theoretical Paradigm to Understand Learning from Human Preferences").

Every loss here is per pair (a tensor [P]); the trainer sums and normalises by the step's pairs.
A completion's log-probability is the sum of its tokens' log-probabilities (`sequence_logps`),
over the tokens the data marks (the completion and its end-of-turn token), never the prompt.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from camelid.train.loss import IGNORE, SLAB

DPO_KINDS = ("sigmoid", "ipo")
CHUNK = 1024   # at most this many positions' logits at a time in head_sequence_logps (fewer for big vocabularies)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[R] sum over each row of log softmax(logits)[target], for logits [R, T, V] and targets
    [R, T] (the next token at each position, IGNORE where it is not scored). A row with no
    target sums to 0. Materialises the fp32 log-softmax: the reference for small shapes;
    `head_sequence_logps` gives the same from hidden states a chunk at a time."""
    keep = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked)).sum(-1)


def head_sequence_logps(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                        targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`sequence_logps(head(hidden), targets)` without the [R, T, V] logits: only the positions
    with a target go through the head (hidden [R, T, d] -> logits [R, T, vocab_size]), CHUNK at a
    time, each chunk's logits recomputed in the backward pass (activation checkpointing), so that
    one [chunk, V] slab exists at a time, as camelid.finetune.trainer.head_loss does for the
    cross-entropy."""
    R, T, d = hidden.shape
    flat = targets.reshape(-1)
    where = (flat != IGNORE).nonzero().squeeze(-1)
    h, t, rows = hidden.reshape(-1, d)[where], flat[where], where // T
    out = torch.zeros(R, dtype=torch.float32, device=hidden.device)
    if not where.numel():
        return out + 0 * hidden.sum()   # no targets: zeros, with a (zero) gradient path
    chunk = min(CHUNK, max(1, SLAB // vocab_size))
    for start in range(0, h.shape[0], chunk):
        piece = slice(start, start + chunk)
        lp = checkpoint(_token_logps, head, h[piece], t[piece], use_reentrant=False)
        out = out.index_add(0, rows[piece], lp)
    return out


def _token_logps(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(h).float(), t, reduction="none")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """[P] -log sigmoid(r_chosen - r_rejected): the negative log-likelihood that the chosen
    completion is preferred under the Bradley-Terry model, P(y_w > y_l) = sigmoid(r_w - r_l)
    (Stiennon et al., 2020; Ouyang et al., 2022, eq. 1). logsigmoid keeps it finite for
    any margin."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float())


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             kind: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [P], chosen rewards [P], rejected rewards [P]) from the completions' log-probability
    sums under the policy and the reference.

    The implicit rewards are beta * (log pi(y|x) - log ref(y|x)), detached (they are figures
    to log); m = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) is their
    difference over beta.

    - "sigmoid" (Rafailov et al., 2023, eq. 7): -log sigmoid(beta * m). With label_smoothing
      eps (cDPO, Mitchell, 2023: each label taken to be flipped with probability eps):
      (1 - eps) * -log sigmoid(beta * m) + eps * -log sigmoid(-beta * m).
    - "ipo" (Azar et al., 2023): (m - 1 / (2 beta))^2, beta being the paper's tau. The
      paper writes m over whole sequences' likelihoods, as here (sums of token log-probs); some
      implementations average over the completion's tokens instead, which rescales m and so the
      beta that suits the data.
    With the policy equal to the reference, m = 0 and the sigmoid loss is log 2."""
    if kind not in DPO_KINDS:
        raise ValueError(f"dpo loss kind {kind!r}: expected one of {', '.join(DPO_KINDS)}")
    chosen = policy_chosen.float() - ref_chosen.float()
    rejected = policy_rejected.float() - ref_rejected.float()
    m = chosen - rejected
    if kind == "ipo":
        loss = (m - 1 / (2 * beta)) ** 2
    else:
        loss = -F.logsigmoid(beta * m)
        if label_smoothing:
            loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * m)
    return loss, (beta * chosen).detach(), (beta * rejected).detach()


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """[P] 1 where the chosen completion scores higher, 0 where lower, 1/2 for a tie: an
    untrained DPO policy (equal to its reference, all implicit rewards 0) is at chance, 0.5,
    rather than at 0."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
