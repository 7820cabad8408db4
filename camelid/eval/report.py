"""Evaluation reports: the results as a Markdown table, and beside the LLaMA paper's published
numbers (arXiv 2302.13971v1, Tables 3-9 and 11-14), as `camelid eval` prints them and writes
them with --markdown.

The paper's numbers live in `paper_results.json` (package data) exactly as printed, each table
with its page, unit and few-shot setting; `paper_results()` reads them and `compare(out)` puts
them beside a run's results, like with like: the same task and metric, the same few-shot k and,
for free-form answers, the same number of samples. Values are shown as fractions, as camelid
reports them (the paper's 76.5% reads 0.765).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from camelid.errors import CamelidError
from camelid.eval.tasks import ALIASES, BUILTIN

SIZES = ("7B", "13B", "33B", "65B")
SCALE = {"percent": 0.01, "fraction": 1.0}     # camelid reports fractions; the paper prints both
COMPARISONS = ("paper",)                       # what --compare accepts
DASH = "–"                                      # no number


# ---- Markdown tables -------------------------------------------------------------------------------

def finite(value: Any) -> Any:
    """JSON has no NaN or Infinity (strict parsers reject Python's spelling): they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def markdown_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """A GitHub-flavoured Markdown table, padded so that it also reads as plain text; columns in
    `right` (numbers) are right-aligned. A "|" inside a cell is escaped."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _number(value: Any, digits: int = 4) -> str:
    """A cell: "–" where there is no number (one document gives no standard error; JSON null)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return DASH


def _metrics(res: dict[str, Any]) -> list[str]:
    return [m for m in res if m != "documents" and not m.endswith("_stderr")]


def results_table(results: dict[str, dict[str, Any]], n_shot: dict[str, int] | None = None) -> str:
    """results[task][metric] (with `<metric>_stderr` and `documents`, as `evaluate` returns them)
    as a Markdown table: task, metric, value, ± stderr, documents and few-shot k ("–" where
    unknown), the task's own columns on its first row only, as lm-evaluation-harness prints."""
    rows = []
    for task, res in results.items():
        for i, metric in enumerate(_metrics(res)):
            stderr = res.get(f"{metric}_stderr", None)
            first = i == 0
            rows.append([task if first else "", metric, _number(res[metric]),
                         f"± {_number(stderr)}" if f"{metric}_stderr" in res else "",
                         str(res.get("documents", DASH)) if first else "",
                         str((n_shot or {}).get(task, DASH)) if first else ""])
    return markdown_table(["task", "metric", "value", "stderr", "documents", "few-shot"], rows, right={2, 3, 4, 5})


def format_results(out: dict[str, Any]) -> str:
    """The table `camelid eval` prints for an `evaluate` output."""
    return results_table(out["results"], out.get("n-shot"))


# ---- the paper's numbers -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PaperResult:
    """One printed row of one of the paper's tables, mapped to a camelid task and metric."""
    label: str                       # the row or column as the paper names it
    task: str                        # camelid's task name
    metric: str                      # camelid's metric name
    table: int
    page: int                        # in the arXiv v1 PDF
    unit: str                        # "percent" or "fraction", as printed
    num_fewshot: int | None          # None: not stated; camelid's default for the task stands for it
    samples: int | None              # generations per document the number assumes (None: any)
    values: dict[str, float]         # size -> the number as printed
    note: str = ""

    def scaled(self, size: str) -> float | None:
        """The number in camelid's unit (a fraction)."""
        value = self.values.get(size)
        return None if value is None else value * SCALE[self.unit]


@cache
def paper_results() -> tuple[PaperResult, ...]:
    """The LLaMA paper's numbers for LLaMA 7B, 13B, 33B and 65B, from the package's data file."""
    data = json.loads(resources.files("camelid.eval").joinpath("paper_results.json").read_text(encoding="utf-8"))
    entries = []
    for table in data["tables"]:
        for row in table["rows"]:
            entries.append(PaperResult(
                label=row["label"], task=row["task"], metric=row["metric"], table=table["table"], page=table["page"],
                unit=row.get("unit", table["unit"]), num_fewshot=row.get("num_fewshot", table.get("num_fewshot")),
                samples=row.get("samples"), values=dict(row["values"]), note=row.get("note", "")))
    return tuple(entries)


# ---- comparison --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComparisonRow:
    """A run's metric beside the paper's number for it (`paper` None where it has none for this
    task, metric and setting; `why` then says what the paper has, if anything)."""
    task: str
    metric: str
    num_fewshot: int | None
    value: float | None
    stderr: float | None
    paper: PaperResult | None = None
    why: str = ""


def _builtin_tasks(out: dict[str, Any]) -> set[str] | None:
    """The canonical names of the run's built-in tasks (a task file named like a benchmark is not
    the benchmark); None for an output that does not list its tasks."""
    labels = out.get("config", {}).get("tasks")
    if labels is None:
        return None
    names = {ALIASES.get(str(label).lower(), str(label).lower()) for label in labels}
    return {name for name in names if name in BUILTIN}


def _fewshot(task: str, out: dict[str, Any]) -> int | None:
    """The k the run used for `task`: its n-shot record, else the setting, else the task's default."""
    if task in out.get("n-shot", {}):
        return out["n-shot"][task]
    k = out.get("config", {}).get("num_fewshot")
    if k is None and task in BUILTIN:
        k = BUILTIN[task].default_fewshot
    return k


def _default_fewshot(task: str) -> int | None:
    return BUILTIN[task].default_fewshot if task in BUILTIN else None


def _matches(entry: PaperResult, k: int | None, samples: int | None) -> bool:
    wanted = entry.num_fewshot if entry.num_fewshot is not None else _default_fewshot(entry.task)
    return (wanted is None or k == wanted) and (entry.samples is None or samples == entry.samples)


def check_comparison(against: str) -> None:
    if against not in COMPARISONS:
        raise CamelidError(f"--compare {against}: unknown; the one comparison is 'paper' (the LLaMA paper's "
                           f"published numbers, arXiv 2302.13971)")


def compare(out: dict[str, Any], against: str = "paper") -> list[ComparisonRow]:
    """One row per task and metric in the run's results, with the paper's number for the same
    task, metric, few-shot k and samples per document, where the paper has one."""
    check_comparison(against)
    builtin = _builtin_tasks(out)
    config = out.get("config", {})
    samples = config.get("samples", 1)
    # the paper asked its base models in plain text: a chat-form or system-prompted run is another protocol
    asked_otherwise = config.get("chat_template") or config.get("system_prompt")
    rows = []
    for task, res in out["results"].items():
        k = _fewshot(task, out)
        known = builtin is None or task in builtin
        for metric in _metrics(res):
            candidates = tuple(e for e in paper_results() if known and e.task == task and e.metric == metric)
            found = None if asked_otherwise else next((e for e in candidates if _matches(e, k, samples)), None)
            if asked_otherwise and candidates:
                why = "paper: plain-text prompts, no chat template or system prompt"
            else:
                why = _other_settings(candidates) if found is None and candidates else ""
            if found is not None and config.get("limit"):
                why = f"this run: the first {config['limit']} documents only"
            rows.append(ComparisonRow(task, metric, k, res[metric], res.get(f"{metric}_stderr"), found, why))
    return rows


def _other_settings(candidates: tuple[PaperResult, ...]) -> str:
    """What the paper measured instead, e.g. "paper: 0/1/5/64-shot, 1 sample"."""
    shots = sorted({e.num_fewshot if e.num_fewshot is not None else _default_fewshot(e.task) for e in candidates},
                   key=lambda k: -1 if k is None else k)
    samples = sorted({e.samples for e in candidates if e.samples is not None})
    text = "paper: " + "/".join(str(k) for k in shots) + "-shot"
    if samples:
        text += ", " + "/".join(map(str, samples)) + " sample" + ("s" if samples != [1] else "")
    return text


def comparison_table(rows: list[ComparisonRow]) -> str:
    """The rows as Markdown: the run's value (± stderr) beside LLaMA 7B/13B/33B/65B and the table
    and page that prints them. Everything in camelid's unit (a fraction: the paper's 76.5% reads
    0.765), so that a row compares at a glance; the task's columns on its first row only."""
    body = []
    for i, row in enumerate(rows):
        first = i == 0 or rows[i - 1].task != row.task
        paper = row.paper
        numbers = [_number(paper.scaled(size) if paper else None, 3) for size in SIZES]
        where = f"Table {paper.table}, p. {paper.page}" + (f"; {row.why}" if row.why else "") if paper else row.why
        shots = str(DASH if row.num_fewshot is None else row.num_fewshot)
        body.append([row.task if first else "", shots if first else "", row.metric, _number(row.value),
                     f"± {_number(row.stderr)}", *numbers, where])
    header = ["task", "few-shot", "metric", "value", "stderr", *(f"LLaMA {s}" for s in SIZES), "paper"]
    return markdown_table(header, body, right={1, 3, 4, 5, 6, 7, 8})


COMPARISON_HEADING = ("Compared with the LLaMA paper (Touvron et al., 2023, arXiv 2302.13971v1) as fractions "
                      "(the paper's 76.5% reads 0.765); – where it has no number for this task, metric and setting.")


def markdown_report(out: dict[str, Any], comparison: list[ComparisonRow] | None = None) -> str:
    """The whole report for --markdown: what ran, the results table, and the comparison if any."""
    config = out.get("config", {})
    settings = ", ".join(f"{key} {config[key]}" for key in ("num_fewshot", "limit", "samples", "temperature", "seed",
                                                             "chat_template", "system_prompt", "chat_format")
                         if config.get(key) not in (None, False))
    lines = [f"# camelid eval: {config.get('model', '?')}", "",
             f"- date: {out.get('date', DASH)}; camelid {out.get('camelid_version', DASH)}",
             f"- tasks: {', '.join(map(str, config.get('tasks', out['results'])))}",
             f"- settings: {settings or DASH}; dtype {config.get('dtype', DASH)}, device {config.get('device', DASH)}",
             "", "## Results", "", format_results(out), ""]
    if comparison is not None:
        lines += ["## Compared with the LLaMA paper", "", COMPARISON_HEADING, "", comparison_table(comparison), ""]
    return "\n".join(lines)


__all__ = ["COMPARISONS", "ComparisonRow", "PaperResult", "check_comparison", "compare", "comparison_table",
           "format_results", "markdown_report", "markdown_table", "paper_results", "results_table"]
