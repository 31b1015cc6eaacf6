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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from featuredb.errors import QueryError
from featuredb.query.builder import check_limit, check_text
from featuredb.query.model_run import (below_density, capture, check_max_density, chosen_coders, loaded_coders,
                                       model_spec, shared_model, sparse_activations)

if TYPE_CHECKING:
    from featuredb.query.reader import Reader

MAX_TEXT_CHARS = 20_000
MAX_TOKENS = 1024  # a forward pass on CPU stays interactive, and dense chunks stay small
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


def text_token_ids(shared, text: str, name: str, too_long: type[QueryError] = QueryError) -> list[int]:
    """The token ids of `text` for the model: QueryError when it has none, `too_long` when it has
    more than MAX_TOKENS (one forward pass stays interactive)."""
    token_ids = shared.token_ids(text)
    if not token_ids:
        raise QueryError(f"the {name} has no tokens")
    if len(token_ids) > MAX_TOKENS:
        raise too_long(f"the {name} is {len(token_ids):,} tokens long; at most {MAX_TOKENS:,}")
    return token_ids


def fires_on(reader: Reader, text: str, *, coders: list[str] | str | None = None, by: str = "max",
             positions: list[int] | None = None, max_density: float | None = None, limit: int = 20,
             per_token: int = 5, device: str | None = None, model: str | None = None) -> FiresOn:
    text = check_text(text, "text", MAX_TEXT_CHARS)
    limit = _check_options(by, limit, per_token, max_density)
    coders = chosen_coders(reader, coders)
    spec = model_spec(coders, model)
    reader.check_loadable(coders, explicit_model=model)

    shared = shared_model(reader, spec, device)
    token_ids = text_token_ids(shared, text, "text")
    chosen = _positions(positions, len(token_ids))
    loaded = loaded_coders(reader, coders, shared.model)
    captured = capture(shared, [token_ids], loaded)[0]

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
    check_max_density(max_density)
    return check_limit(limit)



def _active(reader: Reader, loaded: list, captured: dict, max_density: float | None) -> pl.DataFrame:
    """Every nonzero activation of every coder: coder_id, feature, position, activation."""
    parts = []
    for coder in loaded:
        pos, feat, val = sparse_activations(coder, {hook: captured[hook][1:] for hook in coder.hooks})  # BOS dropped
        keep = below_density(reader, coder, feat, max_density)
        pos, feat, val = pos[keep], feat[keep], val[keep]
        parts.append(pl.DataFrame({"coder_id": pl.Series([coder.coder_id] * len(feat), dtype=pl.String),
                                   "feature": feat.astype(np.int64), "position": pos.astype(np.int64),
                                   "activation": val.astype(np.float32)}))
    if parts:
        return pl.concat(parts)
    return pl.DataFrame(schema={"coder_id": pl.String, "feature": pl.Int64, "position": pl.Int64,
                                "activation": pl.Float32})



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
