"""Fluent search queries over feature descriptions: semantic, keyword (BM25) and hybrid (RRF).

    cat.search("text").where(layer=12).limit(10).to_polars()

Builders are immutable: every method returns a new query, so a partly built query can be reused.
Filters are evaluated inside the index (LanceDB prefilter), never after it, so a filtered search
returns `limit` rows whenever that many features match.
"""

from __future__ import annotations

import dataclasses
import numbers
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa

from featuredb.errors import one_line
from featuredb.errors import QueryError
from featuredb.query.where import Where

if TYPE_CHECKING:
    from featuredb.query.catalogue import Catalogue

DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
MAX_QUERY_CHARS = 1000
# Columns of every search result row (score is added).
RESULT_COLUMNS = ["coder_id", "feature", "layer", "site", "description", "density", "max_activation", "top_tokens"]
# What a search reads from the index's rows: layer and site are properties of the coder and come
# from the (cached) coders table instead; every column read costs about 0.3 ms at 10M rows.
FETCHED_COLUMNS = ["coder_id", "feature", "description", "density", "max_activation", "top_tokens"]
RESULT_SCHEMA = {
    "coder_id": pl.String, "feature": pl.Int64, "layer": pl.Int32, "site": pl.String, "description": pl.String,
    "density": pl.Float64, "max_activation": pl.Float32, "top_tokens": pl.List(pl.String), "score": pl.Float64,
}
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al.)
OVERFETCH = 4  # range-only filters: rows fetched per row asked before filtering (see _filtered)


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


def empty_results() -> pl.DataFrame:
    return pl.DataFrame(schema=RESULT_SCHEMA)


@dataclasses.dataclass(frozen=True)
class SearchQuery:
    """A search over feature descriptions; `mode` is "semantic", "keyword" or "hybrid"."""

    catalogue: Catalogue
    mode: str
    text: str | None = None
    vector: tuple[float, ...] | None = None  # semantic/hybrid: a precomputed query embedding
    conditions: Where = Where()
    k: int = DEFAULT_LIMIT
    probes: int | None = None  # None: the catalogue's default (scaled up for narrow filters)
    refine: int | None = None
    exact_search: bool = False

    # --- building ---------------------------------------------------------------------------

    def where(self, **conditions: Any) -> SearchQuery:
        """Keep only features with these properties (AND): coder_id, layer, site, model, hook take a
        value or a list of values; density and max_activation a (low, high) pair (None = open)."""
        where = self.conditions.add(**conditions)
        self.catalogue._check_coder_ids(where.mentioned_coder_ids())
        return dataclasses.replace(self, conditions=where)

    def limit(self, limit: int) -> SearchQuery:
        return dataclasses.replace(self, k=check_limit(limit))

    def nprobes(self, nprobes: int) -> SearchQuery:
        """IVF partitions to search (vector index only); more is slower and finds more."""
        if not isinstance(nprobes, numbers.Integral) or isinstance(nprobes, bool) or not 1 <= nprobes <= 100_000:
            raise QueryError(f"nprobes must be a positive integer, got {nprobes!r}")
        return dataclasses.replace(self, probes=int(nprobes))

    def refine_factor(self, factor: int) -> SearchQuery:
        """Re-rank factor x limit index candidates with exact distances (vector index only)."""
        if not isinstance(factor, numbers.Integral) or isinstance(factor, bool) or not 1 <= factor <= 1000:
            raise QueryError(f"refine_factor must be an integer in [1, 1000], got {factor!r}")
        return dataclasses.replace(self, refine=int(factor))

    def exact(self, exact: bool = True) -> SearchQuery:
        """Exact (brute-force) vector search, bypassing the vector index."""
        return dataclasses.replace(self, exact_search=bool(exact))

    # --- running ----------------------------------------------------------------------------

    def to_polars(self) -> pl.DataFrame:
        """Result rows, best first: coder_id, feature, layer, site, description, density,
        max_activation, top_tokens, score (cosine similarity, BM25 score or RRF score)."""
        cat = self.catalogue
        condition = self.conditions.render(cat._features_schema())
        if self.mode == "semantic":
            frame = self._vector_leg(condition, self.k)
        elif self.mode == "keyword":
            frame = self._keyword_leg(condition, self.k)
        else:
            frame = self._hybrid(condition)
        return frame

    def to_list(self) -> list[dict]:
        return self.to_polars().to_dicts()

    def to_arrow(self) -> pa.Table:
        return self.to_polars().to_arrow()

    # --- legs ---------------------------------------------------------------------------------

    def _query_vector(self) -> np.ndarray:
        if self.vector is not None:
            return np.asarray(self.vector, dtype=np.float32)
        return self.catalogue._embed_query(self.text)

    def _vector_leg(self, condition: str | None, k: int) -> pl.DataFrame:
        cat = self.catalogue
        cat._require_embeddings()
        vector = self._query_vector()
        plan = cat._vector_plan(self.conditions, self.probes, self.refine, self.exact_search)
        table = cat._features_table()

        def build(limit: int, prefilter: bool):
            query = table.search(vector, vector_column_name="vector").distance_type("cosine")
            if plan.exact:
                query = query.bypass_vector_index()
            else:
                query = query.nprobes(plan.nprobes).refine_factor(plan.refine)
            if condition is not None:
                query = query.where(condition, prefilter=prefilter)
            return query.select(FETCHED_COLUMNS + ["_distance"]).limit(limit)

        frame = cat._with_coder_columns(_frame(self._filtered(build, k)))
        return _finish(frame.with_columns(score=(1.0 - pl.col("_distance").cast(pl.Float64))).drop("_distance"))

    def _keyword_leg(self, condition: str | None, k: int) -> pl.DataFrame:
        table = self.catalogue._features_table()

        def build(limit: int, prefilter: bool):
            query = table.search(self.text, query_type="fts", fts_columns="description")
            if condition is not None:
                query = query.where(condition, prefilter=prefilter)
            return query.select(FETCHED_COLUMNS + ["_score"]).limit(limit)

        frame = self.catalogue._with_coder_columns(_frame(self._filtered(build, k)))
        return _finish(frame.rename({"_score": "score"}).with_columns(pl.col("score").cast(pl.Float64)))

    def _filtered(self, build, k: int) -> pa.Table:
        """Run a search whose filter is evaluated inside the index (prefilter).

        One exception, for speed with the same answer: a filter made only of ranges
        (density, max_activation) usually keeps most rows, and a prefilter would first build
        an allow-list of millions of row ids (~150 ms at 10M). Such a filter is first applied to
        the best OVERFETCH x k rows; if at least k of them pass, they are exactly the best k
        passing rows (every passing row further down ranks lower). Otherwise the search runs
        again with the prefilter."""
        if self.conditions.ranges and not self.conditions.eq:
            first = _run(build(OVERFETCH * k, False))
            if first.num_rows >= k:
                return first.slice(0, k)
        return _run(build(k, True))

    def _hybrid(self, condition: str | None) -> pl.DataFrame:
        depth = max(2 * self.k, 20)  # each leg returns more than asked, so fusion has room
        with ThreadPoolExecutor(max_workers=2) as pool:
            vector_future = pool.submit(self._vector_leg, condition, depth)
            keyword_future = pool.submit(self._keyword_leg, condition, depth)
            semantic, keyword = vector_future.result(), keyword_future.result()
        return rrf_fuse([semantic, keyword], self.k)


def rrf_fuse(legs: list[pl.DataFrame], k: int, rrf_k: int = RRF_K) -> pl.DataFrame:
    """Reciprocal-rank fusion: score = sum over legs of 1 / (rrf_k + rank), rank from 1."""
    ranked = [
        leg.with_row_index("rank", offset=1).with_columns(
            rrf=1.0 / (rrf_k + pl.col("rank").cast(pl.Float64))
        )
        for leg in legs if leg.height
    ]
    if not ranked:
        return empty_results()
    combined = pl.concat([r.drop("rank", "score") for r in ranked], how="vertical")
    fused = (
        combined.group_by("coder_id", "feature", maintain_order=True)
        .agg(pl.all().exclude("rrf").first(), pl.col("rrf").sum().alias("score"))
        .sort(["score", "coder_id", "feature"], descending=[True, False, False])
        .head(k)
    )
    return fused.select(list(RESULT_SCHEMA))


def _run(query) -> pa.Table:
    try:
        return query.to_arrow()
    except Exception as e:  # LanceDB raises bare RuntimeError/ValueError for bad queries
        raise QueryError(f"search failed: {one_line(e)}") from None


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _finish(frame: pl.DataFrame) -> pl.DataFrame:
    if frame.height == 0:
        return empty_results()
    frame = frame.filter(pl.col("score").is_not_nan())
    return frame.sort(["score", "coder_id", "feature"], descending=[True, False, False]).select(
        [pl.col(c).cast(t) for c, t in RESULT_SCHEMA.items()]
    )


def finite_vector(vector: object, dim: int) -> tuple[float, ...]:
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    if array.shape[0] != dim:
        raise QueryError(f"query vector has {array.shape[0]} dimensions; the catalogue's embeddings have {dim}")
    if not np.all(np.isfinite(array)) or not np.any(array):
        raise QueryError("query vector must be finite and not all zero")
    return tuple(float(x) for x in array / np.linalg.norm(array))


