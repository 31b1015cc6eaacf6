"""What counting features that fire together costs (issue 23).

1. The demo's index stage (its model, coders and corpus, as `featuredb demo` built them), run once
   with co-occurrence counted: the seconds spent on it (sampling tokens while streaming, counting
   pairs at the end) as a share of the stage, measured in that one run. --compare also runs the
   stage with --cooccurrence 0 and reports the two stage times (noisier: two runs).
2. A 1M-wide coder, estimated from a measured run on synthetic codes: a sample of
   --sample-tokens tokens with --l0 features firing per token out of --width (densities drawn
   from a power law, as SAE densities are), merged as the indexer merges batches, then counted.
   Time and peak memory of each step, and how each grows (sample: tokens x L0; counting: tokens x L0^2).

    python scripts/bench_cooccurrence.py --demo-dir featuredb-demo            # both
    python scripts/bench_cooccurrence.py --skip-demo --width 1M --l0 100
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from featuredb.indexer.cooccurrence import DEFAULT_SAMPLE_TOKENS, DEFAULT_TOP_N, CooccurrenceConfig, TokenSample  # noqa: E402


def parse_count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * scale)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def demo_stage(demo_dir: Path, top_n: int, sample_tokens: int) -> dict:
    """The demo's index stage into a fresh catalogue; its seconds and co-occurrence's share."""
    from featuredb.demo.build import DemoConfig, model_spec, plan_coders
    from featuredb.indexer.run import IndexConfig, run_index

    config = DemoConfig(out=demo_dir, progress=False)
    specs = [p.index_spec for p in plan_coders(config)]
    with tempfile.TemporaryDirectory(dir=demo_dir) as tmp:
        started = time.perf_counter()
        result = run_index(IndexConfig(
            model=model_spec(config), coders=specs, corpus=str(config.corpus), db=str(Path(tmp) / "catalogue"),
            tokens=config.tokens, context=config.context, batch_size=16, outlier_ratio=config.outlier_ratio,
            cooccurrence=CooccurrenceConfig(top_n=top_n, sample_tokens=sample_tokens), progress=False))
        seconds = time.perf_counter() - started
    return {"top_n": top_n, "sample_tokens": sample_tokens, "tokens": result.tokens, "seconds": seconds,
            "stream_seconds": result.stream_seconds, "cooccurrence_seconds": result.cooccurrence_seconds,
            "share": result.cooccurrence_seconds / seconds, "tokens_per_second": result.tokens / seconds}


def synthetic(width: int, l0: int, sample_tokens: int, top_n: int, batch_tokens: int = 2048, seed: int = 0) -> dict:
    """A sample filled from synthetic firings (the features firing on each token drawn by density),
    merged batch by batch as the indexer does, then counted."""
    rng = np.random.default_rng(seed)
    density = rng.pareto(1.0, width) + 1e-3
    density = density / density.sum()  # a feature's share of the firings
    cdf = np.cumsum(density)
    sample = TokenSample(sample_tokens, 128)
    t = time.perf_counter()
    tokens = 0
    merge_seconds = 0.0
    while tokens < 2 * sample_tokens:  # the stream is twice the sample: half the tokens get evicted
        n = batch_tokens
        drawn = np.searchsorted(cdf, rng.random((n, l0)))  # by density, as rng.choice(p=density) draws
        firing = [np.unique(row) for row in np.minimum(drawn, width - 1)]
        lengths = np.array([len(f) for f in firing])
        features = torch.from_numpy(np.concatenate(firing))
        context_ids = torch.arange(tokens // 128, tokens // 128 + n // 128)
        mask = torch.ones(n // 128, 128, dtype=torch.bool)
        candidates = sample.candidates(context_ids, mask)
        started = time.perf_counter()
        if candidates is not None:  # firings of the candidate tokens only, as BatchCandidates.add keeps them
            index = candidates.rows * 128 + candidates.positions
            token = torch.repeat_interleave(torch.arange(len(index)), torch.from_numpy(lengths)[index])
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            picked = torch.cat([features[starts[i]:starts[i] + lengths[i]] for i in index.tolist()])
            candidates._token, candidates._feature = [token], [picked]
            sample.add(candidates)
        merge_seconds += time.perf_counter() - started
        tokens += n
    fill_seconds = time.perf_counter() - t
    state_bytes = sum(v.numel() * v.element_size() for v in sample.state_dict().values())
    t = time.perf_counter()
    partners = sample.top_partners(width, top_n)
    count_seconds = time.perf_counter() - t
    firings = int(sample.features.numel())
    pairs = int(((sample.offsets[1:] - sample.offsets[:-1]).double() ** 2).sum())
    return {"width": width, "l0": l0, "sample_tokens": sample.tokens, "stream_tokens": tokens,
            "firings_in_sample": firings, "pair_products": pairs, "merge_seconds": merge_seconds,
            "fill_seconds_with_synthesis": fill_seconds, "count_seconds": count_seconds,
            "pairs_per_second": pairs / count_seconds, "sample_bytes": state_bytes,
            "partner_bytes": sum(t.numel() * t.element_size() for t in (partners.partner, partners.count,
                                                                        partners.jaccard)),
            "peak_rss_gib": rss_gib(), "features_with_partners": int((partners.partner[:, 0] >= 0).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", default="featuredb-demo", help="a directory `featuredb demo` built")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--compare", action="store_true", help="also run the demo's stage with co-occurrence off")
    parser.add_argument("--width", default="1M", help="synthetic coder width (0: skip)")
    parser.add_argument("--l0", type=int, default=100, help="synthetic features firing per token")
    parser.add_argument("--sample-tokens", type=int, default=DEFAULT_SAMPLE_TOKENS)
    parser.add_argument("--top-n", type=int, default=DEFAULT_TOP_N)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    print(f"machine: {torch.get_num_threads()} threads")
    report = {}
    if not args.skip_demo:
        demo = demo_stage(Path(args.demo_dir), args.top_n, args.sample_tokens)
        print(f"demo index stage: {demo['seconds']:.1f}s ({demo['tokens_per_second']:,.0f} tokens/s), co-occurrence "
              f"{demo['cooccurrence_seconds']:.1f}s = {demo['share']:.1%} of it (sample {args.sample_tokens:,} of "
              f"{demo['tokens']:,} tokens, top {args.top_n})")
        report["demo"] = demo
        if args.compare:
            off = demo_stage(Path(args.demo_dir), 0, args.sample_tokens)
            print(f"  the same stage with --cooccurrence 0: {off['seconds']:.1f}s "
                  f"(on / off = {demo['seconds'] / off['seconds']:.3f})")
            report["demo_off"] = off
    width = parse_count(args.width)
    if width:
        s = synthetic(width, args.l0, args.sample_tokens, args.top_n)
        print(f"synthetic {width:,}-wide coder, L0 {args.l0}: sample of {s['sample_tokens']:,} tokens "
              f"({s['firings_in_sample']:,} firings) {s['sample_bytes'] / 2**20:.1f} MiB, merges {s['merge_seconds']:.1f}s "
              f"over a stream of {s['stream_tokens']:,} tokens; counting {s['pair_products']:,} pair products "
              f"{s['count_seconds']:.1f}s ({s['pairs_per_second'] / 1e6:.0f}M/s); partners {s['partner_bytes'] / 2**20:.0f} "
              f"MiB; peak RSS {s['peak_rss_gib']:.2f} GiB")
        report["synthetic"] = s
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
