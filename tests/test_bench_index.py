"""scripts/bench_index.py: every figure issue 7's GPU run needs is printed and in the JSON, and the
naive dense top-K (the baseline) agrees with the indexer's top-K on the same activations."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from featuredb.indexer.stats import FeatureStats, StatsConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_index.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_index", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


# small and short: 32-token contexts, 3 timed batches, a 1-second end-to-end run, 1 profiled step
TINY = ["--context", "32", "--batches", "3", "--seconds", "1", "--profile", "1", "--peak-size", "256",
        "--peak-seconds", "0.05", "--device", "cpu"]


def test_tiny_run_prints_every_figure(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(["--shape", "tiny", *TINY, "--json-out", str(out)])
    printed = capsys.readouterr().out
    last = json.loads(printed.strip().splitlines()[-1])  # the JSON line is the last line
    assert last == json.loads(out.read_text()) == json.loads(json.dumps(result))

    stages = [row["stage"] for row in last["rows"]]
    assert stages[:3] == ["forward only", "forward + encode [float32 coders]", "forward + encode + statistics [float32]"]
    assert any(s.startswith("forward + encode + naive top-K") for s in stages)
    assert any(s.startswith("full step end to end") for s in stages)
    for row in last["rows"]:
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0 and 0 < row["bf16_peak_fraction"]
    ratios = last["ratios"]["float32"]
    for key in ("encode_over_forward", "statistics_over_forward_encode", "encode_tflops", "statistics_ms_per_batch"):
        assert ratios[key] > 0
    assert last["peak_tflops"]["bfloat16"] > 0 and last["peak_tflops"]["float32"] > 0
    assert last["flops_per_token"]["model"] > 0 and last["flops_per_token"]["encode"] == 2 * 4 * 64 * 512
    assert last["model_params_run"] > 0 and last["layers"] == [0, 1, 2, 3]
    assert 4 <= last["mean_l0"]["float32"] <= 64  # target 16

    d = last["duration"]
    assert d["tokens"] > 0 and d["tokens_per_s"] > 0 and d["minutes_per_100M_tokens"] > 0
    assert d["memory_end_bytes"] > 0 and "statistics_over_forward_encode_steady" in d

    m = last["memory"]
    assert m["peak_bytes"] > 0 and m["stats_state_bytes"] > 0
    assert m["stats_state_bytes_after"] == m["stats_state_bytes"]  # grows with features, not tokens
    assert m["stats_state_bytes_per_feature"] == m["stats_state_bytes"] / (4 * 512)

    check = last["naive"]["check"]
    assert check["ok"] and check["values_equal"] and check["entries"] > 0
    assert check["context_differences"] == 0 and check["token_value_differences"] == 0  # float32: no ties
    assert last["naive"]["naive_over_indexer_statistics"] > 0
    assert last["profile"]["top_ops"]

    for phrase in ("tokens/s", "forward only", "naive dense top-K", "100M tokens in", "statistics state",
                   "peak matmul", "top-K check"):
        assert phrase in printed


def test_gemma3_shape_and_two_coder_dtypes(bench, capsys):
    result = bench.main(["--shape", "tiny-gemma3", *TINY, "--seconds", "0", "--profile", "0",
                         "--coder-dtype", "float32", "bfloat16", "--coders", "2"])
    capsys.readouterr()
    assert result["layers"] == [0, 3] and result["coder_dtypes"] == ["float32", "bfloat16"]
    stages = [row["stage"] for row in result["rows"]]
    assert "forward + encode + statistics [bfloat16]" in stages and result["duration"] is None
    assert set(result["ratios"]) == {"float32", "bfloat16"} and result["naive"]["check"]["ok"]


def test_naive_top_k_matches_indexer_with_ties(bench):
    """Quantised values tie, also at the K-th place, where topk and the indexer may keep different
    contexts: the check tells such ties from real differences."""
    gen = torch.Generator().manual_seed(0)
    F, T, K, B = 64, 8, 4, 6
    stats = FeatureStats(F, T, StatsConfig(top_k=K))
    naive = bench.NaiveTopK(F, T, K, torch.device("cpu"))
    for n in range(10):
        acts = (torch.rand(B, T, F, generator=gen) * 64).floor() / 16  # 64 levels: frequent ties
        acts[torch.rand(B, T, F, generator=gen) < 0.8] = 0
        ids = torch.arange(n * B, (n + 1) * B)
        stats.update(acts, ids, B * T)
        naive.update(acts, ids)
    check = bench.compare_top(stats, naive)
    assert check["values_equal"] and check["unexplained"] == 0 and check["token_value_differences"] == 0
    assert 0 < check["context_differences"] < check["entries"]  # some ties at the K-th place, most not

    # real differences are caught: a per-token value, then a value
    naive.tokens[0, :, 5] += 1.0  # the best context of feature 5 (no tie at the top here)
    assert bench.compare_top(stats, naive)["token_value_differences"] >= 1
    naive.value[0, 7] += 1.0
    assert not bench.compare_top(stats, naive)["values_equal"]


def test_layer_choice_and_batch_cap(bench):
    assert bench.pick_layers(26, 26) == list(range(26))
    assert bench.pick_layers(26, 1) == [13]
    assert bench.pick_layers(26, 3) == [0, 12, 25]
    args = bench.parse_args(["--shape", "gemma-2-2b", "--width", str(2 ** 20), "--coders", "1"])
    assert args.batch_size * args.context * args.width * 4 <= bench.DENSE_BATCH_BYTES
    quick = bench.parse_args(["--quick"])
    assert (quick.shape, quick.coder_dtype, quick.batch_size, quick.seconds) == (
        "gemma-2-2b", ["bfloat16", "float32"], 128, 150.0)
    assert bench.parse_args([]).shape == "smollm2" and bench.parse_args(["--batches", "10"]).batches == 10
