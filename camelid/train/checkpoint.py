"""Training checkpoints: checkpoints/step_NNNNNNNN/ holds a loadable camelid model (camelid.json,
model.safetensors, tokenizer) plus trainer.pt (optimizer, step, loader and RNG state). Each is
built under a temporary name and renamed when complete, so a run killed mid-write leaves
nothing that a resume would mistake for a checkpoint.

Runs over several processes write distributed checkpoints instead (camelid.distributed.checkpoint:
dcp/ with every rank's shards, plus trainer.pt) into the same step directories; either kind
resumes at any world size, one process included."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from camelid.atomic import atomic_dir
from camelid.checkpoint.names import expected_shapes
from camelid.checkpoint.native import read_native, write_native
from camelid.config import ModelConfig
from camelid.distributed import checkpoint as sharded
from camelid.distributed.runtime import Runtime
from camelid.tokenizer import Tokenizer

PATTERN = re.compile(r"^step_(\d{8})$")


def model_state(model: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's weights under camelid's names (wrappers such as activation checkpointing or
    compile add prefixes that the state dict hooks remove or that we strip here)."""
    state = {k.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): v
             for k, v in model.state_dict().items()}
    return {k: state[k].detach() for k in expected_shapes(config)}


def save(directory: Path, step: int, model: torch.nn.Module, config: ModelConfig, tokenizer: Tokenizer | None,
         trainer_state: dict[str, Any], keep: int) -> Path:
    target = directory / f"step_{step:08d}"
    with atomic_dir(target, overwrite=True) as tmp:
        write_native(tmp, config, tokenizer, model_state(model, config).items(), extra={"step": step})
        torch.save(trainer_state, tmp / "trainer.pt")
    prune(directory, keep)
    return target


def save_sharded(runtime: Runtime, directory: Path, step: int, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any], keep: int) -> Path:
    """A distributed checkpoint; every rank calls it."""
    target = sharded.save(runtime, directory / f"step_{step:08d}", model, optimizer, trainer_state)
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
    found = [p for p in directory.iterdir() if p.is_dir() and PATTERN.match(p.name) and (p / "trainer.pt").exists()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def load(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Copy the checkpoint's weights into `model` in place and return the trainer state."""
    ckpt = read_native(path)
    state = dict(ckpt.tensors())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            clean = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
            if clean in state:
                tensor.copy_(state[clean])
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)


def restore(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            distributed: bool) -> dict[str, Any]:
    """Weights and optimizer state from either kind of checkpoint into `model` as it is laid out
    now; returns the trainer state (without the optimizer's)."""
    if sharded.is_sharded(path):
        return sharded.load(path, model, optimizer)
    if distributed:  # a single-process checkpoint scaled out
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        sharded.load_whole(model, optimizer, dict(read_native(path).tensors()), state.pop("optimizer"))
        return state
    state = load(path, model)
    optimizer.load_state_dict(state.pop("optimizer"))
    return state
