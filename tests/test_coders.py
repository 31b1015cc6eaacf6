"""featuredb.runtime.coders: loading every format, the encode/decode math, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np_safetensors
from safetensors.numpy import save_file as save_np_safetensors

from featuredb.runtime.coders import CoderError, SparseCoder, load_coder, named_coder, parse_coder_spec

sys.path.insert(0, str(Path(__file__).parent))
from coder_formats import write_gemma_scope_1, write_gemma_scope_2, write_saelens  # noqa: E402

D_IN, D_SAE = 16, 48


def raises_coder_error(match: str):
    return pytest.raises(CoderError, match=match)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def npz_arrays(coder_dir: Path) -> dict[str, np.ndarray]:
    with np.load(coder_dir / "params.npz", allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def assert_tensors(coder: SparseCoder, arrays: dict[str, np.ndarray], names: dict[str, str]) -> None:
    for attr, key in names.items():
        np.testing.assert_array_equal(getattr(coder, attr).numpy(), arrays[key], err_msg=attr)


# ----------------------------------------------------------------------------------------------
# specs


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("/a/b", (None, "/a/b", None)),
        ("my-sae=/a/b", ("my-sae", "/a/b", None)),
        ("/a/b@model.layers.3.output", (None, "/a/b", "model.layers.3.output")),
        ("x.1=owner/repo/sub/dir@blocks.3.hook_resid_post", ("x.1", "owner/repo/sub/dir", "blocks.3.hook_resid_post")),
        ("./lr=3e-4/sae", (None, "./lr=3e-4/sae", None)),  # '/' before '=': not an id
        ("hf://owner/repo/sub", (None, "hf://owner/repo/sub", None)),
        ("/runs/a@b/sae", (None, "/runs/a@b/sae", None)),  # '@' followed by a path: not a hook
    ],
)
def test_parse_coder_spec(spec, expected):
    assert parse_coder_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "   ", "id=", "/a/b@", "@model.layers.1.output"])
def test_parse_coder_spec_rejects_empty_parts(spec):
    with pytest.raises(CoderError) as excinfo:
        parse_coder_spec(spec)
    one_line(excinfo)


# ----------------------------------------------------------------------------------------------
# Gemma Scope 1


@pytest.mark.parametrize(
    "site, kind, hook, hook_out",
    [
        ("res", "sae", "model.layers.3.output", "model.layers.3.output"),
        ("mlp", "sae", "model.layers.3.post_feedforward_layernorm.output", "model.layers.3.post_feedforward_layernorm.output"),
        ("att", "sae", "model.layers.3.self_attn.o_proj.input", "model.layers.3.self_attn.o_proj.input"),
        (
            "transcoders",
            "transcoder",
            "model.layers.3.pre_feedforward_layernorm.normalized_input",
            "model.layers.3.post_feedforward_layernorm.output",
        ),
    ],
)
def test_gemma_scope_1_round_trip(tmp_path, site, kind, hook, hook_out):
    coder_dir = write_gemma_scope_1(tmp_path, site, 3, D_IN, D_SAE, l0=7, model_size="9b", variant="it")
    coder = load_coder(str(coder_dir))
    assert_tensors(coder, npz_arrays(coder_dir), {n: n for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
    assert (coder.architecture, coder.kind, coder.hook, coder.hook_out, coder.layer) == ("jumprelu", kind, hook, hook_out, 3)
    assert coder.coder_id == f"{site}-layer_3-width_{D_SAE}-average_l0_7"
    assert (coder.d_in, coder.d_sae, coder.d_out, coder.width) == (D_IN, D_SAE, D_IN, D_SAE)
    assert coder.model_name == "google/gemma-2-9b-it"
    assert coder.source == str(coder_dir)
    assert coder.threshold.dtype == torch.float32 and coder.affine_skip is None and coder.k is None


def test_gemma_scope_1_spec_may_name_the_npz_file(tmp_path):
    coder_dir = write_gemma_scope_1(tmp_path, "res", 12, D_IN, D_SAE, l0=82)
    coder = load_coder(str(coder_dir / "params.npz"))
    assert coder.coder_id == f"res-layer_12-width_{D_SAE}-average_l0_82"
    assert coder.hook == "model.layers.12.output"


def test_gemma_scope_1_width_label_in_id(tmp_path):
    coder_dir = write_gemma_scope_1(tmp_path, "res", 12, D_IN, 1024, l0=82)
    assert load_coder(str(coder_dir)).coder_id == "res-layer_12-width_1k-average_l0_82"


def test_gemma_scope_1_without_path_convention_needs_a_hook(tmp_path):
    written = write_gemma_scope_1(tmp_path / "src", "res", 3, D_IN, D_SAE)
    bare = tmp_path / "my_download"
    bare.mkdir()
    (bare / "params.npz").write_bytes((written / "params.npz").read_bytes())

    with pytest.raises(CoderError, match="@HOOK") as excinfo:
        load_coder(str(bare))
    assert str(bare) in one_line(excinfo)

    coder = load_coder(f"{bare}@model.layers.5.post_feedforward_layernorm.output")
    assert (coder.hook, coder.hook_out, coder.layer, coder.kind) == (
        "model.layers.5.post_feedforward_layernorm.output",
        "model.layers.5.post_feedforward_layernorm.output",
        5,
        "sae",
    )
    assert coder.coder_id == "my_download"
    # TransformerLens names are accepted too
    assert load_coder(f"{bare}@blocks.4.hook_resid_post").hook == "model.layers.4.output"


# ----------------------------------------------------------------------------------------------
# Gemma Scope 2


@pytest.mark.parametrize(
    "folder, hook",
    [
        ("resid_post", "model.layers.12.output"),
        ("mlp_out", "model.layers.12.post_feedforward_layernorm.output"),
        ("attn_out", "model.layers.12.self_attn.o_proj.input"),
        ("resid_post_all", "model.layers.12.output"),
    ],
)
def test_gemma_scope_2_sae_round_trip(tmp_path, folder, hook):
    coder_dir = write_gemma_scope_2(tmp_path, folder, 12, D_IN, D_SAE, model_name="google/gemma-3-1b-pt")
    coder = load_coder(str(coder_dir))
    arrays = load_np_safetensors(str(coder_dir / "params.safetensors"))
    assert_tensors(coder, arrays, {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"})
    assert (coder.architecture, coder.kind, coder.hook, coder.hook_out, coder.layer) == ("jumprelu", "sae", hook, hook, 12)
    assert coder.coder_id == f"{folder}-layer_12_width_{D_SAE}_l0_medium"
    assert coder.model_name == "google/gemma-3-1b-pt"
    assert not coder.apply_b_dec_to_input


def test_gemma_scope_2_transcoder_and_skip_transcoder(tmp_path):
    plain = load_coder(str(write_gemma_scope_2(tmp_path, "transcoder", 7, D_IN, D_SAE, kind="transcoder", d_out=24)))
    assert (plain.kind, plain.affine_skip, plain.d_out, plain.layer) == ("transcoder", None, 24, 7)
    assert plain.hook == "model.layers.7.pre_feedforward_layernorm.output"
    assert plain.hook_out == "model.layers.7.post_feedforward_layernorm.output"

    skip_dir = write_gemma_scope_2(tmp_path, "transcoder", 7, D_IN, D_SAE, kind="transcoder", affine=True, l0="big")
    skip = load_coder(str(skip_dir))
    arrays = load_np_safetensors(str(skip_dir / "params.safetensors"))
    assert skip.kind == "skip_transcoder"
    assert skip.coder_id == f"transcoder-layer_7_width_{D_SAE}_l0_big_affine"
    np.testing.assert_array_equal(skip.affine_skip.numpy(), arrays["affine_skip_connection"])  # not transposed


# ----------------------------------------------------------------------------------------------
# SAELens


@pytest.mark.parametrize("cfg_style", ["metadata", "meta", "legacy"])
def test_saelens_jumprelu_round_trip(tmp_path, cfg_style):
    coder_dir = write_saelens(
        tmp_path / "gemma-2-2b-res-12", "jumprelu", D_IN, D_SAE, "blocks.12.hook_resid_post",
        apply_b_dec_to_input=False, cfg_style=cfg_style, model_name="gemma-2-2b",
    )  # fmt: skip
    coder = load_coder(str(coder_dir))
    arrays = load_np_safetensors(str(coder_dir / "sae_weights.safetensors"))
    assert_tensors(coder, arrays, {n: n for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
    assert (coder.architecture, coder.kind, coder.hook, coder.hook_out, coder.layer) == (
        "jumprelu", "sae", "model.layers.12.output", "model.layers.12.output", 12,
    )  # fmt: skip
    assert coder.coder_id == "gemma-2-2b-res-12"
    assert coder.model_name == "gemma-2-2b"
    assert coder.apply_b_dec_to_input is False


def test_saelens_log_threshold_is_exponentiated(tmp_path):
    coder_dir = write_saelens(tmp_path / "jr", "jumprelu", D_IN, D_SAE, "blocks.1.hook_resid_post", log_threshold=True)
    coder = load_coder(str(coder_dir))
    log_threshold = load_np_safetensors(str(coder_dir / "sae_weights.safetensors"))["log_threshold"]
    torch.testing.assert_close(coder.threshold, torch.exp(torch.from_numpy(log_threshold)))


@pytest.mark.parametrize("cfg_style", ["metadata", "legacy"])
def test_saelens_topk_round_trip(tmp_path, cfg_style):
    coder_dir = write_saelens(tmp_path / "topk", "topk", D_IN, D_SAE, "blocks.2.hook_mlp_out", k=5, cfg_style=cfg_style)
    coder = load_coder(str(coder_dir))
    assert (coder.architecture, coder.k, coder.threshold) == ("topk", 5, None)
    assert coder.hook == "model.layers.2.post_feedforward_layernorm.output"  # Gemma: MLP out after its norm
    assert load_coder(str(coder_dir), model_is_gemma=False).hook == "model.layers.2.mlp.output"
    assert coder.apply_b_dec_to_input is True


@pytest.mark.parametrize("cfg_style", ["metadata", "legacy"])
def test_saelens_standard_is_relu(tmp_path, cfg_style):
    coder_dir = write_saelens(tmp_path / "std", "standard", D_IN, D_SAE, "blocks.0.attn.hook_z", cfg_style=cfg_style)
    coder = load_coder(str(coder_dir))
    assert (coder.architecture, coder.hook, coder.layer) == ("relu", "model.layers.0.self_attn.o_proj.input", 0)
    assert coder.apply_b_dec_to_input is True


def test_saelens_topk_rescaled_by_decoder_norm_matches_saelens_formula(tmp_path):
    coder_dir = write_saelens(
        tmp_path / "tk", "topk", D_IN, D_SAE, "blocks.1.hook_resid_post", k=4, rescale_acts_by_decoder_norm=True
    )
    w = {key: torch.from_numpy(v) for key, v in load_np_safetensors(str(coder_dir / "sae_weights.safetensors")).items()}
    w["W_dec"] = w["W_dec"] * torch.linspace(0.5, 2.0, D_SAE)[:, None]  # uneven norms so the rescale matters
    save_np_safetensors({key: v.numpy() for key, v in w.items()}, str(coder_dir / "sae_weights.safetensors"))
    coder = load_coder(str(coder_dir))

    x = torch.randn(10, D_IN)
    norm = w["W_dec"].norm(dim=-1)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norm  # SAELens TopKSAE.encode
    top = pre.topk(4, dim=-1)
    f_ref = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    x_hat_ref = (f_ref / norm) @ w["W_dec"] + w["b_dec"]  # SAELens TopKSAE.decode
    torch.testing.assert_close(coder.encode(x), f_ref)
    torch.testing.assert_close(coder.decode(coder.encode(x)), x_hat_ref)


# ----------------------------------------------------------------------------------------------
# spec options: ID= and @HOOK


def test_id_prefix_and_hook_override(tmp_path):
    sae_dir = write_gemma_scope_1(tmp_path, "res", 3, D_IN, D_SAE)
    coder = load_coder(f"mine=./{os.path.relpath(sae_dir)}@model.layers.4.output")
    assert (coder.coder_id, coder.hook, coder.hook_out, coder.layer) == ("mine", "model.layers.4.output", "model.layers.4.output", 4)

    tc_dir = write_gemma_scope_2(tmp_path, "transcoder", 2, D_IN, D_SAE, kind="transcoder")
    coder = load_coder(f"tc={tc_dir}@model.layers.2.pre_feedforward_layernorm.normalized_input")
    assert coder.hook == "model.layers.2.pre_feedforward_layernorm.normalized_input"
    assert coder.hook_out == "model.layers.2.post_feedforward_layernorm.output"  # a transcoder keeps its output site


def test_bad_hook_override(tmp_path):
    sae_dir = write_gemma_scope_1(tmp_path, "res", 3, D_IN, D_SAE)
    with pytest.raises(CoderError, match="hook") as excinfo:
        load_coder(f"{sae_dir}@blocks.3.hook_no_such_site")
    one_line(excinfo)


# ----------------------------------------------------------------------------------------------
# hub references


def lay_out_like_hub(tmp_path: Path) -> tuple[Path, Path]:
    """A local snapshot dir holding google/gemma-scope-2b-pt-res's layer_3/width_16k/average_l0_50."""
    scratch = write_gemma_scope_1(tmp_path / "scratch", "res", 3, D_IN, D_SAE, l0=50)
    snapshot = tmp_path / "cache" / "models--google--gemma-scope-2b-pt-res" / "snapshots" / "abc123"
    target = snapshot / "layer_3" / "width_16k" / "average_l0_50"
    target.mkdir(parents=True)
    (target / "params.npz").write_bytes((scratch / "params.npz").read_bytes())
    return snapshot, target


@pytest.mark.parametrize("prefix", ["", "hf://"])
def test_hub_reference_downloads_the_subfolder(tmp_path, monkeypatch, prefix):
    import huggingface_hub

    snapshot, target = lay_out_like_hub(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ref = "google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_50"
    coder = load_coder(prefix + ref, cache_dir=str(tmp_path / "hf"))
    folder = "layer_3/width_16k/average_l0_50/"
    configs = [folder + "config.json", folder + "cfg.json"]
    weights = [folder + name for name in ("params.npz", "params.safetensors", "sae_weights.safetensors")]
    cache = str(tmp_path / "hf")
    # configs first, then only the files a coder reads (with the configs, from the same snapshot): never folder/*
    assert [(repo, kw["cache_dir"]) for repo, kw in calls] == [("google/gemma-scope-2b-pt-res", cache)] * 2
    assert calls[0][1]["allow_patterns"] == configs
    assert sorted(calls[1][1]["allow_patterns"]) == sorted(weights + configs)
    assert coder.coder_id == "res-layer_3-width_16k-average_l0_50"
    assert (coder.hook, coder.layer, coder.model_name) == ("model.layers.3.output", 3, "google/gemma-2-2b")
    assert coder.source == f"hf://{ref}"
    assert_tensors(coder, npz_arrays(target), {"W_enc": "W_enc", "threshold": "threshold"})


def test_whole_repo_hub_reference_fetches_root_files_only(tmp_path, monkeypatch):
    import huggingface_hub

    repo = write_saelens(tmp_path / "snap", "topk", D_IN, D_SAE, "blocks.1.hook_resid_post", k=3)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(kw) or str(repo))
    coder = load_coder("hf://someone/my-topk-sae")
    assert (coder.architecture, coder.source) == ("topk", "hf://someone/my-topk-sae")
    asked = [pattern for kw in calls for pattern in kw["allow_patterns"]]
    assert "sae_weights.safetensors" in asked and "cfg.json" in asked and "*" not in "".join(asked)


def test_hub_reference_with_missing_subfolder(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot, _ = lay_out_like_hub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(snapshot))
    with pytest.raises(CoderError, match="cannot download coder .* no files under 'layer_9/width_16k'") as excinfo:
        load_coder("google/gemma-scope-2b-pt-res/layer_9/width_16k")
    one_line(excinfo)


def test_hub_reference_failure_is_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CoderError) as excinfo:
        load_coder("google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_50")
    message = one_line(excinfo)
    assert message.startswith("cannot download coder 'google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_50' from the hub: ")
    assert "couldn't connect" in message


def test_real_hub_call_fails_fast_when_offline(tmp_path):
    script = (
        "from featuredb.runtime.coders import load_coder, CoderError\n"
        "try:\n"
        "    load_coder('google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_50')\n"
        "except CoderError as e:\n"
        "    print('CODER_ERROR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("CODER_ERROR cannot download coder"), result.stdout


# ----------------------------------------------------------------------------------------------
# coders named RELEASE:SAE_ID (SAELens's registry names)

CANONICAL_12 = "gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonical"


def test_release_names_resolve_and_paths_with_colons_stay_paths(tmp_path, monkeypatch):
    named = named_coder(CANONICAL_12)
    assert named.hub_ref == "google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"
    assert named_coder("/runs/a:b") is None and named_coder("hf://owner/repo/x:y") is None
    assert named_coder("owner/repo/sub") is None  # no ':' at all
    monkeypatch.chdir(tmp_path)
    coder_dir = write_gemma_scope_1(tmp_path / "dir:name", "res", 3, D_IN, D_SAE)
    local = coder_dir.relative_to(tmp_path)  # dir:name/gemma-scope-2b-pt-res/layer_3/...
    assert named_coder(str(local)) is None  # "dir" has no '/', but the whole is an existing path
    assert load_coder(str(local)).hook == load_coder(f"./{local}").hook == "model.layers.3.output"
    (tmp_path / "run:2").mkdir()  # an existing folder whose name looks like RELEASE:SAE_ID
    assert named_coder("run:2") is None


@pytest.mark.parametrize("spec, match", [
    ("gemma-scope-2b-pt-res-canonicl:layer_12/width_16k/canonical",
     "unknown release 'gemma-scope-2b-pt-res-canonicl'; did you mean 'gemma-scope-2b-pt-res-canonical'"),
    ("gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonicl",
     "has no coder 'layer_12/width_16k/canonicl'; did you mean 'layer_12/width_16k/canonical'"),
    ("mycoder:v2", "unknown release 'mycoder'.*nor is it an existing path"),
])
def test_unknown_release_names_are_one_line_with_close_matches(spec, match, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: pytest.fail("nothing to download"))
    with raises_coder_error(match) as excinfo:
        load_coder(spec)
    one_line(excinfo)


def gemma_scope_1_remote(tmp_path: Path, layer: int, folder: str) -> Path:
    """A local copy of google/gemma-scope-2b-pt-res holding one coder at `folder`, and a decoy beside it."""
    scratch = write_gemma_scope_1(tmp_path / "scratch", "res", layer, D_IN, D_SAE)
    remote = tmp_path / "remote"
    (remote / folder).mkdir(parents=True)
    (remote / folder / "params.npz").write_bytes((scratch / "params.npz").read_bytes())
    (remote / folder / "params_fp16_copy.safetensors").write_bytes(b"decoy: never fetched")
    return remote


def test_release_name_loads_the_registry_folder_with_a_readable_id(tmp_path, monkeypatch):
    remote = gemma_scope_1_remote(tmp_path, 12, "layer_12/width_16k/average_l0_82")
    snapshot = tmp_path / "cache" / "snapshots" / "abc"
    asked = fake_hub(monkeypatch, remote, snapshot)
    coder = load_coder(CANONICAL_12)
    assert coder.coder_id == "gemma-scope-2b-pt-res-canonical-layer_12-width_16k-canonical"
    assert coder.source == "hf://google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"
    # the path rules give the hook, and it is the registry's
    assert (coder.hook, coder.hook_out, coder.layer) == ("model.layers.12.output", "model.layers.12.output", 12)
    assert named_coder(CANONICAL_12).hook == coder.hook
    assert all(p.startswith("layer_12/width_16k/average_l0_82/") for p in asked)
    assert sorted(p.name for p in (snapshot / "layer_12/width_16k/average_l0_82").iterdir()) == ["params.npz"]

    assert load_coder(f"mine={CANONICAL_12}").coder_id == "mine"
    overridden = load_coder(f"{CANONICAL_12}@model.layers.4.output")  # @HOOK wins, as for a path
    assert (overridden.hook, overridden.layer) == ("model.layers.4.output", 4)


def test_release_name_whose_files_disagree_with_the_registry_is_refused(tmp_path, monkeypatch):
    # Gemma Scope 2: the hook comes from config.json; here it names layer 3 in the registry's layer-12 folder
    write_gemma_scope_2(tmp_path / "remote", "resid_post", 12, D_IN, D_SAE, width="16k",
                        hook_in="model.layers.3.output", hook_out="model.layers.3.output")
    fake_hub(monkeypatch, tmp_path / "remote", tmp_path / "snapshot")
    spec = "gemma-scope-2-270m-pt-res:layer_12_width_16k_l0_medium"
    with raises_coder_error("reads model.layers.3.output -> model.layers.3.output, but the registry's layout says "
                            "model.layers.12.output -> model.layers.12.output") as excinfo:
        load_coder(spec)
    one_line(excinfo)
    assert load_coder(f"{spec}@model.layers.3.output").layer == 3  # the user's word overrides the layout


def test_local_looking_missing_path_is_not_a_hub_ref(tmp_path):
    with pytest.raises(CoderError, match="coder directory not found") as excinfo:
        load_coder(str(tmp_path / "nope" / "still" / "nope"))
    assert str(tmp_path / "nope") in one_line(excinfo)


# ----------------------------------------------------------------------------------------------
# the math, against hand-written references


def make_coder(architecture: str, *, d_in=D_IN, d_sae=D_SAE, d_out=None, seed=0, **extra) -> SparseCoder:
    gen = torch.Generator().manual_seed(seed)
    d_out = d_out or d_in
    return SparseCoder(
        coder_id="t", architecture=architecture, kind=extra.pop("kind", "sae"), hook="model.layers.0.output",
        hook_out=extra.pop("hook_out", "model.layers.0.output"), layer=0,
        W_enc=torch.randn(d_in, d_sae, generator=gen) / d_in**0.5, b_enc=0.1 * torch.randn(d_sae, generator=gen),
        W_dec=torch.randn(d_sae, d_out, generator=gen), b_dec=torch.randn(d_out, generator=gen), **extra,
    )  # fmt: skip


def numpy_encode(coder: SparseCoder, x: np.ndarray) -> np.ndarray:
    """Per-token, per-feature loops in float64: the reference the tensor code must match."""
    W_enc, b_enc, b_dec = (t.double().numpy() for t in (coder.W_enc, coder.b_enc, coder.b_dec))
    out = np.zeros((x.shape[0], coder.d_sae))
    for t in range(x.shape[0]):
        xin = x[t] - b_dec if coder.apply_b_dec_to_input else x[t]
        pre = np.array([sum(xin[i] * W_enc[i, j] for i in range(coder.d_in)) + b_enc[j] for j in range(coder.d_sae)])
        if coder.architecture == "relu":
            out[t] = np.maximum(pre, 0.0)
        elif coder.architecture == "jumprelu":
            thr = coder.threshold.double().numpy()
            out[t] = [p if p > thr[j] else 0.0 for j, p in enumerate(pre)]
        else:  # topk: indices of the k largest, relu'd
            keep = np.argsort(-pre)[: coder.k]
            out[t, keep] = np.maximum(pre[keep], 0.0)
    return out


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_relu_encode_matches_reference(apply_b_dec):
    coder = make_coder("relu", apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(6, D_IN)
    np.testing.assert_allclose(coder.encode(x).numpy(), numpy_encode(coder, x.double().numpy()), atol=1e-5)


def test_apply_b_dec_to_input_changes_the_encoding():
    with_bdec = make_coder("relu", apply_b_dec_to_input=True)
    without = make_coder("relu", apply_b_dec_to_input=False)
    x = torch.randn(6, D_IN)
    torch.testing.assert_close(with_bdec.encode(x), without.encode(x - with_bdec.b_dec))
    assert not torch.allclose(with_bdec.encode(x), without.encode(x))


def test_jumprelu_encode_matches_reference():
    coder = make_coder("jumprelu", threshold=0.2 + 0.3 * torch.rand(D_SAE))
    x = torch.randn(6, D_IN)
    f = coder.encode(x)
    np.testing.assert_allclose(f.numpy(), numpy_encode(coder, x.double().numpy()), atol=1e-5)
    assert (f >= 0).all() and 0 < (f > 0).sum() < f.numel()


def test_jumprelu_threshold_edge_cases():
    # identity encoder: pre == x exactly, so the comparison with the threshold is exact
    coder = SparseCoder(
        coder_id="edge", architecture="jumprelu", kind="sae", hook="model.layers.0.output",
        hook_out="model.layers.0.output", layer=0, W_enc=torch.eye(4), b_enc=torch.zeros(4), W_dec=torch.eye(4),
        b_dec=torch.zeros(4), threshold=torch.tensor([0.5, 0.5, 0.0, 0.25]),
    )  # fmt: skip
    x = torch.tensor([[0.5, 0.5000001, 0.0, -1.0], [0.4999, 2.0, 1e-6, 0.25]])
    expected = torch.tensor([[0.0, 0.5000001, 0.0, 0.0], [0.0, 2.0, 1e-6, 0.0]])  # at the threshold: off
    torch.testing.assert_close(coder.encode(x), expected, rtol=0, atol=0)


def test_jumprelu_negative_threshold_still_relus():
    coder = make_coder("jumprelu", threshold=torch.full((D_SAE,), -10.0))
    assert (coder.encode(torch.randn(8, D_IN)) >= 0).all()


def test_topk_encode_keeps_exactly_k():
    coder = make_coder("topk", k=5, apply_b_dec_to_input=True)
    x = torch.randn(7, D_IN)
    f = coder.encode(x)
    np.testing.assert_allclose(f.numpy(), numpy_encode(coder, x.double().numpy()), atol=1e-5)
    assert ((f > 0).sum(-1) == 5).all()  # random inputs: plenty of positive pre-activations

    # when fewer than k are positive, the kept negatives are relu'd to zero
    coder.b_enc = torch.full((D_SAE,), -100.0)
    coder.b_enc[:2] = 100.0
    f = coder.encode(x)
    assert ((f > 0).sum(-1) == 2).all() and (f >= 0).all()


def test_encode_keeps_leading_dims_and_checks_width():
    coder = make_coder("relu")
    assert coder.encode(torch.randn(2, 3, D_IN)).shape == (2, 3, D_SAE)
    with pytest.raises(CoderError, match="d_in=16") as excinfo:
        coder.encode(torch.randn(3, D_IN + 1))
    one_line(excinfo)


def test_decode_sae_transcoder_and_skip_transcoder():
    x = torch.randn(5, D_IN)
    sae = make_coder("relu")
    f = sae.encode(x)
    torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec)

    tc = make_coder("relu", d_out=24, kind="transcoder", hook_out="model.layers.0.post_feedforward_layernorm.output")
    f = tc.encode(x)
    assert tc.decode(f).shape == (5, 24)

    affine = torch.randn(D_IN, 24)
    skip = make_coder(
        "relu", d_out=24, kind="skip_transcoder", hook_out="model.layers.0.post_feedforward_layernorm.output", affine_skip=affine
    )
    f = skip.encode(x)
    torch.testing.assert_close(skip.decode(f, x), f @ skip.W_dec + skip.b_dec + x @ affine)
    with pytest.raises(CoderError, match="pass x") as excinfo:
        skip.decode(f)
    one_line(excinfo)


def test_loaded_skip_transcoder_decodes_with_untransposed_affine(tmp_path):
    coder_dir = write_gemma_scope_2(tmp_path, "transcoder", 1, D_IN, D_SAE, kind="transcoder", affine=True, d_out=24)
    coder = load_coder(str(coder_dir))
    stored = load_np_safetensors(str(coder_dir / "params.safetensors"))
    arrays = {key: torch.from_numpy(value) for key, value in stored.items()}
    x = torch.randn(4, D_IN)
    pre = x @ arrays["w_enc"] + arrays["b_enc"]
    f = pre * (pre > arrays["threshold"])
    expected = f @ arrays["w_dec"] + arrays["b_dec"] + x @ arrays["affine_skip_connection"]
    torch.testing.assert_close(coder.decode(coder.encode(x), x), expected)


def test_written_coders_fire_at_a_realistic_rate(tmp_path):
    coder = load_coder(str(write_gemma_scope_1(tmp_path, "res", 0, 64, 512, l0=32)))
    fires = (coder.encode(torch.randn(2000, 64)) > 0).float().sum(-1).mean().item()
    assert 16 < fires < 64  # ~ l0 = 32


def test_to_casts_weights_but_keeps_threshold_float32():
    coder = make_coder("jumprelu", threshold=0.3 * torch.rand(D_SAE))
    low = coder.to(dtype=torch.bfloat16)
    assert low.W_enc.dtype == low.W_dec.dtype == low.b_enc.dtype == low.b_dec.dtype == torch.bfloat16
    assert low.threshold.dtype == torch.float32 and coder.W_enc.dtype == torch.float32  # a copy
    f = low.encode(torch.randn(4, D_IN))
    assert f.dtype == torch.bfloat16 and (f >= 0).all()

    # threshold 0.999 rounds to 1.0 in bf16; compared in float32, pre = 1.0 still fires
    edge = SparseCoder(
        coder_id="edge", architecture="jumprelu", kind="sae", hook="model.layers.0.output",
        hook_out="model.layers.0.output", layer=0, W_enc=torch.eye(2), b_enc=torch.zeros(2), W_dec=torch.eye(2),
        b_dec=torch.zeros(2), threshold=torch.tensor([0.999, 1.0]),
    ).to(dtype=torch.bfloat16)  # fmt: skip
    assert edge.encode(torch.tensor([[1.0, 1.0]])).tolist() == [[1.0, 0.0]]


# ----------------------------------------------------------------------------------------------
# bad inputs: each is one CoderError line naming the path


def rewrite_npz(coder_dir: Path, **changes) -> None:
    arrays = npz_arrays(coder_dir)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(coder_dir / "params.npz", **arrays)


def expect_error(spec: str, match: str, names: Path | None = None) -> str:
    with pytest.raises(CoderError, match=match) as excinfo:
        load_coder(spec)
    message = one_line(excinfo)
    if names is not None:
        assert str(names) in message, message
    return message


def test_missing_directory(tmp_path):
    expect_error(str(tmp_path / "missing"), "coder directory not found", tmp_path / "missing")


def test_no_recognised_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    expect_error(str(tmp_path), "no recognised coder files", tmp_path)


def test_per_layer_files_without_a_config_are_refused(tmp_path):
    for i in range(3):
        (tmp_path / f"params_layer_{i}.safetensors").write_bytes(b"")
    expect_error(str(tmp_path), r"params_layer_\*.safetensors files without the config.json that says what they are",
                 tmp_path)


def fake_hub(monkeypatch, remote: Path, snapshot: Path) -> list[str]:
    """snapshot_download as the hub does it: copy the files of `remote` (the repo) matching allow_patterns
    into the cache's `snapshot`, return it; the patterns asked for are recorded in the returned list."""
    import fnmatch
    import huggingface_hub

    asked: list[str] = []

    def snapshot_download(repo_id, *, allow_patterns, cache_dir=None):
        asked.extend(allow_patterns)
        for file in remote.rglob("*"):
            name = file.relative_to(remote).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / name).write_bytes(file.read_bytes())
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "lfs_pointer", "pickled"])
def test_corrupt_npz(tmp_path, damage):
    coder_dir = write_gemma_scope_1(tmp_path, "res", 1, D_IN, D_SAE)
    path = coder_dir / "params.npz"
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a zip file at all" * 10)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "lfs_pointer":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    else:  # an object array needs unpickling: refused
        arrays = npz_arrays(coder_dir)
        np.savez(path, **arrays, extra=np.array([{"x": 1}], dtype=object))
    expect_error(str(coder_dir), "corrupt or unreadable npz|Git LFS pointer", path)


@pytest.mark.parametrize("fmt", ["gemma_scope_2", "saelens"])
def test_corrupt_safetensors(tmp_path, fmt):
    if fmt == "gemma_scope_2":
        coder_dir = write_gemma_scope_2(tmp_path, "resid_post", 1, D_IN, D_SAE)
        path = coder_dir / "params.safetensors"
    else:
        coder_dir = write_saelens(tmp_path / "s", "standard", D_IN, D_SAE, "blocks.1.hook_resid_post")
        path = coder_dir / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    expect_error(str(coder_dir), "corrupt or unreadable safetensors", path)


def test_unreadable_config_json(tmp_path):
    coder_dir = write_gemma_scope_2(tmp_path, "resid_post", 1, D_IN, D_SAE)
    (coder_dir / "config.json").write_text("{not json")
    expect_error(str(coder_dir), "unreadable JSON", coder_dir / "config.json")


def test_gemma_scope_2_missing_a_file(tmp_path):
    coder_dir = write_gemma_scope_2(tmp_path, "resid_post", 1, D_IN, D_SAE)
    (coder_dir / "params.safetensors").unlink()
    expect_error(str(coder_dir), "without params.safetensors", coder_dir)


def test_saelens_missing_weights_file(tmp_path):
    coder_dir = write_saelens(tmp_path / "s", "standard", D_IN, D_SAE, "blocks.1.hook_resid_post")
    (coder_dir / "sae_weights.safetensors").unlink()
    expect_error(str(coder_dir), "without sae_weights.safetensors", coder_dir)


@pytest.mark.parametrize("key", ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"])
def test_gemma_scope_1_missing_key(tmp_path, key):
    coder_dir = write_gemma_scope_1(tmp_path, "res", 1, D_IN, D_SAE)
    rewrite_npz(coder_dir, **{key: None})
    expect_error(str(coder_dir), f"missing {key}", coder_dir / "params.npz")


def test_gemma_scope_2_missing_key_and_hook_point(tmp_path):
    coder_dir = write_gemma_scope_2(tmp_path, "resid_post", 1, D_IN, D_SAE)
    path = coder_dir / "params.safetensors"
    tensors = load_np_safetensors(str(path))
    save_np_safetensors({k: v for k, v in tensors.items() if k != "w_dec"}, str(path))
    expect_error(str(coder_dir), "missing w_dec", path)

    other = write_gemma_scope_2(tmp_path / "b", "resid_post", 1, D_IN, D_SAE)
    config = json.loads((other / "config.json").read_text())
    del config["hf_hook_point_out"]
    (other / "config.json").write_text(json.dumps(config))
    expect_error(str(other), "missing hf_hook_point_out", other / "config.json")


def test_gemma_scope_2_affine_flag_without_matrix(tmp_path):
    coder_dir = write_gemma_scope_2(tmp_path, "transcoder", 1, D_IN, D_SAE, kind="transcoder")
    config = json.loads((coder_dir / "config.json").read_text())
    (coder_dir / "config.json").write_text(json.dumps({**config, "affine_connection": True}))
    expect_error(str(coder_dir), "affine_skip_connection is missing", coder_dir)


def test_saelens_missing_keys(tmp_path):
    coder_dir = write_saelens(tmp_path / "a", "standard", D_IN, D_SAE, "blocks.1.hook_resid_post")
    path = coder_dir / "sae_weights.safetensors"
    tensors = load_np_safetensors(str(path))
    save_np_safetensors({k: v for k, v in tensors.items() if k != "W_enc"}, str(path))
    expect_error(str(coder_dir), "missing W_enc", path)

    coder_dir = write_saelens(tmp_path / "b", "jumprelu", D_IN, D_SAE, "blocks.1.hook_resid_post")
    path = coder_dir / "sae_weights.safetensors"
    tensors = load_np_safetensors(str(path))
    save_np_safetensors({k: v for k, v in tensors.items() if k != "threshold"}, str(path))
    expect_error(str(coder_dir), "neither threshold nor log_threshold", path)

    coder_dir = write_saelens(tmp_path / "c", "topk", D_IN, D_SAE, "blocks.1.hook_resid_post", k=4)
    cfg = json.loads((coder_dir / "cfg.json").read_text())
    del cfg["k"]
    (coder_dir / "cfg.json").write_text(json.dumps(cfg))
    expect_error(str(coder_dir), "without k", coder_dir)

    coder_dir = write_saelens(tmp_path / "d", "standard", D_IN, D_SAE, "blocks.1.hook_resid_post")
    cfg = json.loads((coder_dir / "cfg.json").read_text())
    del cfg["metadata"]["hook_name"]
    (coder_dir / "cfg.json").write_text(json.dumps(cfg))
    expect_error(str(coder_dir), "missing hook_name", coder_dir)


@pytest.mark.parametrize(
    "key, bad, match",
    [
        ("W_dec", np.zeros((D_SAE + 1, D_IN), np.float32), "disagree on d_sae"),
        ("W_dec", np.zeros((D_SAE, D_IN + 2), np.float32), "d_out"),
        ("W_enc", np.zeros(D_SAE, np.float32), "must both be matrices"),
        ("b_enc", np.zeros(D_SAE - 1, np.float32), "b_enc is"),
        ("b_dec", np.zeros(D_IN + 1, np.float32), "b_dec is"),
        ("threshold", np.zeros((D_SAE, 1), np.float32), "threshold is"),
    ],
)
def test_gemma_scope_1_inconsistent_shapes(tmp_path, key, bad, match):
    coder_dir = write_gemma_scope_1(tmp_path, "res", 1, D_IN, D_SAE)
    rewrite_npz(coder_dir, **{key: bad})
    expect_error(str(coder_dir), match, coder_dir)


def test_gemma_scope_2_inconsistent_affine_and_width(tmp_path):
    coder_dir = write_gemma_scope_2(tmp_path, "transcoder", 1, D_IN, D_SAE, kind="transcoder", affine=True)
    path = coder_dir / "params.safetensors"
    tensors = load_np_safetensors(str(path))
    save_np_safetensors({**tensors, "affine_skip_connection": np.zeros((D_IN, D_IN + 1), np.float32)}, str(path))
    expect_error(str(coder_dir), "affine_skip is", coder_dir)

    other = write_gemma_scope_2(tmp_path / "w", "resid_post", 1, D_IN, D_SAE)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "width": 2 * D_SAE}))
    expect_error(str(other), "config width", other)


def test_topk_k_out_of_range(tmp_path):
    coder_dir = write_saelens(tmp_path / "k", "topk", D_IN, D_SAE, "blocks.1.hook_resid_post", k=D_SAE + 1)
    expect_error(str(coder_dir), "topk needs an integer k", coder_dir)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architecture": "gated"}, "unknown architecture 'gated'"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations='expected_average_only_in' is not supported"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm' is not supported"),
        ({"activation_fn_str": "tanh-relu"}, "activation function 'tanh-relu' is not supported"),
    ],
)
def test_saelens_unsupported_settings(tmp_path, change, match):
    coder_dir = write_saelens(tmp_path / "s", "standard", D_IN, D_SAE, "blocks.1.hook_resid_post")
    cfg = json.loads((coder_dir / "cfg.json").read_text())
    (coder_dir / "cfg.json").write_text(json.dumps({**cfg, **change}))
    expect_error(str(coder_dir), match, coder_dir)


def test_saelens_unsupported_hook(tmp_path):
    coder_dir = write_saelens(tmp_path / "s", "standard", D_IN, D_SAE, "blocks.1.hook_no_such_site")
    expect_error(str(coder_dir), "unsupported hook name", coder_dir)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"type": "clt"}, r"no params_layer_\*.safetensors files"),  # a single-layer folder
        ({"type": "crosscoder"}, r"no params_layer_\*.safetensors files"),
        ({"type": "mystery"}, "unknown coder type 'mystery'"),
        ({"architecture": "topk"}, "unknown architecture 'topk'"),
    ],
)
def test_gemma_scope_2_unsupported_config(tmp_path, change, match):
    coder_dir = write_gemma_scope_2(tmp_path, "resid_post", 1, D_IN, D_SAE)
    config = json.loads((coder_dir / "config.json").read_text())
    (coder_dir / "config.json").write_text(json.dumps({**config, **change}))
    expect_error(str(coder_dir), match, coder_dir)


def test_direct_construction_is_checked():
    with pytest.raises(CoderError, match="unknown architecture 'gated'"):
        make_coder("gated")
    with pytest.raises(CoderError, match="no threshold"):
        make_coder("jumprelu")
    with pytest.raises(CoderError, match="only a skip_transcoder"):
        make_coder("relu", affine_skip=torch.zeros(D_IN, D_IN))
    with pytest.raises(CoderError, match="reconstruct its input"):
        make_coder("relu", d_out=D_IN + 1)


# ----------------------------------------------------------------------------------------------
# non-finite weights: refused at load, naming the file, the tensor and the first bad index


def write_format(tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    """(coder directory, weights file) of a coder in `fmt` holding every tensor that format has."""
    if fmt == "gemma_scope_1":
        coder_dir = write_gemma_scope_1(tmp_path, "res", 1, D_IN, D_SAE)
        return coder_dir, coder_dir / "params.npz"
    if fmt == "gemma_scope_2":
        coder_dir = write_gemma_scope_2(tmp_path, "transcoder", 1, D_IN, D_SAE, kind="transcoder", affine=True)
        return coder_dir, coder_dir / "params.safetensors"
    log = fmt == "saelens_log_threshold"
    coder_dir = write_saelens(tmp_path / "s", "jumprelu", D_IN, D_SAE, "blocks.1.hook_resid_post", log_threshold=log)
    return coder_dir, coder_dir / "sae_weights.safetensors"


def poison(weights: Path, key: str, value: float) -> str:
    """Set one element (two thirds in, not the first) of tensor `key` to `value`; returns "[i, j]"."""
    load, save = (npz_arrays, None) if weights.suffix == ".npz" else (load_np_safetensors, save_np_safetensors)
    arrays = load(weights.parent) if weights.suffix == ".npz" else dict(load(str(weights)))
    array = arrays[key].copy()
    index = np.unravel_index(array.size * 2 // 3, array.shape)
    array[index] = value
    arrays[key] = array
    if save is None:
        np.savez(weights, **arrays)
    else:
        save(arrays, str(weights))
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


NON_FINITE_CASES = [
    *[("gemma_scope_1", key) for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")],
    *[("gemma_scope_2", key) for key in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold", "affine_skip_connection")],
    *[("saelens", key) for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")],
    ("saelens_log_threshold", "log_threshold"),
]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt, key", NON_FINITE_CASES)
def test_non_finite_weights_are_refused_naming_file_tensor_and_index(tmp_path, fmt, key, value):
    coder_dir, weights = write_format(tmp_path, fmt)
    load_coder(str(coder_dir))  # loads before the damage
    index = poison(weights, key, value)
    message = expect_error(str(coder_dir), "must be finite", weights)
    assert f"{key}{index} is {value}" in message, message


def test_derived_non_finite_weights_are_refused(tmp_path):
    # a zero decoder row cannot be folded into a topk coder that rescales by the decoder norm
    coder_dir = write_saelens(tmp_path, "topk", D_IN, D_SAE, "blocks.1.hook_resid_post", k=4,
                              rescale_acts_by_decoder_norm=True)
    weights = coder_dir / "sae_weights.safetensors"
    tensors = load_np_safetensors(str(weights))
    tensors["W_dec"][5] = 0.0
    save_np_safetensors(tensors, str(weights))
    expect_error(str(coder_dir), r"W_dec\[5, 0\] is nan")
    # and a coder built in code
    with pytest.raises(CoderError, match=r"threshold\[3\] is nan"):  # would make every feature fire
        make_coder("jumprelu", threshold=torch.zeros(D_SAE).index_fill(0, torch.tensor([3]), float("nan")))


def test_finite_check_is_cheap_and_exact():
    from featuredb.runtime.coders import non_finite

    big = torch.randn(1024, 4096)
    assert non_finite(big) is None
    assert non_finite(torch.full((4,), 6e4, dtype=torch.float16)) is None  # the sum overflows, values are fine
    big[700, 3] = float("nan")
    big[900, 1] = float("inf")
    assert non_finite(big) == "[700, 3] is nan"
