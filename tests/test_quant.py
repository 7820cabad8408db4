"""Weight-only int8/int4: storage formulas, ggml block mapping, layers eager and compiled, loading,
saving, and error bounds against fp32 on a tiny model and on SmolLM2."""

import copy
import gzip
import math
from importlib import resources

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch._inductor.utils import run_and_get_code

import camelid
from camelid.checkpoint import convert, read_checkpoint, save_quantized
from camelid.cli.main import main as cli
from camelid.errors import CamelidError
from camelid.quant import Int4Linear, Int8Linear, QuantizedLinear, quantize_model
from camelid.model import KVCache, PagedKVCache
from camelid.quant import block as block_module
from camelid.quant import kernels
from camelid.quant import layers as quant_layers
from camelid.quant import tiles
from camelid.quant.blocks import QuantizedTensor, from_ggml, quantize, quantize_int4, quantize_int8, unpack_int4
from camelid.quant.layers import layer_for
from test_model import tiny

Q = gguf.GGMLQuantizationType


def weights(out=48, columns=128, seed=0):
    return torch.randn(out, columns, generator=torch.Generator().manual_seed(seed))


def test_int8_error_is_at_most_half_a_step():
    w = weights()
    for group in (None, 32):
        q = quantize_int8(w, group)
        step = q.scales.repeat_interleave(q.group_size, dim=1)
        assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
        assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_codes_pack_and_bound_the_error(group):
    w = weights()
    q = quantize_int4(w, group)
    assert q.weight.shape == (48, 64) and q.weight.dtype == torch.uint8
    codes = unpack_int4(q.weight, group)
    assert codes.min() == 0 and codes.max() == 15
    step = q.scales.float().repeat_interleave(group, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 2e-3).all()
    # byte j of a group holds weight j (low nibble) and weight j + g/2 (high nibble)
    w0 = q.dequantize()[0, : group]
    assert torch.allclose(w0[1], (q.weight[0, 1] & 15).float() * q.scales[0, 0].float() + q.mins[0, 0].float())
    assert torch.allclose(w0[group // 2 + 1], (q.weight[0, 1] >> 4).float() * q.scales[0, 0].float() + q.mins[0, 0].float())


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_ggml_blocks_map_in_exactly(kind):
    w = weights(16, 96).numpy()
    blocks = gguf.quants.quantize(w, Q[kind])
    expected = gguf.quants.dequantize(blocks, Q[kind])
    q = from_ggml(kind, torch.from_numpy(blocks), 96)
    assert q.scheme == ("int8" if kind == "Q8_0" else "int4") and q.group_size == 32
    np.testing.assert_allclose(q.dequantize().numpy(), expected, rtol=0, atol=1e-6)


def rounded_activations(x):
    """x as camelid's kernels round it on VNNI CPUs: int8 in blocks of 32 columns."""
    blocks = x.float().unflatten(-1, (-1, 32))
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127.0)).flatten(-2)


def kernel_reference(layer, x):
    """What the few-rows kernel computes: exact for int8 weights; for int4 with rounded
    activations where the CPU has VNNI (the minimums still meet the exact sums of x)."""
    w = layer.dequantize(torch.float32)
    if layer.scheme == "int8" or not torch.ops.camelid.has_int8_activations():
        return x @ w.T
    q = layer.stored()
    scaled = QuantizedTensor("int4", q.shape, q.group_size, q.weight, q.scales, torch.zeros_like(q.mins)).dequantize()
    return rounded_activations(x) @ scaled.T + x @ (w - scaled).T


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int8", 32), ("int8", 16), ("int4", 32), ("int4", 64),
                                          ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_layer_matches_dequantized_product_eager_and_compiled(scheme, group, rows):
    layer = layer_for(quantize(weights(64, 256), scheme, group))
    x = torch.randn(rows, 1, 256, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), kernel_reference(layer, x), rtol=1e-5, atol=1e-4)
    torch._dynamo.reset()  # each case compiles the layers' forward afresh (dynamo's recompile limit)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), kernel_reference(layer, x), rtol=1e-5, atol=1e-4)
    without = layer_for(layer.stored())
    without.fused = False  # no kernels (no compiler): eager dequantize, compiled multiply-sum
    torch.testing.assert_close(torch.compile(without, fullgraph=True, dynamic=False)(x[:1]),
                               x[:1] @ layer.dequantize(torch.float32).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group,columns", [(32, 96), (32, 256), (64, 192), (96, 192), (128, 256)])
def test_int4_kernel_paths_agree(group, columns):
    """The float path (exact activations) and the int8-activation path, for a number of groups
    that fills whole 512-bit steps and one that does not (96 columns: three groups of 32)."""
    q = quantize(weights(40, columns), "int4", group)
    layer = layer_for(q)
    x = torch.randn(5, columns, generator=torch.Generator().manual_seed(3))
    exact = torch.ops.camelid.int4_gemv(x, q.weight, q.scales, q.mins, group, False)
    torch.testing.assert_close(exact, x @ q.dequantize().T, rtol=1e-5, atol=1e-4)
    rounded = torch.ops.camelid.int4_gemv(x, q.weight, q.scales, q.mins, group, True)
    torch.testing.assert_close(rounded, kernel_reference(layer, x), rtol=1e-5, atol=1e-4)


def test_kernels_refuse_mismatched_shapes():
    q = quantize(weights(16, 128), "int4", 32)
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="scales and minimums must be"):
        torch.ops.camelid.int4_gemv(x, q.weight, q.scales, q.mins, 64, True)   # 2 groups asked of 4
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.camelid.int4_gemv(torch.randn(1, 64), q.weight, q.scales, q.mins, 32, True)
    q8 = quantize(weights(16, 128), "int8")
    with pytest.raises(RuntimeError, match="scales and minimums must be"):
        torch.ops.camelid.int8_gemv(x, q8.weight, q8.scales, 32)
    with pytest.raises(RuntimeError, match="must be uint8"):
        torch.ops.camelid.dequantize(q8.weight, q8.scales, q8.scales, 128, torch.float32)


def test_many_weights_in_one_call_equal_one_at_a_time():
    assert kernels.available()  # built (or loaded) here: this test may run alone
    x = torch.randn(2, 1, 128, generator=torch.Generator().manual_seed(4))
    q4 = [quantize(weights(out, 128, seed=out), "int4", 32) for out in (48, 16, 16)]
    fused = torch.ops.camelid.int4_gemv_many(x, [q.weight for q in q4], [q.scales for q in q4],
                                             [q.mins for q in q4], 32, True)
    for q, y in zip(q4, fused):
        torch.testing.assert_close(y, torch.ops.camelid.int4_gemv(x, q.weight, q.scales, q.mins, 32, True))
    q8 = [quantize(weights(out, 128, seed=out), "int8") for out in (40, 24)]
    fused = torch.ops.camelid.int8_gemv_many(x, [q.weight for q in q8], [q.scales for q in q8], 128)
    for q, y in zip(q8, fused):
        torch.testing.assert_close(y, torch.ops.camelid.int8_gemv(x, q.weight, q.scales, 128))


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int8", 32), ("int4", 32), ("int4", 128)])
def test_dequantize_kernel_equals_the_formula(scheme, group):
    q = quantize(weights(40, 256), scheme, group)
    mins = q.mins if scheme == "int4" else None
    exact = q.dequantize(torch.float32)
    assert torch.equal(torch.ops.camelid.dequantize(q.weight, q.scales, mins, q.group_size, torch.float32), exact)
    assert torch.equal(torch.ops.camelid.dequantize(q.weight, q.scales, mins, q.group_size, torch.bfloat16),
                       exact.to(torch.bfloat16))  # rounded to nearest even, as .to() does


def test_compiled_step_runs_each_block_as_one_call(tiny_checkpoint, tmp_path, monkeypatch):
    """Every block fused: the step is one call for all the blocks plus the head's, made directly
    with no graph to compile, and decodes as the eager model does."""
    path, _ = tiny_checkpoint
    llm = camelid.load(path, quantize="int4", compile=False).compile(background=False, cache_dir=tmp_path / "camelid")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    with torch.profiler.profile() as prof:
        text, code = run_and_get_code(lambda: llm.generate("Shall I compare thee", max_new_tokens=4, temperature=0))
    assert code == [] and llm.engine.compiled.direct is not None and not list(tmp_path.glob("camelid/*.bin"))
    steps = llm.engine.decode_steps["compiled"]
    calls = [e.name for e in prof.events()]
    assert steps >= 3 and calls.count("camelid::decode_blocks") == steps and "camelid::decode_block" not in calls
    head = "camelid::gemv_tiles" if tiles.available() else "camelid::int8_gemv"
    assert calls.count(head) == steps
    assert text == camelid.load(path, quantize="int4", compile=False).generate("Shall I compare thee",
                                                                                 max_new_tokens=4, temperature=0)


def test_blocks_run_as_separate_products_where_a_block_cannot_be_one_call(tiny_checkpoint, tmp_path, monkeypatch):
    """A block with a product left in float (or any layer the kernel does not know) keeps its
    ordinary forward, whose shared-input products the graph pass still fuses."""
    path, _ = tiny_checkpoint
    llm = camelid.load(path, quantize="int4", compile=False)
    llm.model.layers[0].attention.wo = torch.nn.Linear(llm.model.config.dim, llm.model.config.dim, bias=False)
    llm.compile(background=False, cache_dir=tmp_path / "camelid")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    _, code = run_and_get_code(lambda: llm.generate("Shall I compare thee", max_new_tokens=4, temperature=0))
    n_layers = llm.model.config.n_layers
    assert code[-1].count("torch.ops.camelid.decode_block.default(") == n_layers - 1
    assert code[-1].count("torch.ops.camelid.int4_gemv_many.default(") == 2  # layer 0's q, k, v and w1, w3
    # the blocks write the cache in place: no copy of it for the functional graph
    assert "copy_" not in code[-1] and "clone" not in code[-1]


def random_caches(cache, gen: torch.Generator) -> tuple:
    """`cache` filled with noise (stale slots everywhere), and a copy of it."""
    for buffer in cache.buffers():
        buffer.copy_(torch.randn(buffer.shape, generator=gen))
    return cache, copy.deepcopy(cache)


def stored_decode_block(block, x, rotation, layer_cache, positions, table=None) -> torch.Tensor:
    """camelid::decode_block over the block's products as its layers store them."""
    layers = [block.get_submodule(n) for n in block_module.PRODUCTS]
    int4 = isinstance(layers[0], Int4Linear)
    return torch.ops.camelid.decode_block(
        x, block.attention_norm.weight, block.ffn_norm.weight, block.attention_norm.eps, [m.weight for m in layers],
        [m.scales for m in layers], [m.mins for m in layers] if int4 else [], [m.group_size for m in layers], True,
        rotation, layer_cache.k, layer_cache.v, positions, block.attention.n_heads, table)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name", ["tiny", "tiny-mha"])
def test_decode_block_kernel_equals_the_blocks_forward(scheme, name):
    """The one-call block against the block's own forward (the same products, eager): rows at
    different positions, grouped-query heads, stale slots beyond each position, the cache
    written at each row's position."""
    model = quantize_model(tiny(name), scheme)
    block, config = model.layers[1], model.config
    assert block_module.fusable(block)
    rows, slots = 3, 16
    gen = torch.Generator().manual_seed(3)
    cache, expected_cache = random_caches(KVCache(config, rows, slots), gen)
    x = torch.randn(rows, 1, config.dim, generator=gen)
    for positions in (torch.tensor([[0], [5], [15]]), torch.tensor([[7]])):
        rotation = model.rope.rotation(positions)
        mask = (torch.arange(slots) <= positions.unsqueeze(-1)).unsqueeze(1)
        with torch.no_grad():
            expected = block(x, rotation, expected_cache.layers[1], positions, mask)
        got = stored_decode_block(block, x, rotation, cache.layers[1], positions)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.layers[1].k, expected_cache.layers[1].k)
        torch.testing.assert_close(cache.layers[1].v, expected_cache.layers[1].v)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decode_block_over_a_paged_cache_equals_the_blocks_forward(scheme):
    """Pools of blocks lent through a table (rows sharing a block, scratch block 0 for slots not
    lent), against the block's own forward over the same paged cache."""
    model = quantize_model(tiny("tiny"), scheme)
    block, config = model.layers[1], model.config
    gen = torch.Generator().manual_seed(6)
    cache = PagedKVCache(config, num_blocks=9, block_size=4, rows=3, max_blocks=5)
    for r, blocks in enumerate(([3, 1, 7], [2, 5], [3, 8, 6, 4])):  # row 2 shares row 0's first block
        cache.assign(r, blocks)
    # the batcher's view: the first 4 of 5 blocks, a strided table
    cache, expected_cache = random_caches(cache.view(slice(0, 3), 16), gen)
    assert not cache.table.is_contiguous()
    x = torch.randn(3, 1, config.dim, generator=gen)
    positions = torch.tensor([[10], [6], [15]])
    rotation = model.rope.rotation(positions)
    mask = (torch.arange(cache.max_len) <= positions.unsqueeze(-1)).unsqueeze(1)
    with torch.no_grad():
        expected = block(x, rotation, expected_cache.layers[1], positions, mask)
    got = stored_decode_block(block, x, rotation, cache.layers[1], positions, cache.table)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.layers[1].k, expected_cache.layers[1].k)
    torch.testing.assert_close(cache.layers[1].v, expected_cache.layers[1].v)
    cache.table[1, 0] = 9   # a block the pool does not have
    with pytest.raises(RuntimeError, match="outside the pool"):
        stored_decode_block(block, x, rotation, cache.layers[1], positions, cache.table)


def test_decode_block_refuses_a_position_outside_the_cache():
    model = quantize_model(tiny("tiny"), "int8")
    block, config = model.layers[0], model.config
    cache = KVCache(config, 1, 8)
    layers = [block.get_submodule(n) for n in block_module.PRODUCTS]
    positions = torch.tensor([[8]])
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.camelid.decode_block(
            torch.randn(1, 1, config.dim), block.attention_norm.weight, block.ffn_norm.weight, 1e-5,
            [m.weight for m in layers], [m.scales for m in layers], [], [m.group_size for m in layers], True,
            model.rope.rotation(positions), cache.layers[0].k, cache.layers[0].v, positions, config.n_heads)


def logits_of(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_quantized_tiny_model_stays_close_to_fp32(name):
    model = tiny(name)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    ref = logits_of(model, tokens)
    for scheme, bound in (("int8", 0.02), ("int4", 0.25)):
        q = quantize_model(tiny(name), scheme)
        assert isinstance(q.output, QuantizedLinear)  # a tied head gets its own quantized copy
        assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
        err = (logits_of(q, tokens) - ref).norm() / ref.norm()
        assert err < bound, (scheme, err)


def test_load_quantized_saves_and_loads_back_bit_for_bit(tiny_checkpoint, tmp_path):
    path, model = tiny_checkpoint
    tokens = torch.tensor([[1, 5, 9, 200, 17, 3]])
    for scheme, group in (("int8", None), ("int4", 64)):
        llm = camelid.load(path, quantize=scheme, group_size=group)
        layer = llm.model.layers[0].feed_forward.w1
        assert layer.scheme == scheme and layer.group_size == (group or 64)
        out = tmp_path / f"q-{scheme}"
        save_quantized(llm.model, llm.tokenizer, out)
        again = camelid.load(out)  # loads quantized, as saved
        for (n, a), (m, b) in zip(llm.model.state_dict().items(), again.model.state_dict().items()):
            assert n == m and a.dtype == b.dtype and torch.equal(a, b), n
        torch.testing.assert_close(logits_of(again.model, tokens), logits_of(llm.model, tokens), rtol=0, atol=0)
        # a quantized checkpoint still converts to other formats, dequantized (the tied model's
        # head is the float embedding again there)
        back = camelid.load(convert(out, tmp_path / f"hf-{scheme}", to="hf"))
        for name in ("layers.0.feed_forward.w1", "layers.1.attention.wk"):
            torch.testing.assert_close(back.model.get_submodule(name).weight,
                                       llm.model.get_submodule(name).dequantize(torch.float32), rtol=0, atol=1e-6)


def test_quantize_mistakes_get_clear_errors(tiny_checkpoint):
    path, _ = tiny_checkpoint
    with pytest.raises(CamelidError, match="int3"):
        camelid.load(path, quantize="int3")
    with pytest.raises(CamelidError, match="group size"):
        camelid.load(path, quantize="int4", group_size=48)
    with pytest.raises(CamelidError, match="do not split"):
        camelid.load(path, quantize="int4", group_size=128)  # dim 64
    with pytest.raises(CamelidError, match="no quantized layers"):
        save_quantized(tiny("tiny"), None, path.parent / "nope")


def test_cli_convert_quantize_then_generate(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    out = tmp_path / "int4"
    assert cli(["convert", str(path), str(out), "--to", "camelid", "--quantize", "int4"]) == 0
    assert read_checkpoint(out).details["quantization"]["scheme"] == "int4"
    capsys.readouterr()
    assert cli(["generate", "--model", str(out), "--prompt", "Shall I", "--max-new-tokens", "4",
                "--temperature", "0"]) == 0
    expected = camelid.load(path, quantize="int4").generate("Shall I", max_new_tokens=4, temperature=0)
    assert capsys.readouterr().out.rstrip("\n") == expected
    assert cli(["convert", str(path), str(tmp_path / "x.gguf"), "--to", "gguf", "--quantize", "int8"]) == 2


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_gguf_blocks_map_in_without_loss(smollm2_gguf, smollm2, monkeypatch):
    # held-out text: the start of Milton's Areopagitica, from camelid's embedded corpus
    text = gzip.decompress((resources.files("camelid.data") / "corpus/books/milton/areopagitica.txt.gz")
                           .read_bytes()).decode()
    tokens = torch.tensor([smollm2.tokenizer.encode(text)[:512]])
    ref = logits_of(smollm2.model, tokens)
    int4 = camelid.load(smollm2_gguf, quantize="int4")
    # the file's Q4_1 blocks (and its Q8_0 embedding, as the head) are used as stored: same numbers
    assert isinstance(int4.model.layers[0].attention.wq, Int4Linear)
    assert isinstance(int4.model.output, Int8Linear) and int4.model.output.group_size == 32

    def nll(logits):
        return F.cross_entropy(logits[0, :-1], tokens[0, 1:]).item()

    with monkeypatch.context() as m:
        m.setattr(quant_layers, "NATIVE_BF16", False)  # the prefill product in fp32
        torch.testing.assert_close(logits_of(int4.model, tokens), ref, rtol=1e-4, atol=1e-4)
    bf16 = logits_of(int4.model, tokens)  # in bfloat16 where the CPU multiplies it natively
    assert (bf16 - ref).norm() / ref.norm() < 0.02 and abs(nll(bf16) - nll(ref)) < 0.01
    int8 = camelid.load(smollm2_gguf, quantize="int8")
    got = logits_of(int8.model, tokens)
    err = (got - ref).norm() / ref.norm()
    assert err < 0.05, err   # measured 0.034: per-channel int8 of weights stored in 4-bit groups
    assert abs(nll(got) - nll(ref)) < 0.01 and math.isfinite(nll(got))  # perplexity within 1%


def test_quantized_compiled_decode_equals_eager(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    prompt = "Shall I compare thee"
    # a float model compiled first in the same process (and cache) must not lend its step to the int4 one
    floating = camelid.load(path, compile=False).compile(background=False, cache_dir=tmp_path)
    assert floating.generate(prompt, max_new_tokens=8, temperature=0) == camelid.load(path, compile=False).generate(
        prompt, max_new_tokens=8, temperature=0)
    eager = camelid.load(path, quantize="int4", compile=False)
    compiled = camelid.load(path, quantize="int4", compile=False).compile(background=False, cache_dir=tmp_path)
    assert compiled.generate(prompt, max_new_tokens=8, temperature=0) == eager.generate(prompt, max_new_tokens=8,
                                                                                      temperature=0)
    assert not compiled.decoder.failed and not floating.decoder.failed


def test_prefill_uses_the_dequantized_product(monkeypatch):
    layer = Int4Linear(quantize_int4(weights(32, 64)))
    x = torch.randn(3, 7, 64)
    w = layer.dequantize(torch.float32)
    monkeypatch.setattr(quant_layers, "NATIVE_BF16", True)
    torch.testing.assert_close(layer(x), F.linear(x.bfloat16(), w.bfloat16()).float())
    monkeypatch.setattr(quant_layers, "NATIVE_BF16", False)
    torch.testing.assert_close(layer(x), F.linear(x, w))


def test_compiled_decoder_steps_a_paged_cache_with_one_call(tiny_checkpoint, tmp_path):
    """The server's path: decode steps over a paged cache go through the graph-free step, one
    decode_blocks call each, and give the eager engine's tokens."""
    from camelid.generate.core import Engine

    path, _ = tiny_checkpoint
    eager = Engine(camelid.load(path, quantize="int4", compile=False).model)
    compiled = Engine(camelid.load(path, quantize="int4", compile=False).model)
    compiled.compile(background=False, cache_dir=tmp_path)
    config = eager.config
    caches = [PagedKVCache(config, num_blocks=12, block_size=8, rows=2, max_blocks=4) for _ in range(2)]
    for cache in caches:
        cache.assign(0, [4, 2, 9])
        cache.assign(1, [7, 1])
    prompt = torch.tensor([[5, 9, 31, 7, 2, 44, 13], [8, 3, 3, 19, 60, 21, 17]])
    tokens = []
    with torch.inference_mode(), torch.profiler.profile() as prof:
        for engine, cache in zip((eager, compiled), caches):
            h = engine.extend(prompt, None, cache)
            next_tokens, got = engine.head(h[:, -1]).argmax(-1), []
            for step in range(6):
                next_tokens = engine.decode(next_tokens, [7 + step] * 2, cache).argmax(-1)
                got.append(next_tokens.tolist())
            tokens.append(got)
    assert tokens[0] == tokens[1]
    assert compiled.decode_steps == {"compiled": 6, "eager": 0} and eager.decode_steps["compiled"] == 0
    assert [e.name for e in prof.events()].count("camelid::decode_blocks") == 6
