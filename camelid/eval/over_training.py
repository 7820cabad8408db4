"""Performance over training, the paper's Figure 2: every complete checkpoint of a training run
evaluated in step order, then a table (step, training tokens, each task's main metric ±
standard error) and one plot panel per task of that metric against training tokens.

A run directory is what `camelid train` writes (camelid.train.run_state): checkpoints/step_NNNNNNNN/,
each built under a temporary name and renamed once complete, with the tokens seen so far in its
trainer.pt. Results are cached per checkpoint in RUN_DIR/eval/step_NNNNNNNN.json, one entry per
(task, settings, model options, checkpoint fingerprint), so a rerun evaluates only what is new: a
checkpoint saved since, a task added, a setting changed."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from camelid.atomic import atomic_path, write_text_atomic
from camelid.checkpoint.native import CONFIG as NATIVE_CONFIG
from camelid.errors import CamelidError
from camelid.eval.report import DASH, finite, markdown_table
from camelid.eval.runner import _task_label, evaluate
from camelid.eval.tasks import Settings, Task
from camelid.eval.tasks.base import MultipleChoiceTask
from camelid.train.run_state import PATTERN, TRAINER, step_of

CHECKPOINTS = "checkpoints"
CACHE = "eval"                      # RUN_DIR/eval/step_NNNNNNNN.json
MODEL_FILES = ("camelid.json", "config.json", "params.json")   # a model directory, not a run
# a task's headline number, as the paper reports it (section 3): calibrated accuracy for OpenBookQA
# and BoolQ, accuracy normalised by the choice's length for the other multiple-choice tasks
MAIN_METRICS = ("acc_calibrated", "acc_norm", "acc", "exact_match", "pass@1", "stereotype", "bits_per_byte")


@dataclass
class RunCheckpoint:
    path: Path
    step: int
    tokens: int | None              # training tokens seen when it was saved (None: not recorded)


def is_training_run(path: str | os.PathLike[str]) -> bool:
    """A run directory of `camelid train` (its checkpoints/ or metrics.jsonl), or its
    checkpoints/ directory, rather than one model."""
    path = Path(path).expanduser()
    if not path.is_dir() or any((path / name).exists() for name in MODEL_FILES):
        return False
    if (path / CHECKPOINTS).is_dir() or (path / "metrics.jsonl").is_file() or path.name == CHECKPOINTS:
        return True
    return any(PATTERN.match(p.name) for p in path.iterdir())


def find_checkpoints(path: str | os.PathLike[str]) -> tuple[Path, list[RunCheckpoint], list[str]]:
    """(the run directory, its complete whole-model checkpoints oldest first, a note for each
    entry skipped). `path` is the run directory or its checkpoints/."""
    path = Path(path).expanduser()
    if (path / CHECKPOINTS).is_dir():
        run_dir, directory = path, path / CHECKPOINTS
    elif path.name == CHECKPOINTS or any(PATTERN.match(p.name) for p in path.iterdir()):
        run_dir, directory = path.parent, path
    else:
        raise CamelidError(f"--model {path}: a training run without a {CHECKPOINTS}/ directory (nothing saved yet); "
                           "evaluate once checkpoint.interval steps have run, or pass a model directory or file")
    found, notes = [], []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if not entry.is_dir():
            continue
        if not PATTERN.match(entry.name):
            # atomic_dir's .step_N.XXXX.tmp (a save killed mid-write) and .step_N.old-PID
            if ".step_" in entry.name:
                notes.append(f"skipped {entry}: an incomplete checkpoint (a save interrupted mid-write)")
            continue
        if not (entry / TRAINER).exists():
            notes.append(f"skipped {entry}: an incomplete checkpoint (no {TRAINER}; the trainer ignores it too)")
        elif not (entry / NATIVE_CONFIG).exists():
            notes.append(f"skipped {entry}: not a whole model (a distributed run's shards or an adapter); "
                         "camelid eval reads whole-model checkpoints")
        else:
            found.append(RunCheckpoint(entry, step_of(entry), _tokens_seen(entry)))
    if not found:
        raise CamelidError(f"--model {directory}: no complete checkpoints (step_NNNNNNNN/ directories holding "
                           f"{NATIVE_CONFIG} and {TRAINER}); train until checkpoint.interval steps have run")
    return run_dir, sorted(found, key=lambda c: c.step), notes


def _tokens_seen(checkpoint: Path) -> int | None:
    """The trainer's count of tokens read, from trainer.pt (mapped, so the optimizer's state
    beside it is not read)."""
    try:
        state = torch.load(checkpoint / TRAINER, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CamelidError(f"{checkpoint / TRAINER}: cannot read ({e}); delete the checkpoint or rerun training") \
            from None
    tokens = state.get("tokens_seen") if isinstance(state, dict) else None
    return int(tokens) if tokens is not None else None


# ---- the cache ---------------------------------------------------------------------------------

def _files_fingerprint(path: Path) -> list:
    """Names, sizes and modification times: a rewritten checkpoint or task file is a new one,
    without reading gigabytes of weights."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def _task_fingerprint(task: Task, data_dir: str | Path | None) -> Any:
    """A task file's bytes; a built-in benchmark's name and where its files come from."""
    path = getattr(task, "path", None)
    if isinstance(path, Path) and path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if isinstance(path, Path) and path.exists():
        return _files_fingerprint(path)
    folder = getattr(task, "folder", "")
    files = Path(data_dir).expanduser() / folder if data_dir and folder else None
    return {"builtin": task.name, "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir else None,
            "files": _files_fingerprint(files) if files is not None and files.exists() else None}


def cache_key(task: Task, checkpoint: RunCheckpoint, settings: Settings, model_options: dict[str, Any],
              data_dir: str | Path | None) -> str:
    import camelid

    # an adapter or a judge rewritten in place changes the results as much as the checkpoint does
    used = [Path(p).expanduser() for p in (model_options.get("adapter"), settings.judges.truth, settings.judges.info,
                                           settings.judges.toxicity) if p]
    described = {"task": _task_label(task), "task_data": _task_fingerprint(task, data_dir),
                 "settings": asdict(settings), "model": model_options,
                 "weights": [_files_fingerprint(p) for p in used if p.exists()],
                 "checkpoint": _files_fingerprint(checkpoint.path), "camelid": camelid.__version__}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _read_cache(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text()).get("entries", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}                  # a damaged cache is only a miss: the checkpoint is evaluated again
    return entries if isinstance(entries, dict) else {}


# ---- the loop ----------------------------------------------------------------------------------

def evaluate_over_training(path: str | os.PathLike[str], tasks: list[Task], load: Callable[[Path], Any],
                           settings: Settings = Settings(), model_options: dict[str, Any] | None = None,
                           data_dir: str | Path | None = None, batch_size: int = 16, log_samples: bool = False,
                           say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Every complete checkpoint of the run at `path` (the run directory or its checkpoints/),
    oldest first: results from the cache where it has them, else from `load(checkpoint)` and
    `evaluate`. Returns {"run", "config", "chance", "checkpoints": [{"step", "tokens", "path",
    "results", "seconds", "cached"}], "skipped", "results"} where "results" is the newest
    checkpoint's, as one model's OUT.json has it, and "chance" each multiple-choice task's
    accuracy by guessing."""
    run_dir, checkpoints, notes = find_checkpoints(path)
    model_options = model_options or {}
    for note in notes:
        say(note)
    rows, floors = [], {}
    for number, ckpt in enumerate(checkpoints, 1):
        keys = {task.name: cache_key(task, ckpt, settings, model_options, data_dir) for task in tasks}
        entries, fresh = _entries(run_dir / CACHE / f"{ckpt.path.name}.json", ckpt, tasks, keys, load, settings,
                                  data_dir, batch_size, log_samples)
        mine = {t.name: entries[keys[t.name]] for t in tasks}
        row = {"step": ckpt.step, "tokens": ckpt.tokens, "path": str(ckpt.path),
               "results": {name: e["results"] for name, e in mine.items()},
               "seconds": {name: e["seconds"] for name, e in mine.items()},
               "cached": [name for name in mine if name not in fresh]}
        if log_samples:
            row["samples"] = {name: e["samples"] for name, e in mine.items()}
        floors = {name: e["chance"] for name, e in mine.items() if e.get("chance") is not None}
        rows.append(row)
        say(f"[{number}/{len(checkpoints)}] step {ckpt.step} ({_tokens(ckpt.tokens)} tokens): "
            + ", ".join(f"{name} {_cell(res)}" for name, res in row["results"].items())
            + (" (cached)" if not fresh else f" ({sum(row['seconds'].values()):.1f}s)"))
    return {"run": str(run_dir), "config": {"tasks": [_task_label(t) for t in tasks], **asdict(settings),
                                            **model_options},
            "chance": floors, "checkpoints": rows, "skipped": notes, "results": rows[-1]["results"]}


def _entries(cache_file: Path, ckpt: RunCheckpoint, tasks: list[Task], keys: dict[str, str], load: Callable,
             settings: Settings, data_dir, batch_size: int, log_samples: bool) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint's cache entries with every task's present (the missing ones evaluated and
    the cache rewritten), and the names of the tasks evaluated now."""
    entries = _read_cache(cache_file)
    missing = [t for t in tasks if keys[t.name] not in entries
               or (log_samples and "samples" not in entries[keys[t.name]])]
    if not missing:
        return entries, []
    llm = load(ckpt.path)
    out = evaluate(llm, missing, settings, data_dir=data_dir, batch_size=batch_size, log_samples=log_samples)
    del llm
    out = finite(out)   # NaN or infinity (a diverged checkpoint's perplexity) is null, in the cache and the output
    for task in missing:
        entries[keys[task.name]] = {"task": _task_label(task), "results": out["results"][task.name],
                                    "seconds": out["seconds"][task.name], "chance": chance(task, settings),
                                    **({"samples": out["samples"][task.name]} if log_samples else {})}
    write_text_atomic(cache_file, json.dumps({"step": ckpt.step, "entries": entries}, allow_nan=False) + "\n")
    return entries, [t.name for t in missing]


def chance(task: Task, settings: Settings) -> float | None:
    """A multiple-choice task's accuracy by guessing (the mean of 1 / choices), the floor that
    the plot draws; None for other tasks."""
    if not isinstance(task, MultipleChoiceTask):
        return None
    docs = task.selected(settings)
    return sum(1 / len(task.choices(d)) for d in docs) / len(docs) if docs else None


# ---- the table and the plot ----------------------------------------------------------------------

def main_metric(results: dict[str, Any]) -> str:
    """The metric a task's column and panel show (MAIN_METRICS' first present, else its first)."""
    present = [m for m in results if not m.endswith("_stderr") and m != "documents"]
    for metric in MAIN_METRICS:
        if metric in present:
            return metric
    if not present:
        raise CamelidError("a task reported no metric")
    return present[0]


def _tokens(tokens: int | None) -> str:
    return f"{tokens:,}" if tokens is not None else "–"


def _cell(result: dict[str, Any]) -> str:
    metric = main_metric(result)
    value, err = result.get(metric), result.get(f"{metric}_stderr")
    if value is None:
        return DASH
    return f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")


def format_table(out: dict[str, Any]) -> str:
    """A Markdown table: a row per checkpoint, a column per task's main metric ± its standard
    error (bootstrap, as the single-model table)."""
    first = out["checkpoints"][0]["results"]
    header = ["step", "tokens"] + [f"{task} {main_metric(res)}" for task, res in first.items()]
    rows = [[str(row["step"]), _tokens(row["tokens"])] + [_cell(res) for res in row["results"].values()]
            for row in out["checkpoints"]]
    return markdown_table(header, rows, right=set(range(len(header))))


def plot(out: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Figure 2's layout: one panel per task, its main metric against training tokens (steps
    where a checkpoint lacks its token count), a band of ± one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    rows = out["checkpoints"]
    by_tokens = all(r["tokens"] is not None for r in rows)
    x = [r["tokens"] if by_tokens else r["step"] for r in rows]
    tasks = list(rows[0]["results"])
    columns = min(len(tasks), 3)
    lines = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), dpi=100, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        metric = main_metric(rows[0]["results"][task])
        y = [r["results"][task].get(metric) for r in rows]
        err = [r["results"][task].get(f"{metric}_stderr") or 0.0 for r in rows]
        y = [float("nan") if v is None else v for v in y]
        ax.plot(x, y, "o-", markersize=3)
        ax.fill_between(x, [v - e for v, e in zip(y, err)], [v + e for v, e in zip(y, err)], alpha=0.2)
        if task in out.get("chance", {}) and metric.startswith("acc"):
            ax.axhline(out["chance"][task], color="grey", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=8)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("training tokens" if by_tokens else "step")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))      # 1.2M, as the paper's axis reads 1T
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def report_paths(output: str | os.PathLike[str]) -> tuple[Path, Path]:
    """OUT.md and OUT.png beside OUT.json."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix == ".json" else output
    return stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".png")
