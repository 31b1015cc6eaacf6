"""Multi-layer coders: Gemma Scope 2's cross-layer transcoders (CLTs) and crosscoders.

A folder holds one config.json and one params_layer_{i}.safetensors per slot i:

    CLT         clt/width_262k_l0_medium[_affine]/            slot i = model layer i
                hooks model.layers.{all}.pre_feedforward_layernorm.output
                   -> model.layers.{all}.post_feedforward_layernorm.output
    crosscoder  crosscoder/layer_5_9_12_15_width_..._l0_.../   slot i = the i-th layer of the list
                hooks model.layers.{5,9,12,15}.output -> the same

Per file: w_enc [d_in, F], b_enc [F], threshold [F], w_dec [F, S_out, d_out], b_dec [d_out], and
optionally affine_skip_connection [d_in, d_out]. Google DeepMind's reference stacks the files:

    a[l]   = JumpReLU(x[l] @ w_enc[l] + b_enc[l], threshold[l])        each feature reads its own slot
    out[m] = sum_l a[l] @ w_dec[l][:, m, :] + b_dec[m]  (+ x[m] @ affine[m])

featuredb indexes such a folder as ONE coder of S * F features, numbered layer-major
(feature = slot * F + j), each feature reading the layer of its slot. The affine skip connection
does not change what a feature does (it bypasses the features), so it is checked and not loaded.

Memory: only the encoders are loaded (S x d_in x F floats). The decoder (S x F x S_out x d_out: ~30 GB
for Gemma 3 1B's CLT) stays in its files; `decoder_summary` reads it once, in row slices, when the
catalogue is written, and keeps per feature only what the catalogue stores:

- its total write, one d_out vector, for the logit table, the nearest neighbours and similarity search.
  CLT: the sum of its decoder vectors over the output layers. Each is added to the residual stream
  (post_feedforward_layernorm's output joins it at layer m), so from the last layer on the residual
  holds their sum, and the logit lens of that sum is what the feature promotes at the output.
  Crosscoder: its decoder vector at the deepest layer. A crosscoder reconstructs the residual stream
  at every layer, and the residual is cumulative (layer 12's contains layer 9's), so a sum would count
  one write several times; the deepest reconstruction is the one nearest the unembedding.
- its layer-write profile: the norm of its decoder vector at each output layer (how much it writes
  where), which no other catalogue stores.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from featuredb.errors import CoderError
from featuredb.runtime.coder_files import (EncoderOnDevice, clean_id, jump_relu, non_finite, our_hook, read_json,
                                          refuse_lfs_pointer, shape_text, short_reason)
from featuredb.runtime.hooks import parse_hook

KINDS = {"clt": "cross-layer transcoder", "crosscoder": "crosscoder"}  # Gemma Scope 2 config `type`
CONFIG = "config.json"
LAYER_FILES = "params_layer_*.safetensors"
_LAYER_FILE = re.compile(r"params_layer_([0-9]+)\.safetensors")
# model.layers.{all}.pre_feedforward_layernorm.output, model.layers.{5,9,12}.output
_HOOK_PATTERN = re.compile(r"model\.layers\.\{([^{}]*)\}((?:\.[^.{}]+)+)")
_DECODER_CHUNK = 1 << 26  # decoder elements read at once (256 MiB of float32)


@dataclass
class MultiLayerCoder(EncoderOnDevice):
    coder_id: str
    kind: str  # "clt" | "crosscoder"
    hooks: list[str]  # the input hook of each slot, our naming
    hooks_out: list[str]  # the output hook of each output slot of w_dec
    W_enc: Tensor  # [S, d_in, F]
    b_enc: Tensor  # [S, F]
    threshold: Tensor  # [S, F], float32 (compared in float32)
    files: list[Path]  # params_layer_{i}.safetensors of slot i: the decoder is read from them
    d_out: int
    every_layer: bool = False  # hooks given as {all}: the model must have exactly S layers
    affine_skip: bool = False  # the files hold affine_skip_connection (checked, not loaded)
    source: str = ""
    model_name: str | None = None
    architecture: str = "jumprelu"

    @property
    def n_slots(self) -> int:
        return self.W_enc.shape[0]

    @property
    def per_slot(self) -> int:
        return self.W_enc.shape[2]

    @property
    def width(self) -> int:
        return self.n_slots * self.per_slot

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def layers(self) -> list[int]:
        """The model layer each slot reads."""
        return [parse_hook(h).layer for h in self.hooks]

    @property
    def layers_out(self) -> list[int]:
        return [parse_hook(h).layer for h in self.hooks_out]

    @property
    def layer(self) -> int:
        return self.layers[0]

    @property
    def hook(self) -> str:
        """All input hooks in one name, model.layers.{5,9,12}.output (the catalogue's `hook`)."""
        return hook_pattern(self.hooks)

    @property
    def hook_out(self) -> str:
        return hook_pattern(self.hooks_out)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MultiLayerCoder:
        """A copy with its encoders on `device` in `dtype`; the threshold stays float32."""
        return dataclasses.replace(self, W_enc=self.W_enc.to(device=device, dtype=dtype),
                                   b_enc=self.b_enc.to(device=device, dtype=dtype),
                                   threshold=self.threshold.to(device=device))

    def encoder_on(self, device: torch.device | str) -> MultiLayerCoder:
        """A copy that encodes on `device` in float32 (its decoder is never loaded)."""
        return self.to(device=device, dtype=torch.float32)

    def encode_hooked(self, activations: dict[str, Tensor]) -> Tensor:
        """{hook: [..., d_in]} -> [..., S * F] activations, slot-major, in the coder's dtype."""
        first = activations[self.hooks[0]]
        out = torch.empty(*first.shape[:-1], self.width, dtype=self.dtype, device=self.device)
        F = self.per_slot
        for slot, hook in enumerate(self.hooks):
            x = activations[hook].to(self.dtype)
            if x.shape[-1] != self.d_in:
                raise CoderError(f"coder {self.coder_id}: {hook} gives last dim {x.shape[-1]}, expected d_in={self.d_in}")
            pre = x @ self.W_enc[slot] + self.b_enc[slot]
            out[..., slot * F:(slot + 1) * F] = jump_relu(pre, self.threshold[slot])
        return out

    def writes(self, feature: int) -> list[tuple[str, Tensor]]:
        """What feature `feature` adds to the model, and where: its decoder slice at each output
        layer's site (float32, CPU), read from its slot's file. Slices that are all zero are left
        out (a CLT feature writes nothing to the layers before its own)."""
        from safetensors import safe_open

        if not 0 <= feature < self.width:
            raise CoderError(f"coder {self.coder_id}: feature {feature} is out of range (width {self.width})")
        slot, row = divmod(feature, self.per_slot)
        path = self.files[slot]
        try:
            with safe_open(str(path), framework="pt") as f:
                slices = f.get_slice("w_dec")[row:row + 1][0].float()  # [S_out, d_out]
        except Exception as e:  # a file changed or truncated since it was loaded
            raise CoderError(f"{path}: cannot read w_dec ({short_reason(e)})") from None
        if (problem := non_finite(slices)) is not None:
            raise CoderError(f"{path}: w_dec row {row} + {problem}: coder weights must be finite")
        return [(hook, vector) for hook, vector in zip(self.hooks_out, slices) if bool(vector.any())]

    def decoder_summary(self) -> tuple[Tensor, Tensor]:
        """Per feature, read from the files in row slices: its total write [width, d_out] and its
        layer-write profile [width, S_out] (the norm of its decoder vector at each output layer),
        both float32 on the CPU. See the module doc for what "total write" means per kind."""
        from safetensors import safe_open

        F, S_out = self.per_slot, len(self.hooks_out)
        total = torch.empty(self.width, self.d_out, dtype=torch.float32)
        profile = torch.empty(self.width, S_out, dtype=torch.float32)
        deepest = int(np.argmax(self.layers_out))
        rows = max(1, _DECODER_CHUNK // (S_out * self.d_out))
        for slot, path in enumerate(self.files):
            try:
                with safe_open(str(path), framework="pt") as f:
                    w_dec = f.get_slice("w_dec")
                    for start in range(0, F, rows):
                        block = w_dec[start:start + rows].float()  # [n, S_out, d_out]
                        if (problem := non_finite(block)) is not None:
                            raise CoderError(f"{path}: w_dec row {start} + {problem}: coder weights must be finite")
                        at = slice(slot * F + start, slot * F + start + len(block))
                        profile[at] = block.norm(dim=-1)
                        total[at] = block.sum(dim=1) if self.kind == "clt" else block[:, deepest]
            except CoderError:
                raise
            except Exception as e:  # a file changed or truncated since it was loaded
                raise CoderError(f"{path}: cannot read w_dec ({short_reason(e)})") from None
        return total, profile


def hook_pattern(hooks: list[str]) -> str:
    """model.layers.5.output, model.layers.9.output -> model.layers.{5,9}.output (one name for the
    hooks of a multi-layer coder; they differ only in their layer)."""
    sites = [parse_hook(h) for h in hooks]
    inner = f"{sites[0].module_path}." if sites[0].module_path else ""
    return f"model.layers.{{{','.join(str(s.layer) for s in sites)}}}.{inner}{sites[0].point}"


def is_multi_layer(directory: Path) -> bool:
    """A CLT or crosscoder folder: told by its config's type, or, without a single-layer weights
    file, by its per-layer files."""
    config = directory / CONFIG
    if config.is_file() and read_json(config).get("type") in KINDS:
        return True
    single = ("params.npz", "params.safetensors", "sae_weights.safetensors")
    return any(directory.glob(LAYER_FILES)) and not any((directory / name).is_file() for name in single)


def check_config(cfg: dict, where: str) -> str:
    """The kind ("clt" | "crosscoder") of a multi-layer coder's config.json, refused when unusable
    (read before any weights are fetched from the hub)."""
    kind = cfg.get("type")
    if kind not in KINDS:
        raise CoderError(f"{where}: per-layer weights, but config type {kind!r} is not a multi-layer coder "
                         f"(known: {', '.join(KINDS)})")
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise CoderError(f"{where}: unknown architecture {cfg.get('architecture')!r} (expected jump_relu)")
    for key in ("hf_hook_point_in", "hf_hook_point_out"):
        if key not in cfg:
            raise CoderError(f"{where}: missing {key}")
        pattern_layers(cfg[key], None, f"{where}: {key}")  # the form alone, before the slots are counted
    return kind


def load_multi_layer(directory: Path, source: str) -> MultiLayerCoder:
    cfg_path = directory / CONFIG
    if not cfg_path.is_file():
        raise CoderError(f"{directory}: {LAYER_FILES} files without the {CONFIG} that says what they are")
    files = _slot_files(directory)
    cfg = read_json(cfg_path)
    kind = check_config(cfg, str(cfg_path))

    W_enc, b_enc, threshold, affine = [], [], [], []
    w_dec_shape = b_dec_shape = None
    for path in files:
        tensors, shapes = _read_encoder(path)
        d_in, F = tensors["w_enc"].shape
        if W_enc and (d_in, F) != tuple(W_enc[0].shape):
            raise CoderError(f"{path}: w_enc is {shape_text(tensors['w_enc'])}, but {files[0].name}'s is "
                             f"{shape_text(W_enc[0])}: every slot must have the same shape")
        for key in ("b_enc", "threshold"):
            if tuple(tensors[key].shape) != (F,):
                raise CoderError(f"{path}: {key} is {shape_text(tensors[key])}, expected [{F}]")
        w_dec, b_dec = shapes["w_dec"], shapes["b_dec"]
        if len(w_dec) != 3 or w_dec[0] != F or len(b_dec) != 1 or b_dec[0] != w_dec[2]:
            raise CoderError(f"{path}: w_dec {list(w_dec)} and b_dec {list(b_dec)} do not fit w_enc [{d_in}, {F}] "
                             "(expected w_dec [F, output layers, d_out], b_dec [d_out])")
        if w_dec_shape is not None and (w_dec, b_dec) != (w_dec_shape, b_dec_shape):
            raise CoderError(f"{path}: w_dec is {list(w_dec)}, but {files[0].name}'s is {list(w_dec_shape)}")
        w_dec_shape, b_dec_shape = w_dec, b_dec
        if "affine_skip_connection" in shapes and list(shapes["affine_skip_connection"]) != [d_in, w_dec[2]]:
            raise CoderError(f"{path}: affine_skip_connection is {list(shapes['affine_skip_connection'])}, "
                             f"expected [{d_in}, {w_dec[2]}]")
        affine.append("affine_skip_connection" in shapes)
        W_enc.append(tensors["w_enc"])
        b_enc.append(tensors["b_enc"])
        threshold.append(tensors["threshold"].float())
    if len(set(affine)) > 1:
        raise CoderError(f"{directory}: affine_skip_connection in some {LAYER_FILES} files but not all")
    if cfg.get("affine_connection") and not affine[0]:
        raise CoderError(f"{directory}: config says affine_connection but the files have no affine_skip_connection")

    S, S_out = len(files), w_dec_shape[1]
    where = str(cfg_path)
    hooks_in = [our_hook(h, True, where=where) for h in expand_hooks(cfg["hf_hook_point_in"], S, f"{where}: hf_hook_point_in")]
    hooks_out = [our_hook(h, True, where=where)
                 for h in expand_hooks(cfg["hf_hook_point_out"], S_out, f"{where}: hf_hook_point_out (w_dec has {S_out} outputs)")]
    width = cfg.get("width")
    if isinstance(width, int) and width != S * W_enc[0].shape[1]:
        raise CoderError(f"{directory}: config width {width}, but {S} files x {W_enc[0].shape[1]} features "
                         f"= {S * W_enc[0].shape[1]}")
    every_layer = pattern_layers(cfg["hf_hook_point_in"], None, where) is None
    return MultiLayerCoder(
        coder_id=clean_id(f"{directory.parent.name}-{directory.name}"), kind=kind, hooks=hooks_in,
        hooks_out=hooks_out, W_enc=torch.stack(W_enc), b_enc=torch.stack(b_enc), threshold=torch.stack(threshold),
        files=files, d_out=b_dec_shape[0], every_layer=every_layer, affine_skip=affine[0], source=source,
        model_name=cfg.get("model_name"),
    )


def _slot_files(directory: Path) -> list[Path]:
    """params_layer_0 .. params_layer_{S-1}, in slot order; a gap is refused."""
    found = {int(m.group(1)): p for p in directory.glob(LAYER_FILES) if (m := _LAYER_FILE.fullmatch(p.name))}
    if not found:
        raise CoderError(f"{directory}: no {LAYER_FILES} files")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise CoderError(f"{directory}: params_layer_{missing[0]}.safetensors is missing "
                         f"(found {len(found)} files up to params_layer_{max(found)})")
    return [found[i] for i in range(len(found))]


def _read_encoder(path: Path) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]]]:
    """The encoder tensors of one slot file, and the shape of every tensor in it (w_dec is not read)."""
    from safetensors import safe_open

    refuse_lfs_pointer(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            missing = [k for k in ("w_enc", "b_enc", "threshold", "w_dec", "b_dec") if k not in shapes]
            if missing:
                raise CoderError(f"{path}: missing {', '.join(missing)} (has {', '.join(sorted(shapes)) or 'nothing'})")
            tensors = {key: f.get_tensor(key) for key in ("w_enc", "b_enc", "threshold")}
    except CoderError:
        raise
    except Exception as e:
        raise CoderError(f"{path}: corrupt or unreadable safetensors ({short_reason(e)})") from None
    if tensors["w_enc"].ndim != 2:
        raise CoderError(f"{path}: w_enc is {shape_text(tensors['w_enc'])}, expected [d_in, F]")
    for key, tensor in tensors.items():
        if (problem := non_finite(tensor)) is not None:
            raise CoderError(f"{path}: {key}{problem}: coder weights must be finite numbers")
    return tensors, shapes


def pattern_layers(pattern: object, count: int | None, where: str) -> list[int] | None:
    """The layers of `model.layers.{a,b,c}.<site>` (None for {all}); CoderError for another form, or
    when `count` is given and the list does not have that many layers."""
    match = _HOOK_PATTERN.fullmatch(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise CoderError(f"{where}: {pattern!r} is not a multi-layer hook (expected model.layers.{{all}}.<site> "
                         "or model.layers.{a,b,c}.<site>)")
    inside = match.group(1).strip()
    if inside == "all":
        return None
    parts = [p.strip() for p in inside.split(",")]
    if not all(p.isdigit() for p in parts):
        raise CoderError(f"{where}: {pattern!r}: layers must be {{all}} or comma-separated layer numbers")
    layers = [int(p) for p in parts]
    if len(set(layers)) != len(layers):
        raise CoderError(f"{where}: {pattern!r} names a layer twice")
    if count is not None and len(layers) != count:
        raise CoderError(f"{where}: {pattern!r} names {len(layers)} layers, but the coder has {count} slots")
    return layers


def expand_hooks(pattern: str, count: int, where: str) -> list[str]:
    """The `count` hook names of a multi-layer hook: {all} is layers 0..count-1 (a CLT's slot i is
    model layer i), a list gives its layers in order."""
    layers = pattern_layers(pattern, count, where)
    site = _HOOK_PATTERN.fullmatch(pattern).group(2)
    return [f"model.layers.{layer}{site}" for layer in (range(count) if layers is None else layers)]
