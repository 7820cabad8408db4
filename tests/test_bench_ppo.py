"""benchmarks/ppo_throughput.py on a tiny policy: its settings pass the trainer's checks, a
measured step yields every figure its table prints, and the table reads them."""

import json

import pytest
import torch

from camelid.checkpoint.native import write_native
from camelid.config import ModelConfig
from camelid.model import Transformer
from helpers import load_benchmark, train_sentencepiece

@pytest.fixture(scope="module")
def bench():
    return load_benchmark("ppo_throughput")


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_one_tiny_grpo_step_gives_the_table_its_figures(bench, tmp_path, keep_threads):
    tokenizer = train_sentencepiece(tmp_path / "spm", vocab_size=320)
    config = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=tokenizer.vocab_size, multiple_of=32,
                         norm_eps=1e-5, max_seq_len=128)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights(seed=3)
    policy = tmp_path / "policy"
    policy.mkdir()
    write_native(policy, config, tokenizer, model.state_dict().items())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                               for w in ["summer", "winds", "buds", "gold", "eye", "heaven"] * 2))

    args = bench.parse(["--objective", "grpo", "--base", str(policy), "--prompts", str(prompts), "--seq-len", "64",
                        "--max-new-tokens", "8", "--steps", "1", "--threads", "1", "--prompts-per-step", "2",
                        "--completions-per-prompt", "2", "--dtype", "float32"])
    r = bench.measure(args, str(policy), "false")
    assert r["new_tokens"] > 0 and r["update_tokens"] > 0 and r["compile_s"] == 0
    assert 0 < r["generate_s"] < r["rollout_s"] and 0 < r["update_s"] and r["rollout_s"] + r["update_s"] <= r["step_s"]
    assert r["compiled_steps"] == 0 and r["eager_steps"] > 0       # rl.compile = false decodes eagerly
    lines = bench.table(args, {"false": r})
    assert lines[1].startswith("eager (rl.compile=false)") and len(lines) == 3
    with pytest.raises(SystemExit):
        bench.parse(["--objective", "grpo", "--completions-per-prompt", "1"])
