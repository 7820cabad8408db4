"""Finetuning on the pretraining loop (camelid.train.Trainer): the same steps, accumulation,
schedule, validation, stability guard, metrics, checkpoints and exact resume. What differs is
decided here, in the builders and the checkpoint hooks:

- the model is a loaded base, trained whole (`full`, also under torchrun with FSDP) or frozen
  with LoRA adapters swapped in (`lora`; `qlora` over a quantized base);
- the data is instruction examples (camelid.finetune.data): packed or padded batches whose
  targets mark the tokens the loss covers, so each step's loss is normalised by those tokens;
- an adapter run's checkpoints and export hold the adapters alone, in Hugging Face PEFT's layout,
  and the export also writes the base with the adapters merged in (run.dir/model).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from camelid.atomic import atomic_dir
from camelid.checkpoint import Checkpoint, build_model, build_quantized_model, read_checkpoint, write_checkpoint
from camelid.checkpoint.names import expected_shapes
from camelid.checkpoint.native import write_native
from camelid.distributed import ParallelConfig, apply_activation_checkpointing, parallelize
from camelid.distributed.parallelize import clean_name, gather
from camelid.distributed.sharded_state import TRAINER
from camelid.errors import CamelidError
from camelid.finetune.config import FinetuneConfig
from camelid.finetune.data import (
    IGNORE,
    Batch,
    InstructionLoader,
    encode_conversation,
    fit_length,
    load_hf_dataset,
    read_records,
    split_heldout,
)
from camelid.lora import (
    LoRALinear,
    LoraSettings,
    adapter_state,
    apply_lora,
    load_adapter_state,
    read_adapter,
    save_adapter,
)
from camelid.config import ModelConfig
from camelid.model import Transformer
from camelid.model.inductor import use_inductor_layers
from camelid.quant import QuantizedLinear
from camelid.train import run_state
from camelid.train.loss import SLAB, linear_cross_entropy
from camelid.train.trainer import EXPORT_NAMES, Trainer

ADAPTER = "adapter"       # run.dir/adapter and checkpoints/step_N/adapter: PEFT's layout
DATA_REPORT = "data.json"
HEAD_CHUNK = 1024         # at most this many rows of logits at a time when the head is not a plain linear
                          # layer (fewer where a slab of train.loss.SLAB logits holds fewer)


def open_base(name: str) -> Checkpoint:
    """The base checkpoint's config, tokenizer and lazy weights, refused by name when unusable."""
    try:
        ckpt = read_checkpoint(name)
    except CamelidError as e:
        raise CamelidError(f"model.base: {e}") from None
    if ckpt.tokenizer is None:
        raise CamelidError(f"model.base {ckpt.path}: no tokenizer found beside the weights (tokenizer.model or "
                           "tokenizer.json); finetuning renders the data with it")
    return ckpt


def lora_settings(cfg: FinetuneConfig) -> LoraSettings:
    lo = cfg.lora
    return LoraSettings(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=tuple(lo.targets),
                        rslora=lo.rslora)


class FinetuneTrainer(Trainer):
    cfg: FinetuneConfig

    # ---- data --------------------------------------------------------------------------------
    def _open_base(self) -> None:
        """The base's config, tokenizer and lazy weights, checked against the settings."""
        c = self.cfg
        if c.parallel.tp > 1:
            raise CamelidError("parallel.tp: finetuning shards with FSDP (parallel.dp_shard) only; set "
                               "parallel.tp = 1")
        self.base = open_base(c.model.base)
        self.manifest, self.tokenizer, self.config = None, self.base.tokenizer, self.base.config
        if c.data.seq_len > self.config.max_seq_len:
            raise CamelidError(f"data.seq_len {c.data.seq_len} is longer than {c.model.base}'s context "
                               f"({self.config.max_seq_len}); lower data.seq_len")

    def _build_data(self) -> None:
        c = self.cfg
        self._open_base()
        self.train_examples, self.val_examples, self.data_report, self.heldout_tasks = self._load_data()
        self.train_loader = self._loader("train", c.train.seed)
        rows = self._global_rows()
        self.micro_rows = self._micro_batches(rows, c.train.micro_batch)
        self.accumulation = len(self.micro_rows)
        self.step_tokens = rows * c.data.seq_len

    def _load_data(self) -> tuple[list, list, dict, list[str]]:
        """(training examples, validation examples, data.json's report, evaluation tasks)."""
        return load_examples(self.cfg, self.tokenizer, self.run_dir)

    def _loader(self, split: str, seed: int) -> InstructionLoader:
        c = self.cfg
        train = split == "train"
        return InstructionLoader(self.train_examples if train else self.val_examples, c.data.seq_len,
                                 c.train.micro_batch, seed, rank=self.dp_rank, world_size=self.dp_size,
                                 packing=c.data.packing, shuffle=train)

    def targets_in(self, batch: Batch) -> int:
        return batch.target_tokens()

    def step_counts(self, batches: list[Batch]) -> tuple[float, int]:
        """The step's loss tokens and tokens read (padding included), over all ranks: they vary
        with the examples, so the ranks sum them."""
        return (self._dp_sum([b.target_tokens() for b in batches]),
                int(self._dp_sum([b.inputs.numel() for b in batches])))

    # ---- model -------------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        c, t = self.cfg, self.cfg.train
        if self.runtime.distributed:
            return self._parallel_full_model()
        # Adapters train over a base held in the compute dtype (half the memory in bf16, as the
        # matrix products run in it anyway); full finetuning keeps fp32 master weights.
        compute = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
        if c.model.method == "qlora":
            model = build_quantized_model(self.base, c.model.quantize, c.model.group_size, dtype=compute,
                                          device=self.device)
        else:
            model = build_model(self.base, dtype=torch.float32 if c.model.method == "full" else compute,
                                device=self.device)
        if c.model.method == "full":
            model.requires_grad_(True)
        else:
            apply_lora(model, lora_settings(c), seed=t.seed)
        model.train()
        # LoRA dropout draws random masks inside the blocks: a recomputed block must draw the same
        apply_activation_checkpointing(model, t.activation_checkpointing,
                                       preserve_rng_state=c.adapters and c.lora.dropout > 0)
        if t.compile:
            use_inductor_layers(model)
            for i, block in enumerate(model.layers):
                model.layers[i] = torch.compile(block)
        return model

    def _parallel_full_model(self) -> nn.Module:
        """torchrun, full finetuning: FSDP over the meta-device model, then each rank copies its
        shard of every base weight, holding one whole tensor at a time."""
        t = self.cfg.train
        with torch.device("meta"):
            model = Transformer(self.config)
        parallelize(model, self.runtime.mesh, ParallelConfig(t.activation_checkpointing, t.compile,
                                                             bf16=t.dtype == "bfloat16"))
        model.to_empty(device=self.device)
        params = {clean_name(n): p for n, p in model.named_parameters()}
        with torch.no_grad():
            for name, tensor in self.base.tensors(torch.float32, self.device):
                p = params[name]
                if isinstance(p, DTensor):
                    p.to_local().copy_(distribute_tensor(tensor, p.device_mesh, p.placements,
                                                         src_data_rank=None).to_local())
                else:
                    p.copy_(tensor)
        return model

    # ---- loss ----------------------------------------------------------------------------------
    def loss_sum(self, batch: Batch) -> torch.Tensor:
        b = batch.to(self.device)
        with self._autocast():
            hidden = self.model.hidden(b.inputs, b.positions, documents=b.documents)
            return head_loss(self.model, hidden.flatten(0, 1), b.targets.flatten())

    # ---- checkpoints ---------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        c = self.cfg
        return {**super().trainer_state(), "method": c.model.method, "lora": asdict(c.lora) if c.adapters else None,
                "objective": c.model.objective}

    def _check_resume(self) -> None:
        super()._check_resume()
        found = self._checkpoints()
        if not found:
            return
        state = torch.load(found[-1] / TRAINER, map_location="cpu", weights_only=True)
        c = self.cfg
        mine = {"method": c.model.method, "lora": asdict(c.lora) if c.adapters else None,
                "objective": c.model.objective}
        theirs = {"method": state.get("method"), "lora": state.get("lora"),
                  "objective": state.get("objective", "sft")}   # checkpoints from before objectives: sft
        if mine != theirs:
            raise CamelidError(f"run.dir {self.run_dir}: its checkpoint {found[-1].name} was trained with {theirs}, "
                               f"this recipe asks for {mine}; choose another run.dir, or restore the settings "
                               "to resume")

    def save(self) -> Path:
        if not self.cfg.adapters:
            return super().save()
        target = self.checkpoints / f"step_{self.step:08d}"
        with atomic_dir(target, overwrite=True) as tmp:
            self._save_adapter(tmp / ADAPTER)
            torch.save({**self.trainer_state(), "optimizer": self.optimizer.state_dict()}, tmp / TRAINER)
        run_state.prune(self.checkpoints, self.cfg.checkpoint.keep)
        return target

    def _save_adapter(self, directory: Path) -> Path:
        return save_adapter(directory, lora_settings(self.cfg), adapter_state(self.model), self.config,
                            base_model=self.cfg.model.base)

    def _load_state(self, path: Path) -> dict[str, Any]:
        if not self.cfg.adapters:
            return super()._load_state(path)
        _, weights = read_adapter(path / ADAPTER, self.config)
        load_adapter_state(self.model, weights, str(path / ADAPTER))
        state = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        return state

    def export(self) -> Path:
        """run.dir/model: the finetuned model as a camelid checkpoint (adapters merged into the
        base, dequantized for QLoRA), plus run.dir/adapter (adapter runs: PEFT's layout, to
        load unmerged or with peft) and the formats of checkpoint.export."""
        if not self.cfg.adapters:
            return super().export()
        target = self.run_dir / "model"
        self._save_adapter(self.run_dir / ADAPTER)
        config, weights = merged_weights(self.model, self.config)
        with atomic_dir(target, overwrite=True) as tmp:
            write_native(tmp, config, self.tokenizer, weights.items(), extra={"step": self.step})
        whole = Checkpoint(path=target, format="camelid", config=config, tokenizer=self.tokenizer,
                           names=list(weights), read=weights.__getitem__)
        for fmt in self.cfg.checkpoint.export:
            write_checkpoint(whole, self.run_dir / EXPORT_NAMES[fmt], fmt, overwrite=True)
        return target


# ---- the loss over the output head -----------------------------------------------------------------

def head_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the targets that carry a loss. A plain (or tied) head takes the
    fused chunked loss; an adapted or quantized head runs through its module over the rows with
    a target only (instruction data ignores most: the prompts), a chunk at a time, recomputing
    each chunk's logits in the backward pass so that only one [chunk, vocab] slab ever exists."""
    output = getattr(model, "output", None)
    if output is None or type(output) is nn.Linear:
        return linear_cross_entropy(hidden, gather(model.head_weight), targets)
    keep = targets != IGNORE
    hidden, targets = hidden[keep], targets[keep]
    rows = min(HEAD_CHUNK, max(1, SLAB // output.out_features))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        total = total + checkpoint(_chunk_loss, model, hidden[start:start + rows], targets[start:start + rows],
                                   use_reentrant=False)
    return total


def _chunk_loss(model: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.head(h).float(), t, ignore_index=IGNORE, reduction="sum")


# ---- export --------------------------------------------------------------------------------------

@torch.no_grad()
def merged_weights(model: nn.Module, config: ModelConfig) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The adapted model as a plain one: its config and fp32 weights under camelid's names, each
    adapted layer's base (dequantized where quantized) plus its scaled B @ A. A tied head that
    was adapted no longer equals the embeddings: the result has its own output weight."""
    modules = {clean_name(n): m for n, m in model.named_modules()}
    params = {clean_name(n): p for n, p in model.named_parameters()}
    if config.tie_embeddings and isinstance(modules.get("output"), LoRALinear):
        config = config.replace(tie_embeddings=False)
    weights = {}
    for name in expected_shapes(config):
        module = modules.get(name.removesuffix(".weight"))
        base = module.base if isinstance(module, LoRALinear) else module
        if isinstance(base, QuantizedLinear):
            weight = base.dequantize(torch.float32)
        elif base is not None:
            weight = base.weight.detach().float()
        else:
            weight = params[name].detach().float()
        if isinstance(module, LoRALinear):
            weight = weight + module.delta()
        weights[name] = weight.cpu()
    return config, weights


# ---- instruction examples -----------------------------------------------------------------------

def load_examples(cfg: FinetuneConfig, tokenizer, run_dir: Path):
    """Training and validation examples, tokenized and fitted to data.seq_len; the counts of
    what was truncated or dropped (for run.dir/data.json); and the evaluation tasks the data
    brings (data.builtin's held-out questions)."""
    d = cfg.data
    tasks: list[str] = []
    if d.builtin:
        from camelid.finetune.quiz import build_quiz

        files = build_quiz(run_dir / "data", seed=cfg.train.seed)
        train_conv = read_records(files["train"], "chat")
        val_conv = read_records(files["val"], "chat")
        tasks = [str(files["heldout"])]
    elif d.hf_dataset:
        train_conv = load_hf_dataset(d.hf_dataset, d.hf_split, d.hf_subset or None)
        val_conv = []
    else:
        train_conv = [m for f in d.train for m in read_records(f, d.format)]
        val_conv = [m for f in d.val for m in read_records(f, d.format)]
    encode = [encode_conversation(m, tokenizer, d.train_on) for m in train_conv]
    if val_conv:
        held = [encode_conversation(m, tokenizer, d.train_on) for m in val_conv]
        train = encode
    else:
        train, held = split_heldout(encode, d.val_fraction, cfg.train.seed)
    train, train_counts = fit_length(train, d.seq_len, d.overflow)
    held, val_counts = fit_length(held, d.seq_len, d.overflow)
    if not train:
        raise CamelidError("data: no training example is left (each was dropped as too long for data.seq_len "
                           f"{d.seq_len}, or had nothing to train on); raise data.seq_len or set data.overflow = "
                           "\"truncate\"")
    report = {"train": train_counts, "val": val_counts, "seq_len": d.seq_len, "packing": d.packing,
              "train_on": d.train_on}
    return train, held, report, tasks


def write_data_report(run_dir: Path, report: dict) -> None:
    from camelid.atomic import write_text_atomic

    write_text_atomic(run_dir / DATA_REPORT, json.dumps(report, indent=2) + "\n")

