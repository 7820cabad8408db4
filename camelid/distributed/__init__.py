"""Applying parallelism and memory/speed transforms to a built model, from the outside."""

from camelid.distributed.activation_checkpoint import apply_activation_checkpointing

__all__ = ["apply_activation_checkpointing"]
