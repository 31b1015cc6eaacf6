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

# TransformerLens hook -> (module path, point) on Gemma 2/3, and on Llama-style pre-norm layers. The
# meanings are TransformerLens' own (components/transformer_block.py, rms_norm.py); the decoder layers
# are transformers' (Gemma2/Gemma3DecoderLayer, LlamaDecoderLayer):
#   Gemma:  h = x + post_attention_layernorm(self_attn(input_layernorm(x)))
#           out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
#   Llama:  h = x + self_attn(input_layernorm(x));  out = h + mlp(post_attention_layernorm(h))
_TL_SITES: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "hook_resid_pre": (("", "input"), ("", "input")),
    "hook_resid_post": (("", "output"), ("", "output")),
    # what joins the residual stream: on Gemma the attention / MLP output after its post-norm
    # (TransformerLens applies ln1_post / ln2_post before these hooks)
    "hook_attn_out": (("post_attention_layernorm", "output"), ("self_attn.o_proj", "output")),
    "hook_mlp_out": (("post_feedforward_layernorm", "output"), ("mlp", "output")),
    # the residual after attention, before the MLP: h above, the input of the pre-MLP norm
    "hook_resid_mid": (("pre_feedforward_layernorm", "input"), ("post_attention_layernorm", "input")),
    # TransformerLens' hook_mlp_in is h as well: it fires on the input of ln2, before the norm
    # (`self.ln2(self.hook_mlp_in(resid_mid.clone()))`), not on the normed MLP input
    "hook_mlp_in": (("pre_feedforward_layernorm", "input"), ("post_attention_layernorm", "input")),
    # ln2.hook_normalized: h / RMS(h), before the norm's gain (Gemma Scope 1 transcoder input)
    "ln2.hook_normalized": (("pre_feedforward_layernorm", "normalized_input"),
                            ("post_attention_layernorm", "normalized_input")),
    # the concatenated head outputs, before o_proj
    "attn.hook_z": (("self_attn.o_proj", "input"), ("self_attn.o_proj", "input")),
}
_TL_NAME = re.compile(r"blocks\.([0-9]+)\.(" + "|".join(re.escape(hook) for hook in _TL_SITES) + ")")


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

    `gemma` picks the layer layout (see _TL_SITES): Gemma 2/3 norm the attention and MLP outputs
    before they join the residual stream, and their pre-MLP norm is pre_feedforward_layernorm;
    otherwise the layer is Llama-style (pre-MLP norm post_attention_layernorm, no output norms).
    """
    text = name.strip() if isinstance(name, str) else name
    if isinstance(text, str) and text.startswith("model."):
        return parse_hook(text).name
    match = _TL_NAME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        known = " / ".join(_TL_SITES)
        raise HookError(
            f"unsupported hook name {name!r}: expected blocks.<L>.<{known}>, or a 'model.layers.<L>...' name"
        )
    gemma_site, llama_site = _TL_SITES[match.group(2)]
    module_path, point = gemma_site if gemma else llama_site
    return _site(int(match.group(1)), module_path, point).name
