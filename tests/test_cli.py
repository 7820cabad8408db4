import io
import json
import subprocess
import sys

import pytest

import camelid
from camelid.cli.main import main
from helpers import random_hf_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("cli") / "hf"
    random_hf_llama(d, bpe_tokenizer, kv_heads=2)
    return d


def test_generate_prints_only_the_continuation(model_dir, capsys):
    expected = camelid.load(model_dir).generate("Shall I", max_new_tokens=12, temperature=0)
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--prompt", "Shall I", "--max-new-tokens", "12",
                 "--temperature", "0", "--dtype", "float32", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_reads_the_prompt_from_stdin(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Shall I"))
    assert main(["generate", "--model", str(model_dir), "--prompt", "-", "--max-new-tokens", "4",
                 "--temperature", "0", "--seed", "1", "--stats"]) == 0
    captured = capsys.readouterr()
    assert "decode 4 tokens" in captured.err


def test_chat_reads_turns_from_stdin(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Shall I compare thee\n/reset\nRough winds\n/exit\n"))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.count("\n") == 2 and "conversation reset" in out.err


def test_convert_and_info(model_dir, tmp_path, capsys):
    assert main(["convert", str(model_dir), str(tmp_path / "m.gguf"), "--to", "gguf", "--gguf-type", "Q8_0"]) == 0
    assert main(["info", str(tmp_path / "m.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"]["format"] == "gguf" and info["source"]["tensor_types"]["Q8_0"] > 0
    assert info["params"] == camelid.load(model_dir).config.num_params()
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "native"), "--to", "camelid"]) == 0
    assert (tmp_path / "native" / "camelid.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_help_lists_every_command():
    # `python -m camelid` is the command itself (what `torchrun -m camelid train ...` runs)
    out = subprocess.run([sys.executable, "-m", "camelid", "--help"], capture_output=True, text=True).stdout
    for command in ("quickstart", "info", "generate", "chat", "convert", "data", "tokenizer", "train", "plan", "reward"):
        assert command in out
    bad = subprocess.run([sys.executable, "-m", "camelid", "generate", "--model", "/nonexistent", "--prompt", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr
