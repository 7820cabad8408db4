"""The training loop: gradient accumulation to a target batch in tokens, bf16 autocast, gradient
clipping, the paper's schedule, periodic validation, atomic checkpoints with exact resume, and a
stability guard (non-finite steps are skipped; repeated loss spikes roll back to the last
checkpoint and move on past the offending batches)."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from camelid.atomic import atomic_dir
from camelid.checkpoint.native import write_native
from camelid.data import Manifest, PackedLoader, SyntheticLoader
from camelid.distributed import apply_activation_checkpointing
from camelid.errors import CamelidError
from camelid.model import Transformer
from camelid.platform import keep_freed_memory
from camelid.tokenizer import Tokenizer, load_tokenizer
from camelid.train import checkpoint as ckpt
from camelid.train.config import TrainConfig
from camelid.train.loss import linear_cross_entropy
from camelid.train.metrics import MetricsLog, flops_per_token, peak_flops
from camelid.train.optim import build_optimizer, lr_at


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: TrainConfig, log: bool = True):
        self.cfg = cfg
        t = cfg.train
        keep_freed_memory()
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = pick_device(t.device)
        self.run_dir = Path(cfg.run.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(t.seed)

        # data and tokenizer
        self.tokenizer: Tokenizer | None = None
        self.manifest: Manifest | None = None
        vocab = None
        if not cfg.data.synthetic:
            self.manifest = Manifest.load(cfg.data.path)
            self.tokenizer = load_tokenizer(self.manifest.directory / self.manifest.tokenizer)
            vocab = self.manifest.vocab_size
        self.config = cfg.model.build(vocab)
        if self.manifest and self.config.vocab_size < self.manifest.vocab_size:
            raise CamelidError(f"model.vocab_size {self.config.vocab_size} is smaller than the data's "
                               f"{self.manifest.vocab_size}")
        self.train_loader = self._loader("train", t.seed)

        # model and optimizer
        with torch.device("meta"):
            model = Transformer(self.config)
        model.to_empty(device=self.device)
        model.init_weights(seed=t.seed, std=cfg.model.init_std)
        self.model = model
        apply_activation_checkpointing(model, t.activation_checkpointing)
        if t.compile:  # block by block, as torchtitan does: one graph, compiled once, reused per layer
            for i, block in enumerate(model.layers):
                model.layers[i] = torch.compile(block)
        self.optimizer = build_optimizer(model, t)

        micro_tokens = t.micro_batch * cfg.data.seq_len
        self.accumulation = max(1, math.ceil(t.batch_tokens / micro_tokens)) if t.batch_tokens else 1
        self.step_tokens = self.accumulation * micro_tokens
        self.flops_per_token = flops_per_token(self.config, cfg.data.seq_len)
        self.peak = peak_flops(self.device, t.peak_flops)

        self.metrics = MetricsLog(self.run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        self.step = 0
        self.tokens_seen = 0
        self.recent: deque[float] = deque(maxlen=cfg.stability.spike_window)
        self.spikes_in_a_row = 0
        self.rollbacks = 0
        self.log = log
        self.resumed_from = self._resume()

    def _loader(self, split: str, seed: int):
        c = self.cfg
        if c.data.synthetic:
            return SyntheticLoader(self.config.vocab_size, c.data.seq_len, c.train.micro_batch, seed)
        return PackedLoader(self.manifest, split, c.data.seq_len, c.train.micro_batch, seed,
                            weights=c.data.weights or None)

    # ---- one optimizer step ---------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.dtype == "bfloat16")

    def loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            hidden = self.model.hidden(inputs)
            return linear_cross_entropy(hidden.flatten(0, 1), self.model.head_weight, targets.flatten())

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for _ in range(self.accumulation):
            inputs, targets = (x.to(self.device) for x in self.train_loader.next_batch())
            # normalise by the tokens of the whole accumulated batch, not per micro-batch
            loss = self.loss_sum(inputs, targets) / self.step_tokens
            loss.backward()
            loss_total += loss.item()
        step = self.step + 1
        lr = lr_at(step, self.cfg.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip))
        record: dict[str, Any] = {"step": step, "loss": loss_total, "lr": lr, "grad_norm": grad_norm}
        event = self._judge(loss_total, grad_norm)
        if event is None:
            self.optimizer.step()
            self.recent.append(loss_total)
        else:
            record["skipped"] = event
            self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        self.tokens_seen += self.step_tokens
        seconds = time.perf_counter() - t0
        record.update(tokens=self.tokens_seen, tokens_per_s=self.step_tokens / seconds)
        if self.peak:
            record["mfu"] = self.flops_per_token * record["tokens_per_s"] / self.peak
        return record

    def _judge(self, loss: float, grad_norm: float) -> str | None:
        """None to apply the update, else why it is skipped."""
        s = self.cfg.stability
        if s.skip_nonfinite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "nonfinite"
        if len(self.recent) >= 10 and loss > s.spike_factor * statistics.median(self.recent):
            self.spikes_in_a_row += 1
            return "spike"
        self.spikes_in_a_row = 0
        return None

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same eval_batches batches every time."""
        if self.manifest is None:
            loader = SyntheticLoader(self.config.vocab_size, self.cfg.data.seq_len, self.cfg.train.micro_batch,
                                     seed=self.cfg.train.seed + 1)
        else:
            loader = self._loader("val", self.cfg.train.seed + 1)
        self.model.eval()
        total, count = 0.0, 0
        for _ in range(self.cfg.train.eval_batches):
            inputs, targets = (x.to(self.device) for x in loader.next_batch())
            total += self.loss_sum(inputs, targets).item()
            count += targets.numel()
        return total / count

    # ---- checkpoints --------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "optimizer": self.optimizer.state_dict(),
                 "loader": self.train_loader.state_dict(), "recent": list(self.recent),
                 "spikes_in_a_row": self.spikes_in_a_row, "rollbacks": self.rollbacks,
                 "torch_rng": torch.get_rng_state(), "metrics_offset": self.metrics.offset()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def save(self) -> Path:
        return ckpt.save(self.checkpoints, self.step, self.model, self.config, self.tokenizer,
                         self.trainer_state(), self.cfg.checkpoint.keep)

    def _restore(self, path: Path, with_loader: bool = True) -> dict[str, Any]:
        state = ckpt.load(path, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.recent = deque(state["recent"], maxlen=self.cfg.stability.spike_window)
        self.spikes_in_a_row = state["spikes_in_a_row"]
        if with_loader:
            self.train_loader.load_state_dict(state["loader"])
            self.rollbacks = state["rollbacks"]
            torch.set_rng_state(state["torch_rng"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state

    def _resume(self) -> Path | None:
        found = ckpt.complete(self.checkpoints)
        if not found:
            self.metrics.truncate(0)  # a fresh run: metrics from an earlier attempt without checkpoints go
            return None
        state = self._restore(found[-1])
        self.metrics.truncate(state["metrics_offset"])
        return found[-1]

    def rollback(self) -> bool:
        """Back to the newest checkpoint, keeping the loader where it is (past the bad batches)."""
        found = ckpt.complete(self.checkpoints)
        if not found or self.rollbacks >= self.cfg.stability.max_rollbacks:
            return False
        from_step, skipped = self.step, self.train_loader.state_dict()
        self._restore(found[-1], with_loader=False)
        self.rollbacks += 1
        self.spikes_in_a_row = 0
        self.metrics.write({"event": "rollback", "from_step": from_step, "to_step": self.step,
                            "checkpoint": str(found[-1]), "loader_draw": skipped.get("draw", skipped.get("step"))})
        return True

    def export(self) -> Path:
        """The final model as a camelid checkpoint: run_dir/model."""
        target = self.run_dir / "model"
        with atomic_dir(target, overwrite=True) as tmp:
            write_native(tmp, self.config, self.tokenizer, ckpt.model_state(self.model, self.config).items(),
                         extra={"step": self.step})
        return target

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        c, t = self.cfg, self.cfg.train
        say = (lambda *a: print(*a, file=sys.stderr)) if self.log else (lambda *a: None)
        if self.resumed_from:
            say(f"resuming from {self.resumed_from} (step {self.step})")
        say(f"training {self.config.num_params():,} parameters on {self.device}, {t.dtype}, "
            f"{self.step_tokens:,} tokens per step ({self.accumulation} x {t.micro_batch} x {c.data.seq_len})")
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", disable=not (
            self.log and sys.stderr.isatty()), dynamic_ncols=True)
        last: dict[str, Any] = {}
        val_loss = None
        while self.step < t.max_steps:
            record = self.train_step()
            last = record
            if record.get("skipped"):
                self.metrics.write({"step": record["step"], "event": f"skip_{record['skipped']}",
                                    "loss": record["loss"], "grad_norm": record["grad_norm"]})
                if record["skipped"] == "spike" and self.spikes_in_a_row >= c.stability.spike_patience:
                    if self.rollback():
                        bar.n = self.step
                        continue
            if self.step % t.log_interval == 0 or self.step == t.max_steps or self.step == 1:
                self.metrics.write({k: v for k, v in record.items() if k != "skipped"})
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                val_loss = self.evaluate()
                self.metrics.write({"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
                self.metrics.plot()
            if self.step % c.checkpoint.interval == 0 or self.step == t.max_steps:
                self.save()
        bar.close()
        self.metrics.plot()
        self.metrics.close()
        return {"step": self.step, "loss": last.get("loss"), "val_loss": val_loss}
