"""CLI commands of the query layer: `search`, `show`, `fires`, `similar`.

Registered on the `featuredb` group with `main.add_command(c) for c in COMMANDS`. Human tables by
default, `--json` for scripts; bad input prints one line "error: ..." on stderr and exits 1.
"""

from __future__ import annotations

import json
import math
from typing import Any

import click

from .catalogue import DEFAULT_DB, default_db
from ..errors import OneLineCommand, one_line_errors
from .errors import QueryError


def _run(body):
    """Run a command body: input errors become one line on stderr and exit status 1."""
    return one_line_errors(body)()


def db_option(f):
    return click.option("--db", default=None, metavar="PATH",
                        help=f"Catalogue directory or URI (default: $FEATUREDB_DB, else {DEFAULT_DB}).")(f)


def _json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def _json_default(value: Any):
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None so the output is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(json_safe(value), default=_json_default, ensure_ascii=False, indent=1))


def _open(db: str | None):
    from .catalogue import open as open_catalogue

    return open_catalogue(db or default_db())


def _feature_ref(ref: str) -> tuple[str, int]:
    sae_id, slash, index = ref.rpartition("/")
    if not slash or not sae_id or not index.strip().lstrip("-").isdigit():
        raise QueryError(f"expected SAE_ID/INDEX (e.g. res-layer_12/123), got {ref!r}")
    return sae_id, int(index)


def where_conditions(layer, sae, site, model, min_density, max_density) -> dict:
    where: dict[str, Any] = {}
    if layer:
        where["layer"] = list(layer)
    if sae:
        where["sae_id"] = list(sae)
    if site:
        where["site"] = list(site)
    if model:
        where["model"] = list(model)
    if min_density is not None or max_density is not None:
        where["density"] = (min_density, max_density)
    return where


def _filter_options(f):
    f = click.option("--max-density", type=float, default=None, help="Only features at most this dense.")(f)
    f = click.option("--min-density", type=float, default=None, help="Only features at least this dense.")(f)
    f = click.option("--model", multiple=True, help="Only coders of this model (repeatable).")(f)
    f = click.option("--site", multiple=True, help="Only this hook kind: res, mlp, att, transcoder, other (repeatable).")(f)
    f = click.option("--sae", multiple=True, help="Only this coder (sae_id, repeatable).")(f)
    f = click.option("--layer", type=int, multiple=True, help="Only this layer (repeatable).")(f)
    return f


@click.command(cls=OneLineCommand)
@click.argument("text")
@click.option("--keyword", "mode", flag_value="keyword", help="Full-text (BM25) search.")
@click.option("--hybrid", "mode", flag_value="hybrid", help="Semantic and full-text search, fused (RRF).")
@click.option("--semantic", "mode", flag_value="semantic", default=True, help="Semantic search (default).")
@_filter_options
@click.option("--limit", "-n", type=int, default=10, show_default=True, help="Number of results.")
@db_option
@_json_option
def search(text, mode, layer, sae, site, model, min_density, max_density, limit, db, as_json):
    """Search features by what their descriptions say."""

    def body():
        cat = _open(db)
        query = {"semantic": cat.search, "keyword": cat.keyword, "hybrid": cat.hybrid}[mode](text)
        frame = query.where(**where_conditions(layer, sae, site, model, min_density, max_density)).limit(limit).to_polars()
        if as_json:
            _echo_json(frame.to_dicts())
        else:
            from .render import results

            click.echo(results(frame))

    _run(body)


@click.command(cls=OneLineCommand)
@click.argument("ref", metavar="SAE_ID/INDEX")
@click.option("--examples", "-e", type=int, default=5, show_default=True, help="Examples shown per kind.")
@db_option
@_json_option
def show(ref, examples, db, as_json):
    """Everything about one feature: description, statistics, logits, examples."""

    def body():
        sae_id, index = _feature_ref(ref)
        feature = _open(db).feature(sae_id, index)
        if as_json:
            _echo_json(feature)
        else:
            from .render import dashboard

            click.echo(dashboard(feature, examples=max(0, examples)))

    _run(body)


def _int_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise QueryError(f"--positions must be comma-separated integers, got {text!r}") from None


@click.command(cls=OneLineCommand)
@click.argument("text")
@click.option("--sae", multiple=True, help="Only this coder (sae_id, repeatable; default: all).")
@click.option("--by", type=click.Choice(["max", "sum"]), default="max", show_default=True,
              help="Rank by the max activation, or the sum over the chosen positions.")
@click.option("--positions", default=None, help="Comma-separated token positions to rank by (0 = first token after BOS; -1 = last).")
@click.option("--max-density", type=float, default=None, help="Hide features denser than this.")
@click.option("--limit", "-n", type=int, default=20, show_default=True, help="Number of features.")
@click.option("--per-token", type=int, default=3, show_default=True, help="Top features listed per token.")
@click.option("--device", default=None, help="cpu (default), cuda, ...")
@db_option
@_json_option
def fires(text, sae, by, positions, max_density, limit, per_token, device, db, as_json):
    """Run TEXT through the model and the catalogue's coders; show the features that fire."""

    def body():
        result = _open(db).fires_on(text, saes=list(sae) or None, by=by, positions=_int_list(positions),
                                    max_density=max_density, limit=limit, per_token=per_token, device=device)
        if as_json:
            _echo_json(result.to_dict())
        else:
            from .render import fires as render_fires

            click.echo(render_fires(result, per_token_rows=per_token))

    _run(body)


@click.command(cls=OneLineCommand)
@click.argument("ref", metavar="SAE_ID/INDEX")
@click.option("--within", is_flag=True, help="Only the same coder (default: every coder of the same model and space).")
@_filter_options
@click.option("--limit", "-n", type=int, default=10, show_default=True, help="Number of results.")
@db_option
@_json_option
def similar(ref, within, layer, sae, site, model, min_density, max_density, limit, db, as_json):
    """Features nearest to SAE_ID/INDEX by decoder-direction cosine."""

    def body():
        sae_id, index = _feature_ref(ref)
        query = _open(db).similar(sae_id, index, across=not within)
        query = query.where(**where_conditions(layer, sae, site, model, min_density, max_density)).limit(limit)
        frame = query.to_polars()
        if as_json:
            _echo_json(frame.to_dicts())
            return
        from .render import results

        if not query.uses_decoder_vectors:
            click.echo("note: no decoder vectors stored for this coder; showing the stored within-coder neighbours",
                       err=True)
        click.echo(results(frame, score="cosine") if frame.height else "no similar features")

    _run(body)


COMMANDS = [search, show, fires, similar]
