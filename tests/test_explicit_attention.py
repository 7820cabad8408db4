"""The explicit attention that bf16 CPU training swaps in (camelid.model.explicit_attention)
against SDPA: its output and gradients against an fp32 reference, no further from it than SDPA's
own bf16 kernel; the cases it hands back to SDPA; and where the trainers swap it in."""

import copy
import pathlib

import pytest
import torch
import torch.nn.functional as F

from camelid.model.explicit_attention import (MAX_POSITIONS, ExplicitAttention, KeptProbabilities, causal_bias,
                                              explicit_attention_pays, keeps_probabilities, use_explicit_attention)
from camelid.model.transformer import Attention, document_mask
from test_model import tiny


def qkv(b=2, h=4, t=40, d=48, kv_heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = lambda heads: (b, heads, t, d)  # noqa: E731
    return [torch.randn(*shape(n), generator=g) for n in (h, kv_heads or h, kv_heads or h)]


def attention_and_grads(fn, tensors, grad_out, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in tensors]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.float()] + [x.grad.float() for x in leaves]


def bare_layer(heads: int, kv_heads: int) -> ExplicitAttention:
    """An attention module without weights: `attend` needs only the head counts."""
    layer = ExplicitAttention.__new__(ExplicitAttention)
    torch.nn.Module.__init__(layer)
    layer.n_heads, layer.n_kv_heads = heads, kv_heads
    return layer


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_output_and_gradients_as_close_to_fp32_as_sdpas_bf16(masked, kv_heads):
    b, h, t = 2, 4, 40
    tensors = qkv(b, h, t, kv_heads=kv_heads)
    grad_out = torch.randn(b, h, t, 48, generator=torch.Generator().manual_seed(1))
    mask = document_mask(torch.tensor([[0] * 15 + [1] * 25, [0] * 40])) if masked else None
    layer = bare_layer(h, kv_heads or h)

    def sdpa(q, k, v):
        return Attention.attend(layer, q, k, v, mask)

    def explicit(q, k, v):
        return ExplicitAttention.attend(layer, q, k, v, mask)

    reference = attention_and_grads(sdpa, tensors, grad_out, torch.float32)
    theirs = attention_and_grads(sdpa, tensors, grad_out, torch.bfloat16)
    ours = attention_and_grads(explicit, tensors, grad_out, torch.bfloat16)
    for name, o, s, r in zip(("output", "grad q", "grad k", "grad v"), ours, theirs, reference):
        # bf16 rounding (2^-9) of inputs, scores and probabilities: about 1% relative; no more
        # than SDPA's own bf16 kernel, give or take the rounding itself
        assert relative(o, r) < 2e-2, name
        assert relative(o, r) <= 1.5 * relative(s, r) + 2e-3, name


def test_kept_probabilities_against_the_formula_in_fp32():
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 9, 8))
    bias = causal_bias(9, torch.float32, torch.device("cpu"))
    out = KeptProbabilities.apply(q, k, v, bias)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5 + bias, dim=-1) @ v
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = torch.autograd.grad(expected.sum(), (q, k, v))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


def test_hands_back_to_sdpa_where_it_does_not_pay():
    """No gradients (evaluation, generation), fp32, one query, or more positions than
    MAX_POSITIONS: the very result SDPA gives."""
    layer = bare_layer(2, 2)
    cases = [(qkv(1, 2, 30), torch.bfloat16, False), (qkv(1, 2, 30), torch.float32, True),
             (qkv(1, 2, MAX_POSITIONS + 1, 8), torch.bfloat16, True)]
    for tensors, dtype, grad in cases:
        q, k, v = (x.to(dtype).requires_grad_(grad) for x in tensors)
        with torch.set_grad_enabled(grad):
            expected = Attention.attend(layer, q, k, v, None)
            got = ExplicitAttention.attend(layer, q, k, v, None)
        assert torch.equal(got, expected)
        assert got.grad_fn is None or "KeptProbabilities" not in type(got.grad_fn).__name__


def test_model_gradients_in_bf16_autocast_match_sdpa():
    """A whole model's bf16 training step: with the explicit form, every parameter's gradient
    as close to the fp32 one as SDPA's."""
    torch.manual_seed(0)
    model = tiny().train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 33))

    def grads(m, bf16: bool):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = m(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    reference = grads(model, False)
    sdpa = grads(model, True)
    explicit = use_explicit_attention(copy.deepcopy(model))
    assert sum(isinstance(m, ExplicitAttention) for m in explicit.modules()) == model.config.n_layers
    ours = grads(explicit, True)
    for name, r in reference.items():
        assert relative(ours[name], r) <= 1.5 * relative(sdpa[name], r) + 5e-3, name


def test_where_it_pays_and_what_the_plan_counts():
    assert explicit_attention_pays(True, "bfloat16", "none")
    assert not explicit_attention_pays(False, "bfloat16", "none")       # CUDA: flash is the fast one
    assert not explicit_attention_pays(True, "float32", "none")         # measured level in fp32
    assert not explicit_attention_pays(True, "bfloat16", "selective")   # checkpointing decides what is kept
    assert keeps_probabilities(True, "bfloat16", "none", MAX_POSITIONS)
    assert not keeps_probabilities(True, "bfloat16", "none", MAX_POSITIONS + 1)
    # the plan adds every layer's probabilities (less the logsumexp) on a CPU, and only there
    from camelid.config import get_size
    from camelid.plan import Layout, plan_training

    c = get_size("stories15M")
    for ac, seq_len, kept in (("none", 256, True), ("selective", 256, False), ("none", 1024, False)):
        gpu, cpu = (plan_training(c, Layout(), 8, seq_len, "bfloat16", modes=(ac,), cpu=on_cpu)[0]
                    for on_cpu in (False, True))
        extra = c.n_layers * 8 * seq_len * c.n_heads * (seq_len * 2 - 4) if kept else 0
        assert cpu.activations - gpu.activations == extra


@pytest.mark.parametrize("dtype, ac, swapped", [("bfloat16", "none", True), ("float32", "none", False),
                                                ("bfloat16", "full", False)])
def test_the_trainer_swaps_it_in_for_bf16_on_cpu(tmp_path, dtype, ac, swapped):
    from camelid.train.config import DataSection, ModelSection, RunSection, TrainConfig, TrainSection
    from camelid.train.trainer import Trainer

    threads = torch.get_num_threads()
    cfg = TrainConfig(run=RunSection(dir=str(pathlib.Path(tmp_path) / "run")), model=ModelSection(size="tiny"),
                      data=DataSection(synthetic=True, seq_len=32),
                      train=TrainSection(max_steps=2, micro_batch=2, dtype=dtype, activation_checkpointing=ac,
                                         device="cpu", warmup_steps=1, threads=1))
    try:
        trainer = Trainer(cfg, log=False)
        assert any(isinstance(m, ExplicitAttention) for m in trainer.model.modules()) == swapped
        record = trainer.train_step()
    finally:
        torch.set_num_threads(threads)
    assert 0 < record["loss"] < 20 and record["grad_norm"] > 0
