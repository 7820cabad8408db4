"""Training a SentencePiece BPE tokenizer with LLaMA's settings (paper section 2.1): split
digits into single characters, fall back to bytes for unknown UTF-8 characters, identity
normalisation, a dummy prefix space, unk 0 / bos 1 / eos 2 and no padding token."""

from __future__ import annotations

import io
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


def train_sentencepiece(lines: Iterable[str], directory: Path, vocab_size: int,
                        character_coverage: float = 0.99995, max_sentence_length: int = 16384,
                        threads: int = 2) -> SentencePieceTokenizer:
    """Train on `lines` (one sentence each; empty ones are skipped) and write tokenizer.model and
    tokenizer_config.json into `directory`."""
    if vocab_size < 260:
        raise CamelidError(f"tokenizer: vocab_size {vocab_size} is too small; byte fallback alone needs 259 pieces")
    model = io.BytesIO()
    counted = [0]

    def sentences() -> Iterator[str]:
        for line in lines:
            line = line.rstrip("\n")
            if line.strip():
                counted[0] += 1
                yield line

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            character_coverage=character_coverage, max_sentence_length=max_sentence_length,
            num_threads=threads, minloglevel=2, hard_vocab_limit=False, **LLAMA_SETTINGS)
    except RuntimeError as e:
        raise CamelidError(f"tokenizer training failed on {counted[0]} lines of text: {e}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = SentencePieceTokenizer(model.getvalue(), where=str(directory / "tokenizer.model"))
    tok.save(directory)
    return tok
