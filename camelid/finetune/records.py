"""Instruction records from JSONL, Parquet or a Hugging Face dataset, as conversations.

Three record formats, detected per file from its first record (or named):
- "chat": {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
- "alpaca": {"instruction": str, "input": str (optional), "output": str} (Taori et al., 2023)
- "prompt_completion": {"prompt": str, "completion": str}, or both lists of messages (TRL's
  conversational form)
Every record becomes a list of messages and is checked on the way in: a mistake names the file
and line (Parquet: file and row) and what to fix.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from camelid.data.sources import file_format, json_problem, open_binary
from camelid.errors import CamelidError
from camelid.tokenizer.chat import ROLES

FORMATS = ("chat", "alpaca", "prompt_completion")
KEYS = {"chat": ("messages",), "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion")}
EXPECTED = ('{"messages": [{"role", "content"}, ...]}, {"instruction", "input", "output"} '
            'or {"prompt", "completion"}')

Messages = list[dict[str, str]]


def read_records(path: str | Path, fmt: str = "auto") -> list[Messages]:
    """The conversations of one JSONL or Parquet file, in file order."""
    if fmt != "auto" and fmt not in FORMATS:
        raise CamelidError(f"data format {fmt!r}: expected auto or one of {', '.join(FORMATS)}")
    return read_file(path, lambda rows: convert_rows(rows, fmt))


def read_file(path: str | Path, convert: Callable[[Iterator[tuple[str, Any]]], list],
              what: str = "instruction data") -> list:
    """convert((where, record) for every record of one JSONL or Parquet file): what a reader of
    records in another shape (preference pairs) shares with read_records: the file checks, the
    choice of JSONL or Parquet and read errors named by file."""
    import zstandard

    path = Path(path)
    if not path.is_file():
        raise CamelidError(f"{path}: no such file")
    try:
        out = convert(_parquet_rows(path) if _is_parquet(path) else _jsonl_rows(path, what))
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise CamelidError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not out:
        raise CamelidError(f"{path}: no records (empty file?)")
    return out


def load_hf_dataset(name: str, split: str = "train", subset: str | None = None,
                    convert: Callable[[Iterator[tuple[str, Any]]], list] | None = None) -> list:
    """The conversations of a Hugging Face dataset (a hub name, or a local directory or data
    files that `datasets.load_dataset` reads), through `datasets`, imported only here; `convert`
    turns (where, record) pairs into records of another kind (default: conversations)."""
    try:
        import datasets
    except ImportError:
        raise CamelidError(f"dataset {name!r}: the Hugging Face loader needs the `datasets` package; "
                           "pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise CamelidError(f"dataset {name!r} (subset {subset}, split {split!r}): cannot load it ({e})") from None
    label = f"{name}[{split}]" if subset is None else f"{name}/{subset}[{split}]"
    out = (convert or convert_rows)((f"{label} row {i + 1}", r) for i, r in enumerate(ds))
    if not out:
        raise CamelidError(f"dataset {label}: no records")
    return out


def convert_rows(rows: Iterator[tuple[str, Any]], fmt: str = "auto") -> list[Messages]:
    """(where, record) pairs to conversations; "auto" takes the format of the first record."""
    out = []
    for where, record in rows:
        if not isinstance(record, dict):
            raise CamelidError(f"{where}: expected a JSON object, got {type(record).__name__}")
        # Parquet and `datasets` give every row all the columns, None where a record lacks one
        record = {k: v for k, v in record.items() if v is not None}
        if fmt == "auto":
            fmt = detect_format(record, where)
        out.append(to_messages(record, fmt, where))
    return out


def detect_format(record: dict, where: str) -> str:
    for fmt, keys in KEYS.items():
        if all(k in record for k in keys):
            return fmt
    if "chosen" in record and "rejected" in record:
        raise CamelidError(f"{where}: a preference pair (chosen, rejected) in instruction data; preference pairs "
                           "train model.objective = \"reward\" or \"dpo\"")
    raise CamelidError(f"{where}: a record of no known format (keys: {sorted(record)}); expected {EXPECTED}")


def to_messages(record: dict, fmt: str, where: str) -> Messages:
    missing = [k for k in KEYS[fmt] if k not in record]
    if missing:
        other = detect_format(record, where)   # raises for a record of no known format
        raise CamelidError(f"{where}: no {missing[0]!r} field: an {other} record in {fmt} data; "
                           f"every record of a file has the format of its first one")
    if fmt == "chat":
        messages = record["messages"]
    elif fmt == "alpaca":
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise CamelidError(f"{where}: 'input' must be a string")
        instruction = _text(record, "instruction", where)
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
                    {"role": "assistant", "content": _text(record, "output", where)}]
    else:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, list):
            prompt = [{"role": "user", "content": _text(record, "prompt", where)}]
        if not isinstance(completion, list):
            completion = [{"role": "assistant", "content": _text(record, "completion", where)}]
        messages = prompt + completion
    return check_conversation(messages, where)


def _text(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise CamelidError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise CamelidError(f"{where}: {key!r} is empty; remove the record or fill it in")
    return value


def check_conversation(messages: object, where: str) -> Messages:
    """A list of {"role", "content"} messages with known roles and non-empty text, at least one
    assistant turn, and something before the first one."""
    if not isinstance(messages, list) or not messages:
        raise CamelidError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise CamelidError(f"{where}: message {i} is not an object ({m!r})")
        if "role" not in m:
            raise CamelidError(f"{where}: message {i} has no 'role'; give one of {', '.join(ROLES)}")
        if m["role"] not in ROLES:
            raise CamelidError(f"{where}: message {i} has an unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise CamelidError(f"{where}: message {i} ({m['role']}) has no string 'content'")
        if not content.strip():
            raise CamelidError(f"{where}: message {i} ({m['role']}) has empty content; remove it or fill it in")
        out.append({"role": m["role"], "content": content})
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        raise CamelidError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    if roles[0] == "assistant":
        raise CamelidError(f"{where}: the conversation starts with an assistant turn; put the user's "
                           "(or a system) message first")
    return out


# ---- files ------------------------------------------------------------------------------------

def file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a JSONL or Parquet file, `where` naming file and line."""
    return _parquet_rows(path) if _is_parquet(path) else _jsonl_rows(path)


def _is_parquet(path: Path) -> bool:
    if file_format(path) == "parquet":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _jsonl_rows(path: Path, what: str = "instruction data") -> Iterator[tuple[str, Any]]:
    with open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise CamelidError(f"{where}: not UTF-8 text (byte {e.start}); {what} is JSONL "
                                   "(one JSON object per line) or Parquet") from None
            except json.JSONDecodeError as e:
                raise CamelidError(f"{where}: not valid JSON ({json_problem(e)}); {what} is JSONL "
                                   "(one JSON object per line) or Parquet") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise CamelidError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in table.iter_batches():
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record
