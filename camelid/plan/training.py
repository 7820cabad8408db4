"""How much memory training a model takes per device, worked out from its config and layout.

`plan_training()` counts what one step of camelid's trainer allocates on each device for a
micro-batch of B sequences of T tokens (N = B * T), with AdamW, under a layout of dp_replicate x
dp_shard x tp devices (camelid.distributed.parallelize: FSDP2 over dp_shard, replicated over
dp_replicate, Megatron tensor + sequence parallelism over tp). Gradients are taken as resident
throughout, as they are from the second micro-batch of an accumulated step on. Per device:

  parameters   fp32 master weights, 4 bytes each: the matrices (embedding and head split over
               the vocabulary) divided by dp_shard * tp, the norms' gains by dp_shard (tensor
               parallelism replicates them).
  gradients    fp32, sharded as the parameters.
  optimizer    AdamW's two fp32 moments per parameter, sharded likewise.
  gathered     weights held whole in the compute dtype while computing. With FSDP (dp_replicate
               x dp_shard > 1): the root (embedding, head, final norm), which stays gathered from
               forward to backward, and two blocks (the one computing and the one prefetched),
               each 1/tp under TP. Without FSDP, bfloat16 autocast caches a bf16 copy of every
               block's matrices until the forward ends (with no checkpointing the backward keeps
               them).
  activations  what the blocks save for the backward pass, per block (a: 2 bytes in bfloat16, 4
               in float32; the residual stream and the norms' insides stay fp32 under autocast):
               - none: the block input, both norms' fp32 normalised values and the residual
                 after attention (4 * N*dim * 4 bytes); the norm outputs the matrix products
                 read (fp32: 2 * N*dim * 4; bf16: a cast per product, 5 * N*dim * 2); rotated q
                 and k, v, the attention output (2 * N*(q+kv) * a) and its logsumexp; SwiGLU's
                 w1 x, silu(w1 x), w3 x and their product (4 * N*ffn * a).
               - selective: the block input, the outputs of the seven matrix products and of
                 attention (camelid.distributed.activation_checkpoint keeps those, recomputes
                 the rest).
               - full: the block input (N*dim * 4).
               Under TP the heads and FFN columns are 1/tp, and sequence parallelism splits the
               residual stream and the norms' insides; the norm outputs are gathered whole for
               the products, and wo and w2 produce whole [N, dim] partial sums before their
               reduce-scatter, which selective checkpointing keeps.
  working      the largest transient beyond the saved activations, of three moments: the fused
               loss (camelid.train.loss) computing a chunk of c = 2^24 / vocab rows of logits (the
               logits, their softmax in the same dtype and, from the second chunk on, the previous
               chunk's probabilities still bound: 12 * c * vocab bytes, 6 in bf16)
               beside its fp32 head gradient and [N, dim] input gradient; the loss's backward
               (two fp32 head gradients); and the last block's backward, which recomputes what
               the block did not save, with the gradients of its FFN and of one weight in flight
               (and a tied head's gradient, which waits for the embedding's).
  update       AdamW's temporary during optimizer.step (foreach: sqrt of the second moment for
               the largest parameter group, the matrices): not at the same time as the above.
  overhead     a fixed allowance: CUDA context, cuBLAS workspaces, NCCL buffers, allocator slack.

  total = parameters + gradients + optimizer + overhead + max(gathered + activations + working,
  update)

camelid.plan.live.measure_training_step measures the same peak on a real trainer, and
tests/test_plan.py holds the two together for every checkpointing mode in float32 and bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

from camelid.config import ModelConfig
from camelid.distributed.activation_checkpoint import MODES as AC_MODES
from camelid.errors import CamelidError
from camelid.plan.budget import DTYPE_BYTES, Budget
from camelid.train.config import DTYPES as TRAIN_DTYPES
from camelid.train.loss import SLAB as LOSS_SLAB

TRAIN_OVERHEAD = 2 * 2**30                  # CUDA context, cuBLAS workspaces, NCCL buffers, slack
FP32 = 4


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def devices(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def fsdp(self) -> bool:
        """parallelize() applies FSDP2 whenever there is data parallelism (HSDP with replicas)."""
        return self.dp_replicate * self.dp_shard > 1

    def describe(self) -> str:
        """"one device", or "512 devices (dp_shard 64 x tp 8)"."""
        parts = [f"{k} {v}" for k, v in (("dp_replicate", self.dp_replicate), ("dp_shard", self.dp_shard),
                                          ("tp", self.tp)) if v > 1]
        return f"{self.devices} devices ({' x '.join(parts)})" if parts else "one device"


@dataclass(frozen=True)
class TrainRow(Budget):
    ac: str
    dtype: str
    parameters: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int
    working: int
    update: int
    overhead: int

    LABELS = ("ac", "dtype")

    @property
    def compute(self) -> int:
        """The forward/backward peak beyond the resident state."""
        return self.gathered + self.activations + self.working

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.overhead + max(self.compute, self.update)


# ---- parameters ------------------------------------------------------------------------------------

def block_matrices(c: ModelConfig) -> int:
    """Weights of one block's seven matrix products (tensor parallelism splits them all)."""
    q, kv = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    return 2 * c.dim * q + 2 * c.dim * kv + 3 * c.dim * c.ffn_dim


def root_matrices(c: ModelConfig) -> int:
    """Embedding and output head (split over the vocabulary under TP; a scorer's head has
    num_labels rows)."""
    return (c.vocab_size + (0 if c.tie_embeddings else c.head_size)) * c.dim


def sharded_params(c: ModelConfig, layout: Layout) -> tuple[int, int]:
    """(matrix, norm) parameters each device stores: matrices over dp_shard * tp, the norms'
    gains over dp_shard alone (TP replicates them). Rounded up, as FSDP pads the last shard."""
    matrices = c.n_layers * block_matrices(c) + root_matrices(c)
    norms = (2 * c.n_layers + 1) * c.dim
    return -(-matrices // (layout.dp_shard * layout.tp)), -(-norms // layout.dp_shard)


# ---- activations -----------------------------------------------------------------------------------

def block_values(c: ModelConfig, n: int, a: int, tp: int) -> dict[str, int]:
    """Bytes of the values a block computes over n tokens that its backward may need (a: bytes of
    the compute dtype), per device: heads and FFN columns are 1/tp, and sequence parallelism
    splits the residual stream and the norms' insides; the norm outputs are gathered whole for
    the matrix products, and wo and w2 produce whole [n, dim] partial sums before reduce-scatter."""
    d, f = c.dim, c.ffn_dim
    q, kv = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    return {
        "input": n * d * FP32 // tp,                                   # the fp32 residual stream
        "norms": (3 * n * d + 2 * n) * FP32 // tp,                     # normalised values, attention sum, rsqrt
        "matmul_inputs": 2 * n * d * FP32 if a == FP32 else 5 * n * d * a,  # norm outputs; bf16: a cast per product
        "qk": n * (q + kv) * a // tp,                                  # q and k, before or after RoPE
        "v_and_attention": (n * kv * a + n * q * a + n * c.n_heads * FP32) // tp,  # v, output, logsumexp
        "w1_w3": 2 * n * f * a // tp,
        "swiglu": 2 * n * f * a // tp,                                 # silu(w1 x) and the product
        "wo_w2": 2 * n * d * a,
    }


def block_activations(c: ModelConfig, ac: str, n: int, a: int, tp: int) -> int:
    """Bytes one block saves for its backward: everything (none); the outputs of the matrix
    products and of attention (selective); its input (full)."""
    v = block_values(c, n, a, tp)
    if ac == "full":
        return v["input"]
    if ac == "selective":
        return v["input"] + v["qk"] + v["v_and_attention"] + v["w1_w3"] + v["wo_w2"]
    return sum(v.values()) - v["wo_w2"]          # rotated q and k: RoPE's backward needs neither input


def block_recomputed(c: ModelConfig, ac: str, n: int, a: int, tp: int) -> int:
    """Bytes a checkpointed block recomputes for its backward, beside what it saved."""
    v = block_values(c, n, a, tp)
    if ac == "full":
        return block_activations(c, "none", n, a, tp) - v["input"]
    if ac == "selective":
        # the cheap values; the saved q and k give way to their rotations, and wo's saved output
        # is dropped once the recomputation has added it to the residual stream
        return v["norms"] + v["matmul_inputs"] + v["swiglu"] - v["wo_w2"] // 2
    return 0


def loss_chunk(c: ModelConfig, n: int, a: int) -> int:
    """Peak of the fused loss's loop over chunks of rows (camelid.train.loss); v is the head's
    rows (the vocabulary, or a scorer's num_labels)."""
    v, bf16 = c.head_size, a != FP32
    rows = min(n, max(1, LOSS_SLAB // v))

    def logits(r: int) -> int:
        """A chunk's logits and their softmax, in the same dtype."""
        return 2 * a * r * v

    # from the second chunk on, the previous chunk's probabilities are still bound to their name
    # while the next chunk's logits and softmax are computed
    later = min(rows, n - rows)
    carried = (logits(later) + a * rows * v) if later else 0
    # bf16: the probabilities and the bf16 [vocab, dim] product added to grad_w
    update = (a * rows * v + a * v * c.dim) * bf16
    return max(logits(rows), carried, update)


def _moments(c: ModelConfig, layout: Layout, ac: str, n: int, seq_len: int, a: int) -> tuple[int, int]:
    """(gathered, working): weights held in the compute dtype and the largest transient beyond
    the saved activations, over the loss's forward, its backward and the last block's backward."""
    tp, d, v = layout.tp, c.dim, c.vocab_size
    block = block_matrices(c) // tp + 2 * d
    param_bytes = a if layout.fsdp else FP32        # FSDP gathers in the compute dtype
    if layout.fsdp:
        gathered = (root_matrices(c) // tp + d + 2 * block) * a
        gathered_fwd = gathered_bwd = gathered
        block_grads = block * (a + FP32)            # the block's unsharded gradient, its fp32 reduce-scatter copy
    else:
        gathered_fwd = c.n_layers * block_matrices(c) // tp * 2 if a != FP32 else 0  # autocast's cache
        gathered_bwd = gathered_fwd if ac == "none" else gathered_fwd // c.n_layers
        block_grads = 0
    weight_grad = c.ffn_dim * d // tp * (a + (FP32 if a != FP32 else 0))  # w2's gradient (and its fp32 cast)
    residual = n * d * FP32
    final_norm = 2 * residual // tp + 2 * n * 8 + seq_len * c.head_dim * FP32  # + ids, targets, RoPE table
    head = v * d * (param_bytes if tp > 1 else 0) + v * d * a * (param_bytes != a)  # whole head, its cast
    grads = v * d * FP32 + n * d * a
    loss_forward = final_norm + residual + grads + n * d * a * (a != FP32) + head + loss_chunk(c, n, a)
    loss_backward = final_norm + grads + v * d * FP32 + residual
    recompute = block_recomputed(c, ac, n, a, tp)
    # the last block's backward, all its values recomputed: the gradient of the residual stream and,
    # in SwiGLU's backward, the gradients of the product (then freed) and of its two factors, or
    # of the product and of w2's weight. A tied head's gradient waits in autograd's buffer for the
    # embedding's to join it.
    swiglu = n * c.ffn_dim * a // tp
    tied = v * d * FP32 if c.tie_embeddings else 0
    block_backward = recompute + residual // tp + max(2 * swiglu, swiglu + weight_grad) + block_grads + tied
    moments = [(gathered_fwd, loss_forward), (gathered_bwd, loss_backward), (gathered_bwd, block_backward)]
    peak = max(g + w for g, w in moments)
    return gathered_fwd, peak - gathered_fwd


def check_layout(c: ModelConfig, layout: Layout, micro_batch: int, seq_len: int) -> None:
    for flag, value in (("--dp-replicate", layout.dp_replicate), ("--dp-shard", layout.dp_shard),
                        ("--tp", layout.tp), ("--micro-batch", micro_batch), ("--seq-len", seq_len)):
        if value < 1:
            raise CamelidError(f"{flag} must be at least 1 (got {value})")
    for what, n in (("n_heads", c.n_heads), ("n_kv_heads", c.kv_heads), ("the FFN width", c.ffn_dim),
                    ("vocab_size", c.vocab_size)):
        if n % layout.tp:
            raise CamelidError(f"--tp {layout.tp} does not divide the model's {what} ({n}); pick a tp that does")
    if seq_len % layout.tp:
        raise CamelidError(f"--tp {layout.tp} does not divide --seq-len {seq_len}: sequence parallelism splits each "
                           "sequence over the tp devices")


def plan_training(c: ModelConfig, layout: Layout = Layout(), micro_batch: int = 1, seq_len: int = 2048,
                  dtype: str = "bfloat16", overhead: int = TRAIN_OVERHEAD,
                  modes: tuple[str, ...] = AC_MODES) -> list[TrainRow]:
    """One row per activation-checkpointing mode: the per-device memory of a training step."""
    check_layout(c, layout, micro_batch, seq_len)
    if dtype not in TRAIN_DTYPES:
        raise CamelidError(f"--dtype {dtype!r}: training computes in {' or '.join(TRAIN_DTYPES)}")
    for mode in modes:
        if mode not in AC_MODES:
            raise CamelidError(f"--ac {mode!r}: choose one of {', '.join(AC_MODES)}")
    a, n = DTYPE_BYTES[dtype], micro_batch * seq_len
    matrices, norms = sharded_params(c, layout)
    state = (matrices + norms) * FP32
    rows = []
    for mode in modes:
        saved = c.n_layers * block_activations(c, mode, n, a, layout.tp)
        gathered, working = _moments(c, layout, mode, n, seq_len, a)
        rows.append(TrainRow(mode, dtype, state, state, 2 * state, gathered, saved, working,
                             matrices * FP32, overhead))
    return rows
