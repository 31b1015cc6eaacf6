"""Write random sparse coders in each exact upstream on-disk format (for tests).

    write_gemma_scope_1  .../gemma-scope-{size}-{pt|it}-{site}/layer_L/width_W/average_l0_K/params.npz
    write_gemma_scope_2  .../{folder}/layer_L_width_W_l0_{size}[_affine]/params.safetensors + config.json
    write_saelens        {dir}/cfg.json + sae_weights.safetensors

Weights are seeded. W_enc columns have norm ~1 on unit-scale inputs (x ~ N(0, I)), so a
pre-activation is ~N(b_enc, 1); thresholds sit at the normal quantile that makes roughly
`fire_rate` of the features fire (default l0 / d_sae, kept within 2%..50%).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

_RESID = "model.layers.{L}.output"
_MLP_OUT = "model.layers.{L}.post_feedforward_layernorm.output"
_ATTN_OUT = "model.layers.{L}.self_attn.o_proj.input"
_MLP_IN = "model.layers.{L}.pre_feedforward_layernorm.output"  # Gemma Scope 2 transcoders: gain included
GS2_DEFAULT_HOOKS = {  # Gemma Scope 2 folder -> (hf_hook_point_in, hf_hook_point_out), {L} = layer
    "resid_post": (_RESID, _RESID),
    "mlp_out": (_MLP_OUT, _MLP_OUT),
    "attn_out": (_ATTN_OUT, _ATTN_OUT),
    "transcoder": (_MLP_IN, _MLP_OUT),
}
GS2_L0 = {"small": 20, "medium": 60, "big": 150}


def width_label(d_sae: int) -> str:
    """16384 -> '16k', 1048576 -> '1m', 48 -> '48' (Gemma Scope folder names)."""
    if d_sae % (1 << 20) == 0:
        return f"{d_sae >> 20}m"
    if d_sae % 1024 == 0:
        return f"{d_sae >> 10}k"
    return str(d_sae)


def random_coder_arrays(
    d_in: int, d_sae: int, d_out: int | None = None, *, fire_rate: float = 0.1, affine: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    """float32 W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec, threshold (+ affine_skip [d_in, d_out])."""
    d_out = d_in if d_out is None else d_out
    rng = np.random.default_rng(seed)
    W_enc = rng.standard_normal((d_in, d_sae)) / math.sqrt(d_in)
    W_dec = rng.standard_normal((d_sae, d_out)) / math.sqrt(d_out)  # rows of norm ~1
    b_enc = 0.05 * rng.standard_normal(d_sae)
    b_dec = 0.1 * rng.standard_normal(d_out)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - fire_rate)).item()
    threshold = np.maximum(b_enc + z * (1.0 + 0.1 * rng.standard_normal(d_sae)), 0.0)
    arrays = dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
    if affine:
        arrays["affine_skip"] = 0.1 * rng.standard_normal((d_in, d_out))
    return {key: value.astype(np.float32) for key, value in arrays.items()}


def _fire_rate(fire_rate: float | None, l0: float, d_sae: int) -> float:
    return fire_rate if fire_rate is not None else min(0.5, max(0.02, l0 / d_sae))


def write_gemma_scope_1(
    root: Path,
    site: str,
    layer: int,
    d_in: int,
    d_sae: int,
    *,
    l0: int = 8,
    model_size: str = "2b",
    variant: str = "pt",
    width: str | None = None,
    fire_rate: float | None = None,
    seed: int = 0,
) -> Path:
    """Gemma Scope 1 (site res | mlp | att | transcoders): returns the average_l0_K directory."""
    assert site in ("res", "mlp", "att", "transcoders"), site
    coder_dir = (
        Path(root)
        / f"gemma-scope-{model_size}-{variant}-{site}"
        / f"layer_{layer}"
        / f"width_{width or width_label(d_sae)}"
        / f"average_l0_{l0}"
    )
    coder_dir.mkdir(parents=True, exist_ok=True)
    arrays = random_coder_arrays(d_in, d_sae, fire_rate=_fire_rate(fire_rate, l0, d_sae), seed=seed)
    np.savez(coder_dir / "params.npz", **arrays)
    return coder_dir


def write_gemma_scope_2(
    root: Path,
    folder: str,
    layer: int,
    d_in: int,
    d_sae: int,
    *,
    kind: str = "sae",
    affine: bool = False,
    hook_in: str | None = None,
    hook_out: str | None = None,
    l0: str = "medium",
    d_out: int | None = None,
    width: str | None = None,
    model_name: str = "google/gemma-3-270m",
    fire_rate: float | None = None,
    seed: int = 0,
) -> Path:
    """Gemma Scope 2 (kind = config `type`, 'sae' | 'transcoder' | 'clt' | 'crosscoder'):
    returns the layer_L_width_W_l0_S[_affine] directory."""
    site = folder.removesuffix("_all")
    default_in, default_out = GS2_DEFAULT_HOOKS.get(site, GS2_DEFAULT_HOOKS["resid_post"])
    hook_in = hook_in or default_in.format(L=layer)
    hook_out = hook_out or default_out.format(L=layer)
    name = f"layer_{layer}_width_{width or width_label(d_sae)}_l0_{l0}" + ("_affine" if affine else "")
    coder_dir = Path(root) / folder / name
    coder_dir.mkdir(parents=True, exist_ok=True)

    from safetensors.numpy import save_file

    rate = _fire_rate(fire_rate, GS2_L0.get(l0, 60), d_sae)
    arrays = random_coder_arrays(d_in, d_sae, d_out, fire_rate=rate, affine=affine, seed=seed)
    tensors = {
        "w_enc": arrays["W_enc"],
        "w_dec": arrays["W_dec"],
        "b_enc": arrays["b_enc"],
        "b_dec": arrays["b_dec"],
        "threshold": arrays["threshold"],
    }
    if affine:
        tensors["affine_skip_connection"] = arrays["affine_skip"]
    save_file(tensors, str(coder_dir / "params.safetensors"))
    config = {
        "hf_hook_point_in": hook_in,
        "hf_hook_point_out": hook_out,
        "width": d_sae,
        "model_name": model_name,
        "architecture": "jump_relu",
        "l0": GS2_L0.get(l0, 60),
        "affine_connection": affine,
        "type": kind,
    }
    (coder_dir / "config.json").write_text(json.dumps(config, indent=2))
    return coder_dir


def write_saelens(
    dir: Path,
    architecture: str,
    d_in: int,
    d_sae: int,
    hook_name: str,
    *,
    k: int | None = None,
    apply_b_dec_to_input: bool = True,
    normalize_activations: str | None = "none",
    model_name: str = "gpt2",
    cfg_style: str = "metadata",
    log_threshold: bool = False,
    rescale_acts_by_decoder_norm: bool = False,
    dtype: torch.dtype = torch.float32,
    fire_rate: float | None = None,
    seed: int = 0,
) -> Path:
    """SAELens format (architecture 'jumprelu' | 'topk' | 'standard'); returns `dir`.

    cfg_style: 'metadata' (SAELens 6.x, current), 'meta' (early 6.0), 'legacy' (< 6: hook_name and
    model_name at top level, topk as architecture 'standard' + activation_fn_str 'topk' +
    activation_fn_kwargs.k). log_threshold stores log(threshold) as training checkpoints do.
    """
    from safetensors.torch import save_file

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    rate = _fire_rate(fire_rate, k or 8, d_sae)
    arrays = random_coder_arrays(d_in, d_sae, fire_rate=rate, seed=seed)
    tensors = {key: torch.from_numpy(arrays[key]).to(dtype) for key in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if architecture == "jumprelu":
        threshold = torch.from_numpy(arrays["threshold"]).clamp_min(1e-3)  # log needs > 0
        if log_threshold:
            tensors["log_threshold"] = threshold.log().to(dtype)
        else:
            tensors["threshold"] = threshold.to(dtype)
    save_file(tensors, str(dir / "sae_weights.safetensors"))

    dtype_name = str(dtype).removeprefix("torch.")
    if cfg_style == "legacy":
        cfg: dict = {
            "d_in": d_in,
            "d_sae": d_sae,
            "dtype": dtype_name,
            "device": "cpu",
            "model_name": model_name,
            "hook_name": hook_name,
            "hook_layer": int(hook_name.split(".")[1]) if hook_name.startswith("blocks.") else 0,
            "hook_head_index": None,
            "activation_fn_str": "relu",
            "apply_b_dec_to_input": apply_b_dec_to_input,
            "normalize_activations": normalize_activations,
            "sae_lens_training_version": "3.12.0",
        }
        if architecture == "topk":
            cfg.update(architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": k})
        elif architecture != "standard":  # pre-6 standard SAEs often had no architecture key at all
            cfg["architecture"] = architecture
    else:
        metadata = {
            "model_name": model_name,
            "hook_name": hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": 1024,
            "sae_lens_version": "6.12.1",
            "sae_lens_training_version": "6.12.1",
        }
        cfg = {
            "architecture": architecture,
            "d_in": d_in,
            "d_sae": d_sae,
            "dtype": dtype_name,
            "device": "cpu",
            "apply_b_dec_to_input": apply_b_dec_to_input,
            "normalize_activations": normalize_activations,
            "reshape_activations": "hook_z" if hook_name.endswith("hook_z") else "none",
            cfg_style: metadata,
        }
        if architecture == "topk":
            cfg.update(k=k, rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm)
    (dir / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return dir


def write_gemma_scope_2_multi_layer(
    root: Path,
    kind: str,
    n_slots: int,
    d_in: int,
    per_slot: int,
    *,
    layers: list[int] | None = None,
    affine: bool = False,
    l0: str = "medium",
    model_name: str = "google/gemma-3-270m",
    fire_rate: float = 0.1,
    seed: int = 0,
) -> Path:
    """A Gemma Scope 2 CLT (kind 'clt', slot i = model layer i, hooks `model.layers.{all}...`) or
    crosscoder (kind 'crosscoder' over `layers`, hooks `model.layers.{a,b,c}.output`), in the exact
    layout: {clt|crosscoder}/<name>/config.json + params_layer_{i}.safetensors, each with w_enc [d, F],
    b_enc [F], threshold [F], w_dec [F, n_slots, d], b_dec [d] (+ affine_skip_connection [d, d]).
    A CLT's decoder is causal, as trained: slot l writes nothing to output layers m < l."""
    from safetensors.numpy import save_file

    assert kind in ("clt", "crosscoder"), kind
    tag = width_label(n_slots * per_slot)
    if kind == "clt":
        name = f"width_{tag}_l0_{l0}" + ("_affine" if affine else "")
        hook_in = "model.layers.{all}.pre_feedforward_layernorm.output"
        hook_out = "model.layers.{all}.post_feedforward_layernorm.output"
    else:
        assert layers is not None and len(layers) == n_slots
        name = f"layer_{'_'.join(str(layer) for layer in layers)}_width_{tag}_l0_{l0}"
        hook_in = hook_out = "model.layers.{" + ",".join(str(layer) for layer in layers) + "}.output"
    folder = Path(root) / kind / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for slot in range(n_slots):
        arrays = random_coder_arrays(d_in, per_slot, fire_rate=fire_rate, affine=affine, seed=seed * 1000 + slot)
        w_dec = rng.standard_normal((per_slot, n_slots, d_in)) / math.sqrt(d_in)
        w_dec *= rng.uniform(0.2, 2.0, size=(per_slot, n_slots, 1))  # a profile that differs by output layer
        if kind == "clt":
            w_dec[:, :slot] = 0.0
        tensors = {"w_enc": arrays["W_enc"], "b_enc": arrays["b_enc"], "threshold": arrays["threshold"],
                   "w_dec": w_dec.astype(np.float32), "b_dec": arrays["b_dec"]}
        if affine:
            tensors["affine_skip_connection"] = arrays["affine_skip"]
        save_file(tensors, str(folder / f"params_layer_{slot}.safetensors"))
    config = {"hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out, "width": n_slots * per_slot,
              "model_name": model_name, "architecture": "jump_relu", "l0": GS2_L0.get(l0, 60),
              "affine_connection": affine, "type": kind}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
