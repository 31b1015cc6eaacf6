"""featuredb: a feature database and search index for sparse-autoencoder features.

    import featuredb
    cat = featuredb.open("./catalogue")          # a Catalogue: search, feature, fires_on, similar
    cat.search("closing parentheses").where(layer=12).limit(10).to_polars()

`FeatureStore` is the writable store underneath (featuredb.store); every error meant for the user
is a `FeaturedbError`. The names load on first use, so `import featuredb` (and the CLI) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from featuredb.errors import FeaturedbError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from featuredb.query import Catalogue, open
    from featuredb.store import FeatureStore

_LAZY = {"open": "featuredb.query", "Catalogue": "featuredb.query", "FeatureStore": "featuredb.store"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featuredb' has no attribute {name!r}")


__all__ = ["Catalogue", "FeatureStore", "FeaturedbError", "__version__", "open"]
