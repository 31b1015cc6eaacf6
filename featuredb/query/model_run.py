"""Texts through the subject model and the catalogue's coders: what fires_on and find share.

Which coders run (`chosen_coders`) and which model (`model_spec`), the model and coders loaded
once and kept in the Reader's caches (`shared_model`, `loaded_coder`), one forward pass for the
texts of a call (`capture`: a `forward.SharedModel`, so concurrent calls are serialised and
batched), and each coder's activations kept sparse (`sparse_activations`: only nonzero entries,
encoded a chunk of positions at a time, so a 1M-wide coder costs memory in proportion to what
fires, not to its width).
"""

from __future__ import annotations

import numbers
import re
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from featuredb.errors import ModelError, QueryError, one_line
from featuredb.store import Filter
from featuredb.query.forward import SharedModel

if TYPE_CHECKING:
    from torch import Tensor

    from featuredb.query.reader import Reader

_CHUNK_ELEMENTS = 1 << 24  # positions x width encoded at once (64 MiB of float32)
_ID_CHARS = re.compile(r"[A-Za-z0-9._-]+")


def check_max_density(max_density: float | None) -> None:
    if max_density is not None:
        if not isinstance(max_density, numbers.Real) or isinstance(max_density, bool) or not 0 < float(max_density) <= 1:
            raise QueryError(f"max_density must be a number in (0, 1], got {max_density!r}")


def chosen_coders(reader: Reader, coders: list[str] | str | None) -> pl.DataFrame:
    """The coders rows named (a coder_id or a list of them), or every coder when None."""
    all_coders = reader.coder_table(refresh=True)
    if coders is None:
        if all_coders.height == 0:
            raise QueryError("the catalogue holds no coders")
        return all_coders
    names = [coders] if isinstance(coders, str) else coders
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(s, str) and s for s in names):
        raise QueryError(f"saes must be a coder_id or a non-empty list of them, got {coders!r}")
    reader.check_coder_ids(set(names))
    return reader.coder_table().filter(pl.col("coder_id").is_in(list(names)))


def model_spec(coders: pl.DataFrame, model: str | None) -> str:
    """The subject model to run: `model` if the caller names one, else the chosen coders' own."""
    models = sorted(set(coders["model"].to_list()))
    if len(models) > 1:
        raise QueryError(f"the chosen coders belong to {len(models)} models ({', '.join(models)}): "
                         "choose coders of one model with coders=[...]")
    if model is None:
        return models[0]
    if not isinstance(model, str) or not model.strip():
        raise QueryError(f"model must be a non-empty string (a directory, a .gguf file or a hub id), got {model!r}")
    return model


def shared_model(reader: Reader, spec: str, device: str | None) -> SharedModel:
    """The subject model, loaded once per device and kept, shared by every thread."""
    import torch

    from featuredb.runtime.model import load_model

    device = device or "cpu"

    def load():
        try:
            return SharedModel(load_model(spec, device=torch.device(device), dtype=torch.float32))
        except ModelError:
            raise  # it already names the model and the file
        except Exception as e:  # a bad device, ...
            raise QueryError(f"cannot load the subject model {spec!r}: {one_line(e)}") from None

    return reader.cached("models", f"{spec}@{device}", load)


def loaded_coders(reader: Reader, coders: pl.DataFrame, model) -> list:
    """Every chosen coder as stored in the catalogue (source + hook), loaded once and kept."""
    return [reader.cached("coders", (row["coder_id"], str(model.device)), lambda row=row: _load_coder(row, model))
            for row in coders.iter_rows(named=True)]


def capture(shared: SharedModel, texts: list[list[int]], coders: list) -> list[dict[str, Tensor]]:
    """Activations at every hook the coders read, for each text (BOS + token ids) in one pass."""
    try:
        return shared.capture_many(texts, {hook for c in coders for hook in c.hooks})
    except Exception as e:  # HookError / ModelError / torch errors: one line for the user
        raise QueryError(f"forward pass failed: {one_line(e)}") from None


def _load_coder(stored: dict, model):
    import torch

    from featuredb.runtime.coders import load_coder

    source = stored["source"]
    if not source:
        raise QueryError(f"coder {stored['coder_id']!r} has no stored source to load it from")
    prefix = f"{stored['coder_id']}=" if _ID_CHARS.fullmatch(stored["coder_id"]) else ""
    # a multi-layer coder's hooks come from its own config (its stored hook names them all)
    spec = f"{prefix}{source}" + ("" if stored.get("layers") else f"@{stored['hook']}")
    is_gemma = "gemma" in type(model.model).__name__.lower()
    try:
        coder = load_coder(spec, model_is_gemma=is_gemma)
    except Exception as e:  # CoderError, download failures
        raise QueryError(f"cannot load coder {stored['coder_id']!r} from {source!r}: {one_line(e)}") from None
    coder.coder_id = stored["coder_id"]
    if coder.d_in != stored["d_in"] or coder.width != stored["width"]:
        raise QueryError(f"coder {stored['coder_id']!r} at {source!r} has d_in={coder.d_in}, width={coder.width}, "
                         f"but the catalogue recorded d_in={stored['d_in']}, width={stored['width']}")
    return coder.to(device=model.device, dtype=torch.float32)


def sparse_activations(coder, inputs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position, feature, value) of every nonzero activation, from {hook: [T, d_in]} of the hooks it reads."""
    import torch

    T = next(iter(inputs.values())).shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, coder.width))
    positions, features, values = [], [], []
    with torch.inference_mode():
        for start in range(0, T, step):
            acts = coder.encode_hooked({hook: x[start:start + step].float() for hook, x in inputs.items()})
            pos, feat = acts.nonzero(as_tuple=True)
            positions.append((pos + start).cpu().numpy())
            features.append(feat.cpu().numpy())
            values.append(acts[pos, feat].float().cpu().numpy())
    if not positions:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(positions), np.concatenate(features), np.concatenate(values)


def coder_density(reader: Reader, coder_id: str, width: int) -> np.ndarray:
    """Density of each of a coder's features (NaN where a feature is not stored), cached."""

    def load() -> np.ndarray:
        table = reader.features_table()
        rows = (table.search().where(Filter().eq("coder_id", coder_id).render(table.schema))
                .select(["feature", "density"]).limit(None).to_arrow())
        density = np.full(width, np.nan)
        density[rows["feature"].to_numpy()] = rows["density"].to_numpy()
        return density

    return reader.cached("coder_stats", coder_id, load)


def below_density(reader: Reader, coder, feature: np.ndarray, max_density: float | None) -> np.ndarray:
    """True for the features at most `max_density` dense (all when None; an unknown density is kept)."""
    if max_density is None or not len(feature):
        return np.ones(len(feature), dtype=bool)
    return ~(coder_density(reader, coder.coder_id, coder.width)[feature] > float(max_density))
