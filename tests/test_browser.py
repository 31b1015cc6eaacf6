"""The HTML pages in a real headless browser (Debian's Chromium driven by Playwright) against a
live `featuredb serve` (uvicorn in a background thread) over a small indexed, described catalogue:
search, token shading with hover values, the histogram, similar-feature links, the test-text box,
the fires-on-text page and the find-by-example form.
"""

from __future__ import annotations

import httpx
import pytest

import catalogue_fixtures
from featuredb.server import create_app
from serving import CHROMIUM_ARGS, chromium, serving

CHROMIUM = chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium): "
                                                          "the browser tests drive the system's Chromium")
TEXT = "The cat sat on the mat in Paris."
TRANSPARENT = ("rgba(0, 0, 0, 0)", "transparent")
# the shared catalogue fixture (see tests/catalogue_fixtures.py)
model_catalogue = catalogue_fixtures.model_catalogue


@pytest.fixture(scope="module")
def server(model_catalogue):
    with serving(create_app(str(model_catalogue))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)  # the first test text loads the model
    yield page
    context.close()


@pytest.fixture(scope="module")
def firing_feature(server) -> dict:
    """A feature that fires on TEXT and has stored top examples and similar features."""
    features = httpx.get(f"{server}/api/fires_on", params={"text": TEXT, "limit": 20}, timeout=120).json()["features"]
    for candidate in features:
        feature = httpx.get(f"{server}/api/features/{candidate['coder_id']}/{candidate['feature']}", timeout=60).json()
        if feature["top_examples"] and feature["similar"]:
            return feature
    pytest.fail("no feature firing on the test text has examples and similar features")


def background(locator) -> str:
    return locator.evaluate("e => getComputedStyle(e).backgroundColor")


def shaded_tokens(locator) -> list:
    """The token elements with a visible background and a numeric hover value."""
    return [element for element in locator.all()
            if background(element) not in TRANSPARENT and _hover_value(element) > 0]


def _hover_value(element) -> float:
    """The activation a token's title shows on hover (first line "token · value"), or -1."""
    try:
        return float((element.get_attribute("title") or "").splitlines()[0].rsplit("·", 1)[-1])
    except (ValueError, IndexError):
        return -1.0


def test_search_page_returns_results(server, page):
    page.goto(f"{server}/")
    page.fill("input[name=q]", "cat")
    page.select_option("select[name=mode]", "hybrid")
    page.click("button[type=submit]")
    rows = page.locator("table.results tbody tr")
    rows.first.wait_for()
    assert rows.count() >= 1
    link = rows.first.locator("a.fref")
    assert link.get_attribute("href").startswith("/features/")
    assert "mode=hybrid" in page.url and page.locator("a.json-link").get_attribute("href").startswith("/api/search?")


def test_feature_page_shades_tokens_and_draws_the_histogram(server, page, firing_feature):
    f = firing_feature
    page.goto(f"{server}/features/{f['coder_id']}/{f['feature']}")
    assert f"{f['coder_id']} / {f['feature']}" in page.locator("h1").inner_text()
    assert len(shaded_tokens(page.locator(".example .tok.act"))) >= len(f["top_examples"])
    peak = page.locator(".tok.peak").first
    assert float(peak.get_attribute("data-value")) > 0 and background(peak) not in TRANSPARENT
    bars = page.locator("svg.histogram rect.bar")
    assert bars.count() == sum(1 for c in f["histogram"]["counts"] if c > 0)
    box = bars.first.bounding_box()
    assert box and box["height"] > 0 and box["width"] > 0


def test_similar_feature_link_opens_that_feature(server, page, firing_feature):
    f = firing_feature
    page.goto(f"{server}/features/{f['coder_id']}/{f['feature']}")
    link = page.locator("ul.similar a.fref").first
    target = link.inner_text()
    link.click()
    page.wait_for_url(f"**/features/{target}")
    coder_id, index = target.rsplit("/", 1)
    assert page.locator("h1").inner_text().replace(" ", "") == f"{coder_id}/{index}"


def test_test_text_box_shades_the_text(server, page, firing_feature):
    f = firing_feature
    page.goto(f"{server}/features/{f['coder_id']}/{f['feature']}")
    page.fill("#test-text textarea", TEXT)
    page.click("#test-text button")
    page.locator(".test-result").wait_for()
    assert page.locator("#test-text textarea").input_value() == TEXT
    assert len(shaded_tokens(page.locator(".test-result .tok"))) >= 1


def test_fires_page_lists_features_that_fire(server, page):
    page.goto(f"{server}/fires")
    page.fill("textarea[name=text]", TEXT)
    page.click("button[type=submit]")
    rows = page.locator("table.results tbody tr")
    rows.first.wait_for()
    assert rows.count() >= 1 and len(shaded_tokens(page.locator(".tok"))) >= 1
    rows.first.locator("a.fref").click()
    page.locator(".test-result").wait_for()  # the feature page opens with this text tested


def test_find_form_draws_the_marked_tokens_under_each_result(server, page):
    page.goto(f"{server}/")
    page.fill("#positive-0", "The [[cat]] sat on the mat.")
    page.fill("#negative-0", "The dog sat on the log.")
    page.click("form.find-form button[type=submit]")
    page.locator(".find-result").first.wait_for()
    marked = page.locator(".find-result .tok.marked")
    assert marked.count() >= 1 and marked.first.evaluate("e => getComputedStyle(e).boxShadow") not in ("", "none")
    assert len(shaded_tokens(page.locator(".find-result .tok"))) >= 1  # every result fires on a marked token
    assert page.locator("#positive-0").input_value() == "The [[cat]] sat on the mat."
    assert page.locator("a.json-link").get_attribute("href").startswith("/api/find?")


def test_map_page_draws_every_point_hovers_and_opens_a_feature(model_catalogue, server, page):
    pytest.importorskip("umap")
    from featuredb.store import FeatureStore
    from featuredb.store.feature_map import update_map

    update_map(FeatureStore(str(model_catalogue)))  # as `featuredb map` does (finalize maps only when asked)
    body = httpx.get(f"{server}/api/map", params={"limit": 1}, timeout=60).json()
    page.goto(f"{server}/map")
    page.wait_for_function("window.mapState && window.mapState.ready")
    state = page.evaluate("window.mapState")
    assert state["drawn"] == body["count"] > 0  # every point of the chosen coders is in view
    # the canvas holds coloured pixels (not only its white ground)
    coloured = page.evaluate("""() => { const c = document.getElementById('map');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 240 || d[i + 1] < 240 || d[i + 2] < 240) n++; return n; }""")
    assert coloured >= body["count"]
    # hover the first point: the tooltip names it and shows its description
    point = body["results"][0]
    box = page.locator("#map").bounding_box()
    target = page.evaluate("([coder, feature]) => window.mapPoint(coder, feature)", [point["coder_id"], point["feature"]])
    page.mouse.move(box["x"] + target[0], box["y"] + target[1])
    tip = page.locator("#map-tip")
    tip.wait_for()
    page.wait_for_function("!document.getElementById('map-tip').textContent.includes('…')")
    label = httpx.get(f"{server}/api/map/label/{point['coder_id']}/{point['feature']}", timeout=60).json()
    hovered = tip.text_content()
    assert hovered.startswith(f"{point['coder_id']}/") and (label["description"] or "(no description)") in hovered \
        or hovered.split(" · ")[0] != f"{point['coder_id']}/{point['feature']}"  # a neighbour on the same pixel
    # colour by layer redraws; the search box circles matches
    page.select_option("#colour-by", "layer")
    page.fill("#map-search", "the")
    page.press("#map-search", "Enter")
    page.wait_for_function("document.getElementById('search-note').textContent.length > 0")
    # clicking the hovered point opens its feature page
    page.mouse.click(box["x"] + target[0], box["y"] + target[1])
    page.wait_for_url("**/features/**")
    assert "/features/" in page.url
