"""The fluent query base, in the style of LanceDB's query builders:

    cat.search("text").where(layer=12).offset(20).limit(10).to_polars()

Builders are immutable: every method returns a new query, so a partly built query can be reused.
`where`, `limit`, `offset` and the `to_*` outputs are written here once; a subclass (SearchQuery,
SimilarQuery, TokenQuery) implements only `_execute`, how its best `n` rows are found. Errors that
LanceDB raises while a query runs (a corrupt data file) become one QueryError here.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import TYPE_CHECKING, Any, Self

import polars as pl
import pyarrow as pa

from featuredb.errors import QueryError
from featuredb.query.reader import reading
from featuredb.query.where import Where

if TYPE_CHECKING:
    from featuredb.query.reader import Reader

DEFAULT_LIMIT = 10
MAX_LIMIT = 1000  # rows one query returns at most, offset included
MAX_QUERY_CHARS = 1000


def check_limit(limit: object) -> int:
    if not isinstance(limit, numbers.Integral) or isinstance(limit, bool):
        raise QueryError(f"limit must be an integer, got {limit!r}")
    if not 1 <= int(limit) <= MAX_LIMIT:
        raise QueryError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return int(limit)


def check_text(text: object, what: str = "query", max_chars: int = MAX_QUERY_CHARS) -> str:
    if not isinstance(text, str):
        raise QueryError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise QueryError(f"{what} is empty")
    if len(text) > max_chars:
        raise QueryError(f"{what} is {len(text):,} characters long; at most {max_chars:,}")
    if "\x00" in text:
        raise QueryError(f"{what} contains a NUL character")
    return text.strip()


@dataclasses.dataclass(frozen=True)
class QueryBuilder:
    """A query over one catalogue's Reader: filters, a page (offset, limit) and its outputs."""

    reader: Reader
    conditions: Where = dataclasses.field(default=Where(), kw_only=True)
    k: int = dataclasses.field(default=DEFAULT_LIMIT, kw_only=True)
    skip: int = dataclasses.field(default=0, kw_only=True)

    # --- building ---------------------------------------------------------------------------

    def where(self, **conditions: Any) -> Self:
        """Keep only features with these properties (AND): coder_id, layer, site, model, hook take a
        value or a list of values; density, max_activation and description_score a (low, high) pair
        (None = open); min_score=x is description_score=(x, None), the current description's score in
        [0, 1] (its embedding AUROC, featuredb.describe.embedding_score)."""
        where = self.conditions.add(**conditions)
        self.reader.check_coder_ids(where.mentioned_coder_ids())
        return dataclasses.replace(self, conditions=where)

    def limit(self, limit: int) -> Self:
        return dataclasses.replace(self, k=check_limit(limit))

    def offset(self, offset: int) -> Self:
        """Skip the best `offset` rows (the next page)."""
        if not isinstance(offset, numbers.Integral) or isinstance(offset, bool) or not 0 <= offset < MAX_LIMIT:
            raise QueryError(f"offset must be an integer in [0, {MAX_LIMIT - 1}], got {offset!r}")
        return dataclasses.replace(self, skip=int(offset))

    # --- running ----------------------------------------------------------------------------

    def to_polars(self) -> pl.DataFrame:
        """The rows from offset to offset + limit, best first."""
        n = self.skip + self.k
        if n > MAX_LIMIT:
            raise QueryError(f"offset + limit is {n}; at most {MAX_LIMIT}")
        with reading(self.reader.uri):
            frame = self._execute(n)
        return frame.slice(self.skip) if self.skip else frame

    def to_list(self) -> list[dict]:
        return self.to_polars().to_dicts()

    def to_arrow(self) -> pa.Table:
        return self.to_polars().to_arrow()

    def _execute(self, n: int) -> pl.DataFrame:
        """The best n rows (a subclass says how they are found)."""
        raise NotImplementedError
