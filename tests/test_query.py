"""Tests of featuredb.query: semantic / keyword / hybrid search with filters, feature lookups,
activation search (fires_on against a direct encode, with_token over stored contexts), decoder
similarity, index management and the CLI commands.

The small catalogue here is built with known descriptions (embedded with the offline MiniLM),
known decoder vectors and known example contexts, so every answer is known in advance.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

import featuredb
from featuredb.runtime.embedding import embed
from featuredb.query import QueryError, create_indexes, optimize
from featuredb.store.decoder_vectors import write_decoder_vectors
from featuredb.cli import main
from featuredb.store import FeatureStore

from catalogue_fixtures import (DESCRIPTIONS, FRENCH, MODEL, TRICKY_ID, WIDTH, D,
                                build_catalogue, decoder_matrices, index_tiny_model)


@pytest.fixture(scope="module")
def catalogue_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("catalogue") / "db"
    build_catalogue(path)
    return path


@pytest.fixture(scope="module")
def cat(catalogue_path):
    return featuredb.open(str(catalogue_path))


def keys(frame: pl.DataFrame) -> list[tuple[str, int]]:
    return list(zip(frame["coder_id"].to_list(), frame["feature"].to_list()))


# --- semantic search -------------------------------------------------------------------------------


def test_semantic_search_finds_the_concept(cat):
    frame = cat.search("towns in France").where(model=MODEL).limit(3).to_polars()
    assert set(keys(frame)) == FRENCH
    assert frame.columns == ["coder_id", "feature", "layer", "site", "description", "density", "max_activation",
                             "top_tokens", "description_score", "score", "duplicates", "duplicate_features"]
    assert frame["score"].to_list() == sorted(frame["score"].to_list(), reverse=True)
    assert 0.3 < frame["score"].min() <= frame["score"].max() <= 1.0
    code = cat.search("programming source code").limit(2).to_polars()
    assert set(keys(code)) == {("res-L12", 0), ("mlp-L12", 1)}


def test_semantic_search_accepts_a_query_vector(cat):
    vector = embed(["towns in France"])[0]
    by_text = cat.search("towns in France").limit(5).to_polars()
    by_vector = cat.search(vector).limit(5).to_polars()
    assert keys(by_text) == keys(by_vector)
    with pytest.raises(QueryError, match="dimensions"):
        cat.search(np.ones(7))
    with pytest.raises(QueryError, match="finite"):
        cat.search(np.zeros(384))


def test_filters_exclude_what_they_should(cat):
    layer5 = cat.search("towns in France").where(layer=5).limit(20).to_polars()
    assert keys(layer5)[0] == ("res-L5", 7)
    assert set(layer5["layer"].to_list()) == {5}
    assert set(layer5["coder_id"].to_list()) == {"res-L5", "att-L5"}  # every layer-5 feature with a description
    mlp = cat.search("towns in France").where(site="mlp").limit(20).to_polars()
    assert set(mlp["coder_id"].to_list()) == {"mlp-L12"} and keys(mlp)[0] == ("mlp-L12", 5)
    one = cat.search("towns in France").where(coder_id="res-L12").limit(20).to_polars()
    assert set(one["coder_id"].to_list()) == {"res-L12"} and keys(one)[0] == ("res-L12", 3)
    both = cat.search("towns in France").where(layer=[3, 5]).limit(20).to_polars()
    assert set(both["layer"].to_list()) == {3, 5}
    # feature i has density (i+1)/100 and max activation i+1
    dense = cat.search("anything").where(density=(0.05, 0.08)).limit(50).to_polars()
    assert set(dense["feature"].to_list()) <= {4, 5, 6, 7} and len(dense) == 4  # res-L5/7, mlp-L12/5, att-L5/4, TRICKY/6
    low = cat.search("anything").where(max_activation=(None, 4.0)).limit(50).to_polars()
    assert set(low["feature"].to_list()) <= {0, 1, 2, 3} and len(low) == 5
    chained = cat.search("towns in France").where(layer=12).where(site="res").limit(20).to_polars()
    assert set(chained["coder_id"].to_list()) == {"res-L12", "other-res"}
    assert cat.search("towns in France").where(layer=12, model="other-model").to_polars()["coder_id"].to_list() == ["other-res"]
    assert cat.search("towns in France").where(layer=7).to_polars().height == 0  # no such layer: empty, not an error


@pytest.mark.parametrize("mode", ["search", "keyword"])
@pytest.mark.parametrize("density,limit", [((0.02, None), 2), ((None, 0.06), 3), ((0.05, 0.08), 50)])
def test_range_only_filters_equal_filtering_everything(cat, mode, density, limit):
    """A range-only filter may run on an overfetched top (see SearchQuery's _filtered): same rows."""
    query = getattr(cat, mode)("Paris France cities code")
    everything = query.limit(1000).to_polars()
    low, high = density
    expected = everything.filter((pl.col("density") >= (low or 0)) & (pl.col("density") <= (high or 1))).head(limit)
    got = query.where(density=density).limit(limit).to_polars()
    assert keys(got) == keys(expected)


def test_vector_plan_follows_the_filter(cat, monkeypatch):
    from featuredb.query.where import Where

    # pretend the catalogue holds 611 coders of 16k (10M features) over 26 layers
    saes = pl.DataFrame({"coder_id": [f"c{j}" for j in range(611)], "layer": [j % 26 for j in range(611)],
                         "site": ["res"] * 611, "model": [MODEL] * 611, "hook": ["h"] * 611, "width": [16384] * 611})
    reader = cat.reader
    monkeypatch.setattr(reader, "coder_table", lambda refresh=False: saes)
    assert reader.vector_plan(Where()).nprobes == 20 and not reader.vector_plan(Where()).exact
    assert reader.vector_plan(Where().add(coder_id="c3")).exact  # one coder: exact over its 16k rows
    layer = reader.vector_plan(Where().add(layer=5))
    assert not layer.exact and 40 <= layer.nprobes <= 50  # more probes for 1/26 of the rows
    assert reader.vector_plan(Where().add(layer=5), nprobes=7).nprobes == 7
    assert reader.vector_plan(Where(), exact=True).exact


def test_builders_are_immutable(cat):
    base = cat.search("towns in France")
    narrowed = base.where(layer=5).limit(1)
    assert base.limit(20).to_polars().height > 1
    assert narrowed.to_polars().height == 1


# --- keyword and hybrid ----------------------------------------------------------------------------


def test_keyword_search(cat):
    frame = cat.keyword("Marseille").to_polars()
    assert set(keys(frame)) == {("res-L12", 3), (TRICKY_ID, 6)}
    assert (frame["score"] > 0).all()
    assert keys(cat.keyword("parentheses").to_polars()) == [("mlp-L12", 1)]
    assert keys(cat.keyword("Marseille").where(coder_id=TRICKY_ID).to_polars()) == [(TRICKY_ID, 6)]
    assert keys(cat.keyword("Marseille").where(layer=12).to_polars()) == [("res-L12", 3)]
    assert cat.keyword("zeppelin").to_polars().height == 0


def test_hybrid_search_fuses_both(cat):
    frame = cat.hybrid("Marseille").where(layer=12).limit(3).to_polars()
    assert keys(frame)[0] == ("res-L12", 3)  # first in both legs
    assert frame["score"].to_list() == sorted(frame["score"].to_list(), reverse=True)
    code = cat.hybrid("python function definitions").limit(1).to_polars()
    assert keys(code) == [("res-L12", 0)]
    rows = cat.hybrid("parentheses brackets").limit(5).to_polars()
    assert keys(rows)[0] == ("mlp-L12", 1)


# --- hostile input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["tiny-model' OR '1'='1", "x'); DROP TABLE features; --", "' OR 1=1 --",
                                   'tiny-model" OR "1"="1', "tiny-model\\' OR 1=1"])
def test_sql_in_filter_values_is_a_value(cat, value):
    assert cat.search("towns in France").where(model=value).to_polars().height == 0
    assert cat.keyword("Marseille").where(hook=value).to_polars().height == 0
    assert cat.with_token("Paris").where(model=value).to_polars().height == 0
    assert cat.search("towns in France").limit(3).to_polars().height == 3  # tables intact


def test_sae_id_with_quotes_matches_only_itself(cat):
    rows = cat.search("harbour boats").where(coder_id=TRICKY_ID).limit(50).to_polars()
    assert set(rows["coder_id"].to_list()) == {TRICKY_ID}
    assert cat.feature(TRICKY_ID, 6)["description"] == "Marseille harbour and boats"
    with pytest.raises(QueryError, match="unknown coder_id"):
        cat.search("x").where(coder_id="res-L12' OR '1'='1")


def test_query_text_with_sql_or_syntax_is_just_text(cat):
    for text in ["'; DROP TABLE features; --", "Marseille\" OR \"1\"=\"1", "a:b AND (c OR", "*", "paris~2 ^3"]:
        cat.keyword(text).to_polars()
        cat.search(text).limit(2).to_polars()
        cat.hybrid(text).limit(2).to_polars()
    assert keys(cat.keyword("Marseille").to_polars())  # still there


@pytest.mark.parametrize("make", [
    lambda c: c.search(""), lambda c: c.search("   \n"), lambda c: c.keyword(""), lambda c: c.hybrid(" "),
    lambda c: c.search("x" * 5000), lambda c: c.keyword("word " * 1000), lambda c: c.search(None),
    lambda c: c.search("a").limit(0), lambda c: c.search("a").limit(-3), lambda c: c.search("a").limit(10**9),
    lambda c: c.search("a").limit(True), lambda c: c.search("a").limit(2.5),
    lambda c: c.search("a").where(layer="12"), lambda c: c.search("a").where(layer=True),
    lambda c: c.search("a").where(layer=[]), lambda c: c.search("a").where(density=(0.5, 0.1)),
    lambda c: c.search("a").where(density=0.5), lambda c: c.search("a").where(density=(None, None)),
    lambda c: c.search("a").where(max_activation=(float("nan"), 1)), lambda c: c.search("a").where(color="red"),
    lambda c: c.search("a").where(coder_id="nope"), lambda c: c.search("a").where(site="resid"),
    lambda c: c.search("a").where(layer=2**40).to_polars(), lambda c: c.search("a").nprobes(0),
    lambda c: c.feature("nope", 0), lambda c: c.feature("res-L12", WIDTH), lambda c: c.feature("res-L12", -1),
    lambda c: c.feature("res-L12", "3"), lambda c: c.feature("", 0), lambda c: c.similar("res-L12", 99),
    lambda c: c.with_token(""), lambda c: c.with_token("x" * 500), lambda c: c.with_token("a", window=-1),
    lambda c: c.fires_on(""), lambda c: c.fires_on("hi", by="mean"), lambda c: c.fires_on("hi", coders=["nope"]),
    lambda c: c.fires_on("hi", max_density=2.0), lambda c: c.fires_on("hi", limit=0),
])
def test_empty_or_absurd_queries_get_a_clear_error(cat, make):
    with pytest.raises(QueryError) as info:
        make(cat)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 400


def test_open_errors(tmp_path):
    with pytest.raises(QueryError, match="does not exist"):
        featuredb.open(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(QueryError, match="no catalogue"):
        featuredb.open(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(QueryError):
        featuredb.open(str(tmp_path / "file"))


# --- one feature -----------------------------------------------------------------------------------


def test_feature_has_everything(cat):
    f = cat.feature("res-L12", 8)
    assert (f["coder_id"], f["feature"], f["layer"], f["site"], f["model"]) == ("res-L12", 8, 12, "res", MODEL)
    assert f["density"] == pytest.approx(0.09) and f["max_activation"] == pytest.approx(9.0)
    assert f["histogram"] == {"counts": [5, 3, 2, 0], "max": 16.0, "edges": [0.0, 4.0, 8.0, 12.0, 16.0]}
    assert f["logits"]["top"][0] == {"token": " Paris", "id": 11, "value": 2.5}
    assert f["logits"]["bottom"] == [{"token": " the", "id": 3, "value": -1.0}]
    assert [n["feature"] for n in f["neighbours"]] == [9, 10]
    assert f["neighbours"][0]["description"] == "cats, dogs and other pets"
    assert f["coder"]["width"] == WIDTH and f["coder"]["kind"] == "sae"
    assert f["description"] is None and f["descriptions"] == []

    paris = cat.feature("res-L12", 3)
    assert paris["description"] == DESCRIPTIONS[("res-L12", 3)]
    assert paris["descriptions"][0]["method"] == "test"
    assert [e["rank"] for e in paris["top_examples"]] == [0, 1, 2]
    first = paris["top_examples"][0]
    assert first["tokens"][first["max_position"]] == " Paris" and first["max_value"] == 4.0
    assert len(paris["interval_examples"]) == 1 and paris["interval_examples"][0]["bin_min"] == 0.75
    assert paris["top_tokens"] == [{"token": " Paris", "count": 2}]
    json.dumps(paris)  # plain Python values only


# --- activation-pattern search over stored contexts ------------------------------------------------


def test_with_token_finds_peaks_on_the_token(cat):
    frame = cat.with_token("Paris").to_polars()
    assert keys(frame) == [("res-L12", 3), ("res-L5", 7)]
    assert frame["matches"].to_list() == [2, 1] and frame["examples"].to_list() == [3, 2]
    assert frame["score"].to_list() == pytest.approx([2 / 3, 1 / 2])
    assert keys(cat.with_token(" paris ").to_polars()) == keys(frame)
    assert keys(cat.with_token("Paris").where(layer=5).to_polars()) == [("res-L5", 7)]
    assert keys(cat.with_token("Paris").where(density=(0.05, None)).to_polars()) == [("res-L5", 7)]
    assert keys(cat.with_token("def").to_polars()) == [("res-L12", 0)]
    assert cat.with_token("Lyon").to_polars()["matches"].to_list() == [1]
    assert cat.with_token("London").to_polars().height == 0


def test_with_token_phrases_and_windows(cat):
    assert keys(cat.with_token("Eiffel tower").to_polars()) == [("res-L5", 7)]  # peak on " tower"
    assert cat.with_token("eiffel").to_polars().height == 0  # never the peak itself
    near = cat.with_token("eiffel", window=3).to_polars()
    assert set(keys(near)) == {("res-L12", 3), ("res-L5", 7)}
    assert cat.with_token("eiffel", window=2).where(coder_id="res-L12").to_polars().height == 0  # 3 tokens away


# --- similarity by decoder direction ---------------------------------------------------------------


def test_similar_across_coders_same_model_and_space(cat):
    frame = cat.similar("res-L12", 3).limit(20).to_polars()
    found = keys(frame)
    assert found[0] == ("mlp-L12", 6)  # parallel, other coder, residual space
    assert ("res-L12", 11) in found[:3]
    assert ("res-L12", 3) not in found  # never itself
    assert not {s for s, _ in found} & {"att-L5", "other-res"}  # other space / other model
    assert frame["score"][0] == pytest.approx(1.0, abs=1e-3)
    assert frame["score"].to_list() == sorted(frame["score"].to_list(), reverse=True)


def test_similar_within_and_filtered(cat):
    within = cat.similar("res-L12", 3, across=False).limit(5).to_polars()
    assert set(within["coder_id"].to_list()) == {"res-L12"} and keys(within)[0] == ("res-L12", 11)
    layer5 = cat.similar("res-L12", 3).where(layer=5).limit(5).to_polars()
    assert set(layer5["coder_id"].to_list()) == {"res-L5"}  # att-L5 is layer 5 too, but another space
    dense = cat.similar("res-L12", 3).where(density=(0.1, None)).limit(3).to_polars()
    assert (dense["density"] >= 0.1).all() and dense.height == 3


def test_similar_without_decoder_vectors_uses_stored_neighbours(tmp_path):
    build_catalogue(tmp_path / "db", with_decoders=False, indexes=False)
    cat = featuredb.open(str(tmp_path / "db"))
    query = cat.similar("res-L12", 3)
    assert not query.uses_decoder_vectors
    frame = query.to_polars()
    assert keys(frame) == [("res-L12", 4), ("res-L12", 5)]
    assert frame["score"].to_list() == pytest.approx([0.5, 0.25])
    # and every search works without any index (exact search, flat full text)
    assert set(keys(cat.search("towns in France").where(model=MODEL).limit(3).to_polars())) == FRENCH
    assert set(keys(cat.keyword("Marseille").to_polars())) == {("res-L12", 3), (TRICKY_ID, 6)}


def test_write_decoder_vectors_validates(tmp_path):
    store = build_catalogue(tmp_path / "db", with_decoders=False, indexes=False)
    with pytest.raises(ValueError, match="not in the store"):
        write_decoder_vectors(store, "nope", np.ones((WIDTH, D)))
    with pytest.raises(ValueError, match="shape"):
        write_decoder_vectors(store, "res-L12", np.ones((WIDTH + 1, D)))
    W = torch.from_numpy(decoder_matrices()["res-L12"])
    W[5] = 0  # a dead feature: skipped
    assert write_decoder_vectors(store, "res-L12", W) == WIDTH - 1
    assert write_decoder_vectors(store, "res-L12", W) == WIDTH - 1  # rewrite replaces, no duplicates
    assert store.table("decoders_8").count_rows() == WIDTH - 1
    cat = featuredb.open(str(tmp_path / "db"))
    with pytest.raises(QueryError, match="no decoder direction"):
        cat.similar("res-L12", 5).to_polars()


# --- index management ------------------------------------------------------------------------------


def test_indexes_are_built_and_kept_up_to_date(tmp_path):
    store = build_catalogue(tmp_path / "db", indexes=False)
    exact = featuredb.open(str(tmp_path / "db")).search("towns in France").limit(5).to_polars()
    created = create_indexes(store, min_vector_rows=1, partitions=1)
    assert "vector_ivf_rq_p1" in created["features"] and "description_idx" in created["features"]
    assert "coder_id_idx" in created["example_activations"] and "vector_ivf_rq_p1" in created["decoders_8"]
    assert "peak_token_idx" in created["example_activations"] and "context_key_idx" in created["contexts"]
    assert create_indexes(store, min_vector_rows=1) == {"example_activations": [], "contexts": [], "features": [],
                                                        "decoders_8": []}
    cat = featuredb.open(str(tmp_path / "db"))
    assert keys(cat.search("towns in France").limit(5).to_polars()) == keys(exact)
    # a new coder is searchable at once (unindexed rows are searched exactly) and indexed by optimize
    coder_id, layer = "new-L7", 7
    new = build_catalogue(tmp_path / "other", with_decoders=False, indexes=False)
    rows = new.features("res-L12").with_columns(coder_id=pl.lit(coder_id), layer=pl.lit(layer, pl.Int32))
    sae = new.coders().filter(pl.col("coder_id") == "res-L12").to_dicts()[0] | {"coder_id": coder_id, "layer": layer}
    FeatureStore(str(tmp_path / "db")).write_coder(sae, rows.to_arrow(), {c: [] for c in
                                                                          new.examples("res-L12").columns})
    assert ("new-L7", 3) in keys(cat.search("towns in France").where(layer=7).to_polars())
    optimize(store)
    from featuredb.store.indexes import index_summary

    summary = {i["name"]: i for i in index_summary(store)["features"]}
    assert summary["description_idx"]["unindexed_rows"] == 0
    assert ("new-L7", 3) in keys(cat.keyword("Marseille").where(layer=7).to_polars())


# --- activation search through a real (tiny) model --------------------------------------------------


@pytest.fixture(scope="module")
def model_catalogue(tmp_path_factory, tiny_gemma2):
    return index_tiny_model(tmp_path_factory.mktemp("model_catalogue"), tiny_gemma2)


def direct_encode(model_dir, coder_spec, text):
    from featuredb.runtime.coders import load_coder
    from featuredb.runtime.model import load_model

    model = load_model(str(model_dir))
    coder = load_coder(coder_spec, model_is_gemma=True)
    ids = [model.bos_token_id] + model.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids])
    x = model.capture(ids, torch.ones_like(ids), [coder.hook])[coder.hook]
    return coder.coder_id, coder.encode(x.float())[0, 1:].numpy()  # [T, F], BOS dropped


TEXT = "The cat sat on the mat in Paris."


def test_fires_on_matches_a_direct_encode(model_catalogue, tiny_gemma2):
    db, specs = model_catalogue
    cat = featuredb.open(str(db))
    result = cat.fires_on(TEXT, limit=1000, per_token=3)
    dense = dict(direct_encode(tiny_gemma2, spec, TEXT) for spec in specs)
    n_tokens = next(iter(dense.values())).shape[0]
    assert len(result.tokens) == n_tokens == len(result.token_ids)
    # every feature that fires anywhere, with its max and where it is
    expected = {(s, f): float(a[:, f].max()) for s, a in dense.items() for f in range(a.shape[1]) if a[:, f].max() > 0}
    got = {(r["coder_id"], r["feature"]): r["activation"] for r in result.features.iter_rows(named=True)}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5)
    assert result.features["activation"].to_list() == sorted(result.features["activation"].to_list(), reverse=True)
    for row in result.features.head(20).iter_rows(named=True):
        assert dense[row["coder_id"]][row["position"], row["feature"]] == pytest.approx(row["activation"], rel=1e-4)
        assert row["density"] is not None and row["layer"] in (0, 1)
    # per token: the top features of each position across both coders
    for position in range(n_tokens):
        everything = sorted(((float(a[position, f]), s, f) for s, a in dense.items() for f in range(a.shape[1])
                             if a[position, f] > 0), key=lambda t: (-t[0], t[1], t[2]))[:3]
        rows = result.per_token.filter(pl.col("position") == position).sort("rank")
        assert [(r["coder_id"], r["feature"]) for r in rows.iter_rows(named=True)] == [(s, f) for _, s, f in everything]
        assert set(rows["token"].to_list()) <= {result.tokens[position]}


def test_fires_on_sum_positions_density_and_caching(model_catalogue, tiny_gemma2):
    db, specs = model_catalogue
    cat = featuredb.open(str(db))
    coder_id, acts = direct_encode(tiny_gemma2, specs[0], TEXT)
    result = cat.fires_on(TEXT, coders=coder_id, by="sum", positions=[0, -1], limit=5, per_token=0)
    chosen = acts[[0, acts.shape[0] - 1]].sum(axis=0)
    top = np.argsort(-chosen, kind="stable")[:5]
    top = [int(f) for f in top if chosen[f] > 0]
    assert result.features["feature"].to_list() == top
    assert result.features["activation"].to_list() == pytest.approx([float(chosen[f]) for f in top], rel=1e-4)
    assert set(result.features["coder_id"].to_list()) == {coder_id} and result.per_token.height == 0
    models, coders = cat.reader.loaded("models"), cat.reader.loaded("coders")
    # density ceiling: dense features disappear
    densities = dict(FeatureStore(str(db)).features(coder_id).select("feature", "density").iter_rows())
    ceiling = float(np.median(list(densities.values())))
    filtered = cat.fires_on(TEXT, coders=[coder_id], max_density=ceiling, limit=1000)
    assert filtered.features.height > 0
    assert all(densities[f] <= ceiling for f in filtered.features["feature"].to_list())
    assert all(densities[f] <= ceiling for f in filtered.per_token["feature"].to_list())
    # the model and the coder were loaded once and reused
    assert cat.reader.loaded("models") == models and all(cat.reader.loaded("coders")[k] is v for k, v in coders.items())
    with pytest.raises(QueryError, match="out of range"):
        cat.fires_on(TEXT, positions=[100])


def test_fires_on_refuses_a_huge_text(model_catalogue):
    db, _ = model_catalogue
    with pytest.raises(QueryError, match="tokens long"):
        featuredb.open(str(db)).fires_on("cat " * 3000)


def test_feature_of_an_indexed_catalogue(model_catalogue):
    db, _ = model_catalogue
    cat = featuredb.open(str(db))
    coder_id = cat.coders()["coder_id"][0]
    f = cat.feature(coder_id, 0)
    stored = FeatureStore(str(db)).feature_row(coder_id, 0)
    assert f["density"] == stored["density"] and len(f["top_examples"]) <= 4
    assert len(f["neighbours"]) == 10
    # not described yet: semantic search says so; keyword search finds nothing; tokens work
    with pytest.raises(QueryError, match="describe"):
        cat.search("cats").to_polars()
    with pytest.raises(QueryError, match="describe"):
        cat.hybrid("cats").to_polars()
    assert cat.keyword("cats").to_polars().height == 0
    examples = FeatureStore(str(db)).examples(coder_id, kind="top")
    row = next(r for r in examples.iter_rows(named=True) if r["tokens"][r["max_position"]].strip().isalpha())
    peak = row["tokens"][row["max_position"]]
    found = cat.with_token(peak).where(coder_id=coder_id).limit(1000).to_polars()
    assert (row["coder_id"], row["feature"]) in keys(found)


# --- CLI ---------------------------------------------------------------------------------------------


def invoke(command, args, env=None):
    return CliRunner().invoke(main, [command, *args], env=env)


def test_cli_search(catalogue_path):
    db = ["--db", str(catalogue_path)]
    result = invoke("search", ["towns in France", "--model", MODEL, "--limit", "3", "--json", *db])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {(r["coder_id"], r["feature"]) for r in rows} == FRENCH
    human = invoke("search", ["Marseille", "--keyword", *db])
    assert human.exit_code == 0 and "res-L12" in human.output and "description" in human.output
    layer = json.loads(invoke("search", ["Marseille", "--hybrid", "--layer", "12", "--json", *db]).output)
    assert (layer[0]["coder_id"], layer[0]["feature"]) == ("res-L12", 3)
    assert {r["layer"] for r in layer} == {12}
    env = invoke("search", ["Marseille", "--keyword", "--json"], env={"FEATUREDB_DB": str(catalogue_path)})
    assert env.exit_code == 0 and json.loads(env.output)


@pytest.mark.parametrize("args, code", [  # 1: bad input; 2: a usage error (click's convention)
    (["", "--keyword"], 1), (["x", "--limit", "0"], 1), (["x", "--coder", "nope"], 1), (["x", "--layer", "twelve"], 2),
    (["x", "--site", "resid"], 1), (["x", "--no-such-option"], 2), (["x", "--min-density", "0.5", "--max-density", "0.1"], 1),
])
def test_cli_bad_input_is_one_line_and_nonzero_exit(catalogue_path, args, code):
    result = invoke("search", [*args, "--db", str(catalogue_path)])
    assert result.exit_code == code
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_cli_missing_catalogue(tmp_path):
    result = invoke("search", ["x", "--db", str(tmp_path / "nope")])
    assert result.exit_code == 1 and result.stderr.startswith("error: ")


def corrupt_copy(catalogue_path, destination, how: str):
    """A copy of the catalogue whose features data files are truncated or overwritten."""
    shutil.copytree(catalogue_path, destination)
    data_files = sorted((destination / "features.lance" / "data").iterdir())
    assert data_files
    for path in data_files:
        size = path.stat().st_size
        if how == "truncate":
            with open(path, "r+b") as f:
                f.truncate(size // 2)
        else:
            with open(path, "r+b") as f:
                f.write(b"\0" * min(4096, size))
    return destination


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
@pytest.mark.parametrize("command, args", [
    ("search", ["towns in France"]), ("search", ["Marseille", "--keyword"]), ("search", ["Paris", "--hybrid"]),
    ("show", ["res-L12/3"]), ("similar", ["res-L12/3"]),
])
def test_cli_corrupt_data_file_is_one_clear_line(catalogue_path, tmp_path, how, command, args):
    db = corrupt_copy(catalogue_path, tmp_path / "db", how)
    result = invoke(command, [*args, "--db", str(db)])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: catalogue {db}") and "cannot be read" in result.stderr
    assert result.stderr.count("\n") == 1 and ".rs:" not in result.stderr and result.stdout == ""


def test_corrupt_data_file_fails_every_query_kind_with_a_query_error(catalogue_path, tmp_path):
    cat = featuredb.open(str(corrupt_copy(catalogue_path, tmp_path / "db", "overwrite")))
    for query in (cat.with_token(" Paris"), cat.similar("res-L12", 3, across=False), cat.search(embed(["x"])[0])):
        with pytest.raises(QueryError, match="cannot be read"):
            query.to_polars()
    assert cat.coders().height > 0  # the intact coders table still reads


def test_offset_pages_through_the_same_ranking(cat):
    for query in (cat.search("towns in France"), cat.keyword("Paris France cities code"), cat.with_token(" Paris"),
                  cat.similar("res-L12", 3)):
        everything = query.limit(6).to_polars()
        assert everything.height >= 2
        page = query.offset(1).limit(5).to_polars()
        assert keys(page) == keys(everything)[1:] and page.columns == everything.columns
        assert query.offset(1).limit(1).to_list() == everything.slice(1, 1).to_dicts()
    for bad in (-1, 1000, 1.5, True, "2"):
        with pytest.raises(QueryError, match="offset"):
            cat.search("x").offset(bad)
    with pytest.raises(QueryError, match="offset \\+ limit"):
        cat.keyword("Paris").offset(999).limit(2).to_polars()


def test_cli_show(catalogue_path):
    result = invoke("show", ["res-L12/3", "--db", str(catalogue_path)])
    assert result.exit_code == 0, result.output
    assert "French cities" in result.output and "[ Paris]" in result.output and "top examples" in result.output
    data = json.loads(invoke("show", [f"{TRICKY_ID}/6", "--json", "--db", str(catalogue_path)]).output)
    assert data["description"] == "Marseille harbour and boats"
    for bad in ["res-L12", "res-L12/x", "nope/1", "res-L12/999"]:
        result = invoke("show", [bad, "--db", str(catalogue_path)])
        assert result.exit_code == 1 and result.stderr.startswith("error: ")


def test_cli_similar(catalogue_path):
    rows = json.loads(invoke("similar", ["res-L12/3", "--json", "--db", str(catalogue_path)]).output)
    assert (rows[0]["coder_id"], rows[0]["feature"]) == ("mlp-L12", 6)
    within = invoke("similar", ["res-L12/3", "--within", "--db", str(catalogue_path)])
    assert within.exit_code == 0 and "mlp-L12" not in within.output and "res-L12" in within.output


def test_cli_fires(model_catalogue):
    db, _ = model_catalogue
    result = invoke("fires", [TEXT, "--json", "--limit", "5", "--db", str(db)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["features"]) == 5 and data["tokens"]
    human = invoke("fires", [TEXT, "--by", "sum", "--positions", "0,1", "--db", str(db)])
    assert human.exit_code == 0 and "per token" in human.output
    bad = invoke("fires", [TEXT, "--positions", "a,b", "--db", str(db)])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: ")


def test_commands_are_exported():
    assert set(["search", "show", "fires", "similar"]) <= set(main.commands)


# --- models named by imported data load only when the user says so ------------------------------


@pytest.fixture(scope="module")
def imported_catalogue(model_catalogue, tmp_path_factory):
    """The tiny model's catalogue exported and imported back as a Neuronpedia export without our
    sidecar (as Neuronpedia publishes them): its coders' model and source are names from the data."""
    from featuredb.store.neuronpedia import export_neuronpedia, import_neuronpedia

    root = tmp_path_factory.mktemp("imported")
    export_neuronpedia(str(model_catalogue[0]), root / "export")
    for sidecar in (root / "export").glob("*/*/featuredb"):
        shutil.rmtree(sidecar)
    import_neuronpedia(root / "export", root / "db")
    return root / "db"


def test_a_sidecar_import_is_recorded_as_imported_until_reindexed(model_catalogue, tmp_path, tiny_gemma2):
    """With our sidecar an import restores the exported coder rows exactly, so nothing in them says
    "imported": the store's imports table does, and loading its models needs the user's word."""
    from featuredb.store import FeatureStore
    from featuredb.store.neuronpedia import export_neuronpedia, import_neuronpedia

    export_neuronpedia(str(model_catalogue[0]), tmp_path / "export")
    import_neuronpedia(tmp_path / "export", tmp_path / "db")
    cat = featuredb.open(str(tmp_path / "db"))
    coder_ids = cat.coders()["coder_id"].to_list()
    coder_id = coder_ids[0]
    assert len(coder_ids) >= 2 and set(coder_ids) == FeatureStore(tmp_path / "db", read_only=True).imported_coder_ids()
    with pytest.raises(QueryError, match="came from `featuredb import`"):
        cat.fires_on(TEXT, coders=[coder_id])
    assert featuredb.open(str(tmp_path / "db"), trust_models=True).fires_on(TEXT, coders=[coder_id]).features.height
    store = FeatureStore(tmp_path / "db")
    store.forget_import(coder_id)  # what re-indexing the coder here does after writing it
    assert coder_id not in store.imported_coder_ids()
    store.delete_coder(coder_ids[-1])
    assert store.imported_coder_ids() == set(coder_ids[1:-1])


def test_fires_on_an_imported_catalogue_needs_the_users_word(imported_catalogue, tiny_gemma2, monkeypatch):
    coders = featuredb.open(str(imported_catalogue)).coders()
    model, coder_id = coders["model"][0], coders["coder_id"][0]
    loads = []
    import featuredb.runtime.model as runtime_model
    real_load = runtime_model.load_model
    monkeypatch.setattr(runtime_model, "load_model", lambda spec, **kw: loads.append(spec) or real_load(spec, **kw))

    cat = featuredb.open(str(imported_catalogue))
    with pytest.raises(QueryError, match=f"came from `featuredb import`, so its model '{model}' is named by the "
                                         "imported data.*--model.*--trust-models"):
        cat.fires_on(TEXT)
    # naming the model is not enough: the coder weights are still the data's choice
    with pytest.raises(QueryError, match=f"its weights 'neuronpedia:.*' are named by the imported data.*--trust-models"):
        cat.fires_on(TEXT, coders=[coder_id], model=str(tiny_gemma2))
    assert loads == []  # nothing was loaded
    # trusted: the names load (and fail here as the names of an export do: no such weights)
    trusted = featuredb.open(str(imported_catalogue), trust_models=True)
    with pytest.raises(QueryError) as error:
        trusted.fires_on(TEXT, coders=[coder_id], model=str(tiny_gemma2))
    assert "trust" not in str(error.value) and "cannot load coder" in str(error.value)
    assert loads == [str(tiny_gemma2)]


def test_cli_refuses_models_named_by_imported_data(imported_catalogue, tiny_gemma2):
    coders = featuredb.open(str(imported_catalogue)).coders()
    refused = invoke("fires", [TEXT, "--db", str(imported_catalogue)])
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: ") and repr(coders["model"][0]) in refused.stderr
    assert "--trust-models" in refused.stderr
    trusted = invoke("fires", [TEXT, "--db", str(imported_catalogue), "--model", str(tiny_gemma2), "--trust-models"])
    assert trusted.exit_code == 1 and "--trust-models" not in trusted.stderr and "cannot load coder" in trusted.stderr


def test_indexed_catalogues_load_their_own_models(model_catalogue):
    cat = featuredb.open(str(model_catalogue[0]))
    assert cat.reader.imported_coder_ids() == set()
    assert cat.fires_on(TEXT, limit=3).features.height == 3


def test_search_refuses_an_embedding_model_named_only_by_imported_data(imported_catalogue, tmp_path, monkeypatch):
    from featuredb.runtime.embedding import DEFAULT_EMBEDDING_MODEL
    from featuredb.store.descriptions import sync_features, write_descriptions

    db = tmp_path / "db"
    shutil.copytree(imported_catalogue, db)
    store = FeatureStore(str(db))
    coder_id = store.coders()["coder_id"][0]
    description = {"coder_id": coder_id, "feature": 0, "description": "cats and dogs", "method": "manual",
                   "explainer_model": None, "explainer_source": None, "prompt_version": "v1",
                   "indexed_at": store.coders()["created_at"][0], "detection_score": None, "fuzz_score": None,
                   "detection_n": None, "fuzz_n": None, "score_details": None,
                   "created_at": store.coders()["created_at"][0]}
    write_descriptions(store, coder_id, [description], sync=False)
    sync_features(store, coder_id, embedding_model="someone/else", embedder=lambda texts, name: embed(texts))
    with pytest.raises(QueryError, match="'someone/else' is recorded only with coders from `featuredb import`"
                                         ".*--trust-models"):
        featuredb.open(str(db)).search("cats").to_list()
    refused = invoke("search", ["cats", "--db", str(db)])
    assert refused.exit_code == 1 and "--trust-models" in refused.stderr
    # the user's own embedding model, or trust, lets it through
    named = featuredb.open(str(db), embedding_model=DEFAULT_EMBEDDING_MODEL).search("cats").to_list()
    assert [(r["coder_id"], r["feature"]) for r in named][:1] == [(coder_id, 0)]
    import featuredb.runtime.embedding as runtime_embedding
    tried = []

    def load_embedder(name, device="cpu"):  # no hub here: record what trust lets load
        tried.append(name)
        raise runtime_embedding.EmbeddingError(f"cannot load embedding model {name!r}: offline")

    monkeypatch.setattr(runtime_embedding, "load_embedder", load_embedder)
    with pytest.raises(QueryError, match="cannot load embedding model 'someone/else'"):
        featuredb.open(str(db), trust_models=True).search("cats").to_list()
    assert tried == ["someone/else"]
    assert featuredb.open(str(db)).keyword("cats").to_list()  # keyword search loads no model


def test_rows_of_an_unlisted_coder_are_never_returned(catalogue_path, tmp_path):
    """A kill between a coder's features and its coders row leaves features of an unlisted coder:
    searches must not show them (the coder is not in the catalogue)."""
    import shutil

    from featuredb.store import FeatureStore

    db = tmp_path / "db"
    shutil.copytree(catalogue_path, db)
    before = featuredb.open(str(db)).keyword("Paris").limit(50).to_polars()
    assert "res-L12" in before["coder_id"].to_list()
    coders = FeatureStore(db).table("coders")
    coders.delete("coder_id = 'res-L12'")  # unlisted, its features still stored
    after = featuredb.open(str(db)).keyword("Paris").limit(50).to_polars()
    assert "res-L12" not in after["coder_id"].to_list() and after["layer"].null_count() == 0
