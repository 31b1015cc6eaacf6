"""What `featuredb index` refuses or cleans up before and after a run: coders already in the
catalogue (--replace), statistics that cannot fit in memory, settings no run can use, the work dir
of a failed run, and a model path that only worked from one directory."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import featuredb.indexer.preflight as preflight
import featuredb.indexer.run as run_module
from featuredb.cli import main
from featuredb.describe import DescribeConfig, run_describe
from featuredb.indexer.run import IndexConfig, model_reference, run_index
from featuredb.indexer.stats import StatsConfig, state_bytes
from featuredb.store import FeatureStore

from coder_formats import write_gemma_scope_1
from test_describe import fake_embed
from test_index import CONTEXT, STATS, assert_same_catalogue, one_error_line, run_cli
from test_store import db_snapshot


@pytest.fixture()
def coders(tmp_path) -> list[str]:
    root = tmp_path / "coders"
    return [str(write_gemma_scope_1(root, "res", 1, 64, 48, fire_rate=0.1, seed=1)),
            str(write_gemma_scope_1(root, "transcoders", 0, 64, 40, fire_rate=0.1, seed=2))]


def config(model, coders, corpus, db, **kw) -> IndexConfig:
    return IndexConfig(model=str(model), coders=coders, corpus=str(corpus), db=str(db), context=CONTEXT,
                       batch_size=3, stats=STATS, progress=False, **kw)


@pytest.fixture()
def described_db(tiny_gemma2, coders, corpus_jsonl, tmp_path) -> Path:
    """A catalogue of the first coder, every feature labelled and embedded."""
    db = tmp_path / "db"
    run_index(config(tiny_gemma2, coders[:1], corpus_jsonl, db))
    run_describe(DescribeConfig(db=str(db), explainer="tokens", progress=False), embedder=fake_embed)
    return db


def no_model_loading(monkeypatch) -> None:
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the run was refused")

    monkeypatch.setattr(run_module, "load_model", load_model)


class Interrupt(Exception):
    pass


def interrupt_after(n: int):
    def on_batch(i: int) -> None:
        if i == n:
            raise Interrupt

    return on_batch


# ---------------------------------------------------------------------------- coders already stored


@pytest.mark.parametrize("model_fixture", ["tiny_gemma2", "tiny_llama"])  # the same model, or another one
def test_reindexing_a_stored_coder_is_refused_without_replace(described_db, coders, corpus_jsonl, request,
                                                             monkeypatch, model_fixture):
    before = db_snapshot(described_db)
    stored = FeatureStore(str(described_db)).coders().row(0, named=True)
    no_model_loading(monkeypatch)
    model = request.getfixturevalue(model_fixture)
    line = one_error_line(run_cli("-m", str(model), "-c", coders[1], "-c", coders[0], "--corpus", str(corpus_jsonl),
                                  "--db", str(described_db)))
    assert stored["coder_id"] in line and f"model {stored['model']}" in line and "--replace" in line
    assert "transcoders" not in line  # only the coder already there is named
    assert db_snapshot(described_db) == before  # not a byte changed, no work dir left


def test_replace_says_what_it_drops_then_reindexes(described_db, tiny_gemma2, coders, corpus_jsonl):
    store = FeatureStore(str(described_db))
    stored = store.coders().row(0, named=True)
    features = store.features(stored["coder_id"])
    described, embedded = features["description"].is_not_null().sum(), features["vector"].is_not_null().sum()
    assert described > 0 and embedded > 0
    result = run_cli("-m", str(tiny_gemma2), "-c", coders[0], "--corpus", str(corpus_jsonl), "--db", str(described_db),
                     "--replace")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith(f"replacing coder {stored['coder_id']} "), result.stderr
    assert f"model {stored['model']}" in notes[0] and f"{stored['created_at']:%Y-%m-%d}" in notes[0]
    assert f"its {described} description(s) and {embedded} embedding(s) are dropped" in notes[0]
    after = FeatureStore(str(described_db))
    assert after.coders()["created_at"][0] > stored["created_at"]
    assert after.features(stored["coder_id"])["description"].is_null().all()  # what the note said


def test_a_run_started_with_replace_resumes_without_it(described_db, tiny_gemma2, coders, corpus_jsonl, tmp_path):
    fresh = tmp_path / "fresh"
    run_index(config(tiny_gemma2, coders[:1], corpus_jsonl, fresh))
    replacing = config(tiny_gemma2, coders[:1], corpus_jsonl, described_db, replace=True, checkpoint_seconds=0)
    with pytest.raises(Interrupt):
        run_index(replacing, on_batch=interrupt_after(2))
    notes: list[str] = []
    run_index(dataclasses.replace(replacing, replace=False, resume=True), notify=notes.append)
    assert len(notes) == 1 and notes[0].startswith("replacing coder ")
    assert_same_catalogue(fresh, described_db)


def test_a_resumed_run_is_not_refused_the_coders_it_wrote_itself(tiny_gemma2, coders, corpus_jsonl, tmp_path,
                                                                 monkeypatch):
    db = tmp_path / "db"
    written = []
    real_write = run_module.write_decoder_vectors

    def fail_on_the_second_coder(store, coder_id, W_dec, **options):
        written.append(coder_id)
        if len(written) == 2:
            raise Interrupt
        return real_write(store, coder_id, W_dec, **options)

    monkeypatch.setattr(run_module, "write_decoder_vectors", fail_on_the_second_coder)
    with pytest.raises(Interrupt):
        run_index(config(tiny_gemma2, coders, corpus_jsonl, db))
    assert FeatureStore(str(db)).coders().height == 2  # both rows, the second one without decoder vectors
    monkeypatch.undo()
    run_index(config(tiny_gemma2, coders, corpus_jsonl, db, resume=True))
    assert not (db / "_index_work").exists()


# ---------------------------------------------------------------------------- memory of the statistics


def cli_stats(top_k: int) -> StatsConfig:
    return StatsConfig(top_k=top_k)  # what `featuredb index --top-k` makes (interval samples: 2)


@pytest.mark.parametrize("room", [-1, 0])  # one byte short of what the coder needs, or exactly enough
def test_statistics_larger_than_free_memory_are_refused_before_the_model_loads(tiny_gemma2, coders, corpus_jsonl,
                                                                              tmp_path, monkeypatch, room):
    from featuredb.indexer.plan import HEADROOM, model_weight_bytes, pass_bytes, planned_coders
    from featuredb.indexer.preflight import coder_headers

    planned = planned_coders(coder_headers(coders, str(tiny_gemma2)), CONTEXT, 16, cli_stats(64), on_host=True)
    need = max(pass_bytes([c]) for c in planned)
    model = model_weight_bytes(str(tiny_gemma2), 4)
    free = int((need + room + model) / (1 - HEADROOM)) + 1  # int(free * 0.9) - model == need + room
    while int(free * (1 - HEADROOM)) - model > need + room:
        free -= 1
    monkeypatch.setattr(preflight, "available_ram", lambda: free)
    if room < 0:
        no_model_loading(monkeypatch)
    args = ["-m", str(tiny_gemma2), "-c", coders[0], "-c", coders[1], "--corpus", str(corpus_jsonl),
            "--db", str(tmp_path / "db"), "--top-k", "64", "--device", "cpu"]
    result = run_cli(*args)
    if room == 0:
        assert result.exit_code == 0, result.output
        assert "passes: 1/2 " in result.output  # exactly room for the larger coder alone: one pass each
        return
    line = one_error_line(result)
    assert "needs" in line and "statistics" in line and "more than the budget" in line
    assert "RAM free" in line and "raise --memory, or lower --top-k, --context or --batch-size" in line, repr(line)
    assert not (tmp_path / "db").exists()


def test_an_absurd_top_k_is_refused_with_its_real_figure(tiny_gemma2, coders, corpus_jsonl, tmp_path, monkeypatch):
    no_model_loading(monkeypatch)
    top_k = 2**36  # 48 features x 2**36 contexts x 16 tokens x 4 bytes: ~230 TB, more than any machine has
    line = one_error_line(run_cli("-m", str(tiny_gemma2), "-c", coders[0], "--corpus", str(corpus_jsonl),
                                  "--db", str(tmp_path / "db"), "--top-k", str(top_k), "--device", "cpu"))
    need = float(re.search(r"statistics ([0-9.]+) GiB", line).group(1)) * 2**30
    assert need == pytest.approx(state_bytes(48, CONTEXT, cli_stats(top_k)), rel=0.01)
    assert "budget of" in line and "--memory" in line


# ---------------------------------------------------------------------------- settings no run can use


@pytest.mark.parametrize("seconds", ["nan", "inf", "-1"])
def test_checkpoint_seconds_must_be_a_finite_non_negative_number(tiny_gemma2, coders, corpus_jsonl, tmp_path,
                                                               seconds):
    line = one_error_line(run_cli("-m", str(tiny_gemma2), "-c", coders[0], "--corpus", str(corpus_jsonl),
                                  "--db", str(tmp_path / "db"), f"--checkpoint-seconds={seconds}"))
    assert "--checkpoint-seconds" in line and seconds.lstrip("-") in line
    assert not (tmp_path / "db").exists()


def test_context_longer_than_the_model_takes_is_refused(described_db, tiny_gemma2, coders, corpus_jsonl):
    limit = 256  # conftest's tiny models: max_position_embeddings
    before = db_snapshot(described_db)
    result = CliRunner().invoke(main, ["index", "--quiet", "-m", str(tiny_gemma2), "-c", coders[1], "--corpus",
                                       str(corpus_jsonl), "--db", str(described_db), "--context", str(limit + 1)])
    line = one_error_line(result)
    assert f"--context {limit + 1}" in line and f"max_position_embeddings {limit}" in line
    assert db_snapshot(described_db) == before


# ---------------------------------------------------------------------------- leftovers of a failed run


@pytest.mark.parametrize("corpus_kind", ["binary", "empty"])
@pytest.mark.parametrize("db_kind", ["existing", "new"])
def test_bad_input_found_while_streaming_leaves_no_work_dir(described_db, tiny_gemma2, coders, tmp_path, corpus_kind,
                                                           db_kind):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(bytes(range(256)) * 10 if corpus_kind == "binary" else b"")
    db = described_db if db_kind == "existing" else tmp_path / "new-db"
    before = db_snapshot(described_db)
    one_error_line(run_cli("-m", str(tiny_gemma2), "-c", coders[1], "--corpus", str(corpus), "--db", str(db)))
    assert not (db / "_index_work").exists()
    assert db_snapshot(described_db) == before
    assert db_kind == "existing" or not db.exists()


def test_an_interrupted_run_keeps_its_checkpoint_only_once_it_has_one(tiny_gemma2, coders, corpus_jsonl, tmp_path):
    db = tmp_path / "db"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C before the first checkpoint: nothing to resume
        run_index(config(tiny_gemma2, coders[:1], corpus_jsonl, db), on_batch=lambda n: (_ for _ in ()).throw(
            KeyboardInterrupt()))
    assert not db.exists()
    with pytest.raises(Interrupt):
        run_index(config(tiny_gemma2, coders[:1], corpus_jsonl, db, checkpoint_seconds=0), on_batch=interrupt_after(2))
    assert (db / "_index_work" / "checkpoint" / "progress.json").exists()
    run_index(config(tiny_gemma2, coders[:1], corpus_jsonl, db, checkpoint_seconds=0, resume=True))
    assert FeatureStore(str(db)).coders().height == 1 and not (db / "_index_work").exists()


# ---------------------------------------------------------------------------- the model's path


def test_a_relative_model_path_is_stored_so_it_reloads_from_anywhere(tiny_gemma2, coders, corpus_jsonl, tmp_path,
                                                                     monkeypatch):
    db = tmp_path / "db"
    monkeypatch.chdir(tiny_gemma2.parent)
    result = run_cli("-m", tiny_gemma2.name, "-c", coders[0], "--corpus", str(corpus_jsonl), "--db", str(db))
    assert result.exit_code == 0, result.output
    stored = FeatureStore(str(db)).coders()["model"][0]
    assert Path(stored).is_absolute() and Path(stored).samefile(tiny_gemma2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where the relative path names nothing
    fires = CliRunner().invoke(main, ["fires", "The cat sat on the mat.", "--db", str(db), "--json"])
    assert fires.exit_code == 0, fires.output


def test_model_reference_keeps_hub_ids_and_gguf_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_reference("google/gemma-2-2b") == "google/gemma-2-2b"  # no such local path: a hub id
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "f00d").write_bytes(b"GGUF")
    (tmp_path / "model.Q4.gguf").symlink_to(blobs / "f00d")  # as in the hub cache
    assert model_reference("model.Q4.gguf") == os.path.join(tmp_path, "model.Q4.gguf")
    assert model_reference("~") == str(Path.home())
