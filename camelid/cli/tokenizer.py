"""Train a SentencePiece BPE tokenizer with LLaMA's settings (split digits, byte fallback,
identity normalisation; unk 0, bos 1, eos 2). The result (tokenizer.model and
tokenizer_config.json) loads in camelid and in the sentencepiece library.

examples:
  camelid tokenizer train --input corpus/*.txt --vocab-size 32000 --output my-tokenizer
  camelid tokenizer train --input data/clean/books.jsonl.zst --vocab-size 8000 --output tok
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from camelid.atomic import check_destination
from camelid.data.sources import Hints, expand_paths, read_documents

OPTIONS = {"vocab_size": "--vocab-size", "character_coverage": "--character-coverage"}
HINTS = Hints(undecodable="pass --on-error skip or --on-error replace", malformed="pass --on-error skip",
              text_field="pass --text-field with the key that holds the text")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    tr = sub.add_parser("train", help="train a SentencePiece BPE tokenizer", description=(__doc__ or "").strip(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--input", nargs="+", required=True, metavar="PATH",
                    help="text, JSONL or Parquet files, directories or globs (.gz/.zst too)")
    tr.add_argument("--vocab-size", type=int, default=32000,
                    help="pieces to learn, at least 260 (default 32000); a small corpus may support fewer, "
                         "which is reported")
    tr.add_argument("--output", required=True, metavar="DIR", help="directory for tokenizer.model")
    tr.add_argument("--text-field", default="text", help="JSONL key / Parquet column of the text")
    tr.add_argument("--character-coverage", type=float, default=0.99995,
                    help="share of characters that get pieces of their own, 0.98 to 1.0 (default 0.99995); "
                         "the rest fall back to bytes")
    tr.add_argument("--on-error", choices=["raise", "skip", "replace"], default="raise",
                    help="undecodable bytes and malformed JSON lines: stop (default), skip the line or "
                         "document, or replace bad bytes with U+FFFD")


def main(args: argparse.Namespace) -> int:
    from camelid.tokenizer.train import check_settings, shortfall, train_sentencepiece

    # everything that can be checked is checked before the (long) read of the corpus
    check_settings(args.vocab_size, args.character_coverage, OPTIONS)
    output = check_destination(args.output, "--output", directory=True)
    files = expand_paths(args.input, Path.cwd(), "input", what="--input")

    def lines() -> Iterator[str]:
        for f in files:
            for doc in read_documents(f, "input", text_field=args.text_field, errors=args.on_error, hints=HINTS):
                yield from doc.text.split("\n")

    tok = train_sentencepiece(lines(), output, args.vocab_size, args.character_coverage, names=OPTIONS)
    short = shortfall(args.vocab_size, tok.vocab_size, "--vocab-size")
    if short:
        print(f"warning: {short}", file=sys.stderr)
    print(f"wrote {output}/tokenizer.model ({tok.vocab_size} pieces)", file=sys.stderr)
    return 0
