"""Coders named by release, fetched through the real huggingface_hub code from a local mirror.

The Hugging Face hub is not reachable from the tests, so a mirror is written in the exact layout of
huggingface_hub's cache (`models--owner--repo/snapshots/<sha>/...` and `refs/main`) and the hub is
put offline: `snapshot_download` then answers from the cache, as it does for a user who downloaded
before. A recorder wrapped around it keeps the patterns featuredb asks for, which are what an
online run would download.
"""

from __future__ import annotations

import fnmatch
import json

import pytest
from click.testing import CliRunner

from coder_formats import write_gemma_scope_1, write_gemma_scope_2_multi_layer
from featuredb.cli import main
from featuredb.runtime.registry import resolve
from featuredb.store import FeatureStore

SHA = "0123456789abcdef0123456789abcdef01234567"
RELEASE, SAE_ID = "gemma-scope-2b-pt-res-canonical", "layer_1/width_16k/canonical"  # the tiny model has layers 0..2


def mirror(cache, repo_id: str):
    """The snapshot folder of `repo_id` in a hub cache, with refs/main pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """An offline hub cache under tmp_path; returns (cache, the allow_patterns asked for)."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for name, value in {"HF_HOME": tmp_path / "hf", "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    # huggingface_hub read the environment when it was first imported: set what it keeps, too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    real, asked = huggingface_hub.snapshot_download, []

    def recording_snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, list(kwargs.get("allow_patterns") or ["*"])))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording_snapshot_download)
    return cache, asked


def fetched(asked, repo_id: str, path: str) -> bool:
    """Whether any snapshot_download call asked for the file at `path` of `repo_id`."""
    return any(repo == repo_id and any(fnmatch.fnmatch(path, p) for p in patterns) for repo, patterns in asked)


def test_index_a_coder_named_by_release_from_the_hub_cache(tiny_gemma2, corpus_jsonl, offline_hub, tmp_path):
    cache, asked = offline_hub
    named = resolve(RELEASE, SAE_ID)
    assert named.path == "layer_1/width_16k/average_l0_102"
    scratch = write_gemma_scope_1(tmp_path / "scratch", "res", 1, 64, 48, fire_rate=0.1, seed=1)
    folder = mirror(cache, named.repo_id) / named.path
    folder.mkdir(parents=True)
    (folder / "params.npz").write_bytes((scratch / "params.npz").read_bytes())
    decoy = folder / "params_bf16.safetensors"  # another file in the coder's folder: never asked for
    decoy.write_bytes(b"\0" * (4 << 20))

    db = tmp_path / "db"
    result = CliRunner().invoke(main, ["index", "-m", str(tiny_gemma2), "--coder", f"{RELEASE}:{SAE_ID}",
                                       "--corpus", str(corpus_jsonl), "--db", str(db), "--context", "16",
                                       "--batch-size", "3", "-q"])
    assert result.exit_code == 0, result.output
    coder_id = "gemma-scope-2b-pt-res-canonical-layer_1-width_16k-canonical"
    assert coder_id in result.stdout
    (stored,) = FeatureStore(str(db)).coders().to_dicts()
    assert stored["coder_id"] == coder_id
    assert stored["source"] == "hf://google/gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_102"
    assert stored["hook"] == stored["hook_out"] == named.hook == "model.layers.1.output"  # path rules == registry
    assert (stored["layer"], stored["width"]) == (1, 48)

    assert fetched(asked, named.repo_id, f"{named.path}/params.npz")
    assert not fetched(asked, named.repo_id, f"{named.path}/{decoy.name}")
    assert all(p.startswith(named.path + "/") for _, patterns in asked for p in patterns)  # nothing outside it

    out = tmp_path / "np"
    exported = CliRunner().invoke(main, ["export", "--format", "neuronpedia", "--db", str(db), "--out", str(out), "-q"])
    assert exported.exit_code == 0, exported.output
    assert "gemma-2-2b/1-gemmascope-res-16k" in exported.stdout.splitlines()[-1]  # the registry's Neuronpedia id
    assert json.loads((out / "gemma-2-2b" / "1-gemmascope-res-16k" / "source.jsonl").read_text())["setName"] == \
        "gemmascope-res-16k"


def test_a_cross_layer_transcoder_from_the_hub_cache_indexes_fetching_only_its_files(tiny_gemma3, corpus_jsonl,
                                                                                        offline_hub, tmp_path):
    cache, asked = offline_hub
    repo_id = "google/gemma-scope-2-270m-pt"
    scratch = write_gemma_scope_2_multi_layer(tmp_path / "scratch", "clt", 3, 64, 12, affine=True, fire_rate=0.15)
    folder = mirror(cache, repo_id) / "clt" / scratch.name
    folder.mkdir(parents=True)
    for file in scratch.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    decoy = folder / "params_bf16.safetensors"  # another file in the coder's folder: never asked for
    decoy.write_bytes(b"\0" * 1024)

    db = tmp_path / "db"
    result = CliRunner().invoke(main, ["index", "-m", str(tiny_gemma3), "--coder", f"{repo_id}/clt/{scratch.name}",
                                       "--corpus", str(corpus_jsonl), "--db", str(db), "--context", "16", "-q"])
    assert result.exit_code == 0, result.output
    (stored,) = FeatureStore(str(db)).coders().to_dicts()
    assert (stored["kind"], stored["width"], stored["layers"]) == ("clt", 36, [0, 1, 2])
    assert stored["source"] == f"hf://{repo_id}/clt/{scratch.name}"
    assert fetched(asked, repo_id, f"clt/{scratch.name}/config.json")
    assert all(fetched(asked, repo_id, f"clt/{scratch.name}/params_layer_{i}.safetensors") for i in range(3))
    assert not fetched(asked, repo_id, f"clt/{scratch.name}/{decoy.name}")
