"""Bad input gives one clear message naming the file and the problem; the CLI exits with 2."""

import json

import gguf
import numpy as np
import pytest
import torch

import camelid
from camelid.checkpoint import convert
from camelid.cli.main import main
from camelid.errors import CamelidError
from helpers import cli_error, random_hf_llama


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("g")
    random_hf_llama(d / "hf", bpe_tokenizer, kv_heads=2)
    convert(d / "hf", d / "m.gguf", to="gguf")
    return d / "m.gguf"


def test_truncated_gguf(tmp_path, gguf_file, capsys):
    data = gguf_file.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CamelidError, match=r"cut\.gguf: truncated"):
        camelid.load(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:300])
    with pytest.raises(CamelidError, match=r"header\.gguf: truncated or corrupt GGUF file"):
        camelid.load(tmp_path / "header.gguf")
    err = cli_error(capsys, "generate", "--model", str(tmp_path / "cut.gguf"), "--prompt", "hi")
    assert "cut.gguf" in err


def test_not_a_gguf(tmp_path, capsys):
    (tmp_path / "x.gguf").write_bytes(b"GGML" + b"\0" * 100)
    err = cli_error(capsys, "info", str(tmp_path / "x.gguf"))
    assert "x.gguf" in err and "not a GGUF file" in err


def test_corrupt_safetensors(tmp_path, bpe_tokenizer, capsys):
    random_hf_llama(tmp_path / "hf", bpe_tokenizer)
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(b"\xff" * 8 + st.read_bytes()[8:])  # a header length of 2^64 - 1
    with pytest.raises(CamelidError, match=r"model\.safetensors: not a valid safetensors file"):
        camelid.load(tmp_path / "hf")
    random_hf_llama(tmp_path / "hf2", bpe_tokenizer)
    st = tmp_path / "hf2" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-4096])
    err = cli_error(capsys, "generate", "--model", str(tmp_path / "hf2"), "--prompt", "hi")
    assert "model.safetensors" in err


def test_unsupported_architecture(tmp_path, bpe_tokenizer, gguf_file):
    random_hf_llama(tmp_path / "hf", bpe_tokenizer)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CamelidError, match=r"config\.json: model_type 'gpt_neox' is not supported"):
        camelid.load(tmp_path / "hf")
    reader = gguf.GGUFReader(gguf_file)
    writer = gguf.GGUFWriter(tmp_path / "falcon.gguf", "falcon")
    for t in reader.tensors[:2]:
        writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(CamelidError, match=r"falcon\.gguf: architecture 'falcon' is not supported"):
        camelid.load(tmp_path / "falcon.gguf")


def test_unsupported_tensor_type(tmp_path, gguf_file):
    reader = gguf.GGUFReader(gguf_file)
    writer = gguf.GGUFWriter(tmp_path / "iq.gguf", "llama")
    for key, field in reader.fields.items():
        if key.startswith(("llama.", "tokenizer.")):
            value = field.contents()
            if isinstance(value, list):
                writer.add_array(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            else:
                writer.add_uint32(key, int(value))
    iq = gguf.GGMLQuantizationType.IQ4_NL
    block, size = gguf.GGML_QUANT_SIZES[iq]
    for t in reader.tensors:
        rows, cols = np.array(t.data).shape if t.data.ndim == 2 else (1, t.data.shape[0])
        if t.data.ndim == 2 and cols % block == 0:
            writer.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=iq)
        else:
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(CamelidError, match=r"iq\.gguf: tensor type\(s\) \['IQ4_NL'\] are not supported"):
        camelid.load(tmp_path / "iq.gguf")


def test_params_json_missing_field_and_bad_path(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "params.json").write_text(json.dumps({"dim": 64}))
    torch.save({}, tmp_path / "m" / "consolidated.00.pth")
    with pytest.raises(CamelidError, match=r"params\.json"):
        camelid.load(tmp_path / "m")
    err = cli_error(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert "nope: no such file or directory" in err


def test_cli_rejects_bad_sampling_values(tmp_path, gguf_file, capsys):
    err = cli_error(capsys, "generate", "--model", str(gguf_file), "--prompt", "hi", "--top-p", "1.5")
    assert "--top-p" in err


def test_convert_refuses_to_overwrite(tmp_path, gguf_file, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    err = cli_error(capsys, "convert", str(gguf_file), str(tmp_path / "out"), "--to", "hf")
    assert "already exists" in err and (tmp_path / "out" / "keep.txt").exists()


@pytest.mark.parametrize("argv,words", [
    (["generate", "--model", "m", "--top-k", "x"], ["camelid generate: error:", "--top-k", "'x'", "camelid generate --help"]),
    (["generate", "--model", "m", "--prompt", "p", "--frobnicate"], ["camelid generate: error:", "--frobnicate"]),
    (["data", "prepare"], ["camelid data prepare: error:", "RECIPE.toml"]),
    (["eval", "--model", "m", "--tasks", "x", "--limit", "many"], ["camelid eval: error:", "--limit"]),
    (["no-such-command"], ["camelid: error:", "no-such-command"]),
])
def test_argparse_refusals_are_one_line(capsys, argv, words):
    """argparse's own refusals (a bad number, an unknown option or command) follow the rule for
    every user mistake: one line, exit 2, no usage block in front of it."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "usage:" not in err, err
    for w in words:
        assert w in err, (w, err)
