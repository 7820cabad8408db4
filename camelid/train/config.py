"""The training configuration: one typed schema for TOML files and `--section.key=value`
overrides. Every recipe accepts every key below; defaults follow the paper where it says."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TypeVar

from camelid.config import ModelConfig, get_size
from camelid.data.recipe import check_mixture
from camelid.distributed.activation_checkpoint import MODES as AC_MODES
from camelid.errors import CamelidError
from camelid.schema import apply_overrides, build, load_toml

T = TypeVar("T")

EXPORTS = ("hf", "gguf", "meta")    # formats the final model can also be written in
DTYPES = ("float32", "bfloat16")    # train.dtype: fp32, or bf16 autocast over fp32 weights


@dataclass
class RunSection:
    dir: str = "runs/train"          # metrics, checkpoints, plots and the final model go here


@dataclass
class ModelSection:
    size: str = "tiny"               # a named size (camelid info lists them); fields below override it
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None    # default: the tokenizer's
    hidden_dim: int | None = None
    multiple_of: int | None = None
    ffn_dim_multiplier: float | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None
    max_seq_len: int | None = None
    tie_embeddings: bool | None = None
    init_std: float = 0.02

    def build(self, vocab_size: int | None) -> ModelConfig:
        base = get_size(self.size)
        changes = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in ("size", "init_std") and getattr(self, f.name) is not None}
        if vocab_size is not None and "vocab_size" not in changes:
            changes["vocab_size"] = vocab_size
        if "dim" in changes and "hidden_dim" not in changes:
            changes["hidden_dim"] = None
        return base.replace(**changes)


@dataclass
class DataSection:
    path: str = ""                   # a directory made by `camelid data prepare` (or its manifest.json)
    synthetic: bool = False          # uniformly random tokens instead (throughput benchmarks)
    seq_len: int = 256
    weights: dict[str, float] = field(default_factory=dict)  # override the recipe's mixture


@dataclass
class TrainSection:
    max_steps: int = 1000
    seed: int = 0
    dtype: str = "auto"              # float32, or bfloat16 autocast (weights and optimizer stay fp32), or auto:
                                     # bfloat16 where the device multiplies it natively, else float32
    micro_batch: int = 8             # sequences per forward/backward pass (under torchrun: per rank, at most)
    batch_tokens: int = 0            # tokens per optimizer step, all ranks together (gradient accumulation);
                                     # 0: one micro-batch (shared by the data-parallel ranks)
    optimizer: str = "adamw"         # adamw (the paper) or adamax
    lr: float = 3e-4
    min_lr_ratio: float = 0.1        # cosine decay to 10% of the peak (the paper)
    warmup_steps: int = 2000
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    activation_checkpointing: str = "none"   # none, selective (keep matmul outputs) or full
    compile: bool = False
    log_interval: int = 10
    eval_interval: int = 200
    eval_batches: int = 20
    peak_flops: float = 0.0          # per device, for MFU; 0: known GPUs only
    device: str = "auto"
    threads: int = 0                 # CPU threads; 0: PyTorch's default


@dataclass
class CheckpointSection:
    interval: int = 500              # steps between checkpoints (and at the end)
    keep: int = 2                    # newest complete checkpoints kept
    export: list[str] = field(default_factory=list)  # the final model also as: hf, gguf, meta
                                                       # (run.dir/model is always the camelid one)


@dataclass
class ParallelSection:
    # Under torchrun the product of the three is the number of processes (docs/distributed.md).
    dp_replicate: int = 1            # data-parallel replicas (HSDP: FSDP within, replication across)
    dp_shard: int = 1                # FSDP2: weights, gradients and optimizer states sharded over these ranks
    tp: int = 1                      # tensor + sequence parallelism (keep it within a node)
    async_tp: bool = False           # overlap TP communication with matmuls (CUDA + train.compile only)


@dataclass
class StabilitySection:
    skip_nonfinite: bool = True      # a NaN/Inf loss or gradient skips the update
    spike_factor: float = 3.0        # a loss above factor x the recent median is a spike ...
    spike_window: int = 50           # ... over this many recent steps
    spike_warmup: int = 10           # steps of history needed before a spike can be judged (<= spike_window)
    spike_patience: int = 3          # this many spikes in a row roll back to the last checkpoint
    max_rollbacks: int = 5


@dataclass
class SampleSection:
    prompts: list[str] = field(default_factory=list)   # generated from at the end of training
    max_new_tokens: int = 64
    temperature: float = 0.8
    chat: bool = False               # each prompt as a user's chat message, answered with the chat template


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    stability: StabilitySection = field(default_factory=StabilitySection)
    sample: SampleSection = field(default_factory=SampleSection)

    def __post_init__(self) -> None:
        d = self.data
        # The model's shape is checked here too, so that nothing is loaded for a recipe whose
        # sequences the model could not hold.
        context = self.model.build(None).max_seq_len
        checks = shared_checks(self) + [
            (d.seq_len > 0, f"data.seq_len must be positive (got {d.seq_len})"),
            (d.seq_len <= context, f"data.seq_len {d.seq_len} is longer than the model's context (model.max_seq_len "
                                   f"{context}); lower data.seq_len or raise model.max_seq_len"),
            (set(self.checkpoint.export) <= set(EXPORTS), f"checkpoint.export: choose among {list(EXPORTS)} "
                                                           f"(got {self.checkpoint.export})"),
            (not (d.synthetic and "gguf" in self.checkpoint.export),
             "checkpoint.export: a GGUF file carries its tokenizer and synthetic data has none; drop gguf"),
            (d.synthetic or bool(d.path), "data.path is empty: point it at `camelid data prepare` "
                                          "output, or set data.synthetic = true"),
            (not (d.synthetic and d.weights), "data.weights: synthetic data has no sources to weigh; drop "
                                              "data.weights or set data.path"),
            (not (d.synthetic and self.sample.prompts), "sample.prompts: synthetic data has no tokenizer to write "
                                                        "prompts with; drop the [sample] prompts"),
        ]
        raise_first(checks)
        # the names are checked against the data's sources when it is loaded
        try:
            check_mixture(d.weights, lambda name: f"data.weights.{name}", LEAVE_OUT)
        except CamelidError as e:
            raise InvalidSetting(str(e)) from None


def raise_first(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise InvalidSetting(message)


def shared_checks(cfg) -> list[tuple[bool, str]]:
    """(ok, message) for the sections every trainer recipe shares (train, checkpoint, parallel,
    stability, sample), pretraining's and finetuning's alike."""
    t, s, p = cfg.train, cfg.stability, cfg.parallel
    bad_float = next(((key, v) for key, v in _floats(cfg) if not math.isfinite(v)), None)
    return [
        (bad_float is None, f"{bad_float[0]} must be a finite number (got {bad_float[1]})" if bad_float else ""),
        (t.dtype in (*DTYPES, "auto"), f"train.dtype must be {', '.join(DTYPES)} or auto (got {t.dtype!r})"),
        (t.optimizer in ("adamw", "adamax"), f"train.optimizer must be adamw or adamax (got {t.optimizer!r})"),
        (t.activation_checkpointing in AC_MODES, f"train.activation_checkpointing must be {', '.join(AC_MODES)} "
                                                 f"(got {t.activation_checkpointing!r})"),
        (t.max_steps > 0, f"train.max_steps must be positive (got {t.max_steps})"),
        (t.micro_batch > 0, f"train.micro_batch must be positive (got {t.micro_batch})"),
        (t.batch_tokens >= 0, f"train.batch_tokens must be 0 (one micro-batch) or positive (got {t.batch_tokens})"),
        (t.lr > 0, f"train.lr must be positive (got {t.lr})"),
        (0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1] (got {t.min_lr_ratio})"),
        (t.warmup_steps >= 0, f"train.warmup_steps must be 0 (no warmup) or positive (got {t.warmup_steps})"),
        (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"train.beta1 and train.beta2 must be in [0, 1) "
                                                f"(got {t.beta1}, {t.beta2})"),
        (t.eps > 0, f"train.eps must be positive (got {t.eps})"),
        (t.weight_decay >= 0, f"train.weight_decay must be 0 or positive (got {t.weight_decay})"),
        (t.grad_clip > 0, f"train.grad_clip must be positive (got {t.grad_clip}); a large value clips nothing"),
        (t.log_interval > 0, f"train.log_interval must be positive (got {t.log_interval}): steps between "
                             "metrics lines"),
        (t.eval_interval > 0, f"train.eval_interval must be positive (got {t.eval_interval}): steps between "
                              "validations (one more at the end); a value above train.max_steps validates "
                              "at the end only"),
        (t.eval_batches > 0, f"train.eval_batches must be positive (got {t.eval_batches})"),
        (t.threads >= 0, f"train.threads must be 0 (PyTorch's default) or a number of CPU threads "
                         f"(got {t.threads})"),
        (t.peak_flops >= 0, f"train.peak_flops must be 0 (known GPUs only) or positive (got {t.peak_flops})"),
        (cfg.checkpoint.interval > 0, f"checkpoint.interval must be positive (got {cfg.checkpoint.interval})"),
        (cfg.checkpoint.keep > 0, f"checkpoint.keep must be at least 1, as resuming needs the newest "
                                  f"(got {cfg.checkpoint.keep})"),
        (min(p.dp_replicate, p.dp_shard, p.tp) >= 1,
         "parallel.dp_replicate, parallel.dp_shard and parallel.tp must be at least 1"),
        (0 < s.spike_warmup <= s.spike_window,
         "stability.spike_warmup must be positive and at most stability.spike_window (the history kept)"),
        (s.spike_factor > 1, f"stability.spike_factor must be above 1 (got {s.spike_factor}): a loss that many "
                             "times the recent median is a spike"),
        (s.spike_patience >= 1, f"stability.spike_patience must be at least 1 (got {s.spike_patience})"),
        (s.max_rollbacks >= 0, f"stability.max_rollbacks must be 0 or more (got {s.max_rollbacks})"),
        (cfg.sample.max_new_tokens > 0, f"sample.max_new_tokens must be positive "
                                        f"(got {cfg.sample.max_new_tokens})"),
        (cfg.sample.temperature >= 0, f"sample.temperature must be 0 (greedy) or positive "
                                      f"(got {cfg.sample.temperature})"),
    ]


class InvalidSetting(CamelidError):
    """A setting TrainConfig refuses; load_train_config names the recipe it was read with."""

    def __init__(self, problem: str, where: str = "train config"):
        super().__init__(f"{where}: {problem}")
        self.problem = problem


# How train's data.weights drops a source: it cannot, the data has to be prepared without it.
LEAVE_OUT = "prepare the data without it (camelid data prepare)"


def _floats(obj: object, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float setting, nested sections included."""
    found = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            found += _floats(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            found.append((f"{prefix}{f.name}", value))
    return found


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)


def load_config(schema: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """A recipe (or none: the defaults) with `--section.key=value` overrides, built into `schema`;
    a refused setting names the recipe."""
    data = load_toml(path) if path else {}
    try:
        return build(schema, apply_overrides(data, list(overrides)), str(path or "train config"))
    except InvalidSetting as e:
        if not path:
            raise
        raise InvalidSetting(e.problem, str(path)) from None
