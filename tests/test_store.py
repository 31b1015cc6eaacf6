"""Tests of featuredb.store: schemas, safe filters, and FeatureStore write/read/replace semantics."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner
from lancedb.merge import LanceMergeInsertBuilder
from lancedb.table import LanceTable

from featuredb.cli import main
from featuredb.store.schema import COOCCURRENCE_COLUMNS
from featuredb.store import (
    FeatureStore,
    Filter,
    StoreError,
    EXAMPLES_TABLE,
    examples_schema,
    features_schema,
    coders_schema,
    sql_literal,
)
from featuredb.store import decoder_vectors as decoder_vectors_module
from featuredb.store import feature_store as feature_store_module
from featuredb.store.decoder_vectors import write_decoder_vectors
from featuredb.store.descriptions import current_descriptions, sync_features, write_descriptions
from featuredb.store.failures import is_io_failure, reason, writing
from featuredb.store.schema import contexts_schema, example_activations_schema, vocabulary_schema
from featuredb.store.schema import conform_table

DIM = 4
CREATED = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
TRICKY_IDS = [
    "it's",
    "' OR 1=1 --",
    "x' OR 'a'='a",
    '"; DROP TABLE features; --',
    "back\\slash\\",
    "back\\' quote",
    "ünïcødé/😀",
    "%_*",
]


# --- builders of small coders ------------------------------------------------------------------


def make_sae(coder_id: str, width: int = 4, **overrides) -> dict:
    sae = dict(
        coder_id=coder_id, model="tiny-model", hook="blocks.1.hook_resid_post", hook_out="blocks.1.hook_resid_post",
        site="res", layer=1, architecture="jumprelu", kind="sae", d_in=8, d_out=8, width=width,
        source="local:test", tokens_indexed=1000, contexts_indexed=50, context=3, top_k=2, created_at=CREATED, layers=None, cooccurrence_tokens=None,
    )
    sae.update(overrides)
    return sae


def make_features(coder_id: str, indices: list[int], *, seed: int = 0) -> dict:
    n = len(indices)
    # Values are multiples of 1/8 so they survive float32 storage exactly.
    v = [((i + seed) % 8) / 8 for i in indices]
    return {
        "coder_id": [coder_id] * n, "feature": indices, "model": ["tiny-model"] * n, "layer": [1] * n,
        "hook": ["blocks.1.hook_resid_post"] * n, "site": ["res"] * n,
        "active_count": [10 * i for i in indices], "density": [x / 2 for x in v],
        "max_activation": [x + 1 for x in v], "mean_activation": v, "std_activation": v,
        "hist_counts": [[i, 1, 0] for i in indices], "hist_max": [x + 1 for x in v],
        "top_logit_tokens": [["a", "b"]] * n, "top_logit_ids": [[1, 2]] * n, "top_logit_values": [[0.5, 0.25]] * n,
        "bottom_logit_tokens": [["z"]] * n, "bottom_logit_ids": [[9]] * n, "bottom_logit_values": [[-0.5]] * n,
        "neighbours": [[(i + 1) % 4] for i in indices], "neighbour_cosines": [[0.75]] * n,
        "top_tokens": [["the", "cat"]] * n, "top_token_counts": [[3, 1]] * n,
        "description": [f"feature {i} (seed {seed})" if i % 2 == 0 else None for i in indices],
        "description_method": ["test" if i % 2 == 0 else None for i in indices],
        "description_model": [None] * n,
        "embedding_model": ["emb" if i % 2 == 0 else None for i in indices],
        "vector": [[x, 0.0, 1.0, -x] if i % 2 == 0 else None for i, x in zip(indices, v)],
    }


def make_examples(coder_id: str, indices: list[int], *, top: int = 2, interval: int = 1) -> dict:
    rows: dict[str, list] = {name: [] for name in examples_schema().names}
    for i in indices:
        for kind, count in (("top", top), ("interval", interval)):
            for rank in range(count):
                rows["coder_id"].append(coder_id)
                rows["feature"].append(i)
                rows["kind"].append(kind)
                rows["rank"].append(rank)
                rows["bin_min"].append(None if kind == "top" else 0.25)
                rows["bin_max"].append(None if kind == "top" else 0.5)
                rows["tokens"].append(["the", "cat", f"t{rank}"])
                rows["token_ids"].append([5, 6, 7 + rank])
                rows["values"].append([0.0, 0.5, 1.0 + rank])
                rows["max_value"].append(1.0 + rank)
                rows["max_position"].append(2)
                rows["doc_id"].append(f"doc{i}-{kind}-{rank}")
                rows["context_index"].append(100 * i + rank)
    return rows


def write(store: FeatureStore, coder_id: str, indices=(0, 1, 2, 3), *, top: int = 2, interval: int = 1, seed: int = 0):
    indices = list(indices)
    store.write_coder(
        make_sae(coder_id),
        make_features(coder_id, indices, seed=seed),
        make_examples(coder_id, indices, top=top, interval=interval),
    )


def expected_frame(columns: dict, schema: pa.Schema, sort_by: list[str]) -> pl.DataFrame:
    return pl.from_arrow(conform_table(columns, schema, "expected")).sort(sort_by)  # absent optional columns: null


def db_snapshot(path: Path) -> dict[str, str]:
    """Every file under the database directory with a hash of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def store(tmp_path) -> FeatureStore:
    return FeatureStore(tmp_path / "db", vector_dim=DIM)


# --- schemas ---------------------------------------------------------------------------------


def test_tables_are_created_with_exact_schemas(store):
    assert store.table_names() == []
    write(store, "sae-a")
    assert store.table_names() == ["coders", "contexts", "example_activations", "features", "pending_writes", "vocabulary"]
    assert store.table("coders").schema.equals(coders_schema())
    assert store.table("features").schema.equals(features_schema(DIM))
    assert store.table(EXAMPLES_TABLE).schema.equals(example_activations_schema())
    assert store.table("contexts").schema.equals(contexts_schema())
    assert store.table("vocabulary").schema.equals(vocabulary_schema())
    assert features_schema().field("vector").type == pa.list_(pa.float16(), 384)  # half the bytes, same neighbours
    assert coders_schema().field("created_at").type == pa.timestamp("us", tz="UTC")


def test_empty_store_reads_return_typed_empty_frames(store):
    assert store.coders().shape == (0, len(coders_schema()))
    assert store.coders().schema == pl.from_arrow(coders_schema().empty_table()).schema
    assert store.features().columns == features_schema(DIM).names
    assert store.examples("nope").is_empty()
    assert store.feature_row("nope", 0) is None
    with pytest.raises(StoreError, match="no table named"):
        store.table("features")


# --- round trips -----------------------------------------------------------------------------


def test_write_then_read_back_equal(store):
    indices = [0, 1, 2, 3]
    features, examples = make_features("sae-a", indices), make_examples("sae-a", indices)
    store.write_coder(make_sae("sae-a"), features, examples)

    saes = store.coders()
    assert saes.to_dicts() == [make_sae("sae-a")]
    assert store.features("sae-a").equals(expected_frame(features, features_schema(DIM), ["feature"]))
    assert store.examples("sae-a").equals(
        expected_frame(examples, examples_schema(), ["feature", "kind", "rank"])
    )
    row = store.feature_row("sae-a", 2)
    assert row == {name: values[2] for name, values in features.items()} | {"layer_write": None} | dict.fromkeys(
        COOCCURRENCE_COLUMNS) | {"description_score": None, "description_score_method": None}
    assert store.feature_row("sae-a", 1)["vector"] is None and store.feature_row("sae-a", 1)["description"] is None
    assert store.feature_row("sae-a", 7) is None

    only = store.examples("sae-a", feature=1, kind="interval")
    assert only.select("feature", "kind", "rank").rows() == [(1, "interval", 0)]
    assert store.features("sae-a", columns=["density", "feature"]).columns == ["density", "feature"]


def test_accepts_arrow_tables_and_numpy_vector_matrix(store):
    indices = [0, 1, 2]
    features = make_features("sae-a", indices)
    features["vector"] = np.arange(3 * DIM, dtype=np.float64).reshape(3, DIM)  # cast to float32
    features["feature"] = np.array(indices, dtype=np.int32)  # widened to int64
    examples = pa.table(make_examples("sae-a", indices))
    store.write_coder(make_sae("sae-a", width=3), features, examples)
    assert store.feature_row("sae-a", 1)["vector"] == [4.0, 5.0, 6.0, 7.0]
    assert store.examples("sae-a").height == examples.num_rows


def test_created_at_defaults_to_now(store):
    sae = make_sae("sae-a")
    del sae["created_at"]
    store.write_coder(sae, make_features("sae-a", [0]), make_examples("sae-a", [0]))
    created = store.coders()["created_at"][0]
    assert abs(created - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=1)


# --- replacing a coder -----------------------------------------------------------------------


def test_rewrite_with_fewer_rows_leaves_no_stale_rows_or_duplicates(store):
    write(store, "sae-a", [0, 1, 2, 3], top=3, interval=2)
    assert store.examples("sae-a").height == 4 * 5

    write(store, "sae-a", [0, 2], top=1, interval=0, seed=5)
    examples = store.examples("sae-a")
    assert examples.select("feature", "kind", "rank").rows() == [(0, "top", 0), (2, "top", 0)]
    assert store.features("sae-a")["feature"].to_list() == [0, 2]
    assert store.features("sae-a")["description"].to_list() == ["feature 0 (seed 5)", "feature 2 (seed 5)"]
    assert store.coders().height == 1
    assert store.table(EXAMPLES_TABLE).count_rows() == 2

    write(store, "sae-a", [0, 2], top=1, interval=0, seed=5)  # idempotent
    assert store.table(EXAMPLES_TABLE).count_rows() == 2
    assert store.table("features").count_rows() == 2
    assert store.table("coders").count_rows() == 1


def test_coders_are_independent(store):
    write(store, "sae-a")
    write(store, "sae-b", [0, 1, 2])
    b_before = (store.features("sae-b"), store.examples("sae-b"))

    write(store, "sae-a", [1], top=1, interval=0)
    assert store.features("sae-b").equals(b_before[0]) and store.examples("sae-b").equals(b_before[1])
    assert store.features("sae-a")["feature"].to_list() == [1]

    store.delete_coder("sae-a")
    assert store.coders()["coder_id"].to_list() == ["sae-b"]
    assert store.features("sae-a").is_empty() and store.examples("sae-a").is_empty()
    assert store.features("sae-b").equals(b_before[0]) and store.examples("sae-b").equals(b_before[1])
    store.delete_coder("never-written")  # no-op


def _missing_column(sae, features, examples):
    del features["density"]


def _extra_column(sae, features, examples):
    examples["surprise"] = [1] * len(examples["coder_id"])


def _foreign_sae_id_in_features(sae, features, examples):
    features["coder_id"][1] = "sae-b"


def _foreign_sae_id_in_examples(sae, features, examples):
    examples["coder_id"][-1] = "sae-b"


def _duplicate_feature_index(sae, features, examples):
    features["feature"][1] = features["feature"][0]


def _string_for_int(sae, features, examples):
    sae["layer"] = "1"


def _null_in_required_column(sae, features, examples):
    features["hook"][0] = None


def _duplicate_example_key(sae, features, examples):
    examples["rank"][1] = examples["rank"][0]


def _example_for_unknown_feature(sae, features, examples):
    examples["feature"][0] = 3


def _bad_site(sae, features, examples):
    sae["site"] = "resid"


def _feature_index_beyond_width(sae, features, examples):
    sae["width"] = 2


def _vector_with_wrong_dim(sae, features, examples):
    features["vector"][0] = [1.0, 2.0]


def _top_example_with_bin(sae, features, examples):
    examples["bin_min"][0] = 0.5


def _control_character_in_sae_id(sae, features, examples):
    for rows in (features, examples):
        rows["coder_id"] = ["sae\n-a"] * len(rows["coder_id"])
    sae["coder_id"] = "sae\n-a"


@pytest.mark.parametrize(
    "spoil",
    [
        _missing_column, _extra_column, _foreign_sae_id_in_features, _foreign_sae_id_in_examples,
        _duplicate_feature_index, _string_for_int, _null_in_required_column, _duplicate_example_key,
        _example_for_unknown_feature, _bad_site, _feature_index_beyond_width, _vector_with_wrong_dim,
        _top_example_with_bin, _control_character_in_sae_id,
    ],
)
def test_bad_input_raises_and_leaves_db_untouched(store, spoil):
    refused_and_untouched(store, spoil)


def refused_and_untouched(store: FeatureStore, spoil) -> str:
    """Write two coders, then a spoiled rewrite of one: one StoreError line, every file as it was."""
    write(store, "sae-a", [0, 1, 2, 3])
    write(store, "sae-b", [0, 1])
    before_files = db_snapshot(Path(store.uri))
    before = (store.coders(), store.features(), store.examples("sae-a"), store.examples("sae-b"))

    sae, features, examples = make_sae("sae-a"), make_features("sae-a", [0, 1, 2]), make_examples("sae-a", [0, 1, 2])
    spoil(sae, features, examples)
    with pytest.raises(StoreError) as error:
        store.write_coder(sae, features, examples)
    assert "\n" not in str(error.value).replace("\\n", "")

    assert db_snapshot(Path(store.uri)) == before_files
    after = (store.coders(), store.features(), store.examples("sae-a"), store.examples("sae-b"))
    assert all(a.equals(b) for a, b in zip(after, before))
    return str(error.value)


NON_FINITE_COLUMNS = [  # (table, column, row): every float column, scalar or list, of both tables
    ("features", "density", 2), ("features", "max_activation", 1), ("features", "mean_activation", 0),
    ("features", "std_activation", 2), ("features", "hist_max", 1), ("features", "top_logit_values", 2),
    ("features", "bottom_logit_values", 1), ("features", "neighbour_cosines", 2),
    ("examples", "values", 4), ("examples", "max_value", 3), ("examples", "bin_min", 2), ("examples", "bin_max", 5),
]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("table, column, row", NON_FINITE_COLUMNS)
def test_non_finite_statistics_are_refused_naming_column_and_row(store, table, column, row, value):
    def spoil(sae, features, examples):
        rows = features if table == "features" else examples
        rows[column] = list(rows[column])  # make_features shares one list between columns
        cell = rows[column][row]
        rows[column][row] = [*cell[:-1], value] if isinstance(cell, list) else value

    message = refused_and_untouched(store, spoil)
    assert f"column {column!r} holds {value} in row {row}" in message, message


def test_null_stays_the_way_to_say_absent(store):
    """Absent values are null (bins of top examples, vectors), and a never-fired feature has 0
    statistics, as the indexer writes them: still accepted."""
    features = make_features("sae-a", [0, 1])
    for name in ("density", "max_activation", "mean_activation", "std_activation", "hist_max"):
        features[name][1] = 0.0
    store.write_coder(make_sae("sae-a"), features, make_examples("sae-a", [0, 1]))
    assert store.examples("sae-a", kind="top")["bin_min"].null_count() == 4


def test_bad_first_write_creates_no_tables(store):
    features = make_features("sae-a", [0, 1])
    features["feature"] = [0, 0]
    with pytest.raises(StoreError, match="duplicate feature"):
        store.write_coder(make_sae("sae-a"), features, make_examples("sae-a", [0]))
    assert store.table_names() == []


def test_failure_during_write_restores_committed_tables(store, monkeypatch):
    write(store, "sae-a", [0, 1, 2, 3], top=3)
    before = (store.coders(), store.features(), store.examples("sae-a"))
    real_replace = feature_store_module._replace_coder_rows

    def fail_on_features(table, rows, key, coder_id, *rest):
        if table.name == "features":
            raise RuntimeError("disk full")
        real_replace(table, rows, key, coder_id, *rest)

    monkeypatch.setattr(feature_store_module, "_replace_coder_rows", fail_on_features)
    with pytest.raises(RuntimeError, match="disk full"):
        write(store, "sae-a", [0], top=1, seed=3)
    after = (store.coders(), store.features(), store.examples("sae-a"))
    assert all(a.equals(b) for a, b in zip(after, before))


# --- the environment fails: a full disk, a read-only directory, an object store out of reach --------

# A full disk as Python raises it, and as LanceDB does (measured on a full tmpfs).
DISK_FULL = {
    "OSError": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "LanceDB": lambda: RuntimeError("lance error: LanceError(IO): No space left on device (os error 28), "
                                    "/root/.cargo/registry/src/lance-file-13.0.0/src/writer/structural.rs:191:9"),
}


def stored_rows(store: FeatureStore) -> tuple[pl.DataFrame, ...]:
    return store.coders(), store.features(), store.examples("sae-a")


def same_rows(a: tuple[pl.DataFrame, ...], b: tuple[pl.DataFrame, ...]) -> bool:
    return all(x.equals(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("raised", list(DISK_FULL))
def test_full_disk_while_writing_a_coder_is_one_store_error_and_changes_nothing(store, monkeypatch, raised):
    write(store, "sae-a", [0, 1, 2, 3], top=3)
    before = stored_rows(store)
    real_replace = feature_store_module._replace_coder_rows

    def disk_full_at_the_last_table(table, rows, key, coder_id, *rest):
        if table.name == "coders":  # examples and features are committed by then: both are undone
            raise DISK_FULL[raised]()
        real_replace(table, rows, key, coder_id, *rest)

    monkeypatch.setattr(feature_store_module, "_replace_coder_rows", disk_full_at_the_last_table)
    with pytest.raises(StoreError) as error:
        write(store, "sae-a", [0], top=1, seed=3)
    message = str(error.value)
    assert message.startswith(f"could not write coder 'sae-a' to {store.uri}: No space left on device"), message
    assert ".rs:" not in message and "\n" not in message
    assert same_rows(stored_rows(store), before)


def test_full_disk_while_writing_decoder_vectors_undoes_the_removal_of_the_old_ones(store, monkeypatch):
    write(store, "sae-a")
    write_decoder_vectors(store, "sae-a", np.eye(4, 8, dtype=np.float32))
    before = store.table("decoders_8").to_arrow().sort_by("feature")

    def disk_full(table, coder_id, rows):
        raise DISK_FULL["LanceDB"]()

    monkeypatch.setattr(decoder_vectors_module, "_replace_rows_of", disk_full)
    with pytest.raises(StoreError, match=r"^could not write decoder vectors of coder 'sae-a' to .*: No space left"):
        write_decoder_vectors(store, "sae-a", np.eye(4, 16, dtype=np.float32))  # its 8-wide rows go first
    assert store.table("decoders_8").to_arrow().sort_by("feature").equals(before)
    assert store.table("decoders_16").count_rows() == 0


def description_rows(coder_id: str, features: list[int]) -> list[dict]:
    return [dict(coder_id=coder_id, feature=f, description=f"cats {f}", method="manual", prompt_version="v1",
                 created_at=CREATED, indexed_at=CREATED) for f in features]


def fake_embedder(texts: list[str], model: str) -> np.ndarray:
    return np.ones((len(texts), DIM), dtype=np.float32) / 2


def describe_on_a_full_disk(store: FeatureStore, monkeypatch, lancedb_class: type, method: str) -> str:
    """The error of write_descriptions when LanceDB's `lancedb_class.method` finds the disk full;
    the feature rows are checked unchanged."""
    write(store, "sae-a")
    features_before = store.features()

    def disk_full(*args, **kwargs):
        raise DISK_FULL["LanceDB"]()

    monkeypatch.setattr(lancedb_class, method, disk_full)
    with pytest.raises(StoreError) as error:
        write_descriptions(store, "sae-a", description_rows("sae-a", [0, 1]), embedding_model="emb",
                           embedder=fake_embedder)
    monkeypatch.undo()
    assert store.features().equals(features_before)
    return str(error.value)


def test_full_disk_while_recording_descriptions_records_none(store, monkeypatch):
    message = describe_on_a_full_disk(store, monkeypatch, LanceTable, "add")
    assert message == f"could not write descriptions of coder 'sae-a' to {store.uri}: No space left on device (os error 28)"
    assert current_descriptions(store, "sae-a") == []


def test_full_disk_while_updating_features_leaves_them_for_the_next_sync(store, monkeypatch):
    message = describe_on_a_full_disk(store, monkeypatch, LanceMergeInsertBuilder, "execute")
    assert message.startswith(f"could not write the description columns of coder 'sae-a' to {store.uri}: No space")
    # the descriptions were recorded first (append-only history): the next sync brings them in
    sync_features(store, "sae-a", embedding_model="emb", embedder=fake_embedder)
    assert store.feature_row("sae-a", 1)["description"] == "cats 1"


def deny_writes(directory: Path, monkeypatch) -> None:
    """`directory` as on a read-only mount (we run as root: chmod would not stop us writing)."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).absolute() == Path(directory).absolute():
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_read_only_directory_is_refused_by_a_writable_open_and_read_by_a_read_only_one(tmp_path, monkeypatch):
    db = tmp_path / "db"
    write(FeatureStore(db, vector_dim=DIM), "sae-a")
    before = db_snapshot(db)
    deny_writes(db, monkeypatch)
    with pytest.raises(StoreError, match=f"^cannot write to the catalogue {db}: its directory is read-only$"):
        FeatureStore(db, vector_dim=DIM)
    assert FeatureStore(db, vector_dim=DIM, read_only=True).coders()["coder_id"].to_list() == ["sae-a"]
    assert db_snapshot(db) == before


def without_aws_settings(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no wait for an instance's credentials


NO_CREDENTIALS_URI = "s3://featuredb-test-no-such-bucket/catalogue"


def test_s3_catalogue_without_aws_settings_is_one_store_error(monkeypatch):
    without_aws_settings(monkeypatch)
    for read_only in (True, False):
        with pytest.raises(StoreError) as error:
            FeatureStore(NO_CREDENTIALS_URI, read_only=read_only)
        message = str(error.value)
        assert message.startswith(f"cannot open the catalogue {NO_CREDENTIALS_URI}: "), message
        assert "not set: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION" in message
        assert "\n" not in message and len(message) < 300


def test_cli_search_of_an_s3_catalogue_without_aws_settings_is_one_line(monkeypatch):
    without_aws_settings(monkeypatch)
    result = CliRunner().invoke(main, ["search", "cats", "--db", NO_CREDENTIALS_URI])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.output
    assert NO_CREDENTIALS_URI in result.stderr and "not set: AWS_ACCESS_KEY_ID" in result.stderr


@pytest.mark.parametrize("error, said", [
    (ValueError('Invalid input, Failed to connect to namespace: IO { source: Generic { store: "N/A", source: IO { '
                'source: "Failed to get AWS credentials: ProviderError(...)" } } }'), "no AWS credentials found"),
    (RuntimeError("lance error: LanceError(IO): Generic S3 error: Failed to resolve region for bucket 'b', "
                  "/root/.cargo/registry/src/lance-io-13.0.0/src/object_store/providers/aws.rs:319:13"),
     "cannot tell the bucket's region"),
    (RuntimeError('lance error: LanceError(IO): Read-only file system (os error 30) at path "/db/x.lance/.tmp1", '
                  "/root/.cargo/registry/src/lance-io-13.0.0/src/object_store.rs:1006:34"),
     'Read-only file system (os error 30) at path "/db/x.lance/.tmp1"'),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
     "No space left on device (os error 28)"),
    (PermissionError(errno.EACCES, "Permission denied", "/db/coders.lance"), "Permission denied: /db/coders.lance"),
])
def test_reason_keeps_what_a_user_can_act_on(error, said):
    assert is_io_failure(error) or "credentials" in said or "region" in said
    assert reason(error) == said


def test_only_io_failures_are_translated():
    assert not is_io_failure(RuntimeError("disk full"))  # a bug, not the environment: its traceback stays
    assert not is_io_failure(StoreError("features: bad value (os error 28)"))  # already ours
    with pytest.raises(KeyError):
        with writing("rows", "/db"):
            raise KeyError("no such column")


# --- locations and modes ---------------------------------------------------------------------


def test_path_that_is_a_file_is_rejected(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("hello")
    with pytest.raises(StoreError, match="database path is a file: .*not-a-dir"):
        FeatureStore(path)
    with pytest.raises(StoreError, match="database path is a file"):
        FeatureStore(str(path), read_only=True)


def test_read_only(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore(tmp_path / "missing", read_only=True)
    assert not (tmp_path / "missing").exists()
    write(FeatureStore(tmp_path / "db", vector_dim=DIM), "sae-a")
    reader = FeatureStore(tmp_path / "db", vector_dim=DIM, read_only=True)
    assert reader.coders()["coder_id"].to_list() == ["sae-a"]
    with pytest.raises(StoreError, match="read-only"):
        write(reader, "sae-b")
    with pytest.raises(StoreError, match="read-only"):
        reader.delete_coder("sae-a")


def test_vector_dim_mismatch_is_refused_before_writing(tmp_path):
    write(FeatureStore(tmp_path / "db", vector_dim=DIM), "sae-a")
    other = FeatureStore(tmp_path / "db", vector_dim=8)
    features = make_features("sae-b", [0])
    features["vector"] = [[0.0] * 8]
    with pytest.raises(StoreError, match="different schema"):
        other.write_coder(make_sae("sae-b"), features, make_examples("sae-b", [0]))
    assert other.coders()["coder_id"].to_list() == ["sae-a"]


def test_directory_is_created(tmp_path):
    store = FeatureStore(tmp_path / "a" / "b")
    assert Path(store.uri).is_dir() and Path(store.uri).is_absolute()


# --- SQL-looking values ----------------------------------------------------------------------


def test_sql_looking_sae_ids_are_plain_values_in_every_read(store):
    write(store, "plain", [0, 1, 2, 3])
    for i, coder_id in enumerate(TRICKY_IDS):
        write(store, coder_id, [0, 1], top=1 + i % 2)
    assert sorted(store.coders()["coder_id"].to_list()) == sorted(TRICKY_IDS + ["plain"])

    for i, coder_id in enumerate(TRICKY_IDS):
        assert store.features(coder_id)["coder_id"].unique().to_list() == [coder_id]
        assert store.features(coder_id).height == 2
        assert store.feature_row(coder_id, 1)["coder_id"] == coder_id
        examples = store.examples(coder_id)
        assert examples["coder_id"].unique().to_list() == [coder_id] and examples.height == 2 * (2 + i % 2)
        assert store.examples(coder_id, 0, "top").height == 1 + i % 2

    # Injection attempts that are NOT stored match nothing (rather than everything).
    for probe in ["' OR '1'='1", "plain' --", "plain'", "PLAIN", "plain\\"]:
        assert store.features(probe).is_empty()
        assert store.feature_row(probe, 0) is None
        assert store.examples(probe).is_empty()

    store.delete_coder("' OR 1=1 --")
    assert "' OR 1=1 --" not in store.coders()["coder_id"].to_list()
    assert store.coders().height == len(TRICKY_IDS)
    assert store.features("plain").height == 4


def test_read_arguments_are_validated(store):
    write(store, "sae-a")
    with pytest.raises(StoreError, match="unknown example kind"):
        store.examples("sae-a", kind="top' OR 1=1 --")
    with pytest.raises(StoreError, match="unknown column"):
        store.features("sae-a", columns=["feature", "nope"])
    with pytest.raises(StoreError, match="invalid column name"):
        store.features("sae-a", columns=["feature; DROP"])
    with pytest.raises(StoreError, match="does not fit"):
        store.feature_row("sae-a", "1")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="control character"):
        store.features("sae-a\x00")


# --- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, literal",
    [
        ("plain", "'plain'"),
        ("it's", "'it''s'"),
        ("' OR 1=1 --", "''' OR 1=1 --'"),
        ('"; DROP TABLE x', "'\"; DROP TABLE x'"),
        ("a\\b", "'a\\b'"),
        ("ünï😀", "'ünï😀'"),
        (7, "7"),
        (-3, "-3"),
        (np.int32(5), "5"),
        (0.25, "0.25"),
        (1e-05, "1e-05"),
        (True, "true"),
        (False, "false"),
    ],
)
def test_sql_literal(value, literal):
    assert sql_literal(value) == literal


@pytest.mark.parametrize(
    "value", ["a\x00b", "line\nbreak", "tab\t", "\x7f", float("nan"), float("inf"), None, b"x", [1]]
)
def test_sql_literal_rejects(value):
    with pytest.raises(StoreError):
        sql_literal(value)


def test_filter_renders_validated_conjunction():
    schema = features_schema(DIM)
    base = Filter().eq("coder_id", "it's")
    assert Filter().render(schema) is None
    assert base.render(schema) == "(`coder_id` = 'it''s')"
    full = base.isin("layer", [1, 2]).between("density", 0.25).between("max_activation", None, 2)
    assert full.render(schema) == (
        "(`coder_id` = 'it''s') AND (`layer` IN (1, 2)) AND (`density` >= 0.25) AND (`max_activation` <= 2)"
    )
    assert base.render(schema) == "(`coder_id` = 'it''s')"  # builders return new filters
    assert Filter().between("feature", 1, 5).render(schema) == "(`feature` >= 1 AND `feature` <= 5)"
    assert Filter().isin("feature", []).render(schema) == "(false)"


def test_rendered_filters_run_in_lancedb(store):
    write(store, "it's", [0, 1, 2, 3])
    write(store, "other", [0, 1])
    table = store.table("features")

    def count(where: Filter) -> int:
        return table.count_rows(where.render(table.schema))

    assert count(Filter().eq("coder_id", "it's")) == 4
    assert count(Filter().eq("coder_id", "it's").isin("feature", [1, 3, 99])) == 2
    assert count(Filter().isin("feature", [])) == 0
    assert count(Filter().between("feature", 2)) == 2
    # densities are 0, 1/16, 1/8, 3/16 for "it's" and 0, 1/16 for "other"
    assert count(Filter().between("density", None, 0.125).eq("layer", 1)) == 5
    assert count(Filter().eq("coder_id", "it's' OR '1'='1")) == 0


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Filter().eq("nope", 1), "unknown column"),
        (lambda: Filter().eq("Feature", 1), "invalid column name"),
        (lambda: Filter().eq("feature = 1 OR 1", 1), "invalid column name"),
        (lambda: Filter().eq("layer", "1"), "does not fit"),
        (lambda: Filter().eq("feature", 1.5), "does not fit"),
        (lambda: Filter().eq("feature", True), "does not fit"),
        (lambda: Filter().eq("layer", 2**31), "out of range"),
        (lambda: Filter().eq("coder_id", 3), "does not fit"),
        (lambda: Filter().eq("hist_counts", 3), "cannot filter"),
        (lambda: Filter().isin("coder_id", "abc"), "collection"),
        (lambda: Filter().between("density"), "at least one bound"),
    ],
)
def test_filter_rejects_bad_columns_and_values(build, message):
    with pytest.raises(StoreError, match=message):
        build().render(features_schema(DIM))


# --- write speed (slow; run with `-m slow`) ----------------------------------------------------


def _lists(values, rows: int, per_row: int) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * per_row + 1, per_row, dtype=np.int32)), values)


def _big_coder(coder_id: str, n_features: int, examples_per_feature: int, context: int, dim: int):
    """Columnar random data shaped like a real coder (built with numpy; no Python-level rows)."""
    rng = np.random.default_rng(0)
    vocab = pa.array([f"tok{i}" for i in range(5000)])
    n, k = n_features, 10
    sae = make_sae(coder_id, width=n, context=context)
    # Repeat one small feature row n times, then randomise the columns that matter for size.
    features = {name: pa.array(values * n) for name, values in make_features(coder_id, [0]).items()}
    features.update(
        feature=np.arange(n), active_count=rng.integers(0, 1000, n), density=rng.random(n),
        hist_counts=_lists(pa.array(rng.integers(0, 100, n * 32)), n, 32),
        top_logit_tokens=_lists(vocab.take(rng.integers(0, 5000, n * k)), n, k),
        neighbours=_lists(pa.array(rng.integers(0, n, n * k)), n, k),
        vector=rng.random((n, dim), dtype=np.float32),
    )
    m = n * examples_per_feature
    rank = np.tile(np.arange(examples_per_feature, dtype=np.int32), n)
    examples = {
        "coder_id": pa.array([coder_id] * m), "feature": np.repeat(np.arange(n), examples_per_feature),
        "kind": pa.array(["top"] * m), "rank": rank, "bin_min": pa.nulls(m, pa.float32()),
        "bin_max": pa.nulls(m, pa.float32()),
        "tokens": _lists(vocab.take(rng.integers(0, 5000, m * context)), m, context),
        "token_ids": _lists(pa.array(rng.integers(0, 5000, m * context, dtype=np.int32)), m, context),
        "values": _lists(pa.array(rng.random(m * context, dtype=np.float32)), m, context),
        "max_value": rng.random(m, dtype=np.float32), "max_position": np.zeros(m, np.int32),
        "doc_id": pa.array(["doc"] * m), "context_index": np.arange(m),
    }
    return sae, features, examples


@pytest.mark.slow
def test_write_speed_100k_features_1m_examples(tmp_path):
    import time

    store = FeatureStore(tmp_path / "db")
    sae, features, examples = _big_coder("big", 100_000, 10, 128, 384)
    for attempt in ("first write", "rewrite"):
        start = time.perf_counter()
        store.write_coder(sae, features, examples)
        print(f"{attempt}: {time.perf_counter() - start:.1f}s")
    assert store.table(EXAMPLES_TABLE).count_rows() == 1_000_000
    assert store.table("features").count_rows() == 100_000


def test_catalogue_with_the_old_names_is_upgraded_on_a_writable_open(tmp_path):
    db = tmp_path / "db"
    write(FeatureStore(db, vector_dim=DIM), "sae-a")
    before = {name: FeatureStore(db, vector_dim=DIM).table(name).to_arrow() for name in ("coders", "features", EXAMPLES_TABLE)}
    # as featuredb 0.1 wrote it: a `saes` table and `sae_id` columns
    import lancedb

    raw = lancedb.connect(db)
    raw.create_table("saes", raw.open_table("coders").to_arrow().rename_columns(
        ["sae_id" if n == "coder_id" else n for n in coders_schema().names]))
    raw.drop_table("coders")
    for name in ("features", EXAMPLES_TABLE):
        raw.open_table(name).alter_columns({"path": "coder_id", "rename": "sae_id"})

    with pytest.raises(StoreError, match="older featuredb.*featuredb describe --db"):
        FeatureStore(db, vector_dim=DIM, read_only=True)
    upgraded = FeatureStore(db, vector_dim=DIM)
    assert upgraded.table_names() == ["coders", "contexts", "example_activations", "features", "pending_writes", "vocabulary"]
    for name, frame in before.items():
        assert upgraded.table(name).to_arrow().equals(frame), name
    assert FeatureStore(db, vector_dim=DIM, read_only=True).feature_row("sae-a", 0)["coder_id"] == "sae-a"
