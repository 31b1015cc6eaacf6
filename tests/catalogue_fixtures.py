"""Catalogues for the query, server and export tests.

- `build_catalogue`: a catalogue of known answers (coders, described features, example contexts,
  decoder directions) built row by row, no model needed.
- `known_catalogue`: that catalogue plus a descriptions-table history
  for res-L12/3 (an scored llm description and an older tokens label), a description holding
  HTML for att-L5/8, and a coder `html-L1` whose stored example tokens hold HTML.
- `model_catalogue`: a tiny Gemma 2 indexed through two Gemma Scope coders (so fires_on can load
  the model and coders from `saes.source`), then labelled with the offline `tokens` explainer
  (descriptions + MiniLM embeddings) and finalized: every page has real content.

Import the fixtures into a test module: `from catalogue_fixtures import known_catalogue`.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from coder_formats import write_gemma_scope_1
from conftest import CORPUS_TEXT
from featuredb.runtime.embedding import DEFAULT_EMBEDDING_MODEL, embed
from featuredb.query import create_indexes
from featuredb.store import FeatureStore, examples_schema, features_schema
from featuredb.store.decoder_vectors import write_decoder_vectors
from featuredb.store.descriptions import DESCRIPTION_COLUMNS, write_descriptions
from featuredb.store.schema import COOCCURRENCE_COLUMNS

MODEL = "tiny-model"
D = 8
WIDTH = 16
CREATED = dt.datetime(2025, 1, 2, tzinfo=dt.timezone.utc)
TRICKY_ID = "it's-a' OR '1'='1"

# (coder_id, layer, site, hook, hook_out, model)
CODERS = [
    ("res-L12", 12, "res", "model.layers.12.output", "model.layers.12.output", MODEL),
    ("mlp-L12", 12, "mlp", "model.layers.12.post_feedforward_layernorm.output",
     "model.layers.12.post_feedforward_layernorm.output", MODEL),
    ("res-L5", 5, "res", "model.layers.5.output", "model.layers.5.output", MODEL),
    ("att-L5", 5, "att", "model.layers.5.self_attn.o_proj.input", "model.layers.5.self_attn.o_proj.input", MODEL),
    ("other-res", 12, "res", "model.layers.12.output", "model.layers.12.output", "other-model"),
    (TRICKY_ID, 3, "res", "model.layers.3.output", "model.layers.3.output", MODEL),
]

# Known descriptions: (coder_id, feature) -> description. Everything else has no description.
DESCRIPTIONS = {
    ("res-L12", 3): "French cities such as Paris, Lyon and Marseille",
    ("mlp-L12", 5): "names of towns and cities in France",
    ("res-L5", 7): "the city of Paris and other places in France",
    ("res-L12", 0): "Python source code: function definitions and return statements",
    ("mlp-L12", 1): "closing parentheses and brackets in programming code",
    ("res-L5", 2): "numbers and numeric digits written in text",
    ("res-L12", 9): "cats, dogs and other pets",
    ("mlp-L12", 9): "legal language in contracts and court rulings",
    ("res-L5", 11): "recipes, cooking and food ingredients",
    ("att-L5", 4): "attention to the previous token",
    ("other-res", 3): "French cities like Paris in another model",
    (TRICKY_ID, 6): "Marseille harbour and boats",
}
FRENCH = {("res-L12", 3), ("mlp-L12", 5), ("res-L5", 7)}

# Example contexts: (coder_id, feature) -> list of (tokens, peak position)
CONTEXTS = {
    ("res-L12", 3): [
        (["<bos>", "I", " live", " in", " Paris", " today"], 4),
        (["<bos>", "The", " Eiffel", " tower", " of", " Paris"], 5),
        (["<bos>", "We", " went", " to", " Lyon"], 4),
    ],
    ("res-L5", 7): [
        (["<bos>", "Paris", " is", " big"], 1),
        (["<bos>", "see", " the", " Eiffel", " tower"], 4),
    ],
    ("res-L12", 0): [
        (["<bos>", "def", " add", "(", "a", ")"], 1),
        (["<bos>", " return", " a", " +", " b"], 1),
    ],
    ("mlp-L12", 1): [
        (["<bos>", "print", "(", "x", ")"], 4),
    ],
}


def empty_columns() -> tuple[dict[str, list], dict[str, list]]:
    """Empty feature and example columns to fill row by row (the optional columns a test leaves out
    are stored null)."""
    left_out = {"layer_write", *COOCCURRENCE_COLUMNS, "description_score", "description_score_method"}
    features = {name: [] for name in features_schema().names if name not in left_out}
    return features, {name: [] for name in examples_schema().names}


def _decoders(coder_id: str, seed: int) -> np.ndarray:
    """Decoder rows: feature i points mostly along axis i % D, with a seeded wobble."""
    rng = np.random.default_rng(seed)
    W = 0.05 * rng.standard_normal((WIDTH, D)).astype(np.float32)
    for i in range(WIDTH):
        W[i, i % D] += 1.0 + 0.1 * (i // D)
    return W


def decoder_matrices() -> dict[str, np.ndarray]:
    mats = {coder_id: _decoders(coder_id, seed) for seed, (coder_id, *_rest) in enumerate(CODERS)}
    base = mats["res-L12"][3].copy()
    mats["res-L12"][11] = base + 0.02  # same coder, nearly parallel to res-L12/3
    mats["mlp-L12"][6] = base * 2.0 + 0.01  # other coder, same model and residual space
    mats["att-L5"][2] = base  # exactly parallel, but another space (before o_proj)
    mats["other-res"][2] = base  # exactly parallel, but another model
    return mats


def build_catalogue(path, *, with_decoders: bool = True, indexes: bool = True) -> FeatureStore:
    store = FeatureStore(str(path))
    texts = list(DESCRIPTIONS.values())
    vectors = dict(zip(DESCRIPTIONS, embed(texts)))
    mats = decoder_matrices()
    for coder_id, layer, site, hook, hook_out, model in CODERS:
        sae = dict(coder_id=coder_id, model=model, hook=hook, hook_out=hook_out, site=site, layer=layer,
                   architecture="jumprelu", kind="sae", d_in=D, d_out=D, width=WIDTH, source="", tokens_indexed=1000,
                   contexts_indexed=100, context=6, top_k=3, created_at=CREATED)
        n = WIDTH
        keys = [(coder_id, i) for i in range(n)]
        features = {
            "coder_id": [coder_id] * n, "feature": list(range(n)), "model": [model] * n, "layer": [layer] * n,
            "hook": [hook] * n, "site": [site] * n,
            "active_count": [10 * (i + 1) for i in range(n)],
            "density": [(i + 1) / 100 for i in range(n)],  # feature i: density (i+1)%
            "max_activation": [float(i + 1) for i in range(n)],  # feature i: max i+1
            "mean_activation": [0.5] * n, "std_activation": [0.25] * n,
            "hist_counts": [[5, 3, 2, 0] for _ in range(n)], "hist_max": [16.0] * n,
            "top_logit_tokens": [[" Paris", " France"]] * n, "top_logit_ids": [[11, 12]] * n,
            "top_logit_values": [[2.5, 1.5]] * n,
            "bottom_logit_tokens": [[" the"]] * n, "bottom_logit_ids": [[3]] * n, "bottom_logit_values": [[-1.0]] * n,
            "neighbours": [[(i + 1) % n, (i + 2) % n] for i in range(n)],
            "neighbour_cosines": [[0.5, 0.25]] * n,
            "top_tokens": [[" Paris"] if (coder_id, i) in FRENCH else ["x"] for i in range(n)],
            "top_token_counts": [[2]] * n,
            "description": [DESCRIPTIONS.get(k) for k in keys],
            "description_method": ["test" if k in DESCRIPTIONS else None for k in keys],
            "description_model": [None] * n,
            "embedding_model": [DEFAULT_EMBEDDING_MODEL if k in DESCRIPTIONS else None for k in keys],
            "vector": [vectors[k].tolist() if k in DESCRIPTIONS else None for k in keys],
        }
        examples: dict[str, list] = {c: [] for c in ("coder_id", "feature", "kind", "rank", "bin_min", "bin_max", "tokens",
                                                     "token_ids", "values", "max_value", "max_position", "doc_id",
                                                     "context_index")}
        for (sid, feature), contexts in CONTEXTS.items():
            if sid != coder_id:
                continue
            for rank, (tokens, peak) in enumerate(contexts):
                values = [0.0] * len(tokens)
                values[peak] = 4.0 - rank
                values[max(peak - 1, 1)] = max(values[max(peak - 1, 1)], 0.5)
                for column, value in (("coder_id", coder_id), ("feature", feature), ("kind", "top"), ("rank", rank),
                                      ("bin_min", None), ("bin_max", None), ("tokens", tokens),
                                      ("token_ids", list(range(len(tokens)))), ("values", values),
                                      ("max_value", values[peak]), ("max_position", peak), ("doc_id", f"d{rank}"),
                                      ("context_index", rank)):
                    examples[column].append(value)
            # one interval example
            tokens, peak = contexts[0]
            values = [0.0] * len(tokens)
            values[peak] = 1.0
            for column, value in (("coder_id", coder_id), ("feature", feature), ("kind", "interval"), ("rank", 0),
                                  ("bin_min", 0.75), ("bin_max", 1.25), ("tokens", tokens),
                                  ("token_ids", list(range(len(tokens)))), ("values", values), ("max_value", 1.0),
                                  ("max_position", peak), ("doc_id", "d9"), ("context_index", 9)):
                examples[column].append(value)
        store.write_coder(sae, features, examples)
        if with_decoders:
            write_decoder_vectors(store, coder_id, mats[coder_id])
    if indexes:
        create_indexes(store)
    return store



HTML_SAE = "html-L1"
HTML_TOKENS = ["<bos>", "<script>", "alert('x')", "</script>", " & done"]
HTML_DESCRIPTION = "<script>alert('x')</script> & <b>bold</b>"


def _description(coder_id: str, feature: int, text: str, method: str, **extra) -> dict:
    """A descriptions-table row made from the catalogue's one indexing (CREATED)."""
    return {"coder_id": coder_id, "feature": feature, "description": text, "method": method, "explainer_model": None,
            "explainer_source": None, "prompt_version": "v1", "indexed_at": CREATED, "detection_score": None,
            "fuzz_score": None, "detection_n": None, "fuzz_n": None, "score_details": None,
            "created_at": dt.datetime(2025, 2, 1, tzinfo=dt.timezone.utc), **extra}


def _add_html_coder(store) -> None:
    """A copy of res-L12's features under HTML_SAE, undescribed (so no search finds them), with
    one example whose tokens are HTML."""
    sae = store.coders().filter(pl.col("coder_id") == "res-L12").to_dicts()[0] | {"coder_id": HTML_SAE, "layer": 1}
    features = store.features("res-L12")
    undescribed = [pl.lit(None).cast(features.schema[c]).alias(c) for c in DESCRIPTION_COLUMNS]
    features = features.with_columns(*undescribed, coder_id=pl.lit(HTML_SAE), layer=pl.lit(1, pl.Int32))
    values = [0.0, 3.0, 1.5, 0.0, 0.5]
    examples = {"coder_id": [HTML_SAE], "feature": [0], "kind": ["top"], "rank": [0], "bin_min": [None],
                "bin_max": [None], "tokens": [HTML_TOKENS], "token_ids": [list(range(len(HTML_TOKENS)))],
                "values": [values], "max_value": [3.0], "max_position": [1], "doc_id": ["html"], "context_index": [0]}
    store.write_coder(sae, features.to_arrow(), examples)


@pytest.fixture(scope="module")
def known_catalogue(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("known") / "db"
    store = build_catalogue(path)
    history = [
        _description("res-L12", 3, "' Paris', ' Lyon'", "tokens", created_at=dt.datetime(2025, 1, 5, tzinfo=dt.timezone.utc)),
        _description("res-L12", 3, "French cities such as Paris, Lyon and Marseille", "llm", explainer_model="gpt-4o-mini",
                     explainer_source="https://example.invalid/v1", detection_score=0.8, fuzz_score=0.7,
                     detection_n=20, fuzz_n=20, score_details=json.dumps({"scorer": "gpt-4o-mini"}),
                     evidence=json.dumps({"claims": [{"text": "capitalised word", "top": 5, "top_n": 5}]})),
    ]
    write_descriptions(store, "res-L12", history, embedding_model=DEFAULT_EMBEDDING_MODEL, embedder=embed)
    write_descriptions(store, "att-L5", [_description("att-L5", 8, HTML_DESCRIPTION, "manual")],
                       embedding_model=DEFAULT_EMBEDDING_MODEL, embedder=embed)
    _add_html_coder(store)
    return path


def index_tiny_model(root: Path, model_dir: Path) -> tuple[Path, list[str]]:
    """Index the test corpus through a tiny model and two Gemma Scope coders: (db, coder paths)."""
    from featuredb.indexer.run import IndexConfig, run_index
    from featuredb.indexer.stats import StatsConfig

    coders = [str(write_gemma_scope_1(root / "coders", "res", 1, 64, 48, fire_rate=0.1, seed=1)),
              str(write_gemma_scope_1(root / "coders", "transcoders", 0, 64, 40, fire_rate=0.1, seed=2))]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(CORPUS_TEXT)))
    db = root / "db"
    run_index(IndexConfig(model=str(model_dir), coders=coders, corpus=str(corpus), db=str(db), context=16,
                          batch_size=4, stats=StatsConfig(top_k=4, hist_bins=16, interval_bins=4, interval_per_bin=1),
                          progress=False))
    return db, coders


def build_model_catalogue(root: Path, model_dir: Path) -> Path:
    """`index_tiny_model`, then label every feature with the `tokens` explainer and build the
    search indexes."""
    from featuredb.describe import DescribeConfig, run_describe
    from featuredb.query import finalize

    db, _ = index_tiny_model(root, model_dir)
    run_describe(DescribeConfig(db=str(db), explainer="tokens", progress=False))
    finalize(str(db))
    return db


@pytest.fixture(scope="module")
def model_catalogue(tmp_path_factory, tiny_gemma2) -> Path:
    return build_model_catalogue(tmp_path_factory.mktemp("model_catalogue"), tiny_gemma2)
