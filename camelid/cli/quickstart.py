"""The README's first command: train a tiny LLaMA end to end on the corpus embedded in camelid
(Shakespeare, Milton and Python's standard library; licences in camelid/data/corpus/LICENSES.md):
prepare the data (clean, deduplicate, filter, train a tokenizer, tokenize), train for about five
minutes on a CPU, and report validation perplexity, samples and the loss curve.

The steps are the ordinary commands, so each can be rerun or changed on its own:
  camelid data prepare recipes/quickstart-data.toml
  camelid train recipes/quickstart-train.toml
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import camelid
from camelid.atomic import check_destination
from camelid.data import Manifest, load_recipe, prepare
from camelid.errors import CamelidError
from camelid.train import Trainer, load_train_config
from camelid.train.samples import format_samples, write_samples

RECIPES = Path(camelid.__file__).resolve().parent.parent / "recipes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="runs/quickstart", help="where everything goes (default runs/quickstart)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the recipe's 350)")
    # any other key of recipes/quickstart-train.toml as --section.key=value, e.g. --train.dtype=float32
    p.set_defaults(accepts_overrides=True)


def main(args: argparse.Namespace) -> int:
    if not (RECIPES / "quickstart-data.toml").exists():
        raise CamelidError(f"{RECIPES}: the quickstart recipes are not here; run it from a camelid clone "
                           "installed with `pip install -e .`")
    t0 = time.perf_counter()
    out = check_destination(args.dir, "--dir", directory=True)
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    # every setting is checked before the data is prepared, which takes minutes
    overrides = [f"--run.dir={out / 'train'}", f"--data.path={out / 'data'}"] + args.overrides
    if args.max_steps is not None:
        overrides.append(f"--train.max_steps={args.max_steps}")
    train_config = load_train_config(RECIPES / "quickstart-train.toml", overrides)

    say("== 1/3 data: clean, deduplicate, filter, train a tokenizer, tokenize ==")
    recipe = load_recipe(RECIPES / "quickstart-data.toml", [f"--output.dir={out / 'data'}"])
    prepare(recipe)

    say("\n== 2/3 train ==")
    trainer = Trainer(train_config)
    result = trainer.fit()
    model_dir = trainer.export()

    say("\n== 3/3 results ==")
    entropy = Manifest.load(out / "data").unigram_entropy("train")
    val = result["val_loss"]
    print(f"validation loss {val:.3f} nats/token (perplexity {math.exp(val):.1f}); the corpus's unigram entropy is "
          f"{entropy:.3f} nats/token (perplexity {math.exp(entropy):.1f}): the model knows "
          f"{'more' if val < entropy else 'less'} than how often each token occurs")
    cfg = trainer.cfg
    print(format_samples(write_samples(model_dir, cfg.sample, trainer.run_dir, cfg.train.seed, str(trainer.device))),
          end="")
    print(f"\nfinished in {time.perf_counter() - t0:.0f}s. Everything is in {out}/:\n"
          f"  data/       cleaned text, tokenizer, token shards, report.json (per stage and source)\n"
          f"  train/      metrics.jsonl, loss.png (the loss curve), tensorboard/, checkpoints/, samples.json\n"
          f"  train/model the trained model. Try:\n"
          f"    camelid generate --model {model_dir} --prompt \"HAMLET.\" --temperature 0.8\n"
          f"    camelid chat --model {model_dir}\n"
          f"    camelid convert {model_dir} {out}/model-hf --to hf\n"
          f"    camelid convert {model_dir} {out}/model.gguf --to gguf\n"
          f"  next: teach it to answer questions (held-out accuracy before and after, docs/finetuning.md):\n"
          f"    camelid finetune {RECIPES / 'quickstart-sft.toml'} --model.base={model_dir}")
    return 0
