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

from featuredb.errors import QueryError, TooLarge
from featuredb.query.builder import MAX_LIMIT
from featuredb.query.catalogue import Catalogue
from featuredb.query.where import where_conditions
from featuredb.query.search import auto_mode

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

    def where(self) -> dict[str, Any]:
        return where_conditions(self.layer, self.coder, self.site, self.model, self.min_density, self.max_density)


def filters(coder: Strings = [], layer: Annotated[list[int], Query(), _Blank] = [], site: Strings = [],
            model: Strings = [], min_density: Density = None, max_density: Density = None) -> Filters:
    return Filters(coder, layer, site, model, min_density, max_density)


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


def feature_view(cat: Catalogue, coder_id: str, index: str, text: str | None = None) -> dict:
    """Everything about one feature, its nearest features by decoder direction and, given a
    text, this feature's activation on each of the text's tokens."""
    coder_id, number = _feature_key(coder_id, index)
    feature = cat.feature(coder_id, number)
    try:
        feature["similar"] = cat.similar(coder_id, number).limit(SIMILAR_ON_PAGE).to_list()
        feature["similar_note"] = None
    except QueryError as e:  # e.g. an all-zero decoder row has no direction to compare
        feature["similar"], feature["similar_note"] = [], str(e)
    feature["test_text"] = None if text is None else _feature_on_text(cat, coder_id, number, text)
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
