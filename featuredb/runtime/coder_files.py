"""What every coder format shares (featuredb.runtime.coders for the single-layer ones,
featuredb.runtime.multilayer for CLTs and crosscoders): safe file readers and the JumpReLU.

Every failure is a one-line CoderError naming the file and what is wrong with it. Nothing is ever
unpickled: npz archives load with allow_pickle=False, weights otherwise come from safetensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from featuredb.errors import CoderError
from featuredb.runtime.hooks import HookError, from_transformer_lens

# Pickled PyTorch weights are never loaded: unpickling a downloaded file can run its code.
PICKLED_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def shape_text(t: Tensor) -> str:
    return "[" + ", ".join(str(n) for n in t.shape) + "]"


def non_finite(t: Tensor | None) -> str | None:
    """None when every value of `t` is finite, else its first NaN/inf as "[3, 17] is nan".

    A NaN or inf weight poisons every statistic computed from it. A full-size coder is GBs, so the
    test is one sum (any NaN/inf makes it non-finite; 0.05 s per 600 MB, isfinite().all() is ~70x
    slower); only a non-finite sum, which a finite overflow can also give, looks for the index.
    """
    if t is None or not t.is_floating_point() or t.numel() == 0 or torch.isfinite(t.sum()):
        return None
    bad = (~torch.isfinite(t)).flatten().nonzero()
    if len(bad) == 0:  # the sum overflowed; every value is finite
        return None
    flat = int(bad[0])
    index = np.unravel_index(flat, tuple(t.shape)) if t.ndim else ()
    value = float(t.flatten()[flat])
    return f"[{', '.join(str(int(i)) for i in index)}] is {value}"


def short_reason(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def our_hook(name: str, model_is_gemma: bool, *, where: str) -> str:
    try:
        return from_transformer_lens(name, gemma=model_is_gemma)
    except HookError as e:
        raise CoderError(f"{where}: {e}") from None


def clean_id(text: str) -> str:
    """Only [A-Za-z0-9._-]: ids go into file names and table keys."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "coder"


# ----------------------------------------------------------------------------------------------
# readers (every failure is a one-line CoderError naming the file)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    refuse_lfs_pointer(path)
    try:
        with np.load(path, allow_pickle=False) as archive:  # never unpickle
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise CoderError(f"{path}: not an .npz archive")
            return {key: _npz_array(archive, key, path) for key in archive.files}
    except CoderError:
        raise
    except Exception as e:  # BadZipFile, EOFError, OSError...
        raise CoderError(f"{path}: corrupt or unreadable npz ({short_reason(e)})") from None


def _npz_array(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """One array of the archive, which must hold numbers (not strings, nor objects that need unpickling)."""
    try:
        array = archive[key]
    except ValueError as e:  # "Object arrays cannot be loaded when allow_pickle=False", a bad header
        raise CoderError(f"{path}: corrupt or unreadable npz (array {key!r}: {short_reason(e)})") from None
    if array.dtype.kind not in "fiu":
        raise CoderError(f"{path}: array {key!r} has dtype {array.dtype.str}, expected numbers")
    return array


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    refuse_lfs_pointer(path)
    try:
        return load_file(str(path))
    except Exception as e:
        raise CoderError(f"{path}: corrupt or unreadable safetensors ({short_reason(e)})") from None


def read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except Exception as e:
        raise CoderError(f"{path}: unreadable JSON ({short_reason(e)})") from None
    if not isinstance(cfg, dict):
        raise CoderError(f"{path}: expected a JSON object")
    return cfg


def refuse_pickled(directory: Path) -> None:
    """Name the pickled weights of a coder that has no readable ones, so the user knows what to convert."""
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise CoderError(
            f"{directory}: {', '.join(pickled)}: pickled PyTorch weights are never loaded (unpickling can run code); "
            "convert them to safetensors"
        )


def refuse_lfs_pointer(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(40).startswith(b"version https://git-lfs"):
            raise CoderError(f"{path}: a Git LFS pointer, not the weights (run `git lfs pull`)")


def take(tensors: dict, keys: tuple[str, ...], path: Path) -> list[Tensor]:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CoderError(f"{path}: missing {', '.join(missing)} (has {', '.join(sorted(tensors)) or 'nothing'})")
    return [finite(tensors, k, path) for k in keys]


def finite(tensors: dict, key: str, path: Path) -> Tensor | None:
    """tensors[key] as a tensor (None when absent), refused with file, tensor and index if not finite."""
    if key not in tensors:
        return None
    tensor = torch.as_tensor(tensors[key])
    if (problem := non_finite(tensor)) is not None:
        raise CoderError(f"{path}: {key}{problem}: coder weights must be finite numbers")
    return tensor


# ----------------------------------------------------------------------------------------------
# what every coder has


class EncoderOnDevice:
    """A coder's dtype and device: its encoder's (SparseCoder and MultiLayerCoder both hold W_enc)."""

    W_enc: Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device


def jump_relu(pre: Tensor, threshold: Tensor) -> Tensor:
    """f = pre where pre > threshold, else 0 (pre exactly at the threshold is off), in float32.

    Compared in float32: a bf16 threshold test would move features on and off. In place: each pass
    over [tokens, width] is memory-bound, so fewer passes is faster on every device. threshold >= 0
    makes this a relu too; the explicit relu guards a negative threshold.
    """
    pre32 = pre.float()
    pre32.masked_fill_(pre32 <= threshold.float(), 0.0)
    return pre32.relu_()
