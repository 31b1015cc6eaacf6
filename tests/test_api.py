"""Tests of `featuredb serve`'s JSON API and HTML pages through FastAPI's TestClient: every
endpoint, paging and filters, the same data on a page as in its JSON twin, HTML escaping, and
every kind of bad request answered with a 4xx and a clear message while the server keeps serving.
"""

from __future__ import annotations

import shutil
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

import catalogue_fixtures
import featuredb
from catalogue_fixtures import HTML_SAE
from featuredb.server import create_app
from featuredb.cli import main
from featuredb.store import FeatureStore
from catalogue_fixtures import FRENCH, MODEL, TRICKY_ID, WIDTH

TEXT = "The cat sat on the mat in Paris."
# the shared catalogue fixtures (see tests/catalogue_fixtures.py)
known_catalogue = catalogue_fixtures.known_catalogue
model_catalogue = catalogue_fixtures.model_catalogue


@pytest.fixture(scope="module")
def client(known_catalogue):
    with TestClient(create_app(str(known_catalogue))) as client:
        yield client


@pytest.fixture(scope="module")
def model_client(model_catalogue):
    with TestClient(create_app(str(model_catalogue))) as client:
        yield client


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def keys(rows: list[dict]) -> list[tuple[str, int]]:
    return [(r["coder_id"], r["feature"]) for r in rows]


def table_versions(path) -> dict[str, int]:
    store = FeatureStore(str(path), read_only=True)
    return {name: store.table(name).version for name in store.table_names()}


# --- endpoints ---------------------------------------------------------------------------------


def test_coders(client):
    saes = ok(client.get("/api/coders"))["coders"]
    assert {s["coder_id"] for s in saes} >= {"res-L12", "mlp-L12", TRICKY_ID, HTML_SAE}
    assert all(isinstance(s["created_at"], str) for s in saes)


def test_search_modes(client):
    semantic = ok(client.get("/api/search", params={"q": "towns in France", "model": MODEL, "limit": 3}))
    assert set(keys(semantic["results"])) == FRENCH and semantic["mode"] == "semantic"
    assert list(semantic["results"][0]) == ["coder_id", "feature", "layer", "site", "description", "density",
                                            "max_activation", "top_tokens", "description_score", "score",
                                            "duplicates", "duplicate_features"]
    # the default mode is chosen by the query's shape: symbols alone by keyword, words semantically
    assert ok(client.get("/api/search", params={"q": "(", "limit": 3}))["mode"] == "keyword"
    keyword = ok(client.get("/api/search", params={"q": "Marseille", "mode": "keyword"}))
    assert set(keys(keyword["results"])) == {("res-L12", 3), (TRICKY_ID, 6)}
    hybrid = ok(client.get("/api/search", params={"q": "Marseille", "mode": "hybrid", "layer": 12, "limit": 3}))
    assert keys(hybrid["results"])[0] == ("res-L12", 3)
    token = ok(client.get("/api/search", params={"q": "Paris", "mode": "token"}))
    assert set(keys(token["results"])) == {("res-L12", 3), ("res-L5", 7)}  # top examples peak on ' Paris'
    assert {r["matches"] for r in token["results"]} == {2, 1}


def test_search_filters(client):
    def search(**params):
        return ok(client.get("/api/search", params={"q": "towns in France", "limit": 50, **params}))["results"]

    assert {r["layer"] for r in search(layer=5)} == {5}
    assert {r["coder_id"] for r in search(site="mlp")} == {"mlp-L12"}
    assert {r["coder_id"] for r in search(layer=[3, 5])} == {"res-L5", "att-L5", TRICKY_ID}
    assert {r["coder_id"] for r in search(coder=TRICKY_ID)} == {TRICKY_ID}
    dense = search(q="anything", min_density=0.05, max_density=0.08)
    assert dense and all(0.05 <= r["density"] <= 0.08 for r in dense)
    # an HTML form sends unset fields as empty strings: they mean "no filter"
    assert keys(search(layer="", coder="", min_density="")) == keys(search())
    # SQL-looking values are compared as values: nothing matches, nothing breaks
    assert search(model="' OR 1=1 --") == [] and search(site="res", model="x'); DROP TABLE features; --") == []


def test_search_paging(client):
    params = {"q": "Paris France cities code", "mode": "keyword"}
    everything = ok(client.get("/api/search", params={**params, "limit": 6}))["results"]
    first = ok(client.get("/api/search", params={**params, "limit": 3}))
    second = ok(client.get("/api/search", params={**params, "limit": 3, "offset": first["next_offset"]}))
    assert (first["offset"], first["next_offset"], first["prev_offset"]) == (0, 3, None)
    assert second["prev_offset"] == 0
    assert keys(first["results"] + second["results"]) == keys(everything)
    last = ok(client.get("/api/search", params={**params, "limit": 100, "offset": 1}))
    assert last["next_offset"] is None and keys(last["results"]) == keys(
        ok(client.get("/api/search", params={**params, "limit": 100}))["results"])[1:]


def test_feature(client):
    f = ok(client.get("/api/features/res-L12/3"))
    assert (f["coder_id"], f["feature"], f["layer"], f["model"]) == ("res-L12", 3, 12, MODEL)
    assert f["histogram"]["counts"] == [5, 3, 2, 0] and f["logits"]["top"][0]["token"] == " Paris"
    assert f["top_examples"][0]["tokens"][f["top_examples"][0]["max_position"]] == " Paris"
    assert len(f["interval_examples"]) == 1
    assert keys(f["similar"])[0] == ("mlp-L12", 6) and f["similar_note"] is None
    assert f["test_text"] is None
    # every description with provenance and scores, the current one first
    current, *older = f["descriptions"]
    assert current["current"] and current["description"] == f["description"]
    assert (current["method"], current["model"]) == ("llm", "gpt-4o-mini")
    assert current["scores"]["detection"] == pytest.approx(0.8) and current["scores"]["fuzz_n"] == 20
    assert current["explainer_source"] == "https://example.invalid/v1" and current["created_at"].startswith("2025-02-01")
    assert [(d["method"], d["current"]) for d in older] == [("tokens", False)]
    assert ok(client.get(f"/api/features/{quote(TRICKY_ID, safe='')}/6"))["description"] == "Marseille harbour and boats"


def test_examples_and_similar(client):
    top = ok(client.get("/api/features/res-L12/3/examples", params={"limit": 2}))
    assert [e["rank"] for e in top["results"]] == [0, 1] and top["total"] == 3 and top["next_offset"] == 2
    rest = ok(client.get("/api/features/res-L12/3/examples", params={"limit": 2, "offset": 2}))
    assert [e["rank"] for e in rest["results"]] == [2] and rest["next_offset"] is None
    interval = ok(client.get("/api/features/res-L12/3/examples", params={"kind": "interval"}))
    assert interval["results"][0]["bin_min"] == 0.75
    similar = ok(client.get("/api/features/res-L12/3/similar", params={"limit": 3}))
    assert keys(similar["results"])[0] == ("mlp-L12", 6) and similar["uses_decoder_vectors"]
    within = ok(client.get("/api/features/res-L12/3/similar", params={"within": "true", "limit": 5}))
    assert {r["coder_id"] for r in within["results"]} == {"res-L12"}
    layer5 = ok(client.get("/api/features/res-L12/3/similar", params={"layer": 5}))
    assert {r["coder_id"] for r in layer5["results"]} == {"res-L5"}


def test_openapi_schema_lists_the_api(client):
    paths = ok(client.get("/openapi.json"))["paths"]
    assert {"/api/search", "/api/coders", "/api/fires_on", "/api/features/{coder_id}/{index}",
            "/api/features/{coder_id}/{index}/examples", "/api/features/{coder_id}/{index}/similar"} <= set(paths)
    assert "/" not in paths  # the HTML pages are not API


def test_openapi_schema_documents_the_errors_the_api_gives(client):
    # Clients generated from the schema (and schemathesis) must find each error status and its
    # body: {"detail": str, "status": int}, which is what every error handler sends.
    schema = ok(client.get("/openapi.json"))
    responses = schema["paths"]["/api/features/{coder_id}/{index}"]["get"]["responses"]
    assert {"200", "400", "404", "413", "422"} <= set(responses)
    error = schema["components"]["schemas"]["Error"]
    assert set(error["properties"]) == {"detail", "status"}
    for status in ("400", "404", "422"):
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    got = client.get("/api/search", params={"q": "x", "limit": 0})
    assert got.status_code == 422 and set(got.json()) == set(error["properties"])


# --- bad requests --------------------------------------------------------------------------------


BAD_REQUESTS = [
    ("/api/features/nope/0", 404, "unknown coder_id"),
    (f"/api/features/{quote(TRICKY_ID + 'x', safe='')}/0", 404, "unknown coder_id"),
    (f"/api/features/res-L12/{WIDTH}", 404, "out of range"),
    ("/api/features/res-L12/-1", 400, "non-negative integer"),
    ("/api/features/res-L12/abc", 400, "non-negative integer"),
    ("/api/features/res-L12/%EF%BC%93", 400, "non-negative integer"),  # a full-width digit
    ("/api/features/res-L12/99999999999999999999", 400, "non-negative integer"),
    ("/api/features/%00/1", 404, "unknown coder_id"),
    ("/api/features/res-L12/3/examples?kind=middle", 422, "kind"),
    ("/api/features/nope/3/similar", 404, "unknown coder_id"),
    ("/api/search", 422, "q: Field required"),
    ("/api/search?q=", 400, "query is empty"),
    ("/api/search?q=%20%0A", 400, "query is empty"),
    ("/api/search?q=a%00b", 400, "NUL"),
    ("/api/search?q=" + "x" * 1500, 400, "at most 1,000"),
    ("/api/search?q=x&limit=0", 422, "limit: Input should be greater than or equal to 1"),
    ("/api/search?q=x&limit=101", 422, "limit: Input should be less than or equal to 100"),
    ("/api/search?q=x&limit=abc", 422, "limit"),
    ("/api/search?q=x&offset=-1", 422, "offset"),
    ("/api/search?q=x&offset=100000", 422, "offset"),
    ("/api/search?q=x&mode=fuzzy", 422, "mode"),
    ("/api/search?q=x&layer=twelve", 422, "layer"),
    ("/api/search?q=x&coder=nope", 404, "unknown coder_id"),
    ("/api/search?q=x&coder=%27%20OR%201%3D1%20--", 404, "unknown coder_id"),
    ("/api/search?q=x&site=resid", 400, "unknown site"),
    ("/api/search?q=x&min_density=0.5&max_density=0.1", 400, "low is above high"),
    ("/api/search?q=x&min_density=nan", 422, "finite"),
    ("/api/search?q=x&max_density=2", 422, "max_density"),
    ("/api/fires_on?text=" + "x" * 4500, 413, "at most 4,000"),
    ("/api/fires_on?text=hi&limit=0", 422, "limit"),
    ("/api/fires_on?text=hi&by=mean", 422, "by"),
    ("/api/fires_on?text=hi&coder=nope", 404, "unknown coder_id"),
    ("/api/fires_on?text=hi", 400, "the chosen coders belong to 2 models"),
    ("/api/features/res-L12/3?text=" + "x" * 4500, 413, "at most 4,000"),
    ("/api/nope", 404, "no page at /api/nope"),
]


@pytest.mark.parametrize("url,status,message", BAD_REQUESTS, ids=[u[:60] for u, _, _ in BAD_REQUESTS])
def test_bad_requests_get_a_clear_json_error(client, url, status, message):
    response = client.get(url)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and message in body["detail"]
    assert "\n" not in body["detail"] and len(body["detail"]) < 500


@pytest.mark.parametrize("body,status,message", [
    ({"text": ""}, 400, "text is empty"),
    ({"text": "x" * 4001}, 413, "at most 4,000"),
    ({"text": 5}, 422, "text"),
    ({"text": "hi", "limit": 1000}, 422, "limit"),
    ({"text": "hi", "max_density": 0}, 422, "max_density"),
    ({}, 422, "text: Field required"),
])
def test_bad_fires_on_bodies(client, body, status, message):
    response = client.post("/api/fires_on", json=body)
    assert response.status_code == status and message in response.json()["detail"]


def test_malformed_json_body(client):
    response = client.post("/api/fires_on", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"]


def test_odd_text_is_just_text(client):
    for q in ["日本語 🙂 Paris", "' OR 1=1 --", "Marseille\" OR \"1\"=\"1", "a:b AND (c OR", "*", "\u202e\u0301"]:
        for mode in ("semantic", "keyword", "hybrid"):
            ok(client.get("/api/search", params={"q": q, "mode": mode}))
    assert ok(client.get("/api/search", params={"q": "Marseille", "mode": "keyword"}))["results"]


def test_a_corrupt_data_file_is_a_json_error_and_the_server_keeps_serving(known_catalogue, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(known_catalogue, db)
    for path in (db / "features.lance" / "data").iterdir():
        with open(path, "r+b") as f:
            f.write(b"\0" * min(4096, path.stat().st_size))
    with TestClient(create_app(str(db))) as broken:
        for url in ["/api/search?q=Paris", "/api/search?q=Paris&mode=keyword", "/api/search?q=Paris&mode=token",
                    "/api/features/res-L12/3", "/api/features/res-L12/3/similar"]:
            response = broken.get(url)
            assert response.status_code == 400, response.text
            detail = response.json()["detail"]
            assert detail.startswith(f"catalogue {db}") and "cannot be read" in detail and "\n" not in detail
        page = broken.get("/features/res-L12/3")
        assert page.status_code == 400 and "cannot be read" in page.text and "<html" in page.text.lower()
        assert ok(broken.get("/api/coders"))["coders"]  # the intact coders table still serves


def test_server_keeps_serving_and_writes_nothing(known_catalogue, client):
    before = table_versions(known_catalogue)
    for url, _, _ in BAD_REQUESTS:
        client.get(url)
    for page in ["/", "/?q=Paris", "/features/res-L12/3", "/fires"]:
        client.get(page)
    assert ok(client.get("/api/search", params={"q": "towns in France", "model": MODEL, "limit": 3}))["results"]
    assert table_versions(known_catalogue) == before


# --- HTML pages ----------------------------------------------------------------------------------


def test_search_page(client):
    landing = client.get("/")
    assert landing.status_code == 200 and "text/html" in landing.headers["content-type"]
    assert "res-L12" in landing.text and 'name="q"' in landing.text
    page = client.get("/", params={"q": "towns in France", "model": MODEL, "limit": 3, "layer": ""})
    assert page.status_code == 200
    assert 'href="/features/res-L12/3"' in page.text and "French cities such as Paris" in page.text
    assert 'href="/api/search?q=towns+in+France&amp;model=tiny-model&amp;limit=3&amp;layer="' in page.text
    assert "next →" in page.text  # more results on the next page
    twin = ok(client.get("/api/search", params={"q": "towns in France", "model": MODEL, "limit": 3, "layer": ""}))
    for row in twin["results"]:  # the page lists exactly its JSON twin's rows
        assert f'/features/{quote(row["coder_id"], safe="")}/{row["feature"]}"' in page.text


def test_feature_page(client):
    page = client.get("/features/res-L12/3")
    assert page.status_code == 200
    text = page.text
    assert "French cities such as Paris, Lyon and Marseille" in text and "gpt-4o-mini" in text
    assert "detection 0.80" in text and "fuzz 0.70" in text and "older indexing" not in text
    assert text.count('<rect class="bar"') == 3  # three nonzero histogram bins
    assert 'class="tok act peak" style="background-color: rgba(234, 88, 12,' in text
    assert 'href="/features/mlp-L12/6"' in text  # similar features link to their pages
    assert 'href="/api/features/res-L12/3"' in text  # the JSON twin
    assert "interval 0.75 – 1.25" in text
    tricky = client.get(f"/features/{quote(TRICKY_ID, safe='')}/6")
    assert tricky.status_code == 200 and "Marseille harbour and boats" in tricky.text
    assert "it&#39;s-a&#39; OR &#39;1&#39;=&#39;1" in tricky.text


def test_html_in_tokens_and_descriptions_is_text(client):
    tokens = client.get(f"/features/{HTML_SAE}/0").text
    assert "&lt;script&gt;" in tokens and "<script>" not in tokens and "alert(&#39;x&#39;)" in tokens
    description = client.get("/features/att-L5/8").text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in description
    assert "<script>" not in description and "<b>bold" not in description


@pytest.mark.parametrize("url,status,message", [
    ("/features/nope/0", 404, "unknown coder_id"),
    ("/features/res-L12/abc", 400, "non-negative integer"),
    ("/?q=x&limit=0", 422, "limit: Input should be greater than or equal to 1"),
    ("/?q=a%00b", 400, "NUL"),
    ("/fires?text=" + "x" * 4500, 413, "at most 4,000"),
    ("/no/such/page", 404, "no page at /no/such/page"),
])
def test_bad_page_requests_get_an_error_page(client, url, status, message):
    response = client.get(url)
    assert response.status_code == status and "text/html" in response.headers["content-type"]
    assert message in response.text and "<h1>" in response.text


# --- through the model: fires_on and the test-text box ---------------------------------------------


def test_fires_on(model_client, model_catalogue):
    result = ok(model_client.get("/api/fires_on", params={"text": TEXT, "limit": 5, "per_token": 2}))
    assert result["tokens"] and len(result["features"]) == 5 and result["by"] == "max"
    assert len(result["per_token"]) <= 2 * len(result["tokens"])
    posted = ok(model_client.post("/api/fires_on", json={"text": TEXT, "limit": 5, "per_token": 2}))
    assert posted == result
    expected = featuredb.open(str(model_catalogue)).fires_on(TEXT, limit=5, per_token=2)
    assert keys(result["features"]) == list(expected.features.select("coder_id", "feature").iter_rows())
    coder_id = result["features"][0]["coder_id"]
    one = ok(model_client.get("/api/fires_on", params={"text": TEXT, "coder": coder_id, "by": "sum"}))
    assert {r["coder_id"] for r in one["features"]} == {coder_id}


def test_feature_on_a_test_text(model_client, model_catalogue):
    top = ok(model_client.get("/api/fires_on", params={"text": TEXT, "limit": 1}))["features"][0]
    feature = ok(model_client.get(f"/api/features/{top['coder_id']}/{top['feature']}", params={"text": TEXT}))
    test = feature["test_text"]
    expected = featuredb.open(str(model_catalogue)).fires_on(TEXT, coders=[top["coder_id"]], limit=1000, per_token=100)
    per_token = expected.per_token.filter(expected.per_token["feature"] == top["feature"])
    want = [0.0] * len(expected.tokens)
    for position, value in per_token.select("position", "activation").iter_rows():
        want[position] = value
    assert test["tokens"] == expected.tokens and test["values"] == pytest.approx(want)
    assert test["max"] == pytest.approx(top["activation"]) and test["values"][top["position"]] > 0
    page = model_client.get(f"/features/{top['coder_id']}/{top['feature']}", params={"text": TEXT})
    assert page.status_code == 200 and page.text.count('class="tok act') >= 1 and "Max on this text" in page.text


def test_fires_page(model_client):
    page = model_client.get("/fires", params={"text": TEXT, "coder": ""})
    assert page.status_code == 200 and 'class="tok act"' in page.text
    assert f"?text={quote(TEXT)}" in page.text.replace("&amp;", "&")  # features link to their test-text view
    assert 'href="/api/fires_on?text=' in page.text


# --- the command ---------------------------------------------------------------------------------


def test_serve_command_prints_its_url(known_catalogue, monkeypatch):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.update(app=app, host=host, port=port))
    result = CliRunner().invoke(main, ["serve", "--db", str(known_catalogue), "--port", "8765"])
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:8765/" in result.output and served["port"] == 8765
    assert set(["serve"]) <= set(main.commands)
    missing = CliRunner().invoke(main, ["serve", "--db", str(known_catalogue) + "-missing"])
    assert missing.exit_code == 1 and missing.stderr.startswith("error: ")


def test_every_server_error_says_connection_close(known_catalogue):
    """After a 500, Starlette re-raises and uvicorn drops the connection: the response must say
    `Connection: close`, so a keep-alive client opens a new one instead of failing."""
    import httpx
    from serving import serving

    app = create_app(str(known_catalogue))

    def broken():
        raise RuntimeError("a bug")

    app.state.catalogue.coders = broken  # /api/coders and the search page's coder list
    with serving(app) as url, httpx.Client(base_url=url) as keep_alive:
        for path in ["/api/coders", "/", "/api/coders"]:
            response = keep_alive.get(path)
            assert response.status_code == 500 and response.headers["connection"] == "close", path
            assert "internal error (RuntimeError)" in response.text
            # the next request on the same client works
            assert keep_alive.get("/api/search", params={"q": "Paris", "mode": "keyword"}).status_code == 200
