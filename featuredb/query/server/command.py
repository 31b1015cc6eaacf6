"""`featuredb serve`: the JSON API and HTML pages of one catalogue (registered with COMMANDS)."""

from __future__ import annotations

import click

from ...errors import OneLineCommand, one_line_errors
from ..commands import db_option
from ..catalogue import default_db


@click.command(cls=OneLineCommand)
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
def serve(db, host, port):
    """Serve the catalogue read-only: a JSON API under /api (schema at /openapi.json) and HTML pages."""

    def body():
        import uvicorn

        from . import create_app

        app = create_app(db or default_db(), warm=True)
        shown_host = f"[{host}]" if ":" in host else host
        click.echo(f"serving {app.state.catalogue.uri} at http://{shown_host}:{port}/ "
                   f"(JSON API under /api, schema at /openapi.json); Ctrl-C stops")
        uvicorn.run(app, host=host, port=port, log_level="warning")

    one_line_errors(body)()


COMMANDS = [serve]
