"""Regenerate this folder with SAELens itself (never run by the test suite; needs sae-lens 6.x in a venv
of its own, see ../shared/notes/peers.md):

    /tmp/peers/bin/python tests/data/saelens_6/make_fixture.py tests/data/saelens_6

Writes one folder per SAE, each by SAELens' own `save_model` (cfg.json + sae_weights.safetensors), and
expected.safetensors: a fixed input `x` and, per SAE, the feature activations and reconstruction that
SAELens' `SAE.load_from_disk(folder)` computes for it. The weights are random but chosen so every code
path matters: the TopK SAE has decoder rows of unequal norm and rescale_acts_by_decoder_norm (so the
fold changes which latents win), the JumpReLU SAE thresholds that cut some positive pre-activations,
and the standard SAE reads attn.hook_z (input [..., n_heads, d_head], flattened by SAELens).
"""

import json
import sys
from pathlib import Path

import sae_lens
import torch
from safetensors.torch import save_file
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

D_IN, D_SAE, N_HEADS = 16, 32, 4


def meta(hook_name: str) -> SAEMetadata:
    return SAEMetadata(model_name="tiny-gemma2", hook_name=hook_name, context_size=64, prepend_bos=True)


def randomise(sae: SAE, gen: torch.Generator) -> None:
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=gen) / D_IN**0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=gen) * (0.2 + 2 * torch.rand(D_SAE, 1, generator=gen)))
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=gen))
        sae.b_dec.copy_(0.5 * torch.randn(D_IN, generator=gen))


def main(out: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    saes = {
        "topk": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, rescale_acts_by_decoder_norm=True,
                                      metadata=meta("blocks.1.hook_resid_post"))),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta("blocks.0.hook_mlp_out"))),
        "standard": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, reshape_activations="hook_z",
                                                  metadata=meta("blocks.2.attn.hook_z"))),
    }
    for sae in saes.values():
        randomise(sae, gen)
    with torch.no_grad():
        saes["jumprelu"].threshold.copy_(0.6 * torch.rand(D_SAE, generator=gen))
    x = 1.5 * torch.randn(24, D_IN, generator=gen)

    expected = {"x": x}
    for name, sae in saes.items():
        sae.save_model(out / name)
        loaded = SAE.load_from_disk(out / name)  # what users get back, not the object we built
        sae_in = x.view(len(x), N_HEADS, D_IN // N_HEADS) if name == "standard" else x
        with torch.no_grad():
            feats = loaded.encode(sae_in)
            recon = loaded.decode(feats).reshape(len(x), D_IN)
        expected[f"{name}.feats"], expected[f"{name}.recon"] = feats.contiguous(), recon.contiguous()
        print(name, "active per token", float((feats > 0).float().sum(1).mean()))
    save_file(expected, out / "expected.safetensors", metadata={"sae_lens_version": sae_lens.__version__,
                                                                 "torch_version": torch.__version__})
    print(json.dumps({"sae_lens": sae_lens.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
