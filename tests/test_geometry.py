"""Logit tables: the fast path (bf16 scoring where native, block candidates, exact re-rank) against
a brute-force float32 reference."""

from __future__ import annotations

import pytest
import torch

import featuredb.indexer.geometry as geometry
from featuredb.indexer.geometry import logit_tables


def reference(W_dec, unembed, to_residual=None, k=10):
    directions = W_dec.float() if to_residual is None else W_dec.float() @ to_residual.float()
    logits = directions @ unembed.float().T
    top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    return top.indices, top.values, bottom.indices, bottom.values


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("vocab, k", [(5000, 10), (256 * 7, 10), (300, 10), (9, 20), (1, 3)])
def test_equals_brute_force(monkeypatch, bf16, vocab, k):
    monkeypatch.setattr(geometry, "fast_bf16", lambda device: bf16)
    generator = torch.Generator().manual_seed(vocab + k)
    W_dec = torch.randn(37, 16, generator=generator)
    unembed = torch.randn(vocab, 16, generator=generator)
    got = logit_tables(W_dec, unembed, k=k, chunk=8)
    want = reference(W_dec, unembed, k=min(k, vocab))
    assert torch.equal(got.top_ids, want[0]) and torch.equal(got.bottom_ids, want[2])
    torch.testing.assert_close(got.top_values, want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.bottom_values, want[3], rtol=1e-5, atol=1e-5)


def test_maps_into_the_residual_stream_first():
    generator = torch.Generator().manual_seed(1)
    W_dec, to_residual = torch.randn(5, 8, generator=generator), torch.randn(8, 12, generator=generator)
    unembed = torch.randn(1000, 12, generator=generator)
    got = logit_tables(W_dec, unembed, to_residual, k=4)
    want = reference(W_dec, unembed, to_residual, k=4)
    assert torch.equal(got.top_ids, want[0]) and torch.equal(got.bottom_ids, want[2])
