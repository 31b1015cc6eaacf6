#!/usr/bin/env python
"""A catalogue of millions of features, written through the real writer and searched.

Builds N features (Gemma Scope 16k-wide coders, 26 layers x 4 sites, d_model 640)
through `FeatureStore.write_coder` exactly as the indexer calls it (feature rows a batch at a time,
examples compact and streamed, contexts shared by every coder), plus each coder's decoder
directions, then finalizes (indexes) and measures:

- bytes a feature of every table on disk (all files, after finalize's compaction and cleanup);
- features written per second and finalize time, with peak RSS of the writer;
- p50 / p99 over >= 200 queries each: semantic search (through the index), keyword search,
  semantic search filtered by layer + density, one feature's page (`Catalogue.feature`),
  `similar`, `with_token`; recall@10 of semantic search against exact search;
- optionally (--s3) the same queries on a copy of the catalogue in an object store: the S3 server
  at AWS_ENDPOINT_URL (credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION), else a
  local moto server (in memory, and it reads a whole object for every ranged GET: a functional
  check only). Offline, s3rver (npm, files on disk, ranged GETs served as ranges) stands in for
  MinIO; docs/benchmarks.md gives the commands.

Synthetic data, real shapes: descriptions and their 384-d vectors as scripts/bench_query.py makes
them (clustered around real MiniLM embeddings of concept phrases); statistics and logit tables
of the indexer's sizes; contexts of 128 tokens (Zipf token ids over a 256k vocabulary) from a
corpus of --contexts windows; per example top-K 32 + 2 x 16 interval samples with
1 + Poisson(1.7) non-zero tokens (the demo's real examples: 2.7 on average).

    python scripts/bench_catalogue.py --features 2M                 # build + measure
    python scripts/bench_catalogue.py --features 2M --no-build --s3 --s3-features 200k
    python scripts/bench_catalogue.py --features 5M --finalize-existing  # finish a build whose finalize was cut
    AWS_ENDPOINT_URL=http://127.0.0.1:4568 AWS_ACCESS_KEY_ID=S3RVER AWS_SECRET_ACCESS_KEY=S3RVER \
        AWS_REGION=us-east-1 python scripts/bench_catalogue.py --features 5M --no-build --skip-local --s3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_query  # noqa: E402
from bench_query import Synth, concepts, pct, recall, vocabulary  # noqa: E402

import featuredb  # noqa: E402
from featuredb.indexer.records import context_rows  # noqa: E402
from featuredb.store import FeatureStore  # noqa: E402
from featuredb.store.decoder_vectors import write_decoder_vectors  # noqa: E402
from featuredb.store.examples import CompactExamples, vocabulary_rows  # noqa: E402
from featuredb.store.indexes import optimize  # noqa: E402
from featuredb.store.schema import contexts_schema, example_activations_schema  # noqa: E402

WIDTH = bench_query.WIDTH
CONTEXT = 128
VOCAB = 256_000
D_MODEL = 640  # Gemma 3 270M's residual width (decoder directions), as the demo
TOP_K, INTERVAL = 32, 32
FEATURES_PER_BATCH = 4096


def parse_count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * scale)


class Corpus:
    """--contexts windows of CONTEXT token ids, each the same on every call (read like a ContextStore)."""

    def __init__(self, n: int, seed: int = 3) -> None:
        self.n, self.seed = n, seed

    def tokens(self, index: np.ndarray) -> np.ndarray:
        out = np.empty((len(index), CONTEXT), dtype=np.int32)
        for i, c in enumerate(index.tolist()):
            rng = np.random.default_rng([self.seed, c])
            out[i] = (rng.zipf(1.3, CONTEXT) % VOCAB).astype(np.int32)
        out[:, 0] = 2  # BOS
        return out

    def doc_ids(self, index: np.ndarray) -> list[str]:
        return [f"doc-{c // 8}" for c in index.tolist()]


def example_batches(coder_id: str, features: np.ndarray, corpus: Corpus, keys: np.ndarray, peaks: np.ndarray,
                    rng: np.random.Generator) -> pa.Table:
    """Compact rows (as records._example_rows makes them) for a batch of features."""
    m = len(features)
    per = TOP_K + INTERVAL
    n = m * per
    nnz = 1 + rng.poisson(1.7, n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(nnz, out=offsets[1:])
    positions = rng.integers(1, CONTEXT, offsets[-1]).astype(np.int32)
    values = rng.lognormal(0.0, 1.0, offsets[-1]).astype(np.float32)
    row = np.repeat(np.arange(n), nnz)
    best = np.zeros(n, dtype=np.int64)
    order = np.lexsort((-values, row))
    first = np.ones(len(order), dtype=bool)
    first[1:] = row[order][1:] != row[order][:-1]
    best[row[order][first]] = order[first]
    context = rng.integers(0, corpus.n, n)
    max_position = positions[best]
    is_top = np.tile(np.arange(per) < TOP_K, m)
    bins = np.tile(np.r_[np.zeros(TOP_K), np.repeat(np.arange(INTERVAL // 16), 16)], m).astype(np.float32)
    bin_min = np.where(is_top, np.nan, bins * 0.5)
    return pa.table({
        "coder_id": pa.array([coder_id] * n, pa.string()),
        "feature": pa.array(np.repeat(features, per)),
        "kind": pa.array(np.where(is_top, "top", "interval").astype(object), pa.string()),
        "rank": pa.array(np.tile(np.r_[np.arange(TOP_K), np.arange(INTERVAL)], m).astype(np.int32)),
        "bin_min": pa.array(bin_min.astype(np.float32), mask=is_top),
        "bin_max": pa.array((bin_min + 0.5).astype(np.float32), mask=is_top),
        "context_key": pa.array(keys[context]),
        "max_value": pa.array(values[best]),
        "max_position": pa.array(max_position),
        "peak_token": pa.array(peaks[context, max_position]),
        "positions": pa.ListArray.from_arrays(pa.array(offsets), pa.array(positions)),
        "values": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
    }, schema=example_activations_schema())


class PeakRss:
    """Peak resident memory of this process while running (sampled every 50 ms)."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()

    def __enter__(self):
        def sample():
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, _rss())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(db: Path, n: int, synth: Synth, corpus: Corpus, queries: int, finalize: bool = True) -> dict:
    if db.exists():
        shutil.rmtree(db)
    store = FeatureStore(db, vector_dim=bench_query.DIM)
    words = synth.words
    vocab = np.asarray([f" {words[i % len(words)]}" if i % 3 else words[i % len(words)] for i in range(VOCAB)],
                       dtype=object)
    t_contexts = time.perf_counter()
    all_contexts = np.arange(corpus.n)
    context_tables, peaks = [], np.empty((corpus.n, CONTEXT), dtype=np.int32)
    for start in range(0, corpus.n, 16384):
        index = all_contexts[start:start + 16384]
        context_tables.append(context_rows(bench_query.MODEL, index, corpus))
        peaks[index] = corpus.tokens(index)
    keys = np.concatenate([t["context_key"].to_numpy() for t in context_tables])
    print(f"  corpus: {corpus.n:,} contexts of {CONTEXT} tokens keyed in {time.perf_counter() - t_contexts:.1f}s",
          flush=True)
    truth = bench_query.Truth(synth.queries(queries), np.zeros(queries, np.int32), np.full(queries, "", dtype=object))
    rng = np.random.default_rng(11)
    written = 0
    t0 = time.perf_counter()
    seconds = {"features+examples": 0.0, "decoders": 0.0}
    rates: list[tuple[int, float, int]] = []  # (features written, seconds, peak RSS) after each batch
    with PeakRss() as rss:
        for b in range((n + bench_query.BATCH - 1) // bench_query.BATCH):
            features, _, v, layers, coder_ids = synth.batch(b, 0, 0)
            truth.update(v, b * bench_query.BATCH, layers, coder_ids)
            for coder_index in np.unique(np.asarray(b * bench_query.BATCH + np.arange(features.num_rows)) // WIDTH):
                spec = synth.coder(int(coder_index))
                mine = features.filter(pa.compute.equal(features["coder_id"], spec["coder_id"]))
                record = {"coder_id": spec["coder_id"], "model": bench_query.MODEL, "hook": spec["hook"],
                          "hook_out": spec["hook"], "site": spec["site"], "layer": spec["layer"],
                          "architecture": "jumprelu", "kind": "sae", "d_in": D_MODEL, "d_out": D_MODEL,
                          "width": spec["width"], "source": "synthetic", "tokens_indexed": corpus.n * CONTEXT,
                          "contexts_indexed": corpus.n, "context": CONTEXT, "top_k": TOP_K}

                def batches(first=(written == 0), mine=mine, coder_id=spec["coder_id"]):
                    empty_rows = example_activations_schema().empty_table()
                    if first:  # the indexer hands every coder's contexts; the store keeps each once
                        for table in context_tables:
                            yield table, empty_rows
                    for start in range(0, mine.num_rows, FEATURES_PER_BATCH):
                        feats = mine["feature"].to_numpy()[start:start + FEATURES_PER_BATCH]
                        yield contexts_schema().empty_table(), example_batches(coder_id, feats, corpus, keys, peaks, rng)

                t = time.perf_counter()
                local = mine  # feature numbers are the coder's own
                replaced = store.write_coder(record, [local.slice(s, FEATURES_PER_BATCH)
                                           for s in range(0, local.num_rows, FEATURES_PER_BATCH)],
                                  CompactExamples(batches(), vocabulary=vocab if written == 0 else None))
                seconds["features+examples"] += time.perf_counter() - t
                t = time.perf_counter()
                directions = rng.standard_normal((spec["width"], D_MODEL), dtype=np.float32)
                write_decoder_vectors(store, spec["coder_id"], directions, new=not replaced)
                seconds["decoders"] += time.perf_counter() - t
                written += spec["width"]
            elapsed = time.perf_counter() - t0
            rates.append((written, elapsed, rss.peak))
            print(f"  {written:,} features written, {written / elapsed:,.0f} features/s, "
                  f"peak RSS {rss.peak / 2**30:.2f} GiB", flush=True)
    write_seconds = time.perf_counter() - t0
    t = time.perf_counter()
    if finalize:  # the demo's finalize: indexes built, files compacted, old versions removed
        optimize(store, cleanup_older_than=datetime.timedelta(0))
    finalize_seconds = time.perf_counter() - t if finalize else float("nan")
    setup = {"n": n, "write_seconds": write_seconds, "features_per_second": n / write_seconds,
             "seconds": seconds, "finalize_seconds": finalize_seconds, "peak_rss_bytes": rss.peak, "progress": rates,
             "exact_top10": truth.best["all"][1][:, :10].tolist()}
    (db.parent / f"{db.name}.setup.json").write_text(json.dumps(setup))
    return setup


def finalize_existing(db: Path, n: int, synth: Synth, queries: int) -> dict:
    """Finish a build whose writes completed but whose finalize was cut off: the exact answers are
    recomputed from the same deterministic stream (nothing is written), then finalize is timed. It
    may find part of its work done (LanceDB keeps every committed index), so its time is a floor."""
    truth = bench_query.Truth(synth.queries(queries), np.zeros(queries, np.int32), np.full(queries, "", dtype=object))
    for b in range((n + bench_query.BATCH - 1) // bench_query.BATCH):
        _, _, v, layers, coder_ids = synth.batch(b, 0, 0)
        truth.update(v, b * bench_query.BATCH, layers, coder_ids)
    print(f"  exact answers recomputed over {n:,} features", flush=True)
    t = time.perf_counter()
    with PeakRss() as rss:
        optimize(FeatureStore(db, vector_dim=bench_query.DIM), cleanup_older_than=datetime.timedelta(0))
    setup = {"n": n, "write_seconds": None, "features_per_second": None, "seconds": {},
             "finalize_seconds": time.perf_counter() - t, "finalize_resumed": True, "peak_rss_bytes": rss.peak,
             "progress": [], "exact_top10": truth.best["all"][1][:, :10].tolist()}
    (db.parent / f"{db.name}.setup.json").write_text(json.dumps(setup))
    return setup


def table_bytes(db: Path, n: int) -> dict:
    out = {}
    for table in sorted(db.iterdir()):
        if table.is_dir():
            size = int(subprocess.check_output(["du", "-sb", str(table)]).split()[0])
            out[table.name.removesuffix(".lance")] = size
    out["total"] = sum(out.values())
    return {name: {"bytes": size, "per_feature": size / n} for name, size in out.items()}


def bytes_of(db: Path) -> None:
    """Bytes a feature of every table of an existing catalogue (e.g. the demo's), and of its examples
    written in the wide layout featuredb used before (one append per coder, as its writer did)."""
    import lancedb

    from featuredb.store import Filter, examples_schema

    store = FeatureStore(db, read_only=True)
    n = store.table("features").count_rows()
    rows = store.table("example_activations").count_rows()
    print(f"{db}: {n:,} features, {rows:,} example rows")
    for name, size in table_bytes(db, n).items():
        print(f"  {name:<24} {size['bytes'] / 2**20:10.1f} MiB  {size['per_feature']:8.0f} B/feature")
    wide = db.parent / f"{db.name}-wide-examples"
    shutil.rmtree(wide, ignore_errors=True)
    table = None
    for coder_id in store.coders()["coder_id"].to_list():
        coder_rows = store.read_examples(Filter().eq("coder_id", coder_id))
        if table is None:
            table = lancedb.connect(wide).create_table("examples", coder_rows, schema=examples_schema())
        else:
            table.add(coder_rows)
    size = int(subprocess.check_output(["du", "-sb", str(wide)]).split()[0])
    shutil.rmtree(wide, ignore_errors=True)
    print(f"  the same examples wide (before): {size / 2**20:.1f} MiB, {size / n:.0f} B/feature, "
          f"{size / max(rows, 1):.0f} B an example row")


def measure(uri: str, synth: Synth, queries: int, n: int, setup: dict) -> dict:
    cat = featuredb.open(uri)
    cat.warm()
    exact = np.asarray(setup["exact_top10"])
    Q = synth.queries(len(exact))[:queries]  # the queries the exact answers were computed for
    rng = np.random.default_rng(21)
    coders = cat.coders()
    coder_ids = coders["coder_id"].to_list()
    results = {}

    def timed(name, fn, items):
        for item in items[:5]:
            fn(item)  # warm caches
        times, outs = [], []
        for item in items:
            t = time.perf_counter()
            outs.append(fn(item))
            times.append(time.perf_counter() - t)
        results[name] = {"p50_ms": pct(times, 50), "p99_ms": pct(times, 99), "n": len(items)}
        print(f"  {name:<22} p50 {results[name]['p50_ms']:8.1f} ms   p99 {results[name]['p99_ms']:8.1f} ms", flush=True)
        return outs

    found = timed("semantic", lambda q: cat.search(q).limit(10).to_polars(), list(Q))
    ids = [[int(synth_id(r)) for r in f.select("coder_id", "feature").iter_rows()] for f in found]
    results["semantic"]["recall@10"] = recall(ids, exact[:queries])
    print(f"  semantic recall@10 {results['semantic']['recall@10']:.3f}")
    words = list(synth.words[rng.integers(0, len(synth.words), queries)])
    timed("keyword", lambda w: cat.keyword(w).limit(10).to_polars(), words)
    layers = sorted(coders["layer"].unique().to_list())
    timed("semantic+layer+density",
          lambda i: cat.search(Q[i]).where(layer=layers[i % len(layers)], density=(None, 0.01)).limit(10).to_polars(),
          list(range(queries)))
    widths = dict(coders.select("coder_id", "width").iter_rows())
    picked = [coder_ids[i] for i in rng.integers(0, len(coder_ids), queries)]
    refs = [(c, int(rng.integers(0, widths[c]))) for c in picked]
    timed("feature page", lambda r: cat.feature(*r), refs)
    timed("similar", lambda r: cat.similar(*r).limit(10).to_polars(), refs)
    token_words = [w.strip() for w in synth_vocab_words(synth, rng, queries)]
    timed("with_token (one coder)", lambda i: cat.with_token(token_words[i]).where(coder_id=coder_ids[i % len(coder_ids)])
          .limit(10).to_polars(), list(range(queries)))
    return results


def synth_id(row) -> int:
    coder_id, feature = row
    return int(coder_id.rsplit("-", 1)[1]) * WIDTH + int(feature)


def synth_vocab_words(synth: Synth, rng, k: int) -> list[str]:
    # the corpus's frequent ids (Zipf) are the low ones: tokens that peak in many examples
    ids = np.minimum(rng.zipf(1.3, k), 50)
    return [str(synth.words[i % len(synth.words)]) for i in ids]


def s3_copy(db: Path, subset: int | None) -> tuple[str, object]:
    """Upload the catalogue to an S3 bucket and return its s3:// URI and the server started (None):
    the endpoint in AWS_ENDPOINT_URL (e.g. a MinIO server, with its credentials in the AWS_*
    variables) if set, else a local moto server (which reads a whole object for every ranged GET:
    a functional check, not a measure of speed)."""
    import boto3

    server = None
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        server = ThreadedMotoServer(port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": endpoint})
    s3 = boto3.client("s3", endpoint_url=endpoint)
    bucket = os.environ.get("FEATUREDB_BENCH_BUCKET", "featuredb")
    if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=bucket)
    for path in sorted(db.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"catalogue/{path.relative_to(db)}")
    return f"s3://{bucket}/catalogue", server


def export_rss(db: Path, features: int, out: Path) -> dict:
    """`featuredb export --format neuronpedia` of the first coders holding >= `features` features, in a
    child process: its peak RSS (the export streams a batch of features at a time)."""
    coders = FeatureStore(db, read_only=True).coders().sort("coder_id")
    chosen, total = [], 0
    for coder_id, width in coders.select("coder_id", "width").iter_rows():
        if total >= features:
            break
        chosen.append(coder_id)
        total += width
    shutil.rmtree(out, ignore_errors=True)
    args = ["export", "--format", "neuronpedia", "--db", str(db), "--out", str(out), "-q",
            *[a for c in chosen for a in ("--coder", c)]]
    # a fresh process per export, which prints its own peak RSS at the end
    child = ("import atexit, resource, sys\n"
             "atexit.register(lambda: print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))\n"
             "from featuredb.cli import main\nmain(sys.argv[1:])")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", child, *args], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    peak = int(done.stdout.rsplit("PEAK", 1)[1])
    size = int(subprocess.check_output(["du", "-sb", str(out)]).split()[0])
    shutil.rmtree(out, ignore_errors=True)
    result = {"features": total, "coders": len(chosen), "seconds": seconds, "features_per_second": total / seconds,
              "peak_rss_bytes": peak, "export_bytes": size}
    print(f"  export of {total:,} features ({len(chosen)} coders): {seconds:.0f}s, {total / seconds:,.0f} features/s, "
          f"peak RSS {peak / 2**30:.2f} GiB, {size / 2**30:.1f} GiB written", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", default="2M", help="features to write (e.g. 200k, 2M, 5M)")
    parser.add_argument("--bytes-of", default=None, metavar="DB", help="only: bytes a feature of the tables of an "
                        "existing catalogue (e.g. featuredb-demo/catalogue), and of its examples written wide")
    parser.add_argument("--contexts", default="200k", help="distinct context windows in the corpus")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dir", default="/tmp/featuredb-bench-catalogue")
    parser.add_argument("--no-build", action="store_true", help="measure the catalogue already built")
    parser.add_argument("--finalize-existing", action="store_true", help="finish a build whose finalize was cut off "
                        "(the writes done), then measure")
    parser.add_argument("--build-only", action="store_true", help="build and report bytes, no queries")
    parser.add_argument("--no-finalize", action="store_true", help="with --build-only: time the writes alone")
    parser.add_argument("--s3", action="store_true", help="also query a copy in an S3 server (AWS_ENDPOINT_URL, else a local moto server)")
    parser.add_argument("--s3-features", default=None, help="the size of the catalogue copied to S3 (built apart)")
    parser.add_argument("--s3-queries", type=int, default=None, help="queries of each kind on S3 (default --queries)")
    parser.add_argument("--skip-local", action="store_true", help="no local queries on the --features catalogue")
    parser.add_argument("--export-features", default=None, help="also export this many features to Neuronpedia's "
                        "format and report the exporter's peak RSS; several sizes comma-separated (e.g. 16k,64k)")
    args = parser.parse_args()
    if args.bytes_of:
        bytes_of(Path(args.bytes_of))
        return
    n = parse_count(args.features)
    root = Path(args.dir)
    cache = root / "cache"
    words = vocabulary()
    phrases, E = concepts(cache, words)
    print(f"machine: {os.cpu_count()} cores; features {n:,}", flush=True)
    db = root / f"db-{args.features}"
    synth = Synth(n, E, phrases, words)
    corpus = Corpus(parse_count(args.contexts))
    if args.no_build:
        setup = json.loads((root / f"{db.name}.setup.json").read_text())
    elif args.finalize_existing:
        print(f"finalizing the {n:,} features already written in {db}", flush=True)
        setup = finalize_existing(db, n, synth, args.queries)
    else:
        print(f"building {n:,} features -> {db}", flush=True)
        setup = build(db, n, synth, corpus, args.queries, finalize=not args.no_finalize)
    if setup["write_seconds"] is None:
        print(f"write: not in this run; finalize {setup['finalize_seconds']:.0f}s (resumed), peak RSS "
              f"{setup['peak_rss_bytes'] / 2**30:.2f} GiB")
    else:
        print(f"write: {setup['features_per_second']:,.0f} features/s ({setup['write_seconds']:.0f}s: "
              f"{json.dumps({k: round(v, 1) for k, v in setup['seconds'].items()})}), peak RSS "
              f"{setup['peak_rss_bytes'] / 2**30:.2f} GiB; finalize {setup['finalize_seconds']:.0f}s")
    sizes = table_bytes(db, n)
    for name, size in sizes.items():
        print(f"  {name:<24} {size['bytes'] / 2**20:10.1f} MiB  {size['per_feature']:8.0f} B/feature")
    if args.build_only:
        (root / f"report-{args.features}-build.json").write_text(json.dumps(
            {"features": n, "setup": {k: v for k, v in setup.items() if k != "exact_top10"}, "bytes": sizes}, indent=1))
        return
    local = None
    if not args.skip_local:
        print("local disk:", flush=True)
        local = measure(str(db), synth, args.queries, n, setup)
    report = {"features": n, "setup": {k: v for k, v in setup.items() if k != "exact_top10"}, "bytes": sizes,
              "local": local, "cpu_count": os.cpu_count(), "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if args.s3:
        s3_n = parse_count(args.s3_features) if args.s3_features else n
        s3_db = root / f"db-{args.s3_features}" if args.s3_features else db
        if not s3_db.exists():
            print(f"building the {s3_n:,}-feature catalogue for S3 -> {s3_db}", flush=True)
            build(s3_db, s3_n, Synth(s3_n, E, phrases, words), corpus, args.queries)
        s3_setup = json.loads((root / f"{s3_db.name}.setup.json").read_text())
        uri, server = s3_copy(s3_db, None)
        served_by = "moto (in memory)" if server is not None else os.environ["AWS_ENDPOINT_URL"]
        print(f"object store ({uri} at {served_by}, {s3_n:,} features):", flush=True)
        if s3_db != db:
            print("local disk, same catalogue:", flush=True)
            report["s3_local"] = measure(str(s3_db), Synth(s3_n, E, phrases, words), args.s3_queries or args.queries,
                                         s3_n, s3_setup)
            print("object store:", flush=True)
        report["s3"] = measure(uri, Synth(s3_n, E, phrases, words), args.s3_queries or args.queries, s3_n, s3_setup)
        report["s3_features"], report["s3_endpoint"] = s3_n, served_by
        if server is not None:
            server.stop()
    if args.export_features:  # e.g. "16k,64k": peak RSS at each size (bounded memory: flat)
        print("Neuronpedia export:", flush=True)
        report["export"] = [export_rss(db, parse_count(size), root / "export") for size in args.export_features.split(",")]
    out = root / f"report-{args.features}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"report -> {out}")


if __name__ == "__main__":
    main()
