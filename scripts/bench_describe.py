"""Benchmark of `featuredb describe --explainer tokens`: labels and embeddings per second.

    python scripts/bench_describe.py --features 2048

Builds a synthetic catalogue (one coder, N features with 8 top and 4 interval example contexts of
32 tokens each) in a temporary directory, describes it with the tokens explainer and the default
embedding model, and prints features/s for the whole run and descriptions embedded/s (embedding
time only; loading the model is not counted).
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import tempfile
import time

from featuredb.runtime.embedding import DEFAULT_EMBEDDING_MODEL
from featuredb.store import FeatureStore, examples_schema, features_schema
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--embedding-model", default=DEFAULT_EMBEDDING_MODEL)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        synthetic_catalogue(tmp, args.features)
        print(f"synthetic catalogue: {args.features} features in {time.perf_counter() - started:.1f}s")
        r = run_describe(DescribeConfig(db=tmp, embedding_model=args.embedding_model, progress=False))
        print(f"describe --explainer tokens: {r.features} features in {r.seconds:.1f}s "
              f"({r.features / r.seconds:,.1f} features/s, embedding model load included)")
        print(f"embedded {r.embedded} descriptions in {r.embed_seconds:.1f}s "
              f"({r.embedded / max(r.embed_seconds, 1e-9):,.1f} descriptions/s) with {args.embedding_model}")


if __name__ == "__main__":
    main()
