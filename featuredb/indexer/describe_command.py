"""`featuredb describe`: describe features (tokens / llm / local explainers), score, embed."""

from __future__ import annotations

from ..errors import one_line_errors

import click

from ..embedding import DEFAULT_EMBEDDING_MODEL


@click.command()
@click.option("--db", required=True, help="Catalogue directory (or s3:// URI).")
@click.option("--explainer", type=click.Choice(["tokens", "llm", "local"]), default="tokens", show_default=True,
              help="tokens: offline label from the evidence; llm: OpenAI-compatible endpoint; local: HF model in-process.")
@click.option("--sae", "sae_ids", multiple=True, help="Only this coder (repeatable; default: all).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Describe at most this many features.")
@click.option("--score", is_flag=True, help="Also compute detection and fuzzing scores (llm / local).")
@click.option("--base-url", default=None,
              help="llm: endpoint base URL, e.g. http://localhost:8000/v1 (default: $FEATUREDB_BASE_URL, "
                   "$OPENAI_BASE_URL or OpenAI). The key comes from $FEATUREDB_API_KEY or $OPENAI_API_KEY.")
@click.option("--model", default=None, help="llm: model name; local: directory, .gguf file or hub id.")
@click.option("--embedding-model", default=DEFAULT_EMBEDDING_MODEL, show_default=True,
              help="sentence-transformers model (name or path) for the description embeddings.")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True, help="llm: requests in flight.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="llm: seconds per request.")
@click.option("--max-retries", type=click.IntRange(min=0), default=5, show_default=True,
              help="llm: retries on 429 / 5xx / timeouts, with exponential backoff.")
@click.option("--cache", default=None, help="Reply cache file (default: DB/_describe_cache.sqlite).")
@click.option("--device", default=None, help="local: cpu, cuda, ... (default: cuda when available).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@one_line_errors(interrupted="interrupted (rerun the same command to resume)")
def describe(db, explainer, sae_ids, limit, score, base_url, model, embedding_model, concurrency, timeout,
             max_retries, cache, device, quiet):
    """Describe features: a label or LLM description per feature, with provenance, scores and embeddings."""
    from .describe import DescribeConfig, run_describe

    config = DescribeConfig(
        db=db, explainer=explainer, sae_ids=list(sae_ids), limit=limit, score=score, base_url=base_url,
        model=model, embedding_model=embedding_model, concurrency=concurrency, timeout=timeout,
        max_retries=max_retries, cache=cache, device=device, progress=not quiet,
    )
    r = run_describe(config)
    from ..query import finalize

    finalize(db)  # the full-text and vector indexes cover the new descriptions
    rate = r.features / max(r.seconds, 1e-9)
    made = [f"{r.tokens_labels:,} tokens label(s)"]
    if explainer != "tokens":
        made.append(f"{r.described:,} {explainer} description(s), {r.scored:,} scored")
    click.echo(f"described {r.features:,} feature(s) in {r.seconds:.1f}s ({rate:,.1f} features/s): "
               f"{'; '.join(made)}; {r.skipped:,} already done")
    if r.embedded:
        click.echo(f"embedded {r.embedded:,} description(s) with {embedding_model} in {r.embed_seconds:.1f}s "
                   f"({r.embedded / max(r.embed_seconds, 1e-9):,.1f}/s)")
    if explainer != "tokens":
        click.echo(f"{r.requests:,} request(s), {r.cache_hits:,} cached, {r.retries:,} retried")
    if r.unparsed:
        click.echo(f"warning: {r.unparsed:,} reply(ies) held no description; those features keep their "
                   f"previous description", err=True)


COMMANDS = [describe]
