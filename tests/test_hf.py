"""Hugging Face format: parity with transformers through camelid's production reader and writer."""

import json

import pytest
import torch
from safetensors.torch import load_file

import camelid
from camelid.checkpoint import convert, read_checkpoint
from helpers import random_hf_llama

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tied,kv_heads,tok", [(False, 2, "bpe"), (True, 2, "bpe"), (False, 4, "spm"), (True, 1, "spm")])
def test_logits_match_transformers(tmp_path, tied, kv_heads, tok, bpe_tokenizer, spm_tokenizer):
    tokenizer = bpe_tokenizer if tok == "bpe" else spm_tokenizer
    ref = random_hf_llama(tmp_path / "hf", tokenizer, tied=tied, kv_heads=kv_heads)
    llm = camelid.load(tmp_path / "hf")
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = llm.model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert llm.config.tie_embeddings == tied and llm.config.kv_heads == kv_heads


def test_greedy_generation_matches_transformers(tmp_path, bpe_tokenizer):
    ref = random_hf_llama(tmp_path / "hf", bpe_tokenizer, kv_heads=2, seed=4)
    llm = camelid.load(tmp_path / "hf")
    prompt = bpe_tokenizer.encode("Shall I compare thee")
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                       pad_token_id=0, min_new_tokens=16)
    ours = llm.generate_batch([prompt], max_new_tokens=16, temperature=0)[0].tokens
    assert ours == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_camelid_hf_round_trip_is_bit_exact(tmp_path, bpe_tokenizer, dtype):
    random_hf_llama(tmp_path / "hf", bpe_tokenizer, kv_heads=2, dtype=dtype)
    convert(tmp_path / "hf", tmp_path / "native", to="camelid")
    convert(tmp_path / "native", tmp_path / "back", to="hf")
    a = load_file(tmp_path / "hf" / "model.safetensors")
    b = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == dtype
        assert torch.equal(a[name], b[name]), name
    cfg_a = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("hidden_size", "num_key_value_heads", "intermediate_size", "rms_norm_eps", "tie_word_embeddings"):
        assert cfg_a[key] == cfg_b[key]


def test_written_hf_model_loads_in_transformers(tmp_path, bpe_tokenizer):
    random_hf_llama(tmp_path / "hf", bpe_tokenizer, kv_heads=2, tied=True)
    convert(tmp_path / "hf", tmp_path / "gguf.gguf", to="gguf")
    convert(tmp_path / "gguf.gguf", tmp_path / "back", to="hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, bpe_tokenizer.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, ref(tokens).logits, atol=1e-5, rtol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    text = "Shall I compare thee to a summer's day?"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == bpe_tokenizer.encode(text)


def test_load_keeps_one_copy_and_source_dtype(tmp_path, bpe_tokenizer):
    random_hf_llama(tmp_path / "hf", bpe_tokenizer, dtype=torch.bfloat16)
    ckpt = read_checkpoint(tmp_path / "hf")
    assert ckpt.dtype == torch.bfloat16
    llm = camelid.load(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in llm.model.parameters())
