"""Search queries over feature descriptions: semantic, keyword (BM25) and hybrid (RRF).

    cat.search("text").where(layer=12).limit(10).to_polars()

The fluent part (where, limit, offset, to_polars) is featuredb.query.builder's. Filters are
evaluated inside the index (LanceDB prefilter), never after it, so a filtered search returns
`limit` rows whenever that many features match.
"""

from __future__ import annotations

import dataclasses
import numbers
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pyarrow as pa

from featuredb.errors import QueryError
from featuredb.query.builder import QueryBuilder
from featuredb.store.indexes import keyword_terms
from featuredb.store.scan import text_search

# Columns of every search result row (score is added). description_score: the current description's
# own score (its embedding AUROC; null when unscored, and in catalogues written before scores existed).
RESULT_COLUMNS = ["coder_id", "feature", "layer", "site", "description", "density", "max_activation", "top_tokens",
                  "description_score"]
# What a search reads from the index's rows: layer and site are properties of the coder and come
# from the (cached) coders table instead; every column read costs about 0.3 ms at 10M rows.
FETCHED_COLUMNS = ["coder_id", "feature", "description", "density", "max_activation", "top_tokens", "description_score"]
RESULT_SCHEMA = {
    "coder_id": pl.String, "feature": pl.Int64, "layer": pl.Int32, "site": pl.String, "description": pl.String,
    "density": pl.Float64, "max_activation": pl.Float32, "top_tokens": pl.List(pl.String),
    "description_score": pl.Float32, "score": pl.Float64,
}
# Features of one coder with the same statistics and description are one row: a coder's clones (features
# trained into one direction) fire on the same tokens and get the same description, and a page of them
# says nothing new. The best-ranked one stands for them; `duplicates` counts the others, listed in
# `duplicate_features` (issue 24).
DUPLICATE_KEY = ["coder_id", "density", "max_activation", "description"]
DUPLICATE_SCHEMA = {"duplicates": pl.Int32, "duplicate_features": pl.List(pl.Int64)}
MAX_FETCH = 4000  # rows a search reads at most to find `limit` distinct ones
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al.)
OVERFETCH = 4  # range-only filters: rows fetched per row asked before filtering (see _filtered)


def empty_results() -> pl.DataFrame:
    return pl.DataFrame(schema=RESULT_SCHEMA)


@dataclasses.dataclass(frozen=True)
class SearchQuery(QueryBuilder):
    """A search over feature descriptions; `mode` is "semantic", "keyword" or "hybrid"."""

    mode: str
    text: str | None = None
    vector: tuple[float, ...] | None = None  # semantic/hybrid: a precomputed query embedding
    probes: int | None = None  # None: the reader's plan (scaled up for narrow filters)
    refine: int | None = None
    exact_search: bool = False

    # --- vector search options ----------------------------------------------------------------

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

    def _execute(self, n: int) -> pl.DataFrame:
        """Result rows, best first: coder_id, feature, layer, site, description, density,
        max_activation, top_tokens, score (cosine similarity, BM25 score or RRF score), duplicates and
        duplicate_features (collapse_duplicates): n distinct rows, reading more rows while duplicates
        leave fewer, or while the n-th row's duplicates may go on past the rows read."""
        condition = self.conditions.render(self.reader.features_schema())
        fetch = n + max(5, n // 2)  # room for a few duplicates, so one query is usually enough
        while True:
            rows = self._ranked(condition, fetch)
            distinct = collapse_duplicates(rows)
            if rows.height < fetch or fetch >= MAX_FETCH:  # every match read
                return distinct.head(n)
            if distinct.height >= n and rows["score"][-1] < distinct["score"][n - 1]:
                return distinct.head(n)  # duplicates share a score: all of the n-th row's have been read
            # BM25 ties (like-length descriptions holding the word) often run past the rows read:
            # growing 4x, not 2x, gets there in 3 reads instead of 5 (5M features: 46.8 -> 26.8 ms)
            fetch = min(MAX_FETCH, 4 * fetch)

    def _ranked(self, condition: str | None, n: int) -> pl.DataFrame:
        """The best n rows, duplicates included."""
        if self.mode == "semantic":
            return self._vector_leg(condition, n)
        if self.mode == "keyword":
            return self._keyword_leg(condition, n)
        return self._hybrid(condition, n)

    # --- legs ---------------------------------------------------------------------------------

    def _query_vector(self) -> np.ndarray:
        if self.vector is not None:
            return np.asarray(self.vector, dtype=np.float32)
        return self.reader.embed_query(self.text)

    def _vector_leg(self, condition: str | None, k: int) -> pl.DataFrame:
        reader = self.reader
        reader.require_embeddings()
        vector = self._query_vector()
        plan = reader.vector_plan(self.conditions, self.probes, self.refine, self.exact_search)
        table = reader.features_table()

        def run(limit: int, prefilter: bool) -> pa.Table:
            query = plan.apply(table.search(vector, vector_column_name="vector").distance_type("cosine"))
            if condition is not None:
                query = query.where(condition, prefilter=prefilter)
            return query.select(reader.stored_columns(FETCHED_COLUMNS) + ["_distance"]).limit(limit).to_arrow()

        frame = reader.with_coder_columns(_frame(self._filtered(run, k)))
        return _finish(frame.with_columns(score=(1.0 - pl.col("_distance").cast(pl.Float64))).drop("_distance"))

    def _keyword_leg(self, condition: str | None, k: int) -> pl.DataFrame:
        table = self.reader.features_table()
        terms = keyword_terms(self.text or "")  # "(" -> "left parenthesis", as descriptions name it
        if not terms.strip():
            return empty_results()

        def run(limit: int, prefilter: bool) -> pa.Table:
            columns = self.reader.stored_columns(FETCHED_COLUMNS) + ["_score"]  # `_finish` nulls the rest
            return text_search(table, terms, "description", condition, columns, limit, prefilter)

        frame = self.reader.with_coder_columns(_frame(self._filtered(run, k)))
        return _finish(frame.rename({"_score": "score"}).with_columns(pl.col("score").cast(pl.Float64)))

    def _filtered(self, run, k: int) -> pa.Table:
        """Run a search whose filter is evaluated inside the index (prefilter).

        One exception, for speed with the same answer: a filter made only of ranges
        (density, max_activation) usually keeps most rows, and a prefilter would first build
        an allow-list of millions of row ids (~150 ms at 10M). Such a filter is first applied to
        the best OVERFETCH x k rows; if at least k of them pass, they are exactly the best k
        passing rows (every passing row further down ranks lower). Otherwise the search runs
        again with the prefilter."""
        if self.conditions.ranges and not self.conditions.eq:
            first = run(OVERFETCH * k, False)
            if first.num_rows >= k:
                return first.slice(0, k)
        return run(k, True)

    def _hybrid(self, condition: str | None, k: int) -> pl.DataFrame:
        depth = max(2 * k, 20)  # each leg returns more than asked, so fusion has room
        with ThreadPoolExecutor(max_workers=2) as pool:
            vector_future = pool.submit(self._vector_leg, condition, depth)
            keyword_future = pool.submit(self._keyword_leg, condition, depth)
            semantic, keyword = vector_future.result(), keyword_future.result()
        return rrf_fuse([semantic, keyword], k)


# The search mode for a query of each shape when none is asked for, chosen by measurement on the
# concept benchmark (scripts/bench_concepts.py, docs/benchmarks.md "Concept search (issue 16)").
AUTO_MODES = {"symbol": "keyword", "word": "semantic", "phrase": "semantic"}


def query_shape(text: str) -> str:
    """"symbol" (no letter or digit: "(", "=="), "word" (one word) or "phrase"."""
    if not any(ch.isalnum() for ch in text):
        return "symbol"
    return "word" if len(text.split()) == 1 else "phrase"


def auto_mode(text: str) -> str:
    """The mode a query of this shape is searched with by default (AUTO_MODES)."""
    return AUTO_MODES[query_shape(text)]


def rrf_fuse(legs: list[pl.DataFrame], k: int, rrf_k: int = RRF_K) -> pl.DataFrame:
    """Reciprocal-rank fusion: score = sum over legs of 1 / (rrf_k + rank), rank from 1; rows with equal
    scores in a leg share its rank (a coder's duplicates stay tied, so search collapses them whole)."""
    ranked = [
        leg.with_columns(rank=pl.col("score").rank("min", descending=True)).with_columns(
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


def collapse_duplicates(rows: pl.DataFrame) -> pl.DataFrame:
    """Rows ranked best first -> one row per coder, density, max activation and description (DUPLICATE_KEY),
    at the rank of its best row, with `duplicates` (how many rows it stands for besides itself) and
    `duplicate_features` (their feature numbers, best first)."""
    if rows.height == 0:
        return rows.with_columns(*(pl.lit(None, dtype=t).alias(c) for c, t in DUPLICATE_SCHEMA.items())).clear()
    columns = rows.columns
    grouped = rows.group_by(DUPLICATE_KEY, maintain_order=True).agg(  # groups in order of their first row
        *(pl.col(c).first() for c in columns if c not in DUPLICATE_KEY),
        pl.col("feature").slice(1).alias("duplicate_features"),  # a group's rows keep their order
    )
    return grouped.with_columns(duplicates=pl.col("duplicate_features").list.len()).select(
        columns + [pl.col(c).cast(t) for c, t in DUPLICATE_SCHEMA.items()])


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _finish(frame: pl.DataFrame) -> pl.DataFrame:
    if frame.height == 0:
        return empty_results()
    frame = frame.filter(pl.col("score").is_not_nan())
    frame = frame.with_columns(pl.lit(None).alias(c) for c in RESULT_SCHEMA if c not in frame.columns)
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


