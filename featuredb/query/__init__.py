"""Query layer: search features by concept, by activation and by similarity.

    import featuredb
    cat = featuredb.open("./catalogue")
    cat.search("French cities").where(layer=12).limit(10).to_polars()

See featuredb.query.catalogue for the API, featuredb.query.indexes for index management and
featuredb.query.decoders for decoder vectors (similarity search).
"""

from .activation import FiresOn, TokenQuery
from .catalogue import DEFAULT_DB, Catalogue, default_db, open
from ..store.decoders import delete_decoder_vectors, write_decoder_vectors
from .decoders import SimilarQuery
from .errors import QueryError
from .indexes import create_indexes, finalize, optimize
from .search import SearchQuery

__all__ = [
    "DEFAULT_DB",
    "Catalogue",
    "FiresOn",
    "QueryError",
    "SearchQuery",
    "SimilarQuery",
    "TokenQuery",
    "create_indexes",
    "default_db",
    "delete_decoder_vectors",
    "finalize",
    "open",
    "optimize",
    "write_decoder_vectors",
]
