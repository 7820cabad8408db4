"""Applying parallelism and memory/speed transforms to a built model, from the outside:
activation checkpointing, tensor + sequence parallelism, compile and FSDP2 (`parallelize`),
the process group and device mesh of a torchrun job (`setup`), distributed checkpoints."""

from camelid.distributed.activation_checkpoint import apply_activation_checkpointing
from camelid.distributed.parallelize import ParallelConfig, init_weights, parallelize
from camelid.distributed.runtime import Runtime, setup

__all__ = ["ParallelConfig", "Runtime", "apply_activation_checkpointing", "init_weights", "parallelize", "setup"]
