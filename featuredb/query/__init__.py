"""Query layer: search features by concept, by activation and by similarity.

    import featuredb
    cat = featuredb.open("./catalogue")
    cat.search("French cities").where(layer=12).limit(10).to_polars()

See featuredb.query.catalogue for the API, featuredb.query.indexes for index management and
featuredb.query.decoders for decoder vectors (similarity search).
"""

from .activation import FiresOn, TokenQuery
from .catalogue import DEFAULT_DB, Catalogue, default_db, open
from .decoders import SimilarQuery
from .errors import NotFound, QueryError, TooLarge
from .indexes import create_indexes, finalize, optimize
from .search import SearchQuery

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
