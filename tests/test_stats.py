"""The streaming statistics equal a brute-force computation over all contexts at once."""

import numpy as np
import pytest
import torch

from featuredb.indexer.stats import FeatureStats, StatsConfig, hash_priority, scale_for, state_bytes

F, T = 24, 10


def make_stream(n_contexts: int, seed: int = 0, ties: bool = False):
    """Sparse non-negative activations [N, T, F] with BOS (position 0) zeroed, like the indexer sees."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.rand(n_contexts, T, F, generator=gen) * torch.linspace(0.5, 40, F)
    acts[torch.rand(n_contexts, T, F, generator=gen) > 0.15] = 0
    acts[:, 0] = 0
    if ties:  # quantised values make many exact ties in context maxima
        acts = (acts * 2).round() / 2
    acts[:, :, 3] = 0  # a dead feature
    return acts


def run_stream(acts: torch.Tensor, config: StatsConfig, batch: int, start: int = 0) -> FeatureStats:
    stats = FeatureStats(F, T, config)
    for i in range(0, acts.shape[0], batch):
        chunk = acts[i:i + batch]
        stats.update(chunk, torch.arange(start + i, start + i + chunk.shape[0]), counted_tokens=chunk.shape[0] * (T - 1))
    return stats


def brute_force(acts: torch.Tensor, config: StatsConfig):
    """Plain reference: everything computed from the dense [N, T, F] history."""
    a = acts.double().numpy()
    n = a.shape[0]
    out = {}
    context_max = a.max(axis=1)  # [N, F]
    for f in range(F):
        v = a[:, :, f][a[:, :, f] > 0]
        mx = v.max() if v.size else 0.0
        scale = float(scale_for(torch.tensor([mx], dtype=torch.float32))[0])
        hist = np.zeros(config.hist_bins, dtype=np.int64)
        if v.size:
            for x in v.astype(np.float32):
                hist[min(int(np.floor(np.float32(x) * config.hist_bins / scale)), config.hist_bins - 1)] += 1
        ranked = sorted((-context_max[c, f], c) for c in range(n) if context_max[c, f] > 0)
        top = [c for _, c in ranked[:config.top_k]]
        prio = hash_priority(torch.arange(n), torch.tensor(f), config.seed).numpy()
        intervals = {}
        for c in range(n):
            m = np.float32(context_max[c, f])
            if m > 0:
                b = min(int(np.floor(m * config.interval_bins / scale)), config.interval_bins - 1)
                intervals.setdefault(b, []).append((prio[c], c))
        intervals = {b: [c for _, c in sorted(lst)[:config.interval_per_bin]] for b, lst in intervals.items()}
        out[f] = dict(count=v.size, sum=v.sum(), max=mx, mean=v.mean() if v.size else 0, std=v.std() if v.size else 0,
                      scale=scale, hist=hist, top=top, intervals=intervals)
    return out


def check_equal(stats: FeatureStats, acts: torch.Tensor, config: StatsConfig):
    ref = brute_force(acts, config)
    mean, std = stats.mean_std()
    top_value, top_context, top_tokens = stats.top_sorted()
    interval_bins, _, interval_context, interval_tokens = stats.intervals_sorted()
    for f in range(F):
        r = ref[f]
        assert stats.active_count[f] == r["count"]
        assert stats.act_max[f] == pytest.approx(r["max"], rel=1e-6)
        assert stats.scale[f] == r["scale"]
        assert np.array_equal(stats.hist[f].numpy(), r["hist"]), f
        assert mean[f] == pytest.approx(r["mean"], rel=1e-6, abs=1e-9)
        assert std[f] == pytest.approx(r["std"], rel=1e-5, abs=1e-6)
        kept = [int(c) for c in top_context[f] if c >= 0]
        assert kept == r["top"], f
        for slot, c in enumerate(top_context[f].tolist()):
            if c >= 0:  # the stored per-token values are that context's values for this feature
                assert torch.equal(top_tokens[f, slot], acts[c, :, f])
                assert top_value[f, slot] == acts[c, :, f].max()
        for b in range(config.interval_bins):
            in_bin = interval_bins[f] == b
            got = [int(c) for c in interval_context[f][in_bin]]
            assert got == r["intervals"].get(b, []), (f, b)
            for c, values in zip(got, interval_tokens[f][in_bin]):
                assert torch.equal(values, acts[c, :, f])
        assert (interval_context[f][interval_bins[f] == config.interval_bins] == -1).all()
    assert stats.active_count[3] == 0 and (top_context[3] == -1).all()


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("ties", [False, True])
def test_stream_equals_brute_force(batch, ties):
    acts = make_stream(150, seed=batch, ties=ties)
    config = StatsConfig(top_k=5, hist_bins=16, interval_bins=8, interval_per_bin=2)
    check_equal(run_stream(acts, config, batch), acts, config)


def test_merge_of_shards_equals_one_stream():
    acts = make_stream(120, seed=3, ties=True)
    config = StatsConfig(top_k=6, hist_bins=32, interval_bins=4, interval_per_bin=3)
    whole = run_stream(acts, config, batch=16)
    # shards in any order: the second shard holds the earlier contexts
    late = run_stream(acts[70:], config, batch=9, start=70)
    early = run_stream(acts[:70], config, batch=11)
    late.merge(early)
    check_equal(late, acts, config)
    for name in ("active_count", "act_max", "scale", "hist"):
        assert torch.equal(getattr(late, name), getattr(whole, name)), name
    assert torch.allclose(late.act_sum, whole.act_sum)
    for a, b in zip(late.top_sorted() + late.intervals_sorted(), whole.top_sorted() + whole.intervals_sorted()):
        assert torch.equal(a, b)


def test_checkpoint_roundtrip_continues_identically():
    acts = make_stream(80, seed=5)
    config = StatsConfig(top_k=4, hist_bins=16, interval_bins=4, interval_per_bin=2)
    first = run_stream(acts[:40], config, batch=8)
    resumed = FeatureStats(F, T, config)
    resumed.load_state_dict(first.state_dict())
    for i in range(40, 80, 8):
        resumed.update(acts[i:i + 8], torch.arange(i, i + 8), counted_tokens=8 * (T - 1))
    whole = run_stream(acts, config, batch=8)
    for name in FeatureStats.TENSORS:
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    assert resumed.tokens_counted == whole.tokens_counted


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        StatsConfig(hist_bins=10)


@pytest.mark.parametrize("width, context, config", [
    (24, 10, StatsConfig()),
    (7, 33, StatsConfig(top_k=100, hist_bins=8, interval_bins=4, interval_per_bin=0)),
    (5, 2, StatsConfig(top_k=1, interval_per_bin=5)),
])
def test_state_bytes_is_what_the_statistics_allocate(width, context, config):
    """The memory check before a run (indexer/preflight.py) counts exactly the tensors a run holds."""
    stats = FeatureStats(width, context, config)
    allocated = sum(getattr(stats, name).nbytes for name in FeatureStats.TENSORS)
    assert state_bytes(width, context, config) == allocated
    assert state_bytes(2 * width, context, config) == 2 * allocated  # linear in the width
    # the per-token values dominate: features x (top-K + interval slots) x context x 4 bytes
    assert allocated >= width * (config.top_k + config.interval_slots) * context * 4
