"""Query layer: search features by concept, by activation and by similarity.

    import featuredb
    cat = featuredb.open("./catalogue")
    cat.search("French cities").where(layer=12).limit(10).to_polars()

See featuredb.query.catalogue for the API, featuredb.store.indexes for index management and
featuredb.query.similar for decoder vectors (similarity search).
"""

from featuredb.query.activation import FiresOn, TokenQuery
from featuredb.query.catalogue import DEFAULT_DB, Catalogue, default_db, open
from featuredb.query.similar import SimilarQuery
from featuredb.errors import NotFound, QueryError, TooLarge
from featuredb.store.indexes import create_indexes, finalize, optimize
from featuredb.query.search import SearchQuery

__all__ = [
    "DEFAULT_DB",
    "Catalogue",
    "FiresOn",
    "NotFound",
    "QueryError",
    "SearchQuery",
    "SimilarQuery",
    "TooLarge",
    "TokenQuery",
    "create_indexes",
    "default_db",
    "finalize",
    "open",
    "optimize",
]
