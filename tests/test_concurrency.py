"""fires_on from many threads at once (the server's case): each answer must be the one a lone
call gives for the same text, whichever texts share a forward pass; the model's hooks must never
record another request's activations. Through Catalogue.fires_on and through a real uvicorn
server."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import catalogue_fixtures
import featuredb
from conftest import CORPUS_TEXT
from featuredb.query.forward import SharedModel
from featuredb.server import create_app
from serving import serving

model_catalogue = catalogue_fixtures.model_catalogue
# texts of different lengths (a batch pads them) and contents
TEXTS = CORPUS_TEXT + [t[::-1] for t in CORPUS_TEXT] + ["a", "Paris Paris Paris", "x " * 60]
THREADS = 16


@pytest.fixture(scope="module")
def cat(model_catalogue):
    return featuredb.open(str(model_catalogue))


@pytest.fixture(scope="module")
def lone(cat) -> dict[str, dict]:
    """Each text's answer from one call at a time."""
    return {text: cat.fires_on(text, limit=50, per_token=5).to_dict() for text in TEXTS}


@pytest.fixture()
def passes(cat, lone, monkeypatch) -> list[int]:
    """The batch size of every forward pass from now on; each pass takes 20 ms longer, so that
    concurrent requests queue and share passes."""
    shared = next(iter(cat.reader.loaded("models").values()))
    assert isinstance(shared, SharedModel)
    sizes: list[int] = []
    capture = shared.model.capture

    def counted(ids, mask, hooks):
        sizes.append(ids.shape[0])
        threading.Event().wait(0.02)
        return capture(ids, mask, hooks)

    monkeypatch.setattr(shared.model, "capture", counted)
    return sizes


def assert_same_answer(got: dict, expected: dict) -> None:
    assert got["tokens"] == expected["tokens"] and got["token_ids"] == expected["token_ids"]
    for part in ("features", "per_token"):
        assert [{k: v for k, v in r.items() if k not in ("activation", "relative")} for r in got[part]] == \
               [{k: v for k, v in r.items() if k not in ("activation", "relative")} for r in expected[part]], part
        assert [r["activation"] for r in got[part]] == pytest.approx([r["activation"] for r in expected[part]],
                                                                      rel=1e-5, abs=1e-6)


def test_concurrent_fires_on_each_get_the_lone_answer(cat, lone, passes):
    def call(i: int) -> tuple[str, dict]:
        text = TEXTS[i % len(TEXTS)]
        return text, cat.fires_on(text, limit=50, per_token=5).to_dict()

    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(call, range(300)))
    for text, answer in answers:
        assert_same_answer(answer, lone[text])
    assert max(passes) > 1, "concurrent texts should share forward passes"
    assert len(passes) < 300


def test_concurrent_calls_for_different_coders_share_passes_correctly(cat, passes):
    coder_ids = cat.coders()["coder_id"].to_list()
    choices = [None, [coder_ids[0]], [coder_ids[1]]]
    expected = {(t, i): cat.fires_on(t, coders=c, by="sum", per_token=3).to_dict()
                for t in TEXTS[:6] for i, c in enumerate(choices)}

    def call(n: int) -> tuple[tuple[str, int], dict]:
        key = (TEXTS[n % 6], n % 3)
        return key, cat.fires_on(key[0], coders=choices[key[1]], by="sum", per_token=3).to_dict()

    with ThreadPoolExecutor(THREADS) as pool:
        for key, answer in pool.map(call, range(120)):
            assert_same_answer(answer, expected[key])


def test_a_failing_batch_is_rerun_text_by_text(cat, lone, passes, monkeypatch):
    """A pass that fails for a batch (e.g. out of memory) must not hand its error to every
    request in it: each text is run again on its own."""
    shared = next(iter(cat.reader.loaded("models").values()))
    capture = shared.model.capture

    def fails_batched(ids, mask, hooks):
        if ids.shape[0] > 1:
            raise RuntimeError("out of memory")
        return capture(ids, mask, hooks)

    monkeypatch.setattr(shared.model, "capture", fails_batched)
    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(lambda t: (t, cat.fires_on(t, limit=50, per_token=5).to_dict()), TEXTS * 3))
    for text, answer in answers:
        assert_same_answer(answer, lone[text])


def test_a_bad_text_among_concurrent_ones_fails_alone(cat, lone):
    too_long = "word " * 2000  # over MAX_TOKENS: refused before the model runs

    def call(i: int):
        text = too_long if i % 5 == 0 else TEXTS[i % len(TEXTS)]
        try:
            return text, cat.fires_on(text, limit=50, per_token=5).to_dict()
        except featuredb.FeaturedbError as e:
            return text, e

    with ThreadPoolExecutor(THREADS) as pool:
        for text, answer in pool.map(call, range(60)):
            if text is too_long:
                assert isinstance(answer, featuredb.FeaturedbError) and "tokens long" in str(answer)
            else:
                assert_same_answer(answer, lone[text])


def test_the_api_under_concurrent_clients_gives_lone_answers(cat, lone, model_catalogue):
    """GET and POST /api/fires_on from 16 threads through a real uvicorn server, keep-alive
    connections: every response is 200 and equals the lone answer."""
    with serving(create_app(str(model_catalogue))) as url:
        local = threading.local()

        def call(i: int) -> tuple[str, int, dict]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=url, timeout=60)
            text = TEXTS[i % len(TEXTS)]
            params = {"text": text, "limit": 50, "per_token": 5}
            response = local.client.get("/api/fires_on", params=params) if i % 2 else \
                local.client.post("/api/fires_on", json=params)
            return text, response.status_code, response.json()

        with ThreadPoolExecutor(THREADS) as pool:
            answers = list(pool.map(call, range(160)))
    for text, status, body in answers:
        assert status == 200, body
        assert body["text"] == text
        assert_same_answer(body, lone[text])
