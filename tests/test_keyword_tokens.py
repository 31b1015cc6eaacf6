"""Keyword search finds token-level words (issue 16): features described by the offline `words`
explainer are found by `not`, `if` and `(` -- words LanceDB's default full-text index drops as
stop words, and a symbol its word tokenizer cannot hold."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

import featuredb
from featuredb.describe import DescribeConfig, run_describe
from featuredb.query import create_indexes
from featuredb.store import FeatureStore
from featuredb.store.indexes import FTS_OPTIONS, keyword_terms
from catalogue_fixtures import empty_columns

CODER = "toy-kw"
CREATED = dt.datetime(2025, 5, 6, tzinfo=dt.timezone.utc)

# feature -> top examples as (tokens, peak position); each window starts with BOS
FEATURES = {
    0: [(["This", " is", " not", " a", " bug"], 2), (["it", " does", " not", " work"], 2),
        (["we", " do", " not", " know", " yet"], 2)],                                      # ' not'
    1: [(["if", " x", ":", "\n"], 0), (["    ", "if", " y", " >", " 2", ":"], 1),
        (["else", ":", "\n", "if", " z", ":"], 3)],                                        # 'if' in code
    2: [(["print", "(", "x", ")"], 1), (["f", "(", "a", ",", " b", ")"], 1),
        (["len", "(", "items", ")"], 1)],                                                  # '('
    3: [(["print", "(", "x", ")"], 3), (["f", "(", "a", ",", " b", ")"], 5),
        (["len", "(", "items", ")"], 3)],                                                  # ')'
    4: [(["in", " the", " end"], 1), (["of", " the", " list"], 1), (["to", " the", " left"], 1)],  # ' the'
}


def _rows():
    features, examples = empty_columns()
    context_index = 0
    for f, contexts in FEATURES.items():
        for name, value in dict(
            coder_id=CODER, feature=f, model="toy-model", layer=1, hook="blocks.1.hook_resid_post", site="res",
            active_count=len(contexts), density=0.01, max_activation=5.0, mean_activation=2.0, std_activation=1.0,
            hist_counts=[1, 2], hist_max=5.0, top_logit_tokens=[], top_logit_ids=[], top_logit_values=[],
            bottom_logit_tokens=[], bottom_logit_ids=[], bottom_logit_values=[], neighbours=[], neighbour_cosines=[],
            top_tokens=[], top_token_counts=[], description=None, description_method=None, description_model=None,
            embedding_model=None, vector=None,
        ).items():
            features[name].append(value)
        for rank, (tokens, peak) in enumerate(contexts):
            tokens = ["<bos>"] + tokens
            values = [0.0] * len(tokens)
            values[peak + 1] = 5.0 - rank
            row = dict(coder_id=CODER, feature=f, kind="top", rank=rank, bin_min=None, bin_max=None, tokens=tokens,
                       token_ids=list(range(len(tokens))), values=values, max_value=max(values),
                       max_position=peak + 1, doc_id=f"doc{context_index}", context_index=context_index)
            context_index += 1
            for name, v in row.items():
                examples[name].append(v)
    coder = dict(coder_id=CODER, model="toy-model", hook="blocks.1.hook_resid_post",
                 hook_out="blocks.1.hook_resid_post", site="res", layer=1, architecture="topk", kind="sae", d_in=8,
                 d_out=8, width=8, source="test", tokens_indexed=1000, contexts_indexed=context_index, context=16,
                 top_k=4, created_at=CREATED)
    return coder, features, examples


def fake_embed(texts: list[str], name: str) -> np.ndarray:
    rng = np.random.default_rng(len(texts))
    vectors = rng.normal(size=(len(texts), 384)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def cat(tmp_path_factory):
    path = tmp_path_factory.mktemp("kw") / "db"
    FeatureStore(path).write_coder(*_rows())
    run_describe(DescribeConfig(db=str(path), progress=False), embedder=fake_embed)  # the default: words
    create_indexes(str(path))
    return featuredb.open(str(path))


def top_feature(cat, text: str) -> int:
    return cat.keyword(text).limit(5).to_polars()["feature"].to_list()[0]


def test_keyword_finds_stop_words_and_symbols(cat):
    assert top_feature(cat, "not") == 0
    assert top_feature(cat, "if") == 1
    assert top_feature(cat, "(") == 2
    assert top_feature(cat, "'('") == 2
    assert top_feature(cat, ")") == 3
    assert top_feature(cat, "the") == 4
    # a symbol named in words finds the same feature
    assert top_feature(cat, "left parenthesis") == 2
    assert top_feature(cat, "negations") == 0  # the plural finds the description's singular


def test_descriptions_are_words_labels(cat):
    rows = {r["feature"]: r for r in cat.keyword("parenthesis").limit(10).to_polars().to_dicts()}
    assert set(rows) == {2, 3}
    assert rows[2]["description"].startswith("left parenthesis '('")


def test_fts_index_keeps_every_word(cat, tmp_path):
    details = next(i.index_details for i in FeatureStore(cat.reader.store.uri, read_only=True)
                   .table("features").list_indices() if list(i.columns) == ["description"])
    assert all(details[k] == v for k, v in FTS_OPTIONS.items())


def test_an_old_default_index_is_rebuilt(tmp_path):
    from lancedb.index import FTS

    path = tmp_path / "db"
    FeatureStore(path).write_coder(*_rows())
    run_describe(DescribeConfig(db=str(path), progress=False), embedder=fake_embed)
    # LanceDB's defaults before 0.41: stemmed, stop words dropped (which words a stop list drops
    # changes between versions, so the options recorded with the index are what is checked)
    features = FeatureStore(path).table("features")
    features.create_index("description", config=FTS(stem=True, remove_stop_words=True))

    def options() -> dict:
        details = next(c.index_details for c in features.list_indices() if list(c.columns) == ["description"])
        return {k: details.get(k) for k in FTS_OPTIONS}

    assert options() != FTS_OPTIONS
    created = create_indexes(str(path))
    assert "description_idx" in created["features"]
    features.checkout_latest()
    assert options() == FTS_OPTIONS
    assert top_feature(featuredb.open(str(path)), "not") == 0


def test_keyword_terms():
    assert keyword_terms("(") == "left parenthesis"
    assert keyword_terms("not if (") == "not if left parenthesis"
    assert keyword_terms("__init__ x.y") == "__init__ x.y"  # words pass through to the tokenizer
    assert keyword_terms("==") == "equals sign"
    assert keyword_terms("prepositions entries class is") == "prepositions preposition entries entry class is"
