"""llama.cpp loads the GGUF files camelid writes (opt-in: pip install -e '.[interop]'; pytest -m interop)."""

import pytest

import camelid
from camelid.checkpoint import convert

pytestmark = [pytest.mark.interop, pytest.mark.real_model, pytest.mark.slow]
llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.mark.parametrize("gguf_type", ["F32", "Q8_0"])
def test_llama_cpp_loads_camelid_gguf_and_agrees(smollm2_gguf, tmp_path, gguf_type):
    out = tmp_path / f"smollm2-{gguf_type}.gguf"
    convert(smollm2_gguf, out, to="gguf", gguf_type=gguf_type)
    ref = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False, seed=0)
    ours = camelid.load(out)
    for prompt in PROMPTS:
        expected = ref.create_completion(prompt, max_tokens=16, temperature=0.0, top_k=1)["choices"][0]["text"]
        got = ours.generate(prompt, max_new_tokens=16, temperature=0)
        assert got == expected, (prompt, got, expected)
    # and llama.cpp tokenizes exactly as camelid does
    text = "Hello, world! 你好 🦙   tabs\t\tnew\n\nlines 12345"
    assert ref.tokenize(text.encode(), add_bos=False, special=True) == ours.tokenizer.encode(text)
