"""CLI commands of the store: `export` and `import` of whole catalogues in other tools' formats.

Registered on the `featuredb` group like the other COMMANDS lists (featuredb/cli.py wraps each
callback with `one_line_errors`, so bad input raises StoreError and prints one line). Only
Neuronpedia's format exists for now; `--format` names it so that others can follow.
"""

from __future__ import annotations

import click

from ..errors import OneLineCommand  # usage errors as one line, like every other command
from .neuronpedia import DEFAULT_BATCH_SIZE, export_neuronpedia, import_neuronpedia

FORMATS = ["neuronpedia"]


def _format_option(f):
    return click.option("--format", "format_", type=click.Choice(FORMATS), required=True,
                        help="Format of the files (Neuronpedia's dataset exports).")(f)


@click.command(cls=OneLineCommand)
@_format_option
@click.option("--db", required=True, metavar="PATH", help="Catalogue to export.")
@click.option("--out", required=True, metavar="DIR", help="New (or empty) directory to write.")
@click.option("--sae", "sae_ids", multiple=True, help="Only this coder (sae_id, repeatable; default: all).")
@click.option("--model-id", default=None, help="Neuronpedia model id (default: from each coder's model name).")
@click.option("--source-set", default=None,
              help="Neuronpedia source set name (default: from each sae_id without its layer).")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Features per batch file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export(format_, db, out, sae_ids, model_id, source_set, batch_size, quiet):
    """Export features, activations and explanations as Neuronpedia's gzipped JSONL batches."""
    result = export_neuronpedia(db, out, sae_ids=list(sae_ids) or None, model_id=model_id, source_set=source_set,
                                batch_size=batch_size, progress=not quiet)
    click.echo(f"exported {result.features:,} features, {result.activations:,} activations and "
               f"{result.explanations:,} explanations in {result.seconds:.1f}s -> {out}")
    for source in result.sources:
        click.echo(f"  {source}")


@click.command("import", cls=OneLineCommand)
@_format_option
@click.argument("path", metavar="PATH")
@click.option("--db", required=True, metavar="PATH", help="Catalogue to import into (created if missing).")
@click.option("--replace", is_flag=True, help="Overwrite coders that are already in the catalogue.")
@click.option("--embed", is_flag=True, help="Embed imported descriptions (offline MiniLM) for semantic search.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def import_(format_, path, db, replace, embed, quiet):
    """Import a Neuronpedia export (an export root, model or source folder) into a catalogue."""
    from ..query import finalize

    result = import_neuronpedia(path, db, replace=replace, embed=embed, progress=not quiet)
    finalize(db)  # search indexes cover the new rows
    click.echo(f"imported {len(result.sae_ids)} coder(s): {result.features:,} features, {result.examples:,} "
               f"examples, {result.descriptions:,} descriptions, {result.decoder_vectors:,} decoder vectors "
               f"in {result.seconds:.1f}s -> {db}")
    for sae_id in result.sae_ids:
        click.echo(f"  {sae_id}")
    if result.unembedded:
        click.echo(f"{result.unembedded:,} described features have no description vector yet: keyword search works "
                   f"now; for semantic search run `featuredb describe --db {db}` (or import with --embed)")


COMMANDS = [export, import_]
