"""Arrow schemas and names of every LanceDB table, plus the keys and allowed values the store enforces.

Tables: `coders`, `features`, `examples` (FeatureStore), `descriptions` (store/descriptions.py),
`imports` (the coders that came from `featuredb import`) and one `decoders_<d>` per decoder width
(store/decoder_vectors.py). The schemas are the single
source of truth: tables are created from them, every write is cast to them, and filters are
validated against them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
from featuredb.errors import StoreError


CODERS_TABLE = "coders"
FEATURES_TABLE = "features"
# Example contexts, compact (store/examples.py): per example its own values, each context window once,
# each model's token strings once. `examples` is the older wide layout (one row per example with its
# context's tokens): opened read-only as it is, rewritten on the first writable open (store/upgrade.py).
EXAMPLES_TABLE = "example_activations"
CONTEXTS_TABLE = "contexts"
VOCABULARY_TABLE = "vocabulary"
LEGACY_EXAMPLES_TABLE = "examples"
# Coders whose write has begun and not finished (a killed write leaves its coder here): writing a
# coder that is neither listed in `coders` nor here is a plain append, with no scan of the (large)
# tables for rows it might already have.
PENDING_TABLE = "pending_writes"
TABLE_NAMES: tuple[str, ...] = (CODERS_TABLE, FEATURES_TABLE, EXAMPLES_TABLE, CONTEXTS_TABLE, VOCABULARY_TABLE)
DESCRIPTIONS_TABLE = "descriptions"
IMPORTS_TABLE = "imports"  # which coders came from `featuredb import` (their names are the data's, not the user's)
DECODERS_PREFIX = "decoders_"  # + the decoder width: one table per width
LEGACY_CODERS_TABLE = "saes"  # featuredb 0.1's name for the coders table
_DECODERS_NAME = re.compile(r"^decoders_([0-9]+)$")

DEFAULT_VECTOR_DIM = 384
# Description vectors and decoder directions are stored as float16: half the bytes of float32 with
# the same exact-search neighbours (recall@10 1.000 against float32, docs/benchmarks.md). Catalogues
# written with float32 vectors keep them (FeatureStore reads the stored type).
VECTOR_TYPE = pa.float16()

# Columns that identify one row; a coder's rows are replaced by matching on these.
CODERS_KEY: tuple[str, ...] = ("coder_id",)
FEATURES_KEY: tuple[str, ...] = ("coder_id", "feature")
EXAMPLES_KEY: tuple[str, ...] = ("coder_id", "feature", "kind", "rank")

SITES: frozenset[str] = frozenset({"res", "mlp", "att", "transcoder", "other"})
CODER_KINDS: frozenset[str] = frozenset({"sae", "transcoder", "skip_transcoder", "clt", "crosscoder"})
MULTI_LAYER_KINDS: frozenset[str] = frozenset({"clt", "crosscoder"})  # one coder over several layers
EXAMPLE_KINDS: frozenset[str] = frozenset({"top", "interval"})


def _required(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _optional(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


def _feature_and_coder_columns() -> list[pa.Field]:
    """A feature's key, then the columns of its coder copied onto it (to filter without a join)."""
    return [
        _required("coder_id", pa.string()),
        _required("feature", pa.int64()),
        _required("model", pa.string()),
        _required("layer", pa.int32()),
        _required("hook", pa.string()),
        _required("site", pa.string()),
    ]


def coders_schema() -> pa.Schema:
    """One row per coder (SAE or transcoder)."""
    return pa.schema(
        [
            _required("coder_id", pa.string()),
            _required("model", pa.string()),
            _required("hook", pa.string()),
            _required("hook_out", pa.string()),
            _required("site", pa.string()),
            _required("layer", pa.int32()),
            _required("architecture", pa.string()),
            _required("kind", pa.string()),
            _required("d_in", pa.int32()),
            _required("d_out", pa.int32()),
            _required("width", pa.int32()),
            _required("source", pa.string()),
            _required("tokens_indexed", pa.int64()),
            _required("contexts_indexed", pa.int64()),
            _required("context", pa.int32()),
            _required("top_k", pa.int32()),
            _required("created_at", pa.timestamp("us", tz="UTC")),
            # A multi-layer coder (CLT, crosscoder): the layer each slot of features reads, in slot
            # order (features are numbered slot-major); null for a single-layer coder. Last: added
            # to older catalogues in place (store.feature_store).
            _optional("layers", pa.list_(pa.int32())),
            # Counted tokens its features' co-firing partners (features.cooccurring_*) were counted
            # on: every token of the run, or a fixed random sample of them; null when not counted.
            _optional("cooccurrence_tokens", pa.int64()),
        ]
    )


def features_schema(vector_dim: int = DEFAULT_VECTOR_DIM, vector_type: pa.DataType = VECTOR_TYPE) -> pa.Schema:
    """One row per feature; `vector` is the (optional) embedding of its description."""
    if not isinstance(vector_dim, int) or isinstance(vector_dim, bool) or vector_dim <= 0:
        raise StoreError(f"vector_dim must be a positive int, got {vector_dim!r}")
    return pa.schema(
        [
            *_feature_and_coder_columns(),
            _required("active_count", pa.int64()),
            _required("density", pa.float64()),
            _required("max_activation", pa.float32()),
            _required("mean_activation", pa.float32()),
            _required("std_activation", pa.float32()),
            # Equal-width bins on [0, hist_max].
            _required("hist_counts", pa.list_(pa.int64())),
            _required("hist_max", pa.float32()),
            _required("top_logit_tokens", pa.list_(pa.string())),
            _required("top_logit_ids", pa.list_(pa.int32())),
            _required("top_logit_values", pa.list_(pa.float32())),
            _required("bottom_logit_tokens", pa.list_(pa.string())),
            _required("bottom_logit_ids", pa.list_(pa.int32())),
            _required("bottom_logit_values", pa.list_(pa.float32())),
            _required("neighbours", pa.list_(pa.int64())),
            _required("neighbour_cosines", pa.list_(pa.float32())),
            _required("top_tokens", pa.list_(pa.string())),
            _required("top_token_counts", pa.list_(pa.int32())),
            _optional("description", pa.string()),
            _optional("description_method", pa.string()),
            _optional("description_model", pa.string()),
            _optional("embedding_model", pa.string()),
            _optional("vector", pa.list_(vector_type, vector_dim)),
            # A multi-layer coder's feature: the norm of its decoder vector at each output layer (the
            # layers of the coder's hook_out, in order); null for a single-layer coder.
            _optional("layer_write", pa.list_(pa.float32())),
            # Features that fire together with this one on the same tokens (indexer/cooccurrence.py),
            # best Jaccard first: partner coder and feature, tokens where both fire, Jaccard; null
            # when not counted. The coder's `cooccurrence_tokens` says how many tokens were counted.
            _optional("cooccurring_coder_ids", pa.list_(pa.string())),
            _optional("cooccurring_features", pa.list_(pa.int64())),
            _optional("cooccurring_counts", pa.list_(pa.int64())),
            _optional("cooccurring_jaccard", pa.list_(pa.float32())),
            # The current description's score and the method that made it ("embedding": its
            # embedding AUROC, describe/embedding_score.py); null when it has none.
            _optional("description_score", pa.float32()),
            _optional("description_score_method", pa.string()),
        ]
    )


COOCCURRENCE_COLUMNS = ("cooccurring_coder_ids", "cooccurring_features", "cooccurring_counts", "cooccurring_jaccard")
COOCCURRENCE_MIN_COUNT = 2  # a partner fires with the feature on at least this many tokens: one is not evidence


def _example_key_columns() -> list[pa.Field]:
    """Which example a row is (its feature, kind and rank) and, for an interval sample, its bin."""
    return [
        _required("coder_id", pa.string()),
        _required("feature", pa.int64()),
        _required("kind", pa.string()),
        _required("rank", pa.int32()),
        # Null for `top` examples; the activation bin an `interval` example was drawn from.
        _optional("bin_min", pa.float32()),
        _optional("bin_max", pa.float32()),
    ]


def examples_schema() -> pa.Schema:
    """Example contexts: `top` (rank by activation) and `interval` (sampled from one histogram bin)."""
    return pa.schema(
        [
            *_example_key_columns(),
            _required("tokens", pa.list_(pa.string())),
            _required("token_ids", pa.list_(pa.int32())),
            _required("values", pa.list_(pa.float32())),
            _required("max_value", pa.float32()),
            _required("max_position", pa.int32()),
            _required("doc_id", pa.string()),
            _required("context_index", pa.int64()),
        ]
    )


def example_activations_schema() -> pa.Schema:
    """One row per example in the compact layout: what is the example's own (store/examples.py)."""
    return pa.schema(
        [
            *_example_key_columns(),
            _required("context_key", pa.int64()),  # contexts.context_key
            _required("max_value", pa.float32()),
            _required("max_position", pa.int32()),
            _required("peak_token", pa.int32()),  # token id at max_position (-1: unknown), for token search
            # the feature's non-zero values in the context and their positions (the rest are zero)
            _required("positions", pa.list_(pa.int32())),
            _required("values", pa.list_(pa.float32())),
        ]
    )


def contexts_schema() -> pa.Schema:
    """One row per distinct context window, shared by every example that shows it."""
    return pa.schema(
        [
            _required("context_key", pa.int64()),  # hash of model, doc_id, context_index and tokens
            _required("model", pa.string()),  # whose vocabulary the token ids index
            _required("context_index", pa.int64()),
            _required("doc_id", pa.string()),
            _required("token_ids", pa.list_(pa.int32())),
            # null when every token's string comes from the vocabulary (ids unknown: -1, or a pair that
            # disagrees with the stored one: the context keeps its own strings)
            _optional("tokens", pa.list_(pa.string())),
        ]
    )


def vocabulary_schema() -> pa.Schema:
    """Each model's token strings by id (' the', not 'Ġthe'): stored once per model."""
    return pa.schema([_required("model", pa.string()), _required("token_id", pa.int32()),
                      _required("token", pa.string())])


def descriptions_schema() -> pa.Schema:
    """Every description ever made of a feature, with its provenance and scores (append-only)."""
    return pa.schema(
        [
            _required("coder_id", pa.string()),
            _required("feature", pa.int64()),
            _required("description", pa.string()),
            _required("method", pa.string()),  # tokens | llm | local | manual
            _optional("explainer_model", pa.string()),  # model name / path (null for tokens)
            _optional("explainer_source", pa.string()),  # endpoint URL, "local", or null
            _required("prompt_version", pa.string()),
            _required("created_at", pa.timestamp("us", tz="UTC")),
            _required("indexed_at", pa.timestamp("us", tz="UTC")),  # the coders.created_at it was made from
            _optional("detection_score", pa.float32()),
            _optional("fuzz_score", pa.float32()),
            _optional("detection_n", pa.int32()),
            _optional("fuzz_n", pa.int32()),
            _optional("score_details", pa.string()),  # JSON: counts, scorer model, prompt version
            # JSON: what an offline description rests on, or what an explainer's prompt was shown (the
            # supported claims with their shares of top and interval examples). Last: added in place.
            _optional("evidence", pa.string()),
            # The offline embedding score (describe/embedding_score.py): AUROC of description-vs-context
            # cosine separating activating from non-activating contexts, and its JSON details (method
            # "embedding", version, embedding model, counts). Filled in by a describe run, also on rows
            # written before it existed (the one change made to a stored row). Last: added in place.
            _optional("embedding_score", pa.float32()),
            _optional("embedding_score_details", pa.string()),
        ]
    )


def decoders_table_name(dim: int) -> str:
    return f"{DECODERS_PREFIX}{int(dim)}"


def is_decoders_table(name: str) -> bool:
    return bool(_DECODERS_NAME.match(name))


def decoders_schema(dim: int, vector_type: pa.DataType = VECTOR_TYPE) -> pa.Schema:
    """Unit-norm decoder directions of width `dim`; `space` names the basis they live in."""
    return pa.schema(
        [
            *_feature_and_coder_columns(),
            _required("space", pa.string()),
            _required("vector", pa.list_(vector_type, int(dim))),
        ]
    )


# 2-D map coordinates of features (store/feature_map.py): a small table of its own, so that a
# recomputed map replaces a few columns of a few bytes a feature and never rewrites the features
# table (its vectors and lists); a catalogue without it opens and serves as before.
MAP_TABLE = "feature_map"


def map_schema() -> pa.Schema:
    """One row per mapped feature: its key, the group it was mapped in (model and decoder space),
    its layer and density (copied, to colour by) and its coordinates."""
    return pa.schema(
        [
            _required("coder_id", pa.string()),
            _required("feature", pa.int64()),
            _required("model", pa.string()),
            _required("space", pa.string()),
            _required("layer", pa.int32()),
            _optional("density", pa.float32()),
            _required("x", pa.float32()),
            _required("y", pa.float32()),
        ]
    )


def vector_dim_of(schema: pa.Schema) -> int | None:
    """The embedding width of a features schema (None if it has no fixed-size `vector` column)."""
    if "vector" not in schema.names:
        return None
    type_ = schema.field("vector").type
    return type_.list_size if pa.types.is_fixed_size_list(type_) else None


# --- Conforming caller data to a schema ------------------------------------------------------
# Casting alone is too lenient (pyarrow happily parses "3" into an int), so a column may only be
# cast within its type family: ints to ints, numbers to floats, strings to strings, lists to lists.


def conform_table(data: pa.Table | pa.RecordBatch | Mapping[str, object], schema: pa.Schema, what: str) -> pa.Table:
    """`data` as a table with exactly `schema` (same columns, order, types); StoreError otherwise."""
    table = _as_table(data, what)
    names = table.column_names
    if len(set(names)) != len(names):
        raise StoreError(f"{what}: duplicate column names in {names}")
    # an optional column left out is all null (a writer that predates it need not know it)
    for absent in [f for f in schema if f.nullable and f.name not in names]:
        table = table.append_column(absent.name, pa.nulls(table.num_rows, absent.type))
        names = table.column_names
    missing = [n for n in schema.names if n not in names]
    extra = [n for n in names if n not in schema.names]
    if missing or extra:
        problems = [f"missing columns {missing}" if missing else "", f"unexpected columns {extra}" if extra else ""]
        raise StoreError(f"{what}: {'; '.join(p for p in problems if p)}")
    columns = [_conform_column(table.column(f.name), f, what) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def conform_row(row: Mapping[str, object], schema: pa.Schema, what: str) -> pa.Table:
    """A one-row table from a dict of scalars (same checks as `conform_table`)."""
    if not isinstance(row, Mapping):
        raise StoreError(f"{what}: expected a dict, got {type(row).__name__}")
    return conform_table({name: [value] for name, value in row.items()}, schema, what)


def _as_table(data: object, what: str) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, Mapping):
        try:
            return pa.table({str(name): _as_array(value) for name, value in data.items()})
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise StoreError(f"{what}: cannot build a table from the given columns: {_one_line(e)}") from e
    raise StoreError(f"{what}: expected a pyarrow Table or a dict of columns, got {type(data).__name__}")


def _as_array(value: object) -> pa.Array | pa.ChunkedArray:
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 2:
        # A (rows, dim) matrix, e.g. embeddings: one fixed-size list per row.
        flat = pa.array(np.ascontiguousarray(value).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, value.shape[1])
    return pa.array(value)


def _conform_column(column: pa.ChunkedArray, field: pa.Field, what: str) -> pa.ChunkedArray:
    if not _castable(column.type, field.type):
        raise StoreError(f"{what}: column {field.name!r} has type {column.type}, expected {field.type}")
    try:
        cast = column.cast(field.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise StoreError(f"{what}: column {field.name!r} cannot be stored as {field.type}: {_one_line(e)}") from e
    if not field.nullable and cast.null_count:
        raise StoreError(f"{what}: column {field.name!r} has {cast.null_count} null value(s) but is required")
    return cast


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    """Whether a column of type `source` may be cast to `target` (same family; nulls fit anything)."""
    if source == target or pa.types.is_null(source):
        return True
    if pa.types.is_dictionary(source):
        return _castable(source.value_type, target)
    if pa.types.is_string(target):
        return pa.types.is_string(source) or pa.types.is_large_string(source) or pa.types.is_string_view(source)
    if pa.types.is_integer(target):
        return pa.types.is_integer(source)
    if pa.types.is_floating(target):
        return pa.types.is_integer(source) or pa.types.is_floating(source)
    if pa.types.is_timestamp(target):
        return pa.types.is_timestamp(source)
    if pa.types.is_list(target) or pa.types.is_fixed_size_list(target):
        is_list = pa.types.is_list(source) or pa.types.is_large_list(source) or pa.types.is_fixed_size_list(source)
        return is_list and _castable(source.value_type, target.value_type)
    return False


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def pending_schema() -> pa.Schema:
    return pa.schema([_required("coder_id", pa.string())])


def imports_schema() -> pa.Schema:
    """One row per coder written by `featuredb import`: where its rows (and so the model, coder and
    embedding-model names in them) came from. No row: the coder was indexed here."""
    return pa.schema([
        _required("coder_id", pa.string()),
        _required("format", pa.string()),  # e.g. "neuronpedia"
        _required("path", pa.string()),  # the source folder it was read from
    ])


def slot_of_features(coder: Mapping[str, object], features: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The layer and hook each of `features` reads, from its coder's row: the coder's own for a
    single-layer coder; for a multi-layer one, its slot's (features are numbered slot-major, and the
    coder's hook names every layer it reads, model.layers.{5,9,12}.output)."""
    layers = coder.get("layers")
    features = np.asarray(features, dtype=np.int64)
    if not layers:
        return np.full(len(features), coder["layer"], dtype=np.int32), [str(coder["hook"])] * len(features)
    slot = features // (int(coder["width"]) // len(layers))
    slot_hooks = np.asarray([_HOOK_LAYERS.sub(str(layer), str(coder["hook"]), count=1) for layer in layers], dtype=object)
    return np.asarray(layers, dtype=np.int32)[slot], slot_hooks[slot].tolist()  # one hook name per slot, not per feature


def hook_layers(hook: str) -> list[int] | None:
    """The layers a multi-layer coder's hook names (model.layers.{5,9,12}.output -> [5, 9, 12]);
    None for a single-layer hook."""
    match = _HOOK_LAYERS.search(hook)
    return None if match is None else [int(layer) for layer in match.group(0)[1:-1].split(",")]


_HOOK_LAYERS = re.compile(r"\{[^{}]*\}")


def absent_optional_fields(stored: pa.Schema, expected: pa.Schema) -> list[pa.Field]:
    """The optional fields of `expected` that a table written by an older featuredb lacks (they were
    added at the end of their schema, so adding them, all null, makes the schemas equal)."""
    return [f for f in expected if f.nullable and f.name not in stored.names]
