"""One query embedded without sentence-transformers, transformers or torch.

Importing sentence-transformers costs 3-9 s on a 2-core machine (it imports torch, transformers,
scikit-learn, ...), most of a semantic search from the command line, while embedding one short
query with a 6-layer MiniLM is a millisecond job. So a query is embedded here from the model's own
folder with what one query needs: the `tokenizers` fast tokenizer (tokenizer.json), the weights
memory-mapped from model.safetensors, and BERT's forward pass in numpy, followed by the pooling and
normalization the folder's sentence-transformers config names. It gives sentence-transformers'
vectors (tests/test_query_embedding.py: cosine >= 0.9999 against `SentenceTransformer.encode`).

Only the shape we check is run here: a sentence-transformers folder whose modules are a BERT
Transformer, mean Pooling and (optionally) Normalize, with float32 safetensors weights, an
absolute-position, erf-GELU BertModel config and no prompts. `load_query_embedder` returns None
for anything else (or a hub name), and featuredb.runtime.embedding then uses sentence-transformers.
Descriptions are still embedded in batches by sentence-transformers (featuredb.runtime.embedding).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"
# Pooling config keys that must be false (or absent) for plain mean pooling.
OTHER_POOLING_MODES = ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                       "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
SAFETENSORS_HEADER_LIMIT = 100_000_000  # bytes; a larger header is a corrupt file


class Unsupported(Exception):
    """The folder is not of the shape this module runs (sentence-transformers runs it instead)."""


def _json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Unsupported(f"{path.name}: {e}") from None


def _require(condition: bool, why: str) -> None:
    if not condition:
        raise Unsupported(why)


def _check_modules(folder: Path) -> tuple[Path, bool]:
    """(the pooling config's path, whether to normalize) from modules.json, or Unsupported."""
    modules = _json(folder / "modules.json")
    _require(isinstance(modules, list) and all(isinstance(m, dict) for m in modules), "modules.json: not a list")
    ordered = sorted(modules, key=lambda m: m.get("idx", 0))
    kinds = [m.get("type") for m in ordered]
    _require(kinds in ([TRANSFORMER, POOLING], [TRANSFORMER, POOLING, NORMALIZE]), f"modules {kinds}")
    _require(ordered[0].get("path", "") in ("", "."), "the Transformer module is not the folder itself")
    return folder / ordered[1].get("path", "") / "config.json", len(kinds) == 3


def _check_configs(folder: Path, pooling_path: Path) -> tuple[dict, int]:
    """The BertModel config and the maximum sequence length, or Unsupported."""
    pooling = _json(pooling_path)
    _require(pooling.get("pooling_mode_mean_tokens") is True, "pooling is not mean pooling")
    _require(not any(pooling.get(k) for k in OTHER_POOLING_MODES), "pooling mixes several modes")
    _require(pooling.get("include_prompt", True) is True, "pooling excludes the prompt")
    sbert = _json(folder / "sentence_bert_config.json")
    _require(not sbert.get("do_lower_case"), "sentence_bert_config lowercases")
    _require(set(sbert) <= {"max_seq_length", "do_lower_case"}, f"sentence_bert_config keys {sorted(sbert)}")
    st_config_path = folder / "config_sentence_transformers.json"
    if st_config_path.exists():
        st_config = _json(st_config_path)
        _require(not st_config.get("prompts") and not st_config.get("default_prompt_name"), "prompts")
    config = _json(folder / "config.json")
    _require(config.get("model_type") == "bert", f"model_type {config.get('model_type')!r}")
    _require(config.get("architectures") in (None, ["BertModel"]), f"architectures {config.get('architectures')}")
    _require(config.get("hidden_act") == "gelu", f"hidden_act {config.get('hidden_act')!r}")
    _require(config.get("position_embedding_type", "absolute") == "absolute", "relative position embeddings")
    _require(not config.get("is_decoder") and not config.get("add_cross_attention"), "a decoder")
    _require(config.get("hidden_size", 0) % config.get("num_attention_heads", 1) == 0, "head size")
    tokenizer_config = folder / "tokenizer_config.json"
    model_max = _json(tokenizer_config).get("model_max_length") if tokenizer_config.exists() else None
    limits = [sbert.get("max_seq_length"), config.get("max_position_embeddings")]
    if sbert.get("max_seq_length") is None:  # sentence-transformers then takes the tokenizer's limit
        limits.append(model_max)
    limits = [int(x) for x in limits if isinstance(x, int) and x > 0]
    _require(bool(limits), "no maximum sequence length")
    return config, min(limits)


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every float32 tensor of a safetensors file, memory-mapped (read-only): nothing is copied, and
    only the pages used are read (of the word embeddings, the query's rows). Measured: faster than
    reading the tensors into memory or transposing them."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        _require(0 < size <= SAFETENSORS_HEADER_LIMIT, f"{path.name}: bad header size")
        header = json.loads(f.read(size))
    _require(isinstance(header, dict), f"{path.name}: bad header")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    start = 8 + size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry.get("dtype") != "F32":
            continue
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        _require(end - begin == 4 * math.prod(shape) and 0 <= begin and start + end <= data.shape[0], f"{path.name}: {name}")
        tensors[name] = np.ndarray(shape, dtype="<f4", buffer=data, offset=start + begin)
    return tensors


class QueryEmbedder:
    """A BERT sentence-transformers model run in numpy on one text at a time."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        pooling_path, self.normalize = _check_modules(folder)
        config, self.max_length = _check_configs(folder, pooling_path)
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        layers = int(config["num_hidden_layers"])
        weights_path = folder / "model.safetensors"
        _require(weights_path.exists() and (folder / "tokenizer.json").exists(), "no model.safetensors or tokenizer.json")
        tensors = _safetensors(weights_path)
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""

        def weight(name: str) -> np.ndarray:
            key = prefix + name
            _require(key in tensors, f"model.safetensors has no float32 {key}")
            return tensors[key]

        # Matrices are used as stored ([out, in]): transposing them all costs more than the query's
        # forward pass.
        self.word = weight("embeddings.word_embeddings.weight")
        self.position = weight("embeddings.position_embeddings.weight")
        self.token_type = weight("embeddings.token_type_embeddings.weight")[0]
        self.embed_norm = (weight("embeddings.LayerNorm.weight"), weight("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(layers):
            p = f"encoder.layer.{i}."

            def dense(name: str) -> tuple[np.ndarray, np.ndarray]:
                return weight(p + name + ".weight"), weight(p + name + ".bias")

            self.layers.append((
                dense("attention.self.query"), dense("attention.self.key"), dense("attention.self.value"),
                dense("attention.output.dense"), dense("attention.output.LayerNorm"),
                dense("intermediate.dense"), dense("output.dense"), dense("output.LayerNorm"),
            ))
        hidden = self.word.shape[1]
        _require(self.position.shape[0] >= self.max_length and hidden % self.heads == 0, "shapes")
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()  # tokenizer.json may pad to a fixed length; transformers drops that too
        self.tokenizer.enable_truncation(self.max_length)

    def token_ids(self, text: str) -> list[int]:
        """[CLS] ... [SEP] ids, truncated to the model's maximum sequence length."""
        return self.tokenizer.encode(text).ids

    def embed(self, text: str) -> np.ndarray:
        """The float32 sentence embedding of `text` [hidden] (unit norm when the model normalizes)."""
        ids = np.asarray(self.token_ids(text), dtype=np.int64)
        n = ids.shape[0]
        x = self.word[ids] + self.position[:n] + self.token_type
        x = _layer_norm(x, *self.embed_norm, self.eps)
        heads, hidden = self.heads, x.shape[1]
        size = hidden // heads
        scale = np.float32(1.0 / math.sqrt(size))
        for query, key, value, out, norm1, up, down, norm2 in self.layers:
            q, k, v = (_linear(x, *dense).reshape(n, heads, size) for dense in (query, key, value))
            scores = np.einsum("qhd,khd->hqk", q, k) * scale  # [heads, n, n]
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            attention = scores / scores.sum(axis=-1, keepdims=True)
            context = np.einsum("hqk,khd->qhd", attention, v).reshape(n, hidden)
            x = _layer_norm(_linear(context, *out) + x, *norm1, self.eps)
            x = _layer_norm(_linear(_gelu(_linear(x, *up)), *down) + x, *norm2, self.eps)
        pooled = x.mean(axis=0, dtype=np.float64)
        if self.normalize:
            pooled = pooled / max(np.linalg.norm(pooled), 1e-12)
        return pooled.astype(np.float32)


def load_query_embedder(folder: str | Path) -> QueryEmbedder | None:
    """The numpy embedder of a local sentence-transformers folder, or None where the folder is not
    of the shape it runs (or is no folder: a hub name)."""
    if not Path(folder).is_dir():
        return None
    try:
        return QueryEmbedder(folder)
    except Exception:  # noqa: BLE001 (Unsupported, a corrupt file, no `tokenizers`, ...)
        return None  # sentence-transformers loads it, or says why it cannot


def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x @ weight.T + bias (weight [out, in], as torch stores it) through einsum's own single-threaded
    loops, not BLAS: for a query's few rows, multithreaded OpenBLAS waits on a descheduled thread
    whenever the other cores are busy (measured on 2 loaded cores: 15-24 ms per product instead of
    0.3 ms, 0.5 s per query)."""
    return np.einsum("nd,kd->nk", x, weight) + bias


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    variance = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(variance + np.float32(eps)) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    """torch's exact GELU, x * Phi(x) = x/2 * erfc(-x/sqrt 2), in float64 (erfc to < 1.2e-7 relative
    error: Numerical Recipes' erfcc, a Chebyshev fit), returned as float32."""
    z = -x.astype(np.float64) / math.sqrt(2.0)
    a = np.abs(z)
    t = 1.0 / (1.0 + 0.5 * a)
    poly = -a * a - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    erfc_a = t * np.exp(poly)
    erfc_z = np.where(z >= 0, erfc_a, 2.0 - erfc_a)
    return (0.5 * x * erfc_z).astype(np.float32)
