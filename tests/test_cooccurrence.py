"""Features that fire together: every stored pair's count equals a brute force over all pairs of
every coder's dense activations; the lists are the best by Jaccard; a token sample is the one a
brute force draws; split streams and split coders merge to the same sample; shown by show, the
API, the page and `similar --by cooccurrence`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featuredb.cli import main
from featuredb.indexer.cooccurrence import MIN_COUNT, CooccurrenceConfig, TokenSample
from featuredb.indexer.run import IndexConfig, run_index
from featuredb.indexer.stats import hash_priority
from featuredb.store import FeatureStore
from featuredb.store.schema import COOCCURRENCE_COLUMNS

from test_index import CONTEXT, STATS, assert_same_catalogue, brute_force, gemma2_coders  # noqa: F401

SEED = 0x5EED  # cooccurrence._SEED: the brute force draws its own sample with the same hash


def index(model_dir, coders, corpus, db, cooccurrence=CooccurrenceConfig(top_n=6), **kw):
    config = IndexConfig(model=str(model_dir), coders=coders, corpus=str(corpus), db=str(db), context=CONTEXT,
                         batch_size=3, stats=STATS, cooccurrence=cooccurrence, progress=False, **kw)
    return run_index(config)


def dense_tokens(model_dir, coders, corpus):
    """Every counted token of the corpus: its key (context * T + position) and, per coder (by id),
    its dense activations [tokens, width]; from each context run through the model alone."""
    keys, acts = None, {}
    for spec in coders:
        _, coder, dense, _ = brute_force(model_dir, spec, corpus)  # [N, T, F], BOS and padding zeroed
        counted = torch.zeros(dense.shape[:2], dtype=torch.bool)
        for c in range(len(dense)):  # counted: every real token but BOS (brute_force pads with zeros)
            counted[c, 1:] = True
        n_real = _real_lengths(model_dir, corpus)
        for c, n in enumerate(n_real):
            counted[c, n:] = False
        key = (torch.arange(len(dense))[:, None] * CONTEXT + torch.arange(CONTEXT))[counted]
        assert keys is None or torch.equal(keys, key)
        keys, acts[coder.coder_id] = key, dense[counted]
    return keys, acts


def _real_lengths(model_dir, corpus):
    from featuredb.indexer.corpus import iter_windows
    from featuredb.runtime.model import load_model

    model = load_model(str(model_dir))
    return [len(w.token_ids) for w in iter_windows(str(corpus), model.tokenizer, model.bos_token_id, CONTEXT)]


def check_against_brute_force(db, keys, acts, top_n, sample=None):
    """Stored partners: counts and Jaccard equal the brute force over every pair of features of
    every coder (on the sampled tokens when `sample` keys are given), best first, and no pair left
    out beats the last one kept."""
    store = FeatureStore(str(db))
    coder_ids = sorted(acts)
    fires = torch.cat([acts[c] > 0 for c in coder_ids], dim=1)
    if sample is not None:
        fires = fires[torch.isin(keys, sample)]
    X = fires.double()
    both = (X.T @ X).long()
    n = both.diagonal()
    starts = np.cumsum([0] + [acts[c].shape[1] for c in coder_ids])
    global_id = {c: int(s) for c, s in zip(coder_ids, starts)}
    checked = 0
    for coder_id in coder_ids:
        rows = store.features(coder_id).sort("feature").to_dicts()
        assert store.coders().filter(store.coders()["coder_id"] == coder_id)["cooccurrence_tokens"][0] == len(X)
        for row in rows:
            i = global_id[coder_id] + row["feature"]
            partners = [global_id[c] + f for c, f in zip(row["cooccurring_coder_ids"], row["cooccurring_features"])]
            jaccard = [float(both[i, j] / (n[i] + n[j] - both[i, j])) for j in range(len(n))]
            for j, count, stored_j in zip(partners, row["cooccurring_counts"], row["cooccurring_jaccard"]):
                assert j != i and count == both[i, j] >= MIN_COUNT
                assert stored_j == pytest.approx(jaccard[j], rel=1e-6)
                checked += 1
            assert row["cooccurring_jaccard"] == sorted(row["cooccurring_jaccard"], reverse=True)
            left_out = [jaccard[j] for j in range(len(n)) if j != i and both[i, j] >= MIN_COUNT and j not in partners]
            if len(partners) < top_n:
                assert not left_out  # every pair seen on >= MIN_COUNT tokens is kept
            elif left_out:
                assert max(left_out) <= row["cooccurring_jaccard"][-1] + 1e-7
    assert checked > 0


def test_every_stored_pair_equals_brute_force(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    index(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path / "db")
    keys, acts = dense_tokens(tiny_gemma2, gemma2_coders, corpus_jsonl)
    check_against_brute_force(tmp_path / "db", keys, acts, top_n=6)
    # pairs across coders are counted too
    rows = FeatureStore(str(tmp_path / "db")).features()
    assert any(c != own for own, cs in zip(rows["coder_id"], rows["cooccurring_coder_ids"]) for c in cs)


def test_a_sample_of_tokens_is_the_brute_force_sample_and_resumes(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    config = CooccurrenceConfig(top_n=4, sample_tokens=60)
    index(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path / "whole", cooccurrence=config)
    keys, acts = dense_tokens(tiny_gemma2, gemma2_coders, corpus_jsonl)
    assert len(keys) > 2 * 60  # a real sample
    priority = hash_priority(keys, torch.zeros_like(keys), SEED)
    order = np.lexsort((keys.numpy(), priority.numpy()))
    sample = keys[torch.as_tensor(order[:60])]
    check_against_brute_force(tmp_path / "whole", keys, acts, top_n=4, sample=sample)
    # sampling never changes what the statistics count: the same rows as a run that does not sample
    index(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path / "off", cooccurrence=CooccurrenceConfig(top_n=0))
    sampled, off = FeatureStore(str(tmp_path / "whole")), FeatureStore(str(tmp_path / "off"))
    for coder_id in acts:
        assert sampled.features(coder_id).sort("feature").drop(COOCCURRENCE_COLUMNS).equals(
            off.features(coder_id).sort("feature").drop(COOCCURRENCE_COLUMNS))
        assert sampled.examples(coder_id).equals(off.examples(coder_id))
    shown = json.loads(CliRunner().invoke(main, ["show", f"{sorted(acts)[0]}/0", "--db", str(tmp_path / "whole"),
                                                 "--json"]).output)
    assert shown["cooccurrence"]["sampled"] and shown["cooccurrence"]["tokens"] == 60

    class Interrupt(Exception):
        pass

    def stop_after(n):
        def on_batch(i):
            if i == n:
                raise Interrupt
        return on_batch

    resumed = IndexConfig(model=str(tiny_gemma2), coders=gemma2_coders, corpus=str(corpus_jsonl),
                          db=str(tmp_path / "resumed"), context=CONTEXT, batch_size=3, stats=STATS,
                          cooccurrence=config, progress=False, checkpoint_seconds=0)
    with pytest.raises(Interrupt):
        run_index(resumed, on_batch=stop_after(3))
    resumed.resume = True
    run_index(resumed)
    assert_same_catalogue(tmp_path / "whole", tmp_path / "resumed")


def _random_batches(widths, batches=12, B=3, T=10, seed=0, shift=1.2):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batches):
        mask = torch.rand(B, T, generator=generator) > 0.1
        mask[:, 0] = False
        acts = [torch.relu(torch.randn(B, T, w, generator=generator) - shift) * mask[..., None] for w in widths]
        out.append((torch.arange(b * B, (b + 1) * B), mask, acts))
    return out


def _sample(batches, widths, capacity, batch_ids, coders):
    sample = TokenSample(capacity, batches[0][1].shape[1])
    offsets = np.cumsum([0] + widths)
    for b in batch_ids:
        context_ids, mask, acts = batches[b]
        candidates = sample.candidates(context_ids, mask)
        if candidates is None:
            continue
        for c in coders:
            candidates.add(acts[c], int(offsets[c]))
        sample.add(candidates)
    return sample


@pytest.mark.parametrize("capacity", [7, 50, 10_000])
def test_split_streams_and_split_coders_merge_to_one_sample(capacity):
    widths = [30, 20, 25]
    batches = _random_batches(widths)
    every = range(len(batches))
    one = _sample(batches, widths, capacity, every, [0, 1, 2])
    # ranks: every third batch each; coder groups: the whole stream, some coders each
    parts = [_sample(batches, widths, capacity, range(r, len(batches), 3), [0, 1, 2]) for r in range(3)]
    parts += [_sample(batches, widths, capacity, every, [0]), _sample(batches, widths, capacity, every, [1, 2])]
    for split in (parts[:3], parts[3:]):
        merged = TokenSample(capacity, one.context)
        for part in split:
            merged.merge(TokenSample.from_state(part.state_dict()))
        canonical = one.canonical()  # rows in the order a merge leaves them
        for name in ("priority", "key", "offsets", "features"):
            assert torch.equal(getattr(merged, name), getattr(canonical, name)), name
    assert one.tokens == min(capacity, sum(int(m.sum()) for _, m, _ in batches))
    partners = one.top_partners(sum(widths), 5)
    X = torch.zeros(one.tokens, sum(widths))
    for t in range(one.tokens):
        X[t, one.features[one.offsets[t]:one.offsets[t + 1]]] = 1
    both = X.T @ X
    got = [int(c) for c, j in zip(partners.count.flatten().tolist(), partners.partner.flatten().tolist()) if j >= 0]
    expected = [int(both[i, j]) for i, js in enumerate(partners.partner.tolist()) for j in js if j >= 0]
    assert got == expected and got


@pytest.mark.parametrize("shift", [0.8, 2.6])  # most features firing on a token (a dense count), few (sparse)
def test_partners_are_the_brute_force_best_by_jaccard(shift):
    widths = [120, 90]
    batches = _random_batches(widths, batches=30, B=4, T=12, shift=shift)
    sample = _sample(batches, widths, 10_000, range(len(batches)), [0, 1])
    fires = torch.cat([torch.cat(acts, dim=-1)[mask] for _, mask, acts in batches]) > 0
    X = fires.double()
    both, n = (X.T @ X).long(), fires.sum(0)
    partners = sample.top_partners(sum(widths), 4)
    for i in range(sum(widths)):
        ranked = sorted((-float(both[i, j] / (n[i] + n[j] - both[i, j])), j) for j in range(sum(widths))
                        if j != i and both[i, j] >= MIN_COUNT)[:4]
        assert [j for j in partners.partner[i].tolist() if j >= 0] == [j for _, j in ranked], i
        assert partners.count[i, :len(ranked)].tolist() == [int(both[i, j]) for _, j in ranked]
        assert partners.jaccard[i, :len(ranked)].tolist() == pytest.approx([-v for v, _ in ranked], rel=1e-6)
    assert (partners.partner[:, 0] >= 0).sum() >= 10  # enough rows with partners to check


def test_shown_by_show_similar_api_and_page(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    from fastapi.testclient import TestClient

    from featuredb.server import create_app

    db = tmp_path / "db"
    index(tiny_gemma2, gemma2_coders, corpus_jsonl, db)
    store = FeatureStore(str(db))
    rows = store.features().filter(store.features()["cooccurring_features"].list.len() >= 2).to_dicts()
    row = rows[0]
    ref = f"{row['coder_id']}/{row['feature']}"
    runner = CliRunner()
    shown = json.loads(runner.invoke(main, ["show", ref, "--db", str(db), "--json"]).output)
    expected = [{"coder_id": c, "feature": f, "count": n, "jaccard": j} for c, f, n, j in zip(
        row["cooccurring_coder_ids"], row["cooccurring_features"], row["cooccurring_counts"], row["cooccurring_jaccard"])]
    assert [{k: p[k] for k in ("coder_id", "feature", "count", "jaccard")} for p in shown["cooccurring"]] == expected
    assert all("description" in p and "layer" in p for p in shown["cooccurring"])
    assert shown["cooccurrence"]["score"] == "jaccard" and not shown["cooccurrence"]["sampled"]
    assert "fires together with" in runner.invoke(main, ["show", ref, "--db", str(db)]).output

    similar = json.loads(runner.invoke(main, ["similar", ref, "--by", "cooccurrence", "--db", str(db), "--json"]).output)
    assert [(s["coder_id"], s["feature"]) for s in similar] == [(p["coder_id"], p["feature"]) for p in expected]
    assert [s["score"] for s in similar] == pytest.approx([p["jaccard"] for p in expected])
    within = json.loads(runner.invoke(main, ["similar", ref, "--by", "cooccurrence", "--within", "--db", str(db),
                                             "--json"]).output)
    assert all(s["coder_id"] == row["coder_id"] for s in within)

    client = TestClient(create_app(str(db)))
    api = client.get(f"/api/features/{row['coder_id']}/{row['feature']}/similar", params={"by": "cooccurrence"}).json()
    assert [(s["coder_id"], s["feature"]) for s in api["results"]] == [(p["coder_id"], p["feature"]) for p in expected]
    feature = client.get(f"/api/features/{row['coder_id']}/{row['feature']}").json()
    assert [p["feature"] for p in feature["cooccurring"]] == [p["feature"] for p in expected]
    page = client.get(f"/features/{row['coder_id']}/{row['feature']}").text
    assert "Fires together with" in page and f"/features/{expected[0]['coder_id']}/{expected[0]['feature']}" in page
    assert client.get(f"/api/features/{row['coder_id']}/{row['feature']}/similar", params={"by": "nope"}).status_code == 422


def test_counting_off(tiny_gemma2, gemma2_coders, corpus_jsonl, tmp_path):
    db = tmp_path / "db"
    result = CliRunner().invoke(main, ["index", "--model", str(tiny_gemma2), "--coder", gemma2_coders[0], "--corpus",
                                       str(corpus_jsonl), "--db", str(db), "--context", str(CONTEXT), "--cooccurrence",
                                       "0", "--quiet"])
    assert result.exit_code == 0, result.output
    store = FeatureStore(str(db))
    assert store.features()["cooccurring_features"].null_count() == store.features().height
    coder_id = store.coders()["coder_id"][0]
    shown = json.loads(CliRunner().invoke(main, ["show", f"{coder_id}/0", "--db", str(db), "--json"]).output)
    assert shown["cooccurring"] == [] and shown["cooccurrence"] is None
    refused = CliRunner().invoke(main, ["similar", f"{coder_id}/0", "--by", "cooccurrence", "--db", str(db)])
    assert refused.exit_code == 1 and refused.output.startswith("error: ") and "--cooccurrence 0" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
