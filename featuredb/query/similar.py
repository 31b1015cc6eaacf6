"""Decoder directions and similarity search between features.

The features table has no decoder vectors, so they live in their own tables, one per decoder
width: `decoders_<d>` (coder_id, feature, model, layer, hook, site, space, vector[d]), each row a
unit-norm decoder direction. `space` names the basis the direction lives in: "residual" for every
coder whose output adds into the residual stream (residual SAEs, MLP-out SAEs, transcoders), else
the output hook itself (e.g. attention SAEs before o_proj). Only directions of the same model and
space are compared across coders; within a coder everything is comparable.

`write_decoder_vectors(store, coder_id, W_dec)` writes a coder's rows (the indexer calls it right
after FeatureStore.write_coder); `Catalogue.similar` searches them with a vector index once
`create_indexes`/`optimize` built one. A catalogue without decoder vectors falls back to the
`neighbours` column that the indexer stores (top 10 within the coder).

by="cooccurrence" ranks instead the features that fire on the same tokens (the features table's
`cooccurring_*` columns, counted by the indexer over every coder of its pass): score = Jaccard.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl

from featuredb.errors import QueryError, one_line
from featuredb.store import Filter, StoreError
from featuredb.store.decoder_vectors import decoder_space
from featuredb.store.schema import COOCCURRENCE_COLUMNS, decoders_table_name
from featuredb.query.builder import QueryBuilder
from featuredb.query.reader import scope_plan
from featuredb.query.search import RESULT_COLUMNS, RESULT_SCHEMA, empty_results


SIMILAR_BY = ("decoder", "cooccurrence")


@dataclasses.dataclass(frozen=True)
class SimilarQuery(QueryBuilder):
    """Features nearest to one feature by decoder cosine (score = cosine similarity), or with
    by="cooccurrence" the features that fire on the same tokens (score = Jaccard).

    across=False: the same coder only. across=True: every coder of the same model whose decoder
    directions live in the same space (see the module docstring); for co-occurrence, every coder
    indexed in the same pass. `where` narrows further (coder_id/layer/site/hook inside the index;
    density/max_activation after it)."""

    coder_id: str
    index: int
    across: bool = True
    by: str = "decoder"

    def __post_init__(self) -> None:
        if self.by not in SIMILAR_BY:
            raise QueryError(f"unknown similarity {self.by!r} (choose from {', '.join(SIMILAR_BY)})")

    @property
    def uses_decoder_vectors(self) -> bool:
        return self._table() is not None

    def _table(self):
        reader = self.reader
        coder = reader.coder_row(self.coder_id)
        name = decoders_table_name(coder["d_out"])
        if not reader.has_table(name):
            return None
        table = reader.table(name)
        return table if table.count_rows(Filter().eq("coder_id", self.coder_id).render(table.schema)) else None

    def _execute(self, n: int) -> pl.DataFrame:
        if self.by == "cooccurrence":
            return self._from_cooccurrence(n)
        table = self._table()
        if table is None:
            return self._from_neighbours(n)
        mine = Filter().eq("coder_id", self.coder_id).eq("feature", self.index).render(table.schema)
        own = table.search().where(mine).select(["vector", "model", "space"]).limit(1).to_arrow().to_pylist()
        if not own:
            raise QueryError(f"feature {self.index} of {self.coder_id!r} has no decoder direction stored "
                             "(an all-zero decoder row)")
        scope = (Filter().eq("model", own[0]["model"]).eq("space", own[0]["space"]) if self.across
                 else Filter().eq("coder_id", self.coder_id))
        for column, values in self.conditions.eq:
            scope = scope.eq(column, values[0]) if len(values) == 1 else scope.isin(column, values)
        try:
            condition = scope.render(table.schema)
        except StoreError as e:
            raise QueryError(one_line(e)) from None
        depth = n + 1 if not self.conditions.ranges else 4 * n + 1
        # a narrow scope is searched exactly over its rows (see Reader.vector_plan)
        plan = scope_plan(*self._scope_rows(table, own[0]["model"], own[0]["space"]))
        query = plan.apply(table.search(np.asarray(own[0]["vector"], dtype=np.float32), vector_column_name="vector")
                           .distance_type("cosine"))
        query = query.where(condition, prefilter=True).select(["coder_id", "feature", "_distance"]).limit(depth)
        hits = pl.from_arrow(query.to_arrow())
        assert isinstance(hits, pl.DataFrame)
        hits = hits.filter(~((pl.col("coder_id") == self.coder_id) & (pl.col("feature") == self.index)))
        hits = hits.with_columns(score=(1.0 - pl.col("_distance").cast(pl.Float64))).drop("_distance")
        return self._finish(hits, n)

    def _scope_rows(self, table, model: str, space: str) -> tuple[float, float]:
        """Estimated rows of the decoders table the scope keeps, and their fraction."""
        coders = self.reader.coder_table()
        dim = table.schema.field("vector").type.list_size
        in_table = coders.filter(pl.col("d_out") == dim)
        total = float(in_table["width"].sum() or 0)
        if total <= 0:
            return 0.0, 1.0
        if self.across:
            spaces = [decoder_space(site, h) for site, h in zip(in_table["site"].to_list(), in_table["hook_out"].to_list())]
            keep = in_table.with_columns(space=pl.Series(spaces, dtype=pl.String)).filter(
                (pl.col("model") == model) & (pl.col("space") == space))
        else:
            keep = in_table.filter(pl.col("coder_id") == self.coder_id)
        keep = self.conditions.matching_coders(keep)
        rows = float(keep["width"].sum() or 0)
        return rows, max(rows / total, 1e-9)

    def _from_neighbours(self, n: int) -> pl.DataFrame:
        """Fallback without decoder vectors: the stored top-10 neighbours within the coder."""
        reader = self.reader
        rows = reader.feature_rows([(self.coder_id, self.index)], ["neighbours", "neighbour_cosines"]).to_dicts()
        if not rows:
            raise QueryError(f"feature {self.index} of {self.coder_id!r} is not stored in the catalogue")
        hits = pl.DataFrame({"coder_id": [self.coder_id] * len(rows[0]["neighbours"]),
                             "feature": rows[0]["neighbours"], "score": rows[0]["neighbour_cosines"]},
                            schema={"coder_id": pl.String, "feature": pl.Int64, "score": pl.Float64})
        if self.conditions.eq and self.coder_id not in self.conditions.matching_coders(reader.coder_table())["coder_id"].to_list():
            hits = hits.head(0)
        return self._finish(hits, n)

    def _from_cooccurrence(self, n: int) -> pl.DataFrame:
        """The stored co-firing partners (best Jaccard first), narrowed by `where`."""
        reader = self.reader
        schema = reader.features_schema()
        if "cooccurring_features" not in schema.names:
            raise QueryError("this catalogue has no co-occurrence counts (indexed by an older featuredb): index it again")
        rows = reader.feature_rows([(self.coder_id, self.index)], list(COOCCURRENCE_COLUMNS)).to_dicts()
        if not rows:
            raise QueryError(f"feature {self.index} of {self.coder_id!r} is not stored in the catalogue")
        row = rows[0]
        if row["cooccurring_features"] is None:
            raise QueryError(f"co-occurrence was not counted for {self.coder_id!r} (indexed with --cooccurrence 0)")
        hits = pl.DataFrame({"coder_id": row["cooccurring_coder_ids"], "feature": row["cooccurring_features"],
                             "score": row["cooccurring_jaccard"]},
                            schema={"coder_id": pl.String, "feature": pl.Int64, "score": pl.Float64})
        if not self.across:
            hits = hits.filter(pl.col("coder_id") == self.coder_id)
        if self.conditions.eq:
            hits = hits.filter(pl.col("coder_id").is_in(
                self.conditions.matching_coders(reader.coder_table())["coder_id"].to_list()))
        return self._finish(hits, n)

    def _finish(self, hits: pl.DataFrame, n: int) -> pl.DataFrame:
        if hits.height == 0:
            return empty_results()
        info = self.reader.feature_rows(list(hits.select("coder_id", "feature").iter_rows()), RESULT_COLUMNS)
        out = hits.join(info, on=["coder_id", "feature"], how="left").filter(self.conditions.in_ranges())
        out = out.sort(["score", "coder_id", "feature"], descending=[True, False, False]).head(n)
        return out.select([pl.col(c).cast(t) for c, t in RESULT_SCHEMA.items()])
