"""Hook-site names: where in the subject model an activation is read.

Names follow Gemma Scope 2's config.json (`hf_hook_point_in`), relative to the text decoder
(`model.get_decoder()`):

    model.layers.{L}.output                      residual stream after layer L
    model.layers.{L}.input                       residual stream before layer L
    model.layers.{L}.<submodule.path>.output     output of a submodule of layer L
    model.layers.{L}.<submodule.path>.input      first input of a submodule of layer L
    model.layers.{L}.<norm>.normalized_input     input of an RMSNorm divided by its RMS, no gain
                                                 (Gemma Scope 1 transcoder input)

SAELens / TransformerLens names (`blocks.L.hook_resid_post`, ...) convert with
`from_transformer_lens`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from featuredb.errors import HookError

HOOK_PREFIX = "model.layers."
POINTS = ("output", "input", "normalized_input")

_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_TL_NAME = re.compile(r"blocks\.([0-9]+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|attn\.hook_z)")


@dataclass(frozen=True)
class HookSite:
    name: str  # canonical full name
    layer: int
    module_path: str  # path inside the decoder layer, "" for the layer itself
    point: str  # "output" | "input" | "normalized_input"


def parse_hook(name: str) -> HookSite:
    """Split `model.layers.{L}[.<path>].{point}` into its parts, or raise HookError."""
    if not isinstance(name, str):
        raise HookError(f"hook name must be a string, got {type(name).__name__}")
    text = name.strip()
    if not text.startswith(HOOK_PREFIX):
        raise HookError(f"bad hook name {name!r}: expected 'model.layers.<L>[.<submodule>].<output|input>'")
    parts = text[len(HOOK_PREFIX) :].split(".")
    if len(parts) < 2 or not parts[0].isdigit():
        raise HookError(f"bad hook name {name!r}: expected a layer index after 'model.layers.'")
    layer, *path, point = parts
    if point not in POINTS:
        raise HookError(f"bad hook name {name!r}: must end in one of {', '.join(POINTS)}")
    if not all(_SEGMENT.fullmatch(segment) for segment in path):
        raise HookError(f"bad hook name {name!r}: empty or invalid submodule path")
    if point == "normalized_input" and not path:
        raise HookError(f"bad hook name {name!r}: normalized_input needs a norm submodule path before it")
    return _site(int(layer), ".".join(path), point)


def _site(layer: int, module_path: str, point: str) -> HookSite:
    inner = f"{module_path}." if module_path else ""
    return HookSite(name=f"{HOOK_PREFIX}{layer}.{inner}{point}", layer=layer, module_path=module_path, point=point)


def hook_site_kind(name: str) -> str:
    """Coarse site family: "res", "mlp", "att", "transcoder_in" or "other"."""
    site = parse_hook(name)
    if site.module_path == "" and site.point in ("output", "input"):
        return "res"
    if (site.module_path, site.point) in (("post_feedforward_layernorm", "output"), ("mlp", "output")):
        return "mlp"
    if (site.module_path, site.point) == ("self_attn.o_proj", "input"):
        return "att"
    if site.module_path == "pre_feedforward_layernorm":
        return "transcoder_in"
    return "other"


def from_transformer_lens(name: str, *, gemma: bool) -> str:
    """Translate a SAELens / TransformerLens hook name to ours; names already ours pass through.

    `gemma` picks the MLP-out site: Gemma's MLP output goes through post_feedforward_layernorm
    before joining the residual stream, and that normed value is what Gemma Scope read.
    """
    text = name.strip() if isinstance(name, str) else name
    if isinstance(text, str) and text.startswith("model."):
        return parse_hook(text).name
    match = _TL_NAME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise HookError(
            f"unsupported hook name {name!r}: expected blocks.<L>.hook_resid_post / hook_resid_pre / "
            "hook_mlp_out / attn.hook_z, or a 'model.layers.<L>...' name"
        )
    layer, tl_hook = int(match.group(1)), match.group(2)
    if tl_hook == "hook_resid_post":
        return _site(layer, "", "output").name
    if tl_hook == "hook_resid_pre":
        return _site(layer, "", "input").name
    if tl_hook == "hook_mlp_out":
        return _site(layer, "post_feedforward_layernorm" if gemma else "mlp", "output").name
    return _site(layer, "self_attn.o_proj", "input").name  # attn.hook_z: concatenated heads, pre-o_proj
