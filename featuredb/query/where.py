"""Typed search filters -> featuredb.store.Filter (the only way a filter is built).

`where(layer=12, coder_id=..., site="res", model=..., hook=..., density=(lo, hi),
max_activation=(lo, hi), description_score=(lo, hi), min_score=0.8)`: every value is type-checked here and rendered by Filter as an escaped
literal, so a value holding quotes or SQL is compared as a value and never parsed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa

from featuredb.store import Filter, StoreError
from featuredb.store.schema import SITES
from featuredb.errors import one_line
from featuredb.errors import QueryError

# column -> Python type of its values; a list/tuple/set of values means "any of them"
EQ_COLUMNS: dict[str, type] = {"coder_id": str, "layer": int, "site": str, "model": str, "hook": str}
RANGE_COLUMNS: tuple[str, ...] = ("density", "max_activation", "description_score")
# min_score=x is description_score=(x, None): the current description's score (its embedding AUROC)
MIN_SCORE = "min_score"
SCORE_COLUMN = "description_score"
WHERE_KEYS: tuple[str, ...] = tuple(EQ_COLUMNS) + RANGE_COLUMNS + (MIN_SCORE,)
MAX_VALUES = 10_000  # values in one isin


@dataclass(frozen=True)
class Where:
    """A conjunction of typed conditions on feature rows (immutable; `add` returns a new one)."""

    eq: tuple[tuple[str, tuple], ...] = ()  # (column, allowed values)
    ranges: tuple[tuple[str, float | None, float | None], ...] = ()

    def add(self, **conditions: object) -> Where:
        eq, ranges = list(self.eq), list(self.ranges)
        for key, value in conditions.items():
            if key in EQ_COLUMNS:
                if value is None:
                    continue
                eq.append((key, _values(key, value, EQ_COLUMNS[key])))
            elif key in RANGE_COLUMNS:
                if value is None:
                    continue
                ranges.append((key, *_range(key, value)))
            elif key == MIN_SCORE:
                if value is None:
                    continue
                ranges.append((SCORE_COLUMN, score_bound(value), None))
            else:
                raise QueryError(f"unknown filter {key!r}: filter on {', '.join(WHERE_KEYS)}")
        return Where(tuple(eq), tuple(ranges))

    def __bool__(self) -> bool:
        return bool(self.eq or self.ranges)

    def mentioned_coder_ids(self) -> set[str]:
        """Every coder_id named in any condition (for checking that they exist)."""
        return {v for column, values in self.eq if column == "coder_id" for v in values}

    def to_filter(self, columns: Iterable[str] | None = None) -> Filter:
        """The Filter over the given columns (all conditions when None)."""
        keep = None if columns is None else set(columns)
        result = Filter()
        for column, values in self.eq:
            if keep is not None and column not in keep:
                continue
            result = result.eq(column, values[0]) if len(values) == 1 else result.isin(column, values)
        for column, low, high in self.ranges:
            if keep is not None and column not in keep:
                continue
            result = result.between(column, low, high)
        return result

    def render(self, schema: pa.Schema, columns: Iterable[str] | None = None) -> str | None:
        if any(column == SCORE_COLUMN for column, _, _ in self.ranges) and SCORE_COLUMN not in schema.names:
            raise QueryError("this catalogue's descriptions carry no scores yet: score them with "
                             "`featuredb describe --score-only`")
        try:
            return self.to_filter(columns).render(schema)
        except StoreError as e:
            raise QueryError(one_line(e)) from None

    def matching_coders(self, coders: pl.DataFrame) -> pl.DataFrame:
        """The coders rows that satisfy every coder-level condition."""
        mask = pl.lit(True)
        for column, values in self.eq:
            mask = mask & pl.col(column).is_in(list(values))
        return coders.filter(mask)

    def in_ranges(self) -> pl.Expr:
        """True for the rows within every range condition (density, max_activation)."""
        mask = pl.lit(True)
        for column, low, high in self.ranges:
            if low is not None:
                mask = mask & (pl.col(column) >= low)
            if high is not None:
                mask = mask & (pl.col(column) <= high)
        return mask


def _values(key: str, value: object, type_: type) -> tuple:
    if isinstance(value, (list, tuple, set, frozenset)):
        values = list(value)
        if not values:
            raise QueryError(f"where({key}=...): empty list of values")
        if len(values) > MAX_VALUES:
            raise QueryError(f"where({key}=...): {len(values)} values, at most {MAX_VALUES}")
    elif isinstance(value, Mapping) or (not isinstance(value, (str, bytes)) and isinstance(value, Iterable)):
        raise QueryError(f"where({key}=...): expected a value or a list of values, got {type(value).__name__}")
    else:
        values = [value]
    checked = []
    for v in values:
        if type_ is int:
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise QueryError(f"where({key}=...): expected an integer, got {v!r}")
            v = int(v)
        elif not isinstance(v, str):
            raise QueryError(f"where({key}=...): expected a string, got {v!r}")
        elif not v:
            raise QueryError(f"where({key}=...): empty string")
        if key == "site" and v not in SITES:
            raise QueryError(f"where(site={v!r}): unknown site (one of {', '.join(sorted(SITES))})")
        checked.append(v)
    return tuple(dict.fromkeys(checked))


def _range(key: str, value: object) -> tuple[float | None, float | None]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise QueryError(f"where({key}=...): expected a (low, high) pair, either may be None; got {value!r}")
    bounds = []
    for bound in value:
        if bound is None:
            bounds.append(None)
            continue
        if not isinstance(bound, numbers.Real) or isinstance(bound, bool) or not math.isfinite(float(bound)):
            raise QueryError(f"where({key}=...): bounds must be finite numbers or None, got {bound!r}")
        bounds.append(float(bound))
    low, high = bounds
    if key == SCORE_COLUMN:
        low, high = (None if b is None else score_bound(b, key) for b in (low, high))
    if low is None and high is None:
        raise QueryError(f"where({key}=(None, None)): give at least one bound")
    if low is not None and high is not None and low > high:
        raise QueryError(f"where({key}=({low}, {high})): low is above high")
    return low, high


def score_bound(value: object, what: str = MIN_SCORE) -> float:
    """A bound on description scores: a number in [0, 1] (a string holding one too, as a web form
    sends it); QueryError otherwise."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise QueryError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise QueryError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


def where_conditions(layer, coder_ids, site, model, min_density, max_density, min_score=None) -> dict:
    where: dict[str, Any] = {}
    if layer:
        where["layer"] = list(layer)
    if coder_ids:
        where["coder_id"] = list(coder_ids)
    if site:
        where["site"] = list(site)
    if model:
        where["model"] = list(model)
    if min_density is not None or max_density is not None:
        where["density"] = (min_density, max_density)
    if min_score is not None:
        where[MIN_SCORE] = min_score
    return where
