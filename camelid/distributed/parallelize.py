"""Parallelism applied to a built Transformer from the outside, in torchtitan's order (each step
wraps what the previous one produced):

1. tensor + sequence parallelism (Megatron-LM, Shoeybi et al. 2019; Korthikanti et al. 2022):
   the column-parallel wq/wk/wv/w1/w3 and the row-parallel wo/w2 split every block's matrix
   products over the tp ranks with one all-gather and one reduce-scatter per sub-layer; between
   sub-layers the residual stream is split along the sequence, so norms and residual adds work
   on T/tp tokens and store 1/tp of the activations (the paper's "model and sequence
   parallelism", section 2.4). DTensor's `parallelize_module` does the collectives;
2. activation checkpointing (camelid.distributed.activation_checkpoint), per block;
3. torch.compile, per block (one graph compiled once and reused by every layer);
4. FSDP2 `fully_shard` per block and on the root (ZeRO-3: parameters, gradients and optimizer
   states sharded over the data-parallel ranks; with dp_replicate > 1 the 2-D mesh gives HSDP,
   sharded within a group, replicated across groups). FSDP2 prefetches the next block's
   all-gather implicitly (forward and backward), overlapping communication with compute.

The model is built on the meta device, parallelized there, then materialised shard by shard
(`init_weights`), so no rank ever holds the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from camelid.distributed.activation_checkpoint import apply_activation_checkpointing
from camelid.errors import CamelidError
from camelid.model import Transformer
from camelid.model.inductor import use_inductor_layers

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class ParallelConfig:
    activation_checkpointing: str = "none"     # none, selective or full
    compile: bool = False
    bf16: bool = False                         # FSDP gathers bf16 weights, reduces gradients in fp32
    async_tp: bool = False                     # overlap TP collectives with matmuls (CUDA + compile only)


def clean_name(name: str) -> str:
    """A parameter name without the prefixes that wrappers add."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def parallelize(model: Transformer, mesh: DeviceMesh, cfg: ParallelConfig) -> Transformer:
    """Apply TP+SP, activation checkpointing, compile and FSDP2 to `model` (in place, on any
    device, the meta device included). `mesh` has the dimensions dp_replicate, dp_shard and tp
    (camelid.distributed.runtime builds it); a dimension of size 1 applies nothing."""
    tp = mesh["tp"].size()
    if tp > 1:
        check_tp(model, tp)
        apply_tp(model, mesh["tp"])
        if cfg.async_tp:
            enable_async_tp(mesh, cfg)
    elif cfg.async_tp:
        raise CamelidError("parallel.async_tp needs tensor parallelism: set parallel.tp > 1 or async_tp = false")
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        if tp > 1:
            # The embedding hands the first block an AsyncCollectiveTensor (its reduce-scatter
            # still in flight). Entering a compiled graph as is, its gradient bypasses the
            # DTensor-to-local step on the way back: with torch 2.13 the backward fails, or under
            # FSDP the gradients come out silently wrong (a fifth too small a norm at step 1;
            # AsyncCollectiveTensor at graph boundaries: pytorch/pytorch#118671, #180614). An
            # eager copy waits for the collective and keeps the autograd chain whole
            # (tests/test_distributed.py checks the compiled gradients).
            model.tok_embeddings.register_forward_hook(lambda module, inputs, output: output.clone())
        use_inductor_layers(model)  # the model's layers in the forms inductor compiles well
        for block in model.layers:
            block.compile()  # in place: parameter names stay the same
    sizes = dict(zip(mesh.mesh_dim_names, mesh.shape))
    if sizes["dp_replicate"] * sizes["dp_shard"] > 1:
        dp = mesh["dp_replicate", "dp_shard"] if sizes["dp_replicate"] > 1 else mesh["dp_shard"]
        apply_fsdp(model, dp, cfg.bf16)
    return model


# ---- tensor and sequence parallelism -------------------------------------------------------------

def check_tp(model: Transformer, tp: int) -> None:
    c = model.config
    for what, n in (("model.n_heads", c.n_heads), ("model.n_kv_heads", c.kv_heads), ("the FFN hidden size", c.ffn_dim),
                    ("model.vocab_size", c.vocab_size)):
        if n % tp:
            raise CamelidError(f"parallel.tp = {tp} does not divide {what} ({n}); choose a tp that divides it")


def apply_tp(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism. The residual stream between sub-layers is a
    plain tensor holding this rank's T/tp positions ([B, T/tp, dim]); each sub-layer gathers the
    whole sequence once (PrepareModuleInput), runs its column-parallel products on local heads
    or FFN columns, and its row-parallel output projection reduce-scatters back to sequence
    shards. The embedding is split over the vocabulary (row-wise: each rank looks up the tokens
    it owns, the partial sums are reduce-scattered over the sequence)."""
    tp = tp_mesh.size()
    top = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
           # the final norm returns a sequence-sharded DTensor: the trainer gathers it for the loss
           "norm": SequenceParallel()}
    if model.output is not None:
        # the head weight is only stored split over the vocabulary: the loss reads it whole
        # (`full_tensor`), since training never calls model.output
        top["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    parallelize_module(model, tp_mesh, top)
    # The attention block is called as attention(x, rotation, cache, positions, mask): only x is
    # distributed; the rotary tables are computed identically on every rank.
    block_plan = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan)
        # Attention reshapes its projections with self.n_heads / self.n_kv_heads: after the
        # column split each rank holds 1/tp of the heads (as torchtitan adjusts them).
        block.attention.n_heads //= tp
        block.attention.n_kv_heads //= tp


def enable_async_tp(mesh: DeviceMesh, cfg: ParallelConfig) -> None:
    """Async TP (Wang et al., 2022, "Overlap communication with dependent computation via
    decomposition"): inductor splits each all-gather + matmul and matmul + reduce-scatter into
    chunks that overlap, through symmetric memory. Only compiled code on CUDA (NCCL) gets it;
    gloo has no symmetric memory."""
    if mesh.device_type != "cuda" or not cfg.compile:
        raise CamelidError("parallel.async_tp needs CUDA devices (NCCL) and train.compile = true; "
                           "set parallel.async_tp = false on CPUs")
    import torch._inductor.config as inductor_config

    inductor_config._micro_pipeline_tp = True


# ---- FSDP2 ----------------------------------------------------------------------------------------

def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, bf16: bool) -> None:
    # bf16 weights for the all-gathers and the matmuls, fp32 for the gradient reduction and the
    # sharded master weights and optimizer states (torch.distributed.fsdp.MixedPrecisionPolicy).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        # the last block's weights are needed again at once by the backward pass: keep them
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < last)
    # the root holds the embedding, the final norm and the head; the trainer reads the head
    # weight right after `hidden`, so the root keeps its weights gathered until the backward
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    # training calls model.hidden, not forward: FSDP must gather the root's weights for it too
    register_fsdp_forward_method(model, "hidden")


# ---- materialising the weights --------------------------------------------------------------------

@torch.no_grad()
def init_weights(model: Transformer, seed: int, std: float) -> None:
    """Give a parallelized model (after `to_empty`) exactly the weights `Transformer.init_weights`
    gives a single-process one, holding one whole parameter at a time.

    The model's own `init_weights` runs on a stand-in whose `named_parameters` hands out, in the
    unwrapped model's order, a full-size empty tensor per parameter; once the initialiser has
    filled it (the generator advances), the next request copies this rank's shard of it into
    the real (DTensor) parameter. So the initialisation rules stay in the model alone."""
    params = {clean_name(n): p for n, p in model.named_parameters()}
    with torch.device("meta"):
        order = [n for n, _ in Transformer(model.config).named_parameters()]
    device = local(next(iter(params.values()))).device

    def full_parameters():
        for name in order:
            p = params[name]
            full = torch.empty(p.shape, dtype=p.dtype, device=device)
            yield name, full
            if isinstance(p, DTensor):
                shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(shard.to_local())
            else:
                p.copy_(full)

    stand_in = SimpleNamespace(config=model.config, named_parameters=full_parameters,
                               tok_embeddings=SimpleNamespace(weight=torch.empty(0, device=device)))
    Transformer.init_weights(stand_in, seed=seed, std=std)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def gather(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a DTensor (differentiable: the backward pass takes this rank's part
    of the gradient, which is right when every rank computes the same gradient)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
