"""Two CPU processes under torchrun (gloo) write the same catalogue as one process, row for row;
a distributed run killed mid-way resumes on every rank; a resume with another world size is refused.
With --coder-groups, each rank loads only its group's coders and the catalogue is the same again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from featuredb.cli import main
from featuredb.indexer.distributed import assign_coders
from featuredb.store import FeatureStore

from coder_formats import write_gemma_scope_1, write_saelens

CONTEXT = 16
TIMEOUT_S = 240


@pytest.fixture()
def coders(tmp_path) -> list[str]:
    root = tmp_path / "coders"
    return [
        str(write_gemma_scope_1(root, "res", 1, 64, 48, fire_rate=0.1, seed=1)),
        str(write_saelens(root / "saelens_topk", "topk", 64, 36, "blocks.2.hook_resid_post", k=5)),
    ]


def index_args(model: Path, coders: list[str], corpus: Path, *extra: str) -> list[str]:
    # batch size 3: 8 batches of the 22 contexts, the last one short, split 4 / 4 between two ranks;
    # co-occurrence on a sample of 100 of their ~300 tokens: the ranks' samples merge into one
    args = ["--model", str(model), "--corpus", str(corpus), "--context", str(CONTEXT), "--batch-size", "3",
            "--top-k", "4", "--quiet", "--checkpoint-seconds", "0", "--cooccurrence-tokens", "100", *extra]
    for c in coders:
        args += ["--coder", c]
    return args


def index_one_process(args: list[str], db: Path) -> None:
    result = CliRunner().invoke(main, ["index", *args, "--db", str(db)])
    assert result.exit_code == 0, result.output


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ...` (standalone: a free local port, no fixed 29500)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)


def assert_same_catalogue(db_a: Path, db_b: Path) -> None:
    a, b = FeatureStore(str(db_a)), FeatureStore(str(db_b))
    assert a.coders().drop("created_at").sort("coder_id").equals(b.coders().drop("created_at").sort("coder_id"))
    assert len(a.coders()) == 2
    for coder_id in a.coders()["coder_id"]:
        assert a.features(coder_id).sort("feature").equals(b.features(coder_id).sort("feature"))
        examples = a.examples(coder_id)
        assert len(examples) > 0 and examples.equals(b.examples(coder_id))


def test_two_processes_equal_one_process(tiny_gemma2, coders, corpus_jsonl, tmp_path):
    args = index_args(tiny_gemma2, coders, corpus_jsonl)
    index_one_process(args, tmp_path / "one")
    run = torchrun(["-m", "featuredb.indexer", *args, "--db", str(tmp_path / "two")], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 processes" in run.stdout  # rank 0 reports, once
    assert run.stdout.count("indexed ") == 1
    assert_same_catalogue(tmp_path / "one", tmp_path / "two")
    assert not (tmp_path / "two" / "_index_work").exists()


# `featuredb index` whose ranks each stop after their first batch, as a kill would (that batch's
# checkpoint is saved: --checkpoint-seconds 0).
INTERRUPTED_RUN = """
import sys
import featuredb.indexer.run as run
from featuredb.cli import index

def stop_after_first_batch(n):
    raise SystemExit(3)

run_index = run.run_index
run.run_index = lambda config: run_index(config, on_batch=stop_after_first_batch)
index(sys.argv[1:])
"""


def test_resume_every_rank_and_refuse_another_world_size(tiny_gemma2, coders, corpus_jsonl, tmp_path):
    args = index_args(tiny_gemma2, coders, corpus_jsonl, "--tokens", "150")  # the budget cuts mid-stream
    index_one_process(args, tmp_path / "one")

    db = tmp_path / "two"
    script = tmp_path / "interrupted_run.py"
    script.write_text(INTERRUPTED_RUN)
    interrupted = torchrun([str(script), *args, "--db", str(db)], cwd=tmp_path)
    assert interrupted.returncode != 0
    work_dir = db / "_index_work"
    progress = json.loads((work_dir / "rank-1-of-2" / "checkpoint" / "progress.json").read_text())
    assert progress["contexts"] == 3 and not progress["finished"]
    assert FeatureStore(str(db)).coders().is_empty()

    # one process cannot resume what two started: one line, and the checkpoints stay
    refused = CliRunner().invoke(main, ["index", *args, "--db", str(db), "--resume"])
    assert refused.exit_code == 1
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "made by 2 process(es)" in lines[0], refused.output
    assert (work_dir / "rank-1-of-2" / "checkpoint" / "progress.json").exists()

    resumed = torchrun(["-m", "featuredb.indexer", *args, "--db", str(db), "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_catalogue(tmp_path / "one", db)
    assert not work_dir.exists()


def test_distributed_flag_outside_torchrun_is_one_line_error(tiny_gemma2, coders, corpus_jsonl, tmp_path):
    args = index_args(tiny_gemma2, coders, corpus_jsonl, "--distributed")
    result = CliRunner().invoke(main, ["index", *args, "--db", str(tmp_path / "db")])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "torchrun" in result.output


# ---------------------------------------------------------------------------- coder groups

# `featuredb index` that records every coder each rank loads, in loaded-by-rank-R.txt in its working
# directory (rank 0 loads them all: it checks them, and writes every coder; the other ranks should
# load only their group's).
RECORDING_RUN = """
import os
import sys
import featuredb.indexer.run as run
from featuredb.cli import index

load_coder = run.load_coder

def recording_load_coder(spec, **kwargs):
    with open(f"loaded-by-rank-{os.environ['RANK']}.txt", "a") as f:
        f.write(spec + "\\n")
    return load_coder(spec, **kwargs)

run.load_coder = recording_load_coder
index(sys.argv[1:])
"""


def coders_loaded(directory: Path, rank: int) -> set[str]:
    # the plan pins every spec as ID=LOCATION; the location is what the test named
    return {line.split("=", 1)[-1] for line in (directory / f"loaded-by-rank-{rank}.txt").read_text().splitlines()}


def test_assign_coders_balances_widths_largest_first():
    assert assign_coders([48, 36], 2) == [0, 1]
    assert assign_coders([16, 64, 16, 32, 16], 2) == [1, 0, 1, 1, 0]  # 64 + 16 | 32 + 16 + 16
    assert assign_coders([8, 8, 8, 8], 2) == [0, 1, 0, 1]  # ties: the order given, then the lowest group
    assert assign_coders([5, 7, 3], 1) == [0, 0, 0]


@pytest.mark.parametrize("nproc", [2, 4])
def test_coder_groups_equal_one_process(tiny_gemma2, coders, corpus_jsonl, tmp_path, nproc):
    # 2 groups: the 48-wide coder in group 0, the 36-wide one in group 1; with 4 processes each
    # group splits the corpus between its 2 ranks (0, 1 | 2, 3)
    args = index_args(tiny_gemma2, coders, corpus_jsonl, "--coder-groups", "2")
    index_one_process(index_args(tiny_gemma2, coders, corpus_jsonl), tmp_path / "one")
    script = tmp_path / "recording_run.py"
    script.write_text(RECORDING_RUN)
    run = torchrun([str(script), *args, "--db", str(tmp_path / "groups")], cwd=tmp_path, nproc=nproc)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"on {nproc} processes in 2 coder groups" in run.stdout
    assert_same_catalogue(tmp_path / "one", tmp_path / "groups")
    members = nproc // 2
    for rank in range(1, nproc):
        assert coders_loaded(tmp_path, rank) == {coders[rank // members]}, rank
    assert not (tmp_path / "groups" / "_index_work").exists()


def test_resume_with_other_coder_groups_is_refused(tiny_gemma2, coders, corpus_jsonl, tmp_path, monkeypatch):
    args = index_args(tiny_gemma2, coders, corpus_jsonl, "--tokens", "150")
    index_one_process(args, tmp_path / "one")
    db = tmp_path / "groups"
    script = tmp_path / "interrupted_run.py"
    script.write_text(INTERRUPTED_RUN)
    interrupted = torchrun([str(script), *args, "--coder-groups", "2", "--db", str(db)], cwd=tmp_path)
    assert interrupted.returncode != 0
    assert (db / "_index_work" / "rank-1-of-2" / "checkpoint" / "progress.json").exists()

    # rank 0 of 2 without --coder-groups: refused before it waits for the others
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused = CliRunner().invoke(main, ["index", *args, "--db", str(db), "--resume"])
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert refused.exit_code == 1 and len(lines) == 1, refused.output
    assert lines[0].startswith("error: ") and "made with --coder-groups 2, this run has 1" in lines[0]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")

    resumed = torchrun(["-m", "featuredb.indexer", *args, "--coder-groups", "2", "--db", str(db), "--resume"],
                       cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_catalogue(tmp_path / "one", db)


@pytest.mark.parametrize("world, groups, message", [
    (None, 2, "--coder-groups needs torchrun with a world size divisible by 2 (this run has 1 process(es))"),
    (3, 2, "--coder-groups needs torchrun with a world size divisible by 2 (this run has 3 process(es))"),
    (3, 3, "--coder-groups 3 is more than the 2 coder(s)"),
])
def test_bad_coder_groups_are_one_line_errors(tiny_gemma2, coders, corpus_jsonl, tmp_path, monkeypatch,
                                              world, groups, message):
    if world is not None:  # as torchrun would start rank 0 (the check comes before any collective)
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    args = index_args(tiny_gemma2, coders, corpus_jsonl, "--coder-groups", str(groups))
    result = CliRunner().invoke(main, ["index", *args, "--db", str(tmp_path / "db")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]
    assert not (tmp_path / "db").exists()


def test_rank_0_alone_checks_and_reports_what_replace_drops(tiny_gemma2, coders, corpus_jsonl, tmp_path):
    args = index_args(tiny_gemma2, coders, corpus_jsonl)
    db = tmp_path / "db"
    index_one_process(args, db)
    refused = torchrun(["-m", "featuredb.indexer", *args, "--db", str(db)], cwd=tmp_path)
    assert refused.returncode != 0 and "--replace" in refused.stderr, refused.stderr[:3000]
    assert "rank 0 stopped" in refused.stderr  # rank 1 did not wait for it
    replaced = torchrun(["-m", "featuredb.indexer", *args, "--db", str(db), "--replace"], cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    notes = [line for line in replaced.stderr.splitlines() if line.startswith("replacing coder ")]
    assert len(notes) == len(coders)  # once each: rank 0 alone
    assert_same_catalogue(db, db)
