"""End to end: corpus -> tiny Gemma model -> coders in every upstream format -> LanceDB.

Every stored number is checked against a brute-force recomputation that runs each context through
the model on its own and keeps the dense activations.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from featuredb.cli import main
from featuredb.runtime.coders import load_coder
from featuredb.indexer.corpus import iter_windows
from featuredb.runtime.model import load_model
from featuredb.indexer.run import IndexConfig, run_index
from featuredb.indexer.stats import StatsConfig
from featuredb.store import FeatureStore

from featuredb.errors import IndexingError
from featuredb.indexer import workdir as workdir_module
from featuredb.indexer.workdir import ContextStore
from featuredb.store import feature_store as feature_store_module

from coder_formats import write_gemma_scope_1, write_gemma_scope_2, write_saelens
from test_store import DISK_FULL, NO_CREDENTIALS_URI, db_snapshot, deny_writes, without_aws_settings

CONTEXT = 16
STATS = StatsConfig(top_k=4, hist_bins=16, interval_bins=4, interval_per_bin=2)


@pytest.fixture()
def gemma2_coders(tmp_path):
    root = tmp_path / "coders"
    return [
        str(write_gemma_scope_1(root, "res", 1, 64, 48, fire_rate=0.1, seed=1)),
        str(write_gemma_scope_1(root, "transcoders", 0, 64, 40, fire_rate=0.1, seed=2)),
        str(write_gemma_scope_1(root, "att", 2, 64, 32, fire_rate=0.5, seed=3)),  # small inputs: z-scale
        str(write_saelens(root / "saelens_topk", "topk", 64, 36, "blocks.2.hook_resid_post", k=5)),
    ]


@pytest.fixture()
def gemma3_coders(tmp_path):
    root = tmp_path / "coders3"
    return [
        str(write_gemma_scope_2(root, "resid_post", 1, 64, 40, fire_rate=0.1, seed=4)),
        str(write_gemma_scope_2(root, "transcoder", 2, 64, 32, kind="transcoder", affine=True, fire_rate=0.1, seed=5)),
        str(write_gemma_scope_2(root, "mlp_out", 0, 64, 24, fire_rate=0.1, seed=6)),
    ]


def index(model_dir, coders, corpus, db, **kw):
    config = IndexConfig(model=str(model_dir), coders=coders, corpus=str(corpus), db=str(db), context=CONTEXT,
                         batch_size=3, stats=STATS, progress=False, **kw)
    return run_index(config)


def brute_force(model_dir, coder_spec, corpus, outlier_ratio=None):
    """Dense activations of every context, each run through the model alone (no padding), and the
    number of tokens that count. With `outlier_ratio`, tokens whose hooked norm is above that many
    times the median norm of their context's other non-BOS tokens are left out, as BOS is."""
    model = load_model(str(model_dir))
    coder = load_coder(coder_spec, model_is_gemma=True)
    acts, n_tokens = [], 0
    for w in iter_windows(str(corpus), model.tokenizer, model.bos_token_id, CONTEXT):
        ids = torch.as_tensor(w.token_ids)[None]
        x = model.capture(ids, torch.ones_like(ids), [coder.hook])[coder.hook]
        a = coder.encode(x.float())[0]
        counts = torch.ones(len(a), dtype=torch.bool)
        counts[0] = False  # BOS never counts
        if outlier_ratio is not None:
            norms = x[0].float().norm(dim=-1)
            counts &= norms <= outlier_ratio * torch.quantile(norms[1:], 0.5, interpolation="lower")
        a[~counts] = 0
        n_tokens += int(counts.sum())
        padded = torch.zeros(CONTEXT, coder.width)
        padded[: len(a)] = a
        acts.append(padded)
    return model, coder, torch.stack(acts), n_tokens  # [N, T, F]


def check_coder(db, model_dir, coder_spec, corpus, outlier_ratio=None):
    model, coder, dense, n_tokens = brute_force(model_dir, coder_spec, corpus, outlier_ratio)
    store = FeatureStore(str(db))
    features = store.features(coder.coder_id).sort("feature")
    examples = store.examples(coder.coder_id)
    flat = dense.reshape(-1, coder.width)

    # density and max match
    density = (flat > 0).sum(0).double() / n_tokens
    assert np.allclose(features["density"].to_numpy(), density.numpy())
    assert np.allclose(features["max_activation"].to_numpy(), flat.max(0).values.numpy(), rtol=1e-5, atol=1e-6)
    assert (density > 0).sum() >= coder.width // 2, "test coders should make most features fire"
    assert (density < 0.9).all()

    # stored top-K examples equal a brute-force ranking (max in context desc, earlier context first)
    context_max = dense.amax(dim=1)
    for f in range(coder.width):
        order = sorted((-float(context_max[c, f]), c) for c in range(len(dense)) if context_max[c, f] > 0)
        expected = [c for _, c in order[: STATS.top_k]]
        got = examples.filter((pl.col("feature") == f) & (pl.col("kind") == "top")).sort("rank")
        assert got["context_index"].to_list() == expected, f
        for row in got.iter_rows(named=True):
            c = row["context_index"]
            n = len(row["token_ids"])
            assert np.allclose(row["values"], dense[c, :n, f].numpy(), rtol=1e-4, atol=1e-5)
            assert row["max_value"] == pytest.approx(float(context_max[c, f]), rel=1e-5)
            assert row["tokens"][row["max_position"]] == model.tokenizer.decode([row["token_ids"][row["max_position"]]])
    return model, coder, features, examples


def fresh_forward_matches(model, coder, examples, n=6):
    """Per-token values stored for an example equal a fresh forward pass on its stored tokens."""
    for row in examples.head(n).iter_rows(named=True):
        ids = torch.tensor(row["token_ids"])[None]
        x = model.capture(ids, torch.ones_like(ids), [coder.hook])[coder.hook]
        values = coder.encode(x.float())[0, :, row["feature"]]
        values[0] = 0
        assert np.allclose(row["values"], values.numpy(), rtol=1e-4, atol=1e-5)


def test_index_gemma2_all_formats(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    db = tmp_path / "db"
    result = index(tiny_gemma2, gemma2_coders, corpus_jsonl, db)
    assert len(result.coder_ids) == 4 and result.tokens > 0
    store = FeatureStore(str(db))
    saes = store.coders()
    assert sorted(saes["coder_id"].to_list()) == sorted(result.coder_ids)
    assert set(saes["site"].to_list()) == {"res", "transcoder", "att"}
    for spec in gemma2_coders:
        model, coder, features, examples = check_coder(db, tiny_gemma2, spec, corpus_jsonl)
        fresh_forward_matches(model, coder, examples.filter(pl.col("kind") == "interval"))
        fresh_forward_matches(model, coder, examples.filter(pl.col("kind") == "top"))
        assert (features["hist_counts"].list.sum() == features["active_count"]).all()
        assert features["top_logit_ids"].list.len().max() == 10
        assert features["neighbours"].list.len().min() == 10
    # doc ids come from the corpus
    assert set(store.examples(result.coder_ids[0])["doc_id"].unique().to_list()) <= {f"doc{i}" for i in range(8)}


def test_index_gemma3_transcoders(tiny_gemma3, gemma3_coders, corpus_jsonl, tmp_path):
    db = tmp_path / "db"
    index(tiny_gemma3, gemma3_coders, corpus_jsonl, db)
    for spec in gemma3_coders:
        model, coder, features, examples = check_coder(db, tiny_gemma3, spec, corpus_jsonl)
        fresh_forward_matches(model, coder, examples)


def test_interval_samples_sit_in_their_bins(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    db = tmp_path / "db"
    index(tiny_gemma2, gemma2_coders[:1], corpus_jsonl, db)
    store = FeatureStore(str(db))
    coder_id = store.coders()["coder_id"][0]
    intervals = store.examples(coder_id, kind="interval")
    assert len(intervals) > 0
    assert (intervals["max_value"] >= intervals["bin_min"]).all() and (intervals["max_value"] < intervals["bin_max"]).all()
    hist_max = dict(store.features(coder_id).select("feature", "hist_max").iter_rows())
    assert all(row["bin_max"] <= hist_max[row["feature"]] for row in intervals.iter_rows(named=True))


def norm_ratios(model_dir, coder_spec, corpus) -> np.ndarray:
    """Each counted token's hooked norm over the median norm of its context's counted tokens."""
    model = load_model(str(model_dir))
    hook = load_coder(coder_spec, model_is_gemma=True).hook
    ratios = []
    for w in iter_windows(str(corpus), model.tokenizer, model.bos_token_id, CONTEXT):
        ids = torch.as_tensor(w.token_ids)[None]
        norms = model.capture(ids, torch.ones_like(ids), [hook])[hook][0, 1:].float().norm(dim=-1)
        ratios += (norms / torch.quantile(norms, 0.5, interpolation="lower")).tolist()
    return np.sort(np.asarray(ratios))


def test_outlier_tokens_are_left_out_like_bos(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    # A random tiny model has no attention sinks, and its token norms are close to each other: a
    # ratio between two of them, about a fifth of the way down from the top, leaves out ~20% of the
    # tokens, and the stored statistics must equal a brute force that leaves out the same tokens.
    spec = gemma2_coders[0]
    ratios = norm_ratios(tiny_gemma2, spec, corpus_jsonl)
    cut = int(0.8 * len(ratios))
    cut += int(np.argmax(np.diff(ratios[cut:]) > 1e-4))  # far from any token's own ratio
    ratio = float(ratios[cut] + ratios[cut + 1]) / 2
    assert ratio > 1
    index(tiny_gemma2, [spec], corpus_jsonl, tmp_path / "db", outlier_ratio=ratio)
    _, _, _, n_kept = brute_force(tiny_gemma2, spec, corpus_jsonl, outlier_ratio=ratio)
    assert n_kept == cut + 1 and n_kept < 0.9 * len(ratios)
    check_coder(tmp_path / "db", tiny_gemma2, spec, corpus_jsonl, outlier_ratio=ratio)
    result = CliRunner().invoke(main, ["index", "-m", str(tiny_gemma2), "-c", spec, "--corpus", str(corpus_jsonl),
                                       "--db", str(tmp_path / "db2"), "--outlier-ratio", "0.5"])
    assert result.exit_code == 1 and "outlier ratio must be > 1" in result.output


def test_reindex_replaces_rows(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    db = tmp_path / "db"
    index(tiny_gemma2, gemma2_coders[:2], corpus_jsonl, db)
    before = FeatureStore(str(db)).examples(FeatureStore(str(db)).coders()["coder_id"][0])
    index(tiny_gemma2, gemma2_coders[:2], corpus_jsonl, db, replace=True)
    store = FeatureStore(str(db))
    assert len(store.coders()) == 2
    assert store.examples(store.coders()["coder_id"][0]).equals(before)


def test_token_budget(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    result = index(tiny_gemma2, gemma2_coders[:1], corpus_jsonl, tmp_path / "db", tokens=20)
    assert 20 <= result.tokens < 20 + CONTEXT * 3


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    whole_db, resumed_db = tmp_path / "whole", tmp_path / "resumed"
    index(tiny_gemma2, gemma2_coders, corpus_jsonl, whole_db)

    def interrupt_after(n):
        def on_batch(i):
            if i == n:
                raise Interrupt

        return on_batch

    config = IndexConfig(model=str(tiny_gemma2), coders=gemma2_coders, corpus=str(corpus_jsonl), db=str(resumed_db),
                         context=CONTEXT, batch_size=3, stats=STATS, progress=False, checkpoint_seconds=0)
    with pytest.raises(Interrupt):
        run_index(config, on_batch=interrupt_after(2))
    config.resume = True
    with pytest.raises(Interrupt):  # interrupted a second time, later on
        run_index(config, on_batch=interrupt_after(1))
    assert FeatureStore(str(resumed_db)).coders().is_empty()
    run_index(config)
    assert_same_catalogue(whole_db, resumed_db)


def assert_same_catalogue(db_a, db_b):
    a, b = FeatureStore(str(db_a)), FeatureStore(str(db_b))
    assert a.coders().drop("created_at").sort("coder_id").equals(b.coders().drop("created_at").sort("coder_id"))
    for coder_id in a.coders()["coder_id"]:
        assert a.features(coder_id).sort("feature").equals(b.features(coder_id).sort("feature"))
        assert a.examples(coder_id).equals(b.examples(coder_id))


def test_resume_after_sigkill(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    """A real kill -9 in the middle of a run, then `featuredb index --resume`."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # a longer corpus so the run is still going when we kill it
    long_corpus = tmp_path / "long.jsonl"
    lines = corpus_jsonl.read_text().splitlines()
    long_corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": json.loads(l)["text"] * 3})
                                     for i, l in enumerate(lines * 6)) + "\n")
    args = ["index", "--model", str(tiny_gemma2), "--corpus", str(long_corpus), "--context", str(CONTEXT),
            "--batch-size", "2", "--top-k", "4", "--quiet", "--checkpoint-seconds", "0"]
    for c in gemma2_coders[:2]:
        args += ["--coder", c]
    whole = CliRunner().invoke(main, args + ["--db", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output

    killed_db = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "featuredb.cli", *args, "--db", str(killed_db)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    live = killed_db / "_index_work" / "checkpoint" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if live.exists() and json.loads(live.read_text())["contexts"] >= 6:
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = CliRunner().invoke(main, args + ["--db", str(killed_db), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_catalogue(tmp_path / "whole", killed_db)


# ---------------------------------------------------------------------------- bad input


@pytest.fixture()
def populated_db(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    db = tmp_path / "db"
    index(tiny_gemma2, gemma2_coders[:1], corpus_jsonl, db)
    return db


def snapshot(db):
    store = FeatureStore(str(db))
    return {coder_id: (store.features(coder_id).sort("feature"), store.examples(coder_id)) for coder_id in store.coders()["coder_id"]}


def run_cli(*args):
    return CliRunner().invoke(main, ["index", "--quiet", "--context", str(CONTEXT), *args])


@pytest.mark.parametrize("case", ["missing_coder", "corrupt_coder", "d_in_mismatch", "unknown_hook",
                                  "empty_corpus", "binary_corpus", "missing_model", "missing_corpus"])
def test_bad_input_one_line_error_and_db_untouched(case, populated_db, tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    before = snapshot(populated_db)
    model, coder, corpus = str(tiny_gemma2), gemma2_coders[0], str(corpus_jsonl)
    if case == "missing_coder":
        coder = str(tmp_path / "nope")
    elif case == "corrupt_coder":
        bad = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_5"
        bad.mkdir(parents=True)
        (bad / "params.npz").write_bytes(b"PK\x03\x04 not really a zip")
        coder = str(bad)
    elif case == "d_in_mismatch":
        coder = str(write_gemma_scope_1(tmp_path / "c", "res", 1, 32, 16))
    elif case == "unknown_hook":
        coder = coder + "@model.layers.9.output"
    elif case == "empty_corpus":
        corpus = str(tmp_path / "empty.jsonl")
        open(corpus, "w").close()
    elif case == "binary_corpus":
        corpus = str(tmp_path / "blob.txt")
        open(corpus, "wb").write(bytes(range(256)) * 10)
    elif case == "missing_model":
        model = str(tmp_path / "no-model")
    elif case == "missing_corpus":
        corpus = str(tmp_path / "nothing.jsonl")
    result = run_cli("--model", model, "--coder", coder, "--corpus", corpus, "--db", str(populated_db))
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    after = snapshot(populated_db)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key][0].equals(after[key][0]) and before[key][1].equals(after[key][1])


def test_failed_run_leaves_no_new_catalogue_directory(tiny_gemma2, corpus_jsonl, tmp_path):
    db = tmp_path / "new-db"
    result = run_cli("-m", str(tiny_gemma2), "-c", str(tmp_path / "no-such-coder"), "--corpus", str(corpus_jsonl),
                     "--db", str(db))
    assert result.exit_code == 1 and not db.exists()


def test_db_path_is_a_file(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    db = tmp_path / "db.txt"
    db.write_text("precious")
    result = run_cli("--model", str(tiny_gemma2), "--coder", gemma2_coders[0], "--corpus", str(corpus_jsonl), "--db", str(db))
    assert result.exit_code == 1 and result.output.startswith("error: ")
    assert db.read_text() == "precious"


# ---------------------------------------------------------------------------- the environment fails


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_read_only_catalogue_is_one_line_and_untouched(populated_db, tiny_gemma2, gemma2_coders, corpus_jsonl,
                                                      monkeypatch):
    before = db_snapshot(populated_db)
    deny_writes(populated_db, monkeypatch)
    result = run_cli("--model", str(tiny_gemma2), "--coder", gemma2_coders[1], "--corpus", str(corpus_jsonl),
                     "--db", str(populated_db))
    assert one_error_line(result) == f"error: cannot write to the catalogue {populated_db}: its directory is read-only"
    assert db_snapshot(populated_db) == before  # not even a work dir


def test_full_disk_while_writing_the_catalogue_is_one_line_and_keeps_the_rows(populated_db, tiny_gemma2, gemma2_coders,
                                                                              corpus_jsonl, monkeypatch):
    before = snapshot(populated_db)
    real_replace = feature_store_module._replace_coder_rows

    def disk_full_on_features(table, rows, key, coder_id, *rest):
        if table.name == "features":
            raise DISK_FULL["LanceDB"]()
        real_replace(table, rows, key, coder_id, *rest)

    monkeypatch.setattr(feature_store_module, "_replace_coder_rows", disk_full_on_features)
    result = run_cli("--model", str(tiny_gemma2), "--coder", gemma2_coders[0], "--corpus", str(corpus_jsonl),
                     "--db", str(populated_db), "--top-k", "2", "--replace")  # the same coder again, other rows
    coder_id = list(before)[0]
    assert result.exit_code == 1, result.output
    note, error = [line for line in result.output.splitlines() if line.strip()]  # what --replace said, then why it failed
    assert note.startswith(f"replacing coder {coder_id} ")
    assert error == f"error: could not write coder {coder_id!r} to {populated_db}: No space left on device (os error 28)"
    after = snapshot(populated_db)
    assert before.keys() == after.keys()
    assert all(before[k][0].equals(after[k][0]) and before[k][1].equals(after[k][1]) for k in before)


def test_full_disk_while_checkpointing_is_one_line_and_the_last_checkpoint_resumes(tiny_gemma2, gemma2_coders,
                                                                                  corpus_jsonl, tmp_path, monkeypatch):
    db = tmp_path / "db"
    args = ["--model", str(tiny_gemma2), "--coder", gemma2_coders[0], "--corpus", str(corpus_jsonl), "--db", str(db),
            "--batch-size", "3", "--checkpoint-seconds", "0"]
    saves = []
    real_save_file = workdir_module.save_file

    def disk_full_at_the_second_checkpoint(state, path):
        saves.append(path)  # each checkpoint: the coder's statistics, then the co-occurrence sample
        if sum(p.endswith("coder_0.safetensors") for p in saves) == 2:  # safetensors' error, as measured on a full tmpfs
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save_file(state, path)

    monkeypatch.setattr(workdir_module, "save_file", disk_full_at_the_second_checkpoint)
    work_dir = db / "_index_work"
    assert one_error_line(run_cli(*args)) == (f"error: could not write a checkpoint to {work_dir}: "
                                              "No space left on device (os error 28)")
    progress = json.loads((work_dir / "checkpoint" / "progress.json").read_text())
    assert progress["contexts"] == 3 and not progress["finished"]  # the first checkpoint is still the live one
    assert FeatureStore(str(db), read_only=True).coders().is_empty()
    monkeypatch.undo()
    resumed = run_cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert FeatureStore(str(db), read_only=True).coders().height == 1 and not work_dir.exists()


def test_unwritable_work_dir_is_an_indexing_error(tmp_path):
    (tmp_path / "a-file").write_text("precious")
    with pytest.raises(IndexingError, match=r"^could not write the indexed contexts to .*a-file/work: "):
        ContextStore(tmp_path / "a-file" / "work", CONTEXT)
    assert (tmp_path / "a-file").read_text() == "precious"


def test_s3_catalogue_without_aws_settings_is_one_line(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path,
                                                       monkeypatch):
    without_aws_settings(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # an s3:// db's work dir is under ~/.cache
    result = run_cli("--model", str(tiny_gemma2), "--coder", gemma2_coders[0], "--corpus", str(corpus_jsonl),
                     "--db", NO_CREDENTIALS_URI)
    line = one_error_line(result)
    assert NO_CREDENTIALS_URI in line and "not set: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION" in line
    assert not (tmp_path / "home").exists()


def test_help_on_every_command():
    for args in (["--help"], ["index", "--help"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "Usage" in result.output
