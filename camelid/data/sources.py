"""Reading documents from local files: plain text, JSONL, Parquet; single files, directories and
globs; `.gz` and `.zst` compression. Every document remembers where it came from (file and
line), so that every complaint can name them.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from camelid.errors import CamelidError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".tex")


@dataclass
class Document:
    text: str
    source: str      # the source's name in the recipe
    where: str       # "path:line" (or "path" for whole-file documents)
    meta: dict | None = None


def expand_paths(patterns: list[str], base: Path, name: str) -> list[Path]:
    """Files matching each pattern (a file, a directory, or a glob), relative to `base`, sorted.
    A pattern that matches nothing is an error: a source must never vanish silently."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(os.path.expanduser(pattern))
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            matches = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif any(ch in str(p) for ch in "*?["):
            matches = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        elif p.is_file():
            matches = [p]
        else:
            raise CamelidError(f"source {name!r}: path {p} does not exist")
        if not matches:
            raise CamelidError(f"source {name!r}: {pattern!r} matches no files (looked in {p})")
        files.extend(matches)
    return files


def file_format(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".gz", ".zst", ".zstd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        import zstandard

        # buffered, so that it can be iterated line by line like the others
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _decode(raw: bytes, where: str, errors: str) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "skip":
            return None
        if errors == "replace":
            return raw.decode("utf-8", errors="replace")
        raise CamelidError(f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                           "fix the file, or set on_error = \"skip\" or \"replace\" for this source") from None


def read_documents(path: Path, source: str, fmt: str = "auto", text_field: str = "text",
                   split: str = "file", errors: str = "raise") -> Iterator[Document]:
    """Documents of one file. Text files are one document each (split="file"), or one per
    blank-line-separated paragraph, or one per line. errors: "raise", "skip" or "replace" for
    undecodable bytes and malformed records ("skip" drops that record and says so)."""
    fmt = file_format(path) if fmt == "auto" else fmt
    try:
        if fmt == "jsonl":
            yield from _jsonl(path, source, text_field, errors)
        elif fmt == "parquet":
            yield from _parquet(path, source, text_field)
        else:
            yield from _text(path, source, split, errors)
    except (OSError, EOFError) as e:  # a truncated .gz / .zst, an unreadable file
        raise CamelidError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _text(path: Path, source: str, split: str, errors: str) -> Iterator[Document]:
    with open_binary(path) as f:
        if split == "file":
            text = _decode(f.read(), str(path), errors)
            if text is not None and text.strip():
                yield Document(text, source, str(path))
            return
        if split not in ("line", "paragraph"):
            raise CamelidError(f"source {source!r}: split must be file, paragraph or line (got {split!r})")
        buffer: list[str] = []
        start = 1
        for number, raw in enumerate(f, 1):
            line = _decode(raw, f"{path}:{number}", errors)
            if line is None:
                continue
            if split == "line":
                if line.strip():
                    yield Document(line.rstrip("\r\n"), source, f"{path}:{number}")
                continue
            if line.strip():
                if not buffer:
                    start = number
                buffer.append(line)
            elif buffer:
                yield Document("".join(buffer).rstrip("\n"), source, f"{path}:{start}")
                buffer = []
        if buffer:
            yield Document("".join(buffer).rstrip("\n"), source, f"{path}:{start}")


def _jsonl(path: Path, source: str, text_field: str, errors: str) -> Iterator[Document]:
    with open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            line = _decode(raw, where, errors)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if errors == "raise":
                    raise CamelidError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix the line, "
                                       "or set on_error = \"skip\" for this source") from None
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                if errors == "raise":
                    raise CamelidError(f"{where}: no string field {text_field!r} (keys: "
                                       f"{sorted(record) if isinstance(record, dict) else type(record).__name__}); "
                                       "set text_field for this source")
                continue
            meta = {k: v for k, v in record.items() if k != text_field}
            yield Document(text, source, where, meta or None)


def _parquet(path: Path, source: str, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:
        raise CamelidError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in table.schema_arrow.names:
        raise CamelidError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); "
                           "set text_field for this source")
    row = 0
    for batch in table.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield Document(text, source, f"{path}:row {row}")
