"""Two CPU processes under torchrun (gloo) write the same catalogue as one process, row for row;
a distributed run killed mid-way resumes on every rank; a resume with another world size is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from featuredb.cli import main
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
    # batch size 3: 8 batches of the 22 contexts, the last one short, split 4 / 4 between two ranks
    args = ["--model", str(model), "--corpus", str(corpus), "--context", str(CONTEXT), "--batch-size", "3",
            "--top-k", "4", "--quiet", "--checkpoint-seconds", "0", *extra]
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
    assert a.saes().drop("created_at").sort("sae_id").equals(b.saes().drop("created_at").sort("sae_id"))
    assert len(a.saes()) == 2
    for sae_id in a.saes()["sae_id"]:
        assert a.features(sae_id).sort("feature").equals(b.features(sae_id).sort("feature"))
        examples = a.examples(sae_id)
        assert len(examples) > 0 and examples.equals(b.examples(sae_id))


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
    assert FeatureStore(str(db)).saes().is_empty()

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
