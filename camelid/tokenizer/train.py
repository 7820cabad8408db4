"""Training a SentencePiece BPE tokenizer with LLaMA's settings (paper section 2.1): split
digits into single characters, fall back to bytes for unknown UTF-8 characters, identity
normalisation, a dummy prefix space, unk 0 / bos 1 / eos 2 and no padding token."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from camelid.errors import CamelidError
from camelid.tokenizer.sentencepiece import SentencePieceTokenizer

LLAMA_SETTINGS = dict(
    model_type="bpe", split_digits=True, byte_fallback=True, normalization_rule_name="identity",
    add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)


# What messages call each setting; the CLI passes its option names, the data recipe its keys.
NAMES = {"vocab_size": "vocab_size", "character_coverage": "character_coverage"}


def check_settings(vocab_size: int, character_coverage: float, names: dict[str, str] = NAMES) -> None:
    """Refuse, before any text is read, settings SentencePiece would reject only after reading
    the whole corpus, in messages that name its own flags rather than the user's."""
    if vocab_size < 260:
        raise CamelidError(f"{names['vocab_size']} {vocab_size} is too small: byte fallback alone needs 259 "
                           "pieces; give at least 260")
    if not 0.98 <= character_coverage <= 1.0:
        raise CamelidError(f"{names['character_coverage']} {character_coverage}: SentencePiece accepts 0.98 to 1.0 "
                           "(the share of characters that get pieces of their own; bytes cover the rest)")


def shortfall(asked: int, got: int, name: str = "vocab_size") -> str | None:
    """Why a tokenizer has fewer pieces than asked for, or None. SentencePiece's BPE stops
    merging when no pair of pieces is left to merge -- every word of the text (up to 16
    characters) is already one piece -- and with hard_vocab_limit off it returns what it has.
    How far merging gets depends on the whole corpus, so this is known only after training."""
    if got >= asked:
        return None
    return (f"{name} {asked}: the text supports only {got:,} pieces (BPE ran out of pairs to merge: every word "
            f"is already a piece), so the tokenizer has {got:,}; give more varied text or a smaller {name}")


def train_sentencepiece(lines: Iterable[str], directory: Path, vocab_size: int,
                        character_coverage: float = 0.99995, max_sentence_length: int = 16384,
                        threads: int = 2, names: dict[str, str] = NAMES) -> SentencePieceTokenizer:
    """Train on `lines` (one sentence each; empty ones are skipped) and write tokenizer.model and
    tokenizer_config.json into `directory`. `names` says what messages call the settings."""
    check_settings(vocab_size, character_coverage, names)
    model = io.BytesIO()
    counted = [0]
    failed: list[BaseException] = []

    def sentences() -> Iterator[str]:
        # SentencePiece turns an exception raised while it reads into a RuntimeError with a
        # multi-line message; keep the original (a CamelidError naming the file) to raise it
        try:
            for line in lines:
                line = line.rstrip("\n")
                if line.strip():
                    counted[0] += 1
                    yield line
        except GeneratorExit:  # SentencePiece stopped reading early: not a failure
            raise
        except BaseException as e:
            failed.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            character_coverage=character_coverage, max_sentence_length=max_sentence_length,
            num_threads=threads, minloglevel=2, hard_vocab_limit=False, **LLAMA_SETTINGS)
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        raise _training_failure(str(e), counted[0], vocab_size, character_coverage, names) from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = SentencePieceTokenizer(model.getvalue(), where=str(directory / "tokenizer.model"))
    tok.save(directory)
    return tok


def _training_failure(message: str, lines: int, vocab_size: int, character_coverage: float,
                      names: dict[str, str]) -> CamelidError:
    """SentencePiece's complaints name its own flags (--character_coverage) and source lines;
    say the same in terms of the settings the user has."""
    if lines == 0:
        return CamelidError("tokenizer: no text to train on (every line of the input is empty)")
    chars = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if chars:
        need = int(chars.group(2))
        return CamelidError(f"{names['vocab_size']} {vocab_size}: the text has characters enough to need {need} pieces "
                            f"of their own at {names['character_coverage']} {character_coverage:g}; raise "
                            f"{names['vocab_size']} to at least {need} or lower {names['character_coverage']}")
    detail = re.sub(r"^\w+: \S+\.cc\(\d+\) ", "", message.strip())
    return CamelidError(f"tokenizer training failed on {lines} lines of text: SentencePiece says {detail}")
