"""Search shows features of one coder with the same statistics and description once, with a count of
the others (issue 24): in Python, the CLI, the API and the page alike, `limit` rows after collapsing."""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner

import featuredb
from catalogue_fixtures import build_catalogue
from featuredb.cli import main
from featuredb.query import create_indexes
from featuredb.runtime.embedding import DEFAULT_EMBEDDING_MODEL, embed
from featuredb.store import FeatureStore

ERRORS = "error handling: try, except and raise statements"
WIDTH = 64
CLONES, LOOSE = "clones-L1", "clones-L2"
# feature -> (description, density, max activation); everything else of the two coders is undescribed
PLANTED = {
    CLONES: {
        **{i: (ERRORS, 0.00122, 133.761) for i in range(10, 50)},  # 40 clones: more than one fetch holds
        3: (ERRORS, 0.00122, 133.761),  # ... and the best-ranked one (lowest number among equal scores)
        5: (ERRORS, 0.00122, 90.5),  # the same description, another max: not a duplicate
        6: (ERRORS, 0.002, 133.761),  # another density: not a duplicate
        7: ("closing parentheses in code", 0.00122, 133.761),  # same statistics, another description
        8: ("closing parentheses in code", 0.00122, 133.761),  # ... which has a duplicate of its own
    },
    LOOSE: {2: (ERRORS, 0.00122, 133.761), 4: (ERRORS, 0.00122, 133.761)},  # another coder: not merged with CLONES
}


def add_coder(store: FeatureStore, coder_id: str, planted: dict[int, tuple[str, float, float]], vectors) -> None:
    """res-L12's rows repeated up to WIDTH features under coder_id, described as planted says."""
    sae = store.coders().filter(pl.col("coder_id") == "res-L12").to_dicts()[0] | {"coder_id": coder_id,
                                                                                 "width": WIDTH}
    base = store.features("res-L12")
    rows = pl.concat([base] * (WIDTH // base.height)).with_columns(
        coder_id=pl.lit(coder_id), feature=pl.int_range(WIDTH, dtype=base.schema["feature"]))
    described = [planted.get(i) for i in range(WIDTH)]
    rows = rows.with_columns(
        pl.Series("description", [d and d[0] for d in described], dtype=base.schema["description"]),
        pl.Series("density", [d[1] if d else 0.5 + i / 1000 for i, d in enumerate(described)],
                  dtype=base.schema["density"]),
        pl.Series("max_activation", [d[2] if d else 1.0 + i for i, d in enumerate(described)],
                  dtype=base.schema["max_activation"]),
        pl.Series("description_method", ["test" if d else None for d in described], dtype=pl.String),
        pl.Series("embedding_model", [DEFAULT_EMBEDDING_MODEL if d else None for d in described], dtype=pl.String),
        pl.Series("vector", [vectors[d[0]] if d else None for d in described], dtype=base.schema["vector"]),
    )
    store.write_coder(sae, rows.to_arrow(), {name: [] for name in ("coder_id", "feature", "kind", "rank", "bin_min",
                                                                     "bin_max", "tokens", "token_ids", "values",
                                                                     "max_value", "max_position", "doc_id",
                                                                     "context_index")})


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("duplicates") / "db"
    store = build_catalogue(path, indexes=False)
    texts = sorted({d for planted in PLANTED.values() for d, _, _ in planted.values()})
    vectors = {t: v.tolist() for t, v in zip(texts, embed(texts))}
    for coder_id, planted in PLANTED.items():
        add_coder(store, coder_id, planted, vectors)
    create_indexes(store)
    return path


def expected_groups(db, coder_ids: list[str]) -> dict[tuple[str, int], list[int]]:
    """Brute force from the stored rows: each group of a coder's described features with equal density,
    max activation and description -> its lowest feature number: the others, in order."""
    features = FeatureStore(str(db)).features().filter(pl.col("coder_id").is_in(coder_ids)
                                                       & pl.col("description").is_not_null())
    groups: dict[tuple, list[int]] = {}
    for row in features.sort("feature").iter_rows(named=True):
        groups.setdefault((row["coder_id"], row["density"], row["max_activation"], row["description"]), []).append(
            row["feature"])
    return {(key[0], members[0]): members[1:] for key, members in groups.items()}


@pytest.mark.parametrize("mode", ["semantic", "keyword", "hybrid"])
@pytest.mark.parametrize("limit", [1, 3, 8])
def test_duplicates_are_shown_once_with_their_count(db, mode, limit):
    cat = featuredb.open(str(db))
    query = {"semantic": cat.search, "keyword": cat.keyword, "hybrid": cat.hybrid}[mode]("error handling")
    frame = query.where(coder_id=[CLONES, LOOSE]).limit(limit).to_polars()
    groups = expected_groups(db, [CLONES, LOOSE])
    # every described feature of the two coders matches (keyword: those with the query's words): `limit`
    # distinct rows come back although the first 41 rows read are one group
    matching = [key for key in groups if mode != "keyword" or key in {(CLONES, 3), (CLONES, 5), (CLONES, 6), (LOOSE, 2)}]
    assert frame.height == min(limit, len(matching))
    keys = list(zip(frame["coder_id"], frame["feature"]))
    assert len(set(keys)) == len(keys)
    for key, duplicates, others in zip(keys, frame["duplicates"], frame["duplicate_features"]):
        assert key in groups, key  # each row stands for its group: the group's first feature
        assert others.to_list() == groups[key] and duplicates == len(groups[key])
    shown = frame.select("coder_id", "density", "max_activation", "description")
    assert shown.unique().height == frame.height  # no two rows of a page are duplicates
    if mode == "semantic":  # the ERRORS features share a vector: the 40-clone group ranks first
        assert keys[0] == (CLONES, 3) and frame["duplicates"][0] == 40
        assert frame["duplicate_features"][0].to_list() == list(range(10, 50))


def test_different_coders_or_statistics_are_not_merged(db):
    cat = featuredb.open(str(db))
    frame = cat.search(ERRORS).where(coder_id=[CLONES, LOOSE]).limit(20).to_polars()
    rows = {(r["coder_id"], r["feature"]): r["duplicates"] for r in frame.iter_rows(named=True)}
    assert rows == {(CLONES, 3): 40, (CLONES, 5): 0, (CLONES, 6): 0, (CLONES, 7): 1, (LOOSE, 2): 1}


def test_pages_of_distinct_rows(db):
    cat = featuredb.open(str(db))
    whole = cat.search("error handling").where(coder_id=[CLONES, LOOSE]).limit(5).to_polars()
    page = cat.search("error handling").where(coder_id=[CLONES, LOOSE]).offset(2).limit(3).to_polars()
    assert page.equals(whole.slice(2))


def test_cli_api_and_page_show_the_count(db):
    out = CliRunner().invoke(main, ["search", "error handling", "--semantic", "--coder", CLONES, "--db", str(db),
                                    "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert rows[0]["feature"] == 3 and rows[0]["duplicates"] == 40 and rows[0]["duplicate_features"][:2] == [10, 11]
    table = CliRunner().invoke(main, ["search", "error handling", "--semantic", "--coder", CLONES, "--db", str(db)])
    assert table.exit_code == 0 and "dups" in table.output and "+40" in table.output, table.output

    from fastapi.testclient import TestClient

    from featuredb.server import create_app

    client = TestClient(create_app(str(db)))
    api = client.get("/api/search", params={"q": "error handling", "mode": "semantic", "coder": CLONES}).json()
    first = api["results"][0]
    assert (first["feature"], first["duplicates"], first["duplicate_features"][:2]) == (3, 40, [10, 11])
    page = client.get("/", params={"q": "error handling", "mode": "semantic", "coder": CLONES}).text
    assert "+40 alike" in page and f"/features/{CLONES}/49" not in page and f"/features/{CLONES}/19" in page
