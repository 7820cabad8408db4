"""Sharded training state, the checkpoints of a distributed run: each rank writes its own
shards of the weights and optimizer states with torch.distributed.checkpoint (DCP), so nothing
is gathered and every rank writes in parallel. DCP records where each shard sits in the whole
tensor, so a checkpoint loads into any other layout or world size (4 ranks -> 2 -> 1 process):
each rank reads the pieces it needs.

step_NNNNNNNN/
  dcp/         DCP files: {"model": ..., "optim": ...} as get_state_dict returns them, keyed by
               parameter names (camelid's names: wrapper prefixes are removed)
  trainer.pt   step, loader, RNG and stability-guard state (rank 0's, equal on every rank)

The step directory is built under a temporary name and renamed by rank 0 once every rank has
written its files (a barrier), so a run killed mid-write leaves nothing a resume would pick up.
The run directory must be on a file system all nodes share.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from camelid.atomic import atomic_dir
from camelid.distributed.parallelize import clean_name
from camelid.distributed.runtime import Runtime

DCP_DIR = "dcp"
TRAINER = "trainer.pt"


def is_sharded(path: Path) -> bool:
    return (path / DCP_DIR).is_dir()


def save(runtime: Runtime, target: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict[str, Any]) -> Path:
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(target, overwrite=True)) if runtime.main else None
        tmp = Path(runtime.broadcast(str(tmp) if tmp else None))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / DCP_DIR)
        if runtime.main:
            torch.save(trainer_state, tmp / TRAINER)
        runtime.barrier()  # every rank's files are complete before rank 0 renames the directory
    runtime.barrier()      # ... and nobody looks for the checkpoint before it is in place
    return target


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a DCP checkpoint into `model` and `optimizer` as they are laid out now (sharded, or a
    plain single-process model: DCP then reads without a process group)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    # one process without a process group reads the whole checkpoint itself
    dcp.load(state, checkpoint_id=path / DCP_DIR, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(path / TRAINER, map_location="cpu", weights_only=True)


def load_whole(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
               optimizer_state: dict[str, Any]) -> None:
    """Load whole (unsharded) weights and a single-process optimizer state_dict into a
    parallelized model: a run that started on one device scales out. Each rank keeps its shards."""
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    # torch keys optimizer state by position in the parameter groups; the groups hold the
    # parameters in model order (camelid.train.optim), which the wrappers do not change
    names = {id(p): clean_name(n) for n, p in model.named_parameters()}
    position = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {position[i]: v for i, v in optimizer_state["state"].items()},
               "param_groups": [{**g, "params": [position[i] for i in g["params"]]}
                                for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=full)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights on rank 0's CPU (an empty dict on the other ranks); every rank must call it."""
    # Gathering FSDP x TP weights takes two all-gathers each, about which DTensor warns once per
    # rank; for a one-off export that is expected, not a problem to report.
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    finally:
        log.setLevel(level)
