"""What runs a model and its coders: model loading, hook sites, coder formats, encoding, text embeddings."""
