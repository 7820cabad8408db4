"""The planners' quantity, measured: peak bytes of tensor storage alive while code runs.

A plan is only worth what it predicts, so tests/test_plan.py and benchmarks/memory.py run the
real thing and compare. What a plan counts is the tensors alive at the worst moment, which is
also what a CUDA caching allocator reports as max_memory_allocated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

if TYPE_CHECKING:
    from camelid.train.trainer import Trainer


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive while the `with` block runs: the quantity the plans
    predict, measured.

    Every tensor an operation returns is tracked by a weak reference to its storage until it is
    freed; views share their base's storage and count once. The baseline is what exists before:
    the given modules' parameters and buffers (the weights), optimizers' states and further
    tensors (gradients, say), each counted until it is freed. Composite operations without a
    kernel of their own on the device run as their parts, so their temporaries count too
    (scaled_dot_product_attention's float copy of a boolean mask); those with one (silu_backward)
    run as the one kernel they are. Memory a kernel takes outside tensors (scratch of a few MB)
    is not seen. Unlike the process's resident set it is exact and repeatable: no allocator
    caching, no libraries, no mmap'd files.
    """

    def __init__(self, *objects: torch.nn.Module | torch.optim.Optimizer | torch.Tensor):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        for obj in objects:
            for t in _tensors_of(obj):
                self._track(t)
        self.baseline = self.peak = self._total()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        known = self._live.get(ref.cdata)
        if known is None or known[0].expired():   # a freed storage's address can come back
            self._live[ref.cdata] = (ref, storage.nbytes())

    def _total(self) -> int:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            del self._live[key]
        return sum(n for _, n in self._live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = NotImplemented
        if _runs_as_parts(func, args, kwargs):
            with self:
                out = func.decompose(*args, **kwargs)
        if out is NotImplemented:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        self.peak = max(self.peak, self._total())
        return out


def _tensors_of(obj: torch.nn.Module | torch.optim.Optimizer | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return [*obj.parameters(), *obj.buffers()]
    if isinstance(obj, torch.optim.Optimizer):
        return [v for state in obj.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return [obj]


_BACKENDS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}


def _runs_as_parts(func, args, kwargs) -> bool:
    """Whether the device runs `func` as its composite parts: it has no kernel of its own there.
    (silu_backward has a fused CPU kernel beside its composite definition; SDPA has none.)"""
    tensor = next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)), None)
    key = _BACKENDS.get(tensor.device.type) if tensor is not None else None
    return key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)


def measure_training_step(trainer: Trainer) -> tuple[int, int, int]:
    """(resident, step peak, forward/backward peak) in bytes of tensors alive on a single-process
    trainer: weights, gradients and AdamW states; their peak over one train_step; and over the
    forward and backward of one more micro-batch (loss_sum, as train_step calls it), all with
    gradients resident. Runs a step first, which creates the optimizer states. For the plan's
    assumption of resident gradients to hold, the trainer should accumulate at least two
    micro-batches a step."""

    def resident() -> list:
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        return [trainer.model, trainer.optimizer, *grads]

    trainer.train_step()
    with LiveTensorBytes(*resident()) as step:
        trainer.train_step()
    batch = trainer.train_loader.next_batch()
    with LiveTensorBytes(*resident()) as compute:
        trainer.loss_sum(batch).backward()
    return step.baseline, step.peak, compute.peak
