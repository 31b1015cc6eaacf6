"""Catalogues for the server tests (test_api.py, test_browser.py).

- `known_catalogue`: test_query's catalogue of known answers, plus a descriptions-table history
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

import polars as pl
import pytest

from conftest import CORPUS_TEXT
from featuredb.store.descriptions import DESCRIPTION_COLUMNS, write_descriptions
from coder_formats import write_gemma_scope_1
from test_query import CREATED, build_catalogue

HTML_SAE = "html-L1"
HTML_TOKENS = ["<bos>", "<script>", "alert('x')", "</script>", " & done"]
HTML_DESCRIPTION = "<script>alert('x')</script> & <b>bold</b>"


def _description(sae_id: str, feature: int, text: str, method: str, **extra) -> dict:
    """A descriptions-table row made from the catalogue's one indexing (CREATED)."""
    return {"sae_id": sae_id, "feature": feature, "description": text, "method": method, "explainer_model": None,
            "explainer_source": None, "prompt_version": "v1", "indexed_at": CREATED, "detection_score": None,
            "fuzz_score": None, "detection_n": None, "fuzz_n": None, "score_details": None,
            "created_at": dt.datetime(2025, 2, 1, tzinfo=dt.timezone.utc), **extra}


def _add_html_coder(store) -> None:
    """A copy of res-L12's features under HTML_SAE, undescribed (so no search finds them), with
    one example whose tokens are HTML."""
    sae = store.saes().filter(pl.col("sae_id") == "res-L12").to_dicts()[0] | {"sae_id": HTML_SAE, "layer": 1}
    features = store.features("res-L12")
    undescribed = [pl.lit(None).cast(features.schema[c]).alias(c) for c in DESCRIPTION_COLUMNS]
    features = features.with_columns(*undescribed, sae_id=pl.lit(HTML_SAE), layer=pl.lit(1, pl.Int32))
    values = [0.0, 3.0, 1.5, 0.0, 0.5]
    examples = {"sae_id": [HTML_SAE], "feature": [0], "kind": ["top"], "rank": [0], "bin_min": [None],
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
                     detection_n=20, fuzz_n=20, score_details=json.dumps({"scorer": "gpt-4o-mini"})),
    ]
    write_descriptions(store, "res-L12", history)
    write_descriptions(store, "att-L5", [_description("att-L5", 8, HTML_DESCRIPTION, "manual")])
    _add_html_coder(store)
    return path


def build_model_catalogue(root: Path, model_dir: Path) -> Path:
    """Index the test corpus through a tiny model and two Gemma Scope coders, label every feature
    with the `tokens` explainer, and build the search indexes."""
    from featuredb.indexer.describe import DescribeConfig, run_describe
    from featuredb.indexer.run import IndexConfig, run_index
    from featuredb.indexer.stats import StatsConfig
    from featuredb.query import finalize

    coders = [str(write_gemma_scope_1(root / "coders", "res", 1, 64, 48, fire_rate=0.1, seed=1)),
              str(write_gemma_scope_1(root / "coders", "transcoders", 0, 64, 40, fire_rate=0.1, seed=2))]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(CORPUS_TEXT)))
    db = root / "db"
    run_index(IndexConfig(model=str(model_dir), coders=coders, corpus=str(corpus), db=str(db), context=16,
                          batch_size=4, stats=StatsConfig(top_k=4, hist_bins=16, interval_bins=4, interval_per_bin=1),
                          progress=False))
    run_describe(DescribeConfig(db=str(db), explainer="tokens", progress=False))
    finalize(str(db))
    return db


@pytest.fixture(scope="module")
def model_catalogue(tmp_path_factory, tiny_gemma2) -> Path:
    return build_model_catalogue(tmp_path_factory.mktemp("model_catalogue"), tiny_gemma2)
