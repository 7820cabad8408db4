import math

import pytest
import torch
import torch.nn.functional as F

from camelid.config import get_size
from camelid.model import KVCache, RMSNorm, Rotary, RotaryTable, Transformer, rope_inv_freq
from camelid.model.inductor import InductorAttention, RealRotary, use_inductor_layers


def tiny(name="tiny", seed=0, dtype=torch.float32):
    with torch.device("meta"):
        model = Transformer(get_size(name))
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model.to(dtype).eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-tied", "tiny-mha"])
def test_kv_cache_decode_equals_full_forward(name):
    model = tiny(name)
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, 2, 32)
        pieces = [model(tokens[:, :10], cache=cache)]                                     # prefill from 0
        pieces.append(model(tokens[:, 10:16], torch.arange(10, 16).unsqueeze(0), cache))  # a chunk at an offset
        for t in range(16, 24):                                                          # one token at a time
            pieces.append(model(tokens[:, t:t + 1], torch.tensor([[t], [t]]), cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rows_at_different_positions_equal_each_row_alone():
    """Two sequences of different lengths in one cache, prefilled together padded on the right,
    then decoding side by side at their own positions: each row equals its own full forward,
    and stale slots (the padding's) are never seen."""
    model = tiny()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 512, (1, 12), generator=g), torch.randint(0, 512, (1, 7), generator=g)
    with torch.no_grad():
        cache = KVCache(model.config, 2, 16)
        padded = torch.cat([a[:, :5], torch.cat([b[:, :3], torch.zeros(1, 2, dtype=torch.long)], 1)])
        model.hidden(padded, cache=cache)                    # a: 5 tokens; b: 3 tokens + 2 of padding
        pos = [5, 3]
        out_a, out_b = [], []
        for _ in range(4):
            step = torch.tensor([[a[0, pos[0]]], [b[0, pos[1]]]])
            logits = model(step, torch.tensor([[pos[0]], [pos[1]]]), cache)
            out_a.append(logits[0, -1])
            out_b.append(logits[1, -1])
            pos = [pos[0] + 1, pos[1] + 1]
    torch.testing.assert_close(torch.stack(out_a), model(a)[0, 5:9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(out_b), model(b)[0, 3:7], atol=1e-5, rtol=1e-5)


def test_inductor_layers_equal_the_models_own():
    """The forms swapped in for compiled graphs: real-number RoPE and one-token attention as
    products and sums (here run eagerly) give the model's results."""
    model = tiny()
    tokens = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens)
        use_inductor_layers(model)
        assert isinstance(model.layers[0].attention, InductorAttention)
        assert isinstance(model.layers[0].attention.rotary, RealRotary)
        cache = KVCache(model.config, 2, 16)
        pieces = [model(tokens[:, :6], cache=cache)]
        for t in range(6, 10):
            pieces.append(model(tokens[:, t:t + 1], torch.tensor([[t]]), cache))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == list(tiny().state_dict())


def test_positions_are_one_explicit_shape():
    model = tiny()
    with torch.no_grad(), pytest.raises(ValueError, match=r"positions must be \[B, 4\] or \[1, 4\]"):
        model(torch.tensor([[1, 2, 3, 4]]), torch.arange(6, 10), KVCache(model.config, 1, 16))


def test_a_model_sampled_under_inference_mode_still_trains():
    model = tiny()
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))           # the RoPE table is made here first
    model.train().requires_grad_(True)
    model(torch.tensor([[1, 2, 3, 4]])).sum().backward()
    assert model.layers[0].attention.wq.weight.grad is not None


def test_rope_tables_are_computed_once():
    model = tiny()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
        table = model.rope.tables[torch.device("cpu")]
        model(torch.tensor([[4, 5, 6, 7]]), torch.tensor([[3, 4, 5, 6]]))
    assert model.rope.tables[torch.device("cpu")] is table and table.shape[0] == model.config.max_seq_len


def test_future_tokens_never_change_earlier_outputs():
    model = tiny()
    a = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[0, 9:] = (b[0, 9:] + 7) % 512
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :9], lb[:, :9], atol=0, rtol=0)
    assert not torch.allclose(la[:, 9:], lb[:, 9:])


def test_rmsnorm_is_computed_in_fp32():
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 64) * 100
    xb = x.bfloat16()
    ref = (x.bfloat16().float() * torch.rsqrt(x.bfloat16().float().pow(2).mean(-1, keepdim=True) + 1e-6))
    expected = ref.bfloat16() * norm.weight.bfloat16()
    assert torch.equal(norm.to(torch.bfloat16)(xb), expected)


@pytest.mark.parametrize("rotary", [Rotary(), RealRotary()])
def test_rope_matches_metas_complex_formulation(rotary):
    cfg = get_size("tiny")
    x = torch.randn(2, 5, 4, cfg.head_dim)
    pos = torch.arange(3, 8)
    ours = rotary(x, RotaryTable(cfg).rotation(pos))
    # The rotation written out in reals: (a, b) -> (a cos - b sin, a sin + b cos) per pair.
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    angle = torch.outer(pos.float(), freqs).view(1, 5, 1, -1)
    a, b = x[..., 0::2], x[..., 1::2]
    ref = torch.stack((a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()), -1).flatten(3)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_llama3_rope_scaling_matches_transformers():
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    cfg = get_size("llama3-8B").replace(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    hf_inv, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(cfg, torch.device("cpu")), hf_inv.float(), atol=0, rtol=1e-6)


def test_grouped_query_attention_equals_repeated_heads():
    model = tiny()
    attn = model.layers[0].attention
    x = torch.randn(1, 7, 64)
    rot = RotaryTable(model.config).rotation(torch.arange(7))
    with torch.no_grad():
        ours = attn(x, rot, None, None, None)
        q = attn.rotary(attn.wq(x).view(1, 7, 4, 16), rot).transpose(1, 2)
        k = attn.rotary(attn.wk(x).view(1, 7, 2, 16), rot).transpose(1, 2).repeat_interleave(2, dim=1)
        v = attn.wv(x).view(1, 7, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(16)
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        ref = attn.wo((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(1, 7, 64))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_init_weights_is_seeded_and_scaled():
    a, b, c = tiny(seed=1), tiny(seed=1), tiny(seed=2)
    assert torch.equal(a.layers[0].attention.wq.weight, b.layers[0].attention.wq.weight)
    assert not torch.equal(a.layers[0].attention.wq.weight, c.layers[0].attention.wq.weight)
    assert torch.all(a.norm.weight == 1)
    std_in = a.layers[0].feed_forward.w1.weight.std().item()
    std_out = a.layers[0].feed_forward.w2.weight.std().item()
    assert abs(std_in - 0.02) < 0.003 and abs(std_out - 0.02 / math.sqrt(4)) < 0.002
