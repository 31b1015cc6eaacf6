"""featuredb: a feature database and search index for sparse-autoencoder features."""

__version__ = "0.1.0"


def open(path_or_uri=None, **options):  # noqa: A001 - featuredb.open, like lancedb.connect
    """Open a feature catalogue for search: see featuredb.query.open."""
    from .query import open as _open

    return _open(path_or_uri, **options)


__all__ = ["__version__", "open"]
