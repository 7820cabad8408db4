"""Activation checkpointing, applied to a built model from the outside, block by block.

- "full": a block keeps only its input and recomputes everything in the backward pass.
- "selective": the paper's hand-written backward (section 2.4) in PyTorch terms: keep the
  expensive activations (outputs of the matrix products and of attention) and recompute the
  cheap element-wise ones (norms, RoPE, SiLU, products, residual adds). Same policy as
  torchtitan's per-op selective checkpointing.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from camelid.errors import CamelidError

aten = torch.ops.aten
EXPENSIVE = {
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    # Under tensor parallelism the row-parallel products end in a reduce-scatter: keep its
    # (sequence-sharded, small) output rather than repeat the collective in the backward pass.
    # The all-gathers are recomputed: their outputs hold the whole sequence, which sequence
    # parallelism exists to avoid storing.
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}
MODES = ("none", "selective", "full")


def _keep_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in EXPENSIVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: torch.nn.Module, mode: str,
                                   preserve_rng_state: bool = False) -> torch.nn.Module:
    """Wrap every transformer block of `model` (state-dict names are unchanged). The model has
    no randomness of its own, so by default the recompute skips saving the RNG state; a model
    with dropout inside its blocks (LoRA adapters) needs it preserved."""
    if mode not in MODES:
        raise CamelidError(f"train.activation_checkpointing: choose one of {MODES} (got {mode!r})")
    if mode == "none":
        return model
    for i, block in enumerate(model.layers):
        if mode == "full":
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=preserve_rng_state)
        else:
            model.layers[i] = checkpoint_wrapper(
                block, preserve_rng_state=preserve_rng_state,
                context_fn=partial(create_selective_checkpoint_contexts, _keep_expensive))
    return model
