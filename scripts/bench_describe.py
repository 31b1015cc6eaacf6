"""Benchmark of `featuredb describe`: labels and embeddings per second.

    python scripts/bench_describe.py --features 2048
    python scripts/bench_describe.py --db featuredb-demo/catalogue --limit 1024 --compare

Without --db: builds a synthetic catalogue (one coder, N features with 8 top and 4 interval example
contexts of 32 tokens each) in a temporary directory, describes it with the default explainer and
embedding model, and prints features/s for the whole run and descriptions embedded/s (embedding
time only; loading the model is not counted).

With --db: describes a copy of that catalogue (its descriptions removed first; the catalogue itself
is never written) with `words` labels and embeddings. --compare describes two copies in this one
process, first by the path before issue 24 (every label analysed twice, no cache of a peak's facts,
embedded in float32 by sentence-transformers in batches of 128, duplicates included) then by
today's, checks that the labels are identical, and prints features/s of each with the quality
guard (cosine of the stored vectors, top-5 neighbours). Then the embeddings/s of a sample of the
labels in each precision (--precisions) against float32, with the same guard.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import featuredb.describe.run as describe_run
import featuredb.describe.words as words
from featuredb.describe.explainers import TOKENS_METHOD, tokens_label
from featuredb.describe.words import evidence_record, words_label
from featuredb.runtime.embedding import DEFAULT_EMBEDDING_MODEL, embed, embedding_device, load_embedder
from featuredb.store import FEATURES_TABLE, FeatureStore, examples_schema, features_schema
from featuredb.store.connect import connect
from featuredb.store.descriptions import DESCRIPTION_COLUMNS
from featuredb.store.schema import DESCRIPTIONS_TABLE
from featuredb.describe.run import DescribeConfig, run_describe

WORDS = ("the", "cat", "sat", "on", "mat", "Paris", "London", "Berlin", "def", "return", "42", "7", "blue", "red",
         "river", "bank", "money", "code", "while", "for", "is", "was", "of", "in", "and", "to")


def synthetic_catalogue(path: str, n_features: int, context: int = 32, seed: int = 0) -> None:
    rng = random.Random(seed)
    coder_id = "bench"
    feature_rows = {name: [] for name in features_schema().names}
    example_rows = {name: [] for name in examples_schema().names}
    context_index = 0
    for f in range(n_features):
        favourite = rng.sample(WORDS, 3)
        logits = rng.sample(WORDS, 5)
        for name, value in dict(
            coder_id=coder_id, feature=f, model="bench-model", layer=6, hook="model.layers.6.output", site="res",
            active_count=100, density=0.001, max_activation=10.0, mean_activation=3.0, std_activation=1.0,
            hist_counts=[10] * 16, hist_max=16.0, top_logit_tokens=[" " + w for w in logits],
            top_logit_ids=list(range(5)), top_logit_values=[2.0, 1.5, 1.0, 0.5, 0.25],
            bottom_logit_tokens=[" x"], bottom_logit_ids=[9], bottom_logit_values=[-1.0], neighbours=[],
            neighbour_cosines=[], top_tokens=[" " + w for w in favourite], top_token_counts=[9, 5, 2],
            description=None, description_method=None, description_model=None, embedding_model=None, vector=None,
        ).items():
            feature_rows[name].append(value)
        for kind, count in (("top", 8), ("interval", 4)):
            for rank in range(count):
                tokens = ["<bos>"] + [" " + rng.choice(WORDS) for _ in range(context - 1)]
                position = rng.randrange(1, context)
                tokens[position] = " " + rng.choice(favourite)
                values = [0.0] * context
                values[position] = 10.0 - rank if kind == "top" else 2.0
                row = dict(coder_id=coder_id, feature=f, kind=kind, rank=rank,
                           bin_min=None if kind == "top" else 1.5, bin_max=None if kind == "top" else 2.5,
                           tokens=tokens, token_ids=list(range(context)), values=values, max_value=values[position],
                           max_position=position, doc_id=f"d{context_index}", context_index=context_index)
                context_index += 1
                for name, value in row.items():
                    example_rows[name].append(value)
    sae = dict(coder_id=coder_id, model="bench-model", hook="model.layers.6.output", hook_out="model.layers.6.output",
               site="res", layer=6, architecture="jumprelu", kind="sae", d_in=64, d_out=64, width=n_features,
               source="synthetic", tokens_indexed=context_index * context, contexts_indexed=context_index,
               context=context, top_k=8, created_at=dt.datetime.now(dt.timezone.utc))
    FeatureStore(path).write_coder(sae, feature_rows, example_rows)


# --- the path before issue 24, kept here to compare against in one process --------------------------


def float32_embedder(texts: list[str], name: str) -> np.ndarray:
    """The embedder before issue 24: float32 on the CPU, batches of 128, every text (duplicates too)."""
    vectors = load_embedder(name).encode(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True,
                                         show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def old_offline_label(explainer, ev, *label_args):
    """offline_label before issue 24: the label and its evidence record each analysed the examples."""
    if explainer == TOKENS_METHOD:
        return tokens_label(ev), None
    return words_label(ev, *label_args), evidence_record(ev)


def fresh_copy(src: str, dst: Path) -> None:
    """A copy of catalogue `src` with no descriptions (as `featuredb index` leaves it)."""
    shutil.copytree(src, dst)
    db = connect(str(dst))
    if DESCRIPTIONS_TABLE in FeatureStore(dst).table_names():
        db.drop_table(DESCRIPTIONS_TABLE)
    db.open_table(FEATURES_TABLE).update(values_sql={c: "NULL" for c in DESCRIPTION_COLUMNS})


def describe_copy(path: Path, limit: int | None, old: bool, embedding_model: str):
    config = dict(db=str(path), limit=limit, embedding_model=embedding_model, progress=False)
    if "embedding_score" in {f.name for f in dataclasses.fields(DescribeConfig)}:
        config["embedding_score"] = False  # item 1 measures labels + their embeddings only
    if not old:
        return run_describe(DescribeConfig(**config))
    current, cached_facts_of = describe_run.offline_label, words.facts_of
    describe_run.offline_label = old_offline_label
    uncached = getattr(words._peak_facts, "__wrapped__", words._peak_facts)  # no facts cache before issue 24
    words.facts_of = lambda ctx: uncached(ctx.tokens, ctx.max_position)
    try:
        return run_describe(DescribeConfig(**config), embedder=float32_embedder)
    finally:
        describe_run.offline_label, words.facts_of = current, cached_facts_of


def described(path: Path) -> dict[tuple[str, int], tuple[str, np.ndarray]]:
    rows = FeatureStore(path).features(columns=["coder_id", "feature", "description", "vector"]).to_dicts()
    return {(r["coder_id"], r["feature"]): (r["description"], np.asarray(r["vector"], dtype=np.float32))
            for r in rows if r["description"] is not None}


def quality(reference: np.ndarray, other: np.ndarray) -> str:
    """Cosine of each vector to its reference (min, mean) and the share of top-5 neighbours kept."""
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    other = other / np.linalg.norm(other, axis=1, keepdims=True)
    cosine = (reference * other).sum(1)
    near_ref, near_other = reference @ reference.T, other @ other.T
    np.fill_diagonal(near_ref, -np.inf)
    np.fill_diagonal(near_other, -np.inf)
    k = min(5, len(reference) - 1)
    top_ref, top_other = np.argsort(-near_ref, 1)[:, :k], np.argsort(-near_other, 1)[:, :k]
    kept = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_other)]) if k > 0 else 1.0
    return f"cosine min {cosine.min():.5f} mean {cosine.mean():.5f}, top-{k} neighbours kept {kept:.1%}"


def report(name: str, r) -> float:
    rate = r.features / r.seconds
    print(f"{name}: {r.features} features in {r.seconds:.1f}s ({rate:,.2f} features/s); embedded {r.embedded} "
          f"in {r.embed_seconds:.1f}s ({r.embedded / max(r.embed_seconds, 1e-9):,.2f} embeddings/s); "
          f"labels {r.seconds - r.embed_seconds:.1f}s", flush=True)
    return rate


def precision_table(texts: list[str], precisions: list[str], embedding_model: str) -> None:
    device = embedding_device()
    print(f"embeddings/s of {len(texts)} labels ({len(set(texts))} distinct) on {device}:")
    reference = None
    for precision in precisions:
        embed(texts[:2], embedding_model, precision=precision, device=device)  # load and convert first
        started = time.perf_counter()
        vectors = embed(texts, embedding_model, precision=precision, device=device)
        seconds = time.perf_counter() - started
        reference = vectors if reference is None else reference
        print(f"  {precision:>9}: {len(texts) / seconds:8.2f} embeddings/s ({seconds:.1f}s); vs {precisions[0]}: "
              f"{quality(reference, vectors)}", flush=True)


def compare(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / name for name in ("old", "new")}
        for path in paths.values():
            fresh_copy(args.db, path)
        load_embedder(args.embedding_model)  # loading is not what is compared
        rates = {}
        for name in (("old", "new") if args.compare else ("new",)):
            r = describe_copy(paths[name], args.limit, name == "old", args.embedding_model)
            label = "before issue 24 (float32, analysed twice)" if name == "old" else "today"
            rates[name] = report(f"describe {label}", r)
        new = described(paths["new"])
        if args.compare:
            old = described(paths["old"])
            keys = sorted(old)
            same = sum(old[k][0] == new.get(k, (None,))[0] for k in keys)
            print(f"labels identical: {same} of {len(keys)}")
            print(f"speed-up: {rates['new'] / rates['old']:.2f}x features/s; stored vectors today vs before: "
                  f"{quality(np.stack([old[k][1] for k in keys]), np.stack([new[k][1] for k in keys]))}")
        texts = [text for text, _ in new.values()]
        sample = random.Random(0).sample(texts, min(args.precision_sample, len(texts)))
        precision_table(sample, args.precisions.split(","), args.embedding_model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=2048, help="synthetic catalogue size (without --db)")
    parser.add_argument("--embedding-model", default=DEFAULT_EMBEDDING_MODEL)
    parser.add_argument("--db", default=None, help="describe a copy of this catalogue instead")
    parser.add_argument("--limit", type=int, default=None, help="--db: describe at most this many features")
    parser.add_argument("--compare", action="store_true", help="--db: also run the path before issue 24")
    parser.add_argument("--precisions", default="float32,bfloat16" + (",float16" if embedding_device() == "cuda" else ""),
                        help="--db: precisions to time embeddings in (the first is the reference)")
    parser.add_argument("--precision-sample", type=int, default=256, help="--db: labels embedded per precision")
    args = parser.parse_args()
    if args.db is not None:
        compare(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        synthetic_catalogue(tmp, args.features)
        print(f"synthetic catalogue: {args.features} features in {time.perf_counter() - started:.1f}s")
        r = run_describe(DescribeConfig(db=tmp, embedding_model=args.embedding_model, progress=False))
        print(f"describe: {r.features} features in {r.seconds:.1f}s "
              f"({r.features / r.seconds:,.1f} features/s, embedding model load included)")
        print(f"embedded {r.embedded} descriptions in {r.embed_seconds:.1f}s "
              f"({r.embedded / max(r.embed_seconds, 1e-9):,.1f} descriptions/s) with {args.embedding_model}")


if __name__ == "__main__":
    main()
