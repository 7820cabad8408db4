"""Builders for the tiny tokenizers and checkpoints the tests share."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Tokenizer as HFBackend
from tokenizers import decoders, models, pre_tokenizers, trainers

from camelid.tokenizer import HFTokenizer, SentencePieceTokenizer

# A time limit on a subprocess guards against a hang, never against slowness: with both cores
# busy the suite has run four times slower than on an idle machine (30 minutes instead of 8), and
# one test six times slower, so a limit is set far beyond that, where only a hang reaches it.
HANG_FACTOR = 20


def cli_error(capsys, *argv) -> str:
    """Run `camelid ARGV` in this process and assert how every user mistake ends: exit code 2 and
    exactly one line on stderr, no traceback. Returns the line."""
    from camelid.cli.main import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err


def hang_limit(idle_seconds: float) -> float:
    """Seconds after which a subprocess that takes `idle_seconds` on an idle machine is taken to
    hang: HANG_FACTOR times as long, and never under ten minutes."""
    return max(600.0, HANG_FACTOR * idle_seconds)


# A little public-domain text (Shakespeare, Sonnet 18, and a few lines of code and numbers).
CORPUS = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
def fibonacci(n):
    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
The year 1609 had 365 days; 3.14159 is pi, 2718 is e times 1000.
"""

TEXTS = [
    "Hello, world!",
    "Shall I compare thee to a summer's day?",
    "  leading spaces and   runs of spaces  ",
    "tabs\tand\nnewlines\n\n",
    "numbers 1234567 and 3.14",
    "unicode: caf\u00e9, na\u00efve, \u4f60\u597d, \U0001f999 llama",
    "def f(x):\n    return x * 2\n",
]


def train_sentencepiece(directory: Path, vocab_size: int = 512) -> SentencePieceTokenizer:
    """A LLaMA-style SentencePiece BPE model (byte fallback, split digits, identity normalisation)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 20), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return SentencePieceTokenizer.from_file(directory / "tokenizer.model")


def train_byte_bpe(vocab_size: int = 512) -> HFTokenizer:
    """A GPT-2-style byte-level BPE with ChatML special tokens."""
    backend = HFBackend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS.splitlines() * 20, trainer)
    tok = HFTokenizer(backend)
    tok.bos_id, tok.eos_id, tok.add_bos = 1, 2, False
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def random_hf_llama(directory: Path, tokenizer, tied: bool = False, kv_heads: int = 2, seed: int = 0,
                    dtype: torch.dtype = torch.float32, **overrides):
    """A random transformers LlamaForCausalLM saved with save_pretrained, plus our tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
               bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype).eval()
    with torch.no_grad():  # HF initialises norms to one; randomise them so the test can see them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return model


def logged_losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "lr" in r}


def kill_9_after(proc: subprocess.Popen, run_dir: Path, step: int, limit: float) -> int:
    """SIGKILL `proc` as soon as its metrics log `step` (or at `limit` seconds); the last step it logged."""
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        done = logged_losses(run_dir) if (Path(run_dir) / "metrics.jsonl").exists() else {}
        if max(done, default=0) >= step:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return max(logged_losses(run_dir))


def straight_and_killed(args: list, tmp_path: Path, kill_at: int, idle_seconds: float = 60) -> tuple[Path, Path, int]:
    """`camelid ARGS` (with "{run}" standing for the run directory) run to its end in
    tmp_path/straight; and in tmp_path/broken SIGKILLed once its metrics log step `kill_at`, then
    run again to resume. Returns both run directories and the last step the killed run logged."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    limit = hang_limit(idle_seconds)

    def command(run: Path) -> list[str]:
        return [sys.executable, "-m", "camelid", *(str(a).replace("{run}", str(run)) for a in args)]

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run(command(straight), check=True, capture_output=True, env=env, timeout=limit)
    proc = subprocess.Popen(command(broken), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    logged = kill_9_after(proc, broken, kill_at, limit)
    subprocess.run(command(broken), check=True, capture_output=True, env=env, timeout=limit)
    return straight, broken, logged


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
