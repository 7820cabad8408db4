"""Prepare training data from a recipe: read the sources, run each source's processing stages
(normalize, exact_dedup, line_dedup, near_dedup, langid, quality, code), train a tokenizer or
use the recipe's, and write memory-mapped token shards with a manifest. Prints a report per
stage and source, and the mixture as in the paper's Table 1. Keys of the recipe can be
overridden as --section.key=value.

examples:
  camelid data prepare recipes/quickstart-data.toml
  camelid data prepare recipes/llama-paper-data.toml --output.dir=/data/prepared
"""

from __future__ import annotations

import argparse

from camelid.data import load_recipe, prepare


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = sub.add_parser("prepare", help="clean, deduplicate, filter and tokenize the sources of a recipe")
    prep.add_argument("recipe", metavar="RECIPE.toml")
    prep.add_argument("--keep-work", action="store_true", help="keep every stage's intermediate output")
    prep.set_defaults(accepts_overrides=True)


def main(args: argparse.Namespace) -> int:
    prepare(load_recipe(args.recipe, args.overrides), keep_work=args.keep_work)
    return 0
