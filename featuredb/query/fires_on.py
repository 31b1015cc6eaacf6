"""Activation search: which features fire on a text (runs the model).

The text is tokenized like the indexer's windows (BOS first, then the tokens), run once
through the subject model with every needed hook, and each coder's activations are kept sparse
(only nonzero entries), so a 1M-wide coder costs memory in proportion to what fires. BOS never
counts. Models and coders load lazily and stay cached in the Reader for the next call; the model
is a `forward.SharedModel`, so concurrent calls (the server's) each get a lone call's answer, and
texts that arrive together share a forward pass. Models and coder weights named by imported data
load only when the user allows it (Reader.check_loadable).
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from featuredb.errors import ModelError, QueryError, one_line
from featuredb.store import Filter
from featuredb.query.builder import check_limit, check_text
from featuredb.query.forward import SharedModel

if TYPE_CHECKING:
    from featuredb.query.reader import Reader

MAX_TEXT_CHARS = 20_000
MAX_TOKENS = 1024  # a forward pass on CPU stays interactive, and dense chunks stay small
_CHUNK_ELEMENTS = 1 << 24  # positions x width encoded at once (64 MiB of float32)
_ID_CHARS = re.compile(r"[A-Za-z0-9._-]+")
INFO_COLUMNS = ["coder_id", "feature", "layer", "site", "description", "density", "max_activation"]


@dataclass
class FiresOn:
    """Result of Catalogue.fires_on.

    tokens: the text's tokens as strings (BOS excluded); positions index this list.
    features: ranked features: coder_id, feature, layer, site, description, density,
        max_activation (the catalogue's), activation (max or sum over the chosen positions),
        position (where the max is), active_positions, relative (activation / max_activation).
    per_token: for every position, its top features: position, token, rank, coder_id, feature,
        activation, description.
    """

    model: str
    tokens: list[str]
    token_ids: list[int]
    by: str
    features: pl.DataFrame
    per_token: pl.DataFrame

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "tokens": self.tokens, "token_ids": self.token_ids, "by": self.by,
                "features": self.features.to_dicts(), "per_token": self.per_token.to_dicts()}


def fires_on(reader: Reader, text: str, *, coders: list[str] | str | None = None, by: str = "max",
             positions: list[int] | None = None, max_density: float | None = None, limit: int = 20,
             per_token: int = 5, device: str | None = None, model: str | None = None) -> FiresOn:
    text = check_text(text, "text", MAX_TEXT_CHARS)
    limit = _check_options(by, limit, per_token, max_density)
    coders = _chosen_coders(reader, coders)
    spec = _model_spec(coders, model)
    reader.check_loadable(coders, explicit_model=model)

    shared = _model(reader, spec, device)
    token_ids = shared.token_ids(text)
    if not token_ids:
        raise QueryError("the text has no tokens")
    if len(token_ids) > MAX_TOKENS:
        raise QueryError(f"the text is {len(token_ids):,} tokens long; at most {MAX_TOKENS:,}")
    chosen = _positions(positions, len(token_ids))
    loaded = [_coder(reader, row, shared.model) for row in coders.iter_rows(named=True)]
    try:
        captured = shared.capture(token_ids, {hook for c in loaded for hook in c.hooks})
    except Exception as e:  # HookError / ModelError / torch errors: one line for the user
        raise QueryError(f"forward pass failed: {one_line(e)}") from None

    tokens = shared.decode(token_ids)
    active = _active(reader, loaded, captured, max_density)
    selected = active.filter(pl.col("position").is_in(chosen)) if chosen is not None else active
    ranked = _rank(selected, by).head(limit)
    per = _per_token(active, per_token, tokens)
    info = _info(reader, ranked.select("coder_id", "feature"), per.select("coder_id", "feature"))
    features = (
        ranked.join(info, on=["coder_id", "feature"], how="left")
        .with_columns(relative=(pl.col("activation") / pl.col("max_activation")).cast(pl.Float64))
        .select(INFO_COLUMNS + ["activation", "position", "active_positions", "relative"])
    )
    per = per.join(info.select("coder_id", "feature", "description"), on=["coder_id", "feature"], how="left").sort(
        ["position", "rank"])
    return FiresOn(model=spec, tokens=tokens, token_ids=token_ids, by=by, features=features, per_token=per)


def _check_options(by: str, limit: int, per_token: int, max_density: float | None) -> int:
    """QueryError for a bad option; the checked limit."""
    if by not in ("max", "sum"):
        raise QueryError(f"by must be 'max' or 'sum', got {by!r}")
    if not isinstance(per_token, numbers.Integral) or isinstance(per_token, bool) or not 0 <= per_token <= 100:
        raise QueryError(f"per_token must be an integer in [0, 100], got {per_token!r}")
    if max_density is not None:
        if not isinstance(max_density, numbers.Real) or isinstance(max_density, bool) or not 0 < float(max_density) <= 1:
            raise QueryError(f"max_density must be a number in (0, 1], got {max_density!r}")
    return check_limit(limit)


def _model_spec(coders: pl.DataFrame, model: str | None) -> str:
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


def _active(reader: Reader, loaded: list, captured: dict, max_density: float | None) -> pl.DataFrame:
    """Every nonzero activation of every coder: coder_id, feature, position, activation."""
    parts = []
    for coder in loaded:
        pos, feat, val = _sparse_activations(coder, {hook: captured[hook][1:] for hook in coder.hooks})  # BOS dropped
        if max_density is not None and len(feat):
            density = _coder_density(reader, coder.coder_id, coder.width)
            keep = ~(density[feat] > float(max_density))  # unknown density (NaN) is kept
            pos, feat, val = pos[keep], feat[keep], val[keep]
        parts.append(pl.DataFrame({"coder_id": pl.Series([coder.coder_id] * len(feat), dtype=pl.String),
                                   "feature": feat.astype(np.int64), "position": pos.astype(np.int64),
                                   "activation": val.astype(np.float32)}))
    if parts:
        return pl.concat(parts)
    return pl.DataFrame(schema={"coder_id": pl.String, "feature": pl.Int64, "position": pl.Int64,
                                "activation": pl.Float32})


def _chosen_coders(reader: Reader, coders: list[str] | str | None) -> pl.DataFrame:
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


def _positions(positions: list[int] | None, n: int) -> list[int] | None:
    if positions is None:
        return None
    if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
        raise QueryError(f"positions must be a list of token positions, got {positions!r}")
    chosen = []
    for p in positions:
        if not isinstance(p, numbers.Integral) or isinstance(p, bool):
            raise QueryError(f"positions must be integers, got {p!r}")
        if not -n <= int(p) < n:
            raise QueryError(f"position {p} is out of range: the text has {n} tokens (BOS not counted)")
        chosen.append(int(p) % n)
    if not chosen:
        raise QueryError("positions is empty")
    return sorted(set(chosen))


def _model(reader: Reader, spec: str, device: str | None) -> SharedModel:
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


def _coder(reader: Reader, stored: dict, model):
    """The coder as stored in the catalogue (source + hook), loaded once and kept."""
    return reader.cached("coders", (stored["coder_id"], str(model.device)), lambda: _load_coder(stored, model))


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


def _sparse_activations(coder, inputs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _coder_density(reader: Reader, coder_id: str, width: int) -> np.ndarray:
    """Density of each of a coder's features (NaN where a feature is not stored), cached."""

    def load() -> np.ndarray:
        table = reader.features_table()
        rows = (table.search().where(Filter().eq("coder_id", coder_id).render(table.schema))
                .select(["feature", "density"]).limit(None).to_arrow())
        density = np.full(width, np.nan)
        density[rows["feature"].to_numpy()] = rows["density"].to_numpy()
        return density

    return reader.cached("coder_stats", coder_id, load)


def _rank(active: pl.DataFrame, by: str) -> pl.DataFrame:
    if active.height == 0:
        return pl.DataFrame(schema={"coder_id": pl.String, "feature": pl.Int64, "activation": pl.Float32,
                                    "position": pl.Int64, "active_positions": pl.UInt32})
    score = pl.col("activation").max() if by == "max" else pl.col("activation").sum()
    return (
        active.group_by("coder_id", "feature")
        .agg(score.alias("activation"),
             pl.col("position").sort_by("activation", descending=True).first().alias("position"),
             pl.len().alias("active_positions"))
        .sort(["activation", "coder_id", "feature"], descending=[True, False, False])
    )


def _per_token(active: pl.DataFrame, k: int, tokens: list[str]) -> pl.DataFrame:
    schema = {"position": pl.Int64, "token": pl.String, "rank": pl.UInt32, "coder_id": pl.String,
              "feature": pl.Int64, "activation": pl.Float32}
    if k == 0 or active.height == 0:
        return pl.DataFrame(schema=schema)
    top = (
        active.sort(["position", "activation", "coder_id", "feature"], descending=[False, True, False, False])
        .group_by("position", maintain_order=True).head(k)
        .with_columns(rank=pl.int_range(pl.len()).over("position").cast(pl.UInt32))
    )
    token = pl.Series("token", tokens, dtype=pl.String)
    return top.with_columns(token=token.gather(top["position"])).select(list(schema))


def _info(reader: Reader, *keys: pl.DataFrame) -> pl.DataFrame:
    wanted = pl.concat(keys).unique()
    frame = reader.feature_rows(list(wanted.iter_rows()), INFO_COLUMNS)
    return frame.select(INFO_COLUMNS)
