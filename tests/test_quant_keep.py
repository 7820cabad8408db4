"""keep_dequantized: a quantized layer scored many times keeps its dequantized weight, gives the
same products as dequantizing per call, and drops or remakes the weight when it must."""

from __future__ import annotations

import pytest
import torch

import camelid
from camelid.checkpoint.native import write_native
from camelid.eval import Scorer
from camelid.eval.requests import Encoded
from camelid.quant import QuantizedLinear, quantize_model
from camelid.quant.blocks import quantize
from camelid.quant.layers import keep_dequantized, layer_for
from test_model import tiny

ROWS = 40   # past FUSED_ROWS: the many-rows product, which dequantizes


def counting(monkeypatch) -> list[QuantizedLinear]:
    """Each call of QuantizedLinear.dequantize appends its layer."""
    calls: list[QuantizedLinear] = []
    plain = QuantizedLinear.dequantize

    def dequantize(self, dtype):
        calls.append(self)
        return plain(self, dtype)

    monkeypatch.setattr(QuantizedLinear, "dequantize", dequantize)
    return calls


def layer(scheme: str = "int4", seed: int = 0) -> QuantizedLinear:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(seed))
    return layer_for(quantize(w, scheme, 32))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_kept_weight_gives_the_same_products_and_is_dropped_on_leaving(scheme, monkeypatch):
    q = layer(scheme)
    x = torch.randn(ROWS, 64)
    plain = q(x)
    calls = counting(monkeypatch)
    with torch.inference_mode(), keep_dequantized(q):
        first, second = q(x), q(x)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert len(calls) == 1                        # dequantized once for both calls
    assert q.kept is None and not q.keep          # dropped on leaving
    q(x)
    assert len(calls) == 2                        # and dequantized per call again after


def test_a_changed_or_replaced_buffer_is_dequantized_afresh(monkeypatch):
    q, other = layer(seed=0), layer(seed=1)
    x = torch.randn(ROWS, 64)
    calls = counting(monkeypatch)
    with keep_dequantized(q):
        q(x)
        q.load_state_dict(other.state_dict())     # copied in place: the version counters move
        assert torch.equal(q(x), other(x))
        q.scales.mul_(2)                          # any buffer, not only the codes
        doubled = q(x)
        q.scales = other.scales.clone()           # a new tensor
        assert torch.equal(q(x), other(x))
    assert not torch.equal(doubled, other(x))
    assert sum(c is q for c in calls) == 1 + 3    # each change remade the weight, once


def test_budget_bounds_what_is_kept_and_nested_scopes_keep_their_own():
    model = quantize_model(tiny("tiny"), "int4")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    first = 2 * layers[0].out_features * layers[0].in_features
    with keep_dequantized(model, budget=0):
        assert not any(m.keep for m in layers)
    with keep_dequantized(model, budget=first):
        assert layers[0].keep and not any(m.keep for m in layers[1:])
        with keep_dequantized(model):
            assert all(m.keep for m in layers)
        assert layers[0].keep and not any(m.keep for m in layers[1:])   # the outer scope's layer stays
    assert not any(m.keep or m.kept for m in layers)


def test_scorer_keeps_weights_for_the_call_and_scores_as_dequantizing_per_batch(tmp_path, spm_tokenizer,
                                                                                monkeypatch):
    model = tiny("tiny")
    write_native(tmp_path, model.config, spm_tokenizer, model.state_dict().items())
    llm = camelid.load(tmp_path, quantize="int4", compile=False)
    g = torch.Generator().manual_seed(3)
    encoded = [Encoded(torch.randint(3, 500, (20 + i,), generator=g).tolist(),
                       torch.randint(3, 500, (3 + i % 4,), generator=g).tolist()) for i in range(24)]
    calls = counting(monkeypatch)
    per_batch = Scorer(llm, batch_size=4, keep_budget=0).loglikelihood_tokens(encoded)
    fresh = len(calls)
    calls.clear()
    kept = Scorer(llm, batch_size=4).loglikelihood_tokens(encoded)
    assert kept == per_batch                      # the same floats, bit for bit
    layers = [m for m in llm.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(calls) == len(set(map(id, calls))) <= len(layers) < fresh   # each layer at most once
    assert not any(m.keep or m.kept for m in layers)


def test_a_compiled_many_rows_product_traces_and_keeps_nothing():
    q = layer()
    x = torch.randn(ROWS, 64)
    torch._dynamo.reset()
    with keep_dequantized(q):
        out = torch.compile(q, fullgraph=True, dynamic=False)(x)
        assert q.kept is None
    torch.testing.assert_close(out, q(x))
