"""Meta format: params.json + consolidated.NN.pth shards, merged along the right axis."""

import json

import pytest
import torch

import camelid
from camelid.checkpoint import convert, read_checkpoint
from camelid.errors import CamelidError
from helpers import random_hf_llama


@pytest.fixture
def hf_dir(tmp_path, spm_tokenizer):
    random_hf_llama(tmp_path / "hf", spm_tokenizer, kv_heads=2, intermediate_size=192)
    return tmp_path / "hf"


def test_two_shards_give_the_same_logits_as_one(tmp_path, hf_dir):
    convert(hf_dir, tmp_path / "meta1", to="meta", shards=1)
    convert(hf_dir, tmp_path / "meta2", to="meta", shards=2)
    assert sorted(p.name for p in (tmp_path / "meta2").glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    shard = torch.load(tmp_path / "meta2" / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].shape == (32, 64)           # column-parallel: dim 0
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)           # row-parallel: dim 1
    assert shard["tok_embeddings.weight"].shape[1] == 32                     # ParallelEmbedding: dim 1
    one, two, ref = (camelid.load(tmp_path / "meta1"), camelid.load(tmp_path / "meta2"), camelid.load(hf_dir))
    tokens = torch.randint(0, one.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(one.model(tokens), two.model(tokens))
        torch.testing.assert_close(two.model(tokens), ref.model(tokens), atol=1e-6, rtol=1e-6)


def test_stray_rope_freqs_and_vocab_minus_one(tmp_path, hf_dir, spm_tokenizer):
    convert(hf_dir, tmp_path / "meta", to="meta")
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    sd["rope.freqs"] = torch.zeros(8)
    torch.save(sd, tmp_path / "meta" / "consolidated.00.pth")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    params["vocab_size"] = -1  # as LLaMA-1's release writes it
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    ckpt = read_checkpoint(tmp_path / "meta")
    assert ckpt.config.vocab_size == spm_tokenizer.vocab_size
    camelid.load(tmp_path / "meta")  # rope.freqs is ignored, not an error


def test_llama1_layout_with_tokenizer_in_parent(tmp_path, hf_dir):
    convert(hf_dir, tmp_path / "LLaMA" / "7B", to="meta")
    (tmp_path / "LLaMA" / "7B" / "tokenizer.model").rename(tmp_path / "LLaMA" / "tokenizer.model")
    (tmp_path / "LLaMA" / "7B" / "tokenizer_config.json").unlink()
    llm = camelid.load(tmp_path / "LLaMA" / "7B")
    assert llm.tokenizer.bos_id == 1


def test_missing_shard_is_named(tmp_path, hf_dir):
    convert(hf_dir, tmp_path / "meta", to="meta", shards=4)
    (tmp_path / "meta" / "consolidated.02.pth").unlink()
    with pytest.raises(CamelidError, match=r"consolidated\.02\.pth.*missing"):
        read_checkpoint(tmp_path / "meta")
    (tmp_path / "meta" / "consolidated.03.pth").unlink()  # the last one gone: shapes give it away
    with pytest.raises(CamelidError, match="shape"):
        camelid.load(tmp_path / "meta")


def test_params_that_disagree_with_weights(tmp_path, hf_dir):
    convert(hf_dir, tmp_path / "meta", to="meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    params["n_kv_heads"] = 4
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    with pytest.raises(CamelidError, match=r"meta.*attention\.wk\.weight has shape \[32, 64\].*\[64, 64\]"):
        camelid.load(tmp_path / "meta")


def test_params_json_has_only_keys_metas_modelargs_takes(tmp_path, hf_dir):
    convert(hf_dir, tmp_path / "meta", to="meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    # Llama-2's ModelArgs(max_seq_len=..., max_batch_size=..., **params) must accept these
    llama2_fields = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                     "ffn_dim_multiplier", "norm_eps"}
    assert set(params) <= llama2_fields, set(params) - llama2_fields
