"""SAELens 6 interop, checked without sae-lens installed.

tests/data/saelens_6/ holds folders that sae-lens 6.54.12 saved itself (`SAE.save_model`) and the
activations its `SAE.load_from_disk(...).encode` gave for a fixed input (make_fixture.py there regenerates
them). From them:
- SAEs that SAELens saves load in featuredb and encode as SAELens does;
- the folders featuredb's `save_saelens` writes have SAELens 6's layout, so SAELens reads them as 6.x
  (keeping hook_name, model_name, context_size) and, by SAELens' own TopK encode rule (checked here
  against SAELens' outputs first), encodes them as featuredb does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file

from featuredb.demo.train import save_saelens
from featuredb.runtime.coders import SparseCoder, load_coder

FIXTURE = Path(__file__).parent / "data" / "saelens_6"
EXPECTED = load_file(FIXTURE / "expected.safetensors")
X = EXPECTED["x"]

# The hook each fixture SAE was saved with, and the site it names in a Gemma model
FIXTURE_HOOKS = {
    "topk": "model.layers.1.output",  # blocks.1.hook_resid_post
    "jumprelu": "model.layers.0.post_feedforward_layernorm.output",  # blocks.0.hook_mlp_out
    "standard": "model.layers.2.self_attn.o_proj.input",  # blocks.2.attn.hook_z (heads flattened)
}


def saelens_cfg(name: str) -> dict:
    return json.loads((FIXTURE / name / "cfg.json").read_text())


def saelens_topk_encode(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """SAELens 6's TopKSAE.encode, as its source (sae_lens/saes/topk_sae.py) computes it from the files:
    pre = (x - b_dec) @ W_enc + b_enc, times |W_dec_i| when rescale_acts_by_decoder_norm, then relu of the
    top k (the rest 0)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(folder / "sae_weights.safetensors")
    sae_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["rescale_acts_by_decoder_norm"]:
        pre = pre * w["W_dec"].norm(dim=-1)
    top = pre.topk(cfg["k"], dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


# --- SAEs saved by SAELens load in featuredb and encode as SAELens does --------------------------------


@pytest.mark.parametrize("name", ["topk", "jumprelu", "standard"])
def test_saelens_saved_sae_encodes_as_saelens_does(name):
    coder = load_coder(str(FIXTURE / name), model_is_gemma=True)
    assert coder.hook == FIXTURE_HOOKS[name] and coder.model_name == "tiny-gemma2"
    feats = coder.encode(X)
    # the same latents fire, with SAELens' values up to float32 rounding
    assert torch.equal(feats > 0, EXPECTED[f"{name}.feats"] > 0)
    torch.testing.assert_close(feats, EXPECTED[f"{name}.feats"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coder.decode(feats), EXPECTED[f"{name}.recon"], rtol=1e-5, atol=1e-5)


def test_fixture_exercises_what_it_should():
    """Guards the fixture itself: each SAE would encode differently if its special rule were ignored."""
    weights = {name: load_file(FIXTURE / name / "sae_weights.safetensors") for name in FIXTURE_HOOKS}
    # topk: ranking by pre-activation alone, without the decoder norms, picks other latents
    w = weights["topk"]
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    plain = torch.zeros_like(pre).scatter(-1, pre.topk(4, dim=-1).indices, 1.0) > 0
    assert saelens_cfg("topk")["rescale_acts_by_decoder_norm"] is True
    assert not torch.equal(plain, EXPECTED["topk.feats"] > 0)
    # jumprelu: thresholds silence some positive pre-activations
    w = weights["jumprelu"]
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    assert int(((pre > 0) & (EXPECTED["jumprelu.feats"] == 0)).sum()) > 0
    # the reference encode rule used below reproduces SAELens' own TopK outputs
    torch.testing.assert_close(saelens_topk_encode(FIXTURE / "topk", X), EXPECTED["topk.feats"], rtol=1e-5, atol=1e-5)


# --- what featuredb writes is SAELens 6's layout -------------------------------------------------------


def unit_topk_coder(d_in: int = 16, width: int = 32, k: int = 4, seed: int = 0) -> SparseCoder:
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.nn.functional.normalize(torch.randn(width, d_in, generator=gen), dim=1)
    return SparseCoder(
        coder_id="mine", architecture="topk", kind="sae", hook="model.layers.1.output",
        hook_out="model.layers.1.output", layer=1, W_enc=W_dec.T + 0.1 * torch.randn(d_in, width, generator=gen),
        b_enc=0.1 * torch.randn(width, generator=gen), W_dec=W_dec, b_dec=0.5 * torch.randn(d_in, generator=gen),
        k=k, apply_b_dec_to_input=True,
    )  # fmt: skip


@pytest.fixture()
def ours(tmp_path) -> tuple[SparseCoder, Path]:
    coder = unit_topk_coder()
    return coder, save_saelens(coder, tmp_path / "mine", model_name="tiny-gemma2", context_size=64)


def test_cfg_has_the_saelens_6_layout(ours):
    _, folder = ours
    cfg = json.loads((folder / "cfg.json").read_text())
    theirs = saelens_cfg("topk")
    # the same top-level keys as SAELens' own TopK save, and every metadata key it writes
    assert set(cfg) == set(theirs)
    assert set(theirs["metadata"]) <= set(cfg["metadata"])
    # SAELens 6 treats a missing, null or pre-6 metadata.sae_lens_version as a pre-6 file and rebuilds
    # metadata from top-level keys only (loading/pretrained_sae_loaders.py handle_config_defaulting)
    assert Version(cfg["metadata"]["sae_lens_version"]) >= Version("6.0.0-rc.0")
    for key in ("hook_name", "model_name", "context_size"):
        assert key not in cfg  # only metadata carries them in 6.x
    meta = cfg["metadata"]
    assert (meta["hook_name"], meta["model_name"], meta["context_size"]) == (
        "blocks.1.hook_resid_post", "tiny-gemma2", 64)
    assert meta["hf_hook_name"] == "model.layers.1.output"


def test_topk_is_marked_rescale_acts_by_decoder_norm(ours):
    """SAEDashboard first calls SAELens' fold_W_dec_norm, which a TopK SAE refuses unless this flag is
    set; with unit decoder rows the flag changes no activation, so SAELens encodes our file as we do."""
    coder, folder = ours
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["rescale_acts_by_decoder_norm"] is True
    x = 2 * torch.randn(64, coder.d_in, generator=torch.Generator().manual_seed(1))
    theirs = saelens_topk_encode(folder, x)
    assert torch.equal(theirs > 0, coder.encode(x) > 0)
    torch.testing.assert_close(theirs, coder.encode(x), rtol=1e-5, atol=1e-6)


def test_our_folder_loads_back_identically(ours):
    coder, folder = ours
    loaded = load_coder(str(folder), model_is_gemma=True)
    assert loaded.hook == coder.hook and loaded.k == coder.k and loaded.model_name == "tiny-gemma2"
    x = 2 * torch.randn(64, coder.d_in, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.encode(x), coder.encode(x))


def test_save_refuses_decoder_rows_that_are_not_unit_norm(tmp_path):
    coder = unit_topk_coder()
    coder.W_dec = coder.W_dec * 1.5  # the rescale flag would then change which latents win in SAELens
    with pytest.raises(ValueError, match="unit-norm decoder rows"):
        save_saelens(coder, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
