"""The model's layers rewritten for torch.compile's inductor: the same math, in forms it compiles
well. Whoever compiles the model swaps them in (`use_inductor_layers`): the compiled decode step
(`camelid.generate.compiled`) and the trainer's per-block compile. The model itself keeps one
path, the eager one.

- RoPE as real arithmetic: inductor generates no code for complex numbers and would fall back to
  eager kernels for the model's complex multiply.
- The attention of one new token as products and sums: an SDPA call per layer costs more than
  the arithmetic of a single query, while inductor fuses these into its own loops. The query
  heads that share a key/value head are grouped instead of repeating k and v.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from camelid.model.transformer import Attention, Rotary


class RealRotary(Rotary):
    def forward(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, heads, D/2, 2]
        a, b, cos, sin = pairs[..., 0], pairs[..., 1], rotation[..., 0], rotation[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


class InductorAttention(Attention):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if q.size(2) != 1:
            return super().attend(q, k, v, mask)
        B, H, _, D = q.shape
        K = k.shape[1]
        qg = q.view(B, K, H // K, D)                                                         # [B, K, G, D]
        # products and sums rather than einsum: inductor lowers an einsum to a batched matrix
        # product call per layer, but fuses these into its own loops
        scores = (qg.float().unsqueeze(-2) * k.float().unsqueeze(2)).sum(-1) / math.sqrt(D)  # [B, K, G, S]
        if mask is not None:
            scores = scores.masked_fill(~mask.view(mask.size(0), 1, 1, -1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = (weights.unsqueeze(-2) * v.float().transpose(-1, -2).unsqueeze(2)).sum(-1)     # [B, K, G, D]
        return out.reshape(B, H, 1, D).type_as(q)


SWAPS = {Rotary: RealRotary, Attention: InductorAttention}


def use_inductor_layers(model: nn.Module) -> nn.Module:
    """Give the model's rotary and attention modules their inductor forms, in place. Only the
    class changes (no weights, hooks or wrappers are touched), so it works before or after
    quantization, tensor parallelism or activation checkpointing."""
    for module in model.modules():
        swap = SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return model
