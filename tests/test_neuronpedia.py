"""Tests of the Neuronpedia export / import (featuredb.store.neuronpedia and its CLI commands).

- A realistic catalogue (catalogue_fixtures.known_catalogue: six coders, MiniLM description
  vectors, decoder vectors, a descriptions history with a scored llm description) is exported,
  checked against Neuronpedia's layout, field names and types, imported into a fresh catalogue
  and compared table by table, row by row; exporting the import again gives the same files.
- Rows written by hand exactly as Neuronpedia publishes them (no featuredb sidecar) import, get
  documented defaults, and are searchable.
- Bad input through the CLI: one line on stderr, exit status 1, the catalogue untouched.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import gzip
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import featuredb
import catalogue_fixtures
from featuredb.query import finalize
from featuredb.store import EXAMPLES_TABLE, FeatureStore, StoreError
from featuredb.cli import main
from featuredb.store.neuronpedia import export_neuronpedia, import_neuronpedia, model_id_for, source_set_for
from featuredb.store import feature_store as feature_store_module
from test_store import db_snapshot, deny_writes

# Neuronpedia's field names, as its public dataset export (utils/neuronpedia-utils export-data.py)
# selects them, plus the correlated_features_* columns of its Neuron table.
NEURON_FIELDS = {
    "modelId", "layer", "index", "maxActApprox", "creatorId", "frac_nonzero", "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "neuron_alignment_indices", "neuron_alignment_l1", "neuron_alignment_values", "correlated_neurons_indices",
    "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
    "correlated_features_pearson", "decoder_weights_dist", "neg_str", "neg_values", "pos_str", "pos_values",
    "sourceSetName", "topkCosSimIndices", "topkCosSimValues", "vector", "vectorLabel", "hookName",
    "vectorDefaultSteerStrength", "hasVector",
}
ACTIVATION_FIELDS = {
    "id", "modelId", "layer", "index", "creatorId", "dataSource", "tokens", "maxValue", "minValue", "values",
    "maxValueTokenIndex", "dfaValues", "dfaMaxValue", "dfaTargetIndex", "binContains", "binMin", "binMax",
}
EXPLANATION_FIELDS = {
    "id", "modelId", "layer", "index", "authorId", "description", "embedding", "typeName", "explanationModelName",
    "umap_x", "umap_y", "umap_cluster", "umap_log_feature_sparsity",
}
NP_MODEL, NP_SOURCE = "gemma-2-2b", "20-gemmascope-res-16k"
known_catalogue = catalogue_fixtures.known_catalogue  # six coders, descriptions history, decoder vectors


def read_rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def all_rows(store: FeatureStore, table: str) -> list[dict]:
    rows = store.table(table).to_arrow().to_pylist()
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(known_catalogue, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "np"
    result = export_neuronpedia(known_catalogue, out, batch_size=10)
    assert result.features == 7 * 16 and result.sources
    return out


@pytest.fixture(scope="module")
def reimported(exported, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("reimport") / "db"
    result = import_neuronpedia(exported, db)
    assert result.sidecar and len(result.coder_ids) == 7 and result.unembedded == 0
    return db


# --- export: layout, field names, types --------------------------------------------------------


def test_export_layout_is_neuronpedias(exported):
    source = exported / "tiny-model" / "12-res"
    assert sorted(p.name for p in (exported / "tiny-model").iterdir()) == ["1-html", "12-mlp", "12-res",
                                                                          "3-it-s-a-or-1-1", "5-att", "5-res"]
    assert (exported / "other-model" / "12-other-res").is_dir()
    assert {p.name for p in source.iterdir()} == {"features", "activations", "explanations", "featuredb",
                                                  "model.jsonl", "release.jsonl", "sourceset.jsonl", "source.jsonl"}
    for kind in ("features", "activations", "explanations"):  # 16 features in batches of 10
        assert sorted(p.name for p in (source / kind).iterdir()) == ["batch-0.jsonl.gz", "batch-1.jsonl.gz"]
    assert [r["index"] for r in read_rows(source / "features" / "batch-1.jsonl.gz")] == [str(i) for i in range(10, 16)]
    meta = json.loads((source / "source.jsonl").read_text())
    assert (meta["id"], meta["modelId"], meta["setName"]) == ("12-res", "tiny-model", "res")


def test_rows_have_exactly_neuronpedias_fields_and_types(exported, known_catalogue):
    source = exported / "tiny-model" / "12-res"
    neurons = read_rows(source / "features" / "batch-0.jsonl.gz")
    activations = read_rows(source / "activations" / "batch-0.jsonl.gz")
    explanations = read_rows(source / "explanations" / "batch-0.jsonl.gz")
    assert neurons and activations and explanations
    assert all(set(r) == NEURON_FIELDS for r in neurons)
    assert all(set(r) == ACTIVATION_FIELDS for r in activations)
    assert all(set(r) == EXPLANATION_FIELDS for r in explanations)

    stored = FeatureStore(known_catalogue, read_only=True).feature_row("res-L12", 3)
    neuron = next(r for r in neurons if r["index"] == "3")
    assert (neuron["modelId"], neuron["layer"], neuron["sourceSetName"]) == ("tiny-model", "12-res", "res")
    assert neuron["maxActApprox"] == stored["max_activation"] and neuron["frac_nonzero"] == stored["density"]
    assert neuron["pos_str"] == [" Paris", " France"] and neuron["pos_values"] == [2.5, 1.5]
    assert neuron["neg_str"] == [" the"] and neuron["topkCosSimIndices"] == [4, 5]
    assert neuron["freq_hist_data_bar_heights"] == [5.0, 3.0, 2.0, 0.0]
    assert neuron["freq_hist_data_bar_values"] == [2.0, 6.0, 10.0, 14.0]  # bin centres on [0, 16]
    assert neuron["hasVector"] and len(neuron["vector"]) == 8 and all(isinstance(v, float) for v in neuron["vector"])
    assert abs(np.linalg.norm(neuron["vector"]) - 1) < 2e-3 and neuron["hookName"] == "model.layers.12.output"  # stored as float16

    feature_3 = [r for r in activations if r["index"] == "3"]
    top = [r for r in feature_3 if r["binMin"] == -1]
    interval = [r for r in feature_3 if r["binMin"] != -1]
    assert len(top) == 3 and len(interval) == 1
    assert all(r["binContains"] == -1 and r["binMax"] == stored["max_activation"] for r in top)
    assert (interval[0]["binMin"], interval[0]["binMax"]) == (0.75, 1.25)
    for r in feature_3:
        assert isinstance(r["index"], str) and all(isinstance(t, str) for t in r["tokens"])
        assert all(isinstance(v, float) for v in r["values"]) and len(r["values"]) == len(r["tokens"])
        assert r["values"][r["maxValueTokenIndex"]] == r["maxValue"] == max(r["values"])
        assert r["minValue"] == min(r["values"]) and isinstance(r["id"], str)
    assert top[0]["tokens"] == ["<bos>", "I", " live", " in", " Paris", " today"]

    by_text = {r["description"]: r for r in explanations if r["index"] == "3"}
    llm = by_text["French cities such as Paris, Lyon and Marseille"]
    assert (llm["typeName"], llm["explanationModelName"]) == ("featuredb_llm", "gpt-4o-mini")
    assert by_text["' Paris', ' Lyon'"]["typeName"] == "featuredb_tokens"
    assert all(r["embedding"] is None for r in explanations)  # theirs is vector(256) of another model
    only_current = next(r for r in explanations if r["index"] == "0")  # no descriptions row: the current one
    assert only_current["description"] == "Python source code: function definitions and return statements"


# --- round trip ----------------------------------------------------------------------------------


def test_round_trip_restores_every_table_row_for_row(known_catalogue, reimported):
    before, after = FeatureStore(known_catalogue, read_only=True), FeatureStore(reimported, read_only=True)
    assert after.coders().equals(before.coders())
    for coder_id in before.coders()["coder_id"]:
        assert after.features(coder_id).equals(before.features(coder_id)), coder_id  # vectors included
        assert after.examples(coder_id).equals(before.examples(coder_id)), coder_id
    # every table of the original, plus the record that these coders came from an import
    assert sorted(after.table_names()) == sorted(before.table_names() + ["imports"])
    assert after.imported_coder_ids() == set(before.coders()["coder_id"])
    for table in ("descriptions", "decoders_8"):
        assert all_rows(after, table) == all_rows(before, table), table
    assert len(all_rows(after, "descriptions")) == 3


def test_exporting_the_import_again_gives_the_same_files(exported, reimported, tmp_path):
    again = tmp_path / "again"
    export_neuronpedia(reimported, again, batch_size=10)
    first, second = tree(exported), tree(again)
    assert first.keys() == second.keys()
    # everything but the metadata rows' createdAt stamps is byte for byte the same
    changed = [name for name in first if first[name] != second[name]]
    assert changed and all(len(Path(name).parts) == 3 and name.endswith(".jsonl") for name in changed)


def test_import_twice_needs_replace_and_does_not_duplicate(exported, reimported, tmp_path):
    db = tmp_path / "db"
    source = exported / "tiny-model" / "12-res"
    import_neuronpedia(source, db)
    with pytest.raises(StoreError, match="already in .* --replace"):
        import_neuronpedia(source, db)
    import_neuronpedia(source, db, replace=True)
    store = FeatureStore(db, read_only=True)
    assert len(all_rows(store, "descriptions")) == 2
    assert store.features("res-L12").equals(FeatureStore(reimported, read_only=True).features("res-L12"))


def test_export_options_and_names(known_catalogue, tmp_path):
    result = export_neuronpedia(known_catalogue, tmp_path / "one", coder_ids=["res-L5"], model_id="Tiny Model",
                                source_set="my-set")
    assert result.sources == ["tiny-model/5-my-set"] and result.features == 16
    with pytest.raises(StoreError, match="would both be exported as tiny-model/12-x"):
        export_neuronpedia(known_catalogue, tmp_path / "two", coder_ids=["res-L12", "mlp-L12"], source_set="x")
    with pytest.raises(StoreError, match="not empty"):
        export_neuronpedia(known_catalogue, tmp_path / "one")
    assert model_id_for("google/gemma-2-2b") == "gemma-2-2b" and model_id_for("/m/SmolLM2-135M.gguf") == "smollm2-135m"
    assert source_set_for("smollm2-res-L15-w4096-k32", "res", 4096) == "smollm2-res-w4096-k32"
    assert source_set_for("gemma-scope-res-layer_12-width_16k-average_l0_82", "res", 16384) == \
        "gemma-scope-res-width-16k-average-l0-82"
    assert source_set_for("L3", "mlp", 16384) == "mlp-16k"
    assert source_set_for("gemma-2-2b/20-gemmascope-res-16k", "res", 16384) == "gemmascope-res-16k"


# --- rows as Neuronpedia publishes them ---------------------------------------------------------


def neuron(index: int, **overrides) -> dict:
    row = {
        "modelId": NP_MODEL, "layer": NP_SOURCE, "index": str(index), "maxActApprox": 12.5, "creatorId": "clsxqq2xd",
        "frac_nonzero": 0.001, "freq_hist_data_bar_heights": [6.0, 3.0, 1.0],
        "freq_hist_data_bar_values": [2.5, 7.5, 12.5], "logits_hist_data_bar_heights": [1.0, 2.0],
        "logits_hist_data_bar_values": [-0.5, 0.5], "neuron_alignment_indices": [], "neuron_alignment_l1": [],
        "neuron_alignment_values": [], "correlated_neurons_indices": [], "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [], "decoder_weights_dist": [], "neg_str": [" the", " of"],
        "neg_values": [-0.8, -0.7], "pos_str": [" Paris", " Lyon"], "pos_values": [1.2, 1.1],
        "sourceSetName": "gemmascope-res-16k", "topkCosSimIndices": [], "topkCosSimValues": [],
        "vector": [], "vectorLabel": None, "hookName": "blocks.20.hook_resid_post", "vectorDefaultSteerStrength": 10,
        "hasVector": False,
    }
    return row | overrides


def activation(index: int, n: int, tokens: list[str], values: list[float], *, interval: bool = False) -> dict:
    peak = values.index(max(values))
    return {
        "id": f"cm0act{index}x{n}", "modelId": NP_MODEL, "layer": NP_SOURCE, "index": str(index),
        "creatorId": "clsxqq2xd", "dataSource": None, "tokens": tokens, "maxValue": max(values),
        "minValue": min(values), "values": values, "maxValueTokenIndex": peak, "dfaValues": [], "dfaMaxValue": None,
        "dfaTargetIndex": None, "binContains": 0.004 if interval else -1, "binMin": 1.0 if interval else -1,
        "binMax": 2.0 if interval else 12.5,
    }


def explanation(index: int, text: str, type_name: str | None, model: str | None) -> dict:
    return {
        "id": f"cm0exp{index}", "modelId": NP_MODEL, "layer": NP_SOURCE, "index": str(index), "authorId": "clsxqq2xd",
        "description": text, "embedding": "[0.01,-0.02,0.03]", "typeName": type_name, "explanationModelName": model,
        "umap_x": None, "umap_y": None, "umap_cluster": None, "umap_log_feature_sparsity": None,
    }


def write_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))


@pytest.fixture()
def neuronpedia_export(tmp_path) -> Path:
    """A Gemma Scope source as Neuronpedia publishes it: only Neuronpedia's files and fields."""
    root = tmp_path / "neuronpedia"
    source = root / NP_MODEL / NP_SOURCE
    write_gz(source / "features" / "batch-0.jsonl.gz", [
        neuron(0), neuron(1, vector=[3.0, 4.0, 0.0, 0.0], hasVector=True), neuron(2, frac_nonzero=0.0,
                                                                                  freq_hist_data_bar_heights=[],
                                                                                  freq_hist_data_bar_values=[]),
    ])
    write_gz(source / "activations" / "batch-0.jsonl.gz", [
        activation(1, 0, ["<bos>", "I", " love", " Paris"], [0.0, 0.0, 1.5, 11.0]),
        activation(1, 1, ["<bos>", "Lyon", " and", " Paris"], [0.0, 12.5, 0.0, 9.0]),
        activation(1, 2, ["<bos>", " Paris", " is"], [0.0, 1.5, 0.2], interval=True),
        activation(0, 0, ["<bos>", " the", " end"], [0.0, 2.0, 0.0]),
    ])
    write_gz(source / "explanations" / "batch-0.jsonl.gz", [
        explanation(1, "French cities, especially Paris", "oai_token-act-pair", "gpt-4o-mini"),
        explanation(0, "the word 'the'", None, None),
    ])
    (source / "source.jsonl").write_text(json.dumps({
        "id": NP_SOURCE, "modelId": NP_MODEL, "setName": "gemmascope-res-16k", "num_prompts": 1000,
        "num_tokens_in_prompt": 128, "creatorId": "clsxqq2xd", "createdAt": "2024-07-30T00:00:00",
    }) + "\n")
    return root


def test_import_of_neuronpedia_rows_is_searchable(neuronpedia_export, tmp_path):
    db = tmp_path / "db"
    result = import_neuronpedia(neuronpedia_export, db)
    coder_id = f"{NP_MODEL}/{NP_SOURCE}"
    assert result.coder_ids == [coder_id] and not result.sidecar
    assert (result.features, result.examples, result.descriptions, result.decoder_vectors) == (3, 4, 2, 1)
    assert result.unembedded == 2  # Neuronpedia's embeddings are another model's: not imported
    finalize(str(db))

    cat = featuredb.open(str(db))
    found = cat.keyword("Paris").to_polars()
    assert (found["coder_id"][0], found["feature"][0]) == (coder_id, 1)
    feature = cat.feature(coder_id, 1)
    assert feature["description"] == "French cities, especially Paris"
    assert feature["max_activation"] == 12.5 and feature["density"] == pytest.approx(0.001)

    store = FeatureStore(db, read_only=True)
    sae = store.coders().to_dicts()[0]
    assert (sae["model"], sae["layer"], sae["site"], sae["kind"], sae["hook"]) == \
        (NP_MODEL, 20, "res", "sae", "blocks.20.hook_resid_post")
    assert (sae["width"], sae["d_in"], sae["contexts_indexed"], sae["context"], sae["tokens_indexed"], sae["top_k"]) == \
        (3, 4, 1000, 128, 128_000, 2)
    row = store.feature_row(coder_id, 1)
    assert row["active_count"] == 128 and row["top_logit_tokens"] == [" Paris", " Lyon"]
    assert row["top_logit_ids"] == [-1, -1] and row["top_tokens"] == ["Lyon", " Paris"]
    assert row["hist_counts"] == [6, 3, 1] and row["hist_max"] == 15.0
    assert row["mean_activation"] == pytest.approx(5.0) and row["vector"] is None
    assert (row["description_method"], row["description_model"]) == ("llm", "gpt-4o-mini")
    assert store.feature_row(coder_id, 0)["description_method"] == "manual"
    examples = store.examples(coder_id, 1)
    assert examples.select("kind", "rank", "max_value").rows() == [("interval", 0, 1.5), ("top", 0, 12.5),
                                                                   ("top", 1, 11.0)]
    assert examples["token_ids"][0].to_list() == [-1, -1, -1] and examples["doc_id"][0] == ""
    descriptions = {r["feature"]: r for r in all_rows(store, "descriptions")}
    assert (descriptions[1]["explainer_source"], descriptions[1]["prompt_version"]) == ("neuronpedia", "oai_token-act-pair")


def test_describing_an_import_reads_each_example_with_its_own_tokens(neuronpedia_export, tmp_path):
    """Imported contexts all have context_index -1: evidence must not take one for another."""
    from featuredb.describe.evidence import load_evidence

    db = tmp_path / "db"
    import_neuronpedia(neuronpedia_export, db)
    ev = load_evidence(FeatureStore(db, read_only=True), f"{NP_MODEL}/{NP_SOURCE}", [1], top_k=2)[1]
    assert [c.tokens for c in ev.top] == [("Lyon", " and", " Paris"), ("I", " love", " Paris")]  # BOS dropped
    assert [c.tokens for c in ev.interval] == [(" Paris", " is")]


def test_neuronpedia_import_exports_back_with_their_type_names(neuronpedia_export, tmp_path):
    import_neuronpedia(neuronpedia_export, tmp_path / "db")
    export_neuronpedia(tmp_path / "db", tmp_path / "out")
    rows = read_rows(tmp_path / "out" / NP_MODEL / NP_SOURCE / "explanations" / "batch-0.jsonl.gz")
    assert {(r["index"], r["typeName"], r["explanationModelName"]) for r in rows} == \
        {("1", "oai_token-act-pair", "gpt-4o-mini"), ("0", None, None)}


def test_import_with_embed_embeds_descriptions(neuronpedia_export, tmp_path):
    def fake_embedder(texts: list[str], model: str) -> np.ndarray:
        return np.ones((len(texts), 384), dtype=np.float32) / np.sqrt(384)

    result = import_neuronpedia(neuronpedia_export, tmp_path / "db", embedder=fake_embedder, embedding_model="sentence-transformers/all-MiniLM-L6-v2")
    assert (result.embedded, result.unembedded) == (2, 0)
    row = FeatureStore(tmp_path / "db", read_only=True).feature_row(f"{NP_MODEL}/{NP_SOURCE}", 1)
    assert row["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2" and len(row["vector"]) == 384


# --- bad input through the CLI --------------------------------------------------------------------


def run(*args: str):
    return CliRunner().invoke(main, [*map(str, args)])


def spoil_features(source: Path, rows: list[dict] | None = None, raw: bytes | None = None) -> None:
    path = source / "features" / "batch-0.jsonl.gz"
    if raw is not None:
        path.write_bytes(raw)
    else:
        write_gz(path, rows)


BAD_IMPORTS = {
    "malformed JSON": (lambda s: spoil_features(s, raw=gzip.compress(json.dumps(neuron(0)).encode() + b'\n{"mod\n')),
                       r"features/batch-0\.jsonl\.gz:2: malformed JSON"),
    "corrupt gzip": (lambda s: spoil_features(s, raw=b"\x1f\x8b\x08garbage"), r"batch-0\.jsonl\.gz: cannot read gzip"),
    "wrong type": (lambda s: spoil_features(s, [neuron(0, maxActApprox="big")]), r":1: field 'maxActApprox' must be"),
    "index not a number": (lambda s: spoil_features(s, [neuron(0) | {"index": "zero"}]), r"field 'index'"),
    "mismatched counts": (lambda s: spoil_features(s, [neuron(0, pos_values=[1.0])]),
                          r"'pos_str' has 2 entries but 'pos_values' has 1"),
    "activation of a missing feature": (
        lambda s: write_gz(s / "activations" / "batch-0.jsonl.gz", [activation(7, 0, ["a"], [1.0])]),
        r"activations/batch-0\.jsonl\.gz:1: activation of feature 7, which has no row"),
    "tokens and values differ": (
        lambda s: write_gz(s / "activations" / "batch-0.jsonl.gz", [activation(1, 0, ["a", "b"], [1.0]) | {
            "maxValueTokenIndex": 0}]), r"'tokens' has 2 entries but 'values' has 1"),
    "another source's row": (lambda s: spoil_features(s, [neuron(0), neuron(1, layer="21-gemmascope-res-16k")]),
                             r":2: row is for gemma-2-2b/21-gemmascope-res-16k"),
    "empty description": (lambda s: write_gz(s / "explanations" / "batch-0.jsonl.gz", [explanation(1, " ", None, None)]),
                          r"description must be 1 to"),
}


@pytest.mark.parametrize("name", list(BAD_IMPORTS))
def test_cli_bad_import_is_one_line_and_leaves_db_untouched(name, neuronpedia_export, known_catalogue, tmp_path):
    spoil, message = BAD_IMPORTS[name]
    spoil(neuronpedia_export / NP_MODEL / NP_SOURCE)
    for db in (tmp_path / "new-db", known_catalogue):
        before = db_snapshot(Path(db)) if Path(db).exists() else None
        result = run("import", "--format", "neuronpedia", neuronpedia_export, "--db", db, "--quiet")
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert re.search(message, result.stderr), result.stderr
        assert (db_snapshot(Path(db)) if Path(db).exists() else None) == before


def stored(db: Path) -> list[list[dict]]:
    store = FeatureStore(db, read_only=True)
    return [all_rows(store, name) for name in ("coders", "features", EXAMPLES_TABLE, "descriptions", "decoders_4")]


def test_cli_import_into_a_read_only_catalogue_is_one_line_and_untouched(neuronpedia_export, tmp_path, monkeypatch):
    db = tmp_path / "db"
    import_neuronpedia(neuronpedia_export, db)
    before = db_snapshot(db)
    deny_writes(db, monkeypatch)
    result = run("import", "--format", "neuronpedia", neuronpedia_export, "--db", db, "--replace", "--quiet")
    assert result.exit_code == 1, result.output
    assert result.stderr == f"error: cannot write to the catalogue {db}: its directory is read-only\n"
    assert db_snapshot(db) == before


def test_cli_import_refused_a_write_mid_way_is_one_line_and_keeps_the_rows(neuronpedia_export, tmp_path, monkeypatch):
    db = tmp_path / "db"
    import_neuronpedia(neuronpedia_export, db)
    before = stored(db)
    real_replace = feature_store_module._replace_coder_rows

    def permission_denied_on_features(table, rows, key, coder_id, *rest):
        if table.name == "features":  # examples are committed by then, and undone
            raise PermissionError(errno.EACCES, "Permission denied", str(db / "features.lance"))
        real_replace(table, rows, key, coder_id, *rest)

    monkeypatch.setattr(feature_store_module, "_replace_coder_rows", permission_denied_on_features)
    result = run("import", "--format", "neuronpedia", neuronpedia_export, "--db", db, "--replace", "--quiet")
    assert result.exit_code == 1, result.output
    assert result.stderr == (f"error: could not write coder '{NP_MODEL}/{NP_SOURCE}' to {db}: "
                             f"Permission denied: {db / 'features.lance'}\n")
    assert stored(db) == before


def test_cli_bad_import_paths_and_out_of_range_index(exported, tmp_path):
    result = run("import", "--format", "neuronpedia", tmp_path / "missing", "--db", tmp_path / "db", "-q")
    assert result.exit_code == 1 and "is not a directory" in result.stderr and not (tmp_path / "db").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("import", "--format", "neuronpedia", empty, "--db", tmp_path / "db", "-q")
    assert result.exit_code == 1 and "no Neuronpedia source" in result.stderr

    source = tmp_path / "copy"
    shutil.copytree(exported / "tiny-model" / "5-res", source)
    coder = json.loads((source / "featuredb" / "coder.jsonl").read_text())
    (source / "featuredb" / "coder.jsonl").write_text(json.dumps(coder | {"width": 12}) + "\n")
    result = run("import", "--format", "neuronpedia", source, "--db", tmp_path / "db", "-q")
    assert result.exit_code == 1 and "feature index 12 is out of range for width 12" in result.stderr
    assert not (tmp_path / "db").exists()

    (source / "featuredb" / "coder.jsonl").write_text(json.dumps(coder) + "\n")
    (source / "featuredb" / "activations" / "batch-0.jsonl.gz").unlink()
    result = run("import", "--format", "neuronpedia", source, "--db", tmp_path / "db", "-q")
    assert result.exit_code == 1 and "must mirror every batch file" in result.stderr


def test_cli_export_and_import(known_catalogue, tmp_path):
    out = tmp_path / "out"
    result = run("export", "--format", "neuronpedia", "--db", known_catalogue, "--out", out, "--coder", "res-L12", "-q")
    assert result.exit_code == 0, result.output
    assert "exported 16 features" in result.stdout and "tiny-model/12-res" in result.stdout
    again = run("export", "--format", "neuronpedia", "--db", known_catalogue, "--out", out, "-q")
    assert again.exit_code == 1 and "not empty" in again.stderr and again.stderr.count("\n") == 1
    bad_format = run("export", "--format", "saelens", "--db", known_catalogue, "--out", tmp_path / "x")
    assert bad_format.exit_code == 2 and bad_format.stderr.startswith("error: ")  # a usage error
    imported = run("import", "--format", "neuronpedia", out, "--db", tmp_path / "db", "-q")
    assert imported.exit_code == 0, imported.output
    assert "imported 1 coder(s): 16 features" in imported.stdout and "res-L12" in imported.stdout
    assert set(["export", "import"]) <= set(main.commands)


def test_export_uses_neuronpedias_id_of_a_registry_coder(known_catalogue, tmp_path):
    out = tmp_path / "lib"
    result = export_neuronpedia(known_catalogue, out, coder_ids=["res-L12", "res-L5"],
                                source_ids={"res-L12": "gemma-2-2b/12-gemmascope-res-16k__l0-82"})
    assert result.sources == ["gemma-2-2b/12-gemmascope-res-16k__l0-82", "tiny-model/5-res"]
    source = out / "gemma-2-2b" / "12-gemmascope-res-16k__l0-82"
    neuron = read_rows(source / "features" / "batch-0.jsonl.gz")[0]
    assert (neuron["modelId"], neuron["layer"], neuron["sourceSetName"]) == \
        ("gemma-2-2b", "12-gemmascope-res-16k__l0-82", "gemmascope-res-16k__l0-82")
    assert json.loads((source / "sourceset.jsonl").read_text())["name"] == "gemmascope-res-16k__l0-82"
    # the user's --model-id / --source-set still win; an id of another layer is refused
    overridden = export_neuronpedia(known_catalogue, tmp_path / "mine", coder_ids=["res-L12"], source_set="mine",
                                    source_ids={"res-L12": "gemma-2-2b/12-gemmascope-res-16k"})
    assert overridden.sources == ["gemma-2-2b/12-mine"]
    with pytest.raises(StoreError, match="'gemma-2-2b/12-gemmascope-res-16k' for coder 'res-L5'.*layer is 5"):
        export_neuronpedia(known_catalogue, tmp_path / "bad", coder_ids=["res-L5"],
                           source_ids={"res-L5": "gemma-2-2b/12-gemmascope-res-16k"})


def test_cli_export_finds_neuronpedias_id_from_each_coders_source(known_catalogue, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(known_catalogue, db)
    coders = FeatureStore(str(db)).table("coders")
    hub = "hf://google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"
    sources = {
        "res-L12": hub,  # the registry's canonical layer-12 coder: Neuronpedia's id
        "res-L5": hub,  # indexed at another hook than the registry's (@HOOK): not that Neuronpedia source
        "mlp-L12": "/data/models--google--gemma-scope-2b-pt-mlp/snapshots/abc/layer_12/width_16k/average_l0_108",
        "att-L5": "/data/my-own-sae",  # a local path that matches nothing
    }
    for coder_id, source in sources.items():
        coders.update(where=f"coder_id = '{coder_id}'", values={"source": source})
    out = tmp_path / "out"
    result = run("export", "--format", "neuronpedia", "--db", db, "--out", out, "-q",
                 *[arg for coder_id in sources for arg in ("--coder", coder_id)])
    assert result.exit_code == 0, result.output
    listed = {line.strip() for line in result.stdout.splitlines()[1:]}
    assert listed == {"gemma-2-2b/12-gemmascope-res-16k", "gemma-2-2b/12-gemmascope-mlp-16k", "tiny-model/5-res",
                      "tiny-model/5-att"}
    imported = run("import", "--format", "neuronpedia", out, "--db", tmp_path / "back", "-q")
    assert imported.exit_code == 0, imported.output
    assert set(FeatureStore(str(tmp_path / "back")).coders()["coder_id"]) == set(sources)  # the sidecar keeps ours


def test_store_error_is_raised_for_bad_batch_size(known_catalogue, tmp_path):
    with pytest.raises(StoreError, match="batch size"):
        export_neuronpedia(known_catalogue, tmp_path / "x", batch_size=0)


# --- the column-wise fast path of activations files (fast_activations.py) -----------------------


class _NoBar:
    def update(self, n: int) -> None:
        pass


def read_both_ways(source: Path, monkeypatch) -> tuple[object, object, list[bool]]:
    """read_source with the fast path (and which files it took), and with every file read line by line."""
    from featuredb.store.neuronpedia import read_source as module
    from featuredb.store.neuronpedia.fast_activations import read_activations_batch as fast_path

    taken = []

    def spy(*args, **kwargs):
        table = fast_path(*args, **kwargs)
        taken.append(table is not None)
        return table

    monkeypatch.setattr(module, "read_activations_batch", spy)
    fast = module.read_source(source, _NoBar())
    monkeypatch.setattr(module, "read_activations_batch", lambda *args, **kwargs: None)
    slow = module.read_source(source, _NoBar())
    return fast, slow, taken


def import_error(root: Path, db: Path) -> str:
    with pytest.raises(StoreError) as error:
        import_neuronpedia(root, db)
    return str(error.value)


def awkward_activations() -> tuple[list[dict], list[dict]]:
    """Two batches as Neuronpedia-like dumps may have them: index as a string (with a leading zero)
    in one and as an int in the other, top rows without bin fields, ints where floats are expected,
    ties and -0.0 in the ranking keys, escaped and raw non-ASCII text, ignored fields of odd types
    (and, without a sidecar, an id that is not a string: unread)."""
    plain = activation(1, 0, ["<bos>", "caf\u00e9", " \U0001F600"], [0, 3, 1])  # ints as values
    no_bins = {k: v for k, v in activation(1, 1, ["a", "b"], [2.0, -0.0]).items() if not k.startswith("bin")}
    tie = activation(1, 2, ["x", "y"], [0.5, 2.0]) | {"dfaValues": [True, "x"], "minValue": None}
    interval = activation(1, 3, ["p", "q"], [1.0, 0.25], interval=True) | {"binMin": 1, "binMax": 2}
    zero = activation(0, 0, ["z"], [-0.0]) | {"index": "00", "maxValue": 0, "binMin": -1, "id": 7}  # id: unread
    first = [plain, no_bins, tie, interval, zero]
    second = [activation(i, n, ["t", "u"], [1.0, 2.0], interval=n % 2 == 1) | {"index": i}
              for i in (1, 0) for n in range(3)]
    return first, second


def test_fast_and_slow_activation_reads_give_identical_tables(neuronpedia_export, monkeypatch):
    source = neuronpedia_export / NP_MODEL / NP_SOURCE
    first, second = awkward_activations()
    path = source / "activations" / "batch-0.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r, ensure_ascii=i % 2 == 0) + "\n"
                                           for i, r in enumerate(first)).encode()))
    write_gz(source / "activations" / "batch-1.jsonl.gz", second)
    fast, slow, taken = read_both_ways(source, monkeypatch)
    assert taken == [True, True]
    assert fast.examples.num_rows == 11 and fast.examples.equals(slow.examples)
    assert fast.features.equals(slow.features) and fast.row["top_k"] == slow.row["top_k"]
    ranks = fast.examples.select(["feature", "kind", "rank", "max_value"]).to_pylist()
    assert [r["rank"] for r in ranks if (r["feature"], r["kind"]) == (1, "top")] == [0, 1, 2, 3, 4]


def test_fast_and_slow_reads_of_our_export_with_its_sidecar_are_identical(exported, monkeypatch, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(exported / "tiny-model" / "12-res", source)
    fast, slow, taken = read_both_ways(source, monkeypatch)
    # (batch 1, features 10-15, has no examples: an empty file, which the slow path reads at once)
    assert taken == [True, False] and fast.examples.num_rows > 0 and fast.examples.equals(slow.examples)
    sidecar = source / "featuredb" / "activations" / "batch-0.jsonl.gz"  # another row order: still paired by id
    write_gz(sidecar, read_rows(sidecar)[::-1])
    fast, slow, taken = read_both_ways(source, monkeypatch)
    assert taken == [True, False] and fast.examples.equals(slow.examples)


ACCEPTED_BY_LINE_ONLY = {  # the fast path leaves these to the slow one, which reads them
    "index as string and int": lambda rows: [rows[0] | {"index": 1}, *rows[1:]],
    "blank line": lambda rows: b"\n\n".join(json.dumps(r).encode() for r in rows) + b"\n",
    "carriage returns": lambda rows: b"\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n",
}
REJECTED = {  # the fast path leaves these to the slow one, which reports them exactly as always
    "bool among values": (lambda rows: [rows[0], rows[1] | {"values": [True, 1.0, 0.0, 9.0]}, *rows[2:]],
                          r":2: field 'values' must be a list of finite numbers$"),
    "two objects on a line": (lambda rows: b"".join(json.dumps(r).encode() for r in rows) + b"\n",
                              r":1: malformed JSON: Extra data"),
    "Inf in an ignored field": (lambda rows: b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                                .replace(b'"minValue": 0.0', b'"minValue": Inf', 1), r":1: malformed JSON"),
    "NaN among values": (lambda rows: [*rows[:2], rows[2] | {"values": [0.0, float("nan"), 0.2]}, rows[3]],
                         r":3: field 'values' must be a list of finite numbers$"),
    "float token index": (lambda rows: [rows[0] | {"maxValueTokenIndex": 3.0}, *rows[1:]],
                          r":1: field 'maxValueTokenIndex' must be an integer, got 3\.0$"),
    "missing maxValue": (lambda rows: [*rows[:3], {k: v for k, v in rows[3].items() if k != "maxValue"}],
                         r":4: missing field 'maxValue'$"),
    "tokens and values differ": (lambda rows: [rows[0], rows[1] | {"values": [1.0]}, *rows[2:]],
                                 r":2: 'tokens' has 4 entries but 'values' has 1$"),
    "interval without binMax": (lambda rows: [*rows[:2], rows[2] | {"binMax": None}, rows[3]],
                                r":3: an interval activation \(binMin set\) needs binMax$"),
    "invalid UTF-8": (lambda rows: json.dumps(rows[0]).encode().replace(b"Paris", b"Par\xffis") + b"\n",
                      r": not UTF-8 text"),
}


def spoil_activations(source: Path, spoil) -> None:
    path = source / "activations" / "batch-0.jsonl.gz"
    content = spoil(read_rows(path))
    path.write_bytes(gzip.compress(content)) if isinstance(content, bytes) else write_gz(path, content)


@pytest.mark.parametrize("name", list(ACCEPTED_BY_LINE_ONLY))
def test_files_the_fast_path_declines_are_read_line_by_line(name, neuronpedia_export, monkeypatch):
    source = neuronpedia_export / NP_MODEL / NP_SOURCE
    spoil_activations(source, ACCEPTED_BY_LINE_ONLY[name])
    fast, slow, taken = read_both_ways(source, monkeypatch)
    assert taken == [False] and fast.examples.num_rows == 4 and fast.examples.equals(slow.examples)


@pytest.mark.parametrize("name", list(REJECTED))
def test_files_the_fast_path_rejects_keep_the_slow_paths_error(name, neuronpedia_export, monkeypatch, tmp_path):
    from featuredb.store.neuronpedia import read_source as module

    spoil, message = REJECTED[name]
    source = neuronpedia_export / NP_MODEL / NP_SOURCE
    spoil_activations(source, spoil)
    with_fast_path = import_error(neuronpedia_export, tmp_path / "a")
    assert re.search(r"activations/batch-0\.jsonl\.gz" + message, with_fast_path), with_fast_path
    monkeypatch.setattr(module, "read_activations_batch", lambda *args, **kwargs: None)
    assert import_error(neuronpedia_export, tmp_path / "b") == with_fast_path


def test_activation_frames_with_non_finite_numbers_are_not_written(tmp_path):
    import polars as pl

    from featuredb.store.neuronpedia.jsonl import write_frame

    write_frame(tmp_path / "ok.jsonl.gz", pl.DataFrame({"values": [[1.0, -0.0]], "maxValue": [2.5], "index": ["3"]}))
    assert read_rows(tmp_path / "ok.jsonl.gz") == [{"values": [1.0, -0.0], "maxValue": 2.5, "index": "3"}]
    for frame in (pl.DataFrame({"values": [[1.0], [float("nan")]]}), pl.DataFrame({"maxValue": [float("inf")]})):
        with pytest.raises(StoreError, match=r"bad\.jsonl\.gz: cannot write a non-finite number as JSON"):
            write_frame(tmp_path / "bad.jsonl.gz", frame)


# --- an import killed part-way, then run again ----------------------------------------------------
# A kill is simulated as an exception no `except Exception` sees, raised right after the N-th
# write to the catalogue (every table commit, create and drop counts), for every N.

WRITES = {"LanceTable": ("add", "delete", "_do_merge", "restore"), "LanceDBConnection": ("create_table", "drop_table")}


class Killed(BaseException):
    """The process died here: nothing after this line of the import runs, nothing is undone."""


@contextlib.contextmanager
def killed_after(writes: int | None) -> Iterator[list[str]]:
    """Count the catalogue writes made inside the block (listed in the yielded list); with
    `writes`, raise Killed right after that many."""
    import lancedb.db
    import lancedb.table

    made: list[str] = []
    patcher = pytest.MonkeyPatch()

    def counted(cls, name):
        real = getattr(cls, name)

        def write(*args, **kwargs):
            result = real(*args, **kwargs)
            made.append(name)
            if len(made) == writes:
                raise Killed(f"after write {writes} ({name})")
            return result
        return write

    for cls in (lancedb.table.LanceTable, lancedb.db.LanceDBConnection):
        for name in WRITES[cls.__name__]:
            patcher.setattr(cls, name, counted(cls, name))
    try:
        yield made
    finally:
        patcher.undo()


TIMESTAMPS = {"coders": ("created_at",), "descriptions": ("created_at", "indexed_at")}


def sorted_rows(rows: list[dict], table: str, timestamps: bool) -> list[dict]:
    """Rows in a fixed order, without the import-time stamps (of a source without sidecar) if asked."""
    drop = () if timestamps else TIMESTAMPS.get(table, ())
    return sorted(({k: v for k, v in r.items() if k not in drop} for r in rows),
                  key=lambda r: json.dumps(r, sort_keys=True, default=str))


def catalogue_rows(db: Path, *, timestamps: bool = True) -> dict[str, list[dict]]:
    """Every row of every table."""
    store = FeatureStore(db, read_only=True)
    return {name: sorted_rows(store.table(name).to_arrow().to_pylist(), name, timestamps)
            for name in store.table_names()}


def coder_state(db: Path, coder_id: str, *, timestamps: bool = True) -> dict[str, list[dict]]:
    """What a reader sees of one coder: its rows in each table (descriptions: its current ones)."""
    from featuredb.store.descriptions import current_descriptions

    store = FeatureStore(db, read_only=True)
    tables = [name for name in store.table_names() if name in ("coders", "features", EXAMPLES_TABLE)
              or name.startswith("decoders_")]
    rows = {name: sorted_rows([r for r in all_rows(store, name) if r["coder_id"] == coder_id], name, timestamps)
            for name in tables}
    rows["descriptions"] = sorted_rows(current_descriptions(store, coder_id), "descriptions", timestamps)
    return rows


def listed(db: Path, coder_id: str) -> bool:
    return coder_id in FeatureStore(db, read_only=True).coders()["coder_id"].to_list()


def older_version(source: Path, out: Path) -> Path:
    """The same source with other numbers and one explanation fewer: an earlier export of the coder."""
    shutil.copytree(source, out)
    for path in [*sorted((out / "features").glob("*.gz")), *sorted((out / "explanations").glob("*.gz"))][:2]:
        rows = read_rows(path)
        write_gz(path, [r | {"maxActApprox": r["maxActApprox"] + 1.0} if "maxActApprox" in r else r for r in rows[1:]]
                 if path.parent.name == "explanations" else
                 [r | {"maxActApprox": r["maxActApprox"] + 1.0} for r in rows])
    return out


KILLED_IMPORTS = {  # (the source, whether it has our sidecar, whether the catalogue already holds the coder)
    "new coder, sidecar": ("sidecar", False),
    "new coder, Neuronpedia's own rows": ("neuronpedia", False),
    "--replace of a stored coder": ("sidecar", True),
}


@pytest.mark.parametrize("name", list(KILLED_IMPORTS))
def test_an_import_killed_after_any_write_is_finished_by_a_plain_rerun(name, exported, neuronpedia_export, tmp_path):
    kind, stored_before = KILLED_IMPORTS[name]
    source = exported / "tiny-model" / "12-res" if kind == "sidecar" else neuronpedia_export / NP_MODEL / NP_SOURCE
    coder_id = "res-L12" if kind == "sidecar" else f"{NP_MODEL}/{NP_SOURCE}"
    start = tmp_path / "start"
    if stored_before:
        import_neuronpedia(older_version(source, tmp_path / "older"), start)
        import_neuronpedia(exported / "tiny-model" / "5-res", start)  # another coder, never touched
    else:
        start.mkdir()
    exact = kind == "sidecar"  # without our sidecar, rows are stamped with the time of the import
    old_state = coder_state(start, coder_id, timestamps=exact) if stored_before else None
    whole = tmp_path / "whole"
    shutil.copytree(start, whole)
    with killed_after(None) as writes:
        import_neuronpedia(source, whole, replace=stored_before)
    expected, new_state = catalogue_rows(whole, timestamps=exact), coder_state(whole, coder_id, timestamps=exact)
    assert len(writes) >= 5, writes

    for n in range(1, len(writes)):  # (after the last write the import is complete)
        db = tmp_path / f"killed-{n}"
        shutil.copytree(start, db)
        with pytest.raises(Killed), killed_after(n):
            import_neuronpedia(source, db, replace=stored_before)
        # a reader sees the coder complete (the old or the new one) or not at all
        if listed(db, coder_id):
            state = coder_state(db, coder_id, timestamps=exact)
            assert state in (old_state, new_state), f"killed after write {n}: {writes[n - 1]}"
        import_neuronpedia(source, db)  # a plain rerun finishes the job
        assert catalogue_rows(db, timestamps=exact) == expected, f"killed after write {n}"
        coder = FeatureStore(db, read_only=True).coders().filter(pl.col("coder_id") == coder_id).row(0, named=True)
        indexed_at = {r["indexed_at"] for r in all_rows(FeatureStore(db, read_only=True), "descriptions")
                      if r["coder_id"] == coder_id}
        assert indexed_at == {coder["created_at"]}, f"killed after write {n}"  # its descriptions are current
        with pytest.raises(StoreError, match="already in .* --replace"):  # once complete, it needs --replace
            import_neuronpedia(source, db)


def markers(db: Path) -> list[str]:
    return [n for n in FeatureStore(db, read_only=True).table_names() if n.startswith("import_in_progress_")]


def test_a_rerun_finishes_every_source_of_a_killed_run_and_keeps_its_replace(exported, tmp_path):
    root = tmp_path / "two"
    for name in ("12-res", "5-res"):
        shutil.copytree(exported / "tiny-model" / name, root / "tiny-model" / name)
    whole = tmp_path / "whole"
    with killed_after(None) as writes:
        import_neuronpedia(root, whole)
    expected = catalogue_rows(whole)
    killed = tmp_path / "killed"
    with pytest.raises(Killed), killed_after(len(writes) - 3):  # in the second source, after the first is complete
        import_neuronpedia(root, killed)
    assert listed(killed, "res-L12") and not listed(killed, "res-L5") and markers(killed)
    import_neuronpedia(root, killed)  # writes res-L12 again (this run's), then res-L5
    assert catalogue_rows(killed) == expected and not markers(killed)

    with pytest.raises(Killed), killed_after(3):  # a --replace run, killed in its first source...
        import_neuronpedia(root, killed, replace=True)
    import_neuronpedia(root, killed)  # ...is finished by a plain rerun: it replaces both
    assert catalogue_rows(killed) == expected and not markers(killed)


def test_another_import_of_a_half_imported_coder_takes_it_over(exported, tmp_path):
    source, db = exported / "tiny-model" / "12-res", tmp_path / "db"
    other = older_version(source, tmp_path / "other")
    with pytest.raises(Killed), killed_after(8):
        import_neuronpedia(source, db)
    assert not listed(db, "res-L12")  # half-imported: unlisted, so another import needs no --replace
    import_neuronpedia(other, db)
    taken_over = {name: rows for name, rows in catalogue_rows(db).items() if name not in markers(db)}
    with pytest.raises(StoreError, match="already in .* --replace"):  # resuming the first must not overwrite it
        import_neuronpedia(source, db)
    assert catalogue_rows(db) == taken_over  # and the first run has ended: its marker is gone


def test_a_failed_import_is_undone_and_leaves_no_marker(exported, tmp_path, monkeypatch):
    source, db = exported / "tiny-model" / "12-res", tmp_path / "db"
    import_neuronpedia(older_version(source, tmp_path / "older"), db)
    before = catalogue_rows(db)
    real_replace = feature_store_module._replace_coder_rows

    def no_space_for_coders(table, rows, key, coder_id, *rest):
        if table.name == "coders":  # everything else of the coder is written by then
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(table, rows, key, coder_id, *rest)

    monkeypatch.setattr(feature_store_module, "_replace_coder_rows", no_space_for_coders)
    with pytest.raises(StoreError, match="No space left on device"):
        import_neuronpedia(source, db, replace=True)
    assert catalogue_rows(db) == before  # the old coder, its decoder vectors and descriptions as they were
    monkeypatch.undo()
    with pytest.raises(StoreError, match="already in .* --replace"):  # not a killed run: no resuming
        import_neuronpedia(source, db)


def wait_for(condition, process: subprocess.Popen, timeout: float = 60.0) -> float:
    """Poll until `condition()` holds (or the process ended); the time it took."""
    started = time.perf_counter()
    while not condition() and process.poll() is None and time.perf_counter() - started < timeout:
        time.sleep(0.002)
    return time.perf_counter() - started


def import_process(source: Path, db: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from featuredb.cli import main; main()", "import", "--format",
                             "neuronpedia", str(source), "--db", str(db), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_cli_import_sigkilled_at_random_points_is_finished_by_a_plain_rerun(exported, tmp_path):
    """`featuredb import` of a 7-source export, SIGKILLed at 10 random moments of its writing
    phase (from its marker's creation to its exit), each followed by a plain rerun."""
    writing = lambda db: any(db.glob("import_in_progress_*"))  # noqa: E731
    whole = tmp_path / "whole"
    process = import_process(exported, whole)
    wait_for(lambda: writing(whole), process)
    duration = wait_for(lambda: False, process)  # the writing phase
    assert process.returncode == 0, process.stderr.read()
    expected = catalogue_rows(whole)
    rng = np.random.default_rng(13)
    resumed = 0
    for i, delay in enumerate(rng.uniform(0.0, duration, size=10)):
        db = tmp_path / f"killed-{i}"
        process = import_process(exported, db)
        wait_for(lambda: writing(db), process)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        left = markers(db) if db.exists() else "no catalogue"
        finished = not left and catalogue_rows(db) == expected  # killed on its way out: nothing to resume
        rerun = import_process(exported, db)
        status, stderr = rerun.wait(timeout=120), rerun.stderr.read()
        what = f"kill {i}, {delay:.2f}s into {duration:.2f}s, left {left}: {stderr}"
        assert status == 0 or (finished and "already in" in stderr), what  # a finished import needs --replace
        assert catalogue_rows(db) == expected, what
        resumed += bool(left)
    assert resumed >= 5  # most kills landed mid-import
