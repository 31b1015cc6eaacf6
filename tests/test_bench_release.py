"""scripts/bench_release.py at a tiny scale: the release's ids and layers on a tiny 16-layer Gemma 3,
the passes the budget forces, each pass's figures, forward-only tokens/s and the verdict."""

from __future__ import annotations

import importlib.util
import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_release.py"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_release", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        module.CACHE = tmp_path_factory.mktemp("bench-release-cache")  # not the shared /tmp cache
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def deep_tiny_gemma3(tmp_path_factory) -> Path:
    """A tiny random Gemma 3 (hidden 64) with 16 layers: deep enough for the release's layers 5/9/12/15."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from conftest import _common_config, _randomise_norms, build_tokenizer

    import torch

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = Gemma3TextConfig(**(_common_config(tokenizer) | {"num_hidden_layers": 16}), query_pre_attn_scalar=16,
                              sliding_window=8)
    model = Gemma3ForCausalLM(config)
    _randomise_norms(model, 0)
    out = tmp_path_factory.mktemp("gemma3-16")
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_release_ids_layers_and_scaled_widths(bench):
    coders = bench.release_coders(Fraction(1, 512))
    assert len(coders) == 52 and sorted({c.layer for c in coders}) == [5, 9, 12, 15]
    widths = {c.sae_id: c.width for c in coders}
    assert widths["layer_9_width_16k_l0_small"] == 64  # 32 rounds up to the minimum
    assert widths["layer_9_width_65k_l0_medium"] == 128 and widths["layer_9_width_1m_l0_big"] == 2048
    assert sum(widths.values()) == 35_072
    assert bench.release_coders(Fraction(1), ["layer_5_width_262k_*"])[0].width == 1 << 18
    seeded = bench.release_coders(Fraction(1, 1024), ["*_seed_1"])
    assert [c.layer for c in seeded] == [5, 9, 12, 15]
    big = next(c for c in coders if c.sae_id == "layer_12_width_1m_l0_big")
    assert big.target_l0 == pytest.approx(150 / 512)
    assert bench.parse_scale("1/256") == Fraction(1, 256)


@pytest.fixture()
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation (and spins on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_run_prints_every_figure(bench, deep_tiny_gemma3, tmp_path, capsys, one_thread):
    out = tmp_path / "release.json"
    result = bench.main(["--model", str(deep_tiny_gemma3), "--width-scale", "1/4096",
                         "--coders", "layer_*_width_16k_l0_small", "--coders", "layer_1[25]_width_65k_l0_small",
                         "--tokens", "400", "--batch-size", "4", "--context", "32", "--top-k", "4",
                         "--memory", "1MiB", "--full-memory", "70GiB", "--full-memory", "1GiB",
                         "--calibration-tokens", "1024", "--device", "cpu", "--out-json", str(out), "-q"])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))

    assert result["coders"] == 6 and result["features"] == 6 * 64
    assert result["budget_bytes"] == 1 << 20 and result["plan"]["budget_bytes"] == 1 << 20
    passes = result["passes"]
    assert len(passes) >= 2  # 1 MiB holds two 64-wide coders at a time
    assert sorted(c for p in passes for c in p["coders"]) == sorted(
        [f"resid_post-layer_{layer}_width_16k_l0_small" for layer in (5, 9, 12, 15)]
        + [f"resid_post-layer_{layer}_width_65k_l0_small" for layer in (12, 15)])
    for p in passes:
        assert 0 < p["bytes"] <= result["budget_bytes"]
        assert p["tokens"] == result["tokens"] > 0 and p["tokens_per_second"] > 0 and p["seconds"] > 0
        assert p["forward_tokens_per_second"] > 0 and p["forward_over_pass"] > 0
        for phase in ("load", "stream", "write", "pass"):
            assert p[f"rss_{phase}_bytes"] is not None
        assert p["stream_seconds"] > 0 and p["write_seconds"] > 0 and p["load_seconds"] > 0
    assert set(result["forward_only"]) == {str(max(p["layers"])) for p in passes}
    m = result["memory"]
    assert m["budget_bytes"] == 1 << 20 and m["under_budget"] == (m["coders_peak_bytes"] <= m["budget_bytes"])
    assert m["coders_peak_bytes"] == max(p["coders_stream_bytes"] for p in passes)
    assert all(p["coders_stream_bytes"] == p["rss_stream_bytes"] - m["forward_working_bytes"] for p in passes)
    assert m["forward_working_bytes"] >= 0
    assert m["peak_bytes"] >= m["stream_peak_bytes"] and m["largest_planned_pass_bytes"] <= 1 << 20
    assert m["rss_model_bytes"] > 0 and m["rss_peak_bytes"] >= m["rss_model_bytes"]
    assert result["mean_l0"]["measured"] is not None

    full = {plan["budget_bytes"]: plan for plan in result["full_width"]}
    assert len(full[70 << 30]["passes"]) == 1  # 4 x 16k + 2 x 65k features at full width
    assert "error" in full[1 << 30] or len(full[1 << 30]["passes"]) > 1

    for phrase in ("plan:", "pass", "forward only", "tokens/s", "budget", "PASS" if m["under_budget"] else "FAIL",
                   "full widths"):
        assert phrase in printed
