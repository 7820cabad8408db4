"""Running tasks against a model and collecting results, per-sample records and timings."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from camelid.eval.remote import RemoteScorer
from camelid.eval.scoring import Scorer
from camelid.eval.tasks import Settings, Task, get_task
from camelid.generate import LLM


def evaluate(llm: LLM | RemoteScorer, tasks: list[str | Task], settings: Settings = Settings(),
             data_dir: str | Path | None = None, batch_size: int = 16, progress: bool = False,
             log_samples: bool = False) -> dict[str, Any]:
    """results[task][metric], time per task, and with log_samples the per-document records.
    A task is a name or file (see get_task), or a Task already made from one. The model is an
    LLM in this process, or a server (`RemoteScorer`)."""
    # fail on a bad name before any work
    resolved = [t if isinstance(t, Task) else get_task(t, data_dir) for t in tasks]
    if isinstance(llm, RemoteScorer):
        scorer, where = llm, {"dtype": "the server's", "device": "the server's"}
    else:
        scorer = Scorer(llm, batch_size=batch_size, progress=progress)
        where = {"dtype": str(llm.model.tok_embeddings.weight.dtype).replace("torch.", ""), "device": str(llm.device)}
    out: dict[str, Any] = {"results": {}, "seconds": {}, "config": {
        "model": llm.source, "tasks": [_task_label(t) for t in tasks], **asdict(settings), "batch_size": batch_size,
        **where}}
    if log_samples:
        out["samples"] = {}
    for task in resolved:
        t0 = time.perf_counter()
        results, records = task.evaluate(scorer, settings)
        out["results"][task.name] = {**results, "documents": len(records)}
        out["seconds"][task.name] = round(time.perf_counter() - t0, 2)
        if log_samples:
            out["samples"][task.name] = records
    out["seconds"]["total"] = round(sum(out["seconds"].values()), 2)
    return out


def _task_label(task: str | Task) -> str:
    if isinstance(task, str):
        return task
    path = getattr(task, "path", None)
    return str(path) if isinstance(path, Path) else task.name


def _number(value: float | None) -> str:
    """A table cell: "–" where there is no number (one document has no standard error)."""
    return f"{value:8.4f}" if value is not None and math.isfinite(value) else f"{'–':>8s}"


def format_results(out: dict[str, Any]) -> str:
    lines = [f"{'task':24s} {'metric':16s} {'value':>8s} {'stderr':>8s} {'docs':>6s} {'seconds':>8s}"]
    for task, res in out["results"].items():
        first = True
        for metric, value in res.items():
            if metric.endswith("_stderr") or metric == "documents":
                continue
            err = _number(res[f"{metric}_stderr"]) if f"{metric}_stderr" in res else ""
            lines.append(f"{task if first else '':24s} {metric:16s} {_number(value)} {err:>8s} "
                         f"{res['documents'] if first else '':>6} {out['seconds'][task] if first else '':>8}")
            first = False
    return "\n".join(lines)
