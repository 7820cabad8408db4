"""Several adapters at once (camelid.lora.multi): each row of a batch gets what the model with
just its adapter (or none) gives, eagerly, through the engine's KV-cache steps, over an int8
base, and in the compiled decode step with the selection changed between steps."""

import pytest
import torch

from camelid.errors import CamelidError
from camelid.generate import Engine
from camelid.lora import (AdapterSettings, LoraSettings, MultiLoRALinear, adapter_state, apply_lora, attach_adapters,
                          load_adapter, lora_layers, save_adapter, select_adapters)
from camelid.model import PagedKVCache
from camelid.quant import quantize_model
from test_model import tiny

# different ranks and targets; the third adapts some layers only, with a rank of its own for one
SETTINGS = [
    LoraSettings(rank=4, alpha=8, targets=("wq", "wv")),
    LoraSettings(rank=2, alpha=4, targets=("wq", "wk", "w2", "output"), rslora=True),
    AdapterSettings(rank=8, alpha=16, targets=("wv", "wo", "w1", "w3"), ranks={"layers.1.attention.wo": 3},
                    only=("layers.0.attention.wv", "layers.1.attention.wo", "layers.1.feed_forward.w1",
                          "layers.1.feed_forward.w3")),
]
ROWS = [0, -1, 2, 1]  # adapter per row; -1: the base
GEN = torch.Generator().manual_seed(7)


def base(name, quantize=None):
    model = tiny(name)
    return quantize_model(model, quantize) if quantize else model


def save_adapters(tmp_path, name):
    dirs = []
    for i, settings in enumerate(SETTINGS):
        model = tiny(name)
        apply_lora(model, settings, seed=i)
        with torch.no_grad():  # B random, not zero: an adapter left out would show
            for m in lora_layers(model).values():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=GEN) * 0.2)
        dirs.append(save_adapter(tmp_path / f"adapter{i}", settings, adapter_state(model), model.config))
    return dirs


def models(tmp_path, name, quantize=None):
    """The model with all adapters attached, and the references: the base, then the base with
    each adapter loaded the ordinary way (load_adapter)."""
    dirs = save_adapters(tmp_path, name)
    multi = base(name, quantize)
    index = attach_adapters(multi, {f"a{i}": d for i, d in enumerate(dirs)})
    assert index == {"a0": 0, "a1": 1, "a2": 2}
    refs = {-1: base(name, quantize)}
    for i, d in enumerate(dirs):
        refs[i] = load_adapter(base(name, quantize), d)
    return multi, refs


def expected(refs, run):
    """Row i of `run(model)` with the model of row i's adapter, each reference on the whole
    batch (the same products as the multi-adapter model, whatever their row count)."""
    outs = {k: run(m) for k, m in refs.items()}
    return torch.stack([outs[k][i] for i, k in enumerate(ROWS)])


@pytest.mark.parametrize("name,quantize", [("tiny", None), ("tiny-tied", None), ("tiny", "int8"), ("tiny", "int4")])
def test_each_row_gets_its_adapter(tmp_path, name, quantize):
    multi, refs = models(tmp_path, name, quantize)
    assert len([m for m in multi.modules() if isinstance(m, MultiLoRALinear)]) == 4 + 7 + 1  # the union
    tokens = torch.randint(0, 512, (4, 9), generator=GEN)
    with torch.no_grad():
        want = expected(refs, lambda m: m(tokens))
        assert (want[0] - refs[-1](tokens)[0]).abs().max() > 1e-2  # the adapters change the logits
        assert torch.equal(multi(tokens), refs[-1](tokens))      # nothing selected yet: the base
        select_adapters(multi, ROWS)
        torch.testing.assert_close(multi(tokens), want, atol=1e-5, rtol=0)
        select_adapters(multi, [-1] * 4)                           # none: the update is skipped
        assert torch.equal(multi(tokens), refs[-1](tokens))


@pytest.mark.parametrize("paged", [False, True])
def test_engine_steps_over_a_kv_cache(tmp_path, paged):
    """Prefill (extend) then decode steps, each row at its own position."""
    multi, refs = models(tmp_path, "tiny")
    prompts = [torch.randint(0, 512, (n,), generator=GEN).tolist() for n in (5, 8, 3, 6)]
    select_adapters(multi, ROWS)

    def run(model):
        engine = Engine(model)
        if paged:
            cache = PagedKVCache(model.config, num_blocks=20, block_size=4, rows=4, max_blocks=4)
            for row in range(4):
                cache.assign(row, list(range(1 + 4 * row, 5 + 4 * row)))
        else:
            cache = engine.allocate(4, 16)
        positions = torch.tensor([len(p) for p in prompts])
        tokens = torch.tensor([7, 8, 9, 10])
        with torch.inference_mode():
            out = [engine.prefill(prompts, cache)]
            for _ in range(3):
                out.append(engine.decode(tokens, positions, cache))
                tokens, positions = (tokens * 31 + 5) % 512, positions + 1   # the same inputs for every model
        return torch.stack(out, 1)                                           # [rows, steps, vocab]

    torch.testing.assert_close(run(multi), expected(refs, run), atol=1e-5, rtol=0)


def test_an_adapter_for_another_base_is_refused(tmp_path):
    model = tiny("tiny-mha")  # 4 key/value heads where "tiny" has 2: wk and wv are larger
    settings = LoraSettings(rank=4, targets=("wq", "wk"))
    apply_lora(model, settings, seed=0)
    other = save_adapter(tmp_path / "other", settings, adapter_state(model), model.config)
    good = save_adapters(tmp_path, "tiny")[0]
    multi = tiny("tiny")
    with pytest.raises(CamelidError, match=r"other.*k_proj.*has shape \[64, 4\].*needs \[32, 4\]"):
        attach_adapters(multi, {"good": good, "other": other})
    assert not any(isinstance(m, MultiLoRALinear) for m in multi.modules())  # left as it was
    attach_adapters(multi, {"good": good})
    with pytest.raises(CamelidError, match="adapter index 1 does not exist"):
        select_adapters(multi, [0, 1])
    select_adapters(multi, [0, -1, 0])
    with pytest.raises(CamelidError, match="selected for 3 rows but the batch has 2"):
        multi(torch.zeros(2, 4, dtype=torch.long))


def test_compiled_steps_see_the_selection_written_between_steps(tmp_path):
    """The compiled decoder works on a copy of the model that shares its tensors, the selection's
    index among them: selecting between steps changes what the compiled step computes, whether
    the step was compiled here or loaded from the cache directory."""
    multi, _ = models(tmp_path, "tiny")
    prompts = [torch.randint(0, 512, (n,), generator=GEN).tolist() for n in (5, 8, 3, 6)]
    selections = (ROWS, [1, 2, -1, 0], [-1] * 4, ROWS)

    def run(engine, selections=selections):
        cache = engine.new_cache(4, 16)
        positions, tokens, out = torch.tensor([len(p) for p in prompts]), torch.tensor([7, 8, 9, 10]), []
        with torch.inference_mode():
            select_adapters(multi, ROWS)
            engine.prefill(prompts, cache)
            for rows in selections:
                select_adapters(multi, rows)
                out.append(engine.decode(tokens, positions, cache))
                tokens, positions = (tokens * 31 + 5) % 512, positions + 1
        return torch.stack(out)

    want = run(Engine(multi))
    same = run(Engine(multi), [ROWS] * 4)
    assert (want[1:3] - same[1:3]).abs().amax(-1).min() > 1e-2  # every row's new selection shows
    for source in ("compiled", "loaded"):
        engine = Engine(multi)
        engine.compile(background=False, cache_dir=tmp_path / "compiled")
        torch.testing.assert_close(run(engine), want, atol=1e-4, rtol=1e-4)
        assert not engine.compiled.failed and engine.decode_steps == {"compiled": 4, "eager": 0}
        assert engine.compiled.counts[source] == 1
