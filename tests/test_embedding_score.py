"""The offline embedding score of descriptions (issue 24): the AUROC itself, right and wrong
descriptions on a tiny catalogue, its storage by `featuredb describe` (and `--score-only` for
descriptions written before it), and the --min-score filter in the CLI, the API and Python."""

from __future__ import annotations

import json
import re

import lancedb
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from featuredb.cli import main
from featuredb.describe.embedding_score import STRIDE, WINDOW, EmbeddingScorer, auroc, window_start
from featuredb.describe.evidence import load_evidence
from featuredb.describe.run import DescribeConfig, run_describe
from featuredb.errors import QueryError
from featuredb.query import open as open_catalogue
from featuredb.server import create_app
from featuredb.store import FeatureStore
from featuredb.store.descriptions import current_descriptions, write_descriptions
from featuredb.store.indexes import finalize
from test_describe import CREATED, SAE, make_catalogue

DIM = 384


def bag_of_words(texts: list[str], name: str) -> np.ndarray:
    """Unit vectors of hashed lower-case words: texts that share words are similar (a stand-in for
    MiniLM that runs in no time and whose similarities a test can predict)."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            out[i, int.from_bytes(word.encode()[:8].ljust(8, b"\0"), "little") % DIM] += 1.0
        out[i] /= max(float(np.linalg.norm(out[i])), 1e-12)
    return out


def brute_force_auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_equals_brute_force_on_constructed_embeddings(seed):
    rng = np.random.default_rng(seed)
    query = rng.standard_normal(16)
    # windows: positives lean towards the query, negatives do not; rounding makes ties
    positives = rng.standard_normal((int(rng.integers(1, 30)), 16)) + 0.3 * query
    negatives = rng.standard_normal((int(rng.integers(1, 30)), 16))
    p = np.round(positives @ query, 0 if seed % 2 else 2)
    n = np.round(negatives @ query, 0 if seed % 2 else 2)
    assert auroc(p, n) == pytest.approx(brute_force_auroc(p, n), abs=1e-12)


def test_auroc_extremes_and_ties():
    assert auroc(np.array([3.0, 2.0]), np.array([1.0, 0.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5  # ties count 1/2
    assert auroc(np.array([]), np.array([1.0])) is None and auroc(np.array([1.0]), np.array([])) is None


def test_every_token_sits_in_the_middle_half_of_its_window():
    n = 128
    for position in range(n):
        start = window_start(position, n)
        assert 0 <= start <= n - WINDOW and start <= position < start + WINDOW
        if WINDOW // 4 <= position < n - WINDOW // 4:
            assert start + STRIDE // 2 <= position < start + WINDOW - STRIDE // 2
    assert window_start(5, 10) == 0  # a context shorter than a window: the whole context


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "db"
    make_catalogue(path)
    return path


def test_a_matching_description_scores_high_and_a_wrong_one_low(db):
    store = FeatureStore(str(db), read_only=True)
    scorer = EmbeddingScorer(store, bag_of_words, "bag-of-words")
    evidence = load_evidence(store, SAE, [0, 1, 2], top_k=4)
    right, wrong, dead = scorer.score(SAE, [
        (0, "capital cities: Paris, London, Berlin, Rome and Madrid"),
        (0, "Python code: def, class, print and function definitions"),
        (2, "anything"),
    ], evidence)
    assert right.score >= 0.9 and wrong.score <= 0.3, (right, wrong)
    assert right.details["activating"] == 7 and right.details["random_negatives"] > 0
    assert right.details["method"] == "embedding" and right.details["embedding_model"] == "bag-of-words"
    assert dead.score is None and dead.details["unscored"] == "no activating context"
    # windows are embedded once however many descriptions use them
    embedded = scorer.windows.embedded
    scorer.score(SAE, [(0, "capital cities"), (1, "def")], evidence)
    assert scorer.windows.embedded == embedded


def _scores(db) -> dict[int, tuple[float | None, str | None]]:
    """feature -> (description_score, its method) of the features rows."""
    rows = FeatureStore(str(db), read_only=True).features(SAE, ["feature", "description_score",
                                                                "description_score_method"]).to_dicts()
    return {r["feature"]: (r["description_score"], r["description_score_method"]) for r in rows}


def _rows(db) -> dict[tuple[int, str], dict]:
    return {(r["feature"], r["method"]): r for r in current_descriptions(FeatureStore(str(db), read_only=True), SAE)}


def test_describe_scores_every_description_and_score_only_fills_old_ones(db):
    result = run_describe(DescribeConfig(db=str(db), progress=False), embedder=bag_of_words)
    assert result.embedding_scored == 4 and result.windows_embedded > 0
    rows, scores = _rows(db), _scores(db)
    for (feature, _), row in rows.items():
        details = json.loads(row["embedding_score_details"])
        assert details["method"] == "embedding" and details["version"]
        expected = None if row["embedding_score"] is None else (pytest.approx(row["embedding_score"]), "embedding")
        assert scores[feature] == (expected or (None, None))
    assert rows[(0, "words")]["embedding_score"] > 0.5 and rows[(2, "words")]["embedding_score"] is None  # 2: dead

    # descriptions written before scores existed: a --score-only run fills them in place, no row added
    table = lancedb.connect(str(db)).open_table("descriptions")
    table.update(values={"embedding_score": None, "embedding_score_details": None})
    lancedb.connect(str(db)).open_table("features").update(
        values={"description_score": None, "description_score_method": None})
    again = run_describe(DescribeConfig(db=str(db), score_only=True, progress=False), embedder=bag_of_words)
    assert again.features == 0 and again.embedding_scored == 4 and table.count_rows() == 4
    assert {k: r["embedding_score"] for k, r in _rows(db).items()} == {k: r["embedding_score"] for k, r in rows.items()}
    assert _scores(db) == scores
    # and a run with nothing to do scores nothing
    assert run_describe(DescribeConfig(db=str(db), progress=False), embedder=bag_of_words).embedding_scored == 0


def test_scores_survive_a_redescribe_of_other_features(db):
    run_describe(DescribeConfig(db=str(db), progress=False), embedder=bag_of_words)
    before_rows, before = _rows(db), _scores(db)
    manual = {"coder_id": SAE, "feature": 1, "description": "the Python keyword def", "method": "manual",
              "prompt_version": "manual", "created_at": CREATED, "indexed_at": CREATED}
    write_descriptions(FeatureStore(str(db)), SAE, [manual], embedding_model="sentence-transformers/all-MiniLM-L6-v2",
                       embedder=bag_of_words)
    result = run_describe(DescribeConfig(db=str(db), progress=False), embedder=bag_of_words)
    assert result.embedding_scored == 1  # the new description only
    after_rows, after = _rows(db), _scores(db)
    for key, row in before_rows.items():
        assert after_rows[key]["embedding_score"] == row["embedding_score"]
        assert after_rows[key]["embedding_score_details"] == row["embedding_score_details"]
    assert {f: s for f, s in after.items() if f != 1} == {f: s for f, s in before.items() if f != 1}
    new_score = after_rows[(1, "manual")]["embedding_score"]
    assert new_score is not None and after[1] == (pytest.approx(new_score), "embedding")


def test_score_only_refuses_llm_scores(db):
    with pytest.raises(Exception, match="--score-only"):
        run_describe(DescribeConfig(db=str(db), score_only=True, score=True, progress=False), embedder=bag_of_words)


@pytest.fixture()
def scored(db):
    run_describe(DescribeConfig(db=str(db), progress=False), embedder=bag_of_words)
    finalize(str(db))
    return db


def _expected(db, at_least: float) -> set[int]:
    return {f for f, (score, _) in _scores(db).items() if score is not None and score >= at_least}


def test_min_score_filters_alike_in_python_cli_and_api(scored):
    scores = sorted({s for s, _ in _scores(scored).values() if s is not None})
    assert len(scores) >= 2
    threshold = float(scores[1])  # keeps some features and drops others
    expected = _expected(scored, threshold)
    assert 0 < len(expected) < len(_scores(scored))
    cat = open_catalogue(str(scored))
    query = cat.search(bag_of_words(["word"], "")[0])  # a vector query: no embedding model needed

    everything = query.limit(10).to_polars()
    assert "description_score" in everything.columns
    python = set(query.where(min_score=threshold).limit(10).to_polars()["feature"].to_list())
    assert python == expected
    ranged = set(query.where(description_score=(threshold, None)).limit(10).to_polars()["feature"].to_list())
    assert ranged == expected

    keyword = set(cat.keyword("word").where(min_score=threshold).limit(10).to_polars()["feature"].to_list())
    words = set(cat.keyword("word").limit(10).to_polars()["feature"].to_list())
    assert keyword == words & expected

    runner = CliRunner()
    cli = runner.invoke(main, ["search", "word", "--keyword", "--db", str(scored), "--min-score", str(threshold),
                               "--json"])
    assert cli.exit_code == 0, cli.output
    assert {r["feature"] for r in json.loads(cli.output)} == keyword
    table = runner.invoke(main, ["search", "word", "--keyword", "--db", str(scored)])
    assert "desc.score" in table.output.splitlines()[0]

    with TestClient(create_app(str(scored))) as client:
        answer = client.get("/api/search", params={"q": "word", "mode": "keyword", "min_score": threshold})
        assert answer.status_code == 200
        assert {r["feature"] for r in answer.json()["results"]} == keyword
        assert all(r["description_score"] >= threshold for r in answer.json()["results"])
        for bad in ("abc", "1.5", "-0.1", "nan"):
            refused = client.get("/api/search", params={"q": "word", "mode": "keyword", "min_score": bad})
            assert refused.status_code == 400 and "min_score must be a number in [0, 1]" in refused.json()["detail"]
        page = client.get("/features/toy/0")
        assert page.status_code == 200 and "description score" in page.text
        feature = client.get("/api/features/toy/0").json()
        assert feature["description_score"]["method"] == "embedding"
        assert feature["description_score"]["value"] == pytest.approx(_scores(scored)[0][0])


def test_bad_min_score_is_one_line(scored):
    runner = CliRunner()
    for bad, code in (("1.5", 1), ("-1", 1), ("abc", 2)):
        out = runner.invoke(main, ["search", "word", "--keyword", "--db", str(scored), "--min-score", bad])
        assert out.exit_code == code and len(out.output.strip().splitlines()) == 1, out.output
    with pytest.raises(QueryError, match=r"min_score must be a number in \[0, 1\]"):
        open_catalogue(str(scored)).keyword("word").where(min_score=2)


def test_show_prints_the_score_with_its_method(scored):
    out = CliRunner().invoke(main, ["show", "toy/0", "--db", str(scored)])
    assert out.exit_code == 0, out.output
    line = next(l for l in out.output.splitlines() if l.startswith("description score:"))
    assert f"{_scores(scored)[0][0]:.3f}" in line and "embedding AUROC" in line
