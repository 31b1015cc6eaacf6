"""featuredb: a feature database and search index for sparse-autoencoder features."""

__version__ = "0.1.0"
