"""`featuredb.open(path_or_uri)` -> Catalogue: find features by concept, by activation and by
similarity, in the fluent style of LanceDB's own API.

    cat = featuredb.open("./catalogue")
    cat.search("French cities").where(layer=12).limit(10).to_polars()     # semantic
    cat.keyword("Paris").to_polars()                                      # BM25 full text
    cat.hybrid("Paris").to_polars()                                       # both, RRF-fused
    cat.feature("res-layer_12-width_16k", 123)                            # dict: everything
    cat.fires_on("The Eiffel tower is in Paris")                          # runs the model
    cat.with_token(" Paris").to_polars()                                  # stored contexts only
    cat.similar("res-layer_12-width_16k", 123).to_polars()                # decoder cosine

Every error caused by the query or the catalogue is a QueryError (a ValueError) with a one-line
message. Searches return polars DataFrames; `feature` returns a plain dict.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from featuredb.store import EXAMPLES_TABLE, FEATURES_TABLE, CODERS_TABLE, FeatureStore, Filter, StoreError
from featuredb.store.descriptions import DESCRIPTIONS_TABLE
from featuredb.store.schema import vector_dim_of
from featuredb.errors import one_line
from featuredb.errors import NotFound, QueryError
from featuredb.query.search import SearchQuery, check_text, finite_vector
from featuredb.query.where import Where

DEFAULT_DB = "./featuredb-demo/catalogue"
# Vector search defaults, measured by scripts/bench_query.py (docs/benchmarks.md): recall@10 >= 0.98
# at 1M and 10M features with an IVF-RQ (4-bit) index of ~8k rows per partition.
DEFAULT_NPROBES = 20
DEFAULT_REFINE = 5
MAX_NPROBES = 400  # a narrow filter scales the probes up to this many
EXACT_MAX_ROWS = 50_000  # a coder filter keeping at most this many rows (and at most 2%) is searched exactly
EXACT_MAX_FRACTION = 0.02


@dataclass(frozen=True)
class VectorPlan:
    exact: bool  # brute force over the rows the filter keeps
    nprobes: int
    refine: int


def default_db() -> str:
    return os.environ.get("FEATUREDB_DB") or DEFAULT_DB


def open(path_or_uri: str | os.PathLike | None = None, *, embedding_model: str | None = None) -> Catalogue:  # noqa: A001
    """Open a catalogue written by `featuredb index` (a local directory or an object-store URI).

    `embedding_model` overrides the sentence-transformers model used to embed queries (by default
    the one recorded beside the stored description vectors).
    """
    return Catalogue(default_db() if path_or_uri is None else path_or_uri, embedding_model=embedding_model)


class Catalogue:
    """A read-mostly view of a feature catalogue (see the module docstring)."""

    def __init__(self, uri: str | os.PathLike, *, embedding_model: str | None = None) -> None:
        if isinstance(uri, (str, os.PathLike)) and not str(uri).strip():
            raise QueryError("catalogue path is empty")
        try:
            self.store = FeatureStore(uri, read_only=True)
        except StoreError as e:
            raise QueryError(f"cannot open catalogue {str(uri)!r}: {one_line(e)}") from None
        self.uri = self.store.uri
        names = self.store.table_names()
        if FEATURES_TABLE not in names or CODERS_TABLE not in names:
            raise QueryError(f"no catalogue at {self.uri}: it has no {FEATURES_TABLE!r} table (run `featuredb index` first)")
        self._lock = threading.RLock()
        self._tables: dict[str, Any] = {}
        self._coders_frame: pl.DataFrame | None = None
        self._schema: pa.Schema | None = None
        self._coder_props: tuple[pl.DataFrame, dict[str, tuple[int, str]]] | None = None
        self._embedding_model = embedding_model
        self._detected_embedding_model: str | None = None
        self._models: dict[str, Any] = {}  # fires_on: loaded subject models by spec
        self._coders: dict[str, Any] = {}  # fires_on: loaded coders by coder_id
        self._coder_stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __repr__(self) -> str:
        return f"Catalogue({self.uri!r})"

    # --- coders ---------------------------------------------------------------------------------

    def coders(self) -> pl.DataFrame:
        """The coders in the catalogue, sorted by coder_id."""
        return self._coder_table(refresh=True)

    def _coder_table(self, refresh: bool = False) -> pl.DataFrame:
        with self._lock:
            if self._coders_frame is None or refresh:
                self._coders_frame = self.store.coders()
            return self._coders_frame

    def _check_coder_ids(self, coder_ids: set[str] | None) -> None:
        if not coder_ids:
            return
        known = set(self._coder_table()["coder_id"].to_list())
        if coder_ids - known:
            known = set(self._coder_table(refresh=True)["coder_id"].to_list())
        unknown = sorted(coder_ids - known)
        if unknown:
            raise NotFound(f"unknown coder_id {unknown[0]!r}{_known_hint(sorted(known))}")

    def _with_coder_columns(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Add each row's coder properties (layer, site) from the coders table."""
        coders = self._coder_properties()
        if any(s not in coders for s in frame["coder_id"].unique().to_list()):
            self._coder_table(refresh=True)
            coders = self._coder_properties()
        coder_ids = frame["coder_id"].to_list()
        return frame.with_columns(
            layer=pl.Series([coders.get(s, (None, None))[0] for s in coder_ids], dtype=pl.Int32),
            site=pl.Series([coders.get(s, (None, None))[1] for s in coder_ids], dtype=pl.String),
        )

    def _coder_properties(self) -> dict[str, tuple[int, str]]:
        with self._lock:
            frame = self._coder_table()
            if self._coder_props is None or self._coder_props[0] is not frame:
                self._coder_props = (frame, {r[0]: (r[1], r[2]) for r in frame.select("coder_id", "layer", "site").iter_rows()})
            return self._coder_props[1]

    def _coder_row(self, coder_id: object) -> dict:
        if not isinstance(coder_id, str) or not coder_id:
            raise QueryError(f"coder_id must be a non-empty string, got {coder_id!r}")
        self._check_coder_ids({coder_id})
        return self._coder_table().filter(pl.col("coder_id") == coder_id).row(0, named=True)

    # --- tables -------------------------------------------------------------------------------

    def _table(self, name: str):
        with self._lock:
            table = self._tables.get(name)
            if table is None:
                try:
                    table = self.store.table(name)
                except StoreError as e:
                    raise QueryError(one_line(e)) from None
                self._tables[name] = table
            return table

    def _features_table(self):
        return self._table(FEATURES_TABLE)

    def _features_schema(self) -> pa.Schema:
        # The store fixes the schema, so one read is enough (each read costs a version check).
        with self._lock:
            if self._schema is None:
                self._schema = self._features_table().schema
            return self._schema

    def _has_features(self) -> bool:
        return self._features_table().count_rows() > 0

    def _has_table(self, name: str) -> bool:
        return name in self._tables or name in self.store.table_names()

    # --- embeddings ---------------------------------------------------------------------------

    def embedding_model(self) -> str:
        """The model that embeds queries: the one given to open(), else the one recorded with the
        stored description vectors, else featuredb.runtime.embedding.DEFAULT_EMBEDDING_MODEL."""
        from featuredb.runtime.embedding import DEFAULT_EMBEDDING_MODEL

        if self._embedding_model:
            return self._embedding_model
        return self._stored_embedding_model() or DEFAULT_EMBEDDING_MODEL

    def _stored_embedding_model(self) -> str | None:
        """The embedding model recorded with the first stored description vector (None if none is
        stored yet; looked up again on the next call then, as `describe` may have run since)."""
        with self._lock:
            if self._detected_embedding_model is None:
                query = self._features_table().search().select(["embedding_model"]).limit(None)
                for batch in query.to_batches(batch_size=65536):
                    values = batch.column(0).drop_null()
                    if len(values):
                        self._detected_embedding_model = values[0].as_py()
                        break
            return self._detected_embedding_model

    def _require_embeddings(self) -> None:
        if self._stored_embedding_model() is None and self._has_features():
            raise QueryError("no feature in the catalogue has an embedded description yet "
                             "(run `featuredb describe`); keyword search works on descriptions alone")

    def _vector_dim(self) -> int:
        dim = vector_dim_of(self._features_schema())
        if dim is None:
            raise QueryError("the features table has no fixed-size `vector` column")
        return dim

    def _embed_query(self, text: str) -> np.ndarray:
        from featuredb.runtime.embedding import EmbeddingError, embed

        name = self.embedding_model()
        try:
            with _quiet_progress():
                vector = embed([text], name)[0]
        except EmbeddingError as e:
            raise QueryError(one_line(e)) from None
        dim = self._vector_dim()
        if vector.shape[0] != dim:
            raise QueryError(f"embedding model {name!r} gives {vector.shape[0]} dimensions, the catalogue stores {dim}")
        return vector

    def _vector_plan(self, where: Where, nprobes: int | None = None, refine: int | None = None,
                     exact: bool = False) -> VectorPlan:
        """How to run a vector search under a filter.

        A filter on coders (coder_id, layer, site, model, hook) that keeps few rows is searched exactly
        over just those rows: an IVF index finds the top of a narrow subset badly (measured: one
        16k coder of 10M rows had recall@10 0.90 at 400 probes, 1.0 exact in ~15 ms). Otherwise
        the IVF probes grow as the kept fraction shrinks (fraction^-1/4, measured to hold
        recall@10 >= 0.98 for one layer of 26 at 1M and 10M rows); ranges count as halves."""
        refine = DEFAULT_REFINE if refine is None else refine
        if exact:
            return VectorPlan(exact=True, nprobes=0, refine=refine)
        rows, fraction = self._matching_rows(where)
        if nprobes is not None:
            return VectorPlan(exact=False, nprobes=nprobes, refine=refine)
        if where.eq and rows <= EXACT_MAX_ROWS and fraction <= EXACT_MAX_FRACTION:
            return VectorPlan(exact=True, nprobes=0, refine=refine)
        return VectorPlan(exact=False, nprobes=self._probes(fraction * 0.5 ** len(where.ranges)), refine=refine)

    @staticmethod
    def _probes(fraction: float) -> int:
        scaled = DEFAULT_NPROBES * max(fraction, 1e-9) ** -0.25
        return int(min(MAX_NPROBES, max(DEFAULT_NPROBES, round(scaled))))

    def _matching_rows(self, where: Where) -> tuple[float, float]:
        """Estimated (rows, fraction of all rows) kept by the coder-level conditions of a filter,
        from the coders' widths (ranges are not counted)."""
        coders = self._coder_table()
        total = float(coders["width"].sum() or 0)
        if not where.eq or total <= 0:
            return total, 1.0
        rows = float(where.matching_coders(coders)["width"].sum() or 0)
        return rows, rows / total

    # --- searches -----------------------------------------------------------------------------

    def search(self, query: str | np.ndarray | list[float]) -> SearchQuery:
        """Semantic search over descriptions: the text is embedded with the catalogue's embedding
        model (or give the query vector itself). Score: cosine similarity."""
        if isinstance(query, str):
            return SearchQuery(self, "semantic", text=check_text(query))
        if query is None:
            raise QueryError("query is empty")
        return SearchQuery(self, "semantic", vector=finite_vector(query, self._vector_dim()))

    def keyword(self, text: str) -> SearchQuery:
        """Full-text (BM25) search over descriptions. Score: BM25."""
        return SearchQuery(self, "keyword", text=check_text(text))

    def hybrid(self, text: str, *, vector: np.ndarray | list[float] | None = None) -> SearchQuery:
        """Semantic and keyword search, fused by reciprocal rank. Score: RRF. `vector` is an
        optional precomputed embedding of the text (otherwise the text is embedded)."""
        text = check_text(text)
        if vector is None:
            return SearchQuery(self, "hybrid", text=text)
        return SearchQuery(self, "hybrid", text=text, vector=finite_vector(vector, self._vector_dim()))

    # --- one feature --------------------------------------------------------------------------

    def feature(self, coder_id: str, index: int) -> dict[str, Any]:
        """Everything stored about one feature: coder, statistics, histogram, logits, neighbours,
        descriptions, top tokens, top and interval examples."""
        coder = self._coder_row(coder_id)
        index = _feature_index(index, coder)
        features = self._features_table()
        columns = [c for c in features.schema.names if c != "vector"]
        where = Filter().eq("coder_id", coder_id).eq("feature", index)

        def feature_row() -> list[dict]:
            return features.search().where(where.render(features.schema)).select(columns).limit(1).to_arrow().to_pylist()

        def example_rows() -> pl.DataFrame:
            if not self._has_table(EXAMPLES_TABLE):
                return pl.DataFrame()
            examples = self._table(EXAMPLES_TABLE)
            table = examples.search().where(where.render(examples.schema)).limit(None).to_arrow()
            return pl.from_arrow(table)  # type: ignore[return-value]

        def description_rows() -> list[dict]:
            if not self._has_table(DESCRIPTIONS_TABLE):
                return []
            descriptions = self._table(DESCRIPTIONS_TABLE)
            return descriptions.search().where(where.render(descriptions.schema)).limit(None).to_arrow().to_pylist()

        with ThreadPoolExecutor(max_workers=3) as pool:
            rows_future = pool.submit(feature_row)
            examples_future = pool.submit(example_rows)
            history_future = pool.submit(description_rows)
            rows, examples, history = rows_future.result(), examples_future.result(), history_future.result()
        if not rows:
            raise NotFound(f"feature {index} of {coder_id!r} is not stored in the catalogue")
        row = rows[0]
        neighbour_ids = row["neighbours"] or []
        neighbour_text = self._descriptions(coder_id, neighbour_ids)
        return _feature_dict(coder, row, examples, neighbour_text, history)

    def _descriptions(self, coder_id: str, features: list[int]) -> dict[int, str | None]:
        if not features:
            return {}
        table = self._features_table()
        where = Filter().eq("coder_id", coder_id).isin("feature", [int(f) for f in features]).render(table.schema)
        rows = table.search().where(where).select(["feature", "description"]).limit(None).to_arrow().to_pylist()
        return {r["feature"]: r["description"] for r in rows}

    def _feature_rows(self, keys: list[tuple[str, int]], columns: list[str]) -> pl.DataFrame:
        """Feature rows for (coder_id, feature) keys, one query per coder, in no particular order."""
        table = self._features_table()
        by_coder: dict[str, list[int]] = {}
        for coder_id, feature in keys:
            by_coder.setdefault(coder_id, []).append(int(feature))
        frames = []
        for coder_id, features in by_coder.items():
            where = Filter().eq("coder_id", coder_id).isin("feature", sorted(set(features))).render(table.schema)
            frames.append(pl.from_arrow(table.search().where(where).select(columns).limit(None).to_arrow()))
        if not frames:
            return pl.from_arrow(table.schema.empty_table().select(columns))  # type: ignore[return-value]
        return pl.concat(frames, how="vertical")  # type: ignore[arg-type]

    # --- activation search, similarity, indexes (in their own modules) ------------------------

    def fires_on(self, text: str, coders: list[str] | str | None = None, *, by: str = "max",
                 positions: list[int] | None = None, max_density: float | None = None, limit: int = 20,
                 per_token: int = 5, device: str | None = None):
        """Run `text` through the model and the chosen coders (default: all) and return the features
        that fire. See featuredb.query.activation.fires_on."""
        from featuredb.query.activation import fires_on

        return fires_on(self, text, coders=coders, by=by, positions=positions, max_density=max_density,
                        limit=limit, per_token=per_token, device=device)

    def with_token(self, token_or_phrase: str, *, window: int = 0):
        """Features whose stored top examples peak on this token (or, with a phrase or a window,
        whose context around the peak contains it). No model needed."""
        from featuredb.query.activation import TokenQuery

        return TokenQuery(self, check_text(token_or_phrase, "token or phrase", 200), window=window)

    def similar(self, coder_id: str, index: int, *, across: bool = True):
        """Nearest features by decoder-direction cosine: within the coder, and with across=True in
        every coder of the same model whose decoder lives in the same space."""
        from featuredb.query.similar import SimilarQuery

        coder = self._coder_row(coder_id)
        return SimilarQuery(self, coder["coder_id"], _feature_index(index, coder), across=bool(across))

    def warm(self) -> None:
        """Load the features table's indexes into memory now (a server calls this at start), so the
        first queries do not pay for reading index partitions from disk."""
        table = self._features_table()
        for index in table.list_indices():
            try:
                table.prewarm_index(index.name)
            except Exception:  # not every index type supports prewarming; it is only a hint
                pass

    def create_indexes(self, **options: Any) -> dict[str, list[str]]:
        """Build the vector, full-text and scalar indexes (see featuredb.store.indexes)."""
        from featuredb.store.indexes import create_indexes

        return create_indexes(self.store, **options)

    def optimize(self, **options: Any) -> dict[str, list[str]]:
        """Fold new rows into the indexes, compact files, and create indexes that are missing."""
        from featuredb.store.indexes import optimize

        return optimize(self.store, **options)


# --- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_progress():
    """No per-tensor "Loading weights" bars from transformers while the embedder loads."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _known_hint(known: list[str]) -> str:
    if not known:
        return " (the catalogue holds no coders)"
    shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
    return f" (known: {shown})"


def _feature_index(index: object, coder: dict) -> int:
    if not isinstance(index, numbers.Integral) or isinstance(index, bool):
        raise QueryError(f"feature index must be an integer, got {index!r}")
    index = int(index)
    if index < 0:
        raise QueryError(f"feature index must be >= 0, got {index}")
    if index >= coder["width"]:
        raise NotFound(f"feature index {index} is out of range for {coder['coder_id']!r} (width {coder['width']})")
    return index


def _examples(examples: pl.DataFrame, kind: str) -> list[dict]:
    if examples.height == 0:
        return []
    keep = ["rank", "tokens", "token_ids", "values", "max_value", "max_position", "doc_id", "context_index"]
    if kind == "interval":
        keep[1:1] = ["bin_min", "bin_max"]
    return examples.filter(pl.col("kind") == kind).sort("rank").select(keep).to_dicts()


def _description_entry(stored: dict, indexed_at: Any) -> dict:
    """One row of the descriptions table as plain values: text, provenance and scores."""
    return {
        "description": stored["description"], "method": stored["method"], "model": stored["explainer_model"],
        "explainer_source": stored["explainer_source"], "prompt_version": stored["prompt_version"],
        "created_at": stored["created_at"].isoformat(), "embedding_model": None, "current": False,
        # made from an older indexing of the coder: history, never the current description
        "stale": stored["indexed_at"] != indexed_at,
        "scores": {"detection": stored["detection_score"], "fuzz": stored["fuzz_score"],
                   "detection_n": stored["detection_n"], "fuzz_n": stored["fuzz_n"],
                   "details": stored["score_details"]},
    }


def _description_list(coder: dict, row: dict, history: list[dict]) -> list[dict]:
    """Every description of the feature, the current one (the features row's) first, then the
    others newest first. A current description with no descriptions-table row (written by an
    older featuredb, or directly into the features table) is listed from the features row."""
    entries = [_description_entry(r, coder["created_at"])
               for r in sorted(history, key=lambda r: r["created_at"], reverse=True)]
    if row.get("description") is None:
        return entries
    current_key = (row["description"], row.get("description_method"), row.get("description_model"))
    current = next((e for e in entries if not e["stale"] and (e["description"], e["method"], e["model"]) == current_key),
                   None)
    if current is None:
        current = {"description": row["description"], "method": row.get("description_method"),
                   "model": row.get("description_model"), "explainer_source": None, "prompt_version": None,
                   "created_at": None, "stale": False, "scores": None}
    else:
        entries.remove(current)
    current.update(current=True, embedding_model=row.get("embedding_model"))
    return [current, *entries]


def _feature_dict(coder: dict, row: dict, examples: pl.DataFrame, neighbour_text: dict[int, str | None],
                  history: list[dict]) -> dict:
    counts = list(row["hist_counts"] or [])
    hist_max = float(row["hist_max"])
    edges = [hist_max * i / len(counts) for i in range(len(counts) + 1)] if counts else []
    return {
        "coder_id": row["coder_id"],
        "feature": row["feature"],
        "model": row["model"],
        "layer": row["layer"],
        "hook": row["hook"],
        "site": row["site"],
        "coder": {k: coder[k] for k in ("kind", "architecture", "width", "d_in", "d_out", "hook_out", "source",
                                       "tokens_indexed", "contexts_indexed", "context", "top_k")},
        "description": row.get("description"),
        "descriptions": _description_list(coder, row, history),
        "density": row["density"],
        "active_count": row["active_count"],
        "max_activation": row["max_activation"],
        "mean_activation": row["mean_activation"],
        "std_activation": row["std_activation"],
        "histogram": {"counts": counts, "max": hist_max, "edges": edges},
        "logits": {
            "top": [{"token": t, "id": i, "value": v} for t, i, v in
                    zip(row["top_logit_tokens"], row["top_logit_ids"], row["top_logit_values"])],
            "bottom": [{"token": t, "id": i, "value": v} for t, i, v in
                       zip(row["bottom_logit_tokens"], row["bottom_logit_ids"], row["bottom_logit_values"])],
        },
        "neighbours": [{"feature": f, "cosine": c, "description": neighbour_text.get(f)}
                       for f, c in zip(row["neighbours"], row["neighbour_cosines"])],
        "top_tokens": [{"token": t, "count": c} for t, c in zip(row["top_tokens"], row["top_token_counts"])],
        "top_examples": _examples(examples, "top"),
        "interval_examples": _examples(examples, "interval"),
    }


__all__ = ["Catalogue", "DEFAULT_DB", "QueryError", "default_db", "open"]
