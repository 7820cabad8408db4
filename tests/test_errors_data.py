"""`camelid data prepare` and `camelid tokenizer train` on bad input: every mistake ends in one
line on stderr that names the file, key or option, with exit code 2 and no traceback.

The matrices build each bad input in a temporary directory and run the command in-process.
A new mistake found in the wild becomes one more row here."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path
from typing import Callable

import pytest
import zstandard

from camelid.cli.main import main
from camelid.data.shards import table1
from camelid.data.sources import json_problem
from camelid.errors import CamelidError
from helpers import CORPUS, cli_error

# JSONL with enough varied text that compression leaves no long runs to corrupt harmlessly
_RNG = random.Random(0)
JSONL = "".join(json.dumps({"text": f"{line} {_RNG.random()}"}) + "\n"
                for line in CORPUS.splitlines() * 40).encode()


def corrupt(data: bytes, at: int) -> bytes:
    return data[:at] + b"\xff" * 8 + data[at + 8:]


# ---- bad input files, shared by both commands --------------------------------------------------------

def gz_corrupt(d: Path) -> Path:
    # early, in the first block's Huffman tables: later damage can decode to other text
    return _write(d / "bad.jsonl.gz", corrupt(gzip.compress(JSONL), 12))


def gz_truncated(d: Path) -> Path:
    data = gzip.compress(JSONL)
    return _write(d / "cut.jsonl.gz", data[: len(data) // 2])


def gz_not_gzip(d: Path) -> Path:
    return _write(d / "plain.jsonl.gz", JSONL[:200])


def zst_corrupt(d: Path) -> Path:
    # in the first block's header (frames carry no checksum by default: damage to the
    # literals further on decodes to other text)
    return _write(d / "bad.jsonl.zst", corrupt(zstandard.ZstdCompressor().compress(JSONL), 10))


def zst_truncated(d: Path) -> Path:
    data = zstandard.ZstdCompressor().compress(JSONL)
    return _write(d / "cut.jsonl.zst", data[: len(data) // 2])


def zst_header_only(d: Path) -> Path:  # cut so early that no document comes out at all
    return _write(d / "stub.jsonl.zst", zstandard.ZstdCompressor().compress(JSONL)[:20])


def bad_json(d: Path) -> Path:
    return _write(d / "broken.jsonl", b'{"text": "fine"}\n{"text": "unterminated}')  # no newline after


def no_text_field(d: Path) -> Path:
    return _write(d / "body.jsonl", b'{"body": "the text is here"}\n')


def not_utf8(d: Path) -> Path:
    return _write(d / "latin1.txt", b"caf\xe9 au lait\n")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_FILES = [  # (builder, words the message must hold)
    (gz_corrupt, ["bad.jsonl.gz", "corrupt gzip"]),
    (gz_truncated, ["cut.jsonl.gz", "truncated gzip"]),
    (gz_not_gzip, ["plain.jsonl.gz", "corrupt gzip"]),
    (zst_corrupt, ["bad.jsonl.zst", "corrupt zstd"]),
    (zst_truncated, ["cut.jsonl.zst", "truncated zstd"]),
    (zst_header_only, ["stub.jsonl.zst", "truncated zstd"]),
]


# ---- data prepare -------------------------------------------------------------------------------------

def recipe(d: Path, source: Path | str, extra: str = "", source_extra: str = "", top: str = "") -> Path:
    path = d / "r.toml"
    path.write_text(f'{top}\n[output]\ndir = "{d / "out"}"\n{extra}\n[tokenizer]\nvocab_size = 300\n'
                    f'[[sources]]\nname = "s"\npaths = ["{source}"]\n{source_extra}\n')
    return path


def good_source(d: Path) -> Path:
    return _write(d / "good.jsonl", JSONL)


def prepare_case(build: Callable[[Path], Path], **recipe_args):
    return lambda d: ["data", "prepare", recipe(d, build(d), **recipe_args)]


def _file_in_the_way(d: Path) -> list:
    (d / "out").write_text("a file where the output directory goes")
    return ["data", "prepare", recipe(d, good_source(d))]


def _under_a_file(d: Path) -> list:
    (d / "f").write_text("x")
    path = recipe(d, good_source(d))
    return ["data", "prepare", path, f"--output.dir={d / 'f' / 'out'}"]


def _weight(value: str) -> Callable[[Path], list]:
    return lambda d: ["data", "prepare", recipe(d, good_source(d), source_extra=f"weight = {value}")]


PREPARE = [
    pytest.param(lambda d: ["data", "prepare", d / "missing.toml"], ["missing.toml", "no such file"],
                 id="recipe-missing"),
    pytest.param(lambda d: ["data", "prepare", d], ["is a directory", ".toml"], id="recipe-is-a-dir"),
    pytest.param(lambda d: ["data", "prepare", _write(d / "r.toml", b"[output\n")], ["r.toml", "not valid TOML"],
                 id="recipe-bad-toml"),
    pytest.param(prepare_case(lambda d: d / "gone.jsonl"), ["source 's'", "gone.jsonl", "does not exist"],
                 id="source-missing"),
    pytest.param(prepare_case(lambda d: Path("*.nothing")), ["source 's'", "matches no files"], id="glob-empty"),
    *[pytest.param(prepare_case(build), words, id=f"source-{build.__name__}") for build, words in BAD_FILES],
    pytest.param(prepare_case(bad_json), ["broken.jsonl:2", "not valid JSON", "Unterminated string starting at column",
                                          'on_error = "skip"'], id="bad-json-line"),
    pytest.param(prepare_case(no_text_field), ["body.jsonl:1", "no string field 'text'", "text_field"],
                 id="no-text-field"),
    pytest.param(prepare_case(not_utf8, source_extra='split = "line"'), ["latin1.txt:1", "not valid UTF-8", "on_error"],
                 id="not-utf8"),
    pytest.param(_weight("-0.5"), ["source 's'", "weight must be a positive number", "-0.5"], id="weight-negative"),
    pytest.param(_weight("0"), ["source 's'", "weight must be a positive number"], id="weight-zero"),
    pytest.param(_weight("nan"), ["source 's'", "weight must be a positive number", "nan"], id="weight-nan"),
    pytest.param(_weight('"heavy"'), ["sources[0].weight"], id="weight-not-a-number"),
    pytest.param(prepare_case(good_source, source_extra='stages = ["normalise"]'), ["unknown stage", "normalise"],
                 id="unknown-stage"),
    pytest.param(prepare_case(good_source, source_extra='split = "sentence"'), ["source 's'", "split must be"],
                 id="bad-split"),
    pytest.param(prepare_case(good_source, source_extra='format = "csv"'), ["source 's'", "format must be"],
                 id="bad-format"),
    pytest.param(prepare_case(good_source, source_extra='on_error = "ignore"'), ["source 's'", "on_error"],
                 id="bad-on-error"),
    pytest.param(_file_in_the_way, ["output.dir", "is a file"], id="output-dir-is-a-file"),
    pytest.param(_under_a_file, ["output.dir", "is a file, not a directory"], id="output-dir-under-a-file"),
    pytest.param(prepare_case(good_source, extra="val_fraction = 1.0"), ["output.val_fraction"], id="val-fraction"),
    pytest.param(prepare_case(good_source, extra="workers = -2"), ["output.workers"], id="workers"),
    pytest.param(prepare_case(good_source, extra="shard_tokens = 0"), ["output.shard_tokens"], id="shard-tokens"),
    pytest.param(prepare_case(good_source, top="budget_tokens = -1"), ["budget_tokens"], id="budget"),
    pytest.param(lambda d: ["data", "prepare", recipe(d, good_source(d)), "--tokenizer.vocab_size=100"],
                 ["tokenizer.vocab_size", "100", "at least 260"], id="vocab-too-small"),
    pytest.param(lambda d: ["data", "prepare", recipe(d, good_source(d)), "--tokenizer.character_coverage=0.5"],
                 ["tokenizer.character_coverage", "0.98 to 1.0"], id="character-coverage"),
    pytest.param(lambda d: ["data", "prepare", recipe(d, good_source(d)), "--output.nope=1"],
                 ["output", "unknown key", "nope"], id="unknown-override"),
]


@pytest.mark.parametrize("argv,words", PREPARE)
def test_data_prepare_matrix(tmp_path, capsys, argv, words):
    err = cli_error(capsys, *argv(tmp_path))
    assert err.startswith("camelid data: error: ")
    for w in words:
        assert w in err, (w, err)
    assert "at at" not in err


def test_a_truncated_zst_is_not_taken_for_an_empty_file(tmp_path, capsys):
    """It used to be read as far as it went and then reported as "no documents (empty file?)"."""
    err = cli_error(capsys, "data", "prepare", recipe(tmp_path, zst_header_only(tmp_path)))
    assert "truncated zstd" in err and "empty" not in err
    # a file cut after some whole documents must not pass for a shorter, complete one either
    err = cli_error(capsys, "data", "prepare", recipe(tmp_path, zst_truncated(tmp_path)))
    assert "cut.jsonl.zst: truncated zstd file" in err
    # while an empty file, or several frames back to back, are read as they are
    (tmp_path / "two.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n')
                                             + zstandard.ZstdCompressor().compress(b'{"text": "b"}\n'))
    from camelid.data.sources import read_documents

    assert [d.text for d in read_documents(tmp_path / "two.jsonl.zst", "s")] == ["a", "b"]
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    assert list(read_documents(tmp_path / "empty.jsonl.zst", "s")) == []


def test_json_errors_say_at_once():
    try:
        json.loads('{"text": "unterminated')
    except json.JSONDecodeError as e:
        assert json_problem(e) == "Unterminated string starting at column 10"
    try:
        json.loads("{broken")
    except json.JSONDecodeError as e:
        assert json_problem(e) == "Expecting property name enclosed in double quotes at column 2"


def test_the_weight_check_is_shared():
    """`data prepare` and `train` refuse mixture weights with one function."""
    from camelid.data.recipe import check_mixture

    check_mixture({"a": 2, "b": 0.5}, lambda n: f"x.{n}", "drop it")
    for bad in (0, -0.5, float("nan"), float("inf"), True, "1"):
        with pytest.raises(CamelidError, match="^x.a must be a positive number"):
            check_mixture({"a": bad}, lambda n: f"x.{n}", "drop it")


def test_table1_has_no_nan_without_a_budget(prepared):
    text = table1(prepared, 0)
    assert "nan" not in text.lower() and "–" in text
    assert "nan" not in table1(prepared, 100_000).lower()


# ---- tokenizer train ------------------------------------------------------------------------------------

def tok_case(build: Callable[[Path], Path], *extra: str):
    return lambda d: ["tokenizer", "train", "--input", build(d), "--vocab-size", "300", "--output", d / "tok", *extra]


def _tok_output(where: Callable[[Path], Path]):
    return lambda d: ["tokenizer", "train", "--input", good_source(d), "--vocab-size", "300", "--output", where(d)]


def _a_file(d: Path) -> Path:
    return _write(d / "taken", b"x")


def _under_file(d: Path) -> Path:
    return _write(d / "f", b"x") / "tok"


TOKENIZER = [
    pytest.param(tok_case(lambda d: d / "gone.txt"), ["--input", "gone.txt", "does not exist"], id="input-missing"),
    pytest.param(tok_case(lambda d: Path(d / "*.nothing")), ["--input", "matches no files"], id="glob-empty"),
    *[pytest.param(tok_case(build), words, id=f"input-{build.__name__}") for build, words in BAD_FILES],
    pytest.param(tok_case(bad_json), ["broken.jsonl:2", "not valid JSON", "--on-error skip"], id="bad-json-line"),
    pytest.param(tok_case(no_text_field), ["body.jsonl:1", "no string field 'text'", "--text-field"],
                 id="no-text-field"),
    pytest.param(tok_case(not_utf8), ["latin1.txt", "not valid UTF-8", "--on-error replace"], id="not-utf8"),
    pytest.param(tok_case(lambda d: _write(d / "blank.txt", b"\n  \n\n")), ["no text to train on"], id="no-text"),
    pytest.param(_tok_output(_a_file), ["--output", "taken", "is a file"], id="output-is-a-file"),
    pytest.param(_tok_output(_under_file), ["--output", "is a file, not a directory"], id="output-under-a-file"),
    pytest.param(tok_case(good_source, "--vocab-size", "100"), ["--vocab-size 100", "at least 260"],
                 id="vocab-too-small"),
    pytest.param(tok_case(good_source, "--character-coverage", "0.5"), ["--character-coverage 0.5", "0.98 to 1.0"],
                 id="character-coverage-range"),
    pytest.param(tok_case(lambda d: _write(d / "chars.txt", "".join(chr(0x4e00 + i) for i in range(120)).encode()),
                          "--character-coverage", "1.0"),
                 ["--vocab-size 300", "--character-coverage", "at least"], id="characters-need-more-pieces"),
    pytest.param(tok_case(good_source, "--on-error", "ignore"), None, id="bad-on-error-choice"),
]


@pytest.mark.parametrize("argv,words", TOKENIZER)
def test_tokenizer_train_matrix(tmp_path, capsys, argv, words):
    if words is None:  # argparse's own refusal of a bad choice (exit 2, one line)
        with pytest.raises(SystemExit) as stop:
            main([str(a) for a in argv(tmp_path)])
        assert stop.value.code == 2 and "--on-error" in capsys.readouterr().err
        return
    err = cli_error(capsys, *argv(tmp_path))
    assert err.startswith("camelid tokenizer: error: ")
    for w in words:
        assert w in err, (w, err)
    # the options of this command, never the recipe keys or SentencePiece flags it does not have
    for foreign in ("on_error", "text_field", "--character_coverage", "vocab_size", "for this source"):
        assert foreign not in err, (foreign, err)


def test_tokenizer_train_says_when_the_text_supports_fewer_pieces(tmp_path, capsys):
    """SentencePiece (hard_vocab_limit off) quietly returns fewer pieces when BPE runs out of
    merges, which only training can find out: the command says so, with the count and why."""
    good_source(tmp_path)
    capsys.readouterr()
    code = main(["tokenizer", "train", "--input", str(tmp_path / "good.jsonl"), "--vocab-size", "100000",
                 "--output", str(tmp_path / "tok")])
    err = capsys.readouterr().err
    assert code == 0, err
    from camelid.tokenizer import load_tokenizer

    got = load_tokenizer(tmp_path / "tok").vocab_size
    assert got < 100000
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"--vocab-size 100000: the text supports only {got:,} pieces" in warning[0]
    assert "ran out of pairs to merge" in warning[0] and "Traceback" not in err


def test_tokenizer_output_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # chmod does not stop root: say "no" for this directory the way the kernel would
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    err = cli_error(capsys, "tokenizer", "train", "--input", good_source(tmp_path), "--output", locked / "tok")
    assert "--output" in err and "permission denied" in err
