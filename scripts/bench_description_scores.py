"""The embedding score of every description of a catalogue (issue 24): time, rate and distribution.

    python scripts/bench_description_scores.py --catalogue /tmp/demo-before/featuredb-demo/catalogue

Copies the catalogue to a temporary directory (the original is never written), runs
`featuredb describe --score-only` there (every current description gets its embedding AUROC,
describe/embedding_score.py), and prints the time taken, context windows and descriptions per
second, the quantiles and a histogram of the scores. `--shuffled N` also scores N descriptions
against the contexts of another feature (a wrong description), as a floor to compare with.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from featuredb.describe.embedding_score import EmbeddingScorer
from featuredb.describe.evidence import load_evidence
from featuredb.describe.run import DescribeConfig, run_describe
from featuredb.runtime.embedding import DEFAULT_EMBEDDING_MODEL, embed
from featuredb.store import FeatureStore
from featuredb.store.descriptions import current_descriptions

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def distribution(scores: np.ndarray) -> str:
    lines = [f"{len(scores):,} scores: mean {scores.mean():.3f}; quantiles " +
             ", ".join(f"p{int(q * 100)} {v:.3f}" for q, v in zip(QUANTILES, np.quantile(scores, QUANTILES)))]
    counts, edges = np.histogram(scores, bins=10, range=(0.0, 1.0))
    for count, low in zip(counts, edges[:-1]):
        lines.append(f"  [{low:.1f}, {low + 0.1:.1f}{']' if low >= 0.9 else ')'} {count:>6,} {'#' * int(60 * count / max(counts.max(), 1))}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalogue", required=True)
    parser.add_argument("--shuffled", type=int, default=1000, help="wrong descriptions scored as a floor (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "catalogue")
        shutil.copytree(args.catalogue, db)
        embed(["warm up"], DEFAULT_EMBEDDING_MODEL)  # loading the model is not counted
        started = time.perf_counter()
        r = run_describe(DescribeConfig(db=db, score_only=True, progress=False))
        seconds = time.perf_counter() - started
        print(f"describe --score-only: {r.embedding_scored:,} descriptions scored in {seconds:.1f}s "
              f"({r.embedding_scored / seconds:,.1f} descriptions/s); scoring {r.score_seconds:.1f}s of it; "
              f"{r.windows_embedded:,} context windows embedded ({r.windows_embedded / max(r.score_seconds, 1e-9):,.1f} "
              f"windows/s of scoring time), descriptions embedded in {r.embed_seconds:.1f}s")
        store = FeatureStore(db, read_only=True)
        rows = [row for c in store.coders()["coder_id"].to_list() for row in current_descriptions(store, c)]
        scores = np.array([row["embedding_score"] for row in rows if row["embedding_score"] is not None])
        print(f"{len(rows) - len(scores):,} of {len(rows):,} descriptions unscored (no activating or non-activating context)")
        print(distribution(scores))
        if args.shuffled:
            rng = random.Random(0)
            sample = rng.sample([row for row in rows if row["embedding_score"] is not None], min(args.shuffled, len(scores)))
            scorer = EmbeddingScorer(store, embed, DEFAULT_EMBEDDING_MODEL)
            top_k = dict(store.coders().select("coder_id", "top_k").iter_rows())
            by_coder: dict[str, list[dict]] = {}
            for row in sample:
                by_coder.setdefault(row["coder_id"], []).append(row)
            wrong, right = [], []
            for coder_id, chosen in by_coder.items():
                evidence = load_evidence(store, coder_id, sorted({row["feature"] for row in chosen}), top_k[coder_id])
                others = [rng.choice(rows)["description"] for _ in chosen]  # other features' descriptions
                results = scorer.score(coder_id, [(row["feature"], o) for row, o in zip(chosen, others)], evidence)
                wrong += [x.score for x in results]
                right += [row["embedding_score"] for row in chosen]
            right = np.array(right)
            wrong_scores = np.array([w for w in wrong if w is not None])
            print(f"the same {len(sample):,} features with another feature's description (a wrong one):")
            print(distribution(wrong_scores))
            print(f"own description scores higher than the wrong one for {np.mean(right > np.array([w if w is not None else np.nan for w in wrong])):.1%}")


if __name__ == "__main__":
    main()
