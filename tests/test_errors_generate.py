"""`camelid generate` and `camelid chat`: every bad option ends in one line naming it and exit
code 2, checked before the model loads where it can be; text that is not valid UTF-8 is
generated from, with a warning; a chat survives a long conversation, a long message, Ctrl-C
and unknown commands (issue 12)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import camelid
from camelid.cli import chat as chat_cli
from camelid.cli import generate as generate_cli
from camelid.cli.main import main
from camelid.generate import LLM
from camelid.generate.compiled import StepShape
from helpers import random_hf_llama
from test_model import tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("gen") / "hf"
    random_hf_llama(d, bpe_tokenizer, kv_heads=2)
    return d


@pytest.fixture
def tiny_llm(bpe_tokenizer):
    return LLM(tiny("tiny"), bpe_tokenizer, compile=False)  # context 256


def run(capsys, *argv):
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own refusals (a bad number) exit from inside main
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(capsys, argv, words):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"camelid {argv[0]}: error: ")
    for w in words:
        assert w in err, (w, err)


def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(camelid, "load", refuse)


# (extra argv, words the message must hold, checked before the model loads); "MODEL" and "TMP"
# stand for the model directory and a temporary directory
SHARED = [
    (["--model", "TMP/nope"], ["nope", "no such file"], False),
    (["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"], True),
    (["--max-new-tokens", "-5"], ["--max-new-tokens"], True),
    (["--temperature", "-1"], ["--temperature"], True),
    (["--temperature", "nan"], ["--temperature"], True),
    (["--temperature", "inf"], ["--temperature"], True),
    (["--top-p", "0"], ["--top-p", "(0, 1]"], True),
    (["--top-p", "1.5"], ["--top-p"], True),
    (["--top-k", "0"], ["--top-k", ">= 1"], True),
    (["--seed", "-1"], ["--seed"], True),
    (["--seed", str(2**70)], ["--seed"], True),
    (["--device", "foo"], ["--device", "foo"], True),
    (["--device", "meta"], ["--device", "meta"], True),
    (["--device", "cuda:99"], ["--device", "cuda:99"], True),
    (["--group-size", "64"], ["--group-size", "--quantize int4"], True),
    (["--quantize", "int8", "--group-size", "64"], ["--group-size"], True),
    (["--quantize", "int4", "--group-size", "48"], ["--group-size", "32, 64, 128"], True),
    (["--draft-tokens", "2"], ["--draft-tokens", "--draft"], True),
    (["--draft-quantize", "int8"], ["--draft-quantize", "--draft"], True),
    (["--draft", "MODEL", "--draft-tokens", "0"], ["--draft-tokens", ">= 1"], True),
    (["--draft", "TMP/no-draft"], ["--draft", "no-draft", "no such file"], True),
]

GENERATE = SHARED + [
    (["--system", "be brief"], ["--system", "--chat"], True),
    (["--prompt-file", "TMP/missing.txt"], ["--prompt-file", "missing.txt", "no such file"], True),
    (["--prompt-file", "TMP"], ["--prompt-file", "directory"], True),
    (["--prompt", "Shall I " * 300], ["prompt", "context is 256"], False),
]


def _argv(row, model_dir, tmp_path):
    return [str(model_dir) if a == "MODEL" else a.replace("TMP", str(tmp_path)) for a in row]


def _id(value):
    return " ".join(value)[:40] if isinstance(value, list) else None


@pytest.mark.parametrize("extra,words,before_load", GENERATE, ids=_id)
def test_generate_matrix(extra, words, before_load, model_dir, tmp_path, capsys, monkeypatch):
    if before_load:
        no_loading(monkeypatch)
    argv = ["generate", "--model", str(model_dir), "--max-new-tokens", "2", "--device", "cpu"]
    if "--prompt" not in extra and "--prompt-file" not in extra:
        argv += ["--prompt", "Shall I"]
    one_line_error(capsys, argv + _argv(extra, model_dir, tmp_path), words)


@pytest.mark.parametrize("extra,words,before_load", SHARED + [
    (["--system", "thee " * 400], ["--system", "context of 256"], False),
], ids=_id)
def test_chat_matrix(extra, words, before_load, model_dir, tmp_path, capsys, monkeypatch):
    if before_load:
        no_loading(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Shall I\n"))
    argv = ["chat", "--model", str(model_dir), "--max-new-tokens", "2", "--device", "cpu"]
    one_line_error(capsys, argv + _argv(extra, model_dir, tmp_path), words)


@pytest.mark.parametrize("argv,words", [
    (["serve", "--port", "0", "--group-size", "64"], ["--group-size", "--quantize int4"]),
    (["serve", "--port", "0", "--device", "foo"], ["--device", "foo"]),
    (["serve", "--port", "0", "--context", "0"], ["--context 0", "at least 2"]),
    (["serve", "--port", "0", "--max-batch", "0"], ["--max-batch", ">= 1"]),
    (["serve", "--port", "0", "--prefill-chunk", "0"], ["--prefill-chunk", ">= 1"]),
    (["serve", "--port", "0", "--api-key", " "], ["--api-key is empty"]),
    (["serve", "--port", "0", "--kv-memory", "0"], ["--kv-memory 0", "above 0"]),
    (["serve", "--port", "0", "--kv-memory", "-2"], ["--kv-memory -2", "above 0"]),
    (["serve", "--port", "0", "--kv-memory", "nan"], ["--kv-memory nan", "above 0"]),
    (["serve", "--port", "0", "--kv-memory", "lots"], ["--kv-memory", "'lots'", "camelid serve --help"]),
    (["serve", "--port", "0", "--block-size", "0"], ["--block-size", ">= 1"]),
    (["serve", "--port", "0", "--block-size", "-16"], ["--block-size", ">= 1"]),
    (["serve", "--port", "0", "--block-size", "16.5"], ["--block-size", "'16.5'"]),
    (["serve", "--port", "0", "--adapter", "=TMP"], ["--adapter =", "NAME=DIR"]),
    (["serve", "--port", "0", "--adapter", "poet=TMP/nowhere"], ["--adapter poet", "nowhere"]),
    (["serve", "--port", "0", "--adapter", "TMP/a", "--adapter", "TMP/b"], ["--adapter", "NAME=DIR instead"]),
    (["eval", "--tasks", "boolq", "--output", "TMP/out.json", "--group-size", "64"], ["--group-size"]),
    (["eval", "--tasks", "boolq", "--output", "TMP/out.json", "--quantize", "int4", "--group-size", "7"],
     ["--group-size", "32, 64, 128"]),
], ids=lambda v: " ".join(v)[:40])
def test_other_commands_check_model_options_before_loading(argv, words, model_dir, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    one_line_error(capsys, _argv(argv, model_dir, tmp_path) + ["--model", str(model_dir)], words)


@pytest.mark.parametrize("kv_memory", ["0.00001", "0.0001"])
def test_serve_refuses_a_kv_pool_too_small_for_one_whole_context(kv_memory, model_dir, capsys):
    """Known once the model is: its shape, dtype and context. The model of model_dir: 2 layers, 2
    KV heads of 16, float32 on CPU, context 256: a request of 16 blocks of 16 tokens and the
    scratch block take 17 * 8 KiB = 0.0001297 GiB, said rounded up so that giving it works."""
    argv = ["serve", "--port", "0", "--model", str(model_dir), "--device", "cpu", "--no-compile",
            "--kv-memory", kv_memory]
    one_line_error(capsys, argv, [f"--kv-memory {float(kv_memory):g}", "too small", "256 tokens in float32",
                                  "need 0.00013 GiB", "give --kv-memory 0.00013 or more",
                                  "lower --context"])


# ---- text that is not valid UTF-8 -----------------------------------------------------------------

INVALID = b"\xff\xfeShall I\xe2\x82"   # undecodable bytes and a cut-off character


def test_generate_takes_invalid_utf8_from_argv_and_stdin(model_dir, capsys, monkeypatch):
    # Python hands undecodable argv bytes over as surrogates (surrogateescape)
    argv_text = os.fsdecode(INVALID)
    code, out, err = run(capsys, "generate", "--model", str(model_dir), "--prompt", argv_text, "--max-new-tokens",
                         "3", "--temperature", "0", "--device", "cpu")
    assert code == 0, err
    assert err == "camelid generate: warning: --prompt: invalid UTF-8 replaced with U+FFFD\n"
    expected = camelid.load(model_dir).generate("\ufffd\ufffdShall I\ufffd", max_new_tokens=3, temperature=0)
    assert out == expected + "\n"
    # stdin as the terminal or a pipe gives it: strict UTF-8 decoding of bytes
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(INVALID), encoding="utf-8"))
    code, out2, err = run(capsys, "generate", "--model", str(model_dir), "--prompt", "-", "--max-new-tokens", "3",
                          "--temperature", "0", "--device", "cpu")
    assert code == 0, err
    assert err == "camelid generate: warning: --prompt - (stdin): invalid UTF-8 replaced with U+FFFD\n"
    assert out2 == out


def test_generate_reads_a_prompt_file_with_invalid_utf8(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes(INVALID)
    code, out, err = run(capsys, "generate", "--model", str(model_dir), "--prompt-file", str(tmp_path / "p.txt"),
                         "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu")
    assert code == 0 and err.count("\n") == 1 and "--prompt-file" in err and "U+FFFD" in err
    assert out == camelid.load(model_dir).generate("\ufffd\ufffdShall I\ufffd", max_new_tokens=3, temperature=0) + "\n"


def test_command_line_with_invalid_utf8_bytes(model_dir):
    """The real thing: bytes on stdin and in argv of `python -m camelid`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8"}
    proc = subprocess.run([sys.executable, "-m", "camelid", "generate", "--model", str(model_dir), "--prompt", "-",
                           "--chat", "--system", INVALID, "--max-new-tokens", "3", "--temperature", "0",
                           "--no-compile"], input=INVALID, capture_output=True, env=env, timeout=600)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "--prompt - (stdin): invalid UTF-8" in err and "--system: invalid UTF-8" in err


def test_chat_takes_invalid_utf8_and_warns_once(tiny_llm, capsys, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n\xff hi\n"), encoding="utf-8")
    code, out, err, calls = chat_run(capsys, monkeypatch, tiny_llm, stdin, "--system", os.fsdecode(b"\xff"),
                                     "--max-new-tokens", "2")
    assert code == 0, err
    assert [m["content"] for m in calls[-1] if m["role"] != "assistant"] == ["\ufffd", "caf\ufffd", "\ufffd hi"]
    assert err.count("input: invalid UTF-8 replaced with U+FFFD") == 1
    assert err.count("--system: invalid UTF-8") == 1


# ---- chat: long conversations, long messages, Ctrl-C, commands -----------------------------------

class Recorder:
    """Wraps LLM.chat_stream: keeps the messages of every call; `interrupt` makes the calls it
    names (0-based) stop with Ctrl-C after their first piece."""

    def __init__(self, llm: LLM, interrupt: set[int] = frozenset()):
        self.llm, self.interrupt, self.calls = llm, interrupt, []
        self.real = llm.chat_stream

    def __call__(self, messages, params=None, **settings):
        self.calls.append([dict(m) for m in messages])
        n = len(self.calls) - 1
        for i, piece in enumerate(self.real(messages, params, **settings)):
            yield piece
            if n in self.interrupt:
                raise KeyboardInterrupt


def chat_run(capsys, monkeypatch, llm, lines, *argv, interrupt=frozenset()):
    """`camelid chat` over `lines` (or a stdin object) with `llm`; returns the exit code, stdout,
    stderr and the messages of every reply asked for."""
    recorder = Recorder(llm, set(interrupt))
    monkeypatch.setattr(llm, "chat_stream", recorder)
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: llm)
    stdin = lines if hasattr(lines, "read") else io.StringIO("".join(line + "\n" for line in lines))
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, err = run(capsys, "chat", "--model", "x", *argv)
    return code, out, err, recorder.calls


def test_chat_drops_the_oldest_turns_when_the_context_is_full(tiny_llm, capsys, monkeypatch):
    message = "Shall I compare thee to a summer's day? " * 3        # about 40 tokens
    code, out, err, calls = chat_run(capsys, monkeypatch, tiny_llm, [f"{i} {message}" for i in range(12)],
                                     "--system", "Be brief.", "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0, err
    assert len(calls) == 12                                           # every message answered
    assert "dropped the" in err and "oldest turn" in err and "Traceback" not in err
    last = calls[-1]
    assert last[0] == {"role": "system", "content": "Be brief."}      # the system prompt stays
    assert last[1]["role"] == "user" and not last[1]["content"].startswith("0 ")
    assert last[-1]["content"].startswith("11 ")
    assert [m["role"] for m in last[1:]] == ["user", "assistant"] * ((len(last) - 2) // 2) + ["user"]
    assert len(tiny_llm.tokenizer.encode_chat(last)) <= 256 - 8


def test_chat_refuses_only_a_message_too_long_to_fit(tiny_llm, capsys, monkeypatch):
    code, out, err, calls = chat_run(capsys, monkeypatch, tiny_llm, ["Shall I", "thee " * 400, "Rough winds"],
                                     "--max-new-tokens", "4", "--temperature", "0")
    assert code == 0, err
    assert len(calls) == 2                                            # the long one never went to the model
    assert "message not sent" in err and err.count("\n") == 1
    assert [m["content"] for m in calls[1] if m["role"] == "user"] == ["Shall I", "Rough winds"]


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(tiny_llm, capsys, monkeypatch):
    code, out, err, calls = chat_run(capsys, monkeypatch, tiny_llm, ["Shall I", "Rough winds"],
                                     "--max-new-tokens", "6", "--temperature", "0", interrupt={0})
    assert code == 0, err
    assert "reply stopped" in err and "interrupted" not in err
    assert len(calls) == 2
    partial = calls[1][1]
    assert partial["role"] == "assistant" and partial["content"]      # what was shown is kept


def test_ctrl_c_and_ctrl_d_at_the_prompt_end_the_chat(tiny_llm, capsys, monkeypatch):
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: tiny_llm)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    for key in (KeyboardInterrupt, EOFError):
        def press(prompt="", key=key):
            raise key
        monkeypatch.setattr("builtins.input", press)
        code, out, err = run(capsys, "chat", "--model", "x")
        assert code == 0 and out == "" and "Traceback" not in err


def test_unknown_commands_get_help_not_the_model(tiny_llm, capsys, monkeypatch):
    code, out, err, calls = chat_run(capsys, monkeypatch, tiny_llm, ["/sytem be brief", "/help", "//etc is a folder",
                                                                    "/exit", "never read"],
                                     "--max-new-tokens", "2", "--temperature", "0")
    assert code == 0, err
    assert "unknown command /sytem" in err and "/reset, /system TEXT, /help, /exit" in err
    assert len(calls) == 1 and calls[0][-1]["content"] == "/etc is a folder"


# ---- --stats: warm-up is not decoding -------------------------------------------------------------

class SlowToPrepare:
    """A stand-in compiled decoder: each new step shape takes `delay` seconds to become ready
    (as loading a compiled step from disk, or compiling it, does), then runs eagerly."""

    def __init__(self, engine, delay: float):
        self.engine, self.delay, self.shapes = engine, delay, set()

    def matches(self, model):
        return True

    def ready(self, tokens, cache):
        return StepShape.of(tokens, cache) in self.shapes

    def step(self, tokens, positions, cache, build=True):
        shape = StepShape.of(tokens, cache)
        if shape not in self.shapes:
            time.sleep(self.delay)
            self.shapes.add(shape)
        return self.engine.head(self.engine.extend(tokens, positions, cache)[:, -1])

    def start_builds(self):
        pass


def test_stats_keep_compiled_step_warm_up_out_of_decode_speed(tiny_llm, capsys, monkeypatch):
    delay = 1.0
    tiny_llm.engine.compiled = SlowToPrepare(tiny_llm.engine, delay)
    monkeypatch.setattr(generate_cli, "load_llm", lambda args: tiny_llm)
    code, out, err = run(capsys, "generate", "--model", "x", "--prompt", "Shall I", "--max-new-tokens", "12",
                         "--temperature", "0", "--stats")
    assert code == 0, err
    s = tiny_llm.stats
    assert s.warmup_s >= delay and s.decode_s < delay and s.warmup_tokens == 1
    assert s.decode_tps > (s.new_tokens - 1) / (s.decode_s + delay)  # what counting the warm-up would give
    assert "decode 12 tokens" in err and "s loading or compiling decode steps, not counted as decoding" in err
