"""Reading a JSONL batch file column-wise with Arrow's JSON reader (native code, threads), for the
fast paths of import; and vectorised versions of `jsonl.Line`'s typed getters.

Contract: `load_jsonl`, `parse_table` and the checks return None / False for anything that is
not plainly what the line-by-line reader (`jsonl.read_jsonl` + `Line`) accepts, and the caller
then reads the file line by line, which names the file and line of an error. So a fast path may
only ever accept what the slow one accepts, and must produce the same values. Where Arrow's
parser is laxer than Python's `json` (several objects on one line, `Inf`/`-NaN`, a BOM, invalid
UTF-8, `\\r`, at which Python's text mode splits lines) we check the raw bytes first, and an
explicit schema keeps Arrow from coercing types (a bool or string where a number is expected, 3.0
for an integer: all parse errors there, hence slow path)."""

from __future__ import annotations

import gzip
import io
import re
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

# Neuronpedia writes `index` as a string in its database exports and as an int in some others.
INDEX_TYPES = (pa.string(), pa.int64())
_READ_OPTIONS = pj.ReadOptions(block_size=4 << 20)  # rows are up to ~10 kB (decoder vectors)
# RapidJSON (Arrow) also reads Inf, -Inf and -NaN, which Python's json rejects (NaN, Infinity and
# -Infinity both read). A literal prefix, so that re scans for it fast (text has "Info" and such).
_INF = re.compile(rb"Inf(?!inity)")


def loading_ahead(groups: list[tuple[Path, ...]]) -> Iterator[tuple[bytes | None, ...]]:
    """`load_jsonl` of each group of files (a batch file and its sidecar), one group ahead in a
    thread: gzip and Arrow's parser release the GIL, so loading the next overlaps parsing this."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_group, groups[0]) if groups else None
        for number in range(len(groups)):
            loaded = pending.result()
            pending = pool.submit(_load_group, groups[number + 1]) if number + 1 < len(groups) else None
            yield loaded


def _load_group(paths: tuple[Path, ...]) -> tuple[bytes | None, ...]:
    return tuple(load_jsonl(path) for path in paths)


def parse_table(data: bytes | None, fields: dict[str, pa.DataType], *, with_index: bool) -> pa.RecordBatch | None:
    """The rows of a file's bytes (from `load_jsonl`) as one batch of `fields` (others are ignored,
    as the slow path ignores them; missing or null values are nulls), with an `index` column of
    either type when `with_index`; None if Arrow does not read it the way Python's json does."""
    if data is None:
        return None
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    for index_type in INDEX_TYPES if with_index else (None,):
        schema = pa.schema({**fields, "index": index_type} if index_type is not None else fields)
        options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        try:
            table = pj.read_json(io.BytesIO(data), read_options=_READ_OPTIONS, parse_options=options)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue  # a type Arrow would not take as given: the other index type, or the slow path
        # Each line is one object (see load_jsonl), so one row per line, or Arrow has read
        # something Python would not (e.g. an object spanning lines).
        return table.combine_chunks().to_batches()[0] if table.num_rows == lines else None
    return None


def load_jsonl(path: Path) -> bytes | None:
    """The bytes of a .jsonl(.gz) file if every line is `{...}` (no blank lines, no `\\r`, no BOM),
    valid UTF-8, without number literals only Arrow reads; None otherwise (or if it cannot be read)."""
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error):  # the slow path reports them
        return None
    last = data.endswith(b"}\n") or (data.endswith(b"}") and not data.endswith(b"\n"))
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    # `}` newline `{` never occurs inside one JSON value (strings hold no raw newline), so when
    # every line starts with `{` and ends with `}`, no object spans a line end.
    if not (data.startswith(b"{") and last and data.count(b"}\n{") == lines - 1) or b"\r" in data:
        return None
    if b"-NaN" in data or _has_inf_literal(data):
        return None
    try:
        data.decode("utf-8")  # what the slow path's text mode checks (Arrow does not)
    except UnicodeDecodeError:
        return None
    return data


def _has_inf_literal(data: bytes) -> bool:
    """`Inf` as a value (after `:`, `,` or `[`, maybe `-`), not inside a string; conservative."""
    for match in _INF.finditer(data):
        before = data[max(0, match.start() - 32):match.start()].removesuffix(b"-").rstrip(b" \t\n")
        if before.endswith((b":", b",", b"[")):
            return True
    return False


# --- vectorised checks, each mirroring a `Line` getter ----------------------------------------


def all_true(mask: pa.Array) -> bool:
    """Every entry true (none null); true for no entries."""
    return mask.null_count == 0 and pc.sum(pc.invert(mask)).as_py() in (None, 0)


def required(column: pa.Array) -> bool:
    """`Line.text` / `integer` / `number` without optional: present and not null."""
    return column.null_count == 0


def finite(column: pa.Array) -> bool:
    """`Line.number`: finite where not null."""
    return all_true(pc.fill_null(pc.is_finite(column), True))


def plain_list(column: pa.Array, *, finite_values: bool = False) -> bool:
    """`Line.numbers` / `integers` / `texts`: a null list reads as [], but no element may be null
    (and numbers must be finite)."""
    values = column.flatten()
    return values.null_count == 0 and (not finite_values or finite(values))


def list_lengths(column: pa.Array) -> pa.Array:
    """Lengths of a list column, a null list counting as [] (as `Line._list` reads it)."""
    return pc.fill_null(pc.list_value_length(column), 0)


def feature_indices(column: pa.Array) -> pa.Array | None:
    """`Line.index`: non-negative ints, or strings of ASCII digits (Python's isdigit also takes
    other digits, which int() may not: left to the slow path); None otherwise."""
    if not required(column):
        return None
    if pa.types.is_string(column.type):
        if not all_true(pc.match_substring_regex(column, r"^[0-9]+$")):
            return None
        try:
            return pc.cast(column, pa.int64())  # beyond int64: the slow path's big int
        except pa.ArrowInvalid:
            return None
    return column if all_true(pc.greater_equal(column, 0)) else None


def equal_to(column: pa.Array, value: str) -> bool:
    return all_true(pc.equal(column, value))


def same_lengths(first: pa.Array, second: pa.Array) -> bool:
    return all_true(pc.equal(list_lengths(first), list_lengths(second)))


def casts(columns: Sequence[pa.Array], types: Sequence[pa.DataType]) -> list[pa.Array] | None:
    """Safe casts to the stored types, None if one overflows (the slow path then fails as it does)."""
    try:
        return [pc.cast(column, type_) for column, type_ in zip(columns, types)]
    except (pa.ArrowInvalid, OverflowError):
        return None
