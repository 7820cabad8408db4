"""The paper's optimisation recipe (section 2.3): AdamW with beta1 0.9, beta2 0.95, weight decay
0.1, gradient clipping at 1.0, a linear warmup then cosine decay to 10% of the peak learning
rate. AdaMax is offered as an alternative."""

from __future__ import annotations

import math

import torch

from camelid.train.config import TrainSection


def lr_at(step: int, cfg: TrainSection) -> float:
    """Learning rate for optimizer step `step` (1-based)."""
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    if warmup and step <= warmup:
        return cfg.lr * step / warmup
    span = max(cfg.max_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainSection) -> torch.optim.Optimizer:
    # Weight decay on matrices only: decaying RMSNorm gains towards zero would fight the norm.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **adamw_implementation(params))


def adamw_implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """fused where torch has a fused AdamW kernel for the parameters' device (CPU and CUDA): one
    pass over each parameter, its gradient and both moments, in place, where foreach makes a
    pass per arithmetic operation (about ten) and keeps a temporary the size of the largest
    group (docs/profile-training.md measures the difference). foreach elsewhere."""
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if fused else {"foreach": True}
