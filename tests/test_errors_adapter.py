"""`--adapter` (generate, chat, eval, convert) on bad adapters: one line on stderr naming the
adapter file and the tensor or field, exit code 2, no traceback; what can be checked without the
base (the directory, adapter_config.json) is checked before the model is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from camelid.checkpoint import read_checkpoint
from camelid.lora import LoraSettings, adapter_state, apply_lora, save_adapter
from helpers import cli_error, random_hf_llama
from test_model import tiny

MISSING = "no-such-model"  # rows that use it prove the adapter is checked before the model is read


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("m") / "hf"
    random_hf_llama(d, bpe_tokenizer, kv_heads=2)
    return d


@pytest.fixture
def adapter(tmp_path, model_dir):
    """A good adapter for model_dir (rank 4 on q, v and the head), as camelid saves it."""
    config = read_checkpoint(model_dir).config
    model = tiny("tiny")
    assert (model.config.dim, model.config.n_layers) == (config.dim, config.n_layers)
    settings = LoraSettings(rank=4, targets=("wq", "wv"))
    apply_lora(model, settings, seed=0)
    return save_adapter(tmp_path / "adapter", settings, adapter_state(model), config)


def edit_config(d: Path, **changes) -> Path:
    path = d / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return d


def edit_tensors(d: Path, fn) -> Path:
    path = d / "adapter_model.safetensors"
    save_file(fn(load_file(path)), path)
    return d


Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

BEFORE_LOAD = [  # (adapter from tmp_path and a good adapter, words the message must hold)
    pytest.param(lambda d, a: d / "nothing", ["--adapter", "nothing: no such directory"], id="missing"),
    pytest.param(lambda d, a: (d / "f").write_text("x") and d / "f", ["--adapter", "is a file"], id="file"),
    pytest.param(lambda d, a: (d / "empty").mkdir() or d / "empty", ["no adapter_config.json"], id="no-config"),
    pytest.param(lambda d, a: (a / "adapter_config.json").write_text("{") and a,
                 ["adapter_config.json: not valid JSON"], id="bad-json"),
    pytest.param(lambda d, a: edit_config(a, peft_type="PREFIX_TUNING"), ["peft_type 'PREFIX_TUNING'", "LORA"],
                 id="peft-type"),
    pytest.param(lambda d, a: edit_config(a, use_dora=True), ["use_dora=True", "DoRA"], id="dora"),
    pytest.param(lambda d, a: edit_config(a, bias="all"), ["bias='all'", "none"], id="bias"),
    pytest.param(lambda d, a: edit_config(a, modules_to_save=["lm_head"]), ["modules_to_save"], id="modules-to-save"),
    pytest.param(lambda d, a: edit_config(a, target_modules=["q_proj", "embed_tokens"]),
                 ["target_modules ['embed_tokens']", "q_proj"], id="unknown-target"),
    pytest.param(lambda d, a: edit_config(a, r=0), ["adapter_config.json: r 0"], id="rank-zero"),
    pytest.param(lambda d, a: edit_config(a, lora_dropout=1.5), ["adapter_config.json: lora_dropout 1.5"],
                 id="dropout"),
    pytest.param(lambda d, a: edit_config(a, rank_pattern={"q_proj": "big"}),
                 ["adapter_config.json: rank_pattern must map module patterns to ranks"], id="rank-pattern"),
    pytest.param(lambda d, a: (a / "adapter_model.safetensors").unlink() or a, ["no adapter_model.safetensors"],
                 id="no-weights"),
]


@pytest.mark.parametrize("make,words", BEFORE_LOAD)
@pytest.mark.parametrize("command", ["generate", "chat", "eval", "convert"])
def test_adapter_directory_mistakes_before_the_model_loads(capsys, tmp_path, adapter, make, words, command):
    bad = make(tmp_path, adapter)
    argv = {"generate": ["generate", "--model", MISSING, "--prompt", "x"],
            "chat": ["chat", "--model", MISSING],
            "eval": ["eval", "--model", MISSING, "--tasks", "piqa", "--output", tmp_path / "o.json"],
            "convert": ["convert", MISSING, tmp_path / "out", "--to", "hf"]}[command]
    line = cli_error(capsys, *argv, "--adapter", bad)
    assert line.startswith("camelid") and "--adapter" in line and MISSING not in line, line
    for w in words:
        assert w in line, line


def _rank_of_weights(t: dict) -> dict:
    return {k: (v[:2] if ".lora_A." in k else v[:, :2]) for k, v in t.items()}


AGAINST_BASE = [
    pytest.param(lambda a: edit_config(a, r=2), ["adapter_model.safetensors", f"tensor {Q0A} has shape [4, 64]",
                                                 "[2, 64]"], id="shape-vs-rank"),
    pytest.param(lambda a: edit_tensors(a, lambda t: {**t, Q0A: torch.zeros(4, 128)}),
                 ["adapter_model.safetensors", f"tensor {Q0A} has shape [4, 128]"], id="shape-vs-base"),
    pytest.param(lambda a: edit_config(a, r=100), ["adapter_config.json: r 100 is larger than",
                                                   "model.layers.0.self_attn.q_proj [64, 64]", "at most 64"],
                 id="rank-too-large"),
    pytest.param(lambda a: edit_tensors(a, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}),
                 ["adapts layer 7 but the base has 2 layers"], id="no-such-layer"),
    pytest.param(lambda a: edit_tensors(a, lambda t: {**t, "base_model.model.model.norm.lora_A.weight":
                                                      torch.zeros(4, 64)}),
                 ["tensor base_model.model.model.norm.lora_A.weight adapts model.norm", "q_proj"], id="not-a-target"),
    pytest.param(lambda a: edit_tensors(a, lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A":
                                                      torch.zeros(4, 512)}),
                 ["adapts an embedding"], id="embedding"),
    pytest.param(lambda a: edit_tensors(a, lambda t: {k: v for k, v in t.items() if k != Q0A}),
                 ["no lora_A weight for model.layers.0.self_attn.q_proj"], id="half-a-pair"),
    pytest.param(lambda a: ((a / "adapter_model.safetensors").write_bytes(b"\x10\x00"), a)[1],
                 ["adapter_model.safetensors: cannot read the adapter weights"], id="truncated"),
]


@pytest.mark.parametrize("make,words", AGAINST_BASE)
def test_adapter_that_does_not_fit_the_base(capsys, tmp_path, model_dir, adapter, make, words):
    bad = make(adapter)
    for argv in (["generate", "--model", model_dir, "--prompt", "x", "--no-compile"],
                 ["convert", model_dir, tmp_path / "out", "--to", "hf"]):
        line = cli_error(capsys, *argv, "--adapter", bad)
        for w in words:
            assert w in line, line
    assert not (tmp_path / "out").exists()


def test_good_adapter_runs(capsys, model_dir, adapter):
    from camelid.cli.main import main

    assert main(["generate", "--model", str(model_dir), "--adapter", str(adapter), "--prompt", "Shall",
                 "--max-new-tokens", "3", "--temperature", "0", "--no-compile"]) == 0
