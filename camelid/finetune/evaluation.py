"""Held-out evaluation before and after finetuning, with camelid's evaluation harness: the same
tasks (`camelid eval` names or files, such as the demo's chat multiple-choice questions) on the
base model as loaded for training and on the finetuned result as a user loads it; for tasks
answered by generation, the rule's win rate of the result's answers against the base's."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import camelid
from camelid.atomic import write_text_atomic
from camelid.eval import Settings, evaluate

EVALUATION = "evaluation.json"


def run_tasks(tasks: list[str], limit: int, num_fewshot: int, device: str,
              **load: Any) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """results[task][metric] of the model `load` describes (camelid.load's arguments), and for
    each generation task its answers' grades by the task's rule, in document order: 1 for a
    right answer (exact match), 0 for a wrong one, and 2 for a right answer that the task
    prefers (its documents' "preferred" answers) where it ranks them."""
    llm = camelid.load(device=device, compile=False, **load)
    out = evaluate(llm, tasks, Settings(num_fewshot=num_fewshot, limit=limit or None), log_samples=True)
    outcomes = {task: [r["exact_match"] + r.get("preferred", 0.0) for r in records]
                for task, records in out["samples"].items() if records and "exact_match" in records[0]}
    return out["results"], outcomes


def win_rates(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """{task: win_rate, win_rate_stderr, wins, ties, losses} of the finetuned model's answers against the base
    model's on the same questions, judged by the task's rule (`run_tasks`' grades): a win where
    the finetuned answer is graded higher (right where the base's is wrong, or a preferred
    answer where the base's is right but not preferred), a loss where it is graded lower; the
    win rate counts a tie as half, so 0.5 is no change (the pairwise win rate of Ouyang et al.,
    2022, with a rule as the judge)."""
    out = {}
    for task in after.keys() & before.keys():
        pairs = list(zip(before[task], after[task], strict=True))
        wins = sum(a > b for b, a in pairs)
        losses = sum(a < b for b, a in pairs)
        ties = len(pairs) - wins - losses
        n = len(pairs)
        rate = (wins + ties / 2) / n if n else math.nan
        # the standard error of the mean of the per-question scores (1, 1/2, 0)
        spread = (wins + ties / 4) / n - rate ** 2 if n else math.nan
        out[task] = {"win_rate": rate, "win_rate_stderr": math.sqrt(max(spread, 0.0) / (n - 1)) if n > 1 else None,
                     "wins": wins, "ties": ties, "losses": losses}
    return out


def saved(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / EVALUATION
    return json.loads(path.read_text()) if path.exists() else {}


def save(run_dir: Path, record: dict[str, Any]) -> None:
    write_text_atomic(Path(run_dir) / EVALUATION, json.dumps(record, indent=2, allow_nan=False) + "\n")


_COUNTS = ("documents", "wins", "ties", "losses")


def side_by_side(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The tasks' metrics before and after, one line each (standard errors and counts left out),
    then the win counts behind each win rate."""
    width = max([10] + [len(m) for metrics in after.values() for m in metrics if not m.endswith("_stderr")])
    lines = [f"{'held-out evaluation':32s} {'metric':{width}s} {'before':>8s} {'after':>8s}"]
    for task, metrics in after.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or metric in _COUNTS:
                continue
            old = before.get(task, {}).get(metric)
            lines.append(f"{task:32s} {metric:{width}s} {_cell(old)} {_cell(value)}")
    for task, metrics in after.items():
        if "win_rate" in metrics:
            lines.append(f"{task}: the finetuned model's answers against the base model's, by the task's rule: "
                         f"{metrics['wins']} better, {metrics['ties']} the same, {metrics['losses']} worse "
                         f"(win rate {metrics['win_rate']:.3f}{_plus_minus(metrics['win_rate_stderr'])}, a tie "
                         "counting half)")
    return "\n".join(lines)


def _plus_minus(stderr: float | None) -> str:
    return f" ± {stderr:.3f}" if stderr is not None else ""


def _cell(value: float | None) -> str:
    return f"{value:8.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else f"{'–':>8s}"
