"""Gradient clipping over parameters that live on different meshes.

Under FSDP + TP a model mixes DTensor parameters sharded over (dp, tp) and sharded over dp but
replicated over tp (the norms); `torch.nn.utils.clip_grad_norm_` stacks all gradient norms
into one tensor, which DTensor refuses across placements, and reduces each group with its own
collectives. Here every rank sums the squares of the gradient pieces it holds, counting a piece
held by k ranks 1/k times, and one all-reduce over all ranks gives the global norm, identical
on every rank (so all ranks clip, skip and roll back alike)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def align_grads(params: Iterable[torch.Tensor]) -> None:
    """Give every DTensor gradient its parameter's placements. Without FSDP (which does this as
    it reduce-scatters), tensor parallelism leaves some gradients as partial sums (the
    sequence-parallel norms: each rank saw T/tp positions) or replicated (the vocabulary-split
    embedding). DTensor would reconcile the layouts inside every optimizer operation that
    reads them, an all-reduce each time for a partial sum; once here is cheaper."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)


def _holders(g: torch.Tensor, world: int) -> int:
    """How many ranks hold the same piece of `g`: the ranks outside its mesh, and along the
    mesh dimensions where it is replicated."""
    if not isinstance(g, DTensor):
        return world
    mesh = g.device_mesh
    replicated = [mesh.size(i) for i, placement in enumerate(g.placements) if isinstance(placement, Replicate)]
    return world // mesh.size() * math.prod(replicated)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients (after `align_grads`) so that their global L2 norm is at most
    max_norm, as torch.nn.utils.clip_grad_norm_ does; return the norm before clipping (inf and
    nan propagate, for the stability guard)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    pieces = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    world = dist.get_world_size()
    norms = torch._foreach_norm(pieces, 2.0)
    square = sum(n.double().square() / _holders(g, world) for n, g in zip(norms, grads))
    dist.all_reduce(square)
    total = float(square.sqrt())
    coef = min(1.0, max_norm / (total + 1e-6))  # torch's formula
    if coef < 1.0:
        torch._foreach_mul_(pieces, coef)
    return total
