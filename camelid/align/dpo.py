"""Direct Preference Optimization (Rafailov et al., 2023) on the finetuning trainer.

The policy is the model being finetuned (full, LoRA or QLoRA); each pair's loss compares the
log-probability sums of its two completions under the policy with those under the reference,
the model as it was before training. The reference's log-probabilities come from

- "adapters" (dpo.reference = "auto" with LoRA/QLoRA): the same model with its LoRA adapters
  off (camelid.lora.adapters_disabled), a second forward pass without gradients: the frozen
  base is the reference, and no second copy of it is held;
- "precomputed" (the default for full finetuning, allowed with adapters): one pass over every
  pair before training, while the weights are still the base's, written atomically to
  run.dir/reference.pt. A resumed run reads it back instead of recomputing (its weights are no
  longer the base's); the file is keyed by the pairs' tokens and the base and its settings,
  so that a run directory whose data changed is refused rather than trained against a stale
  reference.

dpo.nll_coef adds the chosen answer's per-token negative log-likelihood to each pair's loss, as
Llama 3's DPO does (Dubey et al., 2024) and RPO (Pang et al., 2024).
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from camelid.align.losses import dpo_loss, head_sequence_logps, preference_accuracy
from camelid.align.pairwise import PairwiseTrainer
from camelid.align.preference import PairBatch
from camelid.finetune.data import IGNORE
from camelid.atomic import atomic_path
from camelid.distributed.parallelize import gather
from camelid.errors import CamelidError
from camelid.lora import adapters_disabled
from camelid.quant.layers import keep_dequantized

REFERENCE = "reference.pt"
SPLITS = ("train", "val", "heldout")


def completion_logps(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """[2P] each row's completion log-probability (the sum over its marked tokens)."""
    hidden = model.hidden(batch.inputs)
    return head_sequence_logps(lambda h: _head(model, h), hidden, batch.targets, model.config.head_size)


def _head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    output = getattr(model, "output", None)
    if output is None or type(output) is nn.Linear:   # plain or tied: the (gathered) weight, as head_loss does
        return F.linear(h, gather(model.head_weight))
    return model.head(h)                              # adapted or quantized: through its module


class DPOTrainer(PairwiseTrainer):
    REPORTED = ("rewards_accuracy", "rewards_margin", "logps_accuracy")

    def _build_model(self) -> nn.Module:
        model = super()._build_model()
        self.reference_mode = self.cfg.dpo_reference
        self.reference = self._precomputed(model) if self.reference_mode == "precomputed" else None
        return model

    # ---- the loss --------------------------------------------------------------------------------
    def pair_terms(self, batch: PairBatch, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        d = self.cfg.dpo
        model = model or self.model
        policy = completion_logps(model, batch)
        if self.reference is None:
            with torch.no_grad(), adapters_disabled(model):
                reference = completion_logps(model, batch)
        else:
            rows = self.reference[batch.split][batch.index.clamp(min=0).cpu()].to(policy.device)   # [P, 2]
            reference = torch.cat([rows[:, 0], rows[:, 1]])
        pc, pr = policy.chunk(2)
        rc, rr = reference.chunk(2)
        loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, d.beta, d.label_smoothing, d.loss)
        extra = {}
        if d.nll_coef:
            nll = -pc / (batch.targets[:batch.pairs] != IGNORE).sum(-1).clamp(min=1)
            loss = loss + d.nll_coef * nll
            extra["nll_chosen"] = nll.detach()
        return {"loss": loss, **extra, "rewards_chosen": chosen, "rewards_rejected": rejected,
                "rewards_accuracy": preference_accuracy(chosen, rejected), "rewards_margin": chosen - rejected,
                "logps_chosen": pc.detach(), "logps_rejected": pr.detach(),
                "logps_accuracy": preference_accuracy(pc.detach(), pr.detach())}

    # ---- the precomputed reference ---------------------------------------------------------------
    def _reference_key(self) -> str:
        """What the reference's log-probabilities depend on: the base and how it is held, and
        every pair's tokens and marks."""
        c = self.cfg
        h = hashlib.sha256(repr((c.model.base, c.model.method, c.model.quantize, c.model.group_size, c.train.dtype,
                                 c.data.seq_len)).encode())
        for split in SPLITS:
            for pair in self.pairs_of(split):
                for ex in (pair.chosen, pair.rejected):
                    h.update(np.asarray(ex.ids, dtype=np.int64).tobytes())
                    h.update(np.asarray(ex.trainable, dtype=np.bool_).tobytes())
                h.update(split.encode())
        return h.hexdigest()

    def _precomputed(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{split: [pairs, 2] (chosen, rejected) log-probabilities} under the model as built,
        from run.dir/reference.pt when it holds this data's, else computed now and written."""
        path = self.run_dir / REFERENCE
        key = self._reference_key()
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                return saved["logps"]
            if self._checkpoints():
                raise CamelidError(f"run.dir {self.run_dir}: {REFERENCE} holds the reference of other pairs or another "
                                   "base than this recipe's, and the run's checkpoints were trained against it; "
                                   "choose another run.dir, or restore the data and model settings to resume")
        if self.main and self.log:
            print(f"dpo: the reference's log-probabilities of {sum(len(self.pairs_of(s)) for s in SPLITS):,} pairs, "
                  f"computed once ({REFERENCE})", file=sys.stderr)
        logps = {split: self._logps_of(model, split) for split in SPLITS if self.pairs_of(split)}
        if self.main:
            with atomic_path(path) as tmp:
                torch.save({"key": key, "logps": logps}, tmp)
        return logps

    @torch.no_grad()
    def _logps_of(self, model: nn.Module, split: str) -> torch.Tensor:
        out = torch.zeros(len(self.pairs_of(split)), 2, dtype=torch.float32)
        was_training = model.training
        model.eval()
        # one pass over every pair: a quantized base (QLoRA) is dequantized once, not per batch
        with adapters_disabled(model), keep_dequantized(model):
            for batch in self._loader(split, 0).one_pass():
                b = batch.to(self.device)
                with self._autocast():
                    logps = completion_logps(model, b).float().cpu()
                real = b.real.cpu()
                chosen, rejected = logps.chunk(2)
                out[b.index.cpu()[real]] = torch.stack([chosen, rejected], dim=1)[real]
        model.train(was_training)
        return out

