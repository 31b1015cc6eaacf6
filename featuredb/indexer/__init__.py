"""Indexer: stream a corpus through a model and its sparse coders, keep per-feature statistics."""
