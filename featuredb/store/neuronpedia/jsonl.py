"""JSONL files of an export: writing rows (gzipped or not), finding batch files, and reading rows
back as `Line`s, whose typed getters raise StoreErrors naming the file and line."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import math
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from featuredb.store.schema import StoreError

_BATCH_FILE = re.compile(r"^batch-([0-9]+)\.jsonl(\.gz)?$")


# Fast gzip: several times faster than level 5 for ~15% larger files; Neuronpedia only gunzips.
# mtime=0 keeps the bytes deterministic (exporting an import again gives the same files).
_GZIP_LEVEL = 1


def write_jsonl(path: Path, rows: list[dict], *, compress: bool) -> None:
    try:
        text = "".join(json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n" for row in rows)
    except ValueError as e:  # NaN / inf, which Neuronpedia's JSON parser would reject
        raise StoreError(f"{path}: cannot write a non-finite number as JSON ({e})") from None
    _write(path, text.encode(), compress)


def write_frame(path: Path, frame: pl.DataFrame) -> None:
    """A data frame as gzipped JSONL, one object per row with its columns in order (polars'
    writer; write_jsonl's rows and error when a float is NaN or infinite)."""
    if _has_non_finite(frame):
        write_jsonl(path, frame.to_dicts(), compress=True)  # raises, naming the file
        return
    buffer = io.BytesIO()
    frame.write_ndjson(buffer)
    _write(path, buffer.getvalue(), True)


def _write(path: Path, data: bytes, compress: bool) -> None:
    path.write_bytes(gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0) if compress else data)


def _has_non_finite(frame: pl.DataFrame) -> bool:
    checks = []
    for name, dtype in frame.schema.items():
        column = pl.col(name)
        if isinstance(dtype, pl.List) and dtype.inner.is_float():
            column = column.list.explode()
        elif not dtype.is_float():
            continue
        checks.append((column.is_finite() | column.is_null()).all().not_())
    return bool(checks) and frame.select(pl.any_horizontal(checks)).item()


def batch_files(folder: Path) -> list[Path]:
    """batch-N.jsonl(.gz) files of a folder, by N."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _BATCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def read_jsonl(path: Path) -> Iterator[Line]:
    """The rows of a .jsonl or .jsonl.gz file, streamed; StoreError naming the file (and line)."""
    compressed = path.name.endswith(".gz")
    try:
        with (gzip.open if compressed else open)(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield Line(path, number, _parse_json_object(path, number, line))
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise StoreError(f"{path}: cannot read{' gzip' if compressed else ''} file: {e}") from None
    except UnicodeDecodeError as e:
        raise StoreError(f"{path}: not UTF-8 text: {e}") from None


def _parse_json_object(path: Path, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}:{number}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(row, dict):
        raise StoreError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    return row


class Line:
    """One JSON row of an input file, with typed getters whose errors name the file and line."""

    def __init__(self, path: Path, line_no: int, row: dict) -> None:
        self.path, self.line_no, self.row = path, line_no, row

    def error(self, message: str) -> StoreError:
        return StoreError(f"{self.path}:{self.line_no}: {message}")

    def _get(self, name: str, optional: bool) -> Any:
        if name not in self.row:
            if optional:
                return None
            raise self.error(f"missing field {name!r}")
        value = self.row[name]
        if value is None and not optional:
            raise self.error(f"field {name!r} is null")
        return value

    def text(self, name: str, *, optional: bool = False) -> str | None:
        value = self._get(name, optional)
        if value is not None and not isinstance(value, str):
            raise self.error(f"field {name!r} must be a string, got {type(value).__name__}")
        return value

    def integer(self, name: str, *, optional: bool = False) -> int | None:
        value = self._get(name, optional)
        if value is not None and not is_integer(value):
            raise self.error(f"field {name!r} must be an integer, got {value!r:.40}")
        return value

    def number(self, name: str, *, optional: bool = False) -> float | None:
        value = self._get(name, optional)
        if value is not None:
            if not _is_number(value):
                raise self.error(f"field {name!r} must be a finite number, got {value!r:.40}")
            value = float(value)
        return value

    def timestamp(self, name: str) -> dt.datetime:
        """An ISO 8601 time, as our sidecar writes them."""
        try:
            return dt.datetime.fromisoformat(self.text(name))
        except ValueError as e:
            raise self.error(f"bad {name}: {e}") from None

    def index(self) -> int:
        """The feature index: a string in Neuronpedia's database exports, an int in some others."""
        value = self._get("index", False)
        if isinstance(value, str) and value.isdigit():
            return int(value)
        if is_integer(value) and value >= 0:
            return value
        raise self.error(f"field 'index' must be a non-negative integer (or its string), got {value!r:.40}")

    def numbers(self, name: str) -> list[float]:
        value = self._list(name, _is_number, "finite numbers", _all_finite_floats)
        return value if _only(value, float) else [float(v) for v in value]

    def integers(self, name: str) -> list[int]:
        return self._list(name, is_integer, "integers", lambda v: _only(v, int))

    def texts(self, name: str) -> list[str]:
        return self._list(name, lambda v: isinstance(v, str), "strings", lambda v: _only(v, str))

    def _list(self, name: str, ok: Callable[[Any], bool], what: str, all_ok: Callable[[list], bool]) -> list:
        """`all_ok`: a check of the whole list in C (the common case), before `ok` per element."""
        value = self._get(name, True)  # Neuronpedia's list columns default to [] (null in some dumps)
        if value is None:
            return []
        if not isinstance(value, list) or not (all_ok(value) or all(ok(v) for v in value)):
            raise self.error(f"field {name!r} must be a list of {what}")
        return value

    def same_length(self, first: str, first_values: list, second: str, second_values: list) -> None:
        if len(first_values) != len(second_values):
            raise self.error(f"{first!r} has {len(first_values)} entries but {second!r} has {len(second_values)}")


def is_integer(value: object) -> bool:
    """A JSON integer (bool is an int in Python, but not in JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _only(values: list, kind: type) -> bool:
    """Every value exactly of type `kind` (so no bool among ints: JSON's ints and bools differ)."""
    return set(map(type, values)) <= {kind}


def _all_finite_floats(values: list) -> bool:
    """All floats and finite: a sum of finite floats is finite or overflows to inf, and any inf or
    NaN makes it non-finite (then the per-element check decides)."""
    return _only(values, float) and math.isfinite(sum(values))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
