"""The processes of a run: one (`SingleProcessRuntime`) or a torchrun job (`DistributedRuntime`),
both behind the one `Runtime` interface, so that code above asks the runtime instead of
asking whether there is one.

torchrun (torch.distributed.run) starts one process per device and gives each RANK,
LOCAL_RANK, WORLD_SIZE and the rendezvous address in its environment; `setup` reads them,
checks that the configured layout uses exactly that many processes, and builds a 3-D
DeviceMesh (dp_replicate, dp_shard, tp). Dimensions of size 1 are kept, so that every rank
can slice every name; tp is the innermost dimension, so a tensor-parallel group is made of
consecutive ranks, which torchrun places on one node (TP exchanges activations in every layer
and needs the node's NVLink; data parallelism only exchanges weights and gradients).
A single process has no process group and no mesh: its sums and broadcasts return their input."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from camelid.distributed.grads import align_grads, clip_grad_norm
from camelid.errors import CamelidError

DIMS = ("dp_replicate", "dp_shard", "tp")
T = TypeVar("T")


def world_size() -> int:
    """Processes in this run according to torchrun's environment (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Runtime(Protocol):
    """Where this process stands in the run and the collectives it takes part in."""

    device: torch.device
    rank: int
    world: int                  # processes in the run
    mesh: DeviceMesh | None     # (dp_replicate, dp_shard, tp); None for a single process

    @property
    def distributed(self) -> bool:
        """Several processes: the model is parallelized over `mesh` and its state is sharded."""

    @property
    def tp(self) -> int: ...

    @property
    def dp_size(self) -> int: ...

    @property
    def dp_rank(self) -> int: ...

    @property
    def main(self) -> bool:
        """The process that logs and writes what is written once (rank 0)."""

    def dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the data-parallel ranks, the same on every rank."""

    def clip_grad_norm(self, params: Iterable[torch.Tensor], max_norm: float) -> float:
        """Clip the gradients to a global L2 norm of `max_norm`; the norm before clipping."""

    def barrier(self) -> None: ...

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""

    def describe(self) -> str:
        """The layout for a log line ("" for a single process)."""

    def close(self) -> None:
        """Leave the process group, if any."""


def pick_device(name: str) -> torch.device:
    """train.device for a single process: "auto" (CUDA when present) or any torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class SingleProcessRuntime:
    """One process, no process group: sums and broadcasts return what they are given, and
    gradients are clipped by torch's own clip_grad_norm_."""

    rank, world, tp, dp_size, dp_rank = 0, 1, 1, 1, 0
    main, distributed = True, False
    mesh = None

    def __init__(self, device: torch.device):
        self.device = device

    def dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def clip_grad_norm(self, params: Iterable[torch.Tensor], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: T) -> T:
        return obj

    def describe(self) -> str:
        return ""

    def close(self) -> None:
        pass


@dataclass
class DistributedRuntime:
    """One of torchrun's processes, in the process group and on the mesh that `setup` built."""

    mesh: DeviceMesh
    device: torch.device
    rank: int
    world: int
    distributed = True

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

    def dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` in place over the data-parallel ranks (the tp ranks hold equal values)."""
        for dim in DIMS[:2]:
            if self.size(dim) > 1:
                dist.all_reduce(tensor, group=self.mesh.get_group(dim))
        return tensor

    def clip_grad_norm(self, params: Iterable[torch.Tensor], max_norm: float) -> float:
        """Over parameters on different meshes, the same norm on every rank (camelid.distributed.grads)."""
        params = list(params)
        align_grads(params)
        return clip_grad_norm(params, max_norm)

    def barrier(self) -> None:
        dist.barrier()

    def broadcast(self, obj: T) -> T:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def describe(self) -> str:
        sizes = ", ".join(f"{dim} {self.size(dim)}" for dim in DIMS)
        return f"{self.world} processes ({sizes})"

    def close(self) -> None:
        shutdown()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup(dp_replicate: int, dp_shard: int, tp: int, device: str = "auto") -> Runtime:
    """The runtime of this process: a single process, or torchrun's process group joined and the
    mesh built.

    `device`: "auto" (CUDA when present) or a device name; under torchrun "auto", "cpu" or
    "cuda", and each process takes the GPU of its LOCAL_RANK. Backend: NCCL for CUDA, gloo for CPU."""
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
        return SingleProcessRuntime(pick_device(device))
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
    return DistributedRuntime(mesh=mesh, device=dev, rank=dist.get_rank(), world=world)
