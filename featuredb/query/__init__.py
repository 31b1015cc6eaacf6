"""Query layer: search features by concept, by activation and by similarity."""
