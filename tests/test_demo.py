"""A scaled-down `featuredb demo` end to end on the real SmolLM2-135M (GGUF) and real text."""

import json

import pytest

import featuredb
from featuredb.demo.build import DemoConfig, run_demo
from featuredb.runtime.coders import load_coder
from featuredb.store import FeatureStore


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(out=out, layers=[2, 5], width=128, k=8, train_tokens=4096, eval_tokens=2048, tokens=1500,
                        context=64, epochs=1.0, progress=False)
    run_demo(config)
    return config


def test_every_table_is_filled(small_demo):
    store = FeatureStore(str(small_demo.db))
    saes = store.coders()
    assert sorted(saes["coder_id"].to_list()) == sorted(small_demo.sae_dir(L).name for L in small_demo.layers)
    assert (saes["tokens_indexed"] >= small_demo.tokens).all()
    for coder_id in saes["coder_id"]:
        features = store.features(coder_id)
        assert len(features) == small_demo.width
        assert features["description"].null_count() == 0  # every feature gets at least a token label
        assert features["vector"].null_count() == 0 and features["embedding_model"].null_count() == 0
        assert (features["density"] > 0).sum() > small_demo.width // 2
        assert len(store.examples(coder_id, kind="top")) > 0 and len(store.examples(coder_id, kind="interval")) > 0
    assert "descriptions" in store.table_names()


def test_trained_saes_load_through_the_normal_loader(small_demo):
    for layer in small_demo.layers:
        coder = load_coder(str(small_demo.sae_dir(layer)))
        assert coder.architecture == "topk" and coder.k == small_demo.k and coder.width == small_demo.width
        assert coder.hook == f"model.layers.{layer}.output"
    training = json.loads((small_demo.saes / "training.json").read_text())
    assert [r["layer"] for r in training] == small_demo.layers
    assert all(0 < r["fve"] <= 1 and 0 <= r["dead_share"] <= 1 for r in training)


def test_search_returns_rows(small_demo):
    catalogue = featuredb.open(str(small_demo.db))
    hits = catalogue.search("the word def in Python code").limit(5).to_polars()
    assert 0 < len(hits) <= 5
    assert set(hits["coder_id"].to_list()) <= {small_demo.sae_dir(L).name for L in small_demo.layers}


def test_second_run_is_cached(small_demo, capsys):
    run_demo(small_demo)
    out = capsys.readouterr().out
    assert out.count("cached:") == 3  # corpus, coders, index
    assert "0 new labels" in out
