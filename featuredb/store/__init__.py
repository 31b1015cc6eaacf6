"""The feature store: LanceDB tables of coders, features and example contexts."""

from .feature_store import FeatureStore
from .filters import Filter, column_ref, sql_literal
from .schema import (
    EXAMPLES_TABLE,
    FEATURES_TABLE,
    SAES_TABLE,
    TABLE_NAMES,
    StoreError,
    examples_schema,
    features_schema,
    saes_schema,
)

__all__ = [
    "EXAMPLES_TABLE",
    "FEATURES_TABLE",
    "SAES_TABLE",
    "TABLE_NAMES",
    "FeatureStore",
    "Filter",
    "StoreError",
    "column_ref",
    "examples_schema",
    "features_schema",
    "saes_schema",
    "sql_literal",
]
