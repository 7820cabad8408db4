"""Train a LLaMA model. CONFIG.toml holds the sections run, model, data, train, checkpoint,
parallel, stability and sample (see recipes/); any key can be overridden on the command line as
--section.key=value. Running the same command again resumes from the newest complete
checkpoint in run.dir, exactly where the interrupted run was.

On several devices, start it with torchrun; parallel.dp_replicate x parallel.dp_shard x
parallel.tp must equal the number of processes (docs/distributed.md):
  torchrun --nproc-per-node=8 -m camelid.cli.main train CONFIG.toml --parallel.dp_shard=8

writes into run.dir:
  metrics.jsonl     one JSON object per logged step (step, loss, lr, grad_norm, tokens_per_s, ...),
                    validation (val_loss, val_ppl) and events (skipped steps, rollbacks)
  loss.png          the loss curve;  tensorboard/  the same numbers for TensorBoard
  checkpoints/      step_NNNNNNNN/ (a loadable camelid model plus trainer state; under torchrun
                    every rank's shards in dcp/ plus trainer state)
  model/            the final model: camelid generate --model RUN_DIR/model
                    (also model-hf/, model.gguf, model-meta/ with checkpoint.export = ["hf", ...])
  samples.json      text the final model generated from the [sample] prompts (also printed)

Settings are checked before anything is loaded; a run directory whose checkpoints hold another
model shape, or a step past train.max_steps, is refused rather than resumed. Steps with a
non-finite loss or gradient are skipped (stability.skip_nonfinite) and counted; a run most of
whose steps were skipped has diverged and ends with an error (exit code 2) instead of "done".

examples:
  camelid train recipes/bench-stories15m.toml --train.max_steps=20
  camelid train recipes/quickstart-train.toml --run.dir=runs/mine --train.dtype=float32
  torchrun --nproc-per-node=4 -m camelid.cli.main train recipes/bench-stories15m.toml \\
      --parallel.dp_shard=2 --parallel.tp=2
"""

from __future__ import annotations

import argparse
import sys

from camelid.distributed.runtime import shutdown
from camelid.train import Trainer, load_train_config
from camelid.train.samples import format_samples, write_samples


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.toml", help="training recipe")
    p.set_defaults(accepts_overrides=True)


def main(args: argparse.Namespace) -> int:
    cfg = load_train_config(args.config, args.overrides)
    try:
        trainer = Trainer(cfg)
        result = trainer.fit()
        model_dir = trainer.export()
        if trainer.main:
            report_done(trainer, result, model_dir)
        trainer.runtime.barrier()  # the other ranks wait while rank 0 samples
    finally:
        shutdown()  # leave torchrun's process group, also after an error
    return 0


def report_done(trainer, result: dict, model_dir, extra: str = "") -> None:
    """Rank 0, at the end of a run: the [sample] texts, then where everything went."""
    cfg = trainer.cfg
    samples = write_samples(model_dir, cfg.sample, trainer.run_dir, cfg.train.seed, str(trainer.device))
    print(format_samples(samples, cfg.sample.chat), end="", flush=True)
    loss = f", loss {result['loss']:.4f}" if result["loss"] is not None else ""
    skipped = f", {result['nonfinite']} skipped as non-finite" if result["nonfinite"] else ""
    print(f"done: step {result['step']}{loss}"
          + (f", validation loss {result['val_loss']:.4f}" if result["val_loss"] is not None else "")
          + skipped
          + f"\n  metrics    {trainer.metrics.path}\n  loss curve {trainer.run_dir / 'loss.png'}"
          + f"\n  model      {model_dir}" + extra
          + (f"\n  samples    {trainer.run_dir / 'samples.json'}" if samples else ""), file=sys.stderr)
