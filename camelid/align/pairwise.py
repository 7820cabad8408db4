"""Training on preference pairs with the finetuning trainer: the steps, accumulation, schedule,
checkpoints, exact resume, LoRA/QLoRA and export are camelid.finetune.trainer's; what differs is
the data (camelid.align.preference: a batch is P pairs, their chosen rows then their rejected
rows), the loss (per pair, normalised by the step's pairs) and the figures logged with it.

- `RewardTrainer` (objective "reward"): the base with its head replaced by a score head, trained
  with the Bradley-Terry loss (Stiennon et al., 2020; Ouyang et al., 2022), read at each row's
  last token;
- `camelid.align.dpo.DPOTrainer` (objective "dpo"): the policy itself, with DPO's loss.

metrics.jsonl holds per step, beside loss, lr, grad_norm: reward: accuracy, margin,
rewards_chosen, rewards_rejected; dpo: rewards_chosen, rewards_rejected, rewards_accuracy,
rewards_margin, logps_chosen, logps_rejected, logps_accuracy (and nll_chosen with
dpo.nll_coef); each is the mean over the step's pairs. Validation
records the same figures prefixed "val_" (val_loss first). An accuracy counts a tie as half.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from camelid.align.losses import bradley_terry_loss, preference_accuracy
from camelid.align.preference import PairBatch, PairLoader, load_pairs
from camelid.checkpoint import build_model, read_checkpoint
from camelid.finetune.trainer import FinetuneTrainer, lora_settings
from camelid.lora import adapter_state, save_adapter

HELDOUT = "{split} preference pairs"   # the task name of the before/after figures in evaluation.json


class PairwiseTrainer(FinetuneTrainer):
    """What the reward and DPO trainers share: pairs in, a loss and figures per pair out."""

    # ---- data --------------------------------------------------------------------------------
    def _build_data(self) -> None:
        self._tally: dict[str, torch.Tensor] = {}      # the step's per-pair figures, summed (loss_sum)
        self._validation: dict[str, float] = {}        # the last validation's figures (evaluate)
        super()._build_data()

    def _load_data(self) -> tuple[list, list, dict, list[str]]:
        train, val, heldout, report, tasks = load_pairs(self.cfg, self.tokenizer, self.run_dir)
        self.heldout_pairs = heldout
        return train, val, report, tasks

    def pairs_of(self, split: str) -> list:
        """The pairs of "train", "val" or "heldout"."""
        return {"train": self.train_examples, "val": self.val_examples, "heldout": self.heldout_pairs}[split]

    def _loader(self, split: str, seed: int) -> PairLoader:
        c = self.cfg
        return PairLoader(self.pairs_of(split), c.data.seq_len, c.train.micro_batch, seed, rank=self.dp_rank,
                          world_size=self.dp_size, shuffle=split == "train", split=split)

    def targets_in(self, batch: PairBatch) -> int:
        return int(batch.real.sum())

    def step_counts(self, batches: list[PairBatch]) -> tuple[float, int]:
        """The step's pairs (the loss is their mean) and tokens read, over all ranks."""
        self._step_pairs = self._dp_sum([int(b.real.sum()) for b in batches])
        return self._step_pairs, int(self._dp_sum([b.inputs.numel() for b in batches]))

    # ---- the loss and its figures ------------------------------------------------------------------
    def pair_terms(self, batch: PairBatch, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """{"loss": [P], figure: [P], ...} of a batch on the device (a subclass's)."""
        raise NotImplementedError

    def loss_sum(self, batch: PairBatch) -> torch.Tensor:
        b = batch.to(self.device)
        with self._autocast():
            terms = self.pair_terms(b)
        real = b.real
        for name, value in terms.items():
            total = value.detach().float()[real].sum()
            self._tally[name] = self._tally.get(name, 0) + total
        return torch.where(real, terms["loss"], torch.zeros_like(terms["loss"])).sum()

    def step_metrics(self) -> dict[str, float]:
        tally, self._tally = self._tally, {}
        return {name: self._dp_sum([value]) / self._step_pairs for name, value in tally.items() if name != "loss"}

    @torch.no_grad()
    def figures(self, split: str, batches: int | None = None, model: nn.Module | None = None) -> dict[str, float]:
        """The mean of every per-pair figure (loss included) over a split's pairs (the first
        `batches` batches of its fixed order), with the training model or `model`."""
        loader = self._loader(split, self.cfg.train.seed + 1)
        (model or self.model).eval()
        sums: dict[str, torch.Tensor] = {}
        count = []
        for i, batch in enumerate(loader.one_pass()):
            if batches is not None and i >= batches:
                break
            b = batch.to(self.device)
            with self._autocast():
                terms = self.pair_terms(b, model)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0) + value.float()[b.real].sum()
            count.append(int(b.real.sum()))
        n = self._dp_sum(count)
        return {name: self._dp_sum([value]) / n for name, value in sums.items()}

    def evaluate(self) -> float:
        self._validation = {f"val_{k}": v for k, v in self.figures("val", self.cfg.train.eval_batches).items()}
        return self._validation["val_loss"]

    def validation_metrics(self, val_loss: float) -> dict[str, float]:
        return {"val_loss": val_loss, **self._validation}

    # ---- before and after ------------------------------------------------------------------------
    def heldout_split(self) -> str:
        """The pairs of the before/after figures: the data's own held-out pairs, else validation's."""
        return "heldout" if self.heldout_pairs else "val"

    def heldout_figures(self, model: nn.Module | None = None) -> dict[str, dict[str, float]]:
        """{task: {figure: value}} on the held-out pairs, for evaluation.json, with the training
        model (before training: as built) or `model` (after: `result_model()`)."""
        split = self.heldout_split()
        figures = self.figures(split, model=model)
        return {HELDOUT.format(split=split): {k: figures[k] for k in self.REPORTED}}

    def result_model(self) -> nn.Module | None:
        """The model the after-training figures are computed with (None: the one trained)."""
        return None

    REPORTED: tuple[str, ...] = ()   # the figures of the before/after table


class RewardTrainer(PairwiseTrainer):
    """A reward model: the base's blocks under a fresh scalar head (config num_labels = 1, never
    tied), trained whole (full) or with LoRA adapters on the blocks while the head always
    trains; its score is the head's output at each row's last real token."""

    REPORTED = ("accuracy", "margin")

    def _build_data(self) -> None:
        super()._build_data()
        self.heldout_tasks = []   # the demo's multiple choice needs a language-model head
        self.config = self.config.replace(num_labels=1, tie_embeddings=False)

    def _build_model(self) -> nn.Module:
        model = super()._build_model()
        model.output = score_head(self.config, self.cfg.train.seed, self.device)
        model.config = self.config
        return model

    def pair_terms(self, batch: PairBatch, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        chosen, rejected = pair_scores(model or self.model, batch)
        return {"loss": bradley_terry_loss(chosen, rejected), "accuracy": preference_accuracy(chosen, rejected),
                "margin": chosen - rejected, "rewards_chosen": chosen, "rewards_rejected": rejected}

    def result_model(self) -> nn.Module:
        """run.dir/model as read back from disk: the after-training figures are those of the
        model a user loads."""
        return build_model(read_checkpoint(self.run_dir / "model"), dtype=torch.float32, device=self.device)

    def _save_adapter(self, directory: Path) -> Path:
        # the score head is trained whole: PEFT's modules_to_save entry "score" beside the adapters
        state = {**adapter_state(self.model), "output.weight": self.model.output.weight.detach()}
        return save_adapter(directory, lora_settings(self.cfg), state, self.config, base_model=self.cfg.model.base)


def pair_scores(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """A scorer's rewards of the chosen and of the rejected rows ([P] each): its head's output
    at each row's last real token, which sees the whole prompt and completion (the padding
    after it is never seen, attention being causal)."""
    hidden = model.hidden(batch.inputs)                                                  # [2P, T, dim]
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.last()]   # [2P, dim]
    chosen, rejected = model.head(last).float().squeeze(-1).chunk(2)                     # [P] each
    return chosen, rejected


def score_head(config, seed: int, device: torch.device) -> nn.Linear:
    """A fresh [num_labels, dim] head, fp32, drawn from N(0, 1 / (dim + 1)) as Stiennon et al.
    (2020) initialise the reward head, so that the initial rewards have about unit
    variance over hidden states of unit RMS (seeded by train.seed)."""
    head = nn.Linear(config.dim, config.num_labels, bias=False, device=device, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(config.dim + 1), generator=gen)
    return head.requires_grad_(True)
