"""FeatureStore: the LanceDB-backed tables of coders (SAEs/transcoders), features and examples.

Write model: `write_coder` replaces everything stored for one coder. Input given whole is validated
before the database is touched; input given as a stream of batches (the indexer: memory bounded by
a batch of features, not by the coder) is validated batch by batch as it is written, and a bad
batch undoes the write. Each table is updated with ONE commit (an append for a new coder, else a
`merge_insert` that upserts the coder's rows and deletes its rows missing from the new data), so a
reader sees either the old or the new rows of that table, never a mix or a gap. Examples are stored
compact (store/examples.py): the context windows they show are added to `contexts` (and new token
strings to `vocabulary`) before the examples commit, so a stored example always finds its context.
Tables are written examples -> features -> coders, so a coder appears in `coders` only once its
features and examples are stored.
Known window: the three tables are separate commits; a reader between them can see new examples
with old features. An exception mid-write restores the tables already committed to their previous
versions (an I/O failure such as a full disk is then a StoreError saying what could not be written
where); a hard crash between commits is repaired by simply writing the coder again.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.table import Table

from featuredb.store.connect import connect, is_remote
from featuredb.store.decoder_vectors import delete_decoder_vectors
from featuredb.store.examples import (CompactExamples, Vocabulary, compact, context_strings, expand, needs_contexts,
                                      vocabulary_rows)
from featuredb.store.failures import all_or_nothing, writing
from featuredb.store.filters import Filter, column_ref, sql_literal
from featuredb.store.scan import scan, scan_batches
from featuredb.store.schema import (
    CODER_KINDS,
    DEFAULT_VECTOR_DIM,
    EXAMPLE_KINDS,
    EXAMPLES_KEY,
    EXAMPLES_TABLE,
    FEATURES_KEY,
    FEATURES_TABLE,
    CODERS_KEY,
    CODERS_TABLE,
    CONTEXTS_TABLE,
    IMPORTS_TABLE,
    LEGACY_CODERS_TABLE,
    LEGACY_EXAMPLES_TABLE,
    PENDING_TABLE,
    VOCABULARY_TABLE,
    MULTI_LAYER_KINDS,
    SITES,
    StoreError,
    absent_optional_fields,
    hook_layers,
    slot_of_features,
    vector_dim_of,
    conform_row,
    conform_table,
    contexts_schema,
    example_activations_schema,
    examples_schema,
    features_schema,
    pending_schema,
    vocabulary_schema,
    imports_schema,
    coders_schema,
)

__all__ = ["FeatureStore", "StoreError"]

# Rows are streamed to LanceDB in batches of about this size, so a coder with tens of millions of
# example rows does not need a second in-memory copy of its data. (16 MiB measured no slower than
# 64 MiB and clearly faster than 256 MiB on a 2-core machine.)
_BATCH_BYTES = 16 * 1024 * 1024
# Columns copied from the coder onto each feature row (for filtering without a join).
_DENORMALISED_COLUMNS = ("model", "layer", "hook", "site")
_CONTEXT_COLUMNS = ("tokens", "token_ids", "values")
# Wide example rows are compacted in slices of this many rows (bounded memory for a big import).
_COMPACT_ROWS = 65_536
# Contexts looked up with one IN (...) query at most (a feature page needs ~64).
_CONTEXT_LOOKUP = 4096
_VERSION_CHECK_SECONDS = 1.0


class FeatureStore:
    """A feature database at a local directory or object-store URI (e.g. s3://bucket/db)."""

    def __init__(self, uri: str | Path, *, vector_dim: int = DEFAULT_VECTOR_DIM, read_only: bool = False) -> None:
        self._schemas: dict[str, pa.Schema] = {
            CODERS_TABLE: coders_schema(),
            FEATURES_TABLE: features_schema(vector_dim),
            EXAMPLES_TABLE: example_activations_schema(),
            CONTEXTS_TABLE: contexts_schema(),
            VOCABULARY_TABLE: vocabulary_schema(),
        }
        self.uri: str = _prepare_uri(uri, read_only)
        self.vector_dim = vector_dim
        self.read_only = read_only
        # Zero interval: every read checks for the latest version, so tables handed out by
        # `table()` see writes made through other handles or processes.
        self._db = connect(self.uri, consistent_reads=True)
        self._vocabularies: dict[tuple[str, int], Vocabulary] = {}  # (model, vocabulary table version) ->
        self._lock = threading.Lock()
        self._handles: dict[str, Table] = {}
        self._legacy_gone = False  # once the wide examples table is gone (upgraded), it never comes back
        self._vocabulary_version: tuple[float, int] = (float("-inf"), -1)
        self._upgrade_names()
        self._keep_stored_vector_type()
        self._upgrade_columns()
        if not read_only and LEGACY_EXAMPLES_TABLE in self.table_names():
            from featuredb.store.upgrade import upgrade_examples

            upgrade_examples(self)

    def _upgrade_names(self) -> None:
        """Catalogues written before featuredb named everything "coder" hold a `saes` table and
        `sae_id` columns: a writable open renames them once (metadata only, rows untouched); a
        read-only one asks for that."""
        names = self.table_names()
        if LEGACY_CODERS_TABLE not in names:
            return
        if self.read_only:
            raise StoreError(f"{self.uri} was written by an older featuredb (table 'saes'): upgrade it once with "
                             f"`featuredb describe --db {self.uri}` (renames sae_id to coder_id, keeps every row)")
        for name in names:
            table = self._db.open_table(name)
            if "sae_id" in table.schema.names:
                table.alter_columns({"path": "sae_id", "rename": "coder_id"})
        if CODERS_TABLE not in names:
            legacy = self._db.open_table(LEGACY_CODERS_TABLE).to_arrow()
            self._db.create_table(CODERS_TABLE, conform_table(legacy, self._schemas[CODERS_TABLE], "coders"))
        self._db.drop_table(LEGACY_CODERS_TABLE)

    def _keep_stored_vector_type(self) -> None:
        """A catalogue written with float32 description vectors keeps them (new ones are float16)."""
        table = self._open(FEATURES_TABLE)
        if table is not None and vector_dim_of(table.schema) == self.vector_dim:
            stored = table.schema.field("vector").type.value_type
            self._schemas[FEATURES_TABLE] = features_schema(self.vector_dim, stored)

    def schema(self, name: str) -> pa.Schema:
        """The schema this store writes table `name` with."""
        return self._schemas[name]

    def _upgrade_columns(self) -> None:
        """Optional columns added since a catalogue was written (e.g. `layers`, `layer_write` for
        multi-layer coders) are added to it, all null, on its first writable open (a metadata
        change: no row is rewritten). Readers take a table without them as all null."""
        if self.read_only:
            return
        for name in set(self._schemas) & set(self.table_names()):
            table = self._db.open_table(name)
            absent = absent_optional_fields(table.schema, self._schemas[name])
            if absent:
                table.add_columns(pa.schema(absent))

    def __repr__(self) -> str:
        return f"FeatureStore({self.uri!r}, vector_dim={self.vector_dim}, read_only={self.read_only})"

    # --- tables ---------------------------------------------------------------------------------

    def table_names(self) -> list[str]:
        """Names of the tables that exist in the database, sorted."""
        names: list[str] = []
        page_token: str | None = None
        while True:  # list_tables is paginated (table_names() is deprecated and capped at 10)
            response = self._db.list_tables(page_token=page_token)
            names.extend(response.tables)
            page_token = response.page_token
            if not page_token:
                return sorted(names)

    def table(self, name: str) -> Table:
        """The raw LanceDB table `name` (for the query layer); StoreError if it does not exist."""
        table = self._open(name)
        if table is None:
            raise StoreError(f"no table named {name!r} in {self.uri} (tables: {self.table_names()})")
        return table

    def _open(self, name: str) -> Table | None:
        """An open handle on table `name` (None if there is none). Handles are kept (with consistent
        reads each one sees every later version), so a read does not list the catalogue's tables
        (a directory listing; an object-store request on s3://) each time."""
        with self._lock:
            if name in self._handles:
                return self._handles[name]
        if name not in self.table_names():
            return None
        with self._lock:
            return self._handles.setdefault(name, self._db.open_table(name))

    def _forget_tables(self) -> None:
        """After a table is dropped here."""
        with self._lock:
            self._handles.clear()

    # --- writing --------------------------------------------------------------------------------

    def write_coder(
        self,
        coder: Mapping[str, object],
        features: pa.Table | Mapping[str, object] | Iterable[pa.Table],
        examples: pa.Table | Mapping[str, object] | Iterable[pa.Table] | CompactExamples,
    ) -> bool:
        """Store one coder, replacing whatever was stored for its coder_id before.

        `coder` is one row of the coders table (created_at defaults to now). `features` holds the
        coder's feature rows and `examples` its example rows (schema.examples_schema: each with its
        context's tokens), each as one table (checked whole before anything is written) or as an
        iterable of tables in feature order (checked batch by batch while written; memory bounded
        by a batch). The indexer hands examples already compact (CompactExamples). Invalid input
        raises StoreError and leaves the store as it was. Returns whether rows of the coder may have
        been stored before (False: a coder new to the store, its rows appended).
        """
        self._require_writable()
        coder_row = _validated_coder(coder)
        coder_id = coder_row["coder_id"][0].as_py()
        model, width = coder_row["model"][0].as_py(), coder_row["width"][0].as_py()
        whole_features, whole_examples = _is_whole(features), _is_whole(examples)
        if whole_features:
            feature_rows = conform_table(features, self._schemas[FEATURES_TABLE], "features")
            _check_features(feature_rows, coder_row)
            features = [feature_rows]
        if whole_examples:
            wide = conform_table(examples, examples_schema(), "examples")
            _check_examples(wide, coder_id, width, feature_rows["feature"] if whole_features else None)
            examples = [wide]
        self._check_stored_schemas()

        def checked_features() -> Iterator[pa.Table]:
            for batch in features:
                if not whole_features:
                    batch = conform_table(batch, self._schemas[FEATURES_TABLE], "features")
                    _check_features(batch, coder_row)
                yield batch

        with all_or_nothing(f"coder {coder_id!r}", self.uri) as commits:
            tables = {name: self._open_or_create(name) for name in
                      (VOCABULARY_TABLE, CONTEXTS_TABLE, EXAMPLES_TABLE, FEATURES_TABLE, CODERS_TABLE)}
            pending = self._db.create_table(PENDING_TABLE, schema=pending_schema(), exist_ok=True)
            replacing = self._may_have_rows(coder_id, tables[CODERS_TABLE], pending)
            if not replacing:  # from here until it is listed, a kill leaves it pending: its next write replaces
                commits.commit(pending, _mark_pending, coder_id)
            self._commit_examples(commits, tables, examples, coder_id, model, width, whole_examples, replacing)
            commits.commit(tables[FEATURES_TABLE], _replace_coder_rows, checked_features(), FEATURES_KEY, coder_id,
                           replacing)
            # last: listing the coder means it is complete
            commits.commit(tables[CODERS_TABLE], _replace_coder_rows, [coder_row], CODERS_KEY, coder_id, replacing)
        with writing(f"the end of the write of coder {coder_id!r}", self.uri):  # no longer pending (if it was)
            pending.delete(Filter().eq("coder_id", coder_id).render(pending.schema))
        return replacing

    @staticmethod
    def _may_have_rows(coder_id: str, coders: Table, pending: Table) -> bool:
        """Whether a coder may have rows stored: it is listed, or a write of it did not finish.
        (Two small tables, where counting its rows in the examples would scan them all.)"""
        return any(table.count_rows(Filter().eq("coder_id", coder_id).render(table.schema)) for table in (coders, pending))

    def write_examples(self, coder_id: str, model: str, batches: Iterable[pa.Table | pa.RecordBatch]) -> None:
        """Replace one coder's examples (wide rows, streamed and checked batch by batch) in one commit."""
        self._require_writable()
        with all_or_nothing(f"the examples of coder {coder_id!r}", self.uri) as commits:
            tables = {name: self._open_or_create(name) for name in (VOCABULARY_TABLE, CONTEXTS_TABLE, EXAMPLES_TABLE)}
            replacing = EXAMPLES_TABLE in self.table_names() and bool(
                tables[EXAMPLES_TABLE].count_rows(Filter().eq("coder_id", coder_id).render(tables[EXAMPLES_TABLE].schema)))
            self._commit_examples(commits, tables, batches, coder_id, model, None, False, replacing)

    def drop_table(self, name: str) -> None:
        self._require_writable()
        with writing(f"the removal of table {name!r}", self.uri):
            self._db.drop_table(name)
        self._forget_tables()

    def _commit_examples(self, commits, tables: dict[str, Table], examples, coder_id: str, model: str,
                         width: int | None, checked: bool, replacing: bool) -> None:
        # the examples' contexts and vocabulary are added while the examples stream in, each
        # batch's before the batch: record their versions first, so a failure undoes them too
        for name in (VOCABULARY_TABLE, CONTEXTS_TABLE):
            commits.made.append((tables[name], tables[name].version))
        compact_batches = self._compact_batches(examples, coder_id, model, width, tables, checked)
        commits.commit(tables[EXAMPLES_TABLE], _replace_coder_rows, compact_batches, EXAMPLES_KEY, coder_id, replacing)

    def _compact_batches(self, examples: Iterable[pa.Table] | CompactExamples, coder_id: str, model: str,
                         width: int | None, tables: dict[str, Table], checked: bool) -> Iterator[pa.Table]:
        """Compact example rows, batch by batch, after adding the contexts and token strings each
        batch needs to their tables."""
        contexts_table, vocabulary_table = tables[CONTEXTS_TABLE], tables[VOCABULARY_TABLE]
        stored_keys = np.sort(_column(contexts_table, "context_key", Filter().eq("model", model)))

        def add_contexts(contexts: pa.Table) -> None:
            nonlocal stored_keys
            keys = contexts["context_key"].to_numpy()
            new = ~_sorted_contains(stored_keys, keys)
            if new.any():
                contexts_table.add(contexts.filter(pa.array(new)))
                stored_keys = np.union1d(stored_keys, keys[new])

        if isinstance(examples, CompactExamples):
            conflicts = self._add_vocabulary(vocabulary_table, model, examples.vocabulary)
            for contexts, rows in examples.batches:
                _check_compact(rows, coder_id, width)
                contexts, rows = examples.resolved(contexts, rows, conflicts)
                add_contexts(contexts)
                yield rows
            return
        vocabulary = self.vocabulary(model)
        for batch in examples:
            if not checked:  # a stream: check each batch as it comes
                batch = conform_table(batch, examples_schema(), "examples")
                _check_examples(batch, coder_id, width, None)
            for start in range(0, batch.num_rows, _COMPACT_ROWS):
                compacted = compact(batch.slice(start, _COMPACT_ROWS), model, vocabulary)
                if compacted.new_vocabulary.num_rows:
                    vocabulary_table.add(compacted.new_vocabulary)
                    self._vocabulary_version = (float("-inf"), -1)  # read it again
                    vocabulary = vocabulary.extended(compacted.new_vocabulary)
                add_contexts(compacted.contexts)
                yield compacted.rows

    def _add_vocabulary(self, table: Table, model: str, strings: np.ndarray | None) -> np.ndarray:
        """Store a model's vocabulary (all of its token strings) where the store lacks ids of it; the
        ids whose stored string differs are returned (contexts showing them keep their own strings)."""
        if strings is None:
            return np.zeros(0, dtype=np.int64)
        stored = self.vocabulary(model).take(np.arange(len(strings)))
        known = np.asarray(stored.is_valid())
        if not known.all():
            missing = np.flatnonzero(~known)
            table.add(vocabulary_rows(model, strings[missing], missing))
            self._vocabulary_version = (float("-inf"), -1)  # read it again
        return np.flatnonzero(known & (np.asarray(stored.to_pylist(), dtype=object) != strings))

    def vocabulary(self, model: str) -> Vocabulary:
        """One model's stored token strings (cached until the vocabulary table changes)."""
        table = self._open(VOCABULARY_TABLE)
        if table is None:
            return Vocabulary.from_rows(model, vocabulary_schema().empty_table())
        with self._lock:  # the version is asked at most once a second (a round trip to LanceDB)
            checked, version = self._vocabulary_version
            if time.monotonic() - checked > _VERSION_CHECK_SECONDS:
                version = table.version
                self._vocabulary_version = (time.monotonic(), version)
        key = (model, version)
        with self._lock:
            if key not in self._vocabularies:
                rows = (table.search().where(Filter().eq("model", model).render(table.schema))
                        .select(["token_id", "token"]).limit(None).to_arrow())
                self._vocabularies = {k: v for k, v in self._vocabularies.items() if k[0] != model}
                self._vocabularies[key] = Vocabulary.from_rows(model, rows)
            return self._vocabularies[key]

    def delete_coder(self, coder_id: str) -> None:
        """Remove a coder and all its rows; a coder that is not stored is a no-op."""
        self._require_writable()
        # coders first, so a coder is unlisted before its rows start to disappear.
        with writing(f"the removal of coder {coder_id!r}", self.uri):
            # its contexts stay: other coders' examples may show them
            for name in (CODERS_TABLE, FEATURES_TABLE, EXAMPLES_TABLE, LEGACY_EXAMPLES_TABLE, IMPORTS_TABLE,
                         PENDING_TABLE):
                table = self._open(name)
                if table is not None:
                    table.delete(Filter().eq("coder_id", coder_id).render(table.schema))
            delete_decoder_vectors(self, coder_id)

    # --- provenance -----------------------------------------------------------------------------

    def imported_coder_ids(self) -> set[str]:
        """The coders written by `featuredb import` (see schema.imports_schema)."""
        table = self._open(IMPORTS_TABLE)
        return set() if table is None else set(table.to_arrow()["coder_id"].to_pylist())

    def imports_table(self) -> Table:
        """The imports table, created where missing (the importer records into it as one of its commits)."""
        self._require_writable()
        return self._db.create_table(IMPORTS_TABLE, schema=imports_schema(), exist_ok=True)

    def forget_import(self, coder_id: str) -> None:
        """The coder was rewritten here (e.g. re-indexed): its names are the user's again. Called
        after the new rows are written, so a kill in between leaves it marked imported (the safe side)."""
        self._require_writable()
        table = self._open(IMPORTS_TABLE)
        if table is not None:
            with writing(f"the provenance of coder {coder_id!r}", self.uri):
                table.delete(Filter().eq("coder_id", coder_id).render(table.schema))

    def _require_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"store is read-only: {self.uri}")

    def _open_or_create(self, name: str) -> Table:
        # exist_ok: another writer may have created the table since we looked.
        return self._db.create_table(name, schema=self._schemas[name], exist_ok=True)

    def _check_stored_schemas(self) -> None:
        for name, expected in self._schemas.items():
            table = self._open(name)
            if table is not None and not table.schema.equals(expected):
                raise StoreError(
                    f"table {name!r} in {self.uri} has a different schema than this store expects "
                    f"(vector_dim={self.vector_dim}?); refusing to write"
                )

    # --- reading --------------------------------------------------------------------------------

    def coders(self) -> pl.DataFrame:
        """All coders, sorted by coder_id (an empty frame with the schema when none are stored)."""
        return self._read(CODERS_TABLE, Filter(), None, ["coder_id"])

    def features(self, coder_id: str | None = None, columns: list[str] | None = None) -> pl.DataFrame:
        """Feature rows (of one coder, or all), sorted by (coder_id, feature); optionally only `columns`."""
        where = Filter() if coder_id is None else Filter().eq("coder_id", coder_id)
        return self._read(FEATURES_TABLE, where, columns, ["coder_id", "feature"])

    def feature_row(self, coder_id: str, index: int) -> dict[str, Any] | None:
        """One feature row as a dict of Python values, or None if it is not stored."""
        where = Filter().eq("coder_id", coder_id).eq("feature", index)
        rows = self._read(FEATURES_TABLE, where, None, []).to_dicts()
        return rows[0] if rows else None

    def examples(self, coder_id: str, feature: int | None = None, kind: str | None = None) -> pl.DataFrame:
        """A coder's example contexts (wide rows: schema.examples_schema), sorted by (feature, kind, rank)."""
        where = Filter().eq("coder_id", coder_id)
        if feature is not None:
            where = where.eq("feature", feature)
        if kind is not None:
            if kind not in EXAMPLE_KINDS:
                raise StoreError(f"unknown example kind {kind!r} (expected one of {sorted(EXAMPLE_KINDS)})")
            where = where.eq("kind", kind)
        frame = pl.from_arrow(self.read_examples(where))
        assert isinstance(frame, pl.DataFrame)
        return frame.sort(["feature", "kind", "rank"])

    def is_compact(self) -> bool:
        """Whether the examples are stored compact (False: a catalogue not upgraded yet, read-only)."""
        if not self._legacy_gone:
            self._legacy_gone = LEGACY_EXAMPLES_TABLE not in self.table_names()
        return self._legacy_gone

    def coder_contexts(self, coder_id: str, columns: list[str]) -> pa.Table:
        """The distinct contexts a coder's examples show: `columns` of context_index, doc_id,
        token_ids, tokens (one row per context, in no set order)."""
        if not self.is_compact():
            table = self.table(LEGACY_EXAMPLES_TABLE)
            rows = table.search().where(Filter().eq("coder_id", coder_id).render(table.schema)) \
                .select(list(dict.fromkeys(["context_index", *columns]))).limit(None).to_arrow()
            _, first = np.unique(rows["context_index"].to_numpy(), return_index=True)
            return rows.take(pa.array(first)).select(columns)
        table = self._open(EXAMPLES_TABLE)
        keys = np.zeros(0, dtype=np.int64) if table is None else \
            np.unique(_column(table, "context_key", Filter().eq("coder_id", coder_id)))
        return self.read_contexts(keys, columns)

    def read_contexts(self, keys: np.ndarray, columns: list[str]) -> pa.Table:
        """`columns` (context_key, context_index, doc_id, token_ids, tokens) of the stored contexts
        with these keys, each context's token strings resolved through its model's vocabulary."""
        contexts = self.contexts(keys)
        if "tokens" in columns:
            models = pc.unique(contexts["model"]).to_pylist()
            every_row = pa.array(np.arange(contexts.num_rows))
            tokens = context_strings(contexts, every_row, contexts["token_ids"].combine_chunks(),
                                     {m: self.vocabulary(m) for m in models})
            contexts = contexts.set_column(contexts.schema.get_field_index("tokens"), "tokens", tokens)
        return contexts.select(columns)

    def has_examples(self) -> bool:
        names = self.table_names()
        return EXAMPLES_TABLE in names or LEGACY_EXAMPLES_TABLE in names

    def read_examples(self, where: Filter, columns: list[str] | None = None) -> pa.Table:
        """Wide example rows (schema.examples_schema, or its `columns`) matching `where`, a filter on
        the example's own columns (coder_id, feature, kind, rank, max_value, ...), in no set order."""
        batches = list(self.iter_examples(where, columns))
        schema = examples_schema()
        wanted = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        return pa.Table.from_batches([], schema=wanted) if not batches else pa.concat_tables(batches)

    def iter_examples(self, where: Filter, columns: list[str] | None = None,
                      batch_rows: int = 65_536) -> Iterator[pa.Table]:
        """`read_examples` in batches of about `batch_rows` (memory bounded by a batch)."""
        schema = examples_schema()
        columns = list(schema.names) if columns is None else list(columns)
        for column in columns:
            column_ref(column, schema)
        legacy = None if self.is_compact() else self._open(LEGACY_EXAMPLES_TABLE)
        if legacy is not None:  # not upgraded yet (opened read-only): the wide rows are stored as they are
            query = legacy.search().select(columns).limit(None)
            condition = where.render(legacy.schema)
            for batch in (query.where(condition) if condition else query).to_batches(batch_size=batch_rows):
                yield pa.Table.from_batches([batch])
            return
        table = self._open(EXAMPLES_TABLE)
        if table is None:
            return
        schema = self._schemas[EXAMPLES_TABLE]  # fixed: asking the table costs a round trip to LanceDB
        condition = where.render(schema)
        own = [c for c in columns if c in schema.names and c != "values"]
        fetched = own + (["context_key", "positions", "values"] if needs_contexts(columns) else [])
        for batch in scan_batches(table, condition, list(dict.fromkeys(fetched)), batch_rows):
            rows = pa.Table.from_batches([batch])
            if not needs_contexts(columns):
                yield rows.select(columns)
                continue
            contexts = self.contexts(np.unique(rows["context_key"].to_numpy()))
            models = pc.unique(contexts["model"]).to_pylist() if "tokens" in columns else []
            yield expand(rows, contexts, {m: self.vocabulary(m) for m in models}, columns)

    def contexts(self, keys: np.ndarray) -> pa.Table:
        """The stored contexts with these keys."""
        table = self._open(CONTEXTS_TABLE)
        if table is None or len(keys) == 0:
            return contexts_schema().empty_table()
        parts = []
        for start in range(0, len(keys), _CONTEXT_LOOKUP):
            where = Filter().isin("context_key", [int(k) for k in keys[start:start + _CONTEXT_LOOKUP]])
            parts.append(scan(table, where.render(self._schemas[CONTEXTS_TABLE])))
        return pa.concat_tables(parts)

    def _read(self, name: str, where: Filter, columns: list[str] | None, sort_by: list[str]) -> pl.DataFrame:
        table = self._open(name)
        schema = table.schema if table is not None else self._schemas[name]
        condition = where.render(schema)  # validates columns and values even when the table is empty
        selected = list(schema.names) if columns is None else list(columns)
        for column in selected:
            column_ref(column, schema)
        if len(set(selected)) != len(selected):
            raise StoreError(f"duplicate column names in {selected}")
        if table is None:
            return pl.from_arrow(schema.empty_table().select(selected))  # type: ignore[return-value]
        fetched = selected + [c for c in sort_by if c not in selected]
        frame = pl.from_arrow(scan(table, condition, fetched))
        assert isinstance(frame, pl.DataFrame)
        if sort_by:
            frame = frame.sort(sort_by)
        return frame.select(selected)


# --- input validation (pure; runs before the database is touched) ----------------------------


def _validated_coder(coder: Mapping[str, object]) -> pa.Table:
    if not isinstance(coder, Mapping):
        raise StoreError(f"sae: expected a dict, got {type(coder).__name__}")
    row = dict(coder)
    if row.get("created_at") is None:
        row["created_at"] = dt.datetime.now(dt.timezone.utc)
    coder = conform_row(row, coders_schema(), "sae")
    coder_id = coder["coder_id"][0].as_py()
    if not coder_id:
        raise StoreError("sae: coder_id must be a non-empty string")
    try:
        sql_literal(coder_id)  # the id must be usable in a filter, which rules out control characters
    except StoreError as e:
        raise StoreError(f"sae: invalid coder_id: {e}") from e
    for column, allowed in (("site", SITES), ("kind", CODER_KINDS)):
        value = coder[column][0].as_py()
        if value not in allowed:
            raise StoreError(f"sae: {column} {value!r} is not one of {sorted(allowed)}")
    layers, width = coder["layers"][0].as_py(), coder["width"][0].as_py()
    if (coder["kind"][0].as_py() in MULTI_LAYER_KINDS) != bool(layers):
        raise StoreError("sae: a multi-layer coder (clt, crosscoder), and only one, lists the `layers` it reads")
    if layers and width % len(layers):
        raise StoreError(f"sae: width {width} is not a whole number of features per layer of {layers}")
    return coder


def _check_same_coder_id(rows: pa.Table, coder_id: str, what: str) -> None:
    other = [v for v in pc.unique(rows["coder_id"]).to_pylist() if v != coder_id]
    if other:
        raise StoreError(f"{what}: rows carry coder_id {other[0]!r}, expected {coder_id!r} for every row")


def _check_features(rows: pa.Table, coder: pa.Table) -> None:
    coder_id = coder["coder_id"][0].as_py()
    _check_same_coder_id(rows, coder_id, "features")
    if rows.num_rows == 0:
        return
    width = coder["width"][0].as_py()
    low, high = pc.min_max(rows["feature"]).values()
    if low.as_py() < 0 or high.as_py() >= width:
        raise StoreError(f"features: feature indices must be in [0, width={width}), got [{low}, {high}]")
    if pc.count_distinct(rows["feature"]).as_py() != rows.num_rows:
        raise StoreError(f"features: duplicate feature indices for coder {coder_id!r}")
    if pc.any(pc.is_nan(pc.list_flatten(rows["vector"]))).as_py():
        raise StoreError("features: vector contains NaN (use a null vector for a feature without one)")
    _check_finite(rows, "features", ("feature",))
    coder_row = {name: coder[name][0].as_py() for name in coder.column_names}
    layers, hooks = slot_of_features(coder_row, rows["feature"].to_numpy())
    n = rows.num_rows
    expected_columns = {"model": [coder_row["model"]] * n, "site": [coder_row["site"]] * n, "layer": layers,
                        "hook": hooks}
    for column in _DENORMALISED_COLUMNS:
        expected = pa.array(expected_columns[column], rows.schema.field(column).type)
        differs = pc.invert(pc.equal(rows[column].combine_chunks(), expected))
        if pc.any(differs).as_py():
            at = pc.index(differs, True).as_py()
            raise StoreError(f"features: column {column!r} is {rows[column][at].as_py()!r} for feature "
                             f"{rows['feature'][at].as_py()}, but its coder gives {expected[at].as_py()!r}")
    _check_layer_write(rows, coder_row)


def _check_layer_write(rows: pa.Table, coder: Mapping[str, Any]) -> None:
    """A multi-layer coder's features may carry one decoder norm per output layer; others none."""
    lengths = pc.list_value_length(rows["layer_write"])
    if not coder.get("layers"):
        if rows["layer_write"].null_count != rows.num_rows:
            raise StoreError("features: layer_write is only for the features of a multi-layer coder (clt, crosscoder)")
        return
    outputs = len(hook_layers(coder["hook_out"]) or [])  # model.layers.{0,1,2}.<site>: one per output layer
    wrong = pc.and_(pc.is_valid(lengths), pc.not_equal(lengths, outputs))
    if pc.any(wrong).as_py():
        raise StoreError(f"features: layer_write must hold {outputs} values (one per output layer of {coder['hook_out']})")


def _check_examples(rows: pa.Table, coder_id: str, width: int | None, features: pa.ChunkedArray | None) -> None:
    """Wide example rows of one coder: well-formed, and (given the coder's features) only of those."""
    _check_example_keys(rows, coder_id, width)
    if rows.num_rows == 0:
        return
    if features is not None and not pc.all(pc.is_in(rows["feature"], value_set=features.combine_chunks())).as_py():
        raise StoreError("examples: some rows refer to features that are not in `features`")
    lengths = [pc.list_value_length(rows[c]) for c in _CONTEXT_COLUMNS]
    if not all(pc.all(pc.equal(lengths[0], other)).as_py() for other in lengths[1:]):
        raise StoreError(f"examples: {', '.join(_CONTEXT_COLUMNS)} must have the same length in each row")


def _check_compact(rows: pa.Table, coder_id: str, width: int | None) -> None:
    """Compact example rows (as the indexer makes them): the same checks on the example's own columns."""
    if rows.schema != example_activations_schema():
        raise StoreError("examples: compact rows must have schema.example_activations_schema")
    _check_example_keys(rows, coder_id, width)
    if rows.num_rows and not pc.all(pc.equal(pc.list_value_length(rows["positions"]),
                                             pc.list_value_length(rows["values"]))).as_py():
        raise StoreError("examples: positions and values must have the same length in each row")


def _check_example_keys(rows: pa.Table, coder_id: str, width: int | None) -> None:
    _check_same_coder_id(rows, coder_id, "examples")
    if rows.num_rows == 0:
        return
    kinds = [k for k in pc.unique(rows["kind"]).to_pylist() if k not in EXAMPLE_KINDS]
    if kinds:
        raise StoreError(f"examples: kind {kinds[0]!r} is not one of {sorted(EXAMPLE_KINDS)}")
    keys = list(EXAMPLES_KEY[1:])
    if rows.select(keys).group_by(keys).aggregate([]).num_rows != rows.num_rows:
        raise StoreError("examples: duplicate (feature, kind, rank) rows")
    low, high = pc.min_max(rows["feature"]).values()
    if low.as_py() < 0 or (width is not None and high.as_py() >= width):
        raise StoreError(f"examples: feature indices must be in [0, width={width}), got [{low}, {high}]")
    _check_finite(rows, "examples", keys)
    is_top = pc.equal(rows["kind"], "top")
    any_bound = pc.or_(pc.is_valid(rows["bin_min"]), pc.is_valid(rows["bin_max"]))
    both_bounds = pc.and_(pc.is_valid(rows["bin_min"]), pc.is_valid(rows["bin_max"]))
    if pc.any(pc.and_(is_top, any_bound)).as_py():
        raise StoreError("examples: 'top' rows must have null bin_min/bin_max")
    if pc.any(pc.and_(pc.invert(is_top), pc.invert(both_bounds))).as_py():
        raise StoreError("examples: 'interval' rows need both bin_min and bin_max")


def _check_finite(rows: pa.Table, what: str, key: list[str] | tuple[str, ...]) -> None:
    """Every number in a float column (or a list of floats) is finite: a NaN or inf statistic sorts,
    filters and averages wrongly everywhere downstream. Null stays allowed where the schema allows
    it (an absent value); the indexer writes 0, never NaN, for a feature that never fired."""
    for field in rows.schema:
        is_list = pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type)
        if not pa.types.is_floating(field.type.value_type if is_list else field.type):
            continue
        column = rows[field.name].combine_chunks()
        values = pc.list_flatten(column) if is_list else column
        bad = pc.invert(pc.fill_null(pc.is_finite(values), True))
        if not pc.any(bad).as_py():
            continue
        position = pc.index(bad, True).as_py()
        row = pc.list_parent_indices(column)[position].as_py() if is_list else position
        names = ", ".join(f"{name} {rows[name][row].as_py()!r}" for name in key)
        raise StoreError(f"{what}: column {field.name!r} holds {values[position].as_py()} in row {row} ({names}): "
                         "stored numbers must be finite")


# --- writing helpers -------------------------------------------------------------------------


def _replace_coder_rows(table: Table, batches: Iterable[pa.Table], key: tuple[str, ...], coder_id: str,
                        replacing: bool) -> None:
    """Make the coder's rows in `table` exactly the rows of `batches` (streamed), in one commit.

    A coder with no rows yet (`replacing` False) is appended; otherwise upsert on the row key, and
    delete this coder's rows the new data no longer has. The delete condition is scoped to the
    coder, so other coders' rows are never touched.
    """
    own_rows = Filter().eq("coder_id", coder_id).render(table.schema)
    # LanceDB's default on_bad_vectors="error" rejects NULL vectors as "variable length".
    # Rows are already cast to the exact fixed-size type and NaN-checked, so the only
    # vectors it could call bad are the nulls we mean to store: "null" keeps them null.
    rows, failures = _reader(table.schema, batches)
    try:
        if not replacing:
            # a new coder (the usual case): an append, several times faster than a merge over the table
            table.add(rows, on_bad_vectors="null")
            return
        (
            table.merge_insert(list(key))
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .when_not_matched_by_source_delete(own_rows)
            .execute(rows, on_bad_vectors="null")
        )
    except Exception:
        if failures:
            raise failures[0] from None
        raise


def _mark_pending(table: Table, coder_id: str) -> None:
    table.add(pa.table({"coder_id": [coder_id]}, schema=pending_schema()))


def _reader(schema: pa.Schema, tables: Iterable[pa.Table]) -> pa.RecordBatchReader:
    """Stream `tables` in ~_BATCH_BYTES record batches (zero-copy slices). An error raised while
    producing them (a batch that fails its checks) reaches LanceDB wrapped in its own; it is kept
    on the reader (`failure`) so the caller can raise it as it was."""

    def generate() -> Iterator[pa.RecordBatch]:
        try:
            for rows in tables:
                bytes_per_row = max(1, rows.nbytes // max(1, rows.num_rows))
                yield from rows.to_batches(max_chunksize=max(1, _BATCH_BYTES // bytes_per_row))
        except BaseException as error:
            failures.append(error)
            raise

    failures: list[BaseException] = []
    reader = pa.RecordBatchReader.from_batches(schema, generate())
    return reader, failures


def _is_whole(data: object) -> bool:
    """A table or dict of columns (given whole), as opposed to a stream of tables."""
    return isinstance(data, (pa.Table, pa.RecordBatch, Mapping))


def _column(table: Table, column: str, where: Filter) -> np.ndarray:
    rows = table.search().where(where.render(table.schema)).select([column]).limit(None).to_arrow()
    return rows[column].to_numpy()


def _sorted_contains(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.searchsorted(sorted_values, values).clip(max=len(sorted_values) - 1)
    return sorted_values[at] == values


# --- locations -------------------------------------------------------------------------------


def _prepare_uri(uri: str | Path, read_only: bool) -> str:
    """A usable database URI: object-store URIs pass through; local directories are checked/created."""
    if is_remote(uri):
        return uri
    path = Path(uri).expanduser().absolute()
    if path.is_file():
        raise StoreError(f"database path is a file: {path}")
    if not path.exists():
        if read_only:
            raise StoreError(f"database does not exist: {path}")
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise StoreError(f"cannot create database directory {path}: {e.strerror or e}") from e
    elif not path.is_dir():
        raise StoreError(f"database path is not a directory: {path}")
    if not read_only and not os.access(path, os.W_OK):  # e.g. a read-only mount: say so before anything runs
        raise StoreError(f"cannot write to the catalogue {path}: its directory is read-only")
    return str(path)
