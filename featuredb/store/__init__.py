"""The feature store: LanceDB tables of coders, features and example contexts."""

from featuredb.store import lancedb_loader  # noqa: F401  (first: before anything imports lancedb)
from featuredb.store.feature_store import FeatureStore
from featuredb.store.filters import Filter, column_ref, sql_literal
from featuredb.store.schema import (
    EXAMPLES_TABLE,
    FEATURES_TABLE,
    CODERS_TABLE,
    TABLE_NAMES,
    StoreError,
    examples_schema,
    features_schema,
    coders_schema,
)

__all__ = [
    "EXAMPLES_TABLE",
    "FEATURES_TABLE",
    "CODERS_TABLE",
    "TABLE_NAMES",
    "FeatureStore",
    "Filter",
    "StoreError",
    "column_ref",
    "examples_schema",
    "features_schema",
    "coders_schema",
    "sql_literal",
]
