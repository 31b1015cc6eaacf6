"""Sparse coders (SAEs, transcoders, skip transcoders): one in-memory form, loaded from the
on-disk formats people actually publish.

Formats, told apart by the files in the coder's directory:

    params.npz                          Gemma Scope 1 (Gemma 2); site and layer from the path
    params.safetensors + config.json    Gemma Scope 2 (Gemma 3)
    cfg.json + sae_weights.safetensors  SAELens (jumprelu / topk / standard)

A coder spec is `[ID=]PATH_OR_HUBREF[@HOOK]` or `[ID=]RELEASE:SAE_ID[@HOOK]`. A hub reference is
`owner/repo/sub/folder` (or `hf://owner/repo[/sub/folder]`) and is fetched with huggingface_hub,
only the coder's own files, configs first; RELEASE:SAE_ID is SAELens's name of a Gemma Scope coder,
resolved offline to its hub reference by featuredb.runtime.registry.

Multi-layer coders (Gemma Scope 2 CLTs and crosscoders: one config.json, one
params_layer_{i}.safetensors per slot) load as a featuredb.runtime.multilayer.MultiLayerCoder;
`Coder` is either kind. From the hub their config comes first and is checked before any weights
are fetched.

Encode precision: the matmul runs in the coder's own dtype (float32 as shipped; on a GPU a
bf16 matmul accumulates in float32 anyway) and the JumpReLU threshold is kept and compared in
float32, so a bf16 coder fires on exactly the features the trained threshold says.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from featuredb.errors import CoderError
from featuredb.runtime import registry
from featuredb.runtime.coder_files import (EncoderOnDevice, clean_id, finite, jump_relu, non_finite, our_hook,
                                          read_json, read_npz, read_safetensors, refuse_pickled, shape_text,
                                          short_reason, take)
from featuredb.runtime.hooks import parse_hook
from featuredb.runtime.multilayer import LAYER_FILES, MultiLayerCoder, check_config, is_multi_layer, load_multi_layer

ARCHITECTURES = ("jumprelu", "topk", "relu")
KINDS = ("sae", "transcoder", "skip_transcoder")

GS1_WEIGHTS = "params.npz"
GS2_WEIGHTS, GS2_CONFIG = "params.safetensors", "config.json"
SAELENS_WEIGHTS, SAELENS_CONFIG = "sae_weights.safetensors", "cfg.json"
_CONFIG_FILES = (GS2_CONFIG, SAELENS_CONFIG)
_ROOT_FILES = (GS1_WEIGHTS, GS2_WEIGHTS, SAELENS_WEIGHTS) + _CONFIG_FILES  # every file a single-layer coder reads

_ID_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# e.g. "gemma-scope-2b-pt-res", also inside a cache dir name "models--google--gemma-scope-2b-pt-res"
_GS1_REPO = re.compile(r"gemma-scope-([0-9]+b)-(pt|it)-(res|mlp|att|transcoders)(?![a-z])")
_LAYER_DIR = re.compile(r"layer_([0-9]+)")


# ----------------------------------------------------------------------------------------------
# the coder


@dataclass
class SparseCoder(EncoderOnDevice):
    coder_id: str
    architecture: str  # "jumprelu" | "topk" | "relu"
    kind: str  # "sae" | "transcoder" | "skip_transcoder"
    hook: str  # input hook site, our naming (featuredb.runtime.hooks)
    hook_out: str  # output hook site (== hook for an SAE)
    layer: int
    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_out]
    b_dec: Tensor  # [d_out]
    threshold: Tensor | None = None  # [d_sae], jumprelu; kept float32 (see module doc)
    k: int | None = None  # topk
    affine_skip: Tensor | None = None  # [d_in, d_out], skip transcoders: x_hat += x @ affine_skip
    apply_b_dec_to_input: bool = False  # SAELens: encode(x - b_dec)
    source: str = ""  # path or hub reference it came from
    model_name: str | None = None

    def __post_init__(self) -> None:
        self._check()

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def width(self) -> int:
        return self.d_sae

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def hooks(self) -> list[str]:
        """The hooks it reads (one; a MultiLayerCoder reads several)."""
        return [self.hook]

    @property
    def hooks_out(self) -> list[str]:
        return [self.hook_out]

    @property
    def layers(self) -> list[int]:
        return [self.layer]

    def decoder_summary(self) -> tuple[Tensor, None]:
        """Each feature's total write (its decoder row) and, for a single-layer coder, no layer-write profile."""
        return self.W_dec, None

    def writes(self, feature: int) -> list[tuple[str, Tensor]]:
        """What feature `feature` adds to the model, and where: its decoder row, at the output site
        (hook_out: an SAE's own site, a transcoder's MLP output). Steering adds it there."""
        if not 0 <= feature < self.d_sae:
            raise CoderError(f"coder {self.coder_id}: feature {feature} is out of range (width {self.d_sae})")
        return [(self.hook_out, self.W_dec[feature])]

    def _check(self) -> None:
        where = self.source or self.coder_id

        def bad(msg: str) -> CoderError:
            return CoderError(f"coder {where}: {msg}")

        if self.architecture not in ARCHITECTURES:
            raise bad(f"unknown architecture {self.architecture!r} (known: {', '.join(ARCHITECTURES)})")
        if self.kind not in KINDS:
            raise bad(f"unknown kind {self.kind!r} (known: {', '.join(KINDS)})")
        if self.W_enc.ndim != 2 or self.W_dec.ndim != 2:
            raise bad(f"W_enc {shape_text(self.W_enc)} and W_dec {shape_text(self.W_dec)} must both be matrices")
        d_in, d_sae = self.W_enc.shape
        d_out = self.W_dec.shape[1]
        if self.W_dec.shape[0] != d_sae:
            raise bad(f"W_enc {shape_text(self.W_enc)} and W_dec {shape_text(self.W_dec)} disagree on d_sae")
        if self.kind == "sae" and d_out != d_in:
            raise bad(
                f"an SAE must reconstruct its input, but W_enc {shape_text(self.W_enc)} and "
                f"W_dec {shape_text(self.W_dec)} give d_in={d_in}, d_out={d_out}"
            )
        if tuple(self.b_enc.shape) != (d_sae,):
            raise bad(f"b_enc is {shape_text(self.b_enc)}, expected [{d_sae}] (d_sae)")
        if tuple(self.b_dec.shape) != (d_out,):
            raise bad(f"b_dec is {shape_text(self.b_dec)}, expected [{d_out}] (d_out)")
        if self.apply_b_dec_to_input and d_out != d_in:
            raise bad("apply_b_dec_to_input needs d_in == d_out")
        if self.architecture == "jumprelu":
            if self.threshold is None:
                raise bad("jumprelu coder has no threshold")
            if tuple(self.threshold.shape) != (d_sae,):
                raise bad(f"threshold is {shape_text(self.threshold)}, expected [{d_sae}]")
        if self.architecture == "topk" and (not isinstance(self.k, int) or not 0 < self.k <= d_sae):
            raise bad(f"topk needs an integer k in 1..{d_sae}, got {self.k!r}")
        if (self.kind == "skip_transcoder") != (self.affine_skip is not None):
            raise bad("a skip_transcoder, and only a skip_transcoder, has an affine_skip matrix")
        if self.affine_skip is not None and tuple(self.affine_skip.shape) != (d_in, d_out):
            raise bad(f"affine_skip is {shape_text(self.affine_skip)}, expected [{d_in}, {d_out}]")
        if self.kind == "sae" and self.hook_out != self.hook:
            raise bad(f"an SAE reads and writes one site, got hook {self.hook!r} and hook_out {self.hook_out!r}")
        # The loaders check each tensor as read; this also covers derived ones (a folded decoder norm,
        # exp(log_threshold)) and coders built in code.
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "affine_skip"):
            if (problem := non_finite(getattr(self, name))) is not None:
                raise bad(f"{name}{problem}")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SparseCoder":
        """A copy on `device` in `dtype`; the threshold stays float32 (compared in float32)."""

        def move(t: Tensor | None, keep_fp32: bool = False) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=None if keep_fp32 else dtype)

        return dataclasses.replace(
            self,
            W_enc=move(self.W_enc),
            b_enc=move(self.b_enc),
            W_dec=move(self.W_dec),
            b_dec=move(self.b_dec),
            threshold=move(self.threshold, keep_fp32=True),
            affine_skip=move(self.affine_skip),
        )

    def encoder_on(self, device: torch.device | str) -> "SparseCoder":
        """A copy that encodes on `device` in float32: the encoder there, the decoder (read only when
        the coder is written) in float32 on the host."""
        host = torch.device("cpu")
        return dataclasses.replace(
            self, W_enc=self.W_enc.to(device=device, dtype=torch.float32),
            b_enc=self.b_enc.to(device=device, dtype=torch.float32),
            b_dec=self.b_dec.to(device=device, dtype=torch.float32),
            threshold=None if self.threshold is None else self.threshold.to(device=device, dtype=torch.float32),
            W_dec=self.W_dec.to(device=host, dtype=torch.float32),
            affine_skip=None if self.affine_skip is None else self.affine_skip.to(device=host, dtype=torch.float32),
        )

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_sae] feature activations, always >= 0, in the coder's dtype."""
        if x.shape[-1] != self.d_in:
            raise CoderError(f"coder {self.coder_id}: input has last dim {x.shape[-1]}, expected d_in={self.d_in}")
        x = x.to(dtype=self.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec  # SAELens centres the input on the decoder bias
        pre = x @ self.W_enc + self.b_enc

        if self.architecture == "relu":
            return torch.relu(pre)

        if self.architecture == "jumprelu":
            return jump_relu(pre, self.threshold).to(self.dtype)

        # topk: the k largest pre-activations of each token survive (relu'd), the rest are 0
        top = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode_hooked(self, activations: dict[str, Tensor]) -> Tensor:
        """encode() on the activation at its hook, from {hook: [..., d]} (as MultiLayerCoder takes them)."""
        return self.encode(activations[self.hook])

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """[..., d_sae] -> [..., d_out]; a skip transcoder also needs its input x for x @ affine_skip."""
        x_hat = f.to(self.dtype) @ self.W_dec + self.b_dec
        if self.affine_skip is not None:
            if x is None:
                raise CoderError(f"coder {self.coder_id}: a skip transcoder decodes with its input: pass x")
            x_hat = x_hat + x.to(self.dtype) @ self.affine_skip
        return x_hat


# ----------------------------------------------------------------------------------------------
# specs


def parse_coder_spec(spec: str) -> tuple[str | None, str, str | None]:
    """`[ID=]PATH_OR_HUBREF[@HOOK]` -> (id, location, hook).

    ID is the text before the first '=' when that text is only [A-Za-z0-9._-] (a path holding
    '=' can be written './a=b'); HOOK is the text after the last '@' when it has no '/'.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CoderError("empty coder spec: expected [ID=]PATH_OR_HUBREF[@HOOK]")
    text = spec.strip()
    coder_id: str | None = None
    hook: str | None = None
    head, eq, rest = text.partition("=")
    if eq and _ID_CHARS.fullmatch(head):
        coder_id, text = head, rest
    location, at, tail = text.rpartition("@")
    if at and "/" not in tail:
        text, hook = location, tail
        if not hook:
            raise CoderError(f"coder spec {spec!r}: empty hook after '@'")
    if not text:
        raise CoderError(f"coder spec {spec!r}: no path or hub reference")
    return coder_id, text, hook


def named_coder(location: str) -> registry.ResolvedCoder | None:
    """The registry's coder when `location` is RELEASE:SAE_ID, else None (a path or hub reference).

    `X:Y` is a release name only when X has no '/' and `X:Y` is no existing path, so `./dir:name`
    and `hf://...` keep their meaning; an unknown release is a CoderError naming close matches.
    """
    release, colon, sae_id = location.partition(":")
    if not colon or "/" in release or location.startswith("hf://") or Path(location).expanduser().exists():
        return None
    try:
        return registry.resolve(release, sae_id)
    except CoderError as e:
        raise CoderError(f"coder {location!r}: {e}; nor is it an existing path") from None


Coder = SparseCoder | MultiLayerCoder


def load_coder(spec: str, *, model_is_gemma: bool = True, cache_dir: str | None = None) -> Coder:
    """Load one coder from `[ID=]PATH_OR_HUBREF[@HOOK]` or `[ID=]RELEASE:SAE_ID[@HOOK]` (see the module doc)."""
    coder_id, location, hook = parse_coder_spec(spec)
    named = named_coder(location)
    if named is not None:
        location = named.hub_ref
        coder_id = coder_id or named_coder_id(named)
    path = Path(location).expanduser()
    if path.exists():
        directory = path.parent if path.is_file() else path
        label = str(directory.absolute())  # not resolve(): keep the path names the conventions live in
        source = str(path)
    elif looks_like_hub_ref(location):
        repo_id, sub = split_hub_ref(location)
        directory = _download(location, repo_id, sub, cache_dir)
        label = f"{repo_id}/{sub}" if sub else repo_id  # path conventions read from the hub name
        source = f"hf://{label}"
    else:
        raise CoderError(f"coder directory not found: {location}")

    coder = _load_directory(directory, label=label, source=source, model_is_gemma=model_is_gemma, hook=hook)
    if named is not None and hook is None:
        _check_registry_hooks(coder, named)
    if coder_id is not None:
        coder.coder_id = coder_id
    return coder


def named_coder_id(named: registry.ResolvedCoder) -> str:
    """Readable and unique per release: gemma-scope-2b-pt-res-canonical-layer_12-width_16k-canonical."""
    return clean_id(f"{named.release}-{named.sae_id}".replace("/", "-"))


def _check_registry_hooks(coder: Coder, named: registry.ResolvedCoder) -> None:
    """The files' own hooks (config or path rules) must be the ones the registry's layout gives: a
    mismatch means a mislabelled folder, and indexing it would store features under the wrong site."""
    if named.hook is None or (coder.hook, coder.hook_out) == (named.hook, named.hook_out):
        return
    raise CoderError(
        f"coder {named.release}:{named.sae_id} ({coder.source}) reads {coder.hook} -> {coder.hook_out}, but the "
        f"registry's layout says {named.hook} -> {named.hook_out}; give the hook as @HOOK if the files are right"
    )


def looks_like_hub_ref(location: str) -> bool:
    if location.startswith("hf://"):
        return True
    parts = location.split("/")
    # owner/repo/sub...: three or more plain parts; anything path-like (/, ./, ~) is local
    return len(parts) >= 3 and all(_HUB_PART.fullmatch(p) for p in parts)


def split_hub_ref(location: str) -> tuple[str, str]:
    parts = [p for p in location.removeprefix("hf://").strip("/").split("/") if p]
    if len(parts) < 2 or not all(_HUB_PART.fullmatch(p) for p in parts):
        raise CoderError(f"bad hub reference {location!r}: expected [hf://]owner/repo/sub/folder")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:])


def _download(location: str, repo_id: str, sub: str, cache_dir: str | None) -> Path:
    """Fetch only the files the coder reads, never a whole folder (whose other files may be other
    coders'). The configs come first (kilobytes): a multi-layer coder's says so, and is checked before
    its per-layer weights (~30 GB for Gemma 3 1B's CLT) are fetched. The weights are then asked for
    with the configs again, so both come from one snapshot even if the repo moved in between."""
    label = f"{repo_id}/{sub}" if sub else repo_id
    configs = fetch_configs(location, repo_id, sub, cache_dir)
    weights = _ROOT_FILES
    if (configs / GS2_CONFIG).is_file() and is_multi_layer(configs):
        check_config(read_json(configs / GS2_CONFIG), f"{label}/{GS2_CONFIG}")
        weights = (GS2_CONFIG, LAYER_FILES)
    directory = _snapshot(location, repo_id, sub, weights, cache_dir)
    if not directory.is_dir() or not any(directory.iterdir()):
        where = f"no files under {sub!r}" if sub else "no coder files at the root"
        raise CoderError(f"cannot download coder {location!r} from the hub: {where} in {repo_id}")
    return directory


def fetch_configs(location: str, repo_id: str, sub: str, cache_dir: str | None) -> Path:
    """The local folder of `sub` holding its config files (kilobytes; no weights fetched)."""
    return _snapshot(location, repo_id, sub, _CONFIG_FILES, cache_dir)


def _snapshot(location: str, repo_id: str, sub: str, names: tuple[str, ...], cache_dir: str | None) -> Path:
    """The local folder of `sub` holding those of `names` that exist there (in the hub cache)."""
    import huggingface_hub  # looked up at call time so tests can monkeypatch snapshot_download

    patterns = [f"{sub}/{name}" if sub else name for name in names]
    try:
        root = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown repo, no auth, network error: all one story to the user
        raise CoderError(f"cannot download coder {location!r} from the hub: {short_reason(e)}") from None
    return Path(root) / sub if sub else Path(root)


# ----------------------------------------------------------------------------------------------
# format detection


def _load_directory(directory: Path, *, label: str, source: str, model_is_gemma: bool, hook: str | None) -> Coder:
    if not directory.is_dir():
        raise CoderError(f"coder directory not found: {directory}")
    if is_multi_layer(directory):
        coder = load_multi_layer(directory, source)
        if hook is not None and hook != coder.hook:  # its own name (as the catalogue stores it) is fine
            raise CoderError(f"{directory}: a {coder.kind} reads the hooks its config names ({coder.hook}); "
                             f"@{hook} cannot move it")
        return coder
    names = {p.name for p in directory.iterdir()}
    if SAELENS_CONFIG in names:
        coder = _load_saelens(directory, source, model_is_gemma)
    elif GS2_CONFIG in names or GS2_WEIGHTS in names:
        coder = _load_gemma_scope_2(directory, source)
    elif GS1_WEIGHTS in names:
        coder = _load_gemma_scope_1(directory, label, source, hook_given=hook is not None)
    else:
        refuse_pickled(directory)
        raise CoderError(
            f"{directory}: no recognised coder files (expected params.npz, params.safetensors + config.json, "
            "or cfg.json + sae_weights.safetensors)"
        )
    return _with_hook(coder, hook, model_is_gemma) if hook is not None else coder


def _with_hook(coder: SparseCoder, hook: str, model_is_gemma: bool) -> SparseCoder:
    """`@HOOK` overrides the input hook (and hook_out for an SAE); the layer follows the hook."""
    ours = our_hook(hook, model_is_gemma, where=coder.source)
    hook_out = ours if coder.kind == "sae" else coder.hook_out
    return dataclasses.replace(coder, hook=ours, hook_out=hook_out, layer=parse_hook(ours).layer)


# ----------------------------------------------------------------------------------------------
# Gemma Scope 1: layer_{L}/width_{W}/average_l0_{K}/params.npz inside gemma-scope-{size}-{pt|it}-{site}

_GS1_SITES = {  # site -> (kind, input hook, output hook), {L} = layer
    "res": ("sae", "model.layers.{L}.output", "model.layers.{L}.output"),
    "mlp": (
        "sae",
        "model.layers.{L}.post_feedforward_layernorm.output",
        "model.layers.{L}.post_feedforward_layernorm.output",
    ),
    "att": ("sae", "model.layers.{L}.self_attn.o_proj.input", "model.layers.{L}.self_attn.o_proj.input"),
    "transcoders": (
        "transcoder",
        "model.layers.{L}.pre_feedforward_layernorm.normalized_input",
        "model.layers.{L}.post_feedforward_layernorm.output",
    ),
}


def _load_gemma_scope_1(directory: Path, label: str, source: str, *, hook_given: bool) -> SparseCoder:
    path = directory / GS1_WEIGHTS
    arrays = read_npz(path)
    W_enc, W_dec, b_enc, b_dec, threshold = take(arrays, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path)
    hook_in, coder_id, kind = gemma_scope_1_naming(label, directory, hook_given=hook_given)
    layer = parse_hook(hook_in).layer
    repo = next((m for p in Path(label).parts if (m := _GS1_REPO.search(p))), None)
    hook_out = _GS1_SITES[repo.group(3) if repo else "res"][2].format(L=layer)
    model_name = None
    if repo:
        size, variant = repo.group(1), repo.group(2)
        model_name = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
    return SparseCoder(
        coder_id=coder_id, architecture="jumprelu", kind=kind, hook=hook_in, hook_out=hook_out, layer=layer,
        W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold.float(),
        source=source, model_name=model_name,
    )  # fmt: skip


def gemma_scope_1_naming(label: str, directory: Path, *, hook_given: bool) -> tuple[str, str, str]:
    """(input hook, coder id, kind) of a Gemma Scope 1 coder, from its path (the npz holds no config)."""
    parts = Path(label).parts
    repo = next((m for p in parts if (m := _GS1_REPO.search(p))), None)
    layer_match = next((m for p in reversed(parts) if (m := _LAYER_DIR.fullmatch(p))), None)
    site = repo.group(3) if repo else None
    if site is None or layer_match is None:
        if not hook_given:
            raise CoderError(
                f"{directory / GS1_WEIGHTS}: cannot tell the hook site from the path (expected .../gemma-scope-<size>-"
                "<pt|it>-<res|mlp|att|transcoders>/layer_<L>/...): give it as PATH@HOOK"
            )
        site = site or "res"  # placeholder: _with_hook replaces the hook and layer
    layer = int(layer_match.group(1)) if layer_match else 0
    kind, hook_in, _ = _GS1_SITES[site]
    # readable id: site-layer_L-width_W-average_l0_K from the path parts that exist
    tail = [p for p in parts if _LAYER_DIR.fullmatch(p) or p.startswith(("width_", "average_l0_"))]
    coder_id = clean_id("-".join(([repo.group(3)] if repo else []) + tail) if tail else directory.name)
    return hook_in.format(L=layer), coder_id, kind


# ----------------------------------------------------------------------------------------------
# Gemma Scope 2: {site}/layer_{L}_width_{W}_l0_{size}[_affine]/params.safetensors + config.json


def _load_gemma_scope_2(directory: Path, source: str) -> SparseCoder:
    cfg_path, weights_path = directory / GS2_CONFIG, directory / GS2_WEIGHTS
    for needed in (cfg_path, weights_path):
        if not needed.exists():
            refuse_pickled(directory)
            raise CoderError(f"{directory}: Gemma Scope 2 coder without {needed.name}")
    cfg = read_json(cfg_path)
    coder_type = cfg.get("type", "sae")  # clt and crosscoder load in featuredb.runtime.multilayer
    if coder_type not in ("sae", "transcoder"):
        raise CoderError(f"{cfg_path}: unknown coder type {coder_type!r} (known: sae, transcoder)")
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise CoderError(f"{cfg_path}: unknown architecture {cfg.get('architecture')!r} (expected jump_relu)")
    missing = [k for k in ("hf_hook_point_in", "hf_hook_point_out") if k not in cfg]
    if missing:
        raise CoderError(f"{cfg_path}: missing {', '.join(missing)}")

    tensors = read_safetensors(weights_path)
    keys = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
    W_enc, W_dec, b_enc, b_dec, threshold = take(tensors, keys, weights_path)
    affine = finite(tensors, "affine_skip_connection", weights_path)
    if cfg.get("affine_connection") and affine is None:
        raise CoderError(f"{weights_path}: config says affine_connection but affine_skip_connection is missing")
    if affine is not None and coder_type != "transcoder":
        raise CoderError(f"{weights_path}: affine_skip_connection on a coder of type {coder_type!r}")
    width = cfg.get("width")
    if isinstance(width, int) and width != W_enc.shape[-1]:
        raise CoderError(f"{directory}: config width {width} but w_enc is {shape_text(W_enc)}")

    hook_in = our_hook(cfg["hf_hook_point_in"], True, where=str(cfg_path))
    hook_out = our_hook(cfg["hf_hook_point_out"], True, where=str(cfg_path))
    kind = "sae" if coder_type == "sae" else ("skip_transcoder" if affine is not None else "transcoder")
    return SparseCoder(
        coder_id=clean_id(f"{directory.parent.name}-{directory.name}"), architecture="jumprelu", kind=kind,
        hook=hook_in, hook_out=hook_out, layer=parse_hook(hook_in).layer,
        W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold.float(), affine_skip=affine,
        source=source, model_name=cfg.get("model_name"),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# SAELens: cfg.json + sae_weights.safetensors (cfg layouts of SAELens < 6, 6.x "meta", later "metadata")

_SAELENS_ARCHITECTURES = {"jumprelu": "jumprelu", "topk": "topk", "standard": "relu"}


def _load_saelens(directory: Path, source: str, model_is_gemma: bool) -> SparseCoder:
    cfg_path, weights_path = directory / SAELENS_CONFIG, directory / SAELENS_WEIGHTS
    if not weights_path.exists():
        refuse_pickled(directory)
        raise CoderError(f"{directory}: SAELens coder without {SAELENS_WEIGHTS}")
    cfg = read_json(cfg_path)
    meta = cfg.get("metadata") or cfg.get("meta") or {}

    def setting(key: str):  # top level (SAELens < 6) or metadata (6.x)
        return cfg.get(key) if cfg.get(key) is not None else meta.get(key)

    arch_name = cfg.get("architecture", "standard")  # SAELens < 6 omitted it for standard SAEs
    if arch_name not in _SAELENS_ARCHITECTURES:
        known = ", ".join(_SAELENS_ARCHITECTURES)
        raise CoderError(f"{cfg_path}: unknown architecture {arch_name!r} (supported: {known})")
    architecture = _SAELENS_ARCHITECTURES[arch_name]
    # SAELens < 6 wrote topk SAEs as architecture "standard" + activation_fn_str "topk"
    activation_fn = cfg.get("activation_fn_str", cfg.get("activation_fn")) or "relu"
    if arch_name == "standard" and activation_fn == "topk":
        architecture = "topk"
    elif activation_fn not in ("relu", "topk"):
        raise CoderError(f"{cfg_path}: activation function {activation_fn!r} is not supported (relu or topk)")
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none", False):  # pre-6 configs stored a bool
        raise CoderError(f"{cfg_path}: normalize_activations={norm!r} is not supported (fold it into the weights)")
    # hook_z [.., heads, d_head] is what our self_attn.o_proj.input already holds, flattened
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise CoderError(f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    hook_name = setting("hook_name") or setting("hook_point")  # hook_point: SAELens < 6
    if not hook_name:
        raise CoderError(f"{cfg_path}: missing hook_name (top level or metadata.hook_name)")

    tensors = read_safetensors(weights_path)
    W_enc, W_dec, b_enc, b_dec = take(tensors, ("W_enc", "W_dec", "b_enc", "b_dec"), weights_path)
    threshold = k = None
    if architecture == "jumprelu":
        if "threshold" in tensors:
            threshold = finite(tensors, "threshold", weights_path).float()
        elif "log_threshold" in tensors:  # training checkpoints store log(threshold)
            threshold = torch.exp(finite(tensors, "log_threshold", weights_path).float())
        else:
            raise CoderError(f"{weights_path}: jumprelu coder has neither threshold nor log_threshold")
    if architecture == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if k is None:
            raise CoderError(f"{cfg_path}: topk coder without k (nor activation_fn_kwargs.k)")
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if cfg.get("rescale_acts_by_decoder_norm"):
            W_enc, b_enc, W_dec = _fold_decoder_norm(W_enc, b_enc, W_dec, weights_path)

    hook = our_hook(hook_name, model_is_gemma, where=str(cfg_path))
    return SparseCoder(
        coder_id=clean_id(directory.name), architecture=architecture, kind="sae", hook=hook, hook_out=hook,
        layer=parse_hook(hook).layer, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
        threshold=threshold, k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),  # SAELens' default is True
        source=source, model_name=setting("model_name"),
    )  # fmt: skip


def _fold_decoder_norm(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, path: Path) -> tuple[Tensor, Tensor, Tensor]:
    """SAELens topk with rescale_acts_by_decoder_norm ranks pre * |W_dec_i| and decodes f / |W_dec_i|;
    scaling the encoder up and the decoder down by |W_dec_i| gives the same f and x_hat, plain topk."""
    if W_dec.ndim != 2 or W_enc.ndim != 2 or W_dec.shape[0] != W_enc.shape[1] or b_enc.shape != W_enc.shape[1:]:
        raise CoderError(f"{path}: W_enc {shape_text(W_enc)}, b_enc {shape_text(b_enc)} and W_dec {shape_text(W_dec)} disagree")
    norm = W_dec.norm(dim=-1)  # [d_sae]
    if torch.allclose(norm.float(), torch.ones_like(norm, dtype=torch.float32), rtol=0, atol=1e-5):
        # unit rows (featuredb's save_saelens, SAELens' own TopK trainer): the fold would change
        # nothing but the last bit of every weight, and so of every activation
        return W_enc, b_enc, W_dec
    return W_enc * norm, b_enc * norm, W_dec / norm[:, None]
