"""Safe construction of LanceDB filter expressions.

No filter is ever built by pasting caller text: column names are checked against a strict pattern
and against the table schema, values are type-checked against the column and rendered as escaped
SQL literals, and identifiers are back-quoted (so columns named like SQL keywords, e.g. `values`,
still work).
"""

from __future__ import annotations

import math
import numbers
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from featuredb.store.schema import StoreError

Scalar = str | int | float | bool

_COLUMN_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# The most negative int64 cannot be written as a literal: DataFusion parses `-9223372036854775808`
# as a negated positive that overflows into a float, so the usable range is symmetric.
_INT_BITS = {pa.int8(): 8, pa.int16(): 16, pa.int32(): 32, pa.int64(): 64}


def sql_literal(value: Scalar) -> str:
    """Render one Python value as a SQL literal (str, int, finite float or bool)."""
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, str):
        bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise StoreError(f"control character {bad!r} is not allowed in a filter value: {value!r}")
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        as_float = float(value)
        if not math.isfinite(as_float):
            raise StoreError(f"filter value must be a finite number, got {value!r}")
        return repr(as_float)
    raise StoreError(f"unsupported filter value type {type(value).__name__}: {value!r}")


def column_ref(column: str, schema: pa.Schema) -> str:
    """A back-quoted identifier for `column`, which must be a valid name present in `schema`."""
    _check_column_name(column)
    if column not in schema.names:
        raise StoreError(f"unknown column {column!r} (known: {', '.join(schema.names)})")
    return f"`{column}`"


def _check_column_name(column: object) -> None:
    if not isinstance(column, str) or not _COLUMN_NAME.match(column):
        raise StoreError(f"invalid column name {column!r}: must match ^[a-z_][a-z0-9_]*$")


def _typed_literal(field: pa.Field, value: object) -> str:
    """`sql_literal(value)` after checking that value fits the column's type."""
    type_ = field.type
    if type(value) is int and type_ in _INT_BITS:  # the common case (feature and context ids), without the ABC checks
        if abs(value) > 2 ** (_INT_BITS[type_] - 1) - 1:
            raise StoreError(f"value {value!r} is out of range for column {field.name!r} ({type_})")
        return str(value)
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        ok = isinstance(value, str)
    elif pa.types.is_boolean(type_):
        ok = isinstance(value, bool)
    elif pa.types.is_integer(type_):
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if ok and type_ in _INT_BITS:
            limit = 2 ** (_INT_BITS[type_] - 1) - 1
            if not -limit <= int(value) <= limit:  # type: ignore[arg-type]
                raise StoreError(f"value {value!r} is out of range for column {field.name!r} ({type_})")
    elif pa.types.is_floating(type_):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    else:
        raise StoreError(f"cannot filter on column {field.name!r} of type {type_}")
    if not ok:
        raise StoreError(f"value {value!r} ({type(value).__name__}) does not fit column {field.name!r} ({type_})")
    return sql_literal(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Eq:
    column: str
    value: Scalar

    def render(self, field: pa.Field) -> str:
        return f"`{self.column}` = {_typed_literal(field, self.value)}"


@dataclass(frozen=True)
class _In:
    column: str
    values: tuple[Scalar, ...]

    def render(self, field: pa.Field) -> str:
        if not self.values:
            return "false"  # `x IN ()` is not valid SQL; an empty set matches nothing
        literals = ", ".join(_typed_literal(field, v) for v in self.values)
        return f"`{self.column}` IN ({literals})"


@dataclass(frozen=True)
class _Between:
    column: str
    low: Scalar | None
    high: Scalar | None

    def render(self, field: pa.Field) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"`{self.column}` >= {_typed_literal(field, self.low)}")
        if self.high is not None:
            parts.append(f"`{self.column}` <= {_typed_literal(field, self.high)}")
        return " AND ".join(parts)


_Clause = _Eq | _In | _Between


@dataclass(frozen=True)
class Filter:
    """An immutable conjunction of column conditions; each builder method returns a new Filter."""

    clauses: tuple[_Clause, ...] = ()

    def eq(self, column: str, value: Scalar) -> Filter:
        _check_column_name(column)
        return Filter(self.clauses + (_Eq(column, value),))

    def isin(self, column: str, values: Iterable[Scalar]) -> Filter:
        _check_column_name(column)
        if isinstance(values, (str, bytes)):  # a string is iterable but almost surely a mistake here
            raise StoreError(f"isin({column!r}, ...) needs a collection of values, not a string")
        return Filter(self.clauses + (_In(column, tuple(values)),))

    def between(self, column: str, low: Scalar | None = None, high: Scalar | None = None) -> Filter:
        """Inclusive range; either bound may be None (open-ended), not both."""
        _check_column_name(column)
        if low is None and high is None:
            raise StoreError(f"between({column!r}) needs at least one bound")
        return Filter(self.clauses + (_Between(column, low, high),))

    def render(self, schema: pa.Schema) -> str | None:
        """The SQL filter for `schema`, or None when there are no conditions."""
        if not self.clauses:
            return None
        rendered = []
        for clause in self.clauses:
            column_ref(clause.column, schema)
            rendered.append(f"({clause.render(schema.field(clause.column))})")
        return " AND ".join(rendered)
