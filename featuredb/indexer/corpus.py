"""Corpus reading and context windows.

A corpus is a JSONL file (a `text` field, optional `id`), a Parquet file (a `text` column, optional
`id`), a plain text file (documents separated by blank lines) or a HuggingFace dataset name
(`hf:NAME[:CONFIG][@SPLIT]`, streamed). Each document is tokenized on its own and cut into windows of
`context` tokens that each start with BOS, so every window looks like the start of a document to the
model, as the coders saw in training. The final short window of a document is kept and padded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from featuredb.errors import CorpusError


@dataclass(frozen=True)
class Document:
    ordinal: int  # position in the corpus stream, used to resume without re-reading ids
    doc_id: str
    text: str


@dataclass(frozen=True)
class Window:
    doc_ordinal: int
    doc_id: str
    window_in_doc: int
    token_ids: np.ndarray  # [n] int64, n <= context, starts with BOS


def _check_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise CorpusError(f"{where}: the 'text' field is missing or not a string")
    if "\x00" in value:
        raise CorpusError(f"{where}: text holds NUL bytes (binary data?)")
    return value


def _read_jsonl(path: Path) -> Iterator[tuple[str, str]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CorpusError(f"{path}:{line_no}: not a JSON line ({type(e).__name__})") from None
            if not isinstance(record, dict):
                raise CorpusError(f"{path}:{line_no}: a JSON line must be an object with a 'text' field")
            text = _check_text(record.get("text"), f"{path}:{line_no}")
            doc_id = record.get("id", record.get("doc_id"))
            yield (str(doc_id) if doc_id is not None else f"{path.stem}:{line_no}"), text


def _read_parquet(path: Path) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e.__class__.__name__})") from None
    names = parquet.schema_arrow.names
    if "text" not in names:
        raise CorpusError(f"{path}: Parquet file has no 'text' column (columns: {', '.join(names)})")
    columns = ["text"] + (["id"] if "id" in names else [])
    row = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=1024):
        texts = batch.column("text").to_pylist()
        ids = batch.column("id").to_pylist() if "id" in columns else [None] * len(texts)
        for doc_id, text in zip(ids, texts):
            yield (str(doc_id) if doc_id is not None else f"{path.stem}:{row}"), _check_text(text, f"{path} row {row}")
            row += 1


def _read_text(path: Path) -> Iterator[tuple[str, str]]:
    raw = path.read_bytes()
    if b"\x00" in raw[:1 << 20]:
        raise CorpusError(f"{path}: looks binary (NUL bytes); expected UTF-8 text, JSONL or Parquet")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"{path}: not UTF-8 text") from None
    for i, paragraph in enumerate(p for p in text.split("\n\n") if p.strip()):
        yield f"{path.stem}:{i}", paragraph


def _read_hf_dataset(spec: str) -> Iterator[tuple[str, str]]:
    # hf:NAME[:CONFIG][@SPLIT]
    name = spec[len("hf:"):]
    name, _, split = name.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise CorpusError("reading a hub dataset needs the 'datasets' package: pip install 'featuredb[datasets]'") from None
    try:
        stream = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        for i, record in enumerate(stream):
            doc_id = record.get("id")
            yield (str(doc_id) if doc_id is not None else f"{name}:{i}"), _check_text(record.get("text"), f"{name} row {i}")
    except CorpusError:
        raise
    except Exception as e:
        raise CorpusError(f"cannot stream dataset '{name}': {str(e).splitlines()[0][:200]}") from None


def read_documents(spec: str | Path, skip: int = 0) -> Iterator[Document]:
    """Documents of a corpus in a fixed order; `skip` passes over the first documents (resume)."""
    spec = str(spec)
    if spec.startswith("hf:"):
        records = _read_hf_dataset(spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise CorpusError(f"corpus not found: {spec} (a .jsonl, .parquet or text file, or hf:DATASET)")
        if path.is_dir():
            raise CorpusError(f"corpus is a directory, expected a file: {spec}")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            records = _read_jsonl(path)
        elif suffix in (".parquet", ".pq"):
            records = _read_parquet(path)
        else:
            records = _read_text(path)
    for ordinal, (doc_id, text) in enumerate(records):
        if ordinal < skip:
            continue
        yield Document(ordinal, doc_id, text)


def document_windows(token_ids: list[int], bos_token_id: int, context: int) -> list[np.ndarray]:
    """Cut one document's tokens into windows of `context` tokens, each starting with BOS."""
    body = context - 1
    if token_ids and token_ids[0] == bos_token_id:  # a tokenizer that adds BOS by itself
        token_ids = token_ids[1:]
    return [
        np.asarray([bos_token_id] + token_ids[start:start + body], dtype=np.int64)
        for start in range(0, len(token_ids), body)
    ]


def iter_windows(
    spec: str | Path, tokenizer, bos_token_id: int, context: int, skip_docs: int = 0, skip_windows: int = 0
) -> Iterator[Window]:
    """All windows of the corpus, in order. Resuming starts at document `skip_docs`, window `skip_windows`."""
    if context < 2:
        raise CorpusError("context must be at least 2 tokens (BOS + one token)")
    for doc in read_documents(spec, skip=skip_docs):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        for w, window in enumerate(document_windows(ids, bos_token_id, context)):
            if doc.ordinal == skip_docs and w < skip_windows:
                continue
            yield Window(doc.ordinal, doc.doc_id, w, window)
