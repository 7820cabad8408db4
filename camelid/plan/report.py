"""What `camelid plan` shows, decided here: which model, the settings once defaults are filled
in, the rows, and the verdict in words.

The command line parses flags and prints; every choice (a default, a check, which precision or
checkpointing mode to recommend) is made here, so that the table and --json cannot disagree and
the tests reach it without a terminal. A setting left as None takes its default: for a context
or sequence length the model's own when shorter than 2048 tokens, for training a recipe's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from camelid.config import SIZES, ModelConfig, get_size
from camelid.errors import CamelidError
from camelid.plan.budget import HEADROOM, gib, parse_memory, parse_size
from camelid.plan.finetune import DEFAULT_TARGETS, FinetuneRow, plan_finetune
from camelid.plan.inference import (DEFAULT_BLOCK_SIZE, DEFAULT_OVERHEAD, KVPool, Row, best, int4_problem, plan,
                                   serving_pool)
from camelid.plan.training import AC_MODES, TRAIN_OVERHEAD, Layout, TrainRow, plan_training
from camelid.platform import native_bf16
from camelid.train.config import load_train_config

DEFAULT_CONTEXT = 2048


def read_config(name: str) -> tuple[ModelConfig, str]:
    """The config of a named size or a checkpoint, without reading any weights, and which it was."""
    if any(k.lower() == name.lower() for k in SIZES) and not Path(name).exists():
        return get_size(name), "named size"
    from camelid.checkpoint import read_checkpoint

    try:
        ckpt = read_checkpoint(name)
    except CamelidError as e:
        if Path(name).exists():
            raise
        raise CamelidError(f"{e}; named sizes: {', '.join(SIZES)}") from None
    return ckpt.config, f"{ckpt.format} checkpoint"


def recipe_device(name: str) -> str:
    """"cuda" or "cpu": where a recipe's train.device trains, "auto" deciding as `camelid train`
    would on this machine."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def read_training(name: str) -> tuple[ModelConfig, str, dict]:
    """The model, where it came from, and the training settings to default to: a recipe's (its
    model section, data.seq_len, train and parallel sections, the device train.device gives)
    or the plain ones, on a GPU."""
    if name.endswith(".toml"):
        cfg = load_train_config(name)
        p = cfg.parallel
        device, dtype = recipe_device(cfg.train.device), cfg.train.dtype
        if dtype == "auto":  # as the trainer settles it: a GPU's is taken to multiply bfloat16
            dtype = "bfloat16" if device == "cuda" or native_bf16("cpu") else "float32"
        return cfg.model.build(None), "recipe", {
            "micro_batch": cfg.train.micro_batch, "seq_len": cfg.data.seq_len, "dtype": dtype,
            "dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp,
            "ac": cfg.train.activation_checkpointing, "device": device}
    config, source = read_config(name)
    return config, source, {"micro_batch": 1, "seq_len": min(DEFAULT_CONTEXT, config.max_seq_len),
                            "dtype": "bfloat16", "dp_replicate": 1, "dp_shard": 1, "tp": 1, "ac": None,
                            "device": "cuda"}


def _join(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _short_name(model: str, source: str) -> str:
    """How verdicts name the model: a path by its last part."""
    return model if source == "named size" else Path(model).name


# ---- generation ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationReport:
    """`camelid plan MODEL`: a row per precision and the one to use, and beside each row the KV
    pool camelid serve gets in what the row leaves of the card (--kv-memory in GiB, the pool)."""
    model: str
    source: str
    config: ModelConfig
    memory: int
    memory_text: str
    batch: int
    context: int
    group_size: int
    activation_dtype: str
    attention: str
    all_logits: bool
    cpu: bool
    rows: list[Row]
    notes: list[str]
    choice: Row | None
    verdict: str
    block_size: int = DEFAULT_BLOCK_SIZE
    pools: list[tuple[float, KVPool]] | None = None   # one per row: serving_pool()

    def to_dict(self) -> dict:
        rows = [r.to_dict(self.memory) for r in self.rows]
        for row, (kv_gib, pool) in zip(rows, self.pools or []):
            row["kv_pool"] = {"kv_memory_gib": kv_gib, **pool.to_dict()}
        return {
            "model": self.model, "source": self.source, "params": self.config.num_params(),
            "config": self.config.to_dict(), "batch": self.batch, "context": self.context,
            "memory_bytes": self.memory, "headroom": HEADROOM, "group_size": self.group_size,
            "activation_dtype": self.activation_dtype, "attention": self.attention, "all_logits": self.all_logits,
            "cpu": self.cpu, "block_size": self.block_size, "rows": rows, "notes": self.notes,
            "verdict": {"precision": self.choice.precision if self.choice else None,
                        "comfortable": bool(self.choice and self.choice.comfortable(self.memory)),
                        "text": self.verdict}}


def generation_report(model: str, memory: str, overhead: str | None = None, batch: int = 1,
                    context: int | None = None, group_size: int = 32, activation_dtype: str = "bfloat16",
                    attention: str = "fused", all_logits: bool = False, cpu: bool = False,
                    block_size: int = DEFAULT_BLOCK_SIZE) -> GenerationReport:
    """Plan generating with `model` on a card of `memory` (a size as written: "24GB"), and serving
    it: the KV pool of blocks of `block_size` tokens in what each precision leaves."""
    memory_bytes = parse_memory(memory)
    overhead_bytes = DEFAULT_OVERHEAD if overhead is None else parse_size(overhead, "--overhead")
    config, source = read_config(model)
    context = min(DEFAULT_CONTEXT, config.max_seq_len) if context is None else context
    if context > config.max_seq_len:
        raise CamelidError(f"--context {context}: {model} has a context of {config.max_seq_len} tokens")
    rows = plan(config, batch, context, activation_dtype, group_size, overhead_bytes, attention, all_logits, cpu)
    pools = [serving_pool(row, config, memory_bytes, context, block_size) for row in rows]
    notes = [n for n in [int4_problem(config, group_size)] if n]
    choice, text = generation_verdict(_short_name(model, source), rows, memory_bytes, memory)
    return GenerationReport(model, source, config, memory_bytes, memory, batch, context, group_size, activation_dtype,
                          attention, all_logits, cpu, rows, notes, choice, text, block_size, pools)


def generation_verdict(name: str, rows: list[Row], memory: int, memory_text: str) -> tuple[Row | None, str]:
    """The best precision that fits with headroom (or tightly), and why not the one above it."""
    choice, comfortable = best(rows, memory)
    if choice is None:
        return None, (f"{name} does not fit in {memory_text} at any precision ({rows[-1].precision} needs "
                      f"{gib(rows[-1].total)}); lower --context or --batch, or use a bigger card")
    text = f"{name} runs in {choice.precision} on {memory_text} with {gib(choice.spare(memory))} to spare"
    if not comfortable:
        return choice, text + f", less than the {HEADROOM:.0%} of headroom allocator fragmentation may need"
    better = [r for r in rows[:rows.index(choice)] if r.fits(memory)]
    if better:
        text += (f" ({better[-1].precision} would fit too, but with only {gib(better[-1].spare(memory))}: "
                 f"under {HEADROOM:.0%})")
    return choice, text


# ---- training ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingReport:
    """`camelid plan MODEL --train`: a row per activation-checkpointing mode, per device."""
    model: str
    source: str
    config: ModelConfig
    memory: int
    memory_text: str
    layout: Layout
    micro_batch: int
    seq_len: int
    dtype: str
    device: str
    rows: list[TrainRow]
    recipe_ac: str | None
    verdict: str

    def to_dict(self) -> dict:
        return {
            "mode": "train", "model": self.model, "source": self.source, "params": self.config.num_params(),
            "config": self.config.to_dict(), "layout": {**asdict(self.layout), "devices": self.layout.devices},
            "micro_batch": self.micro_batch, "seq_len": self.seq_len, "dtype": self.dtype, "device": self.device,
            "memory_bytes": self.memory, "headroom": HEADROOM, "rows": [r.to_dict(self.memory) for r in self.rows],
            "verdict": {"fits": [r.ac for r in self.rows if r.fits(self.memory)],
                        "comfortable": [r.ac for r in self.rows if r.comfortable(self.memory)],
                        "recipe_ac": self.recipe_ac, "text": self.verdict}}


def training_report(model: str, memory: str, overhead: str | None = None, micro_batch: int | None = None,
                      seq_len: int | None = None, dtype: str | None = None, dp_replicate: int | None = None,
                      dp_shard: int | None = None, tp: int | None = None, ac: str | None = None) -> TrainingReport:
    """Plan a training step of `model` (a named size, a checkpoint or a recipe) per device of
    `memory`; `ac` plans one checkpointing mode instead of all three."""
    memory_bytes = parse_memory(memory)
    config, source, settings = read_training(model)
    # a CPU has no CUDA context, cuBLAS workspaces or NCCL buffers to allow for
    default_overhead = TRAIN_OVERHEAD if settings["device"] == "cuda" else 0
    overhead_bytes = default_overhead if overhead is None else parse_size(overhead, "--overhead")
    given = {"micro_batch": micro_batch, "seq_len": seq_len, "dtype": dtype, "dp_replicate": dp_replicate,
             "dp_shard": dp_shard, "tp": tp, "ac": ac}
    settings.update({k: v for k, v in given.items() if v is not None})
    if settings["seq_len"] > config.max_seq_len:
        raise CamelidError(f"--seq-len {settings['seq_len']}: {model} has a context of {config.max_seq_len} tokens")
    layout = Layout(settings["dp_replicate"], settings["dp_shard"], settings["tp"])
    rows = plan_training(config, layout, settings["micro_batch"], settings["seq_len"], settings["dtype"],
                         overhead_bytes, (ac,) if ac else AC_MODES)
    recipe_ac = settings["ac"] if source == "recipe" else None
    text = training_verdict(_short_name(model, source), rows, memory_bytes, memory, layout, recipe_ac)
    return TrainingReport(model, source, config, memory_bytes, memory, layout, settings["micro_batch"],
                        settings["seq_len"], settings["dtype"], settings["device"], rows, recipe_ac, text)


def training_verdict(name: str, rows: list[TrainRow] | list[FinetuneRow], memory: int, memory_text: str,
                     layout: Layout, recipe_ac: str | None,
                     advice: str = "shard further (--dp-shard, --tp) or lower --micro-batch or --seq-len") -> str:
    """Which activation-checkpointing modes fit, with the headroom or tightly, and what the others need."""
    comfortable = [r.ac for r in rows if r.comfortable(memory)]
    tight = [r.ac for r in rows if r.fits(memory) and not r.comfortable(memory)]
    short = [r for r in rows if not r.fits(memory)]
    where = f"{name} on {layout.describe()} of {memory_text}"
    if not comfortable and not tight:
        needs = _join([f"{r.ac} needs {gib(r.total)}" for r in rows])
        return (f"{where} does not fit with any activation checkpointing ({needs} per device); {advice}")
    parts = []
    if comfortable:
        parts.append(f"activation checkpointing {_join(comfortable)} fit{'s' * (len(comfortable) == 1)} "
                     f"with {HEADROOM:.0%} to spare")
    if tight:
        parts.append(f"{_join(tight)} fit{'s' * (len(tight) == 1)}, with less than {HEADROOM:.0%} spare")
    if short:
        parts.append(_join([f"{r.ac} needs {gib(r.total)}" for r in short]))
    text = f"{where}: " + "; ".join(parts)
    chosen = next((r for r in rows if r.ac == recipe_ac), None)
    if chosen:
        text += f" (the recipe's {chosen.ac} {'fits' if chosen.fits(memory) else 'does not fit'})"
    return text


# ---- finetuning ----------------------------------------------------------------------------------

FINETUNE_DEFAULTS = {"rank": 16, "targets": DEFAULT_TARGETS, "dropout": True, "quantize": "int4", "group_size": 32,
                     "micro_batch": 1, "seq_len": 1024, "dtype": "bfloat16", "ac": None, "device": "cuda",
                     "dp_replicate": 1, "dp_shard": 1, "tp": 1}


def read_finetune(name: str) -> tuple[ModelConfig, str, dict]:
    """The model, where it came from, and the finetuning settings to default to: a finetune
    recipe's (model.base, model.method, quantize and group_size, the lora section, data.seq_len,
    the train and parallel sections) or camelid finetune's own defaults, on a GPU."""
    if not name.endswith(".toml"):
        config, source = read_config(name)
        return config, source, {**FINETUNE_DEFAULTS, "method": None,
                                "seq_len": min(FINETUNE_DEFAULTS["seq_len"], config.max_seq_len)}
    from camelid.finetune.config import load_finetune_config

    cfg = load_finetune_config(name)
    config, _ = read_config(cfg.model.base)
    t, p, lo = cfg.train, cfg.parallel, cfg.lora
    device, dtype = recipe_device(t.device), t.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" or native_bf16("cpu") else "float32"
    return config, "finetune recipe", {
        "method": cfg.model.method, "rank": lo.rank, "targets": tuple(lo.targets), "dropout": lo.dropout > 0,
        "quantize": cfg.model.quantize, "group_size": cfg.model.group_size or 32, "micro_batch": t.micro_batch,
        "seq_len": cfg.data.seq_len, "dtype": dtype, "ac": t.activation_checkpointing, "device": device,
        "dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp}


@dataclass(frozen=True)
class FinetuneReport:
    """`camelid plan MODEL --finetune METHOD`: a row per activation-checkpointing mode."""
    model: str
    source: str
    config: ModelConfig
    memory: int
    memory_text: str
    settings: dict
    rows: list[FinetuneRow]
    recipe_ac: str | None
    verdict: str

    @property
    def method(self) -> str:
        return self.settings["method"]

    def to_dict(self) -> dict:
        s = self.settings
        return {
            "mode": "finetune", "method": self.method, "model": self.model, "source": self.source,
            "params": self.config.num_params(), "trainable_params": self.rows[0].trainable_params,
            "config": self.config.to_dict(), "micro_batch": s["micro_batch"], "seq_len": s["seq_len"],
            "dtype": s["dtype"], "device": s["device"],
            "lora": ({"rank": s["rank"], "targets": list(s["targets"]), "dropout": s["dropout"]}
                     if self.method != "full" else None),
            "quantize": {"scheme": s["quantize"], "group_size": s["group_size"]} if self.method == "qlora" else None,
            "layout": {"dp_replicate": s["dp_replicate"], "dp_shard": s["dp_shard"], "tp": s["tp"]},
            "memory_bytes": self.memory, "headroom": HEADROOM, "rows": [r.to_dict(self.memory) for r in self.rows],
            "verdict": {"fits": [r.ac for r in self.rows if r.fits(self.memory)],
                        "comfortable": [r.ac for r in self.rows if r.comfortable(self.memory)],
                        "recipe_ac": self.recipe_ac, "text": self.verdict}}


def finetune_report(model: str, memory: str, overhead: str | None = None, method: str | None = None,
                    rank: int | None = None, micro_batch: int | None = None, seq_len: int | None = None,
                    ac: str | None = None, dtype: str | None = None, group_size: int | None = None,
                    dp_replicate: int | None = None, dp_shard: int | None = None,
                    tp: int | None = None) -> FinetuneReport:
    """Plan a finetuning step of `model` (a named size, a checkpoint or a finetune recipe) on a
    card of `memory`: `method` full, lora or qlora (None: the recipe's)."""
    memory_bytes = parse_memory(memory)
    config, source, settings = read_finetune(model)
    given = {"method": method, "rank": rank, "micro_batch": micro_batch, "seq_len": seq_len, "ac": ac,
             "dtype": dtype, "group_size": group_size, "dp_replicate": dp_replicate, "dp_shard": dp_shard, "tp": tp}
    settings.update({k: v for k, v in given.items() if v is not None})
    if settings["method"] is None:
        raise CamelidError("--finetune: name the method (full, lora or qlora); only a finetune recipe (CONFIG.toml) "
                           "gives its own")
    if settings["seq_len"] > config.max_seq_len:
        raise CamelidError(f"--seq-len {settings['seq_len']}: {model} has a context of {config.max_seq_len} tokens")
    # one process on a GPU: the CUDA context, cuBLAS workspaces and allocator slack; full
    # finetuning is pretraining's step, NCCL's buffers included; a CPU has none of these
    default_overhead = 0 if settings["device"] != "cuda" else (
        TRAIN_OVERHEAD if settings["method"] == "full" else DEFAULT_OVERHEAD)
    overhead_bytes = default_overhead if overhead is None else parse_size(overhead, "--overhead")
    s = settings
    rows = plan_finetune(config, s["method"], s["micro_batch"], s["seq_len"], s["dtype"], s["rank"], s["targets"],
                         s["dropout"], s["quantize"], s["group_size"], overhead_bytes, (ac,) if ac else AC_MODES,
                         Layout(s["dp_replicate"], s["dp_shard"], s["tp"]))
    recipe_ac = s["ac"] if source == "finetune recipe" else None
    name = _short_name(model, source)
    what = {"full": "full finetuning", "lora": f"LoRA rank {s['rank']}",
            "qlora": f"QLoRA ({s['quantize']}) rank {s['rank']}"}[s["method"]]
    advice = {"full": "shard it (--dp-shard), use LoRA or QLoRA (--finetune lora, qlora), or lower --seq-len",
              "lora": "use QLoRA (--finetune qlora), or lower --seq-len, --micro-batch or --rank",
              "qlora": "lower --seq-len, --micro-batch or --rank" + (", or use --group-size 64" if
                                                                      s["group_size"] == 32 else "")}[s["method"]]
    text = training_verdict(f"{what} of {name}", rows, memory_bytes, memory,
                            Layout(s["dp_replicate"], s["dp_shard"], s["tp"]), recipe_ac, advice)
    return FinetuneReport(model, source, config, memory_bytes, memory, settings, rows, recipe_ac, text)
