"""Running tasks against a model and collecting results, per-sample records and timings."""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from camelid import __version__
from camelid.eval.remote import RemoteScorer
from camelid.eval.report import format_results
from camelid.eval.scoring import Scorer
from camelid.eval.tasks import Settings, Task, get_task
from camelid.generate import LLM

FORMAT_VERSION = 1   # of OUT.json; raised when a key changes meaning

__all__ = ["FORMAT_VERSION", "evaluate", "format_results"]


def evaluate(llm: LLM | RemoteScorer, tasks: list[str | Task], settings: Settings = Settings(),
             data_dir: str | Path | None = None, batch_size: int = 16, progress: bool = False,
             log_samples: bool = False) -> dict[str, Any]:
    """results[task][metric], time per task, and with log_samples the per-document records.
    A task is a name or file (see get_task), or a Task already made from one. The model is an
    LLM in this process, or a server (`RemoteScorer`).

    The output describes itself: `format_version`, `camelid_version`, `date` (UTC, ISO 8601),
    `config` (model, tasks, settings, batch size, dtype, device) and `n-shot[task]`, the few-shot
    examples each task's prompts held (the name lm-evaluation-harness gives it)."""
    # fail on a bad name before any work
    resolved = [t if isinstance(t, Task) else get_task(t, data_dir) for t in tasks]
    if isinstance(llm, RemoteScorer):
        scorer, where = llm, {"dtype": "the server's", "device": "the server's"}
    else:
        scorer = Scorer(llm, batch_size=batch_size, progress=progress)
        where = {"dtype": str(llm.model.tok_embeddings.weight.dtype).replace("torch.", ""), "device": str(llm.device)}
    out: dict[str, Any] = {"results": {}, "n-shot": {}, "seconds": {}, "config": {
        "model": llm.source, "tasks": [_task_label(t) for t in tasks], **asdict(settings), "batch_size": batch_size,
        **where}, "format_version": FORMAT_VERSION, "camelid_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if log_samples:
        out["samples"] = {}
    for task in resolved:
        t0 = time.perf_counter()
        results, records = task.evaluate(scorer, settings)
        out["results"][task.name] = {**results, "documents": len(records)}
        out["n-shot"][task.name] = _shots(task, settings)
        out["seconds"][task.name] = round(time.perf_counter() - t0, 2)
        if log_samples:
            out["samples"][task.name] = records
    out["seconds"]["total"] = round(sum(out["seconds"].values()), 2)
    return out


def _shots(task: Task, settings: Settings) -> int:
    """The few-shot examples in each prompt: the setting (or the task's default), or 0 for a task
    that has no examples to draw (CrowS-Pairs, HumanEval). Called after the task ran, so its
    example pool is already loaded."""
    k = task.default_fewshot if settings.num_fewshot is None else settings.num_fewshot
    return k if k and task.fewshot_docs() else 0


def _task_label(task: str | Task) -> str:
    if isinstance(task, str):
        return task
    path = getattr(task, "path", None)
    return str(path) if isinstance(path, Path) else task.name
