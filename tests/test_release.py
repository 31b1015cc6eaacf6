"""A whole release in one job (issue 21): coder patterns, sizes from headers, passes planned to fit
a memory budget, the plan first, and resume across passes.

The release is a local folder laid out as a Gemma Scope 2 repo (`resid_post/`, `transcoder/`) with
two dozen random coders for a tiny Gemma 3; every test that compares tables compares against
runs of one coder at a time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from coder_formats import write_gemma_scope_1, write_gemma_scope_2, write_gemma_scope_2_multi_layer, write_saelens
from test_hub_mirror import mirror, offline_hub  # noqa: F401 (a fixture)
from test_index import CONTEXT, STATS, assert_same_catalogue
from featuredb.cli import main
from featuredb.errors import CoderError
from featuredb.indexer import run as run_module
from featuredb.indexer.plan import pass_bytes, plan_passes, planned_coders
from featuredb.indexer.preflight import coder_headers
from featuredb.indexer.run import IndexConfig, plan_only, run_index
from featuredb.indexer.stats import StatsConfig
from featuredb.runtime.coder_headers import CoderHeader, coder_header
from featuredb.runtime.coder_patterns import expand_specs, read_coders_file
from featuredb.runtime.coders import load_coder
from featuredb.store import FeatureStore
from featuredb.store.schema import COOCCURRENCE_COLUMNS

BATCH = 3


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """24 coders in Gemma Scope 2's layout: resid_post at layers 0-2 (two widths, three L0s) and
    transcoders at layers 0-2 (two widths)."""
    root = tmp_path_factory.mktemp("gemma-scope-2-tiny-pt")
    seed = 0
    for layer in range(3):
        for width in (16, 32):
            for l0 in ("small", "medium", "big"):
                seed += 1
                write_gemma_scope_2(root, "resid_post", layer, 64, width, l0=l0, fire_rate=0.15, seed=seed)
        for width in (16, 24):
            seed += 1
            write_gemma_scope_2(root, "transcoder", layer, 64, width, kind="transcoder", fire_rate=0.15, seed=seed)
    return root


def config(model, coders, corpus, db, **kw) -> IndexConfig:
    return IndexConfig(model=str(model), coders=list(coders), corpus=str(corpus), db=str(db), context=CONTEXT,
                       batch_size=BATCH, stats=STATS, progress=False, **kw)


def budget_for_passes(model, coders, corpus, passes: int, stats=STATS, batch=BATCH) -> int:
    """A budget under which the coders need at least `passes` passes."""
    planned = planned_coders(coder_headers(coders, str(model)), CONTEXT, batch, stats, on_host=True)  # a CPU run
    total = sum(c.held_bytes for c in planned)
    return max(max(pass_bytes([c]) for c in planned), total // (passes + 1))


# --- patterns and headers -------------------------------------------------------------------------


def test_one_pattern_names_every_coder_of_a_local_release_with_stable_ids(release):
    expanded = expand_specs([f"{release}/*/*"])
    assert len(expanded) == 24
    headers = coder_headers([f"{release}/*/*"], "gemma")
    ids = [h.coder_id for h in headers]
    assert len(set(ids)) == 24 and "resid_post-layer_1_width_32_l0_big" in ids
    assert "transcoder-layer_2_width_24_l0_medium" in ids
    assert ids == [h.coder_id for h in coder_headers([f"{release}/*/*"], "gemma")]  # same on every run
    only = coder_headers([f"{release}/resid_post/layer_?_width_16_l0_medium"], "gemma")
    assert [h.coder_id for h in only] == [f"resid_post-layer_{i}_width_16_l0_medium" for i in range(3)]


def test_headers_say_what_loading_gives_for_every_format(tmp_path):
    specs = [
        str(write_gemma_scope_1(tmp_path / "g1", "res", 1, 64, 48, seed=1)),
        str(write_gemma_scope_1(tmp_path / "g1", "transcoders", 0, 64, 40, seed=2)),
        str(write_gemma_scope_2(tmp_path / "g2", "transcoder", 2, 64, 32, kind="transcoder", affine=True, seed=3)),
        str(write_saelens(tmp_path / "sl", "topk", 64, 36, "blocks.2.hook_resid_post", k=5)),
        str(write_gemma_scope_2_multi_layer(tmp_path / "ml", "crosscoder", 2, 64, 24, layers=[0, 2], seed=4)),
        "mine=" + str(write_gemma_scope_2(tmp_path / "g2", "resid_post", 1, 64, 16, seed=5)) + "@model.layers.2.output",
    ]
    for spec in specs:
        header, coder = coder_header(spec), load_coder(spec)
        assert (header.coder_id, header.kind, header.width, header.d_in) == (
            coder.coder_id, coder.kind, coder.width, coder.d_in), spec
        assert list(header.hooks) == list(coder.hooks), spec
        assert load_coder(header.spec).coder_id == coder.coder_id  # the pinned spec loads the same coder


def test_headers_read_no_tensor(release, monkeypatch):
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read to plan")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    assert len(coder_headers([f"{release}/*/*"], "gemma")) == 24


def test_release_patterns_expand_over_the_registry_ids():
    expanded = expand_specs(["gemma-scope-2-270m-pt-res:layer_*_width_16k_l0_medium"])
    assert [e.spec for e in expanded] == [
        f"layer_{L}_width_16k_l0_medium=gemma-scope-2-270m-pt-res:layer_{L}_width_16k_l0_medium" for L in (12, 15, 5, 9)]
    assert len(expand_specs(["gemma-scope-2-270m-pt-res:*"])) == 52
    mixed = expand_specs(["gemma-scope-2-270m-pt-res:layer_5_width_16k_l0_small",  # a plain spec stays as given
                          "gemma-scope-2-270m-pt-res:layer_5_width_16k_l0_big*",
                          "gemma-scope-2-270m-pt-mlp:layer_5_width_16k_l0_big*"])
    assert [e.spec.partition("=")[0] for e in mixed] == [
        "gemma-scope-2-270m-pt-res:layer_5_width_16k_l0_small", "gemma-scope-2-270m-pt-res-layer_5_width_16k_l0_big",
        "gemma-scope-2-270m-pt-mlp-layer_5_width_16k_l0_big"]


@pytest.mark.parametrize("spec, expected", [
    ("gemma-scope-2-270m-pt-res:layer_99_*", "no coder of gemma-scope-2-270m-pt-res matches 'layer_99_*'"),
    ("gemma-scope-2-270m-pt-rez:*", "unknown release 'gemma-scope-2-270m-pt-rez'; nearest: gemma-scope-2-270m-pt-res"),
    ("{release}/resid_post/layer_7_*", "no coder folder matches"),
    ("x={release}/resid_post/*", "a pattern names several coders, so it cannot take one ID="),
])
def test_a_pattern_that_matches_nothing_is_one_line(spec, expected, release, tiny_gemma3, corpus_jsonl, tmp_path):
    result = CliRunner().invoke(main, ["index", "-m", str(tiny_gemma3), "-c", spec.format(release=release),
                                       "--corpus", str(corpus_jsonl), "--db", str(tmp_path / "db"), "--plan"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and expected in lines[0], result.output
    if "layer_7" in spec:
        assert "; nearest: layer_" in lines[0]  # names what is there
    assert not (tmp_path / "db").exists()


def test_coders_from_a_file_mix_with_coder(release, tmp_path):
    listing = tmp_path / "coders.txt"
    listing.write_text(f"# the layer-0 residual coders\n{release}/resid_post/layer_0_*  # six\n\n"
                       f"{release}/transcoder/layer_1_width_16_l0_medium\n")
    specs = read_coders_file(str(listing))
    assert len(specs) == 2
    headers = coder_headers([f"{release}/transcoder/layer_2_*", *specs], "gemma")
    assert len(headers) == 2 + 6 + 1
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(CoderError, match="no coder specs"):
        read_coders_file(str(empty))


# --- the plan ---------------------------------------------------------------------------------------


def header(coder_id: str, width: int, layer: int) -> CoderHeader:
    return CoderHeader(coder_id, coder_id, "sae", width, 64, (f"model.layers.{layer}.output",), "F32")


def test_the_plan_packs_into_the_fewest_passes_grouped_by_depth():
    coders = planned_coders([header(f"c{i}", 64, layer) for i, layer in enumerate([2, 0, 1, 0, 2, 1])],
                            CONTEXT, BATCH, STATS)
    one = pass_bytes(coders[:1])
    budget = pass_bytes(coders[:2])  # two coders a pass
    plan = plan_passes(coders, budget, "test")
    assert [p.coder_ids for p in plan.passes] == [["c1", "c3"], ["c2", "c5"], ["c0", "c4"]]
    assert [p.layers for p in plan.passes] == [[0], [1], [2]]
    assert all(p.bytes <= budget for p in plan.passes)
    assert len(plan_passes(coders, one, "test").passes) == 6
    assert len(plan_passes(coders, 10**12, "test").passes) == 1


def test_the_plan_takes_first_fit_when_depth_order_needs_more_passes():
    sizes = [(64, 0), (8, 1), (64, 2), (8, 3)]  # by depth: big, small, big, small -> next-fit makes 3
    coders = planned_coders([header(f"c{i}", w, layer) for i, (w, layer) in enumerate(sizes)], CONTEXT, BATCH, STATS)
    budget = pass_bytes([coders[0], coders[1], coders[3]])
    plan = plan_passes(coders, budget, "test")
    assert len(plan.passes) == 2 and all(p.bytes <= budget for p in plan.passes)


def test_a_plan_for_coder_groups_names_each_coders_group():
    coders = planned_coders([header(f"c{i}", w, 0) for i, w in enumerate([64, 48, 32, 16])], CONTEXT, BATCH, STATS)
    plan = plan_passes(coders, 10**12, "test", groups=2)
    (only,) = plan.passes
    assert sorted(only.group_of) == [0, 0, 1, 1] and only.to_json()["groups"] == only.group_of
    assert "c0 (group " in plan.lines()[1]
    by_group = [sum(c.header.width for c, g in zip(only.coders, only.group_of) if g == k) for k in (0, 1)]
    assert by_group == [80, 80]  # largest first, each to the lighter group: 64 + 16 | 48 + 32
    assert "groups" not in plan_passes(coders, 10**12, "test").passes[0].to_json()


def test_plan_json_loads_no_model_and_no_weights(release, tiny_gemma3, corpus_jsonl, tmp_path, monkeypatch):
    budget = budget_for_passes(tiny_gemma3, [f"{release}/*/*"], corpus_jsonl, 3)

    def refuse(*args, **kwargs):
        raise AssertionError("--plan loaded a model or a coder")

    monkeypatch.setattr(run_module, "load_model", refuse)
    monkeypatch.setattr(run_module, "load_coder", refuse)
    monkeypatch.setattr("featuredb.runtime.coders.read_safetensors", refuse)
    result = CliRunner().invoke(main, ["index", "-m", str(tiny_gemma3), "-c", f"{release}/*/*", "--corpus",
                                       str(corpus_jsonl), "--db", str(tmp_path / "db"), "--plan", "--json",
                                       "--memory", str(budget), "--context", str(CONTEXT), "--batch-size", str(BATCH),
                                       "--top-k", "4"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["budget_bytes"] == budget and len(plan["passes"]) >= 3
    assert sorted(c for p in plan["passes"] for c in p["coders"]) == sorted(
        h.coder_id for h in coder_headers([f"{release}/*/*"], "gemma"))
    for p in plan["passes"]:
        assert set(p) >= {"coders", "layers", "bytes"} and 0 < p["bytes"] <= budget
        assert all(isinstance(layer, int) for layer in p["layers"])
    assert not (tmp_path / "db").exists()
    text = CliRunner().invoke(main, ["index", "-m", str(tiny_gemma3), "-c", f"{release}/*/*", "--corpus",
                                     str(corpus_jsonl), "--db", str(tmp_path / "db"), "--plan", "--memory", "8MiB"])
    assert text.exit_code == 0 and text.output.startswith("plan: 24 coder(s)") and "pass 1/" in text.output


@pytest.mark.parametrize("memory", ["1KiB", "12 parsecs", "0"])
def test_a_budget_no_coder_fits_or_a_bad_size_is_one_line_before_loading(memory, release, tiny_gemma3, corpus_jsonl,
                                                                         tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    result = CliRunner().invoke(main, ["index", "-m", str(tiny_gemma3), "-c", f"{release}/resid_post/*",
                                       "--corpus", str(corpus_jsonl), "--db", str(tmp_path / "db"), "--memory", memory])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert ("more than the budget of 1.0 KiB: raise --memory" if memory == "1KiB" else "--memory") in lines[0]
    assert not (tmp_path / "db").exists()


def test_the_default_budget_is_free_memory_less_the_model_and_headroom(release, tiny_gemma3, corpus_jsonl, tmp_path,
                                                                      monkeypatch):
    from featuredb.indexer import preflight

    monkeypatch.setattr(preflight, "available_ram", lambda: 10 << 30)
    plan = plan_only(config(tiny_gemma3, [f"{release}/*/*"], corpus_jsonl, tmp_path / "db", device="cpu"))
    model_bytes = os.path.getsize(tiny_gemma3 / "model.safetensors")
    assert plan.budget_bytes == pytest.approx(0.9 * (10 << 30) - model_bytes, abs=64 << 10)  # file less its header
    assert "RAM free 10.0 GiB less the model" in plan.budget_note and len(plan.passes) == 1


# --- runs of several passes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_at_a_time(release, tiny_gemma3, tmp_path_factory):
    """Every coder of the release indexed alone, each into its own catalogue; and the corpus."""
    root = tmp_path_factory.mktemp("alone")
    corpus = root / "corpus.jsonl"
    from conftest import CORPUS_TEXT

    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS_TEXT * 2))
    headers = coder_headers([f"{release}/*/*"], "gemma")
    for h in headers:
        run_index(config(tiny_gemma3, [h.spec], corpus, root / h.coder_id))
    return root, corpus, headers


def assert_equal_to_one_at_a_time(db, alone_root, headers):
    store = FeatureStore(str(db))
    assert sorted(store.coders()["coder_id"]) == sorted(h.coder_id for h in headers)
    for h in headers:
        alone = FeatureStore(str(alone_root / h.coder_id))
        assert store.coders().filter(coder_id=h.coder_id).drop("created_at").equals(
            alone.coders().drop("created_at")), h.coder_id
        # co-firing partners come from the coders of the same pass: alone, a coder has only its own
        coder_alone = alone.features(h.coder_id).sort("feature").drop(COOCCURRENCE_COLUMNS)
        assert store.features(h.coder_id).sort("feature").drop(COOCCURRENCE_COLUMNS).equals(coder_alone), h.coder_id
        assert store.examples(h.coder_id).equals(alone.examples(h.coder_id)), h.coder_id


def test_a_release_in_three_or_more_passes_equals_one_coder_at_a_time(release, tiny_gemma3, one_at_a_time, tmp_path):
    alone_root, corpus, headers = one_at_a_time
    budget = budget_for_passes(tiny_gemma3, [f"{release}/*/*"], corpus, 3)
    result = run_index(config(tiny_gemma3, [f"{release}/*/*"], corpus, tmp_path / "db", memory=budget))
    assert len(result.passes) >= 3 and len(result.plan.passes) == len(result.passes)
    for report in result.passes:
        assert report.bytes <= budget and 0 < report.peak_bytes <= budget, report
        assert report.tokens == result.tokens and report.tokens_per_second > 0
    layers = [max(p.layers) for p in result.plan.passes]
    assert layers == sorted(layers)  # grouped by depth
    assert_equal_to_one_at_a_time(tmp_path / "db", alone_root, headers)
    assert not (tmp_path / "db" / "_index_work").exists()


class Killed(Exception):
    pass


@pytest.mark.parametrize("seed", [0, 1])
def test_random_kills_across_passes_resume_to_the_same_tables(seed, release, tiny_gemma3, one_at_a_time, tmp_path,
                                                              monkeypatch):
    alone_root, corpus, headers = one_at_a_time
    budget = budget_for_passes(tiny_gemma3, [f"{release}/*/*"], corpus, 3)
    db = tmp_path / "db"
    rng = random.Random(seed)
    calls = {"batches": 0, "writes": 0}
    plan = plan_only(config(tiny_gemma3, [f"{release}/*/*"], corpus, db, memory=budget))
    first_pass = set(plan.passes[0].coder_ids)
    real_write = FeatureStore.write_coder

    def write_then_maybe_die(self, *args, **kwargs):
        calls["writes"] += 1
        if calls["writes"] == kill_at_write:
            raise Killed("killed while writing")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_coder", write_then_maybe_die)
    kills = 0
    for attempt in range(12):
        # five kills at random points (one of them while writing), then the run is let finish
        kill_at_batch = calls["batches"] + rng.randint(1, 12) if attempt < 5 else -1
        kill_at_write = calls["writes"] + rng.randint(1, 8) if attempt == 2 else -1

        def on_batch(_):
            calls["batches"] += 1
            if calls["batches"] == kill_at_batch:
                raise Killed("killed while streaming")

        try:
            run_index(config(tiny_gemma3, [f"{release}/*/*"], corpus, db, memory=budget, resume=attempt > 0,
                             checkpoint_seconds=0), on_batch=on_batch)
            break
        except Killed:
            kills += 1
            listed = set(FeatureStore(str(db)).coders()["coder_id"]) if (db / "coders.lance").exists() else set()
            if listed and listed < first_pass:
                pytest.fail(f"a pass was listed in part: {sorted(listed)}")
    else:
        pytest.fail("the run never finished")
    assert kills >= 3
    assert_equal_to_one_at_a_time(db, alone_root, headers)


def test_a_killed_pass_resumes_in_that_pass_and_finished_passes_are_not_redone(release, tiny_gemma3, one_at_a_time,
                                                                             tmp_path, monkeypatch):
    alone_root, corpus, headers = one_at_a_time
    budget = budget_for_passes(tiny_gemma3, [f"{release}/*/*"], corpus, 3)
    db = tmp_path / "db"
    plan = plan_only(config(tiny_gemma3, [f"{release}/*/*"], corpus, db, memory=budget))
    seen = []

    def die_in_pass_two(_):
        seen.append(1)
        if len(plan.passes[0].coder_ids) and FeatureStore(str(db)).coders().height and len(seen) > 3:
            raise Killed()

    with pytest.raises(Killed):
        run_index(config(tiny_gemma3, [f"{release}/*/*"], corpus, db, memory=budget, checkpoint_seconds=0),
                  on_batch=die_in_pass_two)
    written = FeatureStore(str(db)).coders()
    assert sorted(written["coder_id"]) == sorted(plan.passes[0].coder_ids)  # pass 1 written whole, pass 2 not listed
    stamps = dict(zip(written["coder_id"], written["created_at"]))
    loaded = []
    real_load = run_module.load_coders
    monkeypatch.setattr(run_module, "load_coders", lambda specs, *a: loaded.extend(specs) or real_load(specs, *a))
    result = run_index(config(tiny_gemma3, [f"{release}/*/*"], corpus, db, memory=budget, resume=True))
    assert [r.index for r in result.passes] == list(range(1, len(plan.passes)))  # pass 1 not run again
    assert not any(spec.startswith(tuple(f"{i}=" for i in plan.passes[0].coder_ids)) for spec in loaded)
    after = FeatureStore(str(db)).coders()
    assert all(stamps[i] == t for i, t in zip(after["coder_id"], after["created_at"]) if i in stamps)
    assert_equal_to_one_at_a_time(db, alone_root, headers)


def test_resume_keeps_the_plan_it_started_with(release, tiny_gemma3, one_at_a_time, tmp_path):
    alone_root, corpus, headers = one_at_a_time
    budget = budget_for_passes(tiny_gemma3, [f"{release}/*/*"], corpus, 3)
    db = tmp_path / "db"
    with pytest.raises(Killed):
        run_index(config(tiny_gemma3, [f"{release}/*/*"], corpus, db, memory=budget, checkpoint_seconds=0),
                  on_batch=lambda n: (_ for _ in ()).throw(Killed()) if n == 2 else None)
    result = run_index(config(tiny_gemma3, [f"{release}/*/*"], corpus, db, memory=10 * budget, resume=True))
    assert len(result.plan.passes) >= 3 and "the plan of the run being resumed" in result.plan.budget_note
    assert_equal_to_one_at_a_time(db, alone_root, headers)


def test_sigkill_in_a_later_pass_then_resume(release, tiny_gemma3, corpus_jsonl, tmp_path):
    """A real kill -9 once the run is in its second pass or later, then `featuredb index --resume`."""
    corpus = tmp_path / "long.jsonl"
    from conftest import CORPUS_TEXT

    corpus.write_text("".join(json.dumps({"text": t * 2}) + "\n" for t in CORPUS_TEXT * 12))
    specs = [f"{release}/transcoder/*"]
    budget = budget_for_passes(tiny_gemma3, specs, corpus, 3, StatsConfig(top_k=4))  # the CLI's statistics
    args = ["index", "-m", str(tiny_gemma3), "-c", specs[0], "--corpus", str(corpus), "--context", str(CONTEXT),
            "--batch-size", str(BATCH), "--top-k", "4", "--memory", str(budget), "-q"]
    whole = CliRunner().invoke(main, args + ["--db", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    killed_db = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "featuredb.cli", *args, "--db", str(killed_db),
                             "--checkpoint-seconds", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    live = killed_db / "_index_work" / "checkpoint" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            saved = json.loads(live.read_text())
            if saved["pass_index"] >= 1 and saved["stream_batches"] > 0:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = CliRunner().invoke(main, args + ["--db", str(killed_db), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_catalogue(tmp_path / "whole", killed_db)


def test_a_real_run_prints_the_plan_a_bar_per_pass_and_each_pass_time(release, tiny_gemma3, corpus_jsonl, tmp_path):
    specs = f"{release}/transcoder/*"
    budget = budget_for_passes(tiny_gemma3, [specs], corpus_jsonl, 2, StatsConfig(), batch=16)
    proc = subprocess.run([sys.executable, "-m", "featuredb.cli", "index", "-m", str(tiny_gemma3), "-c", specs,
                           "--corpus", str(corpus_jsonl), "--db", str(tmp_path / "db"), "--context", str(CONTEXT),
                           "--memory", str(budget)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.startswith("plan: 6 coder(s)")
    n = proc.stderr.count("pass 1/")
    assert n >= 2 and "pass 2/" in proc.stderr  # the plan's lines, then each pass's bar
    assert "passes: 1/" in proc.stdout and "tokens/s" in proc.stdout.splitlines()[-1]


def test_an_error_while_a_bar_is_drawn_starts_on_its_own_line(release, tiny_gemma3, tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(json.dumps({"text": "fine " * 200}) + "\n{not json\n")
    proc = subprocess.run([sys.executable, "-m", "featuredb.cli", "index", "-m", str(tiny_gemma3), "-c",
                           f"{release}/transcoder/layer_0_width_16_l0_medium", "--corpus", str(corpus), "--db",
                           str(tmp_path / "db"), "--context", str(CONTEXT), "--batch-size", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.replace("\r", "\n").splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "bad.jsonl:2" in errors[0], proc.stderr


def test_header_ids_must_match_what_loads(release, tiny_gemma3, corpus_jsonl, tmp_path, monkeypatch):
    """A coder folder changed between planning and loading is refused, not indexed under the wrong plan."""
    import featuredb.indexer.run as run

    real = run.load_coders

    def wider(specs, model, device):
        coders = real(specs, model, device)
        coders[0].coder_id = "something-else"
        return coders

    monkeypatch.setattr(run, "load_coders", wider)
    with pytest.raises(CoderError, match="its files changed"):
        run_index(config(tiny_gemma3, [f"{release}/transcoder/layer_0_width_16_l0_medium"], corpus_jsonl,
                         tmp_path / "db"))


# --- a release by name, from the hub ----------------------------------------------------------------


def test_a_release_pattern_from_the_hub_plans_from_configs_and_fetches_weights_pass_by_pass(
        tiny_gemma3, corpus_jsonl, tmp_path, offline_hub):
    cache, asked = offline_hub
    release, pattern = "gemma-scope-2-270m-pt-res-all", "layer_[0-2]_width_16k_l0_small"
    repo_id = "google/gemma-scope-2-270m-pt"
    for layer in range(3):  # the release's real folders, tiny coders inside
        scratch = write_gemma_scope_2(tmp_path / "scratch", "resid_post_all", layer, 64, 16 + 8 * layer,
                                      l0="small", width="16k", fire_rate=0.15, seed=layer)
        folder = mirror(cache, repo_id) / "resid_post_all" / scratch.name
        folder.mkdir(parents=True)
        for file in scratch.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
    args = ["index", "-m", str(tiny_gemma3), "-c", f"{release}:{pattern}", "--corpus", str(corpus_jsonl),
            "--context", str(CONTEXT), "--batch-size", str(BATCH), "--top-k", "4", "--db", str(tmp_path / "db")]
    planned = CliRunner().invoke(main, args + ["--plan", "--json", "--memory", "1MiB"])
    assert planned.exit_code == 0, planned.output
    ids = [f"layer_{layer}_width_16k_l0_small" for layer in range(3)]
    assert sorted(c for p in json.loads(planned.output)["passes"] for c in p["coders"]) == ids
    assert asked and all(p.endswith(("config.json", "cfg.json")) for _, patterns in asked for p in patterns)

    budget = budget_for_passes(tiny_gemma3, [f"{release}:{pattern}"], corpus_jsonl, 3, StatsConfig(top_k=4))
    asked.clear()
    result = CliRunner().invoke(main, args + ["--memory", str(budget), "-q"])
    assert result.exit_code == 0, result.output
    assert "passes: 1/3" in result.output
    weights = [p for _, patterns in asked for p in patterns if p.endswith("params.safetensors")]
    assert sorted(weights) == sorted(f"resid_post_all/{i}/params.safetensors" for i in ids)
    stored = FeatureStore(str(tmp_path / "db")).coders()
    assert sorted(stored["coder_id"]) == ids and sorted(stored["width"]) == [16, 24, 32]
