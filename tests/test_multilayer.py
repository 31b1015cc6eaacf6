"""Multi-layer coders (Gemma Scope 2 CLTs and crosscoders) index as one coder each.

The folders are written in Gemma Scope 2's exact layout (tests/coder_formats.py) on a tiny random
Gemma 3. Every stored statistic is checked against a brute force that reads the files with
safetensors itself and encodes as Google DeepMind's reference does: per slot,
a[l] = JumpReLU(x[l] @ w_enc[l] + b_enc[l], threshold[l]), features numbered slot-major.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from coder_formats import write_gemma_scope_2, write_gemma_scope_2_multi_layer
from featuredb.cli import main
from featuredb.errors import CoderError
from featuredb.indexer.corpus import iter_windows
from featuredb.indexer.run import IndexConfig, run_index
from featuredb.indexer.stats import StatsConfig
from featuredb.runtime.coders import load_coder
from featuredb.runtime.model import load_model
from featuredb.runtime.multilayer import MultiLayerCoder
from featuredb.store import FeatureStore
from featuredb.store.schema import COOCCURRENCE_COLUMNS
from test_coders import fake_hub
from test_distributed import torchrun
from test_index import assert_same_catalogue

CONTEXT = 16
DESCRIPTION_SCORE_COLUMNS = ["description_score", "description_score_method"]  # columns added after co-occurrence
STATS = StatsConfig(top_k=4, hist_bins=16, interval_bins=4, interval_per_bin=2)
D = 64  # the tiny Gemma 3's d_model; it has layers 0..2


@pytest.fixture()
def clt(tmp_path):
    return write_gemma_scope_2_multi_layer(tmp_path / "coders", "clt", 3, D, 12, affine=True, fire_rate=0.15, seed=7)


@pytest.fixture()
def crosscoder(tmp_path):
    return write_gemma_scope_2_multi_layer(tmp_path / "coders", "crosscoder", 2, D, 10, layers=[0, 2],
                                           fire_rate=0.15, seed=8)


def index(model_dir, coders, corpus, db, **kw):
    config = IndexConfig(model=str(model_dir), coders=[str(c) for c in coders], corpus=str(corpus), db=str(db),
                         context=CONTEXT, batch_size=3, stats=STATS, progress=False, **kw)
    return run_index(config)


# --- the reference ---------------------------------------------------------------------------


def reference_files(folder):
    config = json.loads((folder / "config.json").read_text())
    files = [load_file(str(folder / f"params_layer_{i}.safetensors")) for i in range(len(list(folder.glob("params_layer_*"))))]
    return config, files


def reference_hooks(config, n_slots):
    """The input hook of each slot, from the config as Gemma Scope 2 writes it."""
    pattern = config["hf_hook_point_in"]
    inside = pattern[pattern.index("{") + 1:pattern.index("}")]
    layers = range(n_slots) if inside == "all" else [int(x) for x in inside.split(",")]
    return [pattern.replace("{" + inside + "}", str(layer)) for layer in layers]


def reference_dense(model_dir, folder, corpus):
    """Dense activations [contexts, CONTEXT, S*F] of every context run alone, BOS zeroed, and the count
    of tokens that count."""
    config, files = reference_files(folder)
    hooks = reference_hooks(config, len(files))
    model = load_model(str(model_dir))
    dense, n_tokens = [], 0
    for w in iter_windows(str(corpus), model.tokenizer, model.bos_token_id, CONTEXT):
        ids = torch.as_tensor(w.token_ids)[None]
        captured = model.capture(ids, torch.ones_like(ids), hooks)
        slots = []
        for hook, f in zip(hooks, files):
            pre = captured[hook][0].float() @ f["w_enc"] + f["b_enc"]
            slots.append(torch.where(pre > f["threshold"], pre, torch.zeros_like(pre)))
        a = torch.cat(slots, dim=-1)
        a[0] = 0  # BOS never counts
        n_tokens += len(a) - 1
        padded = torch.zeros(CONTEXT, a.shape[1])
        padded[: len(a)] = a
        dense.append(padded)
    return model, torch.stack(dense), n_tokens


def check_against_reference(db, model_dir, folder, corpus, coder_id):
    model, dense, n_tokens = reference_dense(model_dir, folder, corpus)
    store = FeatureStore(str(db))
    features = store.features(coder_id).sort("feature")
    examples = store.examples(coder_id)
    width = dense.shape[2]
    flat = dense.reshape(-1, width)
    assert len(features) == width

    density = (flat > 0).sum(0).double() / n_tokens
    assert np.allclose(features["density"].to_numpy(), density.numpy())
    assert np.allclose(features["max_activation"].to_numpy(), flat.max(0).values.numpy(), rtol=1e-5, atol=1e-6)
    assert (density > 0).sum() >= width // 2, "the test coders should make most features fire"

    context_max = dense.amax(dim=1)
    for f in range(width):
        order = sorted((-float(context_max[c, f]), c) for c in range(len(dense)) if context_max[c, f] > 0)
        got = examples.filter((pl.col("feature") == f) & (pl.col("kind") == "top")).sort("rank")
        assert got["context_index"].to_list() == [c for _, c in order[: STATS.top_k]], f
        for row in got.iter_rows(named=True):
            n = len(row["token_ids"])
            assert np.allclose(row["values"], dense[row["context_index"], :n, f].numpy(), rtol=1e-4, atol=1e-5)
    return model, features


def decoder_norms_and_total(folder, kind):
    """Per feature (slot-major): the norm of its decoder vector at each output layer, and its total write."""
    _, files = reference_files(folder)
    w_dec = torch.cat([f["w_dec"] for f in files])  # [S*F, S_out, d]
    total = w_dec.sum(dim=1) if kind == "clt" else w_dec[:, -1]
    return w_dec.norm(dim=-1), total


# --- indexing ---------------------------------------------------------------------------------


def test_clt_and_crosscoder_index_in_one_pass_equal_to_the_reference(tiny_gemma3, clt, crosscoder, corpus_jsonl,
                                                                       tmp_path):
    single = write_gemma_scope_2(tmp_path / "coders", "resid_post", 1, D, 16, fire_rate=0.1, seed=9)
    db = tmp_path / "db"
    result = index(tiny_gemma3, [clt, crosscoder, single], corpus_jsonl, db)
    assert len(result.coder_ids) == 3
    coders = {row["coder_id"]: row for row in FeatureStore(str(db)).coders().to_dicts()}
    clt_id, cross_id = "clt-width_36_l0_medium_affine", "crosscoder-layer_0_2_width_20_l0_medium"
    assert set(coders) == {clt_id, cross_id, "resid_post-layer_1_width_16_l0_medium"}

    clt_row, cross_row = coders[clt_id], coders[cross_id]
    assert (clt_row["kind"], clt_row["site"], clt_row["width"], clt_row["layers"]) == ("clt", "transcoder", 36, [0, 1, 2])
    assert clt_row["hook"] == "model.layers.{0,1,2}.pre_feedforward_layernorm.output"
    assert clt_row["hook_out"] == "model.layers.{0,1,2}.post_feedforward_layernorm.output"
    assert (cross_row["kind"], cross_row["site"], cross_row["width"], cross_row["layers"]) == ("crosscoder", "res", 20, [0, 2])
    assert cross_row["hook"] == cross_row["hook_out"] == "model.layers.{0,2}.output"
    assert coders["resid_post-layer_1_width_16_l0_medium"]["layers"] is None

    for folder, coder_id, kind, per_slot, layers in ((clt, clt_id, "clt", 12, [0, 1, 2]),
                                                    (crosscoder, cross_id, "crosscoder", 10, [0, 2])):
        model, features = check_against_reference(db, tiny_gemma3, folder, corpus_jsonl, coder_id)
        # each feature reads its slot's layer, at its slot's hook
        slot = np.arange(len(features)) // per_slot
        assert features["layer"].to_list() == [layers[s] for s in slot]
        site = "pre_feedforward_layernorm.output" if kind == "clt" else "output"
        assert features["hook"].to_list() == [f"model.layers.{layers[s]}.{site}" for s in slot]
        # the layer-write profile is the decoder's norm at each output layer
        norms, total = decoder_norms_and_total(folder, kind)
        stored = np.array(features["layer_write"].to_list())
        assert np.allclose(stored, norms.numpy(), rtol=1e-5, atol=1e-6)
        if kind == "clt":  # causal: nothing written below the feature's own layer
            assert (stored[np.arange(len(stored)) >= per_slot, 0] == 0).all()
        # the logit table is the total write's
        scores = total @ model.unembed().float().T
        expected_top = scores.topk(len(features["top_logit_ids"][0]), dim=1).indices
        assert features["top_logit_ids"].to_list() == expected_top.tolist()
        assert np.allclose(np.array(features["top_logit_values"].to_list()),
                           scores.topk(expected_top.shape[1], dim=1).values.numpy(), rtol=1e-4, atol=1e-5)
    single_features = FeatureStore(str(db)).features("resid_post-layer_1_width_16_l0_medium")
    assert single_features["layer_write"].null_count() == len(single_features)


def test_similar_and_fires_on_know_each_features_layer(tiny_gemma3, clt, corpus_jsonl, tmp_path):
    from featuredb.query import Catalogue

    db = tmp_path / "db"
    index(tiny_gemma3, [clt], corpus_jsonl, db)
    catalogue = Catalogue(str(db))
    fired = catalogue.fires_on("The cat sat on the mat.", limit=50)
    assert fired.features.height > 0
    assert (fired.features["layer"] == fired.features["feature"] // 12).all()
    model, dense, _ = reference_dense(tiny_gemma3, clt, corpus_jsonl)  # the same encode as a fresh pass
    ids = torch.tensor(fired.token_ids)[None]
    config, files = reference_files(clt)
    hooks = reference_hooks(config, 3)
    captured = model.capture(torch.cat([torch.tensor([[model.bos_token_id]]), ids], 1),
                             torch.ones(1, ids.shape[1] + 1, dtype=torch.long), hooks)
    expected = torch.cat([torch.where((pre := captured[h][0, 1:].float() @ f["w_enc"] + f["b_enc"]) > f["threshold"],
                                      pre, torch.zeros_like(pre)) for h, f in zip(hooks, files)], dim=-1)
    for row in fired.features.iter_rows(named=True):
        assert row["activation"] == pytest.approx(float(expected[:, row["feature"]].max()), rel=1e-4)
    similar = catalogue.similar("clt-width_36_l0_medium_affine", 13).limit(5).to_polars()
    assert similar.height > 0
    assert (similar["layer"] == similar["feature"] // 12).all()


def test_resume_equals_an_uninterrupted_run(tiny_gemma3, clt, crosscoder, corpus_jsonl, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    index(tiny_gemma3, [clt, crosscoder], corpus_jsonl, whole)

    class Interrupt(Exception):
        pass

    def stop_at_second_batch(n):
        if n == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_index(IndexConfig(model=str(tiny_gemma3), coders=[str(clt), str(crosscoder)], corpus=str(corpus_jsonl),
                              db=str(resumed), context=CONTEXT, batch_size=3, stats=STATS, progress=False,
                              checkpoint_seconds=0), on_batch=stop_at_second_batch)
    index(tiny_gemma3, [clt, crosscoder], corpus_jsonl, resumed, resume=True)
    assert_same_catalogue(whole, resumed)


def test_torchrun_equals_one_process(tiny_gemma3, clt, crosscoder, corpus_jsonl, tmp_path):
    args = ["--model", str(tiny_gemma3), "--corpus", str(corpus_jsonl), "--context", str(CONTEXT), "--batch-size",
            "3", "--top-k", "4", "--quiet", "--coder", str(clt), "--coder", str(crosscoder)]
    one = CliRunner().invoke(main, ["index", *args, "--db", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    run = torchrun(["-m", "featuredb.indexer", *args, "--db", str(tmp_path / "two")], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_catalogue(tmp_path / "one", tmp_path / "two")


# --- loading ----------------------------------------------------------------------------------


def test_loads_only_the_encoders_and_reads_the_decoder_in_slices(clt):
    coder = load_coder(str(clt))
    assert isinstance(coder, MultiLayerCoder)
    assert (coder.kind, coder.n_slots, coder.per_slot, coder.width, coder.layers) == ("clt", 3, 12, 36, [0, 1, 2])
    assert coder.affine_skip and coder.every_layer
    assert not hasattr(coder, "W_dec")
    _, files = reference_files(clt)
    assert torch.equal(coder.W_enc, torch.stack([f["w_enc"] for f in files]))
    norms, total = decoder_norms_and_total(clt, "clt")
    got_total, got_norms = coder.decoder_summary()
    assert torch.allclose(got_total, total, atol=1e-6) and torch.allclose(got_norms, norms, atol=1e-6)


def write_config(folder, **change):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))


@pytest.mark.parametrize("damage, message", [
    (lambda f: write_config(f, hf_hook_point_in="model.layers.{x,y}.output"), "layers must be {all} or comma-separated"),
    (lambda f: write_config(f, hf_hook_point_in="model.layers.0.output"), "is not a multi-layer hook"),
    (lambda f: write_config(f, hf_hook_point_in="model.layers.{0,2,1}.output"), "names 3 layers, but the coder has 2 slots"),
    (lambda f: write_config(f, architecture="topk"), "unknown architecture 'topk'"),
    (lambda f: write_config(f, width=999), "config width 999, but 2 files x 10 features = 20"),
    (lambda f: (f / "params_layer_0.safetensors").rename(f / "params_layer_5.safetensors"),
     "params_layer_0.safetensors is missing"),
    (lambda f: (f / "config.json").unlink(), "without the config.json"),
    (lambda f: (f / "params_layer_1.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n"),
     "a Git LFS pointer"),
])
def test_bad_folders_are_one_line_errors_naming_the_file(crosscoder, damage, message):
    damage(crosscoder)
    with pytest.raises(CoderError, match=message) as excinfo:
        load_coder(str(crosscoder))
    assert "\n" not in str(excinfo.value) and str(crosscoder) in str(excinfo.value)


def test_non_finite_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    folder = write_gemma_scope_2_multi_layer(tmp_path, "crosscoder", 2, D, 10, layers=[0, 2])
    tensors = load_file(str(folder / "params_layer_1.safetensors"))
    tensors["w_dec"][3, 1, 7] = float("nan")
    save_file(tensors, str(folder / "params_layer_1.safetensors"))
    coder = load_coder(str(folder))  # the decoder is read only when the catalogue is written
    with pytest.raises(CoderError, match=r"params_layer_1.safetensors: w_dec row 0 \+ \[3, 1, 7\] is nan"):
        coder.decoder_summary()
    tensors["threshold"][2] = float("inf")
    save_file(tensors, str(folder / "params_layer_1.safetensors"))
    with pytest.raises(CoderError, match=r"params_layer_1.safetensors: threshold\[2\] is inf"):
        load_coder(str(folder))


def run_index_cli(model, coder, corpus, db):
    return CliRunner().invoke(main, ["index", "-m", str(model), "--coder", str(coder), "--corpus", str(corpus),
                                     "--db", str(db), "-q"])


def test_a_layer_list_beyond_the_model_is_refused_before_indexing(tiny_gemma3, corpus_jsonl, tmp_path):
    folder = write_gemma_scope_2_multi_layer(tmp_path, "crosscoder", 3, D, 10, layers=[0, 2, 7])
    result = run_index_cli(tiny_gemma3, folder, corpus_jsonl, tmp_path / "db")
    assert result.exit_code == 1
    assert result.stderr == ("error: hook 'model.layers.7.output': layer 7 out of range, the model has 3 layers\n")
    assert not (tmp_path / "db").exists()


def test_a_clt_over_every_layer_of_another_model_is_refused(tiny_gemma3, corpus_jsonl, tmp_path):
    folder = write_gemma_scope_2_multi_layer(tmp_path, "clt", 2, D, 10)  # {all}, but 2 slots for 3 layers
    result = run_index_cli(tiny_gemma3, folder, corpus_jsonl, tmp_path / "db")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: coder clt-width_20_l0_medium reads every layer ({all}) with 2 slots, "
                                    "but model ")
    assert result.stderr.endswith("has 3 layers: it was trained for another model\n")


def test_a_hook_override_cannot_move_a_multi_layer_coder(crosscoder):
    assert load_coder(f"{crosscoder}@model.layers.{{0,2}}.output").hook == "model.layers.{0,2}.output"  # its own
    with pytest.raises(CoderError, match=r"a crosscoder reads the hooks its config names"):
        load_coder(f"{crosscoder}@model.layers.1.output")


def test_a_single_layer_folder_with_a_multi_layer_type_is_refused(tmp_path):
    folder = write_gemma_scope_2(tmp_path, "resid_post", 1, D, 16)
    write_config(folder, type="clt")
    with pytest.raises(CoderError, match=r"no params_layer_\*.safetensors files"):
        load_coder(str(folder))


# --- from the hub -------------------------------------------------------------------------------


def test_from_the_hub_the_config_comes_first_then_only_the_layer_files(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    folder = write_gemma_scope_2_multi_layer(remote, "clt", 3, D, 12, affine=True)
    (folder / "notes.bin").write_bytes(b"\0" * 1024)  # another file in the folder: never asked for
    asked = fake_hub(monkeypatch, remote, tmp_path / "snapshot")
    coder = load_coder("google/gemma-scope-2-270m-pt/clt/width_36_l0_medium_affine")
    assert coder.source == "hf://google/gemma-scope-2-270m-pt/clt/width_36_l0_medium_affine"
    sub = "clt/width_36_l0_medium_affine"
    assert asked == [f"{sub}/config.json", f"{sub}/cfg.json", f"{sub}/config.json", f"{sub}/params_layer_*.safetensors"]
    assert not (tmp_path / "snapshot" / sub / "notes.bin").exists()


def test_from_the_hub_an_unusable_config_is_refused_before_any_weights(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    folder = write_gemma_scope_2_multi_layer(remote, "clt", 3, D, 12)
    write_config(folder, architecture="batch_topk")
    asked = fake_hub(monkeypatch, remote, tmp_path / "snapshot")
    with pytest.raises(CoderError, match=r"clt/width_36_l0_medium/config.json: unknown architecture 'batch_topk'"):
        load_coder("google/gemma-scope-2-270m-pt/clt/width_36_l0_medium")
    assert not any("params_layer" in pattern for pattern in asked)


# --- shown the same way by the API, the page and the CLI --------------------------------------


def test_the_layer_write_profile_is_shown_by_the_api_the_page_and_show(tiny_gemma3, clt, corpus_jsonl, tmp_path):
    from fastapi.testclient import TestClient

    from featuredb.server import create_app

    db = tmp_path / "db"
    index(tiny_gemma3, [clt], corpus_jsonl, db)
    norms, _ = decoder_norms_and_total(clt, "clt")
    feature = 13  # slot 1: reads layer 1, writes to layers 1 and 2 only
    with TestClient(create_app(str(db))) as client:
        data = client.get(f"/api/features/clt-width_36_l0_medium_affine/{feature}").json()
        page = client.get(f"/features/clt-width_36_l0_medium_affine/{feature}").text
    assert data["layer"] == 1 and data["hook"] == "model.layers.1.pre_feedforward_layernorm.output"
    assert [w["layer"] for w in data["layer_write"]] == [0, 1, 2]
    assert np.allclose([w["norm"] for w in data["layer_write"]], norms[feature].numpy(), rtol=1e-5)
    assert data["layer_write"][0]["share"] == 0 and sum(w["share"] for w in data["layer_write"]) == pytest.approx(1)
    assert "Writes to layers" in page and "sum over layers" in page
    for w in data["layer_write"]:
        assert f"<th>L{w['layer']}</th>" in page and f"{100 * w['share']:.0f}%" in page

    shown = CliRunner().invoke(main, ["show", f"clt-width_36_l0_medium_affine/{feature}", "--db", str(db)])
    assert shown.exit_code == 0, shown.output
    assert "writes to layers 0..2: " in shown.stdout and "L0 0%" in shown.stdout


def test_a_catalogue_written_before_multi_layer_coders_reads_and_upgrades(tiny_gemma3, corpus_jsonl, tmp_path):
    """Catalogues written before `layers` and `layer_write` existed: read as they are; the first
    writable open adds the columns (all null) and keeps every row."""
    import lancedb

    from featuredb.query import Catalogue

    single = write_gemma_scope_2(tmp_path / "coders", "resid_post", 1, D, 16, fire_rate=0.1, seed=9)
    db = tmp_path / "db"
    index(tiny_gemma3, [single], corpus_jsonl, db)
    raw = lancedb.connect(str(db))
    # every column added since (co-occurrence came later still): a catalogue of that time has none of them
    raw.open_table("coders").drop_columns(["layers", "cooccurrence_tokens"])
    # (and description scores later again)
    raw.open_table("features").drop_columns(["layer_write", *COOCCURRENCE_COLUMNS, *DESCRIPTION_SCORE_COLUMNS])
    before = raw.open_table("features").to_arrow()

    shown = Catalogue(str(db)).feature("resid_post-layer_1_width_16_l0_medium", 3)  # read-only, as it is
    assert shown["layer"] == 1 and shown["layer_write"] == []
    assert "layer_write" not in raw.open_table("features").schema.names

    FeatureStore(str(db))  # writable: upgraded in place
    after = raw.open_table("features").to_arrow()
    assert after.column("layer_write").null_count == after.num_rows
    assert after.drop_columns(["layer_write", *COOCCURRENCE_COLUMNS, *DESCRIPTION_SCORE_COLUMNS]).equals(before)
    assert raw.open_table("coders").to_arrow().column("layers").null_count == 1
    index(tiny_gemma3, [single], corpus_jsonl, db, replace=True)  # and it takes new writes
