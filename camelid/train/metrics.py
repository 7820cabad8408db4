"""Where training numbers go: metrics.jsonl (one JSON object per line), TensorBoard, and a
loss-curve PNG; plus the FLOP count behind MFU."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from camelid.atomic import atomic_path
from camelid.config import ModelConfig

# Dense bf16 peak FLOP/s per device, by name fragment (vendor data sheets; SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
             "4090": 165e12, "3090": 71e12, "V100": 125e12}


# The largest validation loss whose exp is reported as the perplexity (val_ppl). Beyond it the
# run has diverged and the number says nothing more (e^50 is about 5e21), while math.exp would
# overflow past about 709 nats and stop the run over a log line. A guard on a reported number,
# not a setting of the run, hence a constant rather than a config key.
PPL_MAX_LOSS = 50.0


def perplexity(loss: float) -> float:
    """exp(loss), the loss capped at PPL_MAX_LOSS."""
    return math.exp(min(loss, PPL_MAX_LOSS))


def strict_json(record: dict[str, Any]) -> str:
    """One line of strict JSON: a non-finite number (a diverged step's NaN or Inf loss) becomes
    null, since bare NaN and Infinity are not JSON and strict parsers reject the whole file."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """6N + 6 L H D T (torchtitan's count, causal attention): N excludes the embedding table,
    whose lookup costs no FLOPs (the output head is counted)."""
    n = config.num_params() - config.vocab_size * config.dim * (0 if config.tie_embeddings else 1)
    return 6 * n + 6 * config.n_layers * config.n_heads * config.head_dim * seq_len


def peak_flops(device: torch.device, configured: float) -> float:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16.items():
            if key in name:
                return value
    return 0.0


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        """Forget what a killed run logged after its last checkpoint."""
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(offset)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(strict_json(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self) -> Path | None:
        """loss.png: training loss per step and validation loss at each evaluation."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read()
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if not train:
            return None
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        ax.plot(*zip(*train), label="train loss", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.run_dir / "loss.png"
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class NullMetrics(MetricsLog):
    """The log of every rank but the first in a distributed run: nothing is written."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir, tensorboard=False)

    def truncate(self, offset: int) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        pass

    def plot(self) -> Path | None:
        return None
