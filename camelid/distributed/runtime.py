"""The process group and device mesh of a run started by `torchrun`.

torchrun (torch.distributed.run) starts one process per device and gives each RANK,
LOCAL_RANK, WORLD_SIZE and the rendezvous address in its environment; `setup` reads them,
checks that the configured layout uses exactly that many processes, and builds a 3-D
DeviceMesh (dp_replicate, dp_shard, tp). Dimensions of size 1 are kept, so that every rank
can slice every name; tp is the innermost dimension, so a tensor-parallel group is made of
consecutive ranks, which torchrun places on one node (TP exchanges activations in every layer
and needs the node's NVLink; data parallelism only exchanges weights and gradients)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from camelid.errors import CamelidError

DIMS = ("dp_replicate", "dp_shard", "tp")


def world_size() -> int:
    """Processes in this run according to torchrun's environment (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Runtime:
    mesh: DeviceMesh
    device: torch.device
    rank: int
    world: int

    def size(self, dim: str) -> int:
        return self.mesh[dim].size()

    @property
    def tp(self) -> int:
        return self.size("tp")

    @property
    def dp_size(self) -> int:
        return self.size("dp_replicate") * self.size("dp_shard")

    @property
    def dp_rank(self) -> int:
        """This rank's position among the data-parallel ranks (the tp ranks of one group share it)."""
        return self.mesh.get_local_rank("dp_replicate") * self.size("dp_shard") + self.mesh.get_local_rank("dp_shard")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def dp_mesh(self) -> DeviceMesh | None:
        """The mesh FSDP shards over: 2-D (replicate, shard) for HSDP, 1-D otherwise; None
        without data parallelism."""
        if self.dp_size == 1:
            return None
        if self.size("dp_replicate") > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp_shard"]

    def dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` in place over the data-parallel ranks (the tp ranks hold equal values)."""
        for dim in DIMS[:2]:
            if self.size(dim) > 1:
                dist.all_reduce(tensor, group=self.mesh.get_group(dim))
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        shutdown()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup(dp_replicate: int, dp_shard: int, tp: int, device: str = "auto") -> Runtime | None:
    """Join torchrun's process group and build the mesh; None for a single process.

    `device`: "auto" (CUDA when present), "cpu" or "cuda". Each process takes the GPU of its
    LOCAL_RANK. Backend: NCCL for CUDA, gloo for CPU."""
    sizes = {"parallel.dp_replicate": dp_replicate, "parallel.dp_shard": dp_shard, "parallel.tp": tp}
    for key, value in sizes.items():
        if value < 1:
            raise CamelidError(f"{key} must be at least 1 (got {value})")
    world = world_size()
    product = dp_replicate * dp_shard * tp
    if product != world:
        how = ("this is a single process: launch it with torchrun --nproc-per-node=N (see docs/distributed.md)"
               if world == 1 else f"torchrun started {world} processes")
        raise CamelidError(
            f"parallel.dp_replicate x parallel.dp_shard x parallel.tp = {dp_replicate} x {dp_shard} x {tp} = "
            f"{product}, but {how}; set them so that their product is the number of processes")
    if world == 1:
        return None
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cpu", "cuda"):
        raise CamelidError(f"train.device: under torchrun choose auto, cpu or cuda (got {device!r}); "
                           "each process takes the GPU of its LOCAL_RANK")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    mesh = init_device_mesh(dev.type, (dp_replicate, dp_shard, tp), mesh_dim_names=DIMS)
    return Runtime(mesh=mesh, device=dev, rank=dist.get_rank(), world=world)
