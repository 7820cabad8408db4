"""Held-out evaluation before and after finetuning, with camelid's evaluation harness: the same
tasks (`camelid eval` names or files, such as the demo's chat multiple-choice questions) on the
base model as loaded for training and on the finetuned result as a user loads it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import camelid
from camelid.atomic import write_text_atomic
from camelid.eval import Settings, evaluate

EVALUATION = "evaluation.json"


def run_tasks(tasks: list[str], limit: int, num_fewshot: int, device: str, **load: Any) -> dict[str, Any]:
    """results[task][metric] of the model `load` describes (camelid.load's arguments)."""
    llm = camelid.load(device=device, compile=False, **load)
    out = evaluate(llm, tasks, Settings(num_fewshot=num_fewshot, limit=limit or None))
    return out["results"]


def saved(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / EVALUATION
    return json.loads(path.read_text()) if path.exists() else {}


def save(run_dir: Path, record: dict[str, Any]) -> None:
    write_text_atomic(Path(run_dir) / EVALUATION, json.dumps(record, indent=2, allow_nan=False) + "\n")


def side_by_side(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The tasks' metrics before and after, one line each (standard errors and counts left out)."""
    width = max([10] + [len(m) for metrics in after.values() for m in metrics if not m.endswith("_stderr")])
    lines = [f"{'held-out evaluation':32s} {'metric':{width}s} {'before':>8s} {'after':>8s}"]
    for task, metrics in after.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or metric == "documents":
                continue
            old = before.get(task, {}).get(metric)
            lines.append(f"{task:32s} {metric:{width}s} {_cell(old)} {_cell(value)}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{value:8.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else f"{'–':>8s}"
