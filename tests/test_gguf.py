"""GGUF: written by camelid, read back by the `gguf` package and by camelid."""

import gguf
import numpy as np
import pytest
import torch

import camelid
from camelid.checkpoint import convert, read_checkpoint
from camelid.checkpoint.names import rename
from helpers import random_hf_llama


@pytest.fixture
def hf_dir(tmp_path, bpe_tokenizer):
    random_hf_llama(tmp_path / "hf", bpe_tokenizer, kv_heads=2)
    return tmp_path / "hf"


def test_f32_gguf_reads_back_identical(tmp_path, hf_dir):
    src = read_checkpoint(hf_dir)
    convert(hf_dir, tmp_path / "m.gguf", to="gguf", gguf_type="F32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    by_name = {t.name: t for t in reader.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    back = read_checkpoint(tmp_path / "m.gguf")
    assert back.config == src.config
    for name in src.names:
        original = src.read(name)
        raw = np.array(by_name[rename(name, "camelid", "gguf")].data).reshape(original.shape)
        assert np.array_equal(raw, original.numpy()), name                # through the gguf package
        assert torch.equal(back.read(name), original), name               # through camelid
    assert back.tokenizer.encode("Shall I compare thee?") == src.tokenizer.encode("Shall I compare thee?")
    assert back.tokenizer.chat_template == src.tokenizer.chat_template


@pytest.mark.parametrize("gguf_type,tol", [("F16", 2e-3), ("BF16", 2e-2), ("Q8_0", 2e-2)])
def test_lossy_gguf_types_stay_close(tmp_path, hf_dir, gguf_type, tol):
    convert(hf_dir, tmp_path / "m.gguf", to="gguf", gguf_type=gguf_type)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type and types["blk.0.attn_norm.weight"] == "F32"
    ref, got = camelid.load(hf_dir), camelid.load(tmp_path / "m.gguf")
    tokens = torch.randint(0, ref.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref.model(tokens), got.model(tokens)
    assert (a - b).abs().max() < tol * a.abs().max()


def test_spm_tokenizer_survives_gguf(tmp_path, spm_tokenizer):
    random_hf_llama(tmp_path / "hf", spm_tokenizer, kv_heads=2)
    convert(tmp_path / "hf", tmp_path / "m.gguf", to="gguf")
    back = read_checkpoint(tmp_path / "m.gguf").tokenizer
    assert type(back).__name__ == "SentencePieceTokenizer"
    for text in ["Shall I compare thee to a summer's day?", "numbers 1609 \U0001f999", " two  spaces"]:
        assert back.encode(text, bos=True) == spm_tokenizer.encode(text, bos=True)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "BF16", "F16"])
def test_reads_quantized_tensor_types(tmp_path, hf_dir, qtype):
    """Files with each tensor type, written with the gguf package's own quantizers."""
    src = read_checkpoint(hf_dir)
    q = gguf.GGMLQuantizationType[qtype]
    path = tmp_path / f"{qtype}.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    from camelid.checkpoint.gguf import _write_config, _write_tokenizer

    _write_config(writer, src.config)
    _write_tokenizer(writer, src.tokenizer.gguf_metadata())
    expected = {}
    for name in src.names:
        t = src.read(name).numpy()
        if t.ndim == 2 and t.shape[1] % gguf.GGML_QUANT_SIZES[q][0] == 0:
            data = gguf.quants.quantize(t, q)
            writer.add_tensor(rename(name, "camelid", "gguf"), data, raw_dtype=q)
            expected[name] = gguf.quants.dequantize(data, q)
        else:
            writer.add_tensor(rename(name, "camelid", "gguf"), t)
            expected[name] = t
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = read_checkpoint(path)
    for name, want in expected.items():
        assert np.array_equal(back.read(name).float().numpy(), want.astype(np.float32)), name


def test_unsupported_rope_scaling_is_an_error_not_plain_rope(tmp_path, hf_dir):
    from camelid.checkpoint.gguf import config_from_gguf
    from camelid.errors import CamelidError

    convert(hf_dir, tmp_path / "m.gguf", to="gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    meta = {k: f.contents() for k, f in reader.fields.items()}
    meta["llama.rope.scaling.type"] = "yarn"
    with pytest.raises(CamelidError, match="yarn"):
        config_from_gguf(meta, {t.name: t for t in reader.tensors}, "m.gguf")


def test_converted_files_get_ordinary_permissions(tmp_path, hf_dir):
    import os
    import stat

    old = os.umask(0o022)
    try:
        convert(hf_dir, tmp_path / "m.gguf", to="gguf")
        convert(hf_dir, tmp_path / "native", to="camelid")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "native").stat().st_mode) == 0o755
