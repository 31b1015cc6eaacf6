import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featuredb.indexer.corpus import CorpusError, document_windows, iter_windows, read_documents

from conftest import CORPUS_TEXT, build_tokenizer


def test_windows_start_with_bos_and_cover_the_document():
    ids = list(range(10, 33))  # 23 tokens
    windows = document_windows(ids, bos_token_id=1, context=8)
    assert [len(w) for w in windows] == [8, 8, 8, 3]  # 7 + 7 + 7 + 2 body tokens, last one short
    assert all(w[0] == 1 for w in windows)
    assert np.concatenate([w[1:] for w in windows]).tolist() == ids
    # a tokenizer that adds BOS itself does not get a second one
    assert document_windows([1, 5, 6], bos_token_id=1, context=8)[0].tolist() == [1, 5, 6]
    assert document_windows([], bos_token_id=1, context=8) == []


def test_formats_give_the_same_documents(tmp_path):
    texts = ["first document", "second one\nwith two lines", "third"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)) + "\n")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(3)], "text": texts}), parquet)
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(texts) + "\n")
    for path in (jsonl, parquet, txt):
        docs = list(read_documents(path))
        assert [d.text.strip() for d in docs] == texts, path
        assert [d.ordinal for d in docs] == [0, 1, 2]
    assert [d.doc_id for d in read_documents(jsonl)] == ["d0", "d1", "d2"]
    assert [d.doc_id for d in read_documents(jsonl, skip=2)] == ["d2"]


def test_resume_position_skips_exactly(tmp_path):
    tokenizer = build_tokenizer()
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in CORPUS_TEXT))
    everything = list(iter_windows(path, tokenizer, tokenizer.bos_token_id, context=12))
    cut = 7
    resumed = list(iter_windows(path, tokenizer, tokenizer.bos_token_id, context=12,
                                skip_docs=everything[cut].doc_ordinal, skip_windows=everything[cut].window_in_doc))
    assert [(w.doc_ordinal, w.window_in_doc) for w in resumed] == [(w.doc_ordinal, w.window_in_doc) for w in everything[cut:]]
    assert all(np.array_equal(a.token_ids, b.token_ids) for a, b in zip(resumed, everything[cut:]))


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\nnot json\n', "not a JSON line"),
    (b'{"body": "no text field"}\n', "'text' field"),
    (b'{"text": "nul \\u0000 byte"}\n', "NUL"),
])
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        list(read_documents(path))


def test_bad_files(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        list(read_documents(tmp_path / "missing.jsonl"))
    with pytest.raises(CorpusError, match="directory"):
        list(read_documents(tmp_path))
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)))
    with pytest.raises(CorpusError, match="binary"):
        list(read_documents(blob))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="UTF-8"):
        list(read_documents(latin))
    no_text = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), no_text)
    with pytest.raises(CorpusError, match="no 'text' column"):
        list(read_documents(no_text))
