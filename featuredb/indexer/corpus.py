"""Corpus reading and context windows.

A corpus is a JSONL file (a `text` field, optional `id`), a Parquet file (a `text` column, optional
`id`), a plain text file (documents separated by blank lines) or a HuggingFace dataset name
(`hf:NAME[:CONFIG][@SPLIT]`, streamed). Each document is tokenized on its own and cut into windows of
`context` tokens that each start with BOS, so every window looks like the start of a document to the
model, as the coders saw in training. The final short window of a document is kept and padded.

Memory follows the windows asked for, not the document: a long document is tokenized in pieces of
about PIECE_CHARS characters, and its windows are yielded as the pieces are tokenized, so a run that
stops after `--tokens` never tokenizes the rest. A piece ends just before a space that starts a word
(" word"): every pre-tokenizer in use (byte-level BPE regexes, SentencePiece's Metaspace, WordPiece)
starts a new pre-token there, and a vocabulary trained on whitespace-split words (Gemma's, applied to
the whole text) has no token that spans it, so the windows are exactly those of the whole document.
Only a text with no such space in PIECE_CHARS characters (CJK, minified data) is cut between two
characters, where the tokens around that seam may differ from tokenizing it whole.

A tokenizer that cannot read the corpus (a model directory's stub tokenizer, a vocabulary without the
corpus' script) turns it into <unk>: more than half unknown tokens in the first UNK_SAMPLE_TOKENS
tokens of the run (or the whole of a shorter corpus) is a CorpusError, before any window is yielded.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from featuredb.errors import CorpusError

PIECE_CHARS = 1 << 16  # ~16k tokens of English per tokenizer call
UNK_SAMPLE_TOKENS = 1024
UNK_MAX_SHARE = 0.5


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
    _refuse_surrogates(value, "text", where)
    return value


def _check_id(value, fallback: str, where: str) -> str:
    """The document id as text (`fallback` when there is none); it goes into the catalogue as UTF-8."""
    if value is None:
        return fallback
    return _refuse_surrogates(str(value), "id", where)


def _refuse_surrogates(value: str, field: str, where: str) -> str:
    # A JSON "\ud800" escape decodes to a lone surrogate, which no UTF-8 writer (tokenizer, Arrow) accepts.
    # Refused with file:line: replacing it would store text that is not what the file says.
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        char = f"U+{ord(value[e.start]):04X}"
        raise CorpusError(f"{where}: {field} holds a lone surrogate {char} at character {e.start}, not Unicode") from None
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
            where = f"{path}:{line_no}"
            text = _check_text(record.get("text"), where)
            yield _check_id(record.get("id", record.get("doc_id")), f"{path.stem}:{line_no}", where), text


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
        texts = _column_values(batch.column("text"), path, row)
        ids = _column_values(batch.column("id"), path, row) if "id" in columns else [None] * len(texts)
        for doc_id, text in zip(ids, texts):
            where = f"{path} row {row}"
            yield _check_id(doc_id, f"{path.stem}:{row}", where), _check_text(text, where)
            row += 1


def _column_values(column, path: Path, first_row: int) -> list:
    """A column of one batch as Python values. Arrow does not check that a Parquet string column is
    UTF-8 when it reads one, so invalid bytes surface here: a CorpusError naming the row."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError as e:
        error, row = e, first_row
    for i in range(len(column)):  # find the row to name
        try:
            column[i].as_py()
        except UnicodeDecodeError as e:
            error, row = e, first_row + i
            break
    raise CorpusError(f"{path} row {row}: not valid UTF-8 ({error.reason} at byte {error.start})")


def _read_text(path: Path) -> Iterator[tuple[str, str]]:
    raw = path.read_bytes()
    if b"\x00" in raw[:1 << 20]:
        raise CorpusError(f"{path}: looks binary (NUL bytes); expected UTF-8 text, JSONL or Parquet")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise CorpusError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
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
            where = f"{name} row {i}"
            yield _check_id(record.get("id"), f"{name}:{i}", where), _check_text(record.get("text"), where)
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


def text_pieces(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most about `piece_chars` characters, each after the first
    starting with a space that starts a word (see the module doc); "".join(pieces) == text."""
    start = 0
    while len(text) - start > piece_chars:
        cut = _word_start(text, start, start + piece_chars)
        yield text[start:cut]
        start = cut
    if start < len(text) or not text:
        yield text[start:]


def _word_start(text: str, start: int, end: int) -> int:
    """The last i in (start, end] where text[i] is a space between a non-space and a letter or digit;
    failing that, end moved back off combining marks (they belong to the character before)."""
    i = text.rfind(" ", start + 1, end + 1)
    while i > start:
        if i + 1 < len(text) and not text[i - 1].isspace() and text[i + 1].isalnum():
            return i
        i = text.rfind(" ", start + 1, i)
    while end > start + 1 and unicodedata.combining(text[end]):
        end -= 1
    return end


def stream_windows(pieces: Iterable[list[int]], bos_token_id: int, context: int) -> Iterator[np.ndarray]:
    """Windows of `context` tokens, each starting with BOS, over one document's token pieces, yielded as
    soon as each is full; the last, short one at the end."""
    body = context - 1
    pending = np.empty(0, dtype=np.int64)
    started = False
    for ids in pieces:
        ids = np.asarray(ids, dtype=np.int64)
        if not started and len(ids):
            started = True
            if ids[0] == bos_token_id:  # a tokenizer that adds BOS by itself
                ids = ids[1:]
        pending = np.concatenate([pending, ids])
        full = len(pending) // body * body
        for start in range(0, full, body):
            yield _window(bos_token_id, pending[start:start + body])
        pending = pending[full:]
    if len(pending):
        yield _window(bos_token_id, pending)


def _window(bos_token_id: int, body: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray([bos_token_id], dtype=np.int64), body])


def document_windows(token_ids: list[int], bos_token_id: int, context: int) -> list[np.ndarray]:
    """Cut one document's tokens into windows of `context` tokens, each starting with BOS."""
    return list(stream_windows([token_ids], bos_token_id, context))


class UnknownTokenGuard:
    """Counts the tokenizer's unknown token over the first UNK_SAMPLE_TOKENS tokens and refuses a
    corpus it mostly cannot read. A tokenizer without an unknown token (byte-level) always passes."""

    def __init__(self, tokenizer, spec: str | Path) -> None:
        self.unk_id = getattr(tokenizer, "unk_token_id", None)
        self.unk_token = getattr(tokenizer, "unk_token", None)
        self.spec = spec
        self.seen = self.unknown = 0
        self.decided = self.unk_id is None

    def observe(self, ids: list[int]) -> list[int]:
        if not self.decided:
            self.seen += len(ids)
            self.unknown += sum(1 for i in ids if i == self.unk_id)
            if self.seen >= UNK_SAMPLE_TOKENS:
                self.decide()
        return ids

    def decide(self) -> None:
        self.decided = True
        if self.seen and self.unknown / self.seen > UNK_MAX_SHARE:
            raise CorpusError(
                f"{self.spec}: {self.unknown / self.seen:.0%} of the first {self.seen} tokens are the tokenizer's "
                f"unknown token {self.unk_token!r}: this tokenizer cannot read the corpus (wrong model, or a "
                "model directory without its real tokenizer files)"
            )


def iter_windows(
    spec: str | Path, tokenizer, bos_token_id: int, context: int, skip_docs: int = 0, skip_windows: int = 0,
    piece_chars: int = PIECE_CHARS,
) -> Iterator[Window]:
    """All windows of the corpus, in order. Resuming starts at document `skip_docs`, window `skip_windows`."""
    if context < 2:
        raise CorpusError("context must be at least 2 tokens (BOS + one token)")
    guard = UnknownTokenGuard(tokenizer, spec)
    held: list[Window] = []  # windows read before the guard has decided
    for doc in read_documents(spec, skip=skip_docs):
        pieces = (guard.observe(tokenizer(piece, add_special_tokens=False)["input_ids"])
                  for piece in text_pieces(doc.text, piece_chars))
        for w, tokens in enumerate(stream_windows(pieces, bos_token_id, context)):
            if doc.ordinal == skip_docs and w < skip_windows:
                continue
            held.append(Window(doc.ordinal, doc.doc_id, w, tokens))
            if guard.decided:
                yield from held
                held.clear()
    guard.decide()
    yield from held
