"""Benchmarks: the paper's, and tasks defined by files."""

from __future__ import annotations

from pathlib import Path

from camelid.errors import CamelidError
from camelid.eval.tasks.base import Settings, Task
from camelid.eval.tasks.bias import BIAS_TASKS
from camelid.eval.tasks.generic import task_from_file
from camelid.eval.tasks.paper import PAPER_TASKS
from camelid.eval.tasks.toxicity import TOXICITY_TASKS
from camelid.eval.tasks.truthfulqa import TRUTHFULQA_TASKS
from camelid.eval.tasks.truthfulqa_gen import TruthfulQAGeneration

BUILTIN = {**PAPER_TASKS, **BIAS_TASKS, **TRUTHFULQA_TASKS,   # sections 3 and 5 of the paper
           TruthfulQAGeneration.name: TruthfulQAGeneration, **TOXICITY_TASKS}
ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa", "nq": "naturalquestions",
           "social_iqa": "siqa", "race": "race_high", "gsm": "gsm8k",
           "rtp": "realtoxicityprompts"}


def get_task(name: str, data_dir: str | Path | None = None) -> Task:
    """A built-in benchmark by name, or a task file (multiple-choice / generation JSONL,
    BIG-bench task.json, or text for perplexity)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in BUILTIN and name == Path(name).name:
        # a bare built-in name wins over a same-named entry of the working directory (the data
        # directory itself holds winogender/, boolq/...); ./winogender names that entry
        return BUILTIN[key](data_dir)
    path = Path(name).expanduser()
    if path.exists():
        return task_from_file(path)
    if name.endswith((".jsonl", ".json", ".txt")):
        raise CamelidError(f"task file {name}: no such file")
    raise CamelidError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN)}; or pass a task file")


__all__ = ["PAPER_TASKS", "Settings", "Task", "get_task"]
