"""Prepare training data from a recipe: read the sources, run each source's processing stages
(normalize, exact_dedup, line_dedup, near_dedup, langid, quality, code), train a tokenizer or
use the recipe's, and write memory-mapped token shards with a manifest. Prints a report per
stage and source, and the mixture as in the paper's Table 1. Keys of the recipe can be
overridden as --section.key=value.

The per-document work (the normalize, quality, code and langid stages, and tokenization) runs
on this machine's CPUs, or on a Ray cluster with --ray (or output.backend = "ray" in the
recipe; needs pip install 'camelid[ray]'). Either way the output is the same, byte for byte:
this process still reads the sources, runs the dedup stages, trains the tokenizer and writes
every file, so only it needs the input files and the output directory. --ray without ADDRESS
joins RAY_ADDRESS or the latest Ray started on this machine, or else starts one here; ADDRESS
may be "auto" (join only), "local" (always start one), host:port or ray://host:10001.

examples:
  camelid data prepare recipes/quickstart-data.toml
  camelid data prepare recipes/llama-paper-data.toml --output.dir=/data/prepared
  camelid data prepare recipes/quickstart-data.toml --ray
  camelid data prepare recipes/llama-paper-data.toml --ray ray://head-node:10001
"""

from __future__ import annotations

import argparse

from camelid.data import load_recipe, prepare


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = sub.add_parser("prepare", help="clean, deduplicate, filter and tokenize the sources of a recipe",
                          description=(__doc__ or "").strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_argument("recipe", metavar="RECIPE.toml")
    prep.add_argument("--keep-work", action="store_true", help="keep every stage's intermediate output")
    # nargs="?": a bare --ray keeps the recipe's output.ray_address
    prep.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                      help="run the per-document work on Ray (same output as a local run); ADDRESS: "
                           "auto, local, host:port or ray://host:10001 (default: the recipe's output.ray_address)")
    prep.set_defaults(accepts_overrides=True)


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.ray is not None:  # set directly: an address is not a TOML value
        recipe.output.backend = "ray"
        recipe.output.ray_address = args.ray or recipe.output.ray_address
    prepare(recipe, keep_work=args.keep_work)
    return 0
