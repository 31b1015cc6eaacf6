"""Tests of find by example (featuredb.query.find, `featuredb find`, /api/find, /find): marks and
how tokens are marked by them, the rankings against a brute force on a tiny Gemma 2 and two
Gemma Scope coders (activations computed independently, f1 / auroc / precision by hand), the
query builder, limits, the command's output, the API and the page.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient

import featuredb
from catalogue_fixtures import index_tiny_model
from featuredb.cli import main
from featuredb.query import QueryError, TooLarge
from featuredb.query.find import MAX_EXAMPLE_CHARS, MAX_EXAMPLES, RESULT_SCHEMA, parse_example, parse_examples
from featuredb.query.separation import separation
from featuredb.server import create_app
from featuredb.store import FeatureStore

POSITIVES = ["The [[cat]] sat on the [[mat]].", "def add(a, b):\n    [[return]] a + b", "In [[1999]] the numbers"]
NEGATIVES = ["The dog sat on the log.", "London, Paris and Rome"]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_gemma2):
    db, specs = index_tiny_model(tmp_path_factory.mktemp("find"), tiny_gemma2)
    return db, specs


@pytest.fixture(scope="module")
def cat(indexed):
    return featuredb.open(str(indexed[0]))


# --- marks ---------------------------------------------------------------------------------------


def test_marks_are_parsed_into_text_and_spans():
    example = parse_example("a [[b]] c [[d e]]", positive=True, name="example 1")
    assert example.text == "a b c d e" and example.marks == ((2, 3), (6, 9)) and example.positive
    assert parse_example("no marks here", positive=True, name="x").marks == ()
    negative = parse_example("x = y", positive=False, name="negative example 1")
    assert negative.marks == () and not negative.positive
    assert parse_example("x[[ ]]y", positive=True, name="x").marks == ((1, 2),)  # whitespace may be marked


@pytest.mark.parametrize("text, message", [
    ("[[a", "never closed"),
    ("a]] b", "closes no mark"),
    ("[[a [[b]] c]]", "mark inside a mark"),
    ("a [[]] b", "empty mark"),
    ("[[]]", "empty mark"),
    ("   ", "is empty"),
    ("a\x00b", "NUL"),
])
def test_bad_marks_are_refused(text, message):
    with pytest.raises(QueryError, match=message):
        parse_example(text, positive=True, name="example 1")


def test_marks_in_a_negative_text_are_refused():
    with pytest.raises(QueryError, match="negative example 1 holds a mark"):
        parse_examples(["a [[b]]"], ["c [[d]]"])
    with pytest.raises(QueryError, match="at least one positive"):
        parse_examples([], ["c d"])


def test_limits_on_examples():
    with pytest.raises(TooLarge, match=f"at most {MAX_EXAMPLES}"):
        parse_examples(["a"] * MAX_EXAMPLES, ["b"])
    with pytest.raises(TooLarge, match="characters long"):
        parse_examples(["a" * (MAX_EXAMPLE_CHARS + 1)])


def _offsets(model_dir, text: str) -> list[tuple[int, int]]:
    from transformers import AutoTokenizer

    return [tuple(o) for o in AutoTokenizer.from_pretrained(str(model_dir))(
        text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


def test_tokens_overlapping_a_mark_are_marked(cat, tiny_gemma2):
    text = "The cat sat on the mat."
    spans = _offsets(tiny_gemma2, text)
    cut = next(i for i, (s, e) in enumerate(spans) if e - s >= 3)  # a token of 3+ characters
    start, end = spans[cut]
    # a mark on one inner character of the token, and one across the edge between two tokens
    inner = text[:start + 1] + "[[" + text[start + 1] + "]]" + text[start + 2:]
    edge = text[:end - 1] + "[[" + text[end - 1:end + 1] + "]]" + text[end + 1:]
    result = cat.find([inner, edge, "sat on the log"], ["the dog"]).limit(1).result()
    first, second, whole, negative = result.examples
    assert first["text"] == second["text"] == text
    assert first["marked"] == [i == cut for i in range(len(spans))]
    assert second["marked"] == [i in (cut, cut + 1) for i in range(len(spans))]
    assert all(whole["marked"]) and not any(negative["marked"])  # no marks: positive throughout
    assert [e["positive"] for e in result.examples] == [True, True, True, False]


def test_several_marks_per_text(cat):
    result = cat.find(["[[The]] cat sat on [[the]] mat"], ["a dog"]).limit(1).result()
    example = result.examples[0]
    assert [t for t, m in zip(example["tokens"], example["marked"]) if m] == ["The", " the"]


def test_everything_marked_is_refused(cat):
    with pytest.raises(QueryError, match="every token is marked"):
        cat.find(["The cat sat"]).to_polars()


# --- rankings against a brute force ------------------------------------------------------------------


def _dense(model_dir, specs: list[str], texts: list[str]) -> dict[str, np.ndarray]:
    """Each coder's activations on every text, BOS dropped, one lone forward pass a text."""
    from featuredb.runtime.coders import load_coder
    from featuredb.runtime.model import load_model

    model = load_model(str(model_dir))
    dense = {}
    for spec in specs:
        coder = load_coder(spec, model_is_gemma=True)
        rows = []
        for text in texts:
            ids = torch.tensor([[model.bos_token_id] + model.tokenizer(text, add_special_tokens=False)["input_ids"]])
            x = model.capture(ids, torch.ones_like(ids), [coder.hook])[coder.hook]
            rows.append(coder.encode(x.float())[0, 1:].detach().numpy())
        dense[coder.coder_id] = np.concatenate(rows)
    return dense


def _brute_force(dense: dict[str, np.ndarray], stored: set, marked: np.ndarray) -> dict[str, dict]:
    """{metric: {(coder_id, feature): score}} for every stored feature firing on a marked token."""
    scores: dict[str, dict] = {"f1": {}, "auroc": {}, "precision": {}}
    for coder_id, acts in dense.items():
        for f in range(acts.shape[1]):
            a, b = acts[marked, f], acts[~marked, f]
            tp, fp = int((a > 0).sum()), int((b > 0).sum())
            if tp == 0 or (coder_id, f) not in stored:
                continue
            fn = len(a) - tp
            scores["f1"][(coder_id, f)] = 2 * tp / (2 * tp + fp + fn)
            scores["precision"][(coder_id, f)] = tp / (tp + fp)
            pairs = (a[:, None] > b[None, :]).sum() + 0.5 * (a[:, None] == b[None, :]).sum()
            scores["auroc"][(coder_id, f)] = pairs / (len(a) * len(b))
    return scores


@pytest.mark.parametrize("by", ["f1", "auroc", "precision"])
def test_rankings_match_a_brute_force(cat, indexed, tiny_gemma2, by):
    db, specs = indexed
    store = FeatureStore(str(db), read_only=True)
    stored = {(c, f) for c in cat.coders()["coder_id"].to_list() for f in store.features(c)["feature"].to_list()}
    result = cat.find(POSITIVES, NEGATIVES, by=by).limit(1000).result()
    texts = [e["text"] for e in result.examples]
    marked = np.concatenate([e["marked"] for e in result.examples]).astype(bool)
    dense = _dense(tiny_gemma2, specs, texts)
    expected = _brute_force(dense, stored, marked)[by]
    frame = result.features
    got = {(r["coder_id"], r["feature"]): r["score"] for r in frame.iter_rows(named=True)}
    assert got.keys() == expected.keys() and len(got) > 3
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert frame["score"].to_list() == sorted(frame["score"].to_list(), reverse=True)
    assert frame[by].to_list() == frame["score"].to_list()
    n_marked = int(marked.sum())
    assert set(frame["marked_tokens"].to_list()) == {n_marked}
    assert set(frame["other_tokens"].to_list()) == {len(marked) - n_marked}
    # each row's counts, mean and the activations drawn over the examples are the feature's own
    for row, drawn in zip(frame.head(5).iter_rows(named=True), result.activations):
        values = dense[row["coder_id"]][:, row["feature"]]
        assert np.concatenate(drawn) == pytest.approx(values, rel=1e-4, abs=1e-5)
        assert row["mean_marked"] == pytest.approx(values[marked].mean(), rel=1e-4)
        assert row["marked_fired"] == int((values[marked] > 0).sum())
        assert row["other_fired"] == int((values[~marked] > 0).sum())


def test_auroc_counts_ties_as_half():
    # one feature: marked values [2, 0], other values [2, 0, 1]
    marked = np.array([True, True, False, False, False])
    position, feature, value = np.array([0, 2, 4]), np.array([0, 0, 0]), np.array([2.0, 2.0, 1.0])
    found = separation(position, feature, value, marked)
    # pairs: 2>0, 2>1, 2=2 (½); 0=0 (½), 0<1, 0<2  -> (2 + 0.5 + 0.5) / 6
    assert found.auroc.tolist() == [pytest.approx(3 / 6)]
    assert found.f1.tolist() == [pytest.approx(2 * 1 / (2 * 1 + 2 + 1))] and found.precision.tolist() == [pytest.approx(1 / 3)]


def test_the_model_runs_once_for_every_example(cat):
    cat.find(POSITIVES, NEGATIVES).limit(1).to_polars()  # loads the model
    shared = next(iter(cat.reader.loaded("models").values()))
    calls = []
    original = shared.model.capture

    def counting(ids, mask, hooks):
        calls.append(ids.shape[0])
        return original(ids, mask, hooks)

    shared.model.capture = counting
    try:
        cat.find(POSITIVES, NEGATIVES).limit(1).to_polars()
    finally:
        shared.model.capture = original
    assert calls == [len(POSITIVES) + len(NEGATIVES)]


# --- the query builder -------------------------------------------------------------------------------


def test_builder_where_limit_and_to_polars(cat):
    everything = cat.find(POSITIVES, NEGATIVES).limit(1000).to_polars()
    assert list(everything.schema) == list(RESULT_SCHEMA) and everything.height > 3
    top3 = cat.find(POSITIVES, NEGATIVES).limit(3).to_polars()
    assert top3.equals(everything.head(3))
    layer = int(everything["layer"][0])
    only = cat.find(POSITIVES, NEGATIVES).where(layer=layer).limit(1000).to_polars()
    assert only.height and set(only["layer"].to_list()) == {layer}
    assert only.equals(everything.filter(pl.col("layer") == layer))
    ceiling = float(everything["density"].median())
    sparse = cat.find(POSITIVES, NEGATIVES).where(density=(None, ceiling)).limit(1000).to_polars()
    assert sparse.equals(everything.filter(pl.col("density") <= ceiling))
    coder_id = everything["coder_id"][0]
    one = cat.find(POSITIVES, NEGATIVES, coders=coder_id).limit(1000).to_polars()
    assert one.equals(everything.filter(pl.col("coder_id") == coder_id))
    assert cat.find(POSITIVES, NEGATIVES).offset(2).limit(3).to_polars().equals(everything.slice(2, 3))
    for bad in [lambda: cat.find(POSITIVES, by="recall"), lambda: cat.find(POSITIVES, coders=["nope"]),
                lambda: cat.find(42), lambda: cat.find(POSITIVES).where(colour="red")]:
        with pytest.raises(QueryError):
            bad()


# --- the command -------------------------------------------------------------------------------------


def test_cli_find_json_and_table(indexed):
    db, _ = indexed
    runner = CliRunner()
    out = runner.invoke(main, ["find", "--db", str(db), *POSITIVES, "--not", NEGATIVES[0], "--not", NEGATIVES[1],
                               "--json", "-n", "4"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert len(rows) == 4 and set(rows[0]) == set(RESULT_SCHEMA)
    assert {"coder_id", "feature", "score", "layer", "marked_fired", "marked_tokens", "other_fired", "other_tokens",
            "mean_marked", "description"} <= set(rows[0])
    expected = featuredb.open(str(db)).find(POSITIVES, NEGATIVES).limit(4).to_polars()
    assert [(r["coder_id"], r["feature"]) for r in rows] == list(expected.select("coder_id", "feature").iter_rows())
    table = runner.invoke(main, ["find", "--db", str(db), *POSITIVES, "--not", NEGATIVES[0], "--by", "auroc",
                                 "--layer", "1", "-n", "3"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:6] == ["auroc", "coder_id", "feature", "layer", "marked", "other"] and len(lines) == 4
    assert all(line.split()[3] == "1" for line in lines[1:])


@pytest.mark.parametrize("args, message", [
    (["The [[cat]]", "--not", "a [[dog]]"], "negative example 1 holds a mark"),
    (["The [[cat"], "never closed"),
    (["The [[]] cat"], "empty mark"),
    (["a"] * (MAX_EXAMPLES + 1), f"at most {MAX_EXAMPLES}"),
    (["a" * (MAX_EXAMPLE_CHARS + 1)], "characters long"),
    (["The cat", "--by", "recall"], "recall"),
])
def test_cli_find_errors_are_one_line(indexed, args, message):
    db, _ = indexed
    out = CliRunner().invoke(main, ["find", "--db", str(db), *args])
    assert out.exit_code != 0 and message in out.output
    assert len(out.output.strip().splitlines()) == 1 and out.output.startswith("error:")


# --- the API and the page ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(indexed):
    with TestClient(create_app(str(indexed[0]))) as client:
        yield client


def test_api_find(client, cat):
    body = {"positives": POSITIVES, "negatives": NEGATIVES, "limit": 5, "by": "auroc"}
    posted = client.post("/api/find", json=body)
    assert posted.status_code == 200, posted.text
    result = posted.json()
    expected = cat.find(POSITIVES, NEGATIVES, by="auroc").limit(5).to_polars()
    assert [(r["coder_id"], r["feature"]) for r in result["results"]] == list(expected.select("coder_id", "feature").iter_rows())
    assert result["by"] == "auroc" and len(result["examples"]) == len(POSITIVES) + len(NEGATIVES)
    first = result["results"][0]
    assert len(first["activations"]) == len(result["examples"])
    assert [len(a) for a in first["activations"]] == [len(e["tokens"]) for e in result["examples"]]
    got = client.get("/api/find", params={"positive": POSITIVES, "negative": NEGATIVES, "limit": 5, "by": "auroc"})
    assert got.status_code == 200 and got.json() == result
    layered = client.post("/api/find", json={**body, "layer": [0], "coder": [], "max_density": 0.9}).json()
    assert {r["layer"] for r in layered["results"]} <= {0}


@pytest.mark.parametrize("body, status, message", [
    ({"positives": ["The [[cat]]"], "negatives": ["a [[dog]]"]}, 400, "negative example 1 holds a mark"),
    ({"positives": ["[[The cat"]}, 400, "never closed"),
    ({"positives": ["The cat"]}, 400, "every token is marked"),
    ({"positives": []}, 400, "at least one positive"),
    ({"positives": ["a [[b]]"] * (MAX_EXAMPLES + 1)}, 413, f"at most {MAX_EXAMPLES}"),
    ({"positives": ["a" * (MAX_EXAMPLE_CHARS + 1)]}, 413, "characters long"),
    ({"positives": ["a, " * 500 + "[[x]]"]}, 413, "tokens long"),
    ({"positives": ["a [[b]]"], "by": "recall"}, 422, "by"),
    ({"positives": ["a [[b]]"], "coder": ["nope"]}, 404, "unknown coder_id"),
])
def test_api_find_errors(client, body, status, message):
    response = client.post("/api/find", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_find_page_draws_marked_tokens(client):
    home = client.get("/")
    assert home.status_code == 200 and 'action="/find"' in home.text and 'name="positive"' in home.text
    page = client.get("/find", params={"positive": ["The [[cat]] sat", ""], "negative": ["The dog sat"], "limit": 3,
                                       "layer": ""})
    assert page.status_code == 200, page.text
    # the examples card draws the marked token once, then once more under each result
    results = page.text.count('class="find-result"')
    marked = page.text.count(' marked"')
    assert results >= 1 and marked >= 1 + results and marked % (1 + results) == 0
    assert 'class="tok act' in page.text and 'href="/api/find?positive=' in page.text
    bad = client.get("/find", params={"positive": ["The [[cat"]})
    assert bad.status_code == 400 and "never closed" in bad.text
