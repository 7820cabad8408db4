"""How much memory generating with a model takes, worked out from its config alone.

`plan()` counts what camelid itself allocates to generate at batch B with a context of T tokens
(prompt plus new tokens; the engine sizes its KV cache to exactly that). The largest step of a
generation is the prefill, taken here as a prompt of all T tokens in one forward pass:

  weights      float rows: every parameter in the row's dtype. int8: one byte per weight of each
               linear layer plus an fp32 scale per output row; int4: half a byte per weight plus
               an fp16 scale and an fp16 minimum per group of G weights, except the output head,
               which int4 models keep in int8. The embedding and the norms stay in the activation
               dtype, and a tied head gets a quantized copy of its own (camelid.quant).
               On a CPU with AVX-512 VNNI the compiled decoder (the default) also holds its
               tiles (camelid.quant.tiles): a second copy of the quantized layers' codes, scales
               and minimums, in another order (`decoder_tiles`; counted for every quantized
               layer, so an upper bound where LoRA or an odd shape leaves a layer untiled).
  KV cache     2 * layers * B * T * kv_heads * head_dim * bytes of the activation dtype.
  activations  the peak of the prefill, the largest of three moments (N = B * T tokens):
               - a feed-forward sub-block: the residual stream (block input, attention sum, its
                 norm: 3 * N * dim) and the SwiGLU hidden (silu(w1 x), w3 x, their product:
                 3 * N * ffn_dim);
               - an attention sub-block: block input and its norm, q, k, v, and RoPE's fp32
                 rotation of q or k (or the output projection's inputs);
               - the output head over the last position (every position with all_logits) and
                 an fp32 copy of its logits for sampling.
               A quantized layer multiplies many rows by a copy of its weight dequantized to the
               activation dtype (camelid's prefill path), so quantized rows add that copy where
               the layer runs. On CPU (`cpu=True`) camelid's kernels dequantize in one pass, into
               bfloat16 where the CPU multiplies it natively (with a bfloat16 copy of the input
               and of the product), and multiply up to 16 rows (the head over the last
               positions) straight from the codes, with no copy at all. Attention goes through
               scaled_dot_product_attention, whose fused kernels (flash on CPU and CUDA) never
               store the T x T scores; attention="math" adds them for a backend without one.
               A batch of prompts of different lengths is padded on the right
               (camelid.generate.core), so it needs no mask.
  overhead     a fixed allowance: CUDA context, cuBLAS workspaces, caching-allocator slack.

camelid.plan.live.LiveTensorBytes measures the same quantity on a real run, and
tests/test_plan.py holds the two together; training is planned in camelid.plan.training.

`kv_pool()` sizes camelid serve's paged KV cache (camelid.model.PagedKVCache) to a memory
budget: blocks of `block_size` tokens, each 2 (K and V) * layers * block_size * kv_heads *
head_dim * bytes of the cache's dtype, block 0 kept as scratch; `serving_pool()` is the pool in
what a plan's row leaves of a card beside its weights, activations and overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.plan.budget import DTYPE_BYTES, HEADROOM, Budget, gib_bytes
from camelid.quant import GROUP_SIZES
from camelid.quant.layers import FUSED_ROWS, NATIVE_BF16

PRECISIONS = ("float32", "bfloat16", "int8", "int4")  # best first; float16 costs what bfloat16 does
DEFAULT_OVERHEAD = 2**30    # CUDA context, cuBLAS workspaces, caching-allocator slack
DEFAULT_BLOCK_SIZE = 16     # tokens per block of camelid serve's KV pool (camelid.serve.Batcher's default)


@dataclass(frozen=True)
class Row(Budget):
    precision: str
    activation_dtype: str
    weights: int
    kv_cache: int
    activations: int
    overhead: int

    LABELS = ("precision", "activation_dtype")

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead


def head_precision(precision: str) -> str:
    """int4 models keep the output head in int8 per row (camelid.quant.head_scheme: every logit
    goes through it)."""
    return "int8" if precision == "int4" else precision


def quantized_bytes(out: int, inp: int, precision: str, group_size: int) -> int:
    if precision == "int8":
        return out * inp + out * 4                             # codes + fp32 scale per row
    return out * inp // 2 + out * (inp // group_size) * 2 * 2  # nibbles + fp16 scale, min per group


def weight_bytes(config: ModelConfig, precision: str, activation_dtype: str = "bfloat16",
                 group_size: int = 32, decoder_tiles: bool = False) -> int:
    if precision in DTYPE_BYTES:
        return config.num_params() * DTYPE_BYTES[precision]
    d, q, kv, f = config.dim, config.n_heads * config.head_dim, config.kv_heads * config.head_dim, config.ffn_dim
    block = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (d, f), (f, d)]
    linear = config.n_layers * sum(quantized_bytes(o, i, precision, group_size) for o, i in block)
    head = quantized_bytes(config.head_size, d, head_precision(precision), group_size)  # a scorer's: num_labels rows
    embedding_and_norms = (config.vocab_size + 2 * config.n_layers + 1) * d * DTYPE_BYTES[activation_dtype]
    return (linear + head) * (2 if decoder_tiles else 1) + embedding_and_norms


def tiles_here() -> bool:
    """Whether this CPU has what camelid's decode tiles need (AVX-512 with VNNI)."""
    return torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported()


def _dequantized(out: int, inp: int, precision: str, a: int) -> int:
    """Bytes alive while a quantized layer rebuilds its float weight (camelid.quant.blocks
    dequantize_int8 / dequantize_int4): int8 the cast codes and their scaled copy; int4 the cast
    codes, their scaled copy and that plus the minimums."""
    return (2 if precision == "int8" else 3) * out * inp * a


def _kernel_product(out: int, inp: int, rows: int, a: int, p: int) -> int:
    """Bytes alive while a quantized layer runs camelid's CPU path (camelid.quant.layers): up to
    FUSED_ROWS rows straight from the codes (the float32 result, cast to the activation dtype);
    more rows multiply the weight dequantized in one pass into the product dtype (p bytes), with
    the input cast to it and the product cast back."""
    if rows <= FUSED_ROWS:
        return rows * out * (4 + a if a != 4 else 4)
    if p == a:
        return out * inp * p + rows * out * a
    return max(out * inp * p + rows * inp * p + rows * out * p, rows * out * (p + a))


def activation_bytes(config: ModelConfig, precision: str, batch: int, context: int, activation_dtype: str,
                     attention: str = "fused", all_logits: bool = False, cpu: bool = False) -> int:
    a = DTYPE_BYTES[activation_dtype]
    n = batch * context                       # tokens in the prefill
    d, f, vocab = config.dim, config.ffn_dim, config.vocab_size
    q, kv = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    quantized = precision not in DTYPE_BYTES
    product = 2 if a == 4 and NATIVE_BF16 else a  # camelid.quant.layers: the prefill product's dtype

    def linear(out: int, inp: int, rows: int, scheme: str = precision) -> int:
        """Bytes a linear layer adds beyond its input while it runs."""
        result = rows * out * a
        if not quantized:
            return result
        if cpu:
            return _kernel_product(out, inp, rows, a, product)
        return max(_dequantized(out, inp, scheme, a), out * inp * a + result)

    # RoPE on q or k: an fp32 copy, the fp32 rotation, and the cast back (fp32 rows: the rotation).
    rope = 4 if a == 4 else 8 + a
    qkv = n * (q + 2 * kv) * a
    # Alive from the first forward on: the RoPE table (fp32 cos and sin per position of the
    # model's context, computed once and shared by the rows, camelid.model.RotaryTable).
    prefill_state = max(context, config.max_seq_len) * config.head_dim * 4
    scores = 2 * batch * config.n_heads * context * context * 4 if attention == "math" else 0  # fp32, softmax
    attention_peak = 2 * n * d * a + max(
        linear(q, d, n), n * q * a + linear(kv, d, n), n * (q + kv) * a + linear(kv, d, n),
        qkv + n * q * rope, qkv + n * q * a + n * kv * rope,
        2 * n * q * a + scores,                # rotated q, attention output
        3 * n * q * a + linear(d, q, n))       # ... and the output's [B, T, H*D] copy into wo
    ffn_peak = 3 * n * d * a + max(n * f * a + linear(f, d, n), 3 * n * f * a, n * f * a + linear(d, f, n))
    rows = n if all_logits else batch
    head_peak = n * d * a + linear(vocab, d, rows, head_precision(precision)) + rows * vocab * 4
    return prefill_state + max(attention_peak, ffn_peak, head_peak)


def plan(config: ModelConfig, batch: int = 1, context: int = 2048, activation_dtype: str = "bfloat16",
         group_size: int = 32, overhead: int = DEFAULT_OVERHEAD, attention: str = "fused",
         all_logits: bool = False, cpu: bool = False, decoder_tiles: bool | None = None) -> list[Row]:
    """One row per precision (int4 only where its groups divide the layers). Float rows compute in
    their own dtype; quantized rows in `activation_dtype` (bfloat16 on a GPU; camelid on CPU
    keeps float32). `cpu`: for this machine's CPU, where camelid's kernels run the quantized
    layers. `decoder_tiles`: count the compiled decoder's tiles of the quantized layers (by
    default, on a CPU that has them, with `cpu`)."""
    if decoder_tiles is None:
        decoder_tiles = cpu and tiles_here()
    if batch < 1:
        raise CamelidError(f"--batch must be at least 1 (got {batch})")
    if context < 1:
        raise CamelidError(f"--context must be at least 1 token (got {context})")
    if activation_dtype not in DTYPE_BYTES:
        raise CamelidError(f"--activation-dtype {activation_dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    if group_size not in GROUP_SIZES:
        raise CamelidError(f"--group-size {group_size}: choose one of {GROUP_SIZES}")
    result = []
    for precision in PRECISIONS:
        if precision == "int4" and int4_problem(config, group_size):
            continue
        act = precision if precision in DTYPE_BYTES else activation_dtype
        result.append(Row(precision, act, weight_bytes(config, precision, act, group_size, decoder_tiles),
                          config.kv_cache_bytes(batch, context, DTYPE_BYTES[act]),
                          activation_bytes(config, precision, batch, context, act, attention, all_logits, cpu),
                          overhead))
    return result


def int4_problem(config: ModelConfig, group_size: int) -> str | None:
    """Why int4 in groups of `group_size` cannot hold this model's linear layers, if it cannot."""
    widths = sorted({config.dim, config.ffn_dim, config.n_heads * config.head_dim})  # their input columns
    if any(w % group_size for w in widths):
        return f"int4: groups of {group_size} do not divide the layers' widths {widths}"
    return None


def best(rows: list[Row], memory: int) -> tuple[Row | None, bool]:
    """The best precision that fits with HEADROOM to spare, else the best that fits at all
    (second value False: tight)."""
    for wanted in (Row.comfortable, Row.fits):
        for row in rows:
            if wanted(row, memory):
                return row, wanted is Row.comfortable
    return None, False


# ---- serving: camelid serve's paged KV pool ------------------------------------------------------

@dataclass(frozen=True)
class KVPool:
    """A paged KV cache of `num_blocks` blocks of `block_size` tokens, block 0 the scratch block
    that is never lent (`num_blocks` counts it, as camelid.serve.Batcher's num_blocks does), for
    requests of up to `context` tokens."""
    block_size: int
    block_bytes: int
    num_blocks: int
    context: int

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def blocks(self) -> int:
        """Blocks that can be lent to requests: all but the scratch block."""
        return max(self.num_blocks - 1, 0)

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def request_blocks(self) -> int:
        """Blocks one request of the whole context holds."""
        return -(-self.context // self.block_size)

    @property
    def requests(self) -> int:
        """Requests of the whole context the pool holds at once (shorter ones: more)."""
        return self.blocks // self.request_blocks

    @property
    def min_bytes(self) -> int:
        """The smallest pool the server takes: one request of the whole context and the scratch block."""
        return (self.request_blocks + 1) * self.block_bytes

    def to_dict(self) -> dict:
        return {"block_size": self.block_size, "block_bytes": self.block_bytes, "num_blocks": self.num_blocks,
                "blocks": self.blocks, "tokens": self.tokens, "context": self.context, "requests": self.requests,
                "pool_bytes": self.nbytes, "min_bytes": self.min_bytes}


def kv_pool(config: ModelConfig, memory: int, context: int, kv_dtype: str = "bfloat16",
            block_size: int = DEFAULT_BLOCK_SIZE) -> KVPool:
    """The pool of blocks that `memory` bytes hold for a KV cache in `kv_dtype` (a block is
    `config.kv_cache_bytes` of one row of `block_size` tokens); a budget below one block holds
    none."""
    if block_size < 1:
        raise CamelidError(f"--block-size must be at least 1 token (got {block_size})")
    if context < 1:
        raise CamelidError(f"--context must be at least 1 token (got {context})")
    block = config.kv_cache_bytes(1, block_size, DTYPE_BYTES[kv_dtype])
    return KVPool(block_size, block, max(memory, 0) // block, context)


def serving_pool(row: Row, config: ModelConfig, memory: int, context: int,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[float, KVPool]:
    """What `row` leaves of a card of `memory` bytes for camelid serve's KV pool, HEADROOM of the
    card kept spare: the pool takes the place of the row's KV cache beside its weights, its
    prefill's activations and the overhead. Returns the budget in GiB, rounded down to what
    `camelid serve --kv-memory` takes (two decimals), and the pool that exactly that holds."""
    budget = memory - int(HEADROOM * memory) - (row.total - row.kv_cache)
    kv_gib = max(budget, 0) * 100 // 2**30 / 100
    return kv_gib, kv_pool(config, gib_bytes(kv_gib), context, row.activation_dtype, block_size)
