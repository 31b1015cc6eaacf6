"""What a coder is, read from its headers alone: id, kind, width, d_in, hooks and weight dtype.

A run over a whole release plans its passes before it loads anything (featuredb.indexer.plan), so
every coder's size must come without reading a tensor: from `config.json` / `cfg.json`, the
safetensors header (8 bytes of length, then JSON naming each tensor's dtype and shape) or the
`.npy` header of each array inside a `params.npz` zip. A 1M-wide coder's header is a few hundred
bytes; its weights are gigabytes.

From the hub: the configs are fetched (kilobytes), then each weights file's header: from the local
hub cache when the file is there, else over HTTP (huggingface_hub reads the first bytes of the
file), else, for a Gemma Scope `params.npz` (a zip has no header at its start), the width from the
folder name (`width_16k`) and d_in from the model (`d_in=None` here; the planner fills it in).

The id, kind and hooks are derived exactly as `load_coder` derives them, and the indexer checks
that the coders it loads are the ones planned.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from featuredb.errors import CoderError
from featuredb.runtime import coders as coder_formats
from featuredb.runtime.coder_files import clean_id, our_hook, read_json, refuse_lfs_pointer, refuse_pickled, short_reason
from featuredb.runtime.hooks import parse_hook
from featuredb.runtime.multilayer import (CONFIG, LAYER_FILES, expand_hooks, pattern_layers, check_config, hook_pattern,
                                          is_multi_layer)

_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                       "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
_WIDTH_IN_NAME = re.compile(r"width_([0-9]+)([km]?)(?:[_/]|$)")
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is a corrupt file, not a coder


@dataclass(frozen=True)
class CoderHeader:
    """One coder as its headers describe it (no tensor read)."""

    spec: str  # what loads it: `ID=LOCATION[@HOOK]`, the id pinned so the loaded coder is the planned one
    coder_id: str
    kind: str  # sae | transcoder | skip_transcoder | clt | crosscoder
    width: int  # features
    d_in: int | None  # None: a hub params.npz, whose d_in is the model's (the planner fills it in)
    hooks: tuple[str, ...]  # input hooks, our naming (one per slot of a multi-layer coder)
    weight_dtype: str  # as stored: F32, BF16 ...
    slots: int = 1  # encoders held (a CLT or crosscoder: one per slot)

    @property
    def layers(self) -> list[int]:
        return sorted({parse_hook(h).layer for h in self.hooks})

    @property
    def deepest_layer(self) -> int:
        return max(self.layers)

    def encoder_bytes(self, itemsize: int = 4) -> int:
        """The encoder on the device at `itemsize` bytes a weight (the indexer encodes in float32):
        W_enc, b_enc and the threshold of every slot (b_dec, d_in numbers, is counted too)."""
        assert self.d_in is not None, "d_in must be known to size the encoder"
        return itemsize * (self.slots * (self.d_in * self.per_slot + 2 * self.per_slot) + self.d_in)

    def decoder_bytes(self, itemsize: int = 4) -> int:
        """The decoder where the indexer holds it in memory: a one-layer coder's W_dec [width, d]
        (kept on the host; d_out taken as d_in, as for every Gemma Scope coder). A multi-layer
        coder's decoder is read from its files in slices when the catalogue is written: 0."""
        assert self.d_in is not None, "d_in must be known to size the decoder"
        return itemsize * self.width * self.d_in if self.slots == 1 else 0

    @property
    def per_slot(self) -> int:
        return self.width // self.slots


def coder_header(spec: str, *, model_is_gemma: bool = True, cache_dir: str | None = None) -> CoderHeader:
    """The header of the coder `[ID=]PATH_OR_HUBREF[@HOOK]` or `[ID=]RELEASE:SAE_ID[@HOOK]` (see load_coder)."""
    coder_id, location, hook = coder_formats.parse_coder_spec(spec)
    named = coder_formats.named_coder(location)
    if named is not None:
        location = named.hub_ref
        coder_id = coder_id or coder_formats.named_coder_id(named)
    path = Path(location).expanduser()
    if path.exists():
        directory = path.parent if path.is_file() else path
        header = _local_header(directory, label=str(directory.absolute()), hook=hook, model_is_gemma=model_is_gemma)
    elif coder_formats.looks_like_hub_ref(location):
        header = _hub_header(location, hook, model_is_gemma, cache_dir)
    else:
        raise CoderError(f"coder directory not found: {location}")
    coder_id = coder_id or header.coder_id
    at = f"@{hook}" if hook is not None else ""
    return replace(header, coder_id=coder_id, spec=f"{coder_id}={location}{at}")


# --- local folders -------------------------------------------------------------------------------


def _local_header(directory: Path, *, label: str, hook: str | None, model_is_gemma: bool,
                  weights: dict[str, Path | dict] | None = None) -> CoderHeader:
    """`weights` maps a weights file name to its path, or to its header already read (the hub's);
    by default the files in `directory`."""
    if not directory.is_dir() and weights is None:  # from the hub, a folder without configs has none in the cache
        raise CoderError(f"coder directory not found: {directory}")
    if is_multi_layer(directory):
        return _multi_layer_header(directory, hook, weights)
    names = ({p.name for p in directory.iterdir()} if directory.is_dir() else set()) | set(weights or {})

    def tensors(name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        found = (weights or {}).get(name, directory / name)
        return found if isinstance(found, dict) else read_safetensors_header(found)

    if coder_formats.SAELENS_CONFIG in names:
        cfg = read_json(directory / coder_formats.SAELENS_CONFIG)
        meta = cfg.get("metadata") or cfg.get("meta") or {}
        hook_name = next((v for v in (cfg.get("hook_name"), meta.get("hook_name"), cfg.get("hook_point"),
                                      meta.get("hook_point")) if v), None)
        if not hook_name:
            raise CoderError(f"{directory / coder_formats.SAELENS_CONFIG}: missing hook_name (top level or "
                             "metadata.hook_name)")
        _require(directory, names, coder_formats.SAELENS_WEIGHTS, "SAELens coder")
        dtype, (d_in, width) = _matrix(tensors(coder_formats.SAELENS_WEIGHTS), "W_enc", directory)
        ours = our_hook(hook_name, model_is_gemma, where=str(directory / coder_formats.SAELENS_CONFIG))
        header = CoderHeader("", clean_id(directory.name), "sae", width, d_in, (ours,), dtype)
    elif coder_formats.GS2_CONFIG in names or coder_formats.GS2_WEIGHTS in names:
        for needed in (coder_formats.GS2_CONFIG, coder_formats.GS2_WEIGHTS):
            _require(directory, names, needed, "Gemma Scope 2 coder")
        cfg_path = directory / coder_formats.GS2_CONFIG
        cfg = read_json(cfg_path)
        if "hf_hook_point_in" not in cfg:
            raise CoderError(f"{cfg_path}: missing hf_hook_point_in")
        header_of = tensors(coder_formats.GS2_WEIGHTS)
        dtype, (d_in, width) = _matrix(header_of, "w_enc", directory)
        kind = "sae" if cfg.get("type", "sae") == "sae" else (
            "skip_transcoder" if "affine_skip_connection" in header_of else "transcoder")
        ours = our_hook(cfg["hf_hook_point_in"], True, where=str(cfg_path))
        header = CoderHeader("", clean_id(f"{directory.parent.name}-{directory.name}"), kind, width, d_in, (ours,),
                             dtype)
    elif coder_formats.GS1_WEIGHTS in names:
        found = (weights or {}).get(coder_formats.GS1_WEIGHTS, directory / coder_formats.GS1_WEIGHTS)
        gs1_hook, gs1_id, gs1_kind = coder_formats.gemma_scope_1_naming(label, directory, hook_given=hook is not None)
        if isinstance(found, dict) and "W_enc" not in found:  # a hub params.npz not in the cache: width from its name
            dtype, d_in, width = "F32", None, _width_from_name(label)
        else:
            dtype, (d_in, width) = _matrix(found, "W_enc", directory) if isinstance(found, dict) else _npz_matrix(found, "W_enc")
        header = CoderHeader("", gs1_id, gs1_kind, width, d_in, (gs1_hook,), dtype)
    else:
        refuse_pickled(directory)
        raise CoderError(f"{directory}: no recognised coder files (expected params.npz, params.safetensors + "
                         "config.json, or cfg.json + sae_weights.safetensors)")
    if hook is not None:  # @HOOK moves the input hook (and the layer with it), as load_coder does
        header = replace(header, hooks=(our_hook(hook, model_is_gemma, where=label),))
    return header


def _multi_layer_header(directory: Path, hook: str | None, weights: dict | None) -> CoderHeader:
    cfg_path = directory / CONFIG
    if not cfg_path.is_file():
        raise CoderError(f"{directory}: {LAYER_FILES} files without the {CONFIG} that says what they are")
    cfg = read_json(cfg_path)
    kind = check_config(cfg, str(cfg_path))
    if weights is None:
        slot_files = {p.name: p for p in directory.glob(LAYER_FILES)}
    else:
        slot_files = weights
    count = len([n for n in slot_files if re.fullmatch(r"params_layer_[0-9]+\.safetensors", n)])
    if count == 0:
        raise CoderError(f"{directory}: no {LAYER_FILES} files")
    names = [f"params_layer_{i}.safetensors" for i in range(count)]
    if missing := [n for n in names if n not in slot_files]:
        raise CoderError(f"{directory}: {missing[0]} is missing (found {count} files)")
    first = slot_files[names[0]]
    dtype, (d_in, per_slot) = _matrix(first if isinstance(first, dict) else read_safetensors_header(first), "w_enc",
                                      directory)
    where = str(cfg_path)
    hooks = tuple(our_hook(h, True, where=where) for h in expand_hooks(cfg["hf_hook_point_in"], count, f"{where}: hf_hook_point_in"))
    if hook is not None and hook != hook_pattern(list(hooks)):
        raise CoderError(f"{directory}: a {kind} reads the hooks its config names ({hook_pattern(list(hooks))}); "
                         f"@{hook} cannot move it")
    pattern_layers(cfg["hf_hook_point_in"], count, where)
    return CoderHeader("", clean_id(f"{directory.parent.name}-{directory.name}"), kind, count * per_slot, d_in, hooks,
                       dtype, slots=count)


def _require(directory: Path, names: set[str], name: str, what: str) -> None:
    if name not in names:
        refuse_pickled(directory)
        raise CoderError(f"{directory}: {what} without {name}")


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor: (dtype, shape)} from a safetensors file's header, reading nothing else."""
    refuse_lfs_pointer(path)
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER:
                raise ValueError(f"header length {length}")
            raw = json.loads(f.read(length))
        return {name: (info["dtype"], tuple(info["shape"])) for name, info in raw.items() if name != "__metadata__"}
    except Exception as e:
        raise CoderError(f"{path}: corrupt or unreadable safetensors header ({short_reason(e)})") from None


def _matrix(header: dict[str, tuple[str, tuple[int, ...]]], key: str, where: Path) -> tuple[str, tuple[int, int]]:
    if key not in header:
        raise CoderError(f"{where}: no {key} in the weights (has {', '.join(sorted(header)) or 'nothing'})")
    dtype, shape = header[key]
    if len(shape) != 2 or dtype not in _SAFETENSORS_DTYPES:
        raise CoderError(f"{where}: {key} is {dtype} {list(shape)}, expected a [d_in, width] matrix of numbers")
    return dtype, (int(shape[0]), int(shape[1]))


def _npz_matrix(path: Path, key: str) -> tuple[str, tuple[int, int]]:
    """dtype and shape of one array of an npz, from its .npy header inside the zip."""
    refuse_lfs_pointer(path)
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)  # the header alone
    except KeyError:
        raise CoderError(f"{path}: missing {key}") from None
    except Exception as e:
        raise CoderError(f"{path}: corrupt or unreadable npz ({short_reason(e)})") from None
    if len(shape) != 2 or dtype.kind != "f":
        raise CoderError(f"{path}: {key} is {dtype.str} {list(shape)}, expected a [d_in, width] matrix")
    return f"F{dtype.itemsize * 8}", (int(shape[0]), int(shape[1]))


def _width_from_name(label: str) -> int:
    match = _WIDTH_IN_NAME.search(label)
    if match is None:
        raise CoderError(f"{label}: cannot tell the width without its weights (no width_<N>[k|m] in the name)")
    return int(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20}[match.group(2)]


# --- the hub --------------------------------------------------------------------------------------


def _hub_header(location: str, hook: str | None, model_is_gemma: bool, cache_dir: str | None) -> CoderHeader:
    """Configs downloaded, weights' headers read (cache, else HTTP): no weights fetched."""
    repo_id, sub = coder_formats.split_hub_ref(location)
    configs = coder_formats.fetch_configs(location, repo_id, sub, cache_dir)
    label = f"{repo_id}/{sub}" if sub else repo_id
    # the configs say which weights file to read the header of (none: Gemma Scope 1's params.npz)
    if (configs / CONFIG).is_file() and is_multi_layer_config(configs / CONFIG):
        files = [f"params_layer_{i}.safetensors" for i in range(_remote_slot_count(repo_id, sub, cache_dir))]
    elif (configs / coder_formats.SAELENS_CONFIG).is_file():
        files = [coder_formats.SAELENS_WEIGHTS]
    elif (configs / coder_formats.GS2_CONFIG).is_file():
        files = [coder_formats.GS2_WEIGHTS]
    else:
        files = [coder_formats.GS1_WEIGHTS]
    weights = {}
    for name in files:
        found = remote_weights_header(repo_id, f"{sub}/{name}" if sub else name, cache_dir)
        if found is None:
            raise CoderError(f"cannot read coder {location!r} from the hub: no {name} under {sub or 'its root'} "
                             f"in {repo_id}")
        weights[name] = found
    return _local_header(configs, label=label, hook=hook, model_is_gemma=model_is_gemma, weights=weights)


def is_multi_layer_config(path: Path) -> bool:
    return read_json(path).get("type") in ("clt", "crosscoder")


def remote_weights_header(repo_id: str, filename: str, cache_dir: str | None) -> dict | None:
    """The header of a weights file on the hub: read from the cache when the file is there, else
    over HTTP (safetensors); {} for a params.npz that exists but is not cached (no header to read
    remotely); None when the file does not exist."""
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    if isinstance(cached, str):
        path = Path(cached)
        return read_safetensors_header(path) if path.suffix == ".safetensors" else _npz_header(path)
    if filename.endswith(".npz"):
        return {}  # a zip keeps its directory at the end: the width comes from the folder's name
    try:
        meta = huggingface_hub.get_safetensors_metadata(repo_id, filename=filename)
    except Exception as e:  # offline, missing file, no auth
        if _is_missing(e):
            return None
        raise CoderError(f"cannot read {repo_id}/{filename} from the hub: {short_reason(e)}") from None
    for file_meta in meta.files_metadata.values():
        return {name: (info.dtype, tuple(info.shape)) for name, info in file_meta.tensors.items()}
    return None


def _npz_header(path: Path) -> dict:
    """A cached params.npz: W_enc's dtype and shape as a header-like dict."""
    dtype, shape = _npz_matrix(path, "W_enc")
    return {"W_enc": (dtype, shape), "__npz__": (str(path), ())}


def _remote_slot_count(repo_id: str, sub: str, cache_dir: str | None = None) -> int:
    """How many params_layer_{i}.safetensors a hub folder holds: counted in the cache when the first
    is there, else listed on the hub."""
    import huggingface_hub

    prefix = f"{sub}/" if sub else ""
    cached = 0
    while isinstance(huggingface_hub.try_to_load_from_cache(repo_id, f"{prefix}params_layer_{cached}.safetensors",
                                                            cache_dir=cache_dir), str):
        cached += 1
    if cached:
        return cached
    try:
        names = huggingface_hub.list_repo_files(repo_id)
    except Exception as e:
        raise CoderError(f"cannot list {repo_id} on the hub: {short_reason(e)}") from None
    return sum(1 for n in names if n.startswith(prefix) and re.fullmatch(r"params_layer_[0-9]+\.safetensors", n[len(prefix):]))


def _is_missing(e: Exception) -> bool:
    return type(e).__name__ in ("EntryNotFoundError", "RemoteEntryNotFoundError", "NotASafetensorsRepoError",
                                "SafetensorsParsingError")
