"""The compact examples layout (store/examples.py): readers see the same examples as in the wide
layout it replaced, a wide catalogue opens read-only as it is and is rewritten (resumably, nothing
lost) on its first writable open or by `featuredb upgrade`, contexts are stored once."""

from __future__ import annotations

import difflib
import gzip
import json
import re
import shutil
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from catalogue_fixtures import known_catalogue, model_catalogue  # noqa: F401
from featuredb.cli import main
from featuredb.query import open as open_catalogue
from featuredb.server import create_app
from featuredb.store import FeatureStore, Filter, StoreError, examples_schema
from featuredb.store import upgrade as upgrade_module
from featuredb.store.examples import CompactExamples
from featuredb.store.neuronpedia import export_neuronpedia
from featuredb.store.schema import (CONTEXTS_TABLE, EXAMPLES_TABLE, LEGACY_EXAMPLES_TABLE, VOCABULARY_TABLE,
                                    example_activations_schema)

SORT = [("coder_id", "ascending"), ("feature", "ascending"), ("kind", "ascending"), ("rank", "ascending")]


def every_example(db: Path) -> pa.Table:
    return FeatureStore(db, read_only=True).read_examples(Filter()).sort_by(SORT)


def make_wide(compact_db: Path, wide_db: Path) -> None:
    """The same catalogue in the layout featuredb wrote before: one `examples` table of wide rows."""
    shutil.copytree(compact_db, wide_db)
    rows = every_example(compact_db)
    raw = lancedb.connect(wide_db)
    for name in (EXAMPLES_TABLE, CONTEXTS_TABLE, VOCABULARY_TABLE):
        raw.drop_table(name)
    raw.create_table(LEGACY_EXAMPLES_TABLE, rows, schema=examples_schema())


def exported_rows(root: Path) -> dict[str, list]:
    """Every exported file's JSON rows, without the export's own timestamps."""
    def rows(path: Path) -> list:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        parsed = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        return [{k: v for k, v in r.items() if k not in ("createdAt", "updatedAt")} if isinstance(r, dict) else r
                for r in parsed]
    return {str(p.relative_to(root)): rows(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def both_layouts(model_catalogue, tmp_path_factory) -> tuple[Path, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("layouts")
    make_wide(model_catalogue, root / "wide")
    return model_catalogue, root / "wide"


def test_the_indexer_writes_the_compact_layout(model_catalogue):  # noqa: F811
    store = FeatureStore(model_catalogue, read_only=True)
    names = store.table_names()
    assert EXAMPLES_TABLE in names and CONTEXTS_TABLE in names and VOCABULARY_TABLE in names
    assert LEGACY_EXAMPLES_TABLE not in names
    examples = store.table(EXAMPLES_TABLE).count_rows()
    contexts = store.table(CONTEXTS_TABLE).to_arrow()
    # every context once, though many examples (of both coders) show it
    assert len(np.unique(contexts["context_key"].to_numpy())) == contexts.num_rows < examples
    assert contexts["tokens"].null_count == contexts.num_rows  # strings come from the vocabulary


def test_readers_see_the_same_examples_in_both_layouts(both_layouts):
    compact_db, wide_db = both_layouts
    assert every_example(compact_db).equals(every_example(wide_db))
    compact_cat, wide_cat = open_catalogue(str(compact_db)), open_catalogue(str(wide_db))
    coders = FeatureStore(compact_db, read_only=True).coders()["coder_id"].to_list()
    for coder_id in coders:
        for feature in (0, 1, 5):
            assert compact_cat.feature(coder_id, feature) == wide_cat.feature(coder_id, feature)
    # the CLI's `show --json`, the JSON API and the feature page
    ref = f"{coders[0]}/1"
    shown = [CliRunner().invoke(main, ["show", ref, "--db", str(db), "--json"]) for db in both_layouts]
    assert shown[0].exit_code == 0 and json.loads(shown[0].output) == json.loads(shown[1].output)
    pages = []
    for db in both_layouts:
        with TestClient(create_app(str(db))) as client:
            api = client.get(f"/api/features/{coders[0]}/1")  # noqa
            examples = client.get(f"/api/features/{coders[0]}/1/examples", params={"kind": "interval"})
            page = client.get(f"/features/{coders[0]}/1")
            assert api.status_code == examples.status_code == page.status_code == 200
            pages.append((api.json(), examples.json(), re.sub("<footer>.*</footer>", "", page.text)))
    assert pages[0][:2] == pages[1][:2]
    assert pages[0][2] == pages[1][2], "\n".join(difflib.unified_diff(pages[0][2].splitlines(), pages[1][2].splitlines()))


def test_neuronpedia_export_is_the_same_from_both_layouts(both_layouts, tmp_path):
    outs = []
    for i, db in enumerate(both_layouts):
        export_neuronpedia(db, tmp_path / str(i), batch_size=7)
        outs.append(exported_rows(tmp_path / str(i)))
    assert outs[0].keys() == outs[1].keys() and outs[0] == outs[1]


def test_token_search_is_the_same_in_both_layouts(both_layouts):
    compact_db, wide_db = both_layouts
    tokens = every_example(compact_db)
    peaks = {t[p].strip() for t, p in zip(tokens["tokens"].to_pylist(), tokens["max_position"].to_pylist())}
    words = sorted(w for w in peaks if w)[:6]
    assert words
    for text, window in [(w, 0) for w in words] + [(words[0], 3)]:
        found = [open_catalogue(str(db)).with_token(text, window=window).limit(50).to_polars() for db in both_layouts]
        assert found[0].equals(found[1]), text
        assert window or found[0].height  # a peak token finds the features that peak on it


def test_the_indexer_writes_the_same_rows_a_batch_at_a_time(tiny_gemma2, tmp_path, monkeypatch):
    """Rows streamed in batches of 5 features and 3 contexts equal rows written in one batch."""
    from catalogue_fixtures import index_tiny_model
    from featuredb.indexer import records

    whole, _ = index_tiny_model(tmp_path / "whole", tiny_gemma2)
    monkeypatch.setattr(records, "FEATURES_PER_BATCH", 5)
    monkeypatch.setattr(records, "CONTEXTS_PER_BATCH", 3)
    batched, _ = index_tiny_model(tmp_path / "batched", tiny_gemma2)
    assert every_example(batched).equals(every_example(whole))
    columns = [c for c in FeatureStore(whole, read_only=True).features().columns if c != "vector"]
    assert FeatureStore(batched, read_only=True).features(columns=columns).equals(
        FeatureStore(whole, read_only=True).features(columns=columns))


def test_a_wide_catalogue_opens_read_only_as_it_is(both_layouts):
    _, wide_db = both_layouts
    store = FeatureStore(wide_db, read_only=True)
    assert LEGACY_EXAMPLES_TABLE in store.table_names() and not store.is_compact()


def test_upgrade_on_a_writable_open_keeps_every_example(both_layouts, tmp_path):
    compact_db, wide_db = both_layouts
    db = tmp_path / "db"
    shutil.copytree(wide_db, db)
    before = every_example(db)
    store = FeatureStore(db)  # writable: upgraded now
    assert store.is_compact() and LEGACY_EXAMPLES_TABLE not in store.table_names()
    assert every_example(db).equals(before)
    assert every_example(db).equals(every_example(compact_db))


def test_a_killed_upgrade_resumes_and_loses_nothing(both_layouts, tmp_path, monkeypatch):
    _, wide_db = both_layouts
    db = tmp_path / "db"
    shutil.copytree(wide_db, db)
    before = every_example(db)
    real_write = FeatureStore.write_examples
    written = []

    def write_then_die(self, coder_id, model, batches):
        if written:
            raise KeyboardInterrupt  # killed after the first coder
        real_write(self, coder_id, model, batches)
        written.append(coder_id)

    monkeypatch.setattr(FeatureStore, "write_examples", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        FeatureStore(db)
    assert LEGACY_EXAMPLES_TABLE in FeatureStore(db, read_only=True).table_names()
    assert every_example(db).equals(before)  # still read as it was
    monkeypatch.setattr(FeatureStore, "write_examples", real_write)
    resumed = []
    real_upgrade = upgrade_module.upgrade_examples

    def counting(store, **kwargs):
        count = real_upgrade(store, **kwargs)
        resumed.append(count)
        return count

    monkeypatch.setattr(upgrade_module, "upgrade_examples", counting)
    result = CliRunner().invoke(main, ["upgrade", str(db)])
    assert result.exit_code == 0, result.output
    assert resumed == [1]  # only the coder not done before
    assert FeatureStore(db, read_only=True).is_compact()
    assert every_example(db).equals(before)


def test_upgrade_of_a_current_catalogue_says_so(model_catalogue, tmp_path):  # noqa: F811
    db = tmp_path / "db"
    shutil.copytree(model_catalogue, db)
    result = CliRunner().invoke(main, ["upgrade", str(db)])
    assert result.exit_code == 0 and "already" in result.output
    missing = CliRunner().invoke(main, ["upgrade", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and len(missing.output.strip().splitlines()) == 1


# --- the store: contexts shared, ids that do not resolve, streams -----------------------------


def coder(coder_id: str, width: int = 4, model: str = "m") -> dict:
    return {"coder_id": coder_id, "model": model, "hook": "model.layers.0.output", "hook_out": "model.layers.0.output",
            "site": "res", "layer": 0, "architecture": "relu", "kind": "sae", "d_in": 2, "d_out": 2, "width": width,
            "source": "here", "tokens_indexed": 1, "contexts_indexed": 1, "context": 4, "top_k": 2}


def feature_table(coder_id: str, width: int = 4):
    from catalogue_fixtures import empty_columns

    features, _ = empty_columns()
    for f in range(width):
        row = dict(coder_id=coder_id, feature=f, model="m", layer=0, hook="model.layers.0.output", site="res",
                   active_count=1, density=0.1, max_activation=1.0, mean_activation=0.5, std_activation=0.1,
                   hist_counts=[1], hist_max=1.0, top_logit_tokens=[], top_logit_ids=[], top_logit_values=[],
                   bottom_logit_tokens=[], bottom_logit_ids=[], bottom_logit_values=[], neighbours=[],
                   neighbour_cosines=[], top_tokens=[], top_token_counts=[], description=None,
                   description_method=None, description_model=None, embedding_model=None, vector=None,
                   layer_write=None)
        for name, value in row.items():
            features.setdefault(name, []).append(value)
    return features


def wide_rows(coder_id: str, contexts: list[tuple[list[int], list[str]]], width: int = 4) -> dict:
    rows = {name: [] for name in examples_schema().names}
    rng = np.random.default_rng(len(coder_id))
    for feature in range(width):
        for rank, (ids, strings) in enumerate(contexts):
            values = [float(v) if v > 0.5 else 0.0 for v in rng.random(len(ids))]
            values[rank % len(ids)] = 2.0 + feature
            row = dict(coder_id=coder_id, feature=feature, kind="top", rank=rank, bin_min=None, bin_max=None,
                       tokens=strings, token_ids=ids, values=values, max_value=max(values),
                       max_position=int(np.argmax(values)), doc_id=f"doc{rank}", context_index=rank)
            for name, value in row.items():
                rows[name].append(value)
    return rows


CONTEXTS = [([2, 5, 7], ["<bos>", " the", " cat"]), ([2, 9, 5, 11], ["<bos>", " a", " the", "!"])]


def read_back(store: FeatureStore, coder_id: str) -> list[dict]:
    return store.examples(coder_id).to_dicts()


def test_contexts_are_stored_once_for_every_coder_that_shows_them(tmp_path):
    store = FeatureStore(tmp_path / "db")
    for coder_id in ("a", "b"):
        store.write_coder(coder(coder_id), feature_table(coder_id), wide_rows(coder_id, CONTEXTS))
    assert store.table(CONTEXTS_TABLE).count_rows() == len(CONTEXTS)
    assert store.table(VOCABULARY_TABLE).count_rows() == 5  # ids 2, 5, 7, 9, 11, once each
    expected = wide_rows("a", CONTEXTS)
    got = read_back(store, "a")
    assert [r["tokens"] for r in got] == expected["tokens"]
    assert [r["values"] for r in got] == [np.float32(v).tolist() for v in expected["values"]]  # float32, exactly


def test_ids_that_do_not_resolve_keep_their_strings(tmp_path):
    store = FeatureStore(tmp_path / "db")
    store.write_coder(coder("a"), feature_table("a"), wide_rows("a", CONTEXTS))
    # an import without ids (-1), and a pair that disagrees with the stored vocabulary (5 -> " dog")
    odd = [([-1, -1], ["x", "y"]), ([2, 5, 7], ["<bos>", " dog", " cat"])]
    store.write_coder(coder("b"), feature_table("b"), wide_rows("b", odd))
    assert [r["tokens"] for r in read_back(store, "b")] == wide_rows("b", odd)["tokens"]
    assert [r["tokens"] for r in read_back(store, "a")] == wide_rows("a", CONTEXTS)["tokens"]


def test_a_bad_batch_in_a_stream_is_its_own_error_and_changes_nothing(tmp_path):
    store = FeatureStore(tmp_path / "db")
    store.write_coder(coder("a"), feature_table("a"), wide_rows("a", CONTEXTS))
    before = read_back(store, "a")
    good = pa.table(wide_rows("a", CONTEXTS[:1]), schema=examples_schema())
    bad = good.set_column(good.schema.get_field_index("kind"), "kind", pa.array(["odd"] * good.num_rows))

    with pytest.raises(StoreError, match="kind 'odd'"):
        store.write_coder(coder("a"), [pa.table(feature_table("a"))], iter([good, bad]))
    assert read_back(FeatureStore(tmp_path / "db", read_only=True), "a") == before


def test_compact_rows_are_checked(tmp_path):
    store = FeatureStore(tmp_path / "db")
    rows = example_activations_schema().empty_table()
    bad = pa.table({**{n: rows[n] for n in rows.column_names}}).append_column("extra", pa.array([], pa.int32()))
    with pytest.raises(StoreError, match="compact rows"):
        store.write_coder(coder("a"), feature_table("a"), CompactExamples(iter([(store.contexts(np.zeros(0)), bad)])))
    assert "a" not in FeatureStore(tmp_path / "db", read_only=True).coders()["coder_id"].to_list()


def test_a_killed_write_leaves_its_coder_pending_and_the_next_write_replaces_it(tmp_path, monkeypatch):
    from featuredb.store import feature_store as feature_store_module
    from featuredb.store.schema import PENDING_TABLE

    store = FeatureStore(tmp_path / "db")
    real_replace = feature_store_module._replace_coder_rows

    def killed_before_listing(table, rows, key, coder_id, *rest):
        if table.name == "coders":
            raise KeyboardInterrupt  # like a kill: nothing is undone, examples and features stay
        real_replace(table, rows, key, coder_id, *rest)

    monkeypatch.setattr(feature_store_module, "_replace_coder_rows", killed_before_listing)
    with pytest.raises(KeyboardInterrupt):
        store.write_coder(coder("a"), feature_table("a"), wide_rows("a", CONTEXTS))
    assert store.table(PENDING_TABLE).count_rows() == 1
    monkeypatch.setattr(feature_store_module, "_replace_coder_rows", real_replace)
    store.write_coder(coder("a"), feature_table("a"), wide_rows("a", CONTEXTS))  # rewritten, not appended twice
    assert store.table(EXAMPLES_TABLE).count_rows() == 4 * len(CONTEXTS)
    assert store.table("features").count_rows() == 4
    assert store.table(PENDING_TABLE).count_rows() == 0
    assert [r["tokens"] for r in read_back(store, "a")] == wide_rows("a", CONTEXTS)["tokens"]
