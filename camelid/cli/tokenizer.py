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

from camelid.data.sources import expand_paths, read_documents


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    tr = sub.add_parser("train", help="train a SentencePiece BPE tokenizer")
    tr.add_argument("--input", nargs="+", required=True, metavar="PATH",
                    help="text, JSONL or Parquet files, directories or globs (.gz/.zst too)")
    tr.add_argument("--vocab-size", type=int, default=32000)
    tr.add_argument("--output", required=True, metavar="DIR")
    tr.add_argument("--text-field", default="text", help="JSONL key / Parquet column of the text")
    tr.add_argument("--character-coverage", type=float, default=0.99995)


def main(args: argparse.Namespace) -> int:
    from camelid.tokenizer.train import train_sentencepiece

    files = expand_paths(args.input, Path.cwd(), "--input")

    def lines() -> Iterator[str]:
        for f in files:
            for doc in read_documents(f, "input", text_field=args.text_field):
                yield from doc.text.split("\n")

    tok = train_sentencepiece(lines(), Path(args.output), args.vocab_size, args.character_coverage)
    print(f"wrote {args.output}/tokenizer.model ({tok.vocab_size} pieces)", file=sys.stderr)
    return 0
