"""How much memory finetuning a model takes on one device: fully, or with LoRA adapters over a
frozen base (Hu et al. 2021), or over a frozen 4-bit base (QLoRA, Dettmers et al. 2023).

`plan_finetune()` counts what one step of camelid's FinetuneTrainer allocates for a micro-batch of
B sequences of T tokens (N = B * T), gradients resident as from the second micro-batch of an
accumulated step on:

  full     pretraining's plan (camelid.plan.training) unchanged: the trainer builds the model
           the same way (fp32 master weights, bf16 autocast, AdamW over every weight).
  lora     weights: the base in the compute dtype (bf16 on a GPU, the trainer's choice, as the
           products run in it anyway), every weight frozen; the adapters (A [r, in], B [out, r]
           on each target layer) in fp32 with fp32 gradients and AdamW's two moments.
  qlora    weights: the base's linear layers as int4 codes in groups with an fp16 scale and
           minimum (the head int8; camelid.plan.inference.weight_bytes), the embedding and norms
           in the compute dtype; adapters as for lora.

For the adapter methods (a: bytes of the compute dtype; the residual stream is in it too):

  gathered     bf16 autocast's cast of each adapter matrix, held by the graph until the backward.
  activations  what a block saves for its backward. The frozen products save only their weight
               (a parameter, already counted), so a block keeps (checkpointing none): each
               norm's fp32 input and rsqrt; q, k, v, the attention output and its logsumexp;
               w1 x, w3 x and silu(w1 x); and per adapter its input (a copy per target in bf16,
               which LoRALinear casts to the adapter's fp32 and autocast back; in fp32 the
               targets reading one tensor share it) and A x. LoRA dropout adds a bool mask per
               target, and in fp32 its own output per target. The first block's input carries
               no gradient (the embedding is frozen), so its first norm saves nothing.
               selective: the block input and the outputs of every matrix product (the base's,
               A x and B A x) and of attention. full: the block input.
  working      the largest transient beyond those, of: the loss (the fused chunked loss over a
               plain head, with an fp32 head gradient when the head trains; with a
               quantized or adapted head, camelid.finetune.trainer.head_loss's checkpointed
               chunks of HEAD_CHUNK rows of logits, the head's weight dequantized for each);
               and the last block's backward (recomputing what it did not save, the gradient of
               the residual stream, of SwiGLU's factors, and the input gradient of the largest
               frozen product). QLoRA adds the one layer dequantized at a time: in the forward
               its whole weight, in the backward an fp32 input gradient summed over chunks of
               CHUNK_ELEMENTS dequantized weights (camelid.quant.layers.DequantizedProduct).
  update       AdamW's temporary over the adapters: small.

  total = weights + adapters + gradients + optimizer + overhead + max(gathered + activations + working, update)

tests/test_plan.py measures real FinetuneTrainer steps (camelid.plan.live) for all three methods
and holds the plan within 10% of them; docs/plan.md has the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.plan.budget import DTYPE_BYTES, Budget
from camelid.plan.inference import _dequantized, weight_bytes
from camelid.plan.training import (
    AC_MODES,
    FP32,
    LOSS_SLAB,
    TRAIN_DTYPES,
    Layout,
    block_values,
    loss_chunk,
    plan_training,
)

METHODS = ("full", "lora", "qlora")
QUANTIZE = ("int4", "int8")
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
TARGETS = (*DEFAULT_TARGETS, "output")
ADAPTER_OPTIMIZER = 2 * FP32          # AdamW's two fp32 moments per adapter weight
# camelid.finetune.trainer.HEAD_CHUNK and camelid.quant.layers.CHUNK_ELEMENTS (checked by a test)
HEAD_CHUNK = 1024
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class FinetuneRow(Budget):
    method: str
    ac: str
    dtype: str
    trainable_params: int
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int
    working: int
    update: int
    overhead: int

    LABELS = ("method", "ac", "dtype", "trainable_params")

    @property
    def compute(self) -> int:
        """The forward/backward peak beyond the resident state."""
        return self.gathered + self.activations + self.working

    @property
    def resident(self) -> int:
        return self.weights + self.adapters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.resident + self.overhead + max(self.compute, self.update)


# ---- the adapted layers -----------------------------------------------------------------------------

def block_layers(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer of a block, by camelid's name."""
    d, f, q, kv = c.dim, c.ffn_dim, c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    return {"wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q), "w1": (f, d), "w2": (d, f), "w3": (f, d)}


def adapter_params(c: ModelConfig, rank: int, targets: tuple[str, ...]) -> int:
    """Trainable parameters: r * (in + out) per adapted layer."""
    layers = block_layers(c)
    block = sum(rank * (layers[t][0] + layers[t][1]) for t in targets if t != "output")
    head = rank * (c.head_size + c.dim) if "output" in targets else 0
    return c.n_layers * block + head


def check_settings(c: ModelConfig, method: str, rank: int, targets: tuple[str, ...], quantize: str,
                   group_size: int) -> None:
    if method not in METHODS:
        raise CamelidError(f"--finetune {method!r}: choose one of {', '.join(METHODS)}")
    if rank < 1:
        raise CamelidError(f"--rank must be at least 1 (got {rank})")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise CamelidError(f"lora.targets {list(targets)}: choose among {', '.join(TARGETS)}")
    shapes = {**block_layers(c), "output": (c.head_size, c.dim)}
    for t in targets:
        if rank > min(shapes[t]):
            raise CamelidError(f"--rank {rank}: larger than layer {t} allows (at most {min(shapes[t])})")
    if quantize not in QUANTIZE:
        raise CamelidError(f"model.quantize {quantize!r}: choose int4 or int8")
    if method == "qlora" and quantize == "int4" and (c.dim % group_size or c.ffn_dim % group_size):
        raise CamelidError(f"int4 groups of {group_size} do not divide the model's widths ({c.dim}, {c.ffn_dim})")


# ---- activations ------------------------------------------------------------------------------------

def adapter_saved(c: ModelConfig, n: int, a: int, rank: int, targets: tuple[str, ...], dropout: bool,
                  cpu: bool = False) -> int:
    """Bytes one block's adapters save: their inputs and A x (and dropout's masks: bool on CUDA,
    in the input's dtype on a CPU, whose dropout multiplies by a float mask)."""
    layers = block_layers(c)
    mine = [t for t in targets if t != "output"]
    if a == FP32 and not dropout:
        # LoRALinear's cast to fp32 is the tensor itself: the targets reading one tensor share
        # it; wo reads the attention output, which attention saves anyway
        inputs = n * FP32 * (c.dim * any(t in mine for t in ("wq", "wk", "wv"))
                             + c.dim * any(t in mine for t in ("w1", "w3")) + c.ffn_dim * ("w2" in mine))
    else:
        mask = (a if cpu else 1) if dropout else 0
        inputs = sum(n * layers[t][1] * (a + mask) for t in mine)      # a copy (and a mask) each
    return inputs + sum(n * rank * a for t in mine)


def adapter_block_activations(c: ModelConfig, ac: str, n: int, a: int, rank: int, targets: tuple[str, ...],
                              dropout: bool, cpu: bool = False) -> int:
    """Bytes one adapted block saves for its backward, under checkpointing `ac`."""
    v = block_values(c, n, a, 1)
    layers = block_layers(c)
    mine = [t for t in targets if t != "output"]
    if ac == "full":
        return n * c.dim * a                               # its input, in the compute dtype
    kv = n * c.kv_heads * c.head_dim * a
    products = v["qk"] + kv                                # q, k (rotated) and v
    attention = v["v_and_attention"] - kv                  # the output and its logsumexp
    if ac == "selective":
        adapters = sum(n * (rank + layers[t][0]) * a for t in mine)   # A x and B A x
        return n * c.dim * a + products + attention + v["w1_w3"] + v["wo_w2"] + adapters
    norms = 2 * (n * c.dim * FP32 + n * FP32)              # each norm's fp32 input and rsqrt
    swiglu = v["w1_w3"] + v["swiglu"] // 2                 # w1 x, w3 x, silu(w1 x)
    return norms + products + attention + swiglu + adapter_saved(c, n, a, rank, targets, dropout, cpu)


# ---- the plan ---------------------------------------------------------------------------------------

def plan_finetune(c: ModelConfig, method: str = "qlora", micro_batch: int = 1, seq_len: int = 512,
                  dtype: str = "bfloat16", rank: int = 16, targets: tuple[str, ...] = DEFAULT_TARGETS,
                  dropout: bool = True, quantize: str = "int4", group_size: int = 32, overhead: int = 0,
                  modes: tuple[str, ...] = AC_MODES, layout: Layout = Layout(), cpu: bool = False) -> list[FinetuneRow]:
    """One row per activation-checkpointing mode. `cpu`: camelid's CPU kernels dequantize a QLoRA
    layer in one pass (no temporaries)."""
    check_settings(c, method, rank, targets, quantize, group_size)
    if layout.tp > 1:
        raise CamelidError("--tp: camelid finetune shards with FSDP only (--dp-shard); drop --tp")
    if method == "full":
        return [FinetuneRow("full", r.ac, r.dtype, c.num_params(), r.parameters, 0, r.gradients, r.optimizer,
                            r.gathered, r.activations, r.working, r.update, r.overhead)
                for r in plan_training(c, layout, micro_batch, seq_len, dtype, overhead, modes)]
    if layout.devices > 1:
        raise CamelidError(f"--finetune {method} runs in one process: drop --dp-shard, --dp-replicate and --tp")
    plan_training(c, layout, micro_batch, seq_len, dtype, overhead, modes)   # the shared checks
    a, n = DTYPE_BYTES[dtype], micro_batch * seq_len
    trainable = adapter_params(c, rank, targets)
    weights = weight_bytes(c, quantize, dtype, group_size) if method == "qlora" else c.num_params() * a
    gathered = trainable * a if a != FP32 else 0             # autocast's casts of the adapters
    rows = []
    for mode in modes:
        saved = c.n_layers * adapter_block_activations(c, mode, n, a, rank, targets, dropout, cpu)
        if mode == "none":                                   # the frozen embedding: no gradient into block 0
            saved -= n * c.dim * FP32 + n * FP32
        working = _working(c, method, mode, n, seq_len, a, rank, targets, dropout, quantize, group_size, cpu)
        rows.append(FinetuneRow(method, mode, dtype, trainable, weights, trainable * FP32, trainable * FP32,
                                trainable * ADAPTER_OPTIMIZER, gathered, saved, working, trainable * FP32, overhead))
    return rows


def _working(c: ModelConfig, method: str, ac: str, n: int, seq_len: int, a: int, rank: int,
             targets: tuple[str, ...], dropout: bool, quantize: str, group_size: int, cpu: bool) -> int:
    """The largest transient beyond the saved activations: the loss's forward and backward, the
    last block's backward, and (QLoRA) a layer dequantized."""
    d, v, f = c.dim, c.head_size, c.ffn_dim     # v: the head's rows (a scorer's num_labels)
    layers = block_layers(c)
    residual = n * d * a
    rope = max(seq_len, c.max_seq_len) * c.head_dim * FP32
    state = 2 * n * 8 + rope + residual                      # ids, targets, the RoPE table, the last hidden
    chunked_head = method == "qlora" or "output" in targets
    if chunked_head:
        rows = min(n, HEAD_CHUNK, max(1, LOSS_SLAB // v))
        # log-softmax's fp32 output, its gradient and the logits' fp32 gradient (a chunk's
        # forward, logits, their fp32 copy and log-softmax, is no larger)
        logits = 3 * FP32 * rows * v
        if method == "qlora":
            # a quantized head keeps no weight for backward (DequantizedProduct): its input
            # gradient comes later, from the logits' gradient, a block of dequantized head rows
            # and the fp32 sum
            hv = min(v, max(1, CHUNK_ELEMENTS // d))
            head_q = "int8" if quantize == "int4" else quantize
            block = hv * d * a if cpu else _dequantized(hv, d, head_q, a)
            head_w, logits = 0, max(logits, FP32 * rows * v + block + 2 * FP32 * rows * d)
        else:
            head_w = v * d * a
        loss = state + n * d * a + head_w + logits + rows * d * a    # the hidden's gradient, a chunk's
    else:
        kept = n * d * a + n                                  # the rows with a target, and the mask
        head_grad = v * d * FP32 if method == "full" else 0    # a frozen head gets no gradient
        grads = head_grad + n * d * a                          # the head's fp32 gradient, the hidden's
        forward = kept + grads + loss_chunk(c, n, a)
        backward = grads + (head_grad + v * d * a if head_grad else 0)   # the scaled head gradient, its cast
        loss = state + max(forward, backward)
    # the last block's backward: checkpointing first recomputes what the block did not keep;
    # then the residual stream's gradient and, at SwiGLU, two [N, ffn] gradients at once (QLoRA:
    # a frozen product's input gradient summed in fp32 over chunks of dequantized rows, once
    # the input it read is released)
    none = adapter_block_activations(c, "none", n, a, rank, targets, dropout, cpu)
    kept = adapter_block_activations(c, ac, n, a, rank, targets, dropout, cpu)
    recompute = max(0, none - kept) if ac != "none" else 0
    gradients = 2 * n * f * a
    if method == "qlora":
        def backward(o: int, i: int) -> int:
            rows = min(o, max(1, CHUNK_ELEMENTS // i))
            chunk = rows * i * a if cpu else _dequantized(rows, i, quantize, a)
            cast = n * i * a if a != FP32 else 0      # the sum cast back, the last chunk's product alive
            return n * i * (FP32 + a) + cast + chunk - n * i * a
        gradients = max(gradients, *(backward(o, i) for o, i in layers.values()))
    block = state + residual + recompute + gradients
    # QLoRA's forward: one layer's weight dequantized whole, beside its output
    if method == "qlora":
        o, i = max(layers.values(), key=lambda s: s[0] * s[1])
        one = o * i * a + n * o * a if cpu else max(_dequantized(o, i, quantize, a), o * i * a + n * o * a)
        block = max(block, state + one)
    return max(loss, block)
