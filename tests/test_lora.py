"""LoRA and QLoRA (camelid.lora): the module swap, what trains and what stays frozen, merging,
QLoRA's backward through the dequantized weight, and PEFT's file layout in both directions."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camelid.errors import CamelidError
from camelid.lora import (TARGETS, LoraSettings, LoRALinear, adapter_state, apply_lora,
                          load_adapter_state, lora_layers, merge_lora)
from camelid.quant import layers as quant_layers
from camelid.quant import QuantizedLinear, quantize_model
from camelid.quant.blocks import quantize
from camelid.quant.layers import layer_for
from test_model import tiny

ALL = TARGETS


def batch(seed=0, rows=2, length=24, vocab=512):
    tokens = torch.randint(0, vocab, (rows, length + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model, inputs, targets):
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def train(model, steps=6, lr=1e-2, seed=0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    inputs, targets = batch(seed)
    losses = []
    model.train()
    for _ in range(steps):
        loss = loss_of(model, inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def randomize_b(model, std=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * std)


def frozen_state(model):
    """Every tensor that is not an adapter weight (parameters and buffers: quantized codes too)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}


# ---- the swap ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_fresh_adapters_leave_the_model_unchanged_and_only_they_train(name):
    model = tiny(name)
    inputs, targets = batch()
    with torch.no_grad():
        before = model(inputs)
    apply_lora(model, LoraSettings(rank=4, targets=ALL), seed=0)
    with torch.no_grad():
        assert torch.equal(model(inputs), before)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(lora_layers(model)) == 7 * 2 + 1 and isinstance(model.output, LoRALinear)
    base = frozen_state(model)
    adapters = {k: v.clone() for k, v in adapter_state(model).items()}
    losses = train(model)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n
    after = frozen_state(model)
    assert all(torch.equal(base[k], after[k]) for k in base)  # bit for bit
    assert all(not torch.equal(adapters[k], v) for k, v in adapter_state(model).items())


def test_scaling_rslora_and_forward_formula():
    s = LoraSettings(rank=16, alpha=32)
    assert s.scaling == 2.0 and LoraSettings(rank=16, alpha=32, rslora=True).scaling == 8.0
    base = nn.Linear(32, 48, bias=False)
    layer = LoRALinear(base, rank=4, alpha=8, rslora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 32)
    want = base(x) + 8 / 2 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(x @ layer.weight.T, want)  # the effective weight, for weight-based heads


def test_seeded_init_is_reproducible_and_like_peft():
    a, b = tiny("tiny"), tiny("tiny")
    apply_lora(a, LoraSettings(rank=4), seed=3)
    apply_lora(b, LoraSettings(rank=4), seed=3)
    sa, sb = adapter_state(a), adapter_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    A = sa["layers.0.attention.wq.lora_A.weight"]
    assert A.shape == (4, 64) and A.abs().max() <= 1 / 64 ** 0.5 + 1e-6  # kaiming-uniform a=sqrt(5): 1/sqrt(in)
    assert not sa["layers.0.attention.wq.lora_B.weight"].any()


def test_mistakes_name_the_layer_or_field():
    with pytest.raises(CamelidError, match=r"rank 65: larger than layer layers\.0\.attention\.wk"):
        apply_lora(tiny("tiny"), LoraSettings(rank=65, targets=("wk",)))
    with pytest.raises(CamelidError, match=r"targets \['wx'\]: unknown"):
        apply_lora(tiny("tiny"), LoraSettings(targets=("wx",)))
    model = apply_lora(tiny("tiny"), LoraSettings(rank=2, targets=("wq",)))
    with pytest.raises(CamelidError, match="already has an adapter"):
        apply_lora(model, LoraSettings(rank=2, targets=("wq",)))
    state = adapter_state(model)
    bad = dict(state, **{"layers.0.attention.wq.lora_A.weight": torch.zeros(3, 64)})
    with pytest.raises(CamelidError,
                       match=r"^here: tensor layers\.0\.attention\.wq\.lora_A\.weight has shape \[3, 64\]"):
        load_adapter_state(model, bad, "here")
    with pytest.raises(CamelidError, match=r"^here: .*no adapter on \[layers\.0\.attention\.wv"):
        load_adapter_state(model, dict(state, **{"layers.0.attention.wv.lora_A.weight": torch.zeros(2, 64)}), "here")


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_merged_model_equals_unmerged(name):
    model = apply_lora(tiny(name), LoraSettings(rank=4, alpha=8, targets=ALL), seed=0)
    randomize_b(model)
    inputs, _ = batch()
    with torch.no_grad():
        unmerged = model(inputs)
        merge_lora(model)
        merged = model(inputs)
    assert not lora_layers(model) and type(model.output) is nn.Linear
    assert not model.config.tie_embeddings  # a merged LoRA head is a head of its own
    assert (unmerged - tiny(name)(inputs)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_merge_refuses_a_quantized_base():
    model = apply_lora(quantize_model(tiny("tiny"), "int8"), LoraSettings(rank=2, targets=("wq",)))
    with pytest.raises(CamelidError, match=r"layer layers\.0\.attention\.wq has a quantized base"):
        merge_lora(model)


# ---- QLoRA ---------------------------------------------------------------------------------------

def quantized_layer(scheme="int4", out=96, columns=64, seed=0):
    w = torch.randn(out, columns, generator=torch.Generator().manual_seed(seed)) * 0.1
    return layer_for(quantize(w, scheme, 32 if scheme == "int4" else None))


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("chunk", [None, 64 * 7])  # one block, and blocks of 7 rows (uneven)
def test_qlora_input_gradient_equals_the_float_reference(scheme, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(quant_layers, "CHUNK_ELEMENTS", chunk)
    q = quantized_layer(scheme)
    float_base = nn.Linear(64, 96, bias=False)
    with torch.no_grad():
        float_base.weight.copy_(q.stored().dequantize(torch.float32))
    ours, ref = LoRALinear(q, 4, 8.0), LoRALinear(float_base, 4, 8.0)
    with torch.no_grad():
        ours.lora_B.weight.normal_(generator=torch.Generator().manual_seed(3))   # not the global RNG: order-free
        ref.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    g = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(2))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    # the forward may run the product in bf16 (CPUs that multiply it natively): the float
    # reference agrees to bf16's precision (2^-9 of the largest terms) there; the backward is
    # computed in fp32
    torch.testing.assert_close(y1, y2, atol=1e-2 * y2.abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.lora_A.weight.grad, ref.lora_A.weight.grad, atol=1e-4, rtol=1e-4)
    assert all(b.grad is None for b in q.buffers())


def test_qlora_keeps_no_float_weight_in_the_graph():
    model = apply_lora(quantize_model(tiny("tiny"), "int4"), LoraSettings(rank=4, targets=ALL), seed=0)
    weights = set()
    for m in lora_layers(model).values():
        weights |= {(m.out_features, m.in_features), (m.in_features, m.out_features)}
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    inputs, targets = batch(rows=2, length=24)  # more rows than the few-row kernels take
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, inputs, targets)
    loss.backward()
    assert saved
    # no float tensor with a weight's shape (or its transpose) is kept for backward
    assert not [s for s in saved if s[0] in weights and s[1].is_floating_point], saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_trains_and_leaves_the_codes_bit_for_bit(dtype):
    model = quantize_model(tiny("tiny-tied", dtype=dtype), "int4")
    apply_lora(model, LoraSettings(rank=4, targets=ALL), dtype=dtype, seed=0)
    assert all(isinstance(m.base, QuantizedLinear) for m in lora_layers(model).values())
    codes = frozen_state(model)
    assert any(k.endswith(".mins") for k in codes) and any(k.endswith(".scales") for k in codes)
    adapters = {k: v.clone() for k, v in adapter_state(model).items()}
    losses = train(model, steps=8, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    after = frozen_state(model)
    assert all(torch.equal(codes[k], after[k]) for k in codes)
    state = adapter_state(model)
    assert all(v.dtype == dtype for v in state.values())
    assert all(not torch.equal(adapters[k], v) for k, v in state.items())


def test_dequantized_product_is_the_layer_forward():
    from camelid.quant.layers import DequantizedProduct

    q = quantized_layer("int4")
    x = torch.randn(3, 64, requires_grad=True)
    with torch.no_grad():
        want = q(x)
    assert torch.equal(DequantizedProduct.apply(x, q), want)
    assert torch.equal(q(x), want) and q(x).requires_grad


# ---- PEFT's layout -----------------------------------------------------------------------------

HF_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def camelid_base(tmp_path, spm_tokenizer):
    """A tiny camelid checkpoint (per config name) and its Hugging Face export by camelid's convert."""
    from camelid.checkpoint import convert
    from camelid.checkpoint.native import write_native

    def make(name, seed=0):
        model = tiny(name, seed=seed)
        with torch.no_grad():  # norms away from one, so that a wrong layout would show
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
        path = tmp_path / f"{name}-camelid"
        path.mkdir()
        write_native(path, model.config, spm_tokenizer, model.state_dict().items())
        convert(path, tmp_path / f"{name}-hf", to="hf")
        return path, tmp_path / f"{name}-hf"
    return make


def peft_logits(hf_dir, adapter_dir, tokens):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name,settings", [
    ("tiny", LoraSettings(rank=4, alpha=8, targets=ALL[:-1])),                  # GQA: k with 2 of 4 heads
    ("tiny-mha", LoraSettings(rank=3, alpha=5, targets=("wq", "wk", "w2"), rslora=True)),
    ("tiny-tied", LoraSettings(rank=4, alpha=16, targets=("wq", "wv", "output"))),  # lm_head on a tied model
])
def test_camelid_adapter_loads_in_peft_with_the_same_logits(camelid_base, tmp_path, name, settings):
    import camelid
    from camelid.lora import save_adapter

    path, hf_dir = camelid_base(name)
    llm = camelid.load(path, compile=False)
    apply_lora(llm.model, settings, seed=0)
    randomize_b(llm.model)
    save_adapter(tmp_path / "adapter", settings, adapter_state(llm.model), llm.config, base_model=str(hf_dir))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == settings.rank
    assert cfg["use_rslora"] == settings.rslora and cfg["base_model_name_or_path"] == str(hf_dir)
    with torch.no_grad():
        ours = llm.model(TOKENS)
    assert (ours - tiny(name)(TOKENS)).abs().max() > 1e-2
    torch.testing.assert_close(peft_logits(hf_dir, tmp_path / "adapter", TOKENS), ours, atol=1e-4, rtol=1e-4)
    # and back: camelid reads its own file to the same adapter
    again = camelid.load(path, adapter=tmp_path / "adapter", compile=False)
    with torch.no_grad():
        torch.testing.assert_close(again.model(TOKENS), ours, atol=1e-6, rtol=0)


def make_peft_adapter(hf_dir, out, seed=0, **lora_kwargs):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(out))
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("name,kwargs", [
    ("tiny", dict(r=4, lora_alpha=8, target_modules=HF_ALL)),
    ("tiny", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True,
                  layers_to_transform=[1], rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 3})),
    ("tiny-tied", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "lm_head"])),
    ("tiny", dict(r=4, lora_alpha=8, target_modules=r".*\.1\.self_attn\.(q|k)_proj")),
])
def test_peft_adapter_loads_in_camelid_with_the_same_logits(camelid_base, tmp_path, name, kwargs):
    import camelid

    path, hf_dir = camelid_base(name, seed=2)
    want = make_peft_adapter(hf_dir, tmp_path / "peft", **kwargs)
    llm = camelid.load(path, adapter=tmp_path / "peft", compile=False)
    with torch.no_grad():
        got = llm.model(TOKENS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in llm.model.parameters())
    # and written back by camelid (some layers only, per-module ranks and alphas), PEFT reads the same adapter
    from camelid.lora import read_adapter, save_adapter

    settings, _ = read_adapter(tmp_path / "peft", llm.config)
    save_adapter(tmp_path / "again", settings, adapter_state(llm.model), llm.config)
    torch.testing.assert_close(peft_logits(hf_dir, tmp_path / "again", TOKENS), want, atol=1e-4, rtol=1e-4)


def test_peft_keys_with_the_adapter_name_are_read(camelid_base, tmp_path):
    from safetensors.torch import load_file, save_file

    from camelid.lora import read_adapter

    path, hf_dir = camelid_base("tiny")
    make_peft_adapter(hf_dir, tmp_path / "peft", r=2, lora_alpha=4, target_modules=["v_proj"])
    plain = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    save_file({k.replace(".weight", ".default.weight"): v for k, v in plain.items()},
              tmp_path / "peft" / "adapter_model.safetensors")
    from camelid.checkpoint import read_checkpoint

    settings, state = read_adapter(tmp_path / "peft", read_checkpoint(path).config)
    assert settings.targets == ("wv",) and sorted(state) == [
        f"layers.{i}.attention.wv.lora_{ab}.weight" for i in (0, 1) for ab in "AB"]


def test_merged_checkpoint_equals_the_unmerged_model(camelid_base, tmp_path):
    import camelid
    from camelid.checkpoint import read_checkpoint, write_checkpoint
    from camelid.lora import merged_checkpoint, save_adapter

    path, hf_dir = camelid_base("tiny-tied")
    llm = camelid.load(path, compile=False)
    settings = LoraSettings(rank=4, alpha=8, targets=ALL)
    apply_lora(llm.model, settings, seed=0)
    randomize_b(llm.model)
    save_adapter(tmp_path / "adapter", settings, adapter_state(llm.model), llm.config)
    merged = merged_checkpoint(read_checkpoint(path), tmp_path / "adapter")
    assert not merged.config.tie_embeddings and "output.weight" in merged.names
    write_checkpoint(merged, tmp_path / "merged", to="hf")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        want = llm.model(TOKENS)
        torch.testing.assert_close(hf(TOKENS).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(camelid.load(tmp_path / "merged", compile=False).model(TOKENS), want,
                                   atol=1e-5, rtol=0)


# ---- at inference: compiled decoding, the command line ---------------------------------------------

@pytest.fixture
def adapted(camelid_base, tmp_path):
    """A tiny tied camelid checkpoint and an adapter on every target of it (head included)."""
    import camelid
    from camelid.lora import save_adapter

    path, _ = camelid_base("tiny-tied")
    llm = camelid.load(path, compile=False)
    settings = LoraSettings(rank=4, alpha=8, targets=ALL)
    apply_lora(llm.model, settings, seed=0)
    randomize_b(llm.model, std=0.2)
    save_adapter(tmp_path / "adapter", settings, adapter_state(llm.model), llm.config)
    return path, tmp_path / "adapter"


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_compiled_decoding_with_an_adapter_equals_eager(adapted, tmp_path, quantize):
    import camelid

    path, adapter = adapted
    prompt = "Shall I compare thee"
    eager = camelid.load(path, adapter=adapter, quantize=quantize, compile=False)
    compiled = camelid.load(path, adapter=adapter, quantize=quantize, compile=False).compile(
        background=False, cache_dir=tmp_path / "compiled")
    text = eager.generate(prompt, max_new_tokens=8, temperature=0)
    assert compiled.generate(prompt, max_new_tokens=8, temperature=0) == text
    assert not compiled.decoder.failed and compiled.decoder.counts["compiled"] >= 1
    assert text != camelid.load(path, quantize=quantize, compile=False).generate(prompt, max_new_tokens=8,
                                                                                 temperature=0)


def test_cli_generate_and_convert_with_an_adapter(adapted, tmp_path, capsys):
    import camelid
    from camelid.cli.main import main as cli

    path, adapter = adapted
    args = ["generate", "--model", str(path), "--adapter", str(adapter), "--prompt", "Shall I",
            "--max-new-tokens", "6", "--temperature", "0"]
    capsys.readouterr()
    assert cli(args) == 0
    compiled = capsys.readouterr().out
    assert cli(args + ["--no-compile"]) == 0
    assert capsys.readouterr().out == compiled
    expected = camelid.load(path, adapter=adapter, compile=False).generate("Shall I", max_new_tokens=6, temperature=0)
    assert compiled.rstrip("\n") == expected
    for to in ("hf", "gguf", "meta", "camelid"):
        dst = tmp_path / ("merged.gguf" if to == "gguf" else f"merged-{to}")
        assert cli(["convert", str(path), str(dst), "--adapter", str(adapter), "--to", to]) == 0
        assert camelid.load(dst, compile=False).generate("Shall I", max_new_tokens=6, temperature=0) == expected, to
    # merge, then quantize
    assert cli(["convert", str(path), str(tmp_path / "q"), "--adapter", str(adapter), "--to", "camelid",
                "--quantize", "int8"]) == 0
    with torch.no_grad():
        a = camelid.load(tmp_path / "q", compile=False).model(TOKENS)
        b = camelid.load(path, adapter=adapter, compile=False).model(TOKENS)
    assert (a - b).norm() / b.norm() < 0.02


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_adapter_agrees_with_peft(smollm2, smollm2_gguf, smollm2_hf, tmp_path):
    """SmolLM2-135M (GQA 9/3 heads, tied head): an adapter on q, k, v, o, gate, up and down,
    saved by camelid, changes camelid's logits and PEFT's over transformers' model alike."""
    import camelid
    from camelid.checkpoint.names import expected_shapes
    from camelid.lora import save_adapter

    config = smollm2.config
    settings = LoraSettings(rank=8, alpha=16, targets=ALL[:-1])
    gen = torch.Generator().manual_seed(0)
    shapes = expected_shapes(config)
    state = {}
    for module in settings.modules(config.n_layers):
        out, inp = shapes[module + ".weight"]
        state[f"{module}.lora_A.weight"] = torch.randn(8, inp, generator=gen) / inp ** 0.5
        state[f"{module}.lora_B.weight"] = torch.randn(out, 8, generator=gen) * 0.02
    save_adapter(tmp_path / "adapter", settings, state, config)
    ids = torch.tensor([smollm2.tokenizer.encode("Shall I compare thee to a summer's day?")])
    adapted = camelid.load(smollm2_gguf, adapter=tmp_path / "adapter", compile=False)
    peft = pytest.importorskip("peft")
    hf_model, _ = smollm2_hf
    with torch.no_grad():
        base, ours = smollm2.model(ids), adapted.model(ids)
        ref_base = hf_model(ids).logits
        wrapped = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
        try:
            ref = wrapped(ids).logits
        finally:
            wrapped.unload()  # the session's transformers model, as it was
    assert (ours - base).abs().max() > 0.1
    assert (ours - ref).abs().max() < 2e-3
    torch.testing.assert_close(ours - base, ref - ref_base, atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_qlora_under_activation_checkpointing_gives_the_same_gradients(mode):
    from camelid.distributed.activation_checkpoint import apply_activation_checkpointing

    def grads(checkpointing):
        model = quantize_model(tiny("tiny"), "int4")
        apply_lora(model, LoraSettings(rank=4, targets=ALL), seed=0)
        randomize_b(model)
        if checkpointing:
            apply_activation_checkpointing(model, mode)
        model.train()
        loss_of(model, *batch()).backward()
        return {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()
                if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert sorted(plain) == sorted(checkpointed) and len(plain) == 2 * (7 * 2 + 1)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-5, rtol=1e-4)
