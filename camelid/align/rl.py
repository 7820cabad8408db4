"""The arithmetic of learning from a reward: pure functions of tensors, no model, no I/O.

Shapes: B completions, T their token slots (right-padded); `mask` [B, T] is 1 where a slot holds
a sampled completion token. Per-token quantities are of the sampled tokens only (the log-prob a
policy gives the token it actually sampled).

- PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") with the RLHF reward of
  Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") and InstructGPT
  (Ouyang et al. 2022): a per-token penalty -kl_coef * (log pi - log ref) plus the reward model's
  score on the last token; advantages by generalised advantage estimation (Schulman et al. 2016,
  "High-Dimensional Continuous Control Using Generalized Advantage Estimation") over a value
  head; clipped policy and value losses.
- GRPO (Shao et al. 2024, "DeepSeekMath", section 4.1): no critic; a completion's advantage is
  its reward standardised within the group of completions of the same prompt, given to each of
  its tokens, and the KL to the reference is a term of the loss rather than of the reward.

KL estimators, per sampled token x ~ pi, with log-ratio d = log pi(x) - log ref(x) (Schulman,
2020, "Approximating KL Divergence"):
- k1 = d: unbiased for KL(pi || ref), can be negative token by token. It is what the PPO reward
  is penalised by (Ziegler et al.; InstructGPT), and what is reported as `kl` for both methods:
  per completion the sum over its tokens, averaged over the completions (the figure the
  adaptive controller steers).
- k3 = exp(-d) - 1 + d: unbiased too, never negative, lower variance; GRPO's loss term (Shao et
  al., equation 4).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of x over the slots where mask is set (0 when none is)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x standardised to mean 0 and variance 1 over the masked slots (zero elsewhere): PPO's
    advantage normalisation over a rollout batch, as in Ziegler et al.'s code."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation for rewards and values [B, T]: with
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_k (gamma lam)^k delta_{t+k}. A completion ends
    at its last masked slot: the value after it is 0 (the episode is over), and padding slots
    contribute nothing. Returns (advantages, returns = advantages + values), both zero where the
    mask is not set."""
    mask = mask.to(values.dtype)
    B, T = values.shape
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(B)
    running = values.new_zeros(B)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        # a padding slot passes on neither its value nor an advantage to the slot before it
        next_value = values[:, t] * m
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip (Schulman et al. 2017, equation 7) as a loss to minimise, averaged over the
    masked tokens: max(-A r, -A clip(r, 1 - clip, 1 + clip)) with r = pi / pi_old. Where the
    clipped term is the larger, the ratio has left the trust region in the direction the
    advantage favours and the token gives no gradient. Returns (loss, the share of tokens so
    clipped)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """The clipped value loss of PPO's reference code (baselines' ppo2): 0.5 max((V - R)^2,
    (V_old + clip(V - V_old, -clip, clip) - R)^2), averaged over the masked tokens, so that one
    update cannot move the value far from the one the advantages were computed with."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 = log pi(x) - log ref(x) of the sampled tokens."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = ref/pi - 1 - log(ref/pi) of the sampled tokens (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - 1.0 - d


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reported KL: k1 summed over each completion's tokens, averaged over completions."""
    return (kl_k1(logp, ref_logp) * mask.to(logp.dtype)).sum(-1).mean()


def shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float) -> torch.Tensor:
    """Per-token rewards [B, T] of RLHF's PPO (Ziegler et al. 2019; InstructGPT): -kl_coef * k1 on
    every completion token, plus the reward model's score [B] on each completion's last token."""
    mask = mask.to(logp.dtype)
    rewards = -kl_coef * kl_k1(logp, ref_logp) * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantages for rewards [N], N = prompts x group with each prompt's group
    consecutive: (r - mean of its group) / (std of its group + eps), the population std. A
    group whose completions all score alike gets zero advantages: it teaches nothing."""
    r = rewards.float().view(-1, group)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True, correction=0)
    return ((r - mean) / (std + eps)).view(-1)


class FixedKL:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        self.coef = coef

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]


class AdaptiveKL(FixedKL):
    """Ziegler et al. 2019 (section 2.2): steer the coefficient so the measured KL approaches
    `target`: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon, n_steps being
    the completions the KL was measured over."""

    def __init__(self, coef: float, target: float, horizon: int):
        super().__init__(coef)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon


def kl_controller(coef: float, target: float, horizon: int) -> FixedKL:
    """Adaptive towards `target` when it is above 0, else fixed."""
    return AdaptiveKL(coef, target, horizon) if target > 0 else FixedKL(coef)
