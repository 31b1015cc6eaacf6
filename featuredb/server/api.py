"""The JSON API under /api: the Python API's searches and lookups, read-only.

Each route returns its view's data (featuredb.server.views) as it is; errors are JSON
`{"detail": "...", "status": N}` (see create_app's handlers).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field

from featuredb.server.views import (
    Cat,
    Density,
    ExampleKind,
    Filters,
    Mode,
    Page,
    Strings,
    examples_view,
    feature_view,
    FindBy,
    Ints,
    filters,
    find_view,
    fires_view,
    page,
    coders_view,
    search_view,
    similar_view,
    steer_panel,
    steer_view,
    SteerPanel,
)
from featuredb.query.steer import DEFAULT_TOKENS, MAX_FEATURES, MAX_NEW_TOKENS, MAX_TEMPERATURE



class SteerFeatureBody(BaseModel):
    """One feature to steer with: strength in units of its max activation (negative: turned down)."""

    coder_id: str
    feature: int
    strength: float = 1.0


class Error(BaseModel):
    """Every error the API answers with: a one-line message and the HTTP status."""

    detail: str
    status: int


ERRORS = {400: "bad request (the message says what is wrong)", 404: "unknown coder or feature",
          413: "text too long, or too many examples", 422: "a parameter of the wrong type or out of range"}
router = APIRouter(prefix="/api", tags=["api"],
                   responses={status: {"model": Error, "description": text} for status, text in ERRORS.items()})
FeatureLimit = Annotated[int, Query(ge=1, le=100, description="Features returned.")]
PerToken = Annotated[int, Query(ge=0, le=20, description="Top features listed per token.")]


@router.get("/coders")
def coders(cat: Cat) -> dict:
    """The catalogue's coders."""
    return coders_view(cat)


@router.get("/search")
def search(cat: Cat, q: Annotated[str, Query(description="Search text.")],
           mode: Mode = "auto", chosen: Filters = Depends(filters), paging: Page = Depends(page)) -> dict:
    """Search feature descriptions: semantic (embeddings), keyword (BM25) or hybrid (both, RRF);
    or token: the features whose stored top examples peak on this token or phrase."""
    return search_view(cat, q, mode, chosen, paging)


@router.get("/features/{coder_id}/{index}/examples")
def examples(cat: Cat, coder_id: str, index: str, kind: ExampleKind = "top", paging: Page = Depends(page)) -> dict:
    """A feature's stored top-activating or interval examples, with per-token values."""
    return examples_view(cat, coder_id, index, kind, paging)


@router.get("/features/{coder_id}/{index}/similar")
def similar(cat: Cat, coder_id: str, index: str, within: bool = False, by: Literal["decoder", "cooccurrence"] = "decoder",
            chosen: Filters = Depends(filters), paging: Page = Depends(page)) -> dict:
    """Features nearest to this one by decoder-direction cosine (within=true: same coder only), or
    by=cooccurrence: the features firing on the same tokens most (score = Jaccard)."""
    return similar_view(cat, coder_id, index, within, chosen, paging, by)


@router.get("/features/{coder_id}/{index}")
def feature(cat: Cat, coder_id: str, index: str,
            text: Annotated[str | None, Query(description="Also run this text through the model and give "
                                                          "this feature's activation on each token.")] = None,
            steer: SteerPanel = Depends(steer_panel)) -> dict:
    """Everything about one feature: statistics, histogram, logits, descriptions, examples, similar
    (and, given `steer`, a prompt's continuations with and without this feature steered)."""
    return feature_view(cat, coder_id, index, text, steer)


@router.get("/fires_on")
def fires_on(cat: Cat, text: str, coder: Strings = [], by: Literal["max", "sum"] = "max",
             max_density: Density = None, limit: FeatureLimit = 20, per_token: PerToken = 5) -> dict:
    """Run a text through the model and the coders (default: all); the features that fire."""
    return fires_view(cat, text, coder, by, max_density, limit, per_token)


class FiresRequest(BaseModel):
    """fires_on with the text in a JSON body (no URL length limit)."""

    text: str
    coder: list[str] = []
    by: Literal["max", "sum"] = "max"
    max_density: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    limit: int = Field(20, ge=1, le=100)
    per_token: int = Field(5, ge=0, le=20)


@router.post("/fires_on")
def fires_on_post(cat: Cat, body: FiresRequest) -> dict:
    """fires_on with a JSON body: {"text": ..., "coder": [...], "by": "max", ...}."""
    return fires_view(cat, body.text, body.coder, body.by, body.max_density, body.limit, body.per_token)


class FindRequest(BaseModel):
    """find: texts with the concept's tokens marked [[like this]] (a text without marks is positive
    throughout), negative texts without marks, and the usual filters."""

    positives: list[str]
    negatives: list[str] = []
    by: FindBy = "f1"
    coder: list[str] = []
    layer: list[int] = []
    max_density: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    limit: int = Field(10, ge=1, le=100)


@router.post("/find")
def find(cat: Cat, body: FindRequest) -> dict:
    """Features whose activation separates the marked tokens from the others (runs the model once
    for every example): {"positives": ["x = [[1]]", ...], "negatives": [...], "by": "f1", ...}."""
    return find_view(cat, body.positives, body.negatives, body.by, body.coder, body.layer, body.max_density, body.limit)


@router.get("/find")
def find_get(cat: Cat, positive: Strings, negative: Strings = [], by: FindBy = "f1", coder: Strings = [],
             layer: Ints = [], max_density: Density = None, limit: FeatureLimit = 10) -> dict:
    """find with the texts as query parameters (the find page's JSON twin): positive=...&negative=..."""
    return find_view(cat, positive, negative, by, coder, layer, max_density, limit)


class SteerRequest(BaseModel):
    """steer: the features ("CODER_ID/INDEX[:STRENGTH]" or {"coder_id", "feature", "strength"}), the
    prompt, and how to generate. The limits are checked with the Python API's (one-line 400)."""

    features: list[str | SteerFeatureBody] = Field(description=f"At most {MAX_FEATURES}.")
    prompt: str = Field(description="At most 4,000 characters.")
    tokens: int = Field(DEFAULT_TOKENS, description=f"New tokens per text, 1..{MAX_NEW_TOKENS}.")
    temperature: float = Field(0.0, description=f"0: greedy; up to {MAX_TEMPERATURE:g}: sampled with the seed.")
    seed: int = 0


@router.post("/steer")
def steer(cat: Cat, body: SteerRequest) -> dict:
    """Generate from the prompt twice, unsteered and with each feature's decoder direction added
    where its coder writes (strength in units of its max activation; runs the model alone):
    {"features": ["coder/12:4"], "prompt": "I went to", "tokens": 32}."""
    features = [f if isinstance(f, str) else f.model_dump() for f in body.features]
    return steer_view(cat, features, body.prompt, body.tokens, body.temperature, body.seed)


MapLimit = Annotated[int, Query(ge=1, le=10_000, description="Points per page.")]


@router.get("/map")
def feature_map(cat: Cat, coder: Strings = [], limit: MapLimit = 1000,
                offset: Annotated[int, Query(ge=0)] = 0) -> dict:
    """The map: 2-D coordinates of every feature of the chosen coders (default: the largest group
    of coders mapped together), one page of points at a time; /api/map/points has all of them."""
    from featuredb.server.views import map_view

    return map_view(cat, coder, limit, offset)


@router.get("/map/points", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "typed arrays"}})
def feature_map_points(cat: Cat, coder: Strings = []) -> Response:
    """Every point of the chosen coders as typed arrays (the map page's canvas reads these; the
    layout is in featuredb.server.views.map_points)."""
    from featuredb.server.views import map_points

    return Response(map_points(cat, coder), media_type="application/octet-stream")


@router.get("/map/label/{coder_id}/{index}")
def feature_map_label(cat: Cat, coder_id: str, index: str) -> dict:
    """One feature's layer and description (the map's hover)."""
    from featuredb.server.views import map_label

    return map_label(cat, coder_id, index)
