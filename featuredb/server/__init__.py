"""`featuredb serve`: a read-only JSON API (FastAPI, OpenAPI schema at /openapi.json) and
server-rendered HTML pages over one catalogue.

    from featuredb.server import create_app
    app = create_app("./catalogue")          # then: uvicorn.run(app)

The JSON routes (featuredb.server.api) and the pages (featuredb.server.pages) are
built from the same view functions (featuredb.server.views). Bad input never stops the
server: it answers 4xx with a one-line message, as JSON under /api and as an error page elsewhere.
A 5xx (a bug) says `Connection: close`: Starlette re-raises the error after its response, and
uvicorn then drops the connection, so a keep-alive client must know not to reuse it.
Requests run in threads; the catalogue is shared and thread-safe (fires_on batches the texts
that arrive together through one forward pass, see featuredb.query.forward).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from featuredb.errors import FeaturedbError, one_line
from featuredb.query.catalogue import Catalogue
from featuredb.query.catalogue import open as open_catalogue
from featuredb.query.render import json_safe

log = logging.getLogger(__name__)


class CleanJSONResponse(JSONResponse):
    """JSON where NaN and infinities (a feature never seen, a 0/0 ratio) are null."""

    def render(self, content: Any) -> bytes:
        return json.dumps(json_safe(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def create_app(db: str | os.PathLike | Catalogue | None, *, warm: bool = False, trust_models: bool = False) -> FastAPI:
    """The app serving catalogue `db` (a path, a URI or an open Catalogue). The catalogue is opened
    once and shared: its caches (query embedder, subject model and coders for fires_on) load on
    first use and serve every later request. warm=True loads the search indexes now;
    trust_models=True loads the models that imported coders name (see featuredb.open; an open
    Catalogue keeps its own setting)."""
    from featuredb.server import api, pages

    cat = db if isinstance(db, Catalogue) else open_catalogue(db, trust_models=trust_models)
    if warm:
        cat.warm()
    app = FastAPI(title="featuredb", summary=f"Feature catalogue {cat.uri}", version=_version(),
                  default_response_class=CleanJSONResponse,
                  docs_url=None, redoc_url=None)  # FastAPI's docs pages load their scripts from a CDN
    app.state.catalogue = cat
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    _add_error_handlers(app)
    return app


def _version() -> str:
    from featuredb import __version__

    return __version__


def _add_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, status: int, message: str):
        if request.url.path.startswith("/api/") or request.url.path == "/openapi.json":
            response = CleanJSONResponse({"detail": message, "status": status}, status_code=status)
        else:
            from featuredb.server.pages import error_page

            response = error_page(request, status, message)
        if status >= 500:
            response.headers["Connection"] = "close"  # see the module docstring
        return response

    async def user_error(request: Request, exc: Exception):
        return respond(request, getattr(exc, "status", 400), one_line(exc))

    async def invalid_request(request: Request, exc: RequestValidationError):
        return respond(request, 422, _validation_message(exc))

    async def http_error(request: Request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "bad request"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no page at {request.url.path}"
        return respond(request, exc.status_code, message)

    async def server_error(request: Request, exc: Exception):
        log.exception("error serving %s", request.url.path)
        return respond(request, 500, f"internal error ({type(exc).__name__}); the server logged it")

    app.add_exception_handler(FeaturedbError, user_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


def _validation_message(exc: RequestValidationError) -> str:
    """'limit: Input should be less than or equal to 100; ...' from pydantic's error list."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "invalid"))
    return one_line(Exception("; ".join(parts) or "invalid request"))


__all__ = ["create_app"]
