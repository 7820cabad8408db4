"""The state of a training run on disk: checkpoints/step_NNNNNNNN/, one directory per saved
step, each built under a temporary name and renamed when complete, so a run killed mid-write
leaves nothing that a resume would mistake for a checkpoint. The runtime decides the kind:

- one process writes a loadable camelid model (camelid.json, model.safetensors, tokenizer)
  plus trainer.pt (the trainer's state and the optimizer's);
- several processes write sharded state (camelid.distributed.sharded_state: dcp/ with every
  rank's shards of the weights and optimizer states, plus trainer.pt without the optimizer's).

Either kind resumes at any world size, one process included."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from camelid.atomic import atomic_dir
from camelid.checkpoint.names import expected_shapes
from camelid.checkpoint.native import CONFIG as NATIVE_CONFIG
from camelid.checkpoint.native import read_native, write_native
from camelid.config import ModelConfig
from camelid.distributed import sharded_state
from camelid.distributed.parallelize import clean_name
from camelid.distributed.runtime import Runtime
from camelid.distributed.sharded_state import TRAINER
from camelid.tokenizer import Tokenizer

PATTERN = re.compile(r"^step_(\d{8})$")


def model_state(model: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A single process's weights under camelid's names (wrappers such as activation
    checkpointing or compile add prefixes that the state dict hooks remove or that we strip here)."""
    state = {clean_name(k): v for k, v in model.state_dict().items()}
    return {k: state[k].detach() for k in expected_shapes(config)}


def whole_weights(runtime: Runtime, model: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The whole weights under camelid's names on the main process (gathered from every rank's
    shards in a distributed run; an empty dict on the other ranks). Every rank calls it."""
    if not runtime.distributed:
        return model_state(model, config)
    gathered = sharded_state.full_weights(model)
    return {name: gathered[name] for name in expected_shapes(config)} if runtime.main else {}


def save(runtime: Runtime, directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         config: ModelConfig, tokenizer: Tokenizer | None, trainer_state: dict[str, Any], keep: int) -> Path:
    """Checkpoint `step` and keep the newest `keep`; every rank calls it."""
    target = directory / f"step_{step:08d}"
    if runtime.distributed:
        sharded_state.save(runtime, target, model, optimizer, trainer_state)
    else:
        with atomic_dir(target, overwrite=True) as tmp:
            write_native(tmp, config, tokenizer, model_state(model, config).items(), extra={"step": step})
            torch.save({**trainer_state, "optimizer": optimizer.state_dict()}, tmp / TRAINER)
    if runtime.main:
        prune(directory, keep)
    runtime.barrier()
    return target


def prune(directory: Path, keep: int) -> None:
    for old in complete(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def complete(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories never match the pattern)."""
    if not directory.exists():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and PATTERN.match(p.name) and (p / TRAINER).exists()]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    """The step a checkpoint directory holds, from its name."""
    return int(PATTERN.match(path.name).group(1))


def saved_config(path: Path) -> ModelConfig | None:
    """The model config a checkpoint was saved with, read without its weights: camelid.json for
    one process's whole model, else the trainer state (a sharded checkpoint, an adapter's; None
    for one saved before it held it)."""
    if (path / NATIVE_CONFIG).exists():
        return read_native(path).config
    state = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
    return ModelConfig.from_dict(state["model_config"], where=str(path / TRAINER)) if "model_config" in state else None


def restore(runtime: Runtime, path: Path, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Weights and optimizer state from either kind of checkpoint into `model` as it is laid out
    now; returns the trainer state (without the optimizer's)."""
    if sharded_state.is_sharded(path):
        return sharded_state.load(path, model, optimizer)
    weights = dict(read_native(path).tensors())
    state = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
    if runtime.distributed:  # a single-process checkpoint scaled out
        sharded_state.load_whole(model, optimizer, weights, state.pop("optimizer"))
        return state
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if clean_name(name) in weights:
                tensor.copy_(weights[clean_name(name)])
    optimizer.load_state_dict(state.pop("optimizer"))
    return state


def rng_state() -> dict[str, Any]:
    """The random generators' states, for trainer.pt."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(runtime: Runtime, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    # a distributed run saved rank 0's CUDA generators: the ranks of one keep their own
    if "cuda_rng" in state and torch.cuda.is_available() and not runtime.distributed:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
