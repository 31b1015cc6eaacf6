"""Gemma Scope coders named as SAELens names them, resolved offline from the shipped registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from featuredb.cli import main
from featuredb.errors import CoderError
from featuredb.runtime.registry import hooks_for, neuronpedia_id, neuronpedia_source, release_rows, releases, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_the_issue_example_resolves():
    coder = resolve("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")
    assert (coder.repo_id, coder.path) == ("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")
    assert coder.neuronpedia == "gemma-2-2b/12-gemmascope-res-16k" and coder.model == "gemma-2-2b"
    assert coder.hook == coder.hook_out == "model.layers.12.output"
    assert coder.hub_ref == "google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"


@pytest.mark.parametrize("release, sae_id, hook, hook_out", [
    ("gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_medium", "model.layers.12.output", "model.layers.12.output"),
    ("gemma-scope-2-270m-pt-transcoders", "transcoder/layer_9_width_16k_l0_small_affine",
     "model.layers.9.pre_feedforward_layernorm.output", "model.layers.9.post_feedforward_layernorm.output"),
    ("gemma-scope-2b-pt-transcoders", "layer_3/width_16k/average_l0_54",
     "model.layers.3.pre_feedforward_layernorm.normalized_input", "model.layers.3.post_feedforward_layernorm.output"),
    ("gemma-scope-2b-pt-att-canonical", "layer_5/width_16k/canonical",
     "model.layers.5.self_attn.o_proj.input", "model.layers.5.self_attn.o_proj.input"),
])
def test_hooks_follow_the_repo_or_folder(release, sae_id, hook, hook_out):
    coder = resolve(release, sae_id)
    assert (coder.hook, coder.hook_out) == (hook, hook_out)


def test_every_gemma_scope_release_and_coder_is_there():
    table = releases()
    families = {name.split("-pt")[0].split("-it")[0] for name in table}
    assert {"gemma-scope-2b", "gemma-scope-9b", "gemma-scope-27b", "gemma-scope-2-270m", "gemma-scope-2-1b",
            "gemma-scope-2-4b", "gemma-scope-2-12b", "gemma-scope-2-27b"} <= families
    total = sum(len(entry["saes"]) for entry in table.values())
    assert total > 10_000
    unhooked = [(name, row[1]) for name, entry in table.items() for row in entry["saes"]
                if hooks_for(entry["repo_id"], row[1])[0] is None]
    assert all(path.startswith("embedding/") for _, path in unhooked)  # only embedding SAEs have no layer


def test_unknown_names_are_one_line_with_close_matches():
    with pytest.raises(CoderError, match="did you mean 'gemma-scope-2b-pt-res-canonical'"):
        resolve("gemma-scope-2b-pt-res-canonicl", "layer_12/width_16k/canonical")
    with pytest.raises(CoderError, match="no coder 'layer_12/width_16k/canonicl'.*'layer_12/width_16k/canonical'"):
        resolve("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonicl")
    result = CliRunner().invoke(main, ["coders", "resolve", "nope-release", "x"])
    assert result.exit_code == 1 and result.stderr.startswith("error: unknown release") and result.stderr.count("\n") == 1


def test_cli_resolve_json_and_list():
    result = CliRunner().invoke(main, ["coders", "resolve", "gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_medium",
                                       "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"repo_id", "path", "neuronpedia", "model", "hook"} <= set(data)
    assert data["neuronpedia"] == "gemma-3-270m/12-gemmascope-2-res-16k"
    listed = CliRunner().invoke(main, ["coders", "list", "--model", "gemma-3-270m", "--json"])
    rows = json.loads(listed.output)
    assert rows and all(r["model"] == "google/gemma-3-270m" for r in rows)
    assert {r["release"] for r in rows} == {r["release"] for r in release_rows("google/gemma-3-270m")}
    assert CliRunner().invoke(main, ["coders", "list", "--model", "no-such-model"]).exit_code == 1


def test_neuronpedia_id_of_a_stored_source():
    hub = "hf://google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"
    assert neuronpedia_source(hub) == neuronpedia_source(hub, "model.layers.12.output") == \
        "gemma-2-2b/12-gemmascope-res-16k"
    cached = "/home/u/.cache/huggingface/hub/models--google--gemma-scope-2b-pt-res/snapshots/abc/layer_12/width_16k/average_l0_82"
    assert neuronpedia_source(cached) == neuronpedia_source(cached + "/params.npz") == "gemma-2-2b/12-gemmascope-res-16k"
    assert neuronpedia_source(hub, "model.layers.4.output") is None  # indexed at another hook (@HOOK)
    for other in ("/runs/my-sae", "", "google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82",  # no hf://
                  "hf://google/gemma-scope-2b-pt-res", "hf://someone/else/layer_12/width_16k/average_l0_82"):
        assert neuronpedia_source(other) is None, other


def test_a_folder_listed_twice_gets_the_canonical_neuronpedia_id():
    # gemma-scope-2b-pt-res lists it as gemma-2-2b/5-gemmascope-res-1m__l0-114, its -canonical twin without __l0
    ids = {row[2] for entry in releases().values() if entry["repo_id"] == "google/gemma-scope-2b-pt-res"
           for row in entry["saes"] if row[1] == "layer_5/width_1m/average_l0_114"}
    assert ids == {"gemma-2-2b/5-gemmascope-res-1m__l0-114", "gemma-2-2b/5-gemmascope-res-1m"}
    assert neuronpedia_id("google/gemma-scope-2b-pt-res", "layer_5/width_1m/average_l0_114") == \
        "gemma-2-2b/5-gemmascope-res-1m"
    assert neuronpedia_id("google/gemma-scope-2b-pt-res", "layer_5/width_16k/average_l0_143") == \
        "gemma-2-2b/5-gemmascope-res-16k__l0-143"  # listed once: its own id


def test_the_generator_writes_what_the_reader_reads(tmp_path, monkeypatch):
    yaml_text = """
gemma-scope-2b-pt-res-canonical:
  conversion_func: gemma_2
  model: gemma-2-2b
  repo_id: google/gemma-scope-2b-pt-res
  saes:
  - id: layer_1/width_16k/canonical
    neuronpedia: gemma-2-2b/1-gemmascope-res-16k
    path: layer_1/width_16k/average_l0_102
other-release:
  model: gpt2
  repo_id: someone/else
  saes: []
"""
    source = tmp_path / "pretrained_saes.yaml"
    source.write_text(yaml_text)
    out = tmp_path / "registry.json.gz"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_coder_registry.py"), str(source), str(out)],
                   check=True, capture_output=True)
    import featuredb.runtime.registry as registry

    monkeypatch.setattr(registry, "REGISTRY_FILE", out)
    registry.releases.cache_clear()
    try:
        assert list(registry.releases()) == ["gemma-scope-2b-pt-res-canonical"]  # only Gemma Scope is kept
        assert registry.resolve("gemma-scope-2b-pt-res-canonical", "layer_1/width_16k/canonical").path == \
            "layer_1/width_16k/average_l0_102"
    finally:
        registry.releases.cache_clear()
