"""Activation search: which features fire on a text (runs the model), and which features' stored
contexts peak on a token or phrase (no model).

fires_on: the text is tokenized like the indexer's windows (BOS first, then the tokens), run once
through the subject model with every needed hook, and each coder's activations are kept sparse
(only nonzero entries), so a 1M-wide coder costs memory in proportion to what fires. BOS never
counts. Models and coders load lazily and stay cached on the Catalogue for the next call.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from featuredb.store import EXAMPLES_TABLE, Filter
from featuredb.errors import one_line
from featuredb.errors import QueryError
from featuredb.query.search import DEFAULT_LIMIT, check_limit, check_text
from featuredb.query.where import Where

if TYPE_CHECKING:
    from featuredb.query.catalogue import Catalogue

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


def fires_on(cat: Catalogue, text: str, *, coders: list[str] | str | None = None, by: str = "max",
             positions: list[int] | None = None, max_density: float | None = None, limit: int = 20,
             per_token: int = 5, device: str | None = None) -> FiresOn:
    text = check_text(text, "text", MAX_TEXT_CHARS)
    if by not in ("max", "sum"):
        raise QueryError(f"by must be 'max' or 'sum', got {by!r}")
    limit = check_limit(limit)
    if not isinstance(per_token, numbers.Integral) or isinstance(per_token, bool) or not 0 <= per_token <= 100:
        raise QueryError(f"per_token must be an integer in [0, 100], got {per_token!r}")
    if max_density is not None:
        if not isinstance(max_density, numbers.Real) or isinstance(max_density, bool) or not 0 < float(max_density) <= 1:
            raise QueryError(f"max_density must be a number in (0, 1], got {max_density!r}")
    coders = _chosen_coders(cat, coders)
    models = sorted(set(coders["model"].to_list()))
    if len(models) > 1:
        raise QueryError(f"the chosen coders belong to {len(models)} models ({', '.join(models)}): "
                         "choose coders of one model with coders=[...]")
    spec = models[0]

    model = _model(cat, spec, device)
    token_ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if token_ids and token_ids[0] == model.bos_token_id:
        token_ids = token_ids[1:]
    if not token_ids:
        raise QueryError("the text has no tokens")
    if len(token_ids) > MAX_TOKENS:
        raise QueryError(f"the text is {len(token_ids):,} tokens long; at most {MAX_TOKENS:,}")
    n = len(token_ids)
    chosen = _positions(positions, n)
    loaded = [_coder(cat, row, model) for row in coders.iter_rows(named=True)]

    import torch

    ids = torch.tensor([[model.bos_token_id] + list(token_ids)], dtype=torch.long)
    try:
        captured = model.capture(ids, torch.ones_like(ids), sorted({c.hook for c in loaded}))
    except Exception as e:  # HookError / ModelError / torch errors: one line for the user
        raise QueryError(f"forward pass failed: {one_line(e)}") from None

    tokens = [model.tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in token_ids]
    parts = []
    for coder in loaded:
        pos, feat, val = _sparse_activations(coder, captured[coder.hook][0, 1:])  # BOS dropped
        if max_density is not None and len(feat):
            density = _coder_density(cat, coder.coder_id, coder.width)
            keep = ~(density[feat] > float(max_density))  # unknown density (NaN) is kept
            pos, feat, val = pos[keep], feat[keep], val[keep]
        parts.append(pl.DataFrame({"coder_id": pl.Series([coder.coder_id] * len(feat), dtype=pl.String),
                                   "feature": feat.astype(np.int64), "position": pos.astype(np.int64),
                                   "activation": val.astype(np.float32)}))
    active = pl.concat(parts) if parts else pl.DataFrame(
        schema={"coder_id": pl.String, "feature": pl.Int64, "position": pl.Int64, "activation": pl.Float32})

    selected = active.filter(pl.col("position").is_in(chosen)) if chosen is not None else active
    ranked = _rank(selected, by).head(limit)
    per = _per_token(active, per_token, tokens)
    info = _info(cat, ranked.select("coder_id", "feature"), per.select("coder_id", "feature"))
    features = (
        ranked.join(info, on=["coder_id", "feature"], how="left")
        .with_columns(relative=(pl.col("activation") / pl.col("max_activation")).cast(pl.Float64))
        .select(INFO_COLUMNS + ["activation", "position", "active_positions", "relative"])
    )
    per = per.join(info.select("coder_id", "feature", "description"), on=["coder_id", "feature"], how="left").sort(
        ["position", "rank"])
    return FiresOn(model=spec, tokens=tokens, token_ids=list(token_ids), by=by, features=features, per_token=per)


def _chosen_coders(cat: Catalogue, coders: list[str] | str | None) -> pl.DataFrame:
    all_coders = cat._coder_table(refresh=True)
    if coders is None:
        if all_coders.height == 0:
            raise QueryError("the catalogue holds no coders")
        return all_coders
    names = [coders] if isinstance(coders, str) else coders
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(s, str) and s for s in names):
        raise QueryError(f"saes must be a coder_id or a non-empty list of them, got {coders!r}")
    cat._check_coder_ids(set(names))
    return cat._coder_table().filter(pl.col("coder_id").is_in(list(names)))


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


def _model(cat: Catalogue, spec: str, device: str | None):
    import torch

    from featuredb.runtime.model import load_model

    device = device or "cpu"
    key = f"{spec}@{device}"
    with cat._lock:
        model = cat._models.get(key)
        if model is None:
            try:
                model = load_model(spec, device=torch.device(device), dtype=torch.float32)
            except Exception as e:  # ModelError, bad device, ...
                raise QueryError(f"cannot load the subject model {spec!r}: {one_line(e)}") from None
            cat._models[key] = model
        return model


def _coder(cat: Catalogue, stored: dict, model):
    """The coder as stored in the catalogue (source + hook), loaded once and kept."""
    from featuredb.runtime.coders import load_coder

    key = (stored["coder_id"], str(model.device))
    with cat._lock:
        coder = cat._coders.get(key)
        if coder is not None:
            return coder
        source = stored["source"]
        if not source:
            raise QueryError(f"coder {stored['coder_id']!r} has no stored source to load it from")
        prefix = f"{stored['coder_id']}=" if _ID_CHARS.fullmatch(stored["coder_id"]) else ""
        spec = f"{prefix}{source}@{stored['hook']}"
        is_gemma = "gemma" in type(model.model).__name__.lower()
        try:
            coder = load_coder(spec, model_is_gemma=is_gemma)
        except Exception as e:  # CoderError, download failures
            raise QueryError(f"cannot load coder {stored['coder_id']!r} from {source!r}: {one_line(e)}") from None
        coder.coder_id = stored["coder_id"]
        if coder.d_in != stored["d_in"] or coder.width != stored["width"]:
            raise QueryError(f"coder {stored['coder_id']!r} at {source!r} has d_in={coder.d_in}, width={coder.width}, "
                             f"but the catalogue recorded d_in={stored['d_in']}, width={stored['width']}")
        import torch

        coder = coder.to(device=model.device, dtype=torch.float32)
        cat._coders[key] = coder
        return coder


def _sparse_activations(coder, x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position, feature, value) of every nonzero activation of x [T, d_in]."""
    import torch

    T = x.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, coder.width))
    positions, features, values = [], [], []
    with torch.inference_mode():
        for start in range(0, T, step):
            acts = coder.encode(x[start:start + step].float())
            pos, feat = acts.nonzero(as_tuple=True)
            positions.append((pos + start).cpu().numpy())
            features.append(feat.cpu().numpy())
            values.append(acts[pos, feat].float().cpu().numpy())
    if not positions:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(positions), np.concatenate(features), np.concatenate(values)


def _coder_density(cat: Catalogue, coder_id: str, width: int) -> np.ndarray:
    """Density of each of a coder's features (NaN where a feature is not stored), cached."""
    with cat._lock:
        cached = cat._coder_stats.get(coder_id)
        if cached is not None:
            return cached[0]
    table = cat._features_table()
    rows = (table.search().where(Filter().eq("coder_id", coder_id).render(table.schema))
            .select(["feature", "density", "max_activation"]).limit(None).to_arrow())
    density = np.full(width, np.nan)
    maximum = np.full(width, np.nan, dtype=np.float32)
    features = rows["feature"].to_numpy()
    density[features] = rows["density"].to_numpy()
    maximum[features] = rows["max_activation"].to_numpy()
    with cat._lock:
        cat._coder_stats[coder_id] = (density, maximum)
    return density


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


def _info(cat: Catalogue, *keys: pl.DataFrame) -> pl.DataFrame:
    wanted = pl.concat(keys).unique()
    frame = cat._feature_rows(list(wanted.iter_rows()), INFO_COLUMNS)
    return frame.select(INFO_COLUMNS)


# --- with_token: search the stored contexts ------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


@dataclasses.dataclass(frozen=True)
class TokenQuery:
    """Features whose top examples peak on a token (or contain a phrase around the peak).

    window=0 (default): a single word matches an example whose max-activating (peak) token,
    stripped and case-folded, equals it; a phrase matches where it occurs in the text around the
    peak and the occurrence overlaps the peak token. window=w > 0: the token or phrase occurs
    anywhere within w tokens of the peak (case- and whitespace-insensitive).

    Rows: the search result columns plus matches (top examples that match), examples (top
    examples stored), score = matches / examples and example_max (the highest matching example's
    activation). The `limit` features with the most matches are kept (ties: higher example_max),
    then ordered by matches, score, example_max. Scans the stored top examples: narrow it with
    where(coder_id=..., layer=...) on a large catalogue.
    """

    catalogue: Catalogue
    text: str
    window: int = 0
    conditions: Where = Where()
    k: int = DEFAULT_LIMIT

    def __post_init__(self) -> None:
        if not isinstance(self.window, numbers.Integral) or isinstance(self.window, bool) or not 0 <= self.window <= 64:
            raise QueryError(f"window must be an integer in [0, 64], got {self.window!r}")

    def where(self, **conditions: Any) -> TokenQuery:
        where = self.conditions.add(**conditions)
        self.catalogue._check_coder_ids(where.mentioned_coder_ids())
        return dataclasses.replace(self, conditions=where)

    def limit(self, limit: int) -> TokenQuery:
        return dataclasses.replace(self, k=check_limit(limit))

    def to_list(self) -> list[dict]:
        return self.to_polars().to_dicts()

    def to_polars(self) -> pl.DataFrame:
        cat = self.catalogue
        phrase = _normalise(self.text)
        words = phrase.split()
        single = self.window == 0 and len(words) == 1
        lowered = " ".join(self.text.lower().split())
        first_word = lowered.split()[0]
        window = max(self.window, len(words))
        schema = {"coder_id": pl.String, "feature": pl.Int64, "matches": pl.UInt32, "example_max": pl.Float32}
        if not cat._has_table(EXAMPLES_TABLE):
            return self._finish(pl.DataFrame(schema=schema))
        examples = cat._table(EXAMPLES_TABLE)
        coders = self.conditions.matching_coders(cat._coder_table(refresh=True))["coder_id"].to_list()
        if not coders:
            return self._finish(pl.DataFrame(schema=schema))
        where = Filter().eq("kind", "top")
        if self.conditions.eq:
            where = where.isin("coder_id", coders)
        query = (examples.search().where(where.render(examples.schema))
                 .select(["coder_id", "feature", "tokens", "max_position", "max_value"]).limit(None))
        hits = []
        for batch in query.to_batches(batch_size=65536):
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            if single:
                peak = pl.col("tokens").list.get(pl.col("max_position"), null_on_oob=True)
                found = frame.filter(peak.str.strip_chars().str.to_lowercase() == lowered)
                # str.to_lowercase is close to casefold; confirm exactly on the few candidates
                found = found.filter(pl.Series([
                    _normalise(t[p]) == phrase for t, p in zip(found["tokens"].to_list(), found["max_position"].to_list())
                ], dtype=pl.Boolean)) if found.height else found
            else:
                lo = (pl.col("max_position") - window).clip(lower_bound=0)
                text = pl.col("tokens").list.slice(lo, pl.col("max_position") + window + 1 - lo).list.join("")
                # cheap superset on the first word, then the exact check on the few candidates
                candidates = frame.filter(text.str.to_lowercase().str.contains(first_word, literal=True))
                keep = [_phrase_near_peak(t, p, phrase, window, at_peak=self.window == 0)
                        for t, p in zip(candidates["tokens"].to_list(), candidates["max_position"].to_list())]
                found = candidates.filter(pl.Series(keep, dtype=pl.Boolean)) if candidates.height else candidates
            if found.height:
                hits.append(found.select("coder_id", "feature", "max_value"))
        if not hits:
            return self._finish(pl.DataFrame(schema=schema))
        matched = (pl.concat(hits).group_by("coder_id", "feature")
                   .agg(pl.len().cast(pl.UInt32).alias("matches"), pl.col("max_value").max().alias("example_max")))
        return self._finish(matched)

    def _finish(self, matched: pl.DataFrame) -> pl.DataFrame:
        cat = self.catalogue
        columns = ["coder_id", "feature", "layer", "site", "description", "density", "max_activation", "top_tokens"]
        out_schema = {"coder_id": pl.String, "feature": pl.Int64, "layer": pl.Int32, "site": pl.String,
                      "description": pl.String, "density": pl.Float64, "max_activation": pl.Float32,
                      "top_tokens": pl.List(pl.String), "matches": pl.UInt32, "examples": pl.UInt32,
                      "score": pl.Float64, "example_max": pl.Float32}
        if matched.height == 0:
            return pl.DataFrame(schema=out_schema)
        if self.conditions.ranges:  # feature-level filters need the features' stats first
            info = cat._feature_rows(list(matched.select("coder_id", "feature").iter_rows()), ["coder_id", "feature"] +
                                     [c for c, _, _ in self.conditions.ranges])
            mask = pl.lit(True)
            for column, low, high in self.conditions.ranges:
                if low is not None:
                    mask = mask & (pl.col(column) >= low)
                if high is not None:
                    mask = mask & (pl.col(column) <= high)
            matched = matched.join(info.filter(mask).select("coder_id", "feature"), on=["coder_id", "feature"])
        top = matched.sort(["matches", "example_max", "coder_id", "feature"],
                           descending=[True, True, False, False]).head(self.k)
        if top.height == 0:
            return pl.DataFrame(schema=out_schema)
        totals = self._example_counts(top)
        info = cat._feature_rows(list(top.select("coder_id", "feature").iter_rows()), columns)
        out = (top.join(info, on=["coder_id", "feature"], how="left")
               .join(totals, on=["coder_id", "feature"], how="left")
               .with_columns(score=(pl.col("matches").cast(pl.Float64) / pl.col("examples").cast(pl.Float64)))
               .sort(["matches", "score", "example_max", "coder_id", "feature"],
                     descending=[True, True, True, False, False]))
        return out.select([pl.col(c).cast(t) for c, t in out_schema.items()])

    def _example_counts(self, top: pl.DataFrame) -> pl.DataFrame:
        examples = self.catalogue._table(EXAMPLES_TABLE)
        frames = []
        for (coder_id,), group in top.group_by("coder_id"):
            where = Filter().eq("coder_id", coder_id).eq("kind", "top").isin("feature", group["feature"].to_list())
            rows = examples.search().where(where.render(examples.schema)).select(["coder_id", "feature"]).limit(None).to_arrow()
            frames.append(pl.from_arrow(rows))
        counts = pl.concat(frames).group_by("coder_id", "feature").agg(pl.len().cast(pl.UInt32).alias("examples"))
        return counts


def _phrase_near_peak(tokens: list[str], peak: int, phrase: str, window: int, at_peak: bool) -> bool:
    """Whether `phrase` occurs in the text of tokens[peak - window : peak + window + 1] (case- and
    whitespace-insensitive); with at_peak, only an occurrence that overlaps the peak token counts."""
    lo = max(0, peak - window)
    pieces = tokens[lo:peak + window + 1]
    # normalised text with a map from each character back to its token
    chars: list[str] = []
    owner: list[int] = []
    for i, piece in enumerate(pieces):
        for ch in piece.casefold():
            if ch.isspace():
                if chars and chars[-1] != " ":
                    chars.append(" ")
                    owner.append(i)
                continue
            chars.append(ch)
            owner.append(i)
    text = "".join(chars)
    peak_index = peak - lo
    start = text.find(phrase)
    while start >= 0:
        if not at_peak or peak_index in owner[start:start + len(phrase)]:
            return True
        start = text.find(phrase, start + 1)
    return False
