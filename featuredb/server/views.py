"""One function per view, each building the plain data that its JSON route returns and its HTML
page renders (datasette style: a page shows exactly what its JSON twin says).

Request parameters are parsed here once, as FastAPI dependencies shared by both routers. Every
bad input ends as a QueryError (400), NotFound (404) or TooLarge (413) with a one-line message;
filters reach LanceDB only through the query layer's typed `where(...)`, which escapes values.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import polars as pl
from fastapi import Depends, Query, Request
from pydantic import BeforeValidator

from featuredb.errors import NotFound, QueryError, TooLarge
from featuredb.query.builder import MAX_LIMIT
from featuredb.query.catalogue import Catalogue
from featuredb.query.where import score_bound, where_conditions
from featuredb.query.search import auto_mode
from featuredb.query.steer import DEFAULT_TOKENS

MAX_PAGE = 100  # rows per page
# A page fetches offset + limit + 1 rows (the extra row says whether a next page exists), and the
# query layer returns at most MAX_LIMIT rows.
MAX_OFFSET = MAX_LIMIT - MAX_PAGE - 1
MAX_TEXT_CHARS = 4_000  # text run through the model: a CPU forward pass stays interactive
SIMILAR_ON_PAGE = 10
# fires_on's per-token ceiling: a feature's value at a position is read from that position's top
# features, exact for any coder with at most this many active features per token (TopK k <= 100).
PER_TOKEN_DEPTH = 100
_INDEX = re.compile(r"[0-9]{1,12}")


# --- request parameters ------------------------------------------------------------------------


def _blank_to_none(value: Any) -> Any:
    """HTML forms send every field, empty ones as "": treat those as not given."""
    if isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, list):
        return [v for v in value if not (isinstance(v, str) and not v.strip())]
    return value


_Blank = BeforeValidator(_blank_to_none)
Strings = Annotated[list[str], Query(), _Blank]
Ints = Annotated[list[int], Query(), _Blank]
Density = Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False), _Blank]


@dataclass(frozen=True)
class Filters:
    """Search filters: each list means "any of these"; the density bounds are inclusive."""

    coder: list[str]
    layer: list[int]
    site: list[str]
    model: list[str]
    min_density: float | None
    max_density: float | None
    min_score: float | None = None  # the description's own score (embedding AUROC), at least this

    def where(self) -> dict[str, Any]:
        return where_conditions(self.layer, self.coder, self.site, self.model, self.min_density, self.max_density,
                                self.min_score)


# Taken as text and checked by the query layer, so a bad value is a one-line 400 like every filter's
Score = Annotated[str | None, Query(description="Only features whose description scores at least this, in [0, 1] "
                                                "(its embedding AUROC)."), _Blank]


def filters(coder: Strings = [], layer: Annotated[list[int], Query(), _Blank] = [], site: Strings = [],
            model: Strings = [], min_density: Density = None, max_density: Density = None,
            min_score: Score = None) -> Filters:
    return Filters(coder, layer, site, model, min_density, max_density,
                   None if min_score is None else score_bound(min_score))


@dataclass(frozen=True)
class Page:
    limit: int
    offset: int


def page(limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
         offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Page:
    return Page(limit, offset)


def catalogue(request: Request) -> Catalogue:
    return request.app.state.catalogue


Cat = Annotated[Catalogue, Depends(catalogue)]  # a route's catalogue parameter


# auto: chosen by the query's shape (featuredb.query.search.auto_mode); token: top examples peak on this token
Mode = Literal["auto", "semantic", "keyword", "hybrid", "token"]
ExampleKind = Literal["top", "interval"]


# --- views -------------------------------------------------------------------------------------


def coders_view(cat: Catalogue) -> dict:
    """The catalogue's coders (what the search filters choose from)."""
    return {"coders": cat.coders().to_dicts()}


def search_view(cat: Catalogue, q: str, mode: Mode, chosen: Filters, paging: Page) -> dict:
    """One page of semantic / keyword / hybrid search results, or of the features whose top
    examples peak on a token (`with_token`: score = the share of their top examples that do). `mode`
    in the answer is the one used ("auto" resolved)."""
    mode = auto_mode(q) if mode == "auto" else mode
    query = {"semantic": cat.search, "keyword": cat.keyword, "hybrid": cat.hybrid, "token": cat.with_token}[mode](q)
    rows = query.where(**chosen.where()).offset(paging.offset).limit(paging.limit + 1).to_list()
    return {"q": q, "mode": mode, "filters": asdict(chosen), **_page_of(rows, paging)}


@dataclass(frozen=True)
class SteerPanel:
    """The feature page's steering form: a prompt, this feature's strength and the new tokens."""

    prompt: str | None
    strength: float
    tokens: int


def steer_panel(steer: Annotated[str | None, Query(description="Also generate from this prompt with this feature "
                                                               "steered (and without).")] = None,
                strength: Annotated[float, Query(description="In units of the feature's max activation.")] = 1.0,
                steer_tokens: Annotated[int, Query(description="New tokens per text.")] = DEFAULT_TOKENS) -> SteerPanel:
    """The page's steering form (its limits are the Python API's: a one-line 400)."""
    return SteerPanel(steer if steer and steer.strip() else None, strength, steer_tokens)


def feature_view(cat: Catalogue, coder_id: str, index: str, text: str | None = None,
                 steer: SteerPanel | None = None) -> dict:
    """Everything about one feature, its nearest features by decoder direction, given a text,
    this feature's activation on each of the text's tokens, and given a steering prompt, the
    prompt's continuations with and without this feature steered."""
    coder_id, number = _feature_key(coder_id, index)
    feature = cat.feature(coder_id, number)
    try:
        feature["similar"] = cat.similar(coder_id, number).limit(SIMILAR_ON_PAGE).to_list()
        feature["similar_note"] = None
    except QueryError as e:  # e.g. an all-zero decoder row has no direction to compare
        feature["similar"], feature["similar_note"] = [], str(e)
    feature["test_text"] = None if text is None else _feature_on_text(cat, coder_id, number, text)
    feature["steer"] = None
    if steer is not None and steer.prompt is not None:
        chosen = [{"coder_id": coder_id, "feature": number, "strength": steer.strength}]
        feature["steer"] = steer_view(cat, chosen, steer.prompt, steer.tokens, 0.0, 0)
    return feature


def examples_view(cat: Catalogue, coder_id: str, index: str, kind: ExampleKind, paging: Page) -> dict:
    """One page of a feature's stored top or interval examples."""
    coder_id, number = _feature_key(coder_id, index)
    examples = cat.feature(coder_id, number)[f"{kind}_examples"]
    window = examples[paging.offset:paging.offset + paging.limit + 1]
    return {"coder_id": coder_id, "feature": number, "kind": kind, "total": len(examples),
            **_page_of(window, paging)}


def similar_view(cat: Catalogue, coder_id: str, index: str, within: bool, chosen: Filters, paging: Page,
                 by: str = "decoder") -> dict:
    """One page of the features nearest to one feature by decoder-direction cosine, or (by
    "cooccurrence") of those firing on the same tokens most."""
    coder_id, number = _feature_key(coder_id, index)
    query = cat.similar(coder_id, number, across=not within, by=by).where(**chosen.where())
    rows = query.offset(paging.offset).limit(paging.limit + 1).to_list()
    return {"coder_id": coder_id, "feature": number, "within": within, "by": by, "filters": asdict(chosen),
            "uses_decoder_vectors": by == "decoder" and query.uses_decoder_vectors, **_page_of(rows, paging)}


def fires_view(cat: Catalogue, text: str, coders: list[str], by: Literal["max", "sum"], max_density: float | None,
               limit: int, per_token: int) -> dict:
    """Which features fire on a text (runs the model): ranked features and each token's top ones."""
    _check_text_size(text)
    result = cat.fires_on(text, coders=coders or None, by=by, max_density=max_density, limit=limit, per_token=per_token)
    return {"text": text, "max_density": max_density, **result.to_dict()}


FindBy = Literal["f1", "auroc", "precision"]


def find_view(cat: Catalogue, positives: list[str], negatives: list[str], by: FindBy, coders: list[str],
              layers: list[int], max_density: float | None, limit: int) -> dict:
    """The features that separate the marked tokens of the positive examples from every other
    token (runs the model once for all examples): ranked rows, each with its activation on every
    token of every example, and the examples as tokens with their marks."""
    query = cat.find(positives, negatives, by=by).where(**where_conditions(layers, coders, None, None, None, max_density))
    result = query.limit(limit).result()
    return {"positives": positives, "negatives": negatives, "filters": {"coder": coders, "layer": layers,
                                                                         "max_density": max_density},
            **result.to_dict()}


def steer_view(cat: Catalogue, features: list, prompt: str, tokens: int, temperature: float, seed: int) -> dict:
    """The prompt's continuations, unsteered and with the features steered (runs the model twice,
    holding it alone: serialised with every other forward pass)."""
    _check_text_size(prompt)
    return cat.steer(features, prompt, tokens=tokens, temperature=temperature, seed=seed).to_dict()


MAX_MAP_PAGE = 10_000  # points per page of the map's JSON (the page itself reads the binary twin)


def map_summary(cat: Catalogue, coders: list[str]) -> dict:
    """What the map page shows besides its canvas: the mapped groups, the chosen coders (default:
    the largest group's) with their colours, and how many points they have (no point is read)."""
    from featuredb.query.feature_map import CODER_COLOURS, COLOUR_BY, RAMP

    selection = cat.map_selection(coders)
    counts = {c: n for g in selection.groups for c, n in g["coders"].items()}
    return {"model": selection.model, "space": selection.space, "groups": selection.groups,
            "coders": selection.coder_ids, "count": sum(counts[c] for c in selection.coder_ids),
            "colour_by": list(COLOUR_BY),
            "colours": {c: CODER_COLOURS[i % len(CODER_COLOURS)] for i, c in enumerate(selection.coder_ids)},
            "ramp": RAMP, "points_url": "/api/map/points"}


def map_view(cat: Catalogue, coders: list[str], limit: int = 1000, offset: int = 0) -> dict:
    """The map's summary (`map_summary`), the bounds of its points and one page of them
    (coder_id, feature, layer, density, x, y; by coder, then feature)."""
    summary = map_summary(cat, coders)
    frame = cat.map(summary["coders"])
    bounds = {"x": [frame["x"].min(), frame["x"].max()], "y": [frame["y"].min(), frame["y"].max()]} if frame.height else None
    rows = frame.slice(offset, limit + 1).to_dicts()
    more = len(rows) > limit
    return {**summary, "count": frame.height, "bounds": bounds, "limit": limit, "offset": offset, "results": rows[:limit],
            "next_offset": offset + limit if more else None, "prev_offset": max(0, offset - limit) if offset else None}


def map_points(cat: Catalogue, coders: list[str]) -> bytes:
    """The chosen coders' points as typed arrays for the page's canvas (little-endian): a uint32
    header length, the header (JSON: count, coders, layer range, padded with spaces to 4 bytes),
    then x, y, density (float32; NaN where unknown), feature (int32), coder (uint16, an index
    into the header's coders) and layer (int16), each n long. 20 bytes a point: 20 MB at 1M. The
    last answer is kept until the map changes (a reload of the page costs nothing)."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from featuredb.store.feature_map import map_version, read_map

    selection = cat.map_selection(coders)
    key = (cat.uri, map_version(cat.store), tuple(selection.coder_ids))
    if _POINTS_CACHE.get("key") == key:
        return _POINTS_CACHE["bytes"]
    rows = read_map(cat.store, selection.coder_ids)  # arrow: no conversion of 1M strings

    def column(name: str, dtype: str, fill: float | None = None) -> bytes:
        values = rows[name] if fill is None else pc.fill_null(rows[name], fill)
        return np.asarray(values.to_numpy(), dtype=dtype).tobytes()

    coder_index = pc.index_in(rows["coder_id"], value_set=pa.array(selection.coder_ids)).to_numpy()
    header = json.dumps({"count": rows.num_rows, "coders": selection.coder_ids, "model": selection.model,
                         "space": selection.space}).encode()
    header += b" " * (-len(header) % 4)
    body = b"".join([np.uint32(len(header)).astype("<u4").tobytes(), header, column("x", "<f4"), column("y", "<f4"),
                     column("density", "<f4", float("nan")), column("feature", "<i4"),
                     coder_index.astype("<u2").tobytes(), column("layer", "<i2")])
    _POINTS_CACHE.update(key=key, bytes=body)
    return body


_POINTS_CACHE: dict = {}  # the last map_points answer and its key (catalogue, map version, coders)


def map_label(cat: Catalogue, coder_id: str, index: str) -> dict:
    """What the map's hover shows of one feature: its layer and description."""
    coder_id, number = _feature_key(coder_id, index)
    cat.reader.check_coder_ids({coder_id})
    label = cat.reader.feature_labels([(coder_id, number)]).get((coder_id, number))
    if label is None:
        raise NotFound(f"feature {number} of {coder_id!r} is not stored in the catalogue")
    return {"coder_id": coder_id, "feature": number, **label}


# --- helpers -----------------------------------------------------------------------------------


def _feature_key(coder_id: str, index: str) -> tuple[str, int]:
    """(coder_id, feature) from URL text; the catalogue checks that both exist."""
    if not _INDEX.fullmatch(index):
        raise QueryError(f"feature index must be a non-negative integer, got {index[:40]!r}")
    return coder_id, int(index)


def _check_text_size(text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise TooLarge(f"text is {len(text):,} characters long; at most {MAX_TEXT_CHARS:,}")


def _feature_on_text(cat: Catalogue, coder_id: str, number: int, text: str) -> dict:
    """This feature's activation on every token of `text` (0 where it does not fire)."""
    _check_text_size(text)
    result = cat.fires_on(text, coders=[coder_id], limit=1, per_token=PER_TOKEN_DEPTH)
    values = [0.0] * len(result.tokens)
    mine = result.per_token.filter(pl.col("feature") == number)
    for position, activation in mine.select("position", "activation").iter_rows():
        values[position] = activation
    return {"text": text, "tokens": result.tokens, "values": values, "max": max(values, default=0.0)}


def _page_of(rows: list[dict], paging: Page) -> dict:
    """A page from the rows at offset onwards (at most limit + 1 of them: the extra one only says
    that a next page exists)."""
    more = len(rows) > paging.limit
    return {"limit": paging.limit, "offset": paging.offset, "results": rows[:paging.limit],
            "next_offset": paging.offset + paging.limit if more and paging.offset + paging.limit <= MAX_OFFSET else None,
            "prev_offset": max(0, paging.offset - paging.limit) if paging.offset else None}
