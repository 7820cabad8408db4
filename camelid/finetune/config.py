"""The finetuning configuration: `camelid train`'s schema conventions (one typed schema for TOML
files and `--section.key=value` overrides, unknown keys are errors) with a base model instead of
a shape, instruction data instead of token shards, and a [lora] section. The sections train,
checkpoint, parallel, stability and sample are pretraining's, with finetuning's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from camelid.finetune.records import FORMATS as RECORD_FORMATS
from camelid.train.config import (
    EXPORTS,
    CheckpointSection,
    InvalidSetting,
    ParallelSection,
    RunSection,
    SampleSection,
    StabilitySection,
    TrainSection,
    load_config,
    raise_first,
    shared_checks,
)

METHODS = ("full", "lora", "qlora")
# sft: instruction finetuning; reward: a reward model from preference pairs (Bradley-Terry);
# dpo: direct preference optimisation; ppo: RLHF against a reward model; grpo: the same loop
# without a critic, advantages from a group of completions per prompt.
OBJECTIVES = ("sft", "reward", "dpo", "ppo", "grpo")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
PAIRWISE = ("reward", "dpo")     # objectives trained on preference pairs
FORMATS = ("auto",) + RECORD_FORMATS + ("preference",)
BUILTIN = ("corpus-quiz", "corpus-preferences")
DPO_LOSSES = ("sigmoid", "ipo")
DPO_REFERENCES = ("auto", "precomputed")


@dataclass
class BaseModelSection:
    base: str = ""                   # any checkpoint camelid loads: .gguf, Hugging Face / Meta / camelid
                                     # directory (quantized too), or a known name
    method: str = "lora"             # full (every weight), lora (adapters on a frozen base), qlora (adapters on
                                     # a frozen quantized base)
    quantize: str = "int4"           # qlora: the frozen base's weights, int4 or int8
    group_size: int | None = None    # qlora int4: 32 (default), 64 or 128
    objective: str = "sft"           # sft, reward, dpo, ppo or grpo


@dataclass
class LoraSection:
    # LoRA (Hu et al., 2021); the QLoRA paper finds adapters on every linear layer needed to
    # match full finetuning (Dettmers et al., 2023, section 4)
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    rslora: bool = False             # scale by alpha / sqrt(rank) (Kalajdzievski, 2023) instead of alpha / rank


@dataclass
class InstructionDataSection:
    train: list[str] = field(default_factory=list)  # JSONL or Parquet files: chat {"messages"}, Alpaca
                                                    # {"instruction", "input", "output"}, {"prompt", "completion"};
                                                    # reward, dpo: {"prompt" | "messages", "chosen", "rejected"}
    val: list[str] = field(default_factory=list)    # held-out files; none: val_fraction of the training examples
    format: str = "auto"             # auto (per file), chat, alpaca, prompt_completion or preference
    hf_dataset: str = ""             # a Hugging Face dataset (name or path) read with `datasets`, instead of files
    hf_subset: str = ""
    hf_split: str = "train"
    builtin: str = ""                # corpus-quiz: the demo's questions, built from camelid's embedded corpus;
                                     # corpus-preferences: pairs of a right and a wrong answer to them
    val_fraction: float = 0.05
    seq_len: int = 1024
    packing: bool = True             # several examples per sequence, none attending to another (pairs: never)
    overflow: str = "truncate"       # an example longer than seq_len: truncate (pairs: the completions), or drop
    train_on: str = "assistant"      # assistant (the loss covers what the assistant says) or all (pairs: the
                                     # completions, always)


@dataclass
class DPOSection:
    # Direct preference optimisation (Rafailov et al., 2023)
    beta: float = 0.1                # strength of the implicit KL constraint to the reference
    loss: str = "sigmoid"            # sigmoid (DPO) or ipo (Azar et al., 2023)
    label_smoothing: float = 0.0     # cDPO: the share of pairs taken to be mislabelled
    reference: str = "auto"          # auto: the base with adapters off (lora, qlora), else precomputed;
                                     # precomputed: one pass over the pairs before training
    nll_coef: float = 0.0            # > 0: plus this times the chosen answer's mean token NLL, which keeps its
                                     # likelihood from falling (Llama 3: 0.2, Dubey et al., 2024; RPO, Pang
                                     # et al., 2024)


@dataclass
class RLSection:
    # PPO (Schulman et al., 2017) as in InstructGPT (Ouyang et al., 2022), and GRPO (Shao et al., 2024)
    reward_model: str = ""           # a reward model camelid loads (objective = "reward" makes one)
    prompts_per_step: int = 8        # prompts per rollout batch
    completions_per_prompt: int = 1  # grpo: the group whose mean and spread set the advantages
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    epochs: int = 2                  # passes over each rollout batch
    minibatch: int = 8               # completions per update
    clip: float = 0.2                # the policy ratio's clip range
    value_clip: float = 0.2
    value_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95                # generalised advantage estimation (Schulman et al., 2016)
    kl_coef: float = 0.05            # the per-token KL penalty to the reference
    kl_target: float = 0.0           # > 0: adapt kl_coef towards this KL (Ziegler et al., 2019); 0: fixed
    kl_horizon: int = 10000
    compile: bool = True             # rollouts decode with the generation core's compiled step (where it works)
    samples: int = 2                 # completions (of different prompts) written to run.dir/samples.jsonl ...
    sample_interval: int = 10        # ... at step 1 and every this many steps


@dataclass
class FinetuneTrainSection(TrainSection):
    max_steps: int = 300
    lr: float = 2e-4                 # LoRA's usual rate; full finetuning wants about 1e-5..5e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    micro_batch: int = 4
    log_interval: int = 1
    eval_interval: int = 50
    eval_batches: int = 10


@dataclass
class FinetuneCheckpointSection(CheckpointSection):
    interval: int = 100


@dataclass
class FinetuneSampleSection(SampleSection):
    chat: bool = True                # an instruction-tuned model answers messages
    temperature: float = 0.0


@dataclass
class EvaluateSection:
    tasks: list[str] = field(default_factory=list)  # `camelid eval` tasks run on the base and on the result
    limit: int = 0                   # documents per task (0: all)
    num_fewshot: int = 0


@dataclass
class FinetuneConfig:
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/finetune"))
    model: BaseModelSection = field(default_factory=BaseModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: InstructionDataSection = field(default_factory=InstructionDataSection)
    train: FinetuneTrainSection = field(default_factory=FinetuneTrainSection)
    checkpoint: FinetuneCheckpointSection = field(default_factory=FinetuneCheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    stability: StabilitySection = field(default_factory=StabilitySection)
    sample: FinetuneSampleSection = field(default_factory=FinetuneSampleSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    rl: RLSection = field(default_factory=RLSection)

    @property
    def adapters(self) -> bool:
        return self.model.method in ("lora", "qlora")

    def __post_init__(self) -> None:
        m, d, lo, p = self.model, self.data, self.lora, self.parallel
        sources = [name for name, given in (("data.train", d.train), ("data.hf_dataset", d.hf_dataset),
                                            ("data.builtin", d.builtin)) if given]
        distributed = p.dp_replicate * p.dp_shard * p.tp > 1
        checks = shared_checks(self) + [
            (bool(m.base), "model.base is empty: name the model to finetune (a .gguf file, a model directory "
                           "or a known name)"),
            (m.method in METHODS, f"model.method must be one of {', '.join(METHODS)} (got {m.method!r})"),
            (m.objective in OBJECTIVES, f"model.objective must be one of {', '.join(OBJECTIVES)} "
                                        f"(got {m.objective!r})"),
            (m.quantize in ("int4", "int8"), f"model.quantize must be int4 or int8 (got {m.quantize!r})"),
            (m.group_size is None or (m.method == "qlora" and m.quantize == "int4"),
             "model.group_size sets int4's groups: only with model.method = \"qlora\" and model.quantize = \"int4\""),
            (m.group_size in (None, 32, 64, 128), f"model.group_size must be 32, 64 or 128 (got {m.group_size})"),
            (lo.rank >= 1, f"lora.rank must be at least 1 (got {lo.rank})"),
            (lo.alpha > 0, f"lora.alpha must be positive (got {lo.alpha})"),
            (0 <= lo.dropout < 1, f"lora.dropout must be in [0, 1) (got {lo.dropout})"),
            (bool(lo.targets) and set(lo.targets) <= set(LORA_TARGETS),
             f"lora.targets: choose among {', '.join(LORA_TARGETS)} (got {lo.targets})"),
            (len(sources) == 1, "give the instruction data one way: data.train (files), data.hf_dataset or "
                                "data.builtin" + (f" (got {', '.join(sources)})" if sources else "")),
            (d.format in FORMATS, f"data.format must be one of {', '.join(FORMATS)} (got {d.format!r})"),
            (not d.builtin or d.builtin in BUILTIN, f"data.builtin must be one of {', '.join(BUILTIN)} "
                                                    f"(got {d.builtin!r})"),
            (0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1) (got {d.val_fraction})"),
            (bool(d.val) or bool(d.builtin) or d.val_fraction > 0,
             "validation needs held-out examples: give data.val files or a data.val_fraction above 0"),
            (d.seq_len >= 8, f"data.seq_len must be at least 8 (got {d.seq_len})"),
            (d.overflow in ("truncate", "drop"), f"data.overflow must be truncate or drop (got {d.overflow!r})"),
            (d.train_on in ("assistant", "all"), f"data.train_on must be assistant or all (got {d.train_on!r})"),
            (set(self.checkpoint.export) <= set(EXPORTS), f"checkpoint.export: choose among {list(EXPORTS)} "
                                                           f"(got {self.checkpoint.export})"),
            (self.evaluate.limit >= 0, f"evaluate.limit must be 0 (every document) or positive "
                                       f"(got {self.evaluate.limit})"),
            (self.evaluate.num_fewshot >= 0, f"evaluate.num_fewshot must be 0 or more "
                                             f"(got {self.evaluate.num_fewshot})"),
            # Adapters train in one process: FSDP shards whole blocks whose weights all train,
            # and a frozen base needs none of it.
            (not (distributed and self.adapters), f"model.method = {m.method!r} runs in one process; under "
                                                   "torchrun use model.method = \"full\" (FSDP), or start "
                                                   "camelid finetune without torchrun"),
        ]
        if m.objective in ("ppo", "grpo"):
            checks += rl_checks(self)
        raise_first(checks + self._objective_checks())

    def _objective_checks(self) -> list[tuple[bool, str]]:
        """What the objective asks of the data and the other sections."""
        m, d, dpo = self.model, self.data, self.dpo
        p = self.parallel
        pairwise = m.objective in PAIRWISE
        return [
            (not pairwise or d.format in ("auto", "preference"),
             f"data.format {d.format!r}: model.objective = {m.objective!r} trains on preference pairs; use "
             "data.format = \"preference\" (or auto)"),
            (m.objective != "sft" or d.format != "preference",
             "data.format = \"preference\": preference pairs train model.objective = \"reward\" or \"dpo\", "
             "not sft"),
            (not pairwise or d.builtin in ("", "corpus-preferences"),
             f"data.builtin {d.builtin!r}: model.objective = {m.objective!r} needs preference pairs; use "
             "data.builtin = \"corpus-preferences\""),
            (m.objective != "sft" or d.builtin != "corpus-preferences",
             "data.builtin = \"corpus-preferences\" is preference pairs, for model.objective = \"reward\" or "
             "\"dpo\"; instruction finetuning takes data.builtin = \"corpus-quiz\""),
            # reward and dpo hold pairs together, ppo and grpo a generation engine: one process
            (m.objective == "sft" or p.dp_replicate * p.dp_shard * p.tp == 1,
             f"model.objective = {m.objective!r} runs in one process; start camelid finetune without torchrun"),
            (m.objective != "reward" or not self.adapters or "output" not in self.lora.targets,
             "lora.targets: a reward model's score head trains whole beside the adapters; remove \"output\""),
            (m.objective != "reward" or not self.sample.prompts,
             "sample.prompts: a reward model scores text and does not generate; remove the prompts"),
            (m.objective != "reward" or not self.evaluate.tasks,
             "evaluate.tasks: a reward model has no language-model head to run them with; its held-out "
             "preference accuracy is reported instead"),
            (m.objective != "reward" or set(self.checkpoint.export) <= {"hf"},
             f"checkpoint.export {self.checkpoint.export}: a reward model is written as a camelid checkpoint and "
             "exported to Hugging Face (\"hf\") only"),
            (dpo.beta > 0, f"dpo.beta must be positive (got {dpo.beta})"),
            (dpo.loss in DPO_LOSSES, f"dpo.loss must be one of {', '.join(DPO_LOSSES)} (got {dpo.loss!r})"),
            (0 <= dpo.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5) (got {dpo.label_smoothing})"),
            (dpo.loss == "sigmoid" or dpo.label_smoothing == 0,
             "dpo.label_smoothing applies to the sigmoid loss (cDPO); IPO's loss has none"),
            (dpo.nll_coef >= 0, f"dpo.nll_coef must be 0 (none) or positive (got {dpo.nll_coef})"),
            (dpo.reference in DPO_REFERENCES,
             f"dpo.reference must be one of {', '.join(DPO_REFERENCES)} (got {dpo.reference!r})"),
        ]

    @property
    def dpo_reference(self) -> str:
        """How DPO gets the reference's log-probabilities: "adapters" (the same model with its
        LoRA adapters off, computed alongside) or "precomputed" (one pass before training)."""
        if self.dpo.reference == "auto":
            return "adapters" if self.adapters else "precomputed"
        return self.dpo.reference


def rl_checks(cfg: FinetuneConfig) -> list[tuple[bool, str]]:
    """The [rl] settings of objective ppo or grpo."""
    r, objective = cfg.rl, cfg.model.objective
    return [
        (not cfg.train.compile, f"train.compile: model.objective = {objective!r} compiles the rollouts' decode step "
                                "(rl.compile) but not the update; set train.compile = false"),
        (r.prompts_per_step >= 1, f"rl.prompts_per_step must be at least 1 (got {r.prompts_per_step})"),
        (r.completions_per_prompt >= (2 if objective == "grpo" else 1),
         f"rl.completions_per_prompt must be at least {2 if objective == 'grpo' else 1}"
         + (" (GRPO compares the completions of a prompt)" if objective == "grpo" else "")
         + f" (got {r.completions_per_prompt})"),
        (r.max_new_tokens >= 1, f"rl.max_new_tokens must be at least 1 (got {r.max_new_tokens})"),
        (r.max_new_tokens < cfg.data.seq_len, f"rl.max_new_tokens {r.max_new_tokens} leaves no room for a prompt in "
                                              f"data.seq_len {cfg.data.seq_len} (prompt + completion); raise "
                                              "data.seq_len"),
        (0 < r.temperature < math.inf, f"rl.temperature must be above 0: the policy samples (got {r.temperature})"),
        (0 < r.top_p <= 1, f"rl.top_p must be in (0, 1] (got {r.top_p})"),
        (r.epochs >= 1, f"rl.epochs must be at least 1 (got {r.epochs})"),
        (r.minibatch >= 1, f"rl.minibatch must be at least 1 (got {r.minibatch})"),
        (r.clip > 0, f"rl.clip must be above 0 (got {r.clip})"),
        (r.value_clip > 0, f"rl.value_clip must be above 0 (got {r.value_clip})"),
        (r.value_coef >= 0, f"rl.value_coef must be 0 or more (got {r.value_coef})"),
        (0 <= r.gamma <= 1, f"rl.gamma must be in [0, 1] (got {r.gamma})"),
        (0 <= r.lam <= 1, f"rl.lam must be in [0, 1] (got {r.lam})"),
        (r.kl_coef >= 0, f"rl.kl_coef must be 0 or more (got {r.kl_coef})"),
        (r.kl_target >= 0, f"rl.kl_target must be 0 (a fixed kl_coef) or above (got {r.kl_target})"),
        (r.kl_target == 0 or r.kl_coef > 0, "rl.kl_target adapts rl.kl_coef, which must then start above 0"),
        (r.kl_horizon >= 1, f"rl.kl_horizon must be at least 1 (got {r.kl_horizon})"),
        (r.samples >= 0, f"rl.samples must be 0 or more (got {r.samples})"),
        (r.sample_interval >= 1, f"rl.sample_interval must be at least 1 (got {r.sample_interval})"),
    ]


def load_finetune_config(path: str | Path | None, overrides: list[str] = ()) -> FinetuneConfig:
    return load_config(FinetuneConfig, path, overrides)
