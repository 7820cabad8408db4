"""The training loop: gradient accumulation to a target batch in tokens, bf16 autocast, gradient
clipping, the paper's schedule, periodic validation, atomic checkpoints with exact resume, and a
stability guard (non-finite steps are skipped; repeated loss spikes roll back to the last
checkpoint and move on past the offending batches).

Under torchrun the same loop runs on every rank over a parallelized model (camelid.distributed):
the data-parallel ranks share each step's batch, which is the batch one process would take, so
the loss curve does not depend on the layout; every rank takes the same decisions (skip, roll
back) from all-reduced numbers; rank 0 alone logs. The loop asks the runtime (one process or
torchrun's) for sums, clipping and broadcasts alike; what differs for real is decided once each:
how the model is placed (`place_whole` / `place_parallel`) and which kind of checkpoint holds
the run's state (camelid.train.run_state)."""

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

from camelid.atomic import atomic_dir, check_destination
from camelid.checkpoint import Checkpoint, write_checkpoint
from camelid.checkpoint.native import write_native
from camelid.config import ModelConfig
from camelid.data import Manifest, PackedLoader, SyntheticLoader
from camelid.data.recipe import check_mixture
from camelid.distributed import ParallelConfig, apply_activation_checkpointing, init_weights, parallelize
from camelid.distributed.parallelize import gather
from camelid.distributed.runtime import Runtime, setup
from camelid.errors import CamelidError
from camelid.model import Transformer
from camelid.model.inductor import use_inductor_layers
from camelid.platform import keep_freed_memory, native_bf16
from camelid.tokenizer import Tokenizer, load_tokenizer
from camelid.train import run_state
from camelid.train.config import LEAVE_OUT, TrainConfig
from camelid.train.loss import linear_cross_entropy
from camelid.train.metrics import MetricsLog, NullMetrics, flops_per_token, peak_flops, perplexity
from camelid.train.optim import build_optimizer, lr_at


EXPORT_NAMES = {"hf": "model-hf", "gguf": "model.gguf", "meta": "model-meta"}


def check_device(name: str) -> None:
    """train.device names a device this machine has ("auto" always does), so that a run meant
    for a GPU stops here, with a line, rather than deep inside the model's placement."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CamelidError(f"train.device {name!r}: not a device name (auto, cpu, cuda, cuda:N)") from None
    fix = "set --train.device=cpu (or auto)"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise CamelidError(f"train.device {name!r}: CUDA is not available on this machine; {fix}")
        if device.index is not None and device.index >= count:
            raise CamelidError(f"train.device {name!r}: this machine has {count} CUDA device(s), "
                               f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CamelidError(f"train.device {name!r}: MPS is not available on this machine; {fix}")
    elif device.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(0, device=device)
        except RuntimeError as e:
            raise CamelidError(f"train.device {name!r}: cannot use it here ({str(e).splitlines()[0]}); {fix}") from None


def start_runtime(cfg: TrainConfig) -> Runtime:
    """This process's runtime (one process, or torchrun's), with the CPU threads and allocator
    set, and train.dtype "auto" settled for its device."""
    check_device(cfg.train.device)
    keep_freed_memory()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    p = cfg.parallel
    runtime = setup(p.dp_replicate, p.dp_shard, p.tp, cfg.train.device)
    if cfg.train.dtype == "auto":
        cfg.train.dtype = "bfloat16" if native_bf16(runtime.device.type) else "float32"
    return runtime


def load_data_source(cfg: TrainConfig) -> tuple[Manifest | None, Tokenizer | None]:
    """The prepared data's manifest and tokenizer; neither for synthetic tokens."""
    if cfg.data.synthetic:
        return None, None
    manifest = Manifest.load(cfg.data.path)
    check_mixture(cfg.data.weights, lambda name: f"data.weights.{name}", LEAVE_OUT, known=list(manifest.sources),
                  known_in=f"the data in {cfg.data.path}")
    return manifest, load_tokenizer(manifest.directory / manifest.tokenizer)


def model_config(cfg: TrainConfig, manifest: Manifest | None) -> ModelConfig:
    """The model's shape; the vocabulary defaults to the data's and must hold it."""
    config = cfg.model.build(manifest.vocab_size if manifest else None)
    if manifest and config.vocab_size < manifest.vocab_size:
        raise CamelidError(f"model.vocab_size {config.vocab_size} is smaller than the data's {manifest.vocab_size}")
    return config


def build_model(cfg: TrainConfig, config: ModelConfig, runtime: Runtime) -> Transformer:
    """The model built on the meta device, then placed on this process's device: whole, or
    parallelized over the runtime's mesh."""
    with torch.device("meta"):
        model = Transformer(config)
    place = place_parallel if runtime.distributed else place_whole
    place(model, cfg, runtime)
    return model


def place_whole(model: Transformer, cfg: TrainConfig, runtime: Runtime) -> None:
    """One process: materialise and initialise the whole model, then wrap its blocks."""
    t = cfg.train
    model.to_empty(device=runtime.device)
    model.init_weights(seed=t.seed, std=cfg.model.init_std)
    apply_activation_checkpointing(model, t.activation_checkpointing)
    if t.compile:  # block by block, as torchtitan does: one graph, compiled once, reused per layer
        use_inductor_layers(model)
        for i, block in enumerate(model.layers):
            model.layers[i] = torch.compile(block)


def place_parallel(model: Transformer, cfg: TrainConfig, runtime: Runtime) -> None:
    """torchrun: parallelize on the meta device, then each rank materialises its shards only
    (with the weights `place_whole` would give)."""
    t = cfg.train
    if cfg.data.seq_len % runtime.tp:
        raise CamelidError(f"data.seq_len {cfg.data.seq_len} is not a multiple of parallel.tp {runtime.tp} "
                           "(sequence parallelism splits every sequence over the tp ranks)")
    parallelize(model, runtime.mesh, ParallelConfig(t.activation_checkpointing, t.compile,
                                                    bf16=t.dtype == "bfloat16", async_tp=cfg.parallel.async_tp))
    model.to_empty(device=runtime.device)
    init_weights(model, seed=t.seed, std=cfg.model.init_std)


class Trainer:
    def __init__(self, cfg: TrainConfig, log: bool = True):
        self.cfg = cfg
        self.log = log
        self.run_dir = check_destination(cfg.run.dir, "run.dir", directory=True)
        self.runtime = start_runtime(cfg)
        self.checkpoints = self.run_dir / "checkpoints"
        torch.manual_seed(cfg.train.seed)
        self._build_data()
        self._check_resume()
        self.run_dir.mkdir(parents=True, exist_ok=True)  # only once the settings have passed
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.train)
        self._build_metrics()
        self._start_progress()
        self.resumed_from = self._resume()

    # ---- where this process stands (the runtime's answers) ---------------------------------------
    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def main(self) -> bool:
        return self.runtime.main

    @property
    def dp_rank(self) -> int:
        return self.runtime.dp_rank

    @property
    def dp_size(self) -> int:
        return self.runtime.dp_size

    # ---- builders --------------------------------------------------------------------------------
    def _build_data(self) -> None:
        """The data source and tokenizer, the model's shape, the training loader and this rank's
        forward/backward passes per optimizer step."""
        c = self.cfg
        self.manifest, self.tokenizer = load_data_source(c)
        self.config = model_config(c, self.manifest)
        self.train_loader = self._loader("train", c.train.seed)
        rows = self._global_rows()
        self.micro_rows = self._micro_batches(rows, c.train.micro_batch)
        self.accumulation = len(self.micro_rows)
        self.step_tokens = rows * c.data.seq_len

    def _build_model(self) -> torch.nn.Module:
        return build_model(self.cfg, self.config, self.runtime)

    def _build_metrics(self) -> None:
        """The metrics log (rank 0's; the other ranks write nothing) and the numbers behind MFU."""
        self.flops_per_token = flops_per_token(self.config, self.cfg.data.seq_len)
        self.peak = peak_flops(self.device, self.cfg.train.peak_flops)
        self.metrics = MetricsLog(self.run_dir) if self.main else NullMetrics(self.run_dir)

    def _check_resume(self) -> None:
        """A run directory with checkpoints is resumed: refuse, before the model is built, to
        resume one whose model has another shape (its weights would not fit) or that is already
        past train.max_steps (nothing would happen)."""
        found = self._checkpoints()
        if not found:
            return
        newest = found[-1]
        saved = run_state.saved_config(newest)
        if saved is not None and saved != self.config:
            changed = [f"model.{k} {saved.to_dict()[k]} -> {v}" for k, v in self.config.to_dict().items()
                       if saved.to_dict()[k] != v]
            raise CamelidError(f"run.dir {self.run_dir}: its checkpoint {newest.name} holds another model "
                               f"({', '.join(changed)}); to train this one, choose another run.dir, or drop the "
                               "changes to resume")
        step = run_state.step_of(newest)
        if step > self.cfg.train.max_steps:
            raise CamelidError(f"run.dir {self.run_dir}: its newest checkpoint is at step {step}, past "
                               f"train.max_steps {self.cfg.train.max_steps}; raise train.max_steps to train on, "
                               "or choose another run.dir to start afresh")

    def _start_progress(self) -> None:
        """Step 0: nothing seen yet, the stability guard without history."""
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite = 0      # steps skipped for a non-finite loss or gradient, over the whole run
        self.recent: deque[float] = deque(maxlen=self.cfg.stability.spike_window)
        self.spikes_in_a_row = 0
        self.rollbacks = 0

    def _loader(self, split: str, seed: int):
        c = self.cfg
        if c.data.synthetic:
            return SyntheticLoader(self.config.vocab_size, c.data.seq_len, c.train.micro_batch, seed,
                                   rank=self.dp_rank, world_size=self.dp_size)
        return PackedLoader(self.manifest, split, c.data.seq_len, c.train.micro_batch, seed,
                            rank=self.dp_rank, world_size=self.dp_size, weights=c.data.weights or None)

    def _global_rows(self) -> int:
        """Sequences per optimizer step over all data-parallel ranks: what one process takes,
        micro_batch x the accumulation that reaches train.batch_tokens."""
        t = self.cfg.train
        micro_tokens = t.micro_batch * self.cfg.data.seq_len
        return t.micro_batch * (max(1, math.ceil(t.batch_tokens / micro_tokens)) if t.batch_tokens else 1)

    def _micro_batches(self, rows: int, size: int) -> list[int]:
        """This rank's share of `rows` sequences, in forward/backward passes of at most `size`."""
        if rows % self.dp_size:
            raise CamelidError(
                f"a step's {rows} sequences (train.micro_batch x accumulation to train.batch_tokens) cannot be "
                f"split evenly over {self.dp_size} data-parallel ranks (parallel.dp_replicate x parallel.dp_shard); "
                f"make train.micro_batch or train.batch_tokens / data.seq_len a multiple of {self.dp_size}")
        share = rows // self.dp_size
        return [size] * (share // size) + ([share % size] if share % size else [])

    def _dp_sum(self, values: list[torch.Tensor] | list[int]) -> float:
        """The sum over micro-batches and data-parallel ranks, the same on every rank."""
        total = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values]).sum()
        return float(self.runtime.dp_sum(total))

    # ---- one optimizer step ---------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.dtype == "bfloat16")

    def loss_sum(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The summed loss of one micro-batch (inputs, targets) as the loader gives it."""
        inputs, targets = (x.to(self.device) for x in batch)
        with self._autocast():
            # Under TP the final hidden states come split over the sequence and the head over
            # the vocabulary: every tp rank gathers both and computes the same whole loss, so the
            # gradients flowing back are equal on all of them and each keeps its own part.
            hidden = gather(self.model.hidden(inputs))
            return linear_cross_entropy(hidden.flatten(0, 1), gather(self.model.head_weight), targets.flatten())

    def targets_in(self, batch: Any) -> int:
        """The tokens of a micro-batch that carry a loss."""
        return batch[1].numel()

    def step_counts(self, batches: list[Any]) -> tuple[float, int]:
        """(loss tokens, tokens read) of one optimizer step over all ranks: fixed windows here,
        so both are the step's size and need no communication."""
        return self.step_tokens, self.step_tokens

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        batches = [self.train_loader.next_batch(rows) for rows in self.micro_rows]
        targets, step_tokens = self.step_counts(batches)
        for batch in batches:
            # normalise by the loss tokens of the whole accumulated batch (all ranks), not per
            # micro-batch; FSDP averages gradients over the data-parallel ranks, hence the factor
            # that makes it a sum
            loss = self.loss_sum(batch) / targets
            (loss * self.dp_size if self.dp_size > 1 else loss).backward()
            losses.append(loss.detach())
        loss_total = self._dp_sum(losses)
        step = self.step + 1
        lr = lr_at(step, self.cfg.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = self.runtime.clip_grad_norm(self.model.parameters(), self.cfg.train.grad_clip)
        record: dict[str, Any] = {"step": step, "loss": loss_total, "lr": lr, "grad_norm": grad_norm,
                                  **self.step_metrics()}
        event = self._judge(loss_total, grad_norm)
        if event is None:
            self.optimizer.step()
            self.recent.append(loss_total)
        else:
            record["skipped"] = event
            self.nonfinite += event == "nonfinite"
            self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        self.tokens_seen += step_tokens
        seconds = time.perf_counter() - t0
        record.update(tokens=self.tokens_seen, tokens_per_s=step_tokens / seconds)
        if self.peak:
            record["mfu"] = self.flops_per_token * record["tokens_per_s"] / (self.peak * self.runtime.world)
        return record

    def step_metrics(self) -> dict[str, float]:
        """Figures of the step just computed beside its loss (none here): a subclass whose
        loss_sum tallies more (preference accuracy, reward margins) reports and resets them."""
        return {}

    def _judge(self, loss: float, grad_norm: float) -> str | None:
        """None to apply the update, else why it is skipped."""
        s = self.cfg.stability
        if s.skip_nonfinite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "nonfinite"
        if len(self.recent) >= s.spike_warmup and loss > s.spike_factor * statistics.median(self.recent):
            self.spikes_in_a_row += 1
            return "spike"
        self.spikes_in_a_row = 0
        return None

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same eval_batches batches every time (split over the
        data-parallel ranks)."""
        t = self.cfg.train
        loader = self._loader("val", t.seed + 1)
        self.model.eval()
        total, count = [], []
        rows = t.eval_batches * t.micro_batch
        rows += (-rows) % self.dp_size  # every rank must run as many passes (FSDP's collectives)
        for n in self._micro_batches(rows, t.micro_batch):
            batch = loader.next_batch(n)
            total.append(self.loss_sum(batch))
            count.append(self.targets_in(batch))
        return self._dp_sum(total) / self._dp_sum(count)

    def validation_metrics(self, val_loss: float) -> dict[str, float]:
        """metrics.jsonl's validation record for the loss `evaluate` returned."""
        return {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}

    # ---- checkpoints --------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        """Everything but the weights and the optimizer state (run_state stores those as the
        checkpoint's kind wants); equal on every rank, so rank 0's is saved."""
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "loader": self.train_loader.state_dict(), "recent": list(self.recent),
                "spikes_in_a_row": self.spikes_in_a_row, "rollbacks": self.rollbacks, "nonfinite": self.nonfinite,
                "model_config": self.config.to_dict(), "metrics_offset": self.metrics.offset(),
                **run_state.rng_state()}

    def save(self) -> Path:
        return run_state.save(self.runtime, self.checkpoints, self.step, self.model, self.optimizer, self.config,
                              self.tokenizer, self.trainer_state(), self.cfg.checkpoint.keep)

    def _load_state(self, path: Path) -> dict[str, Any]:
        """Weights and optimizer state from checkpoint `path`; returns the trainer state."""
        return run_state.restore(self.runtime, path, self.model, self.optimizer)

    def _checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first, as rank 0 sees them."""
        return self.runtime.broadcast(run_state.complete(self.checkpoints))

    def _restore(self, path: Path, with_loader: bool = True) -> dict[str, Any]:
        state = self._load_state(path)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.recent = deque(state["recent"], maxlen=self.cfg.stability.spike_window)
        self.spikes_in_a_row = state["spikes_in_a_row"]
        self.nonfinite = state.get("nonfinite", 0)  # checkpoints from before the count had none
        if with_loader:
            self.train_loader.load_state_dict(state["loader"])
            self.rollbacks = state["rollbacks"]
            run_state.restore_rng(self.runtime, state)
        return state

    def _resume(self) -> Path | None:
        found = self._checkpoints()
        if not found:
            self.metrics.truncate(0)  # a fresh run: metrics from an earlier attempt without checkpoints go
            return None
        state = self._restore(found[-1])
        self.metrics.truncate(state["metrics_offset"])
        return found[-1]

    def rollback(self) -> bool:
        """Back to the newest checkpoint, keeping the loader where it is (past the bad batches)."""
        found = self._checkpoints()
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
        """The final model as a camelid checkpoint, run_dir/model, and in the formats of
        checkpoint.export beside it (model-hf/, model.gguf, model-meta/). A distributed run
        gathers the whole weights on rank 0, which writes them; every rank must call this."""
        target = self.run_dir / "model"
        weights = run_state.whole_weights(self.runtime, self.model, self.config)
        if self.main:
            with atomic_dir(target, overwrite=True) as tmp:
                write_native(tmp, self.config, self.tokenizer, weights.items(), extra={"step": self.step})
            whole = Checkpoint(path=target, format="camelid", config=self.config, tokenizer=self.tokenizer,
                               names=list(weights), read=weights.__getitem__)
            for fmt in self.cfg.checkpoint.export:
                write_checkpoint(whole, self.run_dir / EXPORT_NAMES[fmt], fmt, overwrite=True)
        self.runtime.barrier()
        return target

    def close(self) -> None:
        """Leave the process group (a distributed run); the trainer is unusable afterwards."""
        self.runtime.close()

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        c, t = self.cfg, self.cfg.train
        say = (lambda *a: tqdm.write(" ".join(a), file=sys.stderr)) if self.log and self.main else (lambda *a: None)
        if self.resumed_from:
            say(f"resuming from {self.resumed_from} (step {self.step})")
        layout = self.runtime.describe()
        ranks = f"{self.dp_size} data-parallel ranks x " if self.dp_size > 1 else ""
        say(f"training {self.config.num_params():,} parameters on {self.device}{' x ' + layout if layout else ''}, "
            f"{t.dtype}, {self.step_tokens:,} tokens per step ({ranks}{self.accumulation} x {self.micro_rows[0]} x "
            f"{c.data.seq_len})")
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", disable=not (
            self.log and self.main and sys.stderr.isatty()), dynamic_ncols=True)
        last: dict[str, Any] = {}
        val_loss = None
        while self.step < t.max_steps:
            record = self.train_step()
            last = record
            if record.get("skipped"):
                self.metrics.write({"step": record["step"], "event": f"skip_{record['skipped']}",
                                    "loss": record["loss"], "grad_norm": record["grad_norm"]})
                if record["skipped"] == "nonfinite" and self.nonfinite == 1:
                    say(f"step {self.step}: the loss or a gradient is not finite; the step is skipped "
                        "(each skip is in metrics.jsonl)")
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
                self.metrics.write({"step": self.step, **self.validation_metrics(val_loss)})
                self.metrics.plot()
            if self.step % c.checkpoint.interval == 0 or self.step == t.max_steps:
                self.save()
        bar.close()
        if val_loss is None:  # resumed at train.max_steps: nothing trained, but the result still has a validation
            val_loss = self.evaluate()
        self.metrics.plot()
        self.metrics.close()
        self.check_diverged()
        return {"step": self.step, "loss": last.get("loss"), "val_loss": val_loss, "nonfinite": self.nonfinite}

    def check_diverged(self) -> None:
        """A run most of whose steps were skipped as non-finite has not trained: it ends in a
        failure, not in "done" (its checkpoints and metrics stay, to look at)."""
        if self.nonfinite * 2 > self.step:
            t = self.cfg.train
            raise CamelidError(f"run.dir {self.run_dir}: the run diverged: {self.nonfinite} of {self.step} steps were "
                               f"skipped for a non-finite loss or gradient (see metrics.jsonl); lower train.lr "
                               f"({t.lr:g}) or raise train.warmup_steps ({t.warmup_steps}), in a new run.dir")
