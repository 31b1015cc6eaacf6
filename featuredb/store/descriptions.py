"""The description write path.

Two places hold descriptions:

- the `descriptions` table keeps every description ever made, with provenance (method,
  explainer model and endpoint, prompt version, time, the indexing it was made from) and scores.
  It is append-only, but for one thing: an embedding score computed after its row was written
  (`set_embedding_scores`, for rows made before the scorer existed).
- the `features` table's description columns hold each feature's current best description and
  its embedding (`vector`, with `embedding_model`), and that description's score
  (`description_score`, with `description_score_method`), which search filters on.

`write_descriptions` validates new rows before touching anything, appends them (one commit), then
`sync_features` recomputes the best description of the features concerned from the descriptions
table and updates only the description columns of those feature rows (one merge_insert commit that
never inserts or deletes rows and leaves every other column alone). A crash between the two
commits is repaired by the next `sync_features` (every describe run ends with one).
An import instead checks its rows against the coder it is about to write (`check_descriptions`)
and appends them before that coder is listed (`append_descriptions`), as one step of its own
all-or-nothing write.

Only descriptions made from the coder's current indexing (`indexed_at` = the coder's
`coders.created_at`) count: re-indexing a coder makes its old descriptions history.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featuredb.store import FEATURES_TABLE, FeatureStore, Filter, StoreError
from featuredb.store.connect import connect
from featuredb.store.failures import Commits, writing
from featuredb.store.schema import (DESCRIPTIONS_TABLE, absent_optional_fields, conform_table, descriptions_schema,
                                    vector_dim_of)

# How descriptions rank against each other when choosing a feature's current one.
# `words` (offline, named classes and patterns) ranks above `tokens` (offline, literal tokens).
METHOD_RANK = {"tokens": 0, "words": 1, "llm": 2, "local": 2, "manual": 3}
MAX_DESCRIPTION_CHARS = 2000
DESCRIPTION_COLUMNS = ("description", "description_method", "description_model", "embedding_model", "vector")
SCORE_COLUMNS = ("description_score", "description_score_method")
EMBEDDING_SCORE_METHOD = "embedding"  # describe/embedding_score.py: the offline AUROC every description gets
# One row of the descriptions table (written once per feature, method and moment).
DESCRIPTION_ROW_KEY = ("coder_id", "feature", "method", "created_at")

Embedder = Callable[[list[str], str], np.ndarray]


@dataclass
class SyncResult:
    updated: int = 0  # feature rows whose description columns changed
    embedded: int = 0
    embed_seconds: float = 0.0

    def __iadd__(self, other: SyncResult) -> SyncResult:
        self.updated += other.updated
        self.embedded += other.embedded
        self.embed_seconds += other.embed_seconds
        return self


def coder_indexed_at(store: FeatureStore, coder_id: str) -> dt.datetime:
    rows = [r for r in store.coders().to_dicts() if r["coder_id"] == coder_id]
    if not rows:
        raise StoreError(f"no coder {coder_id!r} in {store.uri}")
    return rows[0]["created_at"]


def write_descriptions(
    store: FeatureStore,
    coder_id: str,
    rows: pa.Table | Mapping[str, object] | list[dict],
    *,
    embedding_model: str | None = None,
    embedder: Embedder | None = None,
    sync: bool = True,
) -> SyncResult:
    """Record new descriptions of coder `coder_id`'s features and update their current description.

    `rows` has the columns of `descriptions_schema()` (a table, a dict of columns or a list of row
    dicts). Everything is validated before anything is written: StoreError on bad input.
    `sync=False` only records the rows, for a caller that has written the features' description
    columns itself (an import restoring them exactly); a later `sync_features` repairs any drift.
    """
    _require_writable(store)
    if sync:
        _require_embedder(embedder, embedding_model)
    if isinstance(rows, list):
        rows = {name: [r.get(name) for r in rows] for name in descriptions_schema().names}
    table = conform_table(rows, descriptions_schema(), "descriptions")
    if table.num_rows == 0:
        return SyncResult()
    _validate(store, coder_id, table)
    with writing(f"descriptions of coder {coder_id!r}", store.uri):
        _descriptions_table(store).add(table)
    if not sync:
        return SyncResult()
    features = sorted(set(table["feature"].to_pylist()))
    return sync_features(store, coder_id, features, embedding_model=embedding_model, embedder=embedder)


def _validate(store: FeatureStore, coder_id: str, table: pa.Table) -> None:
    wanted = sorted(set(table["feature"].to_pylist()))
    stored = {r["feature"] for r in _read(store, FEATURES_TABLE, coder_id, wanted, ["feature"])}
    check_descriptions(table, coder_id, coder_indexed_at(store, coder_id), stored)


def check_descriptions(table: pa.Table, coder_id: str, indexed_at: dt.datetime, features: Collection[int]) -> None:
    """StoreError unless every row of `table` (conformed to descriptions_schema) describes one of
    `features` of coder `coder_id` as indexed at `indexed_at`, with a valid text, method and scores."""
    other = [v for v in pc.unique(table["coder_id"]).to_pylist() if v != coder_id]
    if other:
        raise StoreError(f"descriptions: rows carry coder_id {other[0]!r}, expected {coder_id!r}")
    for text in table["description"].to_pylist():
        if not text.strip():
            raise StoreError("descriptions: empty description")
        if len(text) > MAX_DESCRIPTION_CHARS:
            raise StoreError(f"descriptions: description longer than {MAX_DESCRIPTION_CHARS} characters")
    unknown = [m for m in pc.unique(table["method"]).to_pylist() if m not in METHOD_RANK]
    if unknown:
        raise StoreError(f"descriptions: method {unknown[0]!r} is not one of {sorted(METHOD_RANK)}")
    for column in ("detection_score", "fuzz_score", "embedding_score"):
        for value in table[column].to_pylist():
            if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise StoreError(f"descriptions: {column} {value!r} is not in [0, 1]")
    stale = [v for v in pc.unique(table["indexed_at"]).to_pylist() if v != indexed_at]
    if stale:
        raise StoreError(f"descriptions: made from an indexing of {coder_id!r} at {stale[0]}, but the "
                         f"coder was indexed again at {indexed_at}; describe it again")
    missing = [f for f in sorted(set(table["feature"].to_pylist())) if f not in features]
    if missing:
        raise StoreError(f"descriptions: coder {coder_id!r} has no feature {missing[0]}")


def append_descriptions(store: FeatureStore, table: pa.Table, commits: Commits) -> None:
    """Append rows already checked (`check_descriptions`) against a coder that need not be listed
    yet: an import writes its descriptions before the coders row that completes it. The commit is
    recorded in `commits`, for the caller to undo with the rest of its write."""
    _require_writable(store)
    if table.num_rows:
        commits.commit(_descriptions_table(store), _append, table)


def _append(descriptions, table: pa.Table) -> None:
    descriptions.add(table)


def current_descriptions(store: FeatureStore, coder_id: str, features: list[int] | None = None) -> list[dict]:
    """Descriptions made from the coder's current indexing (optionally of some features only)."""
    if DESCRIPTIONS_TABLE not in store.table_names():
        return []
    return descriptions_of_indexing(store, coder_id, coder_indexed_at(store, coder_id), features)


def descriptions_of_indexing(store: FeatureStore, coder_id: str, indexed_at: dt.datetime,
                             features: list[int] | None = None) -> list[dict]:
    """Descriptions made from the coder's indexing at `indexed_at`, whether or not it is listed."""
    rows = _read(store, DESCRIPTIONS_TABLE, coder_id, features, None)
    return [r for r in rows if r["indexed_at"] == indexed_at]


def _score(row: Mapping[str, Any]) -> float | None:
    values = [row[c] for c in ("detection_score", "fuzz_score") if row.get(c) is not None]
    return sum(values) / len(values) if values else None


def best_description(rows: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """A feature's current description: highest method rank (manual > llm/local > tokens), then
    scored before unscored, then the higher mean of detection and fuzz scores, then the newest."""
    def key(row):
        score = _score(row)
        return (METHOD_RANK.get(row["method"], -1), score is not None, score or 0.0, row["created_at"])

    return max(rows, key=key) if rows else None


def sync_features(
    store: FeatureStore,
    coder_id: str,
    features: list[int] | None = None,
    *,
    embedding_model: str | None = None,
    embedder: Embedder | None = None,
) -> SyncResult:
    """Bring the features' description columns in line with their best current description,
    embedding with `embedding_model` whatever changed or was embedded with another model.
    Features without any current description are left as they are. The store computes no
    embeddings itself: `embedder(texts, embedding_model)` does (featuredb.runtime.embedding.embed)."""
    _require_writable(store)
    _require_embedder(embedder, embedding_model)
    by_feature: dict[int, list[dict]] = {}
    for row in current_descriptions(store, coder_id, features):
        by_feature.setdefault(row["feature"], []).append(row)
    if not by_feature:
        return SyncResult()
    columns = ["feature", "description", "description_method", "description_model", "embedding_model",
               *SCORE_COLUMNS]
    stored = {r["feature"]: r for r in _read(store, FEATURES_TABLE, coder_id, sorted(by_feature), columns)}
    changes, rescored = [], []
    for feature, rows in sorted(by_feature.items()):
        best = best_description(rows)
        now = stored.get(feature)
        if best is None or now is None:
            continue
        wanted = (best["description"], best["method"], best["explainer_model"], embedding_model)
        have = (now["description"], now["description_method"], now["description_model"], now["embedding_model"])
        score = description_score(best)
        if wanted != have:
            changes.append((feature, *wanted, *score))
        elif score != (_as_float32(now["description_score"]), now["description_score_method"]):
            rescored.append((feature, *score))  # same text, new score: no embedding needed
    _write_scores(store, coder_id, rescored)
    if not changes:
        return SyncResult()

    features_table = store.table(FEATURES_TABLE)
    dim = vector_dim_of(features_table.schema)
    vectors, seconds = _embed([c[1] for c in changes], embedding_model, embedder)
    if dim is None or vectors.shape != (len(changes), dim):
        raise StoreError(f"embedding model {embedding_model!r} gives {vectors.shape[-1]}-dim vectors but the "
                         f"features table's vector column holds {dim}")
    if not np.isfinite(vectors).all():
        raise StoreError(f"embedding model {embedding_model!r} returned non-finite values")
    fields = [features_table.schema.field(n) for n in ("coder_id", "feature", *DESCRIPTION_COLUMNS, *SCORE_COLUMNS)]
    update = pa.table({
        "coder_id": [coder_id] * len(changes),
        "feature": [c[0] for c in changes],
        "description": [c[1] for c in changes],
        "description_method": [c[2] for c in changes],
        "description_model": [c[3] for c in changes],
        "embedding_model": [c[4] for c in changes],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
        "description_score": [c[5] for c in changes],
        "description_score_method": [c[6] for c in changes],
    }).cast(pa.schema(fields))
    # Matched rows only: a feature deleted meanwhile is not brought back; other columns untouched.
    with writing(f"the description columns of coder {coder_id!r}", store.uri):
        features_table.merge_insert(["coder_id", "feature"]).when_matched_update_all().execute(update)
    return SyncResult(updated=len(changes), embedded=len(changes), embed_seconds=seconds)


def description_score(row: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """The score a feature row shows for its current description `row` (a descriptions row) and its
    method: the embedding score, which every description gets offline (so features compare)."""
    value = row.get("embedding_score")
    return (None, None) if value is None else (_as_float32(value), EMBEDDING_SCORE_METHOD)


def _as_float32(value: float | None) -> float | None:
    """As the float32 column stores it (so a stored score compares equal to the one it came from)."""
    return None if value is None else float(np.float32(value))


def _write_scores(store: FeatureStore, coder_id: str, scores: list[tuple[int, float | None, str | None]]) -> None:
    """Only the score columns of these feature rows (one merge_insert commit)."""
    if not scores:
        return
    features_table = store.table(FEATURES_TABLE)
    fields = [features_table.schema.field(n) for n in ("coder_id", "feature", *SCORE_COLUMNS)]
    update = pa.table({
        "coder_id": [coder_id] * len(scores), "feature": [s[0] for s in scores],
        "description_score": [s[1] for s in scores], "description_score_method": [s[2] for s in scores],
    }).cast(pa.schema(fields))
    with writing(f"the description scores of coder {coder_id!r}", store.uri):
        features_table.merge_insert(["coder_id", "feature"]).when_matched_update_all().execute(update)


def set_embedding_scores(store: FeatureStore, coder_id: str, rows: list[dict]) -> None:
    """Fill in the embedding score of stored descriptions rows (as read by current_descriptions, with
    `embedding_score` and `embedding_score_details` set): one merge_insert commit matching each row
    by (coder_id, feature, method, created_at). The one change ever made to a stored description
    row: its text and provenance stay as written. Call sync_features after, for the feature rows."""
    _require_writable(store)
    if not rows:
        return
    table = _descriptions_table(store)
    update = conform_table({name: [r.get(name) for r in rows] for name in descriptions_schema().names},
                           descriptions_schema(), "descriptions")
    check_descriptions(update, coder_id, coder_indexed_at(store, coder_id), {r["feature"] for r in rows})
    with writing(f"description scores of coder {coder_id!r}", store.uri):
        table.merge_insert(list(DESCRIPTION_ROW_KEY)).when_matched_update_all().execute(update)


def _require_embedder(embedder: Embedder | None, embedding_model: str | None) -> None:
    if embedder is None or not embedding_model:
        raise StoreError("updating descriptions needs an embedder and the name of its embedding model")


def _embed(texts: list[str], model: str, embedder: Embedder) -> tuple[np.ndarray, float]:
    """The embeddings and the seconds spent computing them."""
    started = time.perf_counter()
    vectors = np.asarray(embedder(texts, model), dtype=np.float32)
    return vectors, time.perf_counter() - started


def _descriptions_table(store: FeatureStore):
    """The descriptions table, created when missing; StoreError if it holds another schema."""
    if DESCRIPTIONS_TABLE not in store.table_names():
        # exist_ok: another writer may have created it since we looked
        return connect(store.uri).create_table(DESCRIPTIONS_TABLE, schema=descriptions_schema(), exist_ok=True)
    table = store.table(DESCRIPTIONS_TABLE)
    absent = absent_optional_fields(table.schema, descriptions_schema())
    if absent and not store.read_only:  # written before those columns existed (e.g. evidence)
        table.add_columns(pa.schema(absent))
    if not table.schema.equals(descriptions_schema()):
        raise StoreError(f"table {DESCRIPTIONS_TABLE!r} in {store.uri} has a different schema than featuredb expects")
    return table


def _require_writable(store: FeatureStore) -> None:
    if store.read_only:
        raise StoreError(f"store is read-only: {store.uri}")


def _read(store: FeatureStore, name: str, coder_id: str, features: list[int] | None, columns: list[str] | None) -> list[dict]:
    if name not in store.table_names():
        return []
    table = store.table(name)
    where = Filter().eq("coder_id", coder_id)
    if features is not None:
        where = where.isin("feature", [int(f) for f in features])
    query = table.search().limit(None).where(where.render(table.schema))
    if columns is not None:
        query = query.select(columns)
    return query.to_arrow().to_pylist()
