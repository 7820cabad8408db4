"""Memory plans: what generating with a model, or training it, takes on a card, worked out from
its config before anything is loaded, and the live-tensor measurement that keeps the formulas
honest.

A plan counts what camelid's own code allocates, so it reads the settings of the code it
predicts (quantization groups, activation-checkpointing modes, the fused loss's slab, training
dtypes) from the modules that own them: it sits above config, quant, distributed and train, and
only the command line, benchmarks and tests import it.

  budget     sizes as written ("24GB"), a total set against a card, the headroom rule
  inference  generation: weights per precision, KV cache, the prefill's peak; camelid serve's
             paged KV pool in a memory budget
  training   a training step per device under a dp_replicate x dp_shard x tp layout
  finetune   a finetuning step: full, LoRA adapters on a frozen base, QLoRA on an int4 base
  report     what `camelid plan` shows: defaults, rows and the verdict in words
  live       peak bytes of live tensors, measured on a real run

Measured numbers (plan against measurement, the paper's sizes on 80 GB cards) are in
docs/plan.md.
"""

from camelid.plan.budget import DTYPE_BYTES, HEADROOM, Budget, gib, gib_bytes, parse_memory, parse_size
from camelid.plan.finetune import METHODS as FINETUNE_METHODS, FinetuneRow, plan_finetune
from camelid.plan.inference import (DEFAULT_BLOCK_SIZE, DEFAULT_OVERHEAD, PRECISIONS, KVPool, Row, best, int4_problem,
                                   kv_pool, plan, serving_pool, weight_bytes)
from camelid.plan.live import LiveTensorBytes, measure_training_step
from camelid.plan.report import (FinetuneReport, GenerationReport, TrainingReport, finetune_report, generation_report,
                                 training_report)
from camelid.plan.training import AC_MODES, TRAIN_DTYPES, TRAIN_OVERHEAD, Layout, TrainRow, plan_training

__all__ = ["AC_MODES", "DEFAULT_BLOCK_SIZE", "DEFAULT_OVERHEAD", "DTYPE_BYTES", "FINETUNE_METHODS", "HEADROOM",
           "PRECISIONS", "TRAIN_DTYPES", "TRAIN_OVERHEAD", "Budget", "FinetuneReport", "FinetuneRow",
           "GenerationReport", "KVPool", "Layout", "LiveTensorBytes", "Row", "TrainRow", "TrainingReport", "best",
           "finetune_report", "generation_report", "gib", "gib_bytes", "int4_problem", "kv_pool",
           "measure_training_step", "parse_memory", "parse_size", "plan", "plan_finetune", "plan_training",
           "serving_pool", "training_report", "weight_bytes"]
