"""Typed configuration from TOML: one dataclass schema serves the files, the command-line
overrides (`--section.key=value`) and the code. Unknown keys and wrong types are errors that
name the file and the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from camelid.errors import CamelidError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CamelidError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CamelidError(f"{path}: is a directory; give a TOML file") from None
    except PermissionError:
        raise CamelidError(f"{path}: cannot read it (permission denied)") from None
    # Bytes that are not UTF-8 are read as U+FFFD (camelid's rule for all text), with a warning:
    # a key or path holding one is then refused, or not found, by name.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        print(f"camelid: warning: {path}: not valid UTF-8; undecodable bytes read as U+FFFD", file=sys.stderr)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CamelidError(f"{path}: not valid TOML ({e})") from None


def parse_value(text: str) -> Any:
    """A command-line value read as TOML when it parses (numbers, booleans, lists), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ["--train.lr=3e-4", "--run.dir", "x", ...] (both spellings) to a nested dict."""
    items = list(overrides)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--") or arg == "--":
            raise CamelidError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, value = arg[2:], items[i + 1]
            i += 1
        else:
            raise CamelidError(f"override {arg!r} has no value; write {arg}=VALUE")
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CamelidError(f"override --{key}: {part} is not a section")
        node[parts[-1]] = parse_value(value)
        i += 1
    return data


def build(cls: type[T], data: Any, where: str) -> T:
    """Instantiate dataclass `cls` from nested dicts, checking keys and types."""
    if not isinstance(data, dict):
        raise CamelidError(f"{where}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CamelidError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise CamelidError(f"{where}: {e}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except CamelidError as e:
                errors.append(str(e))
        raise CamelidError(errors[0])
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise CamelidError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CamelidError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and (type(value) is tp):
        return value
    raise CamelidError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
