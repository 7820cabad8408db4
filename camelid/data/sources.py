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
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from camelid.errors import CamelidError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".tex")


@dataclass(frozen=True)
class Hints:
    """How messages name the settings a user can change: a recipe's per-source keys for
    `data prepare`, the command's options for `tokenizer train`."""
    undecodable: str = 'set on_error = "skip" or "replace" for this source'
    malformed: str = 'set on_error = "skip" for this source'
    text_field: str = "set text_field for this source"


RECIPE_HINTS = Hints()


@dataclass
class Document:
    text: str
    source: str      # the source's name in the recipe
    where: str       # "path:line" (or "path" for whole-file documents)
    meta: dict | None = None


def expand_paths(patterns: list[str], base: Path, name: str, what: str | None = None) -> list[Path]:
    """Files matching each pattern (a file, a directory, or a glob), relative to `base`, sorted.
    A pattern that matches nothing is an error: a source must never vanish silently. `what`
    names the setting in messages (default: "source NAME")."""
    what = what or f"source {name!r}"
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
            raise CamelidError(f"{what}: path {p} does not exist")
        if not matches:
            raise CamelidError(f"{what}: {pattern!r} matches no files (looked in {p})")
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


class _ZstdReader(io.RawIOBase):
    """Decompress a .zst file frame by frame. zstandard's stream_reader ends quietly where a
    truncated file ends, so a cut file would pass for a short (or empty) one; this reader
    raises EOFError when the input ends inside a frame."""

    CHUNK = 1 << 16  # compressed bytes per step: bounds the memory one step can decompress into

    def __init__(self, path: Path):
        import zstandard

        self._zstd = zstandard
        self._raw = open(path, "rb")
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False        # the current frame has consumed input but not ended
        self._out = memoryview(b"")   # decompressed, not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._out:
            chunk = self._raw.read(self.CHUNK)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            pieces = []
            while chunk:
                if self._frame.eof:  # the next frame of a multi-frame file
                    self._frame = self._zstd.ZstdDecompressor().decompressobj()
                pieces.append(self._frame.decompress(chunk))
                self._in_frame = not self._frame.eof
                chunk = self._frame.unused_data if self._frame.eof else b""
            self._out = memoryview(b"".join(pieces))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        # buffered, so that it can be iterated line by line like the others
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 20)
    return open(path, "rb")


def _read_failure(path: Path, e: BaseException) -> CamelidError:
    """One line for a file that cannot be read: compressed data that is corrupt or cut short
    (the usual result of an interrupted download) gets its own message."""
    import zstandard

    name = path.name.lower()
    compressed = "gzip" if name.endswith(".gz") else "zstd" if name.endswith((".zst", ".zstd")) else None
    detail = str(e) or type(e).__name__
    if compressed and isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)):
        problem = "truncated" if isinstance(e, EOFError) else "corrupt"
        return CamelidError(f"{path}: {problem} {compressed} file ({detail}); download or compress it again")
    return CamelidError(f"{path}: cannot read ({type(e).__name__}: {detail})")


def json_problem(e: json.JSONDecodeError) -> str:
    """The JSON parser's complaint and the column. Some of its messages end in "at" ("Unterminated
    string starting at"), so the column is appended without a second one."""
    msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg
    return f"{msg} at column {e.colno}"


def _decode(raw: bytes, where: str, errors: str, hints: Hints = RECIPE_HINTS) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "skip":
            return None
        if errors == "replace":
            return raw.decode("utf-8", errors="replace")
        raise CamelidError(f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                           f"fix the file, or {hints.undecodable}") from None


def read_documents(path: Path, source: str, fmt: str = "auto", text_field: str = "text",
                   split: str = "file", errors: str = "raise", hints: Hints = RECIPE_HINTS) -> Iterator[Document]:
    """Documents of one file. Text files are one document each (split="file"), or one per
    blank-line-separated paragraph, or one per line. errors: "raise", "skip" or "replace" for
    undecodable bytes and malformed records ("skip" drops that record and says so). `hints`
    say which settings the messages should tell the user to change."""
    import zstandard

    fmt = file_format(path) if fmt == "auto" else fmt
    try:
        if fmt == "jsonl":
            yield from _jsonl(path, source, text_field, errors, hints)
        elif fmt == "parquet":
            yield from _parquet(path, source, text_field, hints)
        else:
            yield from _text(path, source, split, errors, hints)
    # an unreadable file; a cut .gz/.zst (EOFError); corrupt compressed data (zlib.error,
    # BadGzipFile, ZstdError): the decompressors' own exceptions, none of them a CamelidError
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise _read_failure(path, e) from None


def _text(path: Path, source: str, split: str, errors: str, hints: Hints) -> Iterator[Document]:
    with open_binary(path) as f:
        if split == "file":
            text = _decode(f.read(), str(path), errors, hints)
            if text is not None and text.strip():
                yield Document(text, source, str(path))
            return
        if split not in ("line", "paragraph"):
            raise CamelidError(f"source {source!r}: split must be file, paragraph or line (got {split!r})")
        buffer: list[str] = []
        start = 1
        for number, raw in enumerate(f, 1):
            line = _decode(raw, f"{path}:{number}", errors, hints)
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


def _jsonl(path: Path, source: str, text_field: str, errors: str, hints: Hints) -> Iterator[Document]:
    with open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            line = _decode(raw, where, errors, hints)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if errors == "raise":
                    raise CamelidError(f"{where}: not valid JSON ({json_problem(e)}); fix the line, "
                                       f"or {hints.malformed}") from None
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                if errors == "raise":
                    raise CamelidError(f"{where}: no string field {text_field!r} (keys: "
                                       f"{sorted(record) if isinstance(record, dict) else type(record).__name__}); "
                                       f"{hints.text_field}")
                continue
            meta = {k: v for k, v in record.items() if k != text_field}
            yield Document(text, source, where, meta or None)


def _parquet(path: Path, source: str, text_field: str, hints: Hints) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:
        raise CamelidError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in table.schema_arrow.names:
        raise CamelidError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); "
                           f"{hints.text_field}")
    row = 0
    for batch in table.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield Document(text, source, f"{path}:row {row}")
