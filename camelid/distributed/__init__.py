"""Applying parallelism and memory/speed transforms to a built model, from the outside:
activation checkpointing, tensor + sequence parallelism, compile and FSDP2 (`parallelize`),
the processes of a run, one or torchrun's (`setup` returns a `Runtime`), and sharded state
(`sharded_state`: distributed checkpoints)."""

from camelid.distributed.activation_checkpoint import apply_activation_checkpointing
from camelid.distributed.parallelize import ParallelConfig, init_weights, parallelize
from camelid.distributed.runtime import DistributedRuntime, Runtime, SingleProcessRuntime, setup

__all__ = ["DistributedRuntime", "ParallelConfig", "Runtime", "SingleProcessRuntime", "apply_activation_checkpointing",
           "init_weights", "parallelize", "setup"]
