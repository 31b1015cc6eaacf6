"""Save JumpReLU coders in Gemma Scope 2's own layout (google/gemma-scope-2-*), and nothing more.

Single-layer coders (SAE, transcoder):

    {site}/layer_{L}_width_{W}_l0_{small|medium|big}[_affine]/
        params.safetensors   w_enc [d_in, F], w_dec [F, d_out], b_enc [F], b_dec [d_out], threshold [F],
                             affine_skip_connection [d_in, d_out] (skip transcoders only)
        config.json          hf_hook_point_in, hf_hook_point_out, width, model_name,
                             architecture "jump_relu", l0, affine_connection, type "sae" | "transcoder"

    site: resid_post (model.layers.L.output), mlp_out (post_feedforward_layernorm.output), attn_out
    (self_attn.o_proj.input) for SAEs; transcoder for transcoders (in: pre_feedforward_layernorm.output,
    out: post_feedforward_layernorm.output); "_affine" marks a skip transcoder.

Crosscoders (S layers a, b, c, ...; slot i = the i-th layer of the list):

    crosscoder/layer_{a}_{b}_{c}_width_{W}_l0_{size}/
        params_layer_{i}.safetensors   w_enc [d, F], b_enc [F], threshold [F], w_dec [F, S, d], b_dec [d]
        config.json                    hf_hook_point_in = hf_hook_point_out = "model.layers.{a,b,c}.output",
                                       width = S * F (all slots together), type "crosscoder"

    Each feature of slot i reads layer i only; out[m] = sum_i a[i] @ w_dec_i[:, m, :] + b_dec of file m.

Cross-layer transcoders (every layer of the model; slot i = layer i):

    clt/width_{W}_l0_{size}/
        params_layer_{i}.safetensors   as a crosscoder's, w_dec [F, n_layers, d] zero for outputs m < i
        config.json                    hf_hook_point_in = "model.layers.{all}.pre_feedforward_layernorm.output",
                                       hf_hook_point_out = "model.layers.{all}.post_feedforward_layernorm.output",
                                       width = n_layers * F, type "clt"

W in the folder name is the width written as Gemma Scope does: 16384 -> 16k, 65536 -> 65k,
262144 -> 262k, 1048576 -> 1m (thousands rounded down; so our 4096 -> 4k). `l0` in config.json is
the target L0 the coder was trained for (an integer, e.g. 150); the small / medium / big tag is the
caller's choice (Gemma Scope 2 publishes no cut points between them). Tensors are float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from featuredb.demo.jumprelu import JumpReLUCoder
from featuredb.runtime.hooks import hook_site_kind, parse_hook

L0_SIZES = ("small", "medium", "big")
_CLT_HOOKS = ("model.layers.{L}.pre_feedforward_layernorm.output", "model.layers.{L}.post_feedforward_layernorm.output")
_SAE_SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_out"}


def width_tag(width: int) -> str:
    """16384 -> "16k", 65536 -> "65k", 262144 -> "262k", 1048576 -> "1m" (Gemma Scope's names)."""
    if width >= 1_000_000:
        return f"{width // 1_000_000}m"
    if width >= 1000:
        return f"{width // 1000}k"
    return str(width)


def coder_folder(coder: JumpReLUCoder, l0_size: str = "medium") -> str:
    """The coder's folder inside a Gemma Scope 2 repository, e.g. "resid_post/layer_9_width_4k_l0_medium"."""
    return gemma_scope_folder(coder.kind, coder.hooks_in, coder.n_slots * coder.width, l0_size,
                              affine=coder.affine_skip is not None)


def gemma_scope_folder(kind: str, hooks_in: list[str], width: int, l0_size: str = "medium", *,
                       affine: bool = False) -> str:
    """The folder of a coder of this kind, input hooks and total width (known before it is trained)."""
    if l0_size not in L0_SIZES:
        raise ValueError(f"l0_size must be one of {', '.join(L0_SIZES)}, got {l0_size!r}")
    layers = [parse_hook(h).layer for h in hooks_in]
    tail = f"width_{width_tag(width)}_l0_{l0_size}"
    if kind == "crosscoder":
        return f"crosscoder/layer_{'_'.join(map(str, layers))}_{tail}"
    if kind == "clt":
        return f"clt/{tail}"
    if kind == "transcoder":
        return f"transcoder/layer_{layers[0]}_{tail}" + ("_affine" if affine else "")
    site = _SAE_SITES.get(hook_site_kind(hooks_in[0]))
    if site is None:
        raise ValueError(f"hook {hooks_in[0]!r} is none of Gemma Scope 2's SAE sites (resid_post, mlp_out, attn_out)")
    return f"{site}/layer_{layers[0]}_{tail}"


def gemma_scope_config(coder: JumpReLUCoder, model_name: str | None = None) -> dict:
    """config.json's fields, in the published order."""
    if coder.kind == "crosscoder":
        layers = ",".join(str(parse_hook(h).layer) for h in coder.hooks_in)
        hook_in = hook_out = f"model.layers.{{{layers}}}.output"
    elif coder.kind == "clt":
        hook_in, hook_out = (_CLT_HOOKS[0].format(L="{all}"), _CLT_HOOKS[1].format(L="{all}"))
    else:
        hook_in, hook_out = coder.hooks_in[0], coder.hooks_out[0]
    return {
        "hf_hook_point_in": hook_in,
        "hf_hook_point_out": hook_out,
        "width": coder.n_slots * coder.width,
        "model_name": model_name or coder.model_name,
        "architecture": "jump_relu",
        "l0": round(coder.l0_target),
        "affine_connection": coder.affine_skip is not None,
        "type": coder.kind,
    }


def save_gemma_scope_2(coder: JumpReLUCoder, root: str | Path, *, l0_size: str = "medium",
                       model_name: str | None = None) -> Path:
    """Write the coder under root/<coder_folder> (module doc); returns that folder."""
    if coder.kind == "crosscoder":
        _check_crosscoder(coder)
    elif coder.kind == "clt":
        _check_clt(coder)
    elif coder.n_slots != 1:
        raise ValueError(f"a {coder.kind} has one slot, this coder has {coder.n_slots}")
    folder = Path(root) / coder_folder(coder, l0_size)
    folder.mkdir(parents=True, exist_ok=True)
    if coder.kind in ("crosscoder", "clt"):
        for i in range(coder.n_slots):
            save_file(_f32(w_enc=coder.w_enc[i], b_enc=coder.b_enc[i], threshold=coder.threshold[i],
                           w_dec=coder.w_dec[i], b_dec=coder.b_dec[i]), str(folder / f"params_layer_{i}.safetensors"))
    else:
        tensors = dict(w_enc=coder.w_enc[0], w_dec=coder.w_dec[0, :, 0], b_enc=coder.b_enc[0], b_dec=coder.b_dec[0],
                       threshold=coder.threshold[0])
        if coder.affine_skip is not None:
            tensors["affine_skip_connection"] = coder.affine_skip
        save_file(_f32(**tensors), str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps(gemma_scope_config(coder, model_name), indent=2) + "\n")
    return folder


def _check_crosscoder(coder: JumpReLUCoder) -> None:
    """The published crosscoders read and write the residual stream of the same layers."""
    if coder.hooks_in != coder.hooks_out or any(hook_site_kind(h) != "res" or not h.endswith(".output")
                                                for h in coder.hooks_in):
        raise ValueError("a Gemma Scope 2 crosscoder reads and writes model.layers.<L>.output of the same layers")
    if coder.affine_skip is not None:
        raise ValueError("crosscoders are written without an affine skip connection")


def _check_clt(coder: JumpReLUCoder) -> None:
    """The published CLTs read every layer's MLP input and write every layer's MLP output, slot i = layer i."""
    expected = [[h.format(L=i) for i in range(coder.n_slots)] for h in _CLT_HOOKS]
    if [coder.hooks_in, coder.hooks_out] != expected:
        raise ValueError("a Gemma Scope 2 CLT reads model.layers.<i>.pre_feedforward_layernorm.output and writes "
                         "model.layers.<i>.post_feedforward_layernorm.output of every layer i = 0, 1, ...")


def _f32(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
