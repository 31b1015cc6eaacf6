"""The `featuredb` command line."""

from __future__ import annotations

import click

from . import __version__
from .errors import one_line_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featuredb")
def main() -> None:
    """featuredb: a feature database and search index for sparse-autoencoder features."""


@main.command()
@click.option("--model", "-m", required=True, help="Subject model: local directory, .gguf file, or hub id.")
@click.option("--coder", "-c", "coders", multiple=True, required=True,
              help="Sparse coder: [ID=]PATH_OR_HUB_REF[@HOOK]. Repeat for several coders (one pass).")
@click.option("--corpus", required=True, help="Corpus: .jsonl (text field), .parquet, text file, or hf:DATASET.")
@click.option("--db", required=True, help="Catalogue directory (or s3:// URI).")
@click.option("--tokens", type=click.IntRange(min=1), default=None, help="Stop after this many tokens.")
@click.option("--context", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per context window, BOS included.")
@click.option("--top-k", type=click.IntRange(min=1), default=32, show_default=True, help="Top activating contexts kept per feature.")
@click.option("--interval-samples", type=click.IntRange(min=0), default=2, show_default=True,
              help="Random contexts kept per activation interval (16 equal-width intervals).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Contexts per forward pass.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Model dtype (default: float32 on CPU, bfloat16 on CUDA).")
@click.option("--outlier-ratio", type=float, default=None,
              help="Leave out tokens whose hooked activation norm is above this many times their context's median "
                   "(attention sinks), as BOS is left out. Default: keep every token.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--checkpoint-seconds", type=float, default=300.0, show_default=True, help="Seconds between checkpoints.")
@click.option("--work-dir", default=None,
              help="Local checkpoint directory (default: DB/_index_work; for an s3:// DB ~/.cache/featuredb/index/...).")
@click.option("--distributed", is_flag=True, default=None,
              help="Split the run across the processes torchrun started (automatic under torchrun).")
@click.option("--coder-groups", type=click.IntRange(min=1), default=1, show_default=True,
              help="Under torchrun: split the ranks into this many groups, each holding only some of the coders "
                   "(when their statistics do not fit on one device); every group reads the whole corpus.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@one_line_errors
def index(model, coders, corpus, db, tokens, context, top_k, interval_samples, batch_size, device, dtype,
          outlier_ratio, resume, checkpoint_seconds, work_dir, distributed, coder_groups, quiet):
    """Run a corpus through a model and its coders; store per-feature statistics and examples.

    Under torchrun (`torchrun --nproc-per-node N -m featuredb.indexer ...`) each process indexes
    its share of the corpus and rank 0 writes one catalogue, equal to a single-process run's;
    with --coder-groups G each group of world/G processes holds only its share of the coders.
    """
    from .indexer.run import IndexConfig, run_index
    from .indexer.stats import StatsConfig

    config = IndexConfig(
        model=model, coders=list(coders), corpus=corpus, db=db, tokens=tokens, context=context,
        batch_size=batch_size, stats=StatsConfig(top_k=top_k, interval_per_bin=interval_samples),
        device=device, dtype=dtype, outlier_ratio=outlier_ratio, resume=resume, work_dir=work_dir,
        checkpoint_seconds=checkpoint_seconds, progress=not quiet, distributed=distributed,
        coder_groups=coder_groups,
    )
    result = run_index(config)
    if not result.written:
        return  # another rank wrote the catalogue
    from .query import finalize

    finalize(db)  # search indexes cover the new rows
    rate = result.tokens / max(result.seconds, 1e-9)
    processes = f" on {result.world} processes" if result.world > 1 else ""
    if coder_groups > 1:
        processes += f" in {coder_groups} coder groups"
    click.echo(f"indexed {result.tokens:,} tokens ({result.contexts:,} contexts) through "
               f"{len(result.sae_ids)} coder(s){processes} in {result.seconds:.1f}s ({rate:,.0f} tokens/s) -> {db}")
    for sae_id in result.sae_ids:
        click.echo(f"  {sae_id}")


def _register_commands() -> None:
    from .demo import COMMANDS as demo_commands
    from .indexer.describe_command import COMMANDS as describe_commands
    from .query.commands import COMMANDS as query_commands
    from .query.server.command import COMMANDS as server_commands
    from .store.commands import COMMANDS as store_commands

    for command in demo_commands + store_commands:
        command.callback = one_line_errors(command.callback)
    for command in describe_commands + query_commands + server_commands + store_commands + demo_commands:
        main.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
