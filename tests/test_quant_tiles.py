"""Tiles (camelid/quant/tiles.py): the 16-row layout of quantized weights that the decode kernels
read on CPUs with AVX-512 VNNI, against a reference computed here from the stored codes."""

import copy
import io
import sys

import pytest
import torch

import camelid
from camelid.model import KVCache
from camelid.quant import block as block_module
from camelid.quant import quantize_model, tiles
from camelid.quant.blocks import quantize, unpack_int4
from camelid.quant.layers import layer_for
from test_model import tiny
from test_quant import random_caches

pytestmark = pytest.mark.skipif(not tiles.available(), reason="tiles need a CPU with AVX-512 VNNI")


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: rounded to int8 in blocks of 32 columns, one scale (max / 127) each."""
    blocks = x.unflatten(-1, (-1, 32))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.clamp(torch.round(blocks / torch.where(scale > 0, scale, 1)), -127, 127) * scale).flatten(-2)


def reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The product with rounded activations: int8 w = q s; int4 w = q s + min, whose minimums
    meet the unrounded activations' group sums, as in the kernels."""
    q = layer.stored()
    if q.scheme == "int8":
        return rounded(x) @ q.dequantize(torch.float32).T
    codes = unpack_int4(q.weight, q.group_size).flatten(1).float()
    scales = q.scales.float().repeat_interleave(q.group_size, 1)
    mins = q.mins.float().repeat_interleave(q.group_size, 1)
    return rounded(x) @ (codes * scales).T + x @ mins.T


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int8", 32), ("int8", 64), ("int4", 32), ("int4", 64),
                                          ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_tile_product_equals_the_reference(scheme, group, rows):
    gen = torch.Generator().manual_seed(rows)
    layer = layer_for(quantize(torch.randn(48, 256, generator=gen), scheme, group))
    codes, scales, mins = tiles.tile(layer)
    x = torch.randn(rows, 256, generator=gen)
    got = torch.ops.camelid.gemv_tiles(x, codes, scales, mins, layer.group_size)
    torch.testing.assert_close(got, reference(layer, x), atol=2e-4, rtol=1e-5)


def test_tiles_are_a_permutation_of_the_stored_codes():
    layer = layer_for(quantize(torch.randn(32, 64), "int8", 32))
    codes, scales, _ = tiles.tile(layer)
    # tile 1, line 3: bytes 12..15 of rows 16..31, plus 128
    expected = (layer.weight[16:32, 12:16].view(torch.uint8) ^ 0x80)
    assert torch.equal(codes[1, 3], expected)
    assert torch.equal(scales[1, 1], layer.scales[16:32, 1])


def test_tiles_share_one_allocation_on_huge_pages():
    layers = [layer_for(quantize(torch.randn(64, 128), "int4", 32)) for _ in range(3)]
    tiles.add_tiles(layers)
    bases = {m.tile_codes.untyped_storage().data_ptr() for m in layers} | {
        m.tile_scales.untyped_storage().data_ptr() for m in layers}
    assert len(bases) == 1
    if sys.platform == "linux":   # 2 MiB-aligned there (posix_memalign), plain memory elsewhere
        assert layers[0].tile_codes.data_ptr() % (2 << 20) == 0
    assert all(t.data_ptr() % 64 == 0 for m in layers for t in (m.tile_codes, m.tile_scales, m.tile_mins))
    x = torch.randn(2, 128)
    for m in layers:  # each view holds its own layer's tiles
        torch.testing.assert_close(torch.ops.camelid.gemv_tiles(x, m.tile_codes, m.tile_scales, m.tile_mins, 32),
                                   reference(m, x), atol=2e-4, rtol=1e-5)
    assert "tile_codes" not in layers[0].state_dict()


def test_stale_tiles_are_noticed():
    model = quantize_model(tiny("tiny"), "int8")
    layers = [model.layers[0].get_submodule(n) for n in block_module.PRODUCTS]
    tiles.add_tiles(layers)
    assert not tiles.stale(model)
    layers[2].scales.mul_(2)   # changed in place: the tiles no longer match
    assert tiles.stale(model)
    tiles.add_tiles(layers)
    assert not tiles.stale(model)
    layers[4].weight = layers[4].weight.clone()   # replaced by an equal tensor: made afresh all the same
    assert tiles.stale(model)


def test_tiles_of_a_model_made_in_inference_mode():
    """Inference tensors have no version counter: their tiles are made, and never stale (they
    cannot be changed in place outside inference mode)."""
    with torch.inference_mode():
        model = quantize_model(tiny("tiny"), "int4")
        layers = [model.layers[0].get_submodule(n) for n in block_module.PRODUCTS]
        tiles.add_tiles(layers)
    assert not tiles.stale(model)


def test_int4_groups_that_split_a_block_of_activations_are_not_tiled():
    assert tiles.tileable(layer_for(quantize(torch.randn(32, 192), "int4", 64)))
    odd = layer_for(quantize(torch.randn(32, 192), "int4", 96))
    assert not tiles.tileable(odd)
    codes, scales, mins = tiles.tile(odd)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.camelid.gemv_tiles(torch.randn(1, 192), codes, scales, mins, 96)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decode_block_on_tiles_equals_the_stored_layout(scheme):
    """int4: the same arithmetic in another order; int8: the stored layout keeps float
    activations, tiles round them, so the bound is the rounding's (a few thousandths)."""
    model = quantize_model(tiny("tiny"), scheme)
    block, config = model.layers[1], model.config
    layers = [block.get_submodule(n) for n in block_module.PRODUCTS]
    tiles.add_tiles(layers)
    rows, slots = 2, 16
    gen = torch.Generator().manual_seed(5)
    cache, tiled_cache = random_caches(KVCache(config, rows, slots), gen)
    x = torch.randn(rows, 1, config.dim, generator=gen)
    positions = torch.tensor([[3], [11]])
    rotation = model.rope.rotation(positions)
    int4 = scheme == "int4"

    def run(codes, scales, mins, c):
        return torch.ops.camelid.decode_block(
            x, block.attention_norm.weight, block.ffn_norm.weight, block.attention_norm.eps, codes, scales, mins,
            [m.group_size for m in layers], True, rotation, c.layers[1].k, c.layers[1].v, positions, config.n_heads)

    stored = run([m.weight for m in layers], [m.scales for m in layers], [m.mins for m in layers] if int4 else [], cache)
    tiled = run([m.tile_codes for m in layers], [m.tile_scales for m in layers],
                [m.tile_mins for m in layers] if int4 else [], tiled_cache)
    tol = 1e-5 if int4 else 2e-2
    torch.testing.assert_close(tiled, stored, atol=tol, rtol=tol)
    torch.testing.assert_close(tiled_cache.layers[1].k, cache.layers[1].k, atol=tol, rtol=tol)
    if not int4:
        assert not torch.equal(tiled, stored)   # the int8 tiles did round the activations


def test_tiles_refuse_a_wrong_shape():
    layer = layer_for(quantize(torch.randn(32, 64), "int4", 32))
    codes, scales, mins = tiles.tile(layer)
    with pytest.raises(RuntimeError, match="tiles of codes"):
        torch.ops.camelid.gemv_tiles(torch.randn(1, 128), codes, scales, mins, 32)
    with pytest.raises(RuntimeError, match="float16"):
        torch.ops.camelid.gemv_tiles(torch.randn(1, 64), codes, scales.float(), mins, 32)


def test_compiled_decoder_tiles_its_blocks_and_head(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    llm = camelid.load(path, quantize="int8", compile=False).compile(background=False, cache_dir=tmp_path)
    copy_ = llm.engine.compiled.model   # the decoder's copy of the model
    assert isinstance(copy_.output, tiles.TiledInt8Head)
    assert all(tiles.has_tiles(b.get_submodule(n)) for b in copy_.layers for n in block_module.PRODUCTS)
    # the caller's model is not touched: no tiles, its own class, nothing more to save
    assert not any(tiles.has_tiles(m) for m in llm.model.modules())
    eager = camelid.load(path, quantize="int8", compile=False)
    prompt = "Shall I compare thee"
    assert llm.generate(prompt, max_new_tokens=8, temperature=0) == eager.generate(prompt, max_new_tokens=8,
                                                                                temperature=0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decode_blocks_is_decode_block_layer_after_layer(scheme):
    model = quantize_model(tiny("tiny"), scheme)
    config = model.config
    block_module.use_decode_blocks(model)
    gen = torch.Generator().manual_seed(9)
    cache, again = random_caches(KVCache(config, 2, 16), gen)
    x = torch.randn(2, 1, config.dim, generator=gen)
    positions = torch.tensor([[4], [9]])
    rotation = model.rope.rotation(positions).contiguous()
    h = x
    for block, layer in zip(model.layers, cache.layers):
        h = block.step(h, rotation, layer, positions)
    step = block_module.DirectStep(model)
    got = torch.ops.camelid.decode_blocks(x, step.norms, step.eps, step.codes, step.scales, step.mins, step.groups,
                                          True, rotation, [c.k for c in again.layers], [c.v for c in again.layers],
                                          positions, step.heads)
    assert torch.equal(got, h)
    assert all(torch.equal(a.k, b.k) and torch.equal(a.v, b.v) for a, b in zip(cache.layers, again.layers))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_direct_step_gives_the_models_logits(scheme):
    """Rows at different positions, against the eager model's forward over the same cache."""
    model = quantize_model(tiny("tiny"), scheme)
    decoder_copy = block_module.use_decode_blocks(copy.deepcopy(model))
    step = block_module.DirectStep(decoder_copy)
    config = model.config
    gen = torch.Generator().manual_seed(2)
    cache, eager_cache = random_caches(KVCache(config, 2, 32), gen)
    tokens, positions = torch.tensor([[5], [77]]), torch.tensor([[3], [20]])
    assert step.suits(tokens, cache)
    with torch.inference_mode():
        got = step(decoder_copy, tokens, positions, cache)
        expected = model.head(model.hidden(tokens, positions, eager_cache)[:, -1])
    # the tiled int8 products (int4's head is int8) round the activations the eager layers keep in float
    torch.testing.assert_close(got, expected, atol=3e-2 * expected.abs().max().item(), rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_plan_counts_the_decoders_tiles(scheme):
    from camelid.plan.inference import plan, weight_bytes

    model = quantize_model(tiny("tiny"), scheme)
    decoder_copy = block_module.use_decode_blocks(copy.deepcopy(model))
    made = sum(getattr(m, name).nbytes for m in decoder_copy.modules() for name in tiles.NAMES if hasattr(m, name))
    config = model.config
    assert made > 0
    assert weight_bytes(config, scheme, "float32", decoder_tiles=True) - weight_bytes(config, scheme, "float32") == made
    row = next(r for r in plan(config, activation_dtype="float32", cpu=True) if r.precision == scheme)
    assert row.weights == weight_bytes(config, scheme, "float32", decoder_tiles=True)  # this CPU has them


def test_int8_tiles_take_float16_scales_where_they_are_exact():
    """GGUF's Q8_0 scales are float16 values: the tiles keep them in half the bytes, with the
    same products; scales that float16 would round stay float32. A skeleton (another process's
    model, values unknown) makes tiles of the same dtypes."""
    from camelid.generate.compiled import _skeleton

    exact = layer_for(quantize(torch.randn(32, 128), "int8", 32))
    exact.scales.copy_(exact.scales.half().float())
    rounded = layer_for(quantize(torch.randn(32, 128), "int8", 32))
    assert tiles.tile(exact)[1].dtype == torch.float16 and tiles.tile(rounded)[1].dtype == torch.float32
    x = torch.randn(2, 128)
    for layer in (exact, rounded):
        codes, scales, _ = tiles.tile(layer)
        torch.testing.assert_close(torch.ops.camelid.gemv_tiles(x, codes, scales, None, 32), reference(layer, x),
                                   atol=2e-4, rtol=1e-5)
    model = quantize_model(tiny("tiny"), "int8", 32)
    for m in model.modules():
        if isinstance(m, type(exact)) and m is not model.output:
            m.scales.copy_(m.scales.half().float())
    skeleton = torch.load(io.BytesIO(_skeleton(model)), weights_only=False)
    skeleton.to_empty(device="cpu")
    real, traced = copy.deepcopy(model), skeleton
    block_module.use_decode_blocks(real)
    block_module.use_decode_blocks(traced, copy_weights=False)
    dtypes = [(n, t.dtype, tuple(t.shape)) for n, t in real.named_buffers() if "tile_" in n]
    assert dtypes == [(n, t.dtype, tuple(t.shape)) for n, t in traced.named_buffers() if "tile_" in n]
    assert {d for n, d, _ in dtypes if n.endswith("tile_scales")} == {torch.float16, torch.float32}
