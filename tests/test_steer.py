"""Steering (`featuredb steer`, cat.steer, POST /api/steer, the feature page's panel).

Every coder kind is indexed on a tiny random Gemma 3 from files in its upstream format; the test
watches the model with torch hooks of its own, one before and one after the steering hook at
every site a coder could write to, and checks that what changes is exactly strength x max
activation x the decoder row read from the files (safetensors, not featuredb), at every position,
at the sites of the coder's kind and nowhere else. Strength 0 must give the unsteered tokens
bit-identically, and cached generation must equal recomputing every position.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from safetensors.numpy import load_file

import catalogue_fixtures
import featuredb
import featuredb.runtime.steering as steering_module
from coder_formats import write_gemma_scope_2, write_gemma_scope_2_multi_layer
from conftest import CORPUS_TEXT
from featuredb.cli import main
from featuredb.errors import HookError, NotFound, QueryError, TooLarge
from featuredb.indexer.run import IndexConfig, run_index
from featuredb.indexer.stats import StatsConfig
from featuredb.query.forward import SharedModel
from featuredb.query.steer import MAX_FEATURES, MAX_NEW_TOKENS, parse_ref
from featuredb.runtime.model import load_model
from featuredb.runtime.steering import generate, steering
from featuredb.server import create_app

model_catalogue = catalogue_fixtures.model_catalogue
D = 64  # the tiny models' d_model (and heads x head_dim); layers 0..2
PROMPT = "The cat sat on the"
PER_SLOT = 12
CLT_SLOT = 1  # the CLT feature steered reads layer 1: it writes to layers 1 and 2, never to 0

# coder_id -> (the sites it writes to, whether it is multi-layer)
RESID = "model.layers.{}.output"
MLP_OUT = "model.layers.{}.post_feedforward_layernorm.output"
EXPECTED_SITES = {
    "sae": [RESID.format(1)],
    "att": ["model.layers.1.self_attn.o_proj.input"],
    "transcoder": [MLP_OUT.format(0)],
    "skip": [MLP_OUT.format(2)],
    "crosscoder": [RESID.format(0), RESID.format(2)],
    "clt": [MLP_OUT.format(1), MLP_OUT.format(2)],
}
# every site any coder could write to: the test watches them all
WATCHED = sorted({RESID.format(layer) for layer in range(3)} | {MLP_OUT.format(layer) for layer in range(3)}
                 | {"model.layers.1.self_attn.o_proj.input"})


# --- the catalogue of every kind -------------------------------------------------------------------


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, tiny_gemma3) -> dict:
    root = tmp_path_factory.mktemp("steer_kinds")
    folders = {
        "sae": write_gemma_scope_2(root, "resid_post", 1, D, 32, fire_rate=0.2, seed=1),
        "att": write_gemma_scope_2(root, "attn_out", 1, D, 32, fire_rate=0.7, seed=2),  # o_proj inputs are small here
        "transcoder": write_gemma_scope_2(root, "transcoder", 0, D, 32, kind="transcoder", fire_rate=0.2, seed=3),
        "skip": write_gemma_scope_2(root, "transcoder", 2, D, 32, kind="transcoder", affine=True, fire_rate=0.2,
                                    seed=4),
        "crosscoder": write_gemma_scope_2_multi_layer(root, "crosscoder", 2, D, PER_SLOT, layers=[0, 2],
                                                      fire_rate=0.2, seed=5),
        "clt": write_gemma_scope_2_multi_layer(root, "clt", 3, D, PER_SLOT, fire_rate=0.2, seed=6),
    }
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(CORPUS_TEXT)))
    db = root / "db"
    run_index(IndexConfig(model=str(tiny_gemma3), coders=[f"{name}={path}" for name, path in folders.items()],
                          corpus=str(corpus), db=str(db), context=16, batch_size=4,
                          stats=StatsConfig(top_k=2, hist_bins=8, interval_bins=2, interval_per_bin=1), progress=False))
    cat = featuredb.open(str(db))
    chosen, fired = {}, {}
    for name in folders:
        stored = cat.store.features(name).filter(pl_col_positive())
        if name == "clt":
            stored = stored.filter((stored["feature"] // PER_SLOT) == CLT_SLOT)
        fired[name] = [(r["feature"], r["max_activation"]) for r in stored.sort("feature").iter_rows(named=True)]
        chosen[name] = fired[name][0]
    return {"db": db, "folders": folders, "chosen": chosen, "second_sae": fired["sae"][1], "cat": cat}


def pl_col_positive():
    import polars as pl

    return pl.col("max_activation") > 0


def expected_writes(kinds: dict, name: str, strength: float) -> dict[str, np.ndarray]:
    """{site: strength x max x decoder row}, the decoder read from the coder's files directly."""
    feature, top = kinds["chosen"][name]
    folder = kinds["folders"][name]
    scale = np.float32(strength * top)
    if name in ("crosscoder", "clt"):
        slot, row = divmod(feature, PER_SLOT)
        w_dec = load_file(str(folder / f"params_layer_{slot}.safetensors"))["w_dec"][row]  # [S_out, d]
        writes = {site: scale * w_dec[m] for m, site in enumerate(_output_sites(name))}
        return {site: v for site, v in writes.items() if np.any(v)}
    w_dec = load_file(str(folder / "params.safetensors"))["w_dec"]
    return {EXPECTED_SITES[name][0]: scale * w_dec[feature]}


def _output_sites(name: str) -> list[str]:
    return [RESID.format(0), RESID.format(2)] if name == "crosscoder" else [MLP_OUT.format(m) for m in range(3)]


class Watch:
    """Around every generation of cat.steer: at every watched site, the activation before and after
    the steering hooks (torch hooks of the test's own, registered first and last)."""

    def __init__(self, monkeypatch) -> None:
        self.passes: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []  # per generation, per call
        real = steering_module.generate

        def watched_generate(model, prompt_ids, **kw):
            calls: list[dict] = []
            handles = []
            for site in WATCHED:
                handles += self._watch(model, site, calls)
            try:
                return real(model, prompt_ids, **kw)
            finally:
                for handle in handles:
                    handle.remove()
                self.passes.append(calls)

        monkeypatch.setattr(steering_module, "generate", watched_generate)

    @staticmethod
    def _watch(model, site: str, calls: list) -> list:
        from featuredb.runtime.hooks import parse_hook

        parsed = parse_hook(site)
        module = model.module_at(parsed)
        seen: dict = {}

        def first(value):
            return (value[0] if isinstance(value, tuple) else value).detach().clone()

        if parsed.point == "output":
            before = module.register_forward_hook(lambda m, a, out: seen.__setitem__("before", first(out)), prepend=True)

            def after(m, a, out):
                calls.append({site: (seen.pop("before"), first(out))})
            return [before, module.register_forward_hook(after)]
        before = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("before", a[0].detach().clone()),
                                                  prepend=True)

        def after_pre(m, a):
            calls.append({site: (seen.pop("before"), a[0].detach().clone())})
        return [before, module.register_forward_pre_hook(after_pre)]

    def added(self, generation: int) -> dict[str, list[torch.Tensor]]:
        """Per site, (after - before) of every call of one generation ([positions, d] each)."""
        out: dict[str, list[torch.Tensor]] = {}
        for call in self.passes[generation]:
            for site, (before, after) in call.items():
                out.setdefault(site, []).append((after - before)[0].double())
        return out


@pytest.mark.parametrize("name", list(EXPECTED_SITES))
def test_each_kind_adds_strength_x_max_x_its_decoder_at_its_own_sites(kinds, name, monkeypatch):
    watch = Watch(monkeypatch)
    strength = 2.5
    result = kinds["cat"].steer([f"{name}/{kinds['chosen'][name][0]}:{strength}"], PROMPT, tokens=5)
    assert [w["hook"] for w in result.features[0]["writes"]] == EXPECTED_SITES[name]
    expected = expected_writes(kinds, name, strength)
    assert sorted(expected) == sorted(EXPECTED_SITES[name])

    unsteered, steered = watch.added(0), watch.added(1)
    assert all(not d.any() for diffs in unsteered.values() for d in diffs)  # the unsteered run: nothing added
    calls = 1 + len(result.steered_ids) - (len(result.steered_ids) == result.tokens)  # prefill + one per new token
    for site in WATCHED:
        diffs = steered[site]
        assert len(diffs) == calls and diffs[0].shape[0] == 1 + result.prompt_tokens  # BOS + prompt, then 1 each
        for diff in diffs:
            if site in expected:  # every position, prompt and generated
                want = torch.from_numpy(expected[site]).double().expand_as(diff)
                torch.testing.assert_close(diff, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
            else:
                assert not diff.any(), f"{site} changed, but {name} does not write there"


@pytest.mark.parametrize("name", ["sae", "skip", "clt"])
def test_strength_zero_gives_the_unsteered_text_bit_identically(kinds, name):
    cat = kinds["cat"]
    feature = kinds["chosen"][name][0]
    for temperature in (0.0, 1.5):
        zero = cat.steer([f"{name}/{feature}:0"], PROMPT, tokens=12, temperature=temperature, seed=3)
        assert zero.steered_ids == zero.unsteered_ids and zero.steered == zero.unsteered
        assert zero.features[0]["writes"] and all(w["norm"] == 0 for w in zero.features[0]["writes"])
    # the same hooks with a big strength do change the greedy text
    strong = cat.steer([f"{name}/{feature}:50"], PROMPT, tokens=12)
    assert strong.unsteered_ids == cat.steer([f"{name}/{feature}:0"], PROMPT, tokens=12).unsteered_ids
    assert strong.steered_ids != strong.unsteered_ids


def test_several_features_add_up_at_a_shared_site(kinds, monkeypatch):
    watch = Watch(monkeypatch)
    a, (b, top_b) = kinds["chosen"]["sae"][0], kinds["second_sae"]
    kinds["cat"].steer([f"sae/{a}:1", f"sae/{b}:-2"], PROMPT, tokens=2)
    w_dec = load_file(str(kinds["folders"]["sae"] / "params.safetensors"))["w_dec"]
    want = kinds["chosen"]["sae"][1] * w_dec[a].astype(np.float64) - 2 * top_b * w_dec[b].astype(np.float64)
    diff = watch.added(1)[RESID.format(1)][0]
    torch.testing.assert_close(diff, torch.from_numpy(want).expand_as(diff), rtol=1e-5, atol=1e-4)


# --- generation ---------------------------------------------------------------------------------


def _recomputed(model, prompt_ids: list[int], tokens: int) -> list[int]:
    """Greedy without a KV cache: the whole sequence through the model for every new token."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(tokens):
            logits = model.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


@pytest.mark.parametrize("fixture", ["tiny_gemma2", "tiny_gemma3", "tiny_llama"])
def test_cached_generation_equals_recomputing_every_position(fixture, request):
    model = load_model(str(request.getfixturevalue(fixture)))
    prompt = [model.bos_token_id, *model.tokenizer("The cat sat on", add_special_tokens=False)["input_ids"]]
    vector = torch.randn(D, generator=torch.Generator().manual_seed(0)) * 3
    tokens = 14  # past the tiny models' sliding window of 8
    assert generate(model, prompt, tokens=tokens) == _recomputed(model, prompt, tokens)
    for site in ("model.layers.1.output", "model.layers.0.mlp.output", "model.layers.2.self_attn.o_proj.input"):
        with steering(model, {site: vector}):
            cached = generate(model, prompt, tokens=tokens)
            assert cached == _recomputed(model, prompt, tokens), site
        assert cached != generate(model, prompt, tokens=tokens), site  # the vector does change the text
    # sampling: the seed decides
    sampled = [generate(model, prompt, tokens=tokens, temperature=2.0, seed=seed) for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_steering_refuses_a_read_only_site_and_a_vector_of_the_wrong_width(tiny_gemma2):
    model = load_model(str(tiny_gemma2))
    prompt = [model.bos_token_id, 5, 6]
    with pytest.raises(HookError, match="normalised input"):
        with steering(model, {"model.layers.0.pre_feedforward_layernorm.normalized_input": torch.zeros(D)}):
            pass
    with pytest.raises(HookError, match="width 64, the steering vector 3"):
        with steering(model, {"model.layers.0.output": torch.zeros(3)}):
            generate(model, prompt, tokens=1)
    assert not any(layer._forward_hooks for layer in model.decoder.layers)  # removed after an error too


# --- limits and references ------------------------------------------------------------------------


def test_references_parse():
    assert parse_ref("res-L1/12") == parse_ref(("res-L1", 12)) == parse_ref({"coder_id": "res-L1", "feature": 12})
    assert parse_ref("a/b:c/7:-2.5").coder_id == "a/b:c" and parse_ref("a/b:c/7:-2.5").strength == -2.5
    assert parse_ref("x/3:1e1").strength == 10.0


@pytest.mark.parametrize("features,kwargs,error,message", [
    (["sae/0"], {"tokens": 0}, QueryError, "tokens must be an integer between 1 and 128"),
    (["sae/0"], {"tokens": MAX_NEW_TOKENS + 1}, QueryError, "between 1 and 128"),
    (["sae/0"] * (MAX_FEATURES + 1), {}, QueryError, "9 features to steer with; at most 8"),
    ([], {}, QueryError, "name at least one feature"),
    (["sae/0"], {"prompt": "x" * 20_001}, QueryError, "at most 20,000"),
    (["sae/0"], {"prompt": "  "}, QueryError, "prompt is empty"),
    (["sae/0:nan"], {}, QueryError, "strength must be a number"),
    (["sae/0:1e9"], {}, QueryError, "strength must be a number between -1000 and 1000"),
    (["sae/0:"], {}, QueryError, "expected CODER_ID/INDEX[:STRENGTH]"),
    (["sae"], {}, QueryError, "expected CODER_ID/INDEX[:STRENGTH]"),
    (["sae/x"], {}, QueryError, "expected CODER_ID/INDEX[:STRENGTH]"),
    (["nope/0"], {}, NotFound, "unknown coder_id 'nope'"),
    (["sae/32"], {}, NotFound, "out of range"),
    (["sae/0"], {"temperature": -1}, QueryError, "temperature must be a number between 0"),
    (["sae/0"], {"temperature": float("inf")}, QueryError, "temperature"),
    (["sae/0"], {"seed": -1}, QueryError, "seed must be an integer"),
])
def test_limits_are_one_line_errors(kinds, features, kwargs, error, message):
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(error, match=re.escape(message)) as raised:
        kinds["cat"].steer(features, prompt, **kwargs)
    assert "\n" not in str(raised.value)


def test_a_prompt_over_the_token_limit_is_too_large(kinds):
    with pytest.raises(TooLarge, match="tokens long; at most 1,024"):
        kinds["cat"].steer(["sae/0"], "cat " * 1100, tokens=1)


# --- the command line ------------------------------------------------------------------------------


def test_cli_prints_both_continuations_and_json(kinds):
    feature = kinds["chosen"]["sae"][0]
    runner = CliRunner()
    args = ["steer", f"sae/{feature}:50", PROMPT, "--tokens", "6", "--db", str(kinds["db"])]
    result = runner.invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    expected = kinds["cat"].steer([f"sae/{feature}:50"], PROMPT, tokens=6)
    assert {"prompt", "unsteered", "steered", "features"} <= set(got)
    assert (got["unsteered_ids"], got["steered_ids"]) == (expected.unsteered_ids, expected.steered_ids)
    assert got["features"][0]["writes"][0]["hook"] == RESID.format(1)
    plain = runner.invoke(main, args)
    assert plain.exit_code == 0 and "unsteered" in plain.output and "│ steered" in plain.output
    bad = runner.invoke(main, ["steer", f"sae/{feature}", PROMPT, "--tokens", "500", "--db", str(kinds["db"])])
    assert bad.exit_code == 1 and "between 1 and 128" in bad.output and bad.output.strip().count("\n") == 0


# --- the server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_cat(model_catalogue):
    return featuredb.open(str(model_catalogue))


@pytest.fixture(scope="module")
def steerable(model_cat) -> tuple[str, int]:
    """The residual SAE of the model catalogue and a feature of it that fired while indexing."""
    coder = model_cat.coders().filter(pl_col_kind("sae")).row(0, named=True)["coder_id"]
    feature = model_cat.store.features(coder).filter(pl_col_positive()).sort("feature").row(0, named=True)["feature"]
    return coder, feature


def pl_col_kind(kind: str):
    import polars as pl

    return pl.col("kind") == kind


@pytest.fixture(scope="module")
def client(model_catalogue):
    with TestClient(create_app(str(model_catalogue))) as client:
        yield client


def test_api_steer_answers_what_the_python_api_does(client, model_cat, steerable):
    coder, feature = steerable
    body = {"features": [f"{coder}/{feature}:40"], "prompt": PROMPT, "tokens": 6}
    got = client.post("/api/steer", json=body)
    assert got.status_code == 200, got.text
    expected = model_cat.steer([f"{coder}/{feature}:40"], PROMPT, tokens=6)
    assert got.json()["steered_ids"] == expected.steered_ids and got.json()["unsteered"] == expected.unsteered
    as_object = client.post("/api/steer", json={**body, "features": [{"coder_id": coder, "feature": feature,
                                                                       "strength": 40}]})
    assert as_object.json()["steered_ids"] == expected.steered_ids


@pytest.mark.parametrize("body,status,message", [
    ({"tokens": 129}, 400, "between 1 and 128"),
    ({"features": ["{coder}/{feature}"] * 9}, 400, "at most 8"),
    ({"features": ["nope/1"]}, 404, "unknown coder_id"),
    ({"features": ["{coder}/x"]}, 400, "expected CODER_ID/INDEX"),
    ({"features": [{"coder_id": "{coder}", "feature": -1}]}, 400, "feature index must be an integer >= 0"),
    ({"prompt": "x" * 4001}, 413, "at most 4,000"),
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"tokens": "many"}, 422, "tokens"),
    ({"temperature": -1}, 400, "temperature"),
])
def test_bad_steer_bodies(client, steerable, body, status, message):
    coder, feature = steerable
    full = {"features": [f"{coder}/{feature}"], "prompt": PROMPT, "tokens": 2}
    for key, value in body.items():
        full[key] = json.loads(json.dumps(value).replace("{coder}", coder).replace("{feature}", str(feature)))
    response = client.post("/api/steer", json=full)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"] and "\n" not in response.json()["detail"]


def test_feature_page_shows_both_continuations(client, model_cat, steerable):
    coder, feature = steerable
    params = {"steer": "The <b>cat</b> sat", "strength": "40", "steer_tokens": "5"}
    page = client.get(f"/features/{coder}/{feature}", params=params)
    assert page.status_code == 200
    expected = model_cat.steer([f"{coder}/{feature}:40"], "The <b>cat</b> sat", tokens=5)
    html = page.text
    assert 'class="steer-result"' in html and "&lt;b&gt;cat&lt;/b&gt;" in html and "<b>cat</b>" not in html
    from markupsafe import escape

    assert str(escape(expected.steered)) in html and str(escape(expected.unsteered)) in html
    twin = client.get(f"/api/features/{coder}/{feature}", params=params).json()["steer"]
    assert twin["steered_ids"] == expected.steered_ids
    assert client.get(f"/api/features/{coder}/{feature}").json()["steer"] is None
    bad = client.get(f"/features/{coder}/{feature}", params={**params, "steer_tokens": "500"})
    assert bad.status_code == 400 and "between 1 and 128" in bad.text


def test_steering_is_serialised_with_every_other_forward_pass(model_cat, steerable):
    """Steering hooks never reach a concurrent fires_on (it reads the layer-1 SAE, downstream of the
    transcoder's layer-0 output that one steer changes), and concurrent steers get lone answers."""
    coder, feature = steerable
    transcoder = model_cat.coders().filter(pl_col_kind("transcoder")).row(0, named=True)["coder_id"]
    top = model_cat.store.features(transcoder).filter(pl_col_positive()).sort("feature").row(0, named=True)["feature"]
    refs = [[f"{transcoder}/{top}:30"], [f"{coder}/{feature}:30"]]
    texts = CORPUS_TEXT[:4]
    lone_steer = [model_cat.steer(r, PROMPT, tokens=8).steered_ids for r in refs]
    lone_fires = [model_cat.fires_on(t, coders=[coder], limit=50).to_dict() for t in texts]
    with ThreadPoolExecutor(8) as pool:
        steers = [pool.submit(model_cat.steer, r, PROMPT, tokens=8) for r in refs * 2]
        fires = [pool.submit(model_cat.fires_on, t, coders=[coder], limit=50) for t in texts * 3]
        assert [s.result().steered_ids for s in steers] == lone_steer * 2
        for got, want in zip([f.result().to_dict() for f in fires], lone_fires * 3):
            assert got["features"] == want["features"]
    shared = next(iter(model_cat.reader.loaded("models").values()))
    assert isinstance(shared, SharedModel)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in shared.model.model.modules())


def test_the_steering_panel_in_a_browser(model_catalogue, model_cat, steerable):
    from serving import CHROMIUM_ARGS, chromium, serving

    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    coder, feature = steerable
    expected = model_cat.steer([f"{coder}/{feature}:40"], PROMPT, tokens=6)
    with serving(create_app(str(model_catalogue))) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(120_000)
        page.goto(f"{url}/features/{coder}/{feature}")
        page.fill("#steer textarea", PROMPT)
        page.fill("#steer input[name=strength]", "40")
        page.fill("#steer input[name=steer_tokens]", "6")
        page.click("#steer button")
        page.locator(".steer-result").wait_for()
        assert page.locator(".continuation.unsteered").inner_text() == PROMPT + expected.unsteered
        assert page.locator(".continuation.steered").inner_text() == PROMPT + expected.steered
        assert page.locator("#steer textarea").input_value() == PROMPT
        assert "steer=" in page.url and page.locator("a.json-link").get_attribute("href").startswith("/api/features/")
        browser.close()
