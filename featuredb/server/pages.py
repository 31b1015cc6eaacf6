"""The HTML pages: Jinja2 templates rendered on the server from the same views as the JSON API.

Pages: `/` (search, with filters and paging, and the find-by-example form),
`/features/{coder_id}/{index}` (a Neuronpedia-style feature dashboard with a test-text box and a
steering panel),
`/fires` (which features fire on a text), `/find` (features that fire on marked tokens). Every page
links its JSON twin. Autoescaping is on, so tokens such as `<script>` render as text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from featuredb.query.render import format_cell
from featuredb.server import views

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)
Text = Annotated[str | None, Query()]

HIST_WIDTH, HIST_HEIGHT = 560, 120  # SVG user units of the histogram's plot area


# --- presentation helpers (template filters) ---------------------------------------------------


def shade(value: float | None, top: float | None) -> str:
    """CSS background for a token: orange, more opaque the closer `value` is to `top`."""
    if not value or not top or value <= 0 or not math.isfinite(value) or not math.isfinite(top):
        return ""
    strength = min(1.0, value / top)
    return f"background-color: rgba(234, 88, 12, {0.12 + 0.78 * strength:.3f})"


def visible(token: str) -> str:
    """A token with its line breaks and tabs drawn (spaces stay, under `white-space: pre`)."""
    return token.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")


def url_segment(value: object) -> str:
    """A value quoted as one URL path segment (coder_ids may hold quotes, spaces, '#', '?')."""
    return quote(str(value), safe="")


def histogram_bars(histogram: dict) -> list[dict]:
    """SVG bars of the activation histogram, heights on a log scale (the lowest bins hold most
    tokens; a linear scale would hide the tail, where the feature fires strongly)."""
    counts, edges = histogram["counts"], histogram["edges"]
    if not counts or max(counts) <= 0:
        return []
    top = math.log1p(max(counts))
    width = HIST_WIDTH / len(counts)
    bars = []
    for i, count in enumerate(counts):
        if count <= 0:
            continue
        height = HIST_HEIGHT * math.log1p(count) / top
        bars.append({"x": i * width, "y": HIST_HEIGHT - height, "width": max(width - 1, 1), "height": height,
                     "title": f"{format_cell(edges[i])} – {format_cell(edges[i + 1])}: {count:,} tokens"})
    return bars


templates.env.filters.update(cell=format_cell, shade=shade, visible=visible, url_segment=url_segment)
templates.env.globals.update(histogram_bars=histogram_bars, HIST_WIDTH=HIST_WIDTH, HIST_HEIGHT=HIST_HEIGHT)


def _twin(request: Request, path: str) -> str:
    """The URL of this page's JSON twin: the same query string on the API route."""
    return f"{path}?{request.url.query}" if request.url.query else path


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return templates.TemplateResponse(request, "error.html", {"status": status, "message": message},
                                      status_code=status)


# --- routes ------------------------------------------------------------------------------------


@router.get("/")
def search_page(request: Request, cat: views.Cat, q: Text = None, mode: views.Mode = "auto",
                chosen: views.Filters = Depends(views.filters), paging: views.Page = Depends(views.page)):
    result = views.search_view(cat, q, mode, chosen, paging) if q and q.strip() else None
    return templates.TemplateResponse(request, "search.html", {
        "result": result, "q": q or "", "mode": mode, "chosen": chosen, "coders": views.coders_view(cat)["coders"],
        "json_url": _twin(request, "/api/search") if result else "/api/coders",
    })


@router.get("/features/{coder_id}/{index}")
def feature_page(request: Request, cat: views.Cat, coder_id: str, index: str, text: Text = None,
                 steer: views.SteerPanel = Depends(views.steer_panel)):
    feature = views.feature_view(cat, coder_id, index, text if text and text.strip() else None, steer)
    json_url = _twin(request, f"/api/features/{url_segment(coder_id)}/{url_segment(index)}")
    return templates.TemplateResponse(request, "feature.html", {"f": feature, "json_url": json_url, "steer": steer})


@router.get("/fires")
def fires_page(request: Request, cat: views.Cat, text: Text = None, coder: views.Strings = [], by: Literal["max", "sum"] = "max",
               max_density: views.Density = None, limit: Annotated[int, Query(ge=1, le=100)] = 20):
    result = views.fires_view(cat, text, coder, by, max_density, limit, per_token=5) if text and text.strip() else None
    return templates.TemplateResponse(request, "fires.html", {
        "result": result, "text": text or "", "by": by, "max_density": max_density, "chosen_coders": coder,
        "coders": views.coders_view(cat)["coders"], "json_url": _twin(request, "/api/fires_on") if result else None,
    })


@router.get("/find")
def find_page(request: Request, cat: views.Cat, positive: views.Strings = [], negative: views.Strings = [],
              by: views.FindBy = "f1", coder: views.Strings = [], layer: views.Ints = [],
              max_density: views.Density = None, limit: Annotated[int, Query(ge=1, le=100)] = 10):
    result = views.find_view(cat, positive, negative, by, coder, layer, max_density, limit) if positive else None
    return templates.TemplateResponse(request, "find.html", {
        "result": result, "positives": positive, "negatives": negative, "by": by, "chosen_coders": coder,
        "chosen_layers": layer, "max_density": max_density, "coders": views.coders_view(cat)["coders"],
        "json_url": _twin(request, "/api/find") if result else None,
    })


@router.get("/map")
def map_page(request: Request, cat: views.Cat, coder: views.Strings = []):
    """Every feature of the chosen coders on a canvas (the points come from /api/map/points)."""
    from featuredb.errors import NotFound
    from featuredb.query.feature_map import NO_MAP

    try:
        result = views.map_summary(cat, coder)
    except NotFound as e:
        if str(e) != NO_MAP:
            raise
        result = None
    return templates.TemplateResponse(request, "map.html", {
        "result": result, "no_map": NO_MAP, "chosen_coders": coder, "json_url": _twin(request, "/api/map"),
        "points_url": _twin(request, "/api/map/points"),
    })
