"""Attention written out (scores, softmax, weighted sum), its probabilities kept for the backward
pass: for training on short sequences in bfloat16 on a CPU. Whoever trains the model swaps it in
(`use_explicit_attention`, where `explicit_attention_pays`); the model itself keeps SDPA.

Why: PyTorch's CPU flash kernel computes the backward pass in blocks, recomputing the scores,
and in bfloat16 it runs far from the matrix-product peak (slowest at head sizes that are not a
multiple of 64, such as stories15M's 48). Up to a few hundred positions the T x T probabilities
are small next to a block's other activations, and with them kept, the backward pass is four
batched products and one softmax gradient. docs/profile-training.md has the measurements; at
1,024 positions and more, flash is faster again, and in float32 the two are level.

The memory plan (`camelid.plan.training`) counts the probabilities where this applies.
"""

from __future__ import annotations

import torch
from torch import nn

from camelid.model.transformer import Attention

MAX_POSITIONS = 512   # the longest sequence it is used for (measured faster up to here)


def explicit_attention_pays(cpu: bool, dtype: str, checkpointing: str) -> bool:
    """Whether a trainer should swap it in: bfloat16 on a CPU without activation checkpointing
    (which recomputes attention and keeps only what its policy names; the probabilities would
    be memory it was not asked to keep). Sequences longer than MAX_POSITIONS keep SDPA."""
    return cpu and dtype == "bfloat16" and checkpointing == "none"


def keeps_probabilities(cpu: bool, dtype: str, checkpointing: str, seq_len: int) -> bool:
    """Whether a training step of sequences of `seq_len` tokens keeps the probabilities (the
    memory plan's question)."""
    return explicit_attention_pays(cpu, dtype, checkpointing) and seq_len <= MAX_POSITIONS


class KeptProbabilities(torch.autograd.Function):
    """softmax(q k^T / sqrt(D) + bias) v for q, k, v [B, H, T, D] (k and v with as many heads as
    q) and an additive bias [T, T] or [B, 1, T, T] (0 or -inf). Saves q (scaled), k, v and the
    probabilities; the backward pass is the textbook one (dS = P * (dP - rowsum(dP * P)))."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        scale = q.size(-1) ** -0.5
        with torch.autocast(q.device.type, enabled=False):   # the callers' dtype: bf16 in, bf16 out
            q = q * scale           # [B, H, T, D]: cheaper to scale than the T x T scores
            scores = torch.matmul(q, k.transpose(-1, -2)).add_(bias)
            probs = torch.softmax(scores, dim=-1)
            del scores
            out = torch.matmul(probs, v)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, probs = ctx.saved_tensors
        grad = grad.to(v.dtype)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad)
        grad_scores = torch._softmax_backward_data(torch.matmul(grad, v.transpose(-1, -2)), probs, -1, probs.dtype)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)   # q is scaled already
        return grad_q, grad_k, grad_v, None


def causal_bias(positions: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((positions, positions), float("-inf"), dtype=dtype, device=device).triu_(1)


class ExplicitAttention(Attention):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # only the training case: gradients wanted, queries over their own keys (no cache), in a
        # low-precision dtype; anything else (evaluation, generation) keeps SDPA
        if not (torch.is_grad_enabled() and 1 < q.size(2) == k.size(2) <= MAX_POSITIONS
                and q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float16)):
            return super().attend(q, k, v, mask)
        if k.size(1) != q.size(1):   # grouped-query attention: each key/value head serves a group
            group = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if mask is None:
            bias = causal_bias(q.size(2), q.dtype, q.device)
        else:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        return KeptProbabilities.apply(q, k, v, bias)


def use_explicit_attention(model: nn.Module) -> nn.Module:
    """Give the model's attention modules the explicit form, in place (only the class changes)."""
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = ExplicitAttention
    return model

