"""Query layer: search features by concept, by activation and by similarity.

    import featuredb
    cat = featuredb.open("./catalogue")
    cat.search("French cities").where(layer=12).limit(10).to_polars()

See featuredb.query.catalogue for the API (a facade over featuredb.query.reader and the query
builders of featuredb.query.builder), featuredb.store.indexes for index management and
featuredb.query.similar for decoder vectors (similarity search).
"""

from featuredb.errors import NotFound, QueryError, TooLarge
from featuredb.query.builder import QueryBuilder
from featuredb.query.catalogue import DEFAULT_DB, Catalogue, default_db, open
from featuredb.query.find import FindQuery, FindResult
from featuredb.query.fires_on import FiresOn
from featuredb.query.reader import Reader
from featuredb.query.search import SearchQuery
from featuredb.query.similar import SimilarQuery
from featuredb.query.steer import Steered, SteerFeature
from featuredb.query.tokens import TokenQuery
from featuredb.store.indexes import create_indexes, finalize, optimize

__all__ = [
    "DEFAULT_DB",
    "Catalogue",
    "FindQuery",
    "FindResult",
    "FiresOn",
    "NotFound",
    "QueryBuilder",
    "QueryError",
    "Reader",
    "SearchQuery",
    "SimilarQuery",
    "SteerFeature",
    "Steered",
    "TooLarge",
    "TokenQuery",
    "create_indexes",
    "default_db",
    "finalize",
    "open",
    "optimize",
]
