import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featuredb.indexer.corpus import CorpusError, document_windows, iter_windows, read_documents, text_pieces

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


# --- long documents: tokenized in bounded pieces, windows exactly as if tokenized whole ------------

LONG_TEXT = " ".join(CORPUS_TEXT * 6) + " naïve café  déjà-vu\t42, 1234567 — l'été's \"quotes\" (x)!\n\nend."
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def trained_tokenizer(kind: str):
    """Small offline tokenizers of the families in use: GPT-2 / Llama 3 byte-level BPE, SentencePiece
    (Metaspace unigram; Gemma's BPE over the whole ▁-joined text), WordPiece."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "byte_level":
        return build_tokenizer()
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials)
    elif kind.startswith("metaspace"):
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=kind.split("_")[1])
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>")
    elif kind == "llama3":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # gemma: trained on words (SentencePiece splits by whitespace), applied to the whole text
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials)
    tok.train_from_iterator([LONG_TEXT] * 4, trainer)
    if kind == "gemma":
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")  # as transformers builds it
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def whole_document_windows(tokenizer, text: str, context: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [w.tolist() for w in document_windows(ids, tokenizer.bos_token_id, context)]


@pytest.mark.parametrize("kind", ["byte_level", "llama3", "metaspace_always", "metaspace_first", "wordpiece", "gemma"])
@pytest.mark.parametrize("piece_chars", [40, 333, 1000])
def test_pieces_give_exactly_the_windows_of_the_whole_document(tmp_path, kind, piece_chars):
    tokenizer = trained_tokenizer(kind)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": LONG_TEXT}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    pieces = list(text_pieces(LONG_TEXT, piece_chars))
    assert "".join(pieces) == LONG_TEXT and len(pieces) > len(LONG_TEXT) // (piece_chars + 20)
    assert all(p.startswith(" ") and len(p) <= piece_chars for p in pieces[1:])  # cut before words only
    windows = list(iter_windows(path, tokenizer, tokenizer.bos_token_id, context=10, piece_chars=piece_chars))
    expected = whole_document_windows(tokenizer, LONG_TEXT, 10) + whole_document_windows(tokenizer, "short one", 10)
    assert [w.token_ids.tolist() for w in windows] == expected
    assert [(w.doc_ordinal, w.window_in_doc) for w in windows][-1] == (1, 0)


def test_ordinary_documents_are_one_piece_and_their_windows_unchanged(corpus_jsonl):
    tokenizer = build_tokenizer()
    windows = list(iter_windows(corpus_jsonl, tokenizer, tokenizer.bos_token_id, context=8))
    expected = [w for text in CORPUS_TEXT for w in whole_document_windows(tokenizer, text, 8)]
    assert [w.token_ids.tolist() for w in windows] == expected
    assert all(list(text_pieces(text)) == [text] for text in CORPUS_TEXT)


def test_text_without_spaces_is_cut_between_characters_not_inside_one():
    text = "漢字かな" * 50 + "e\u0301" * 30  # no space at all; e + combining acute must stay together
    pieces = list(text_pieces(text, 7))
    assert "".join(pieces) == text
    assert all(len(p) <= 7 for p in pieces)
    assert not any(p[0] == "\u0301" for p in pieces)


class CountingTokenizer:
    """Wraps a tokenizer and counts the characters handed to it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.chars, self.longest = tokenizer, 0, 0
        self.unk_token_id, self.unk_token = tokenizer.unk_token_id, tokenizer.unk_token

    def __call__(self, text: str, **kwargs):
        self.chars += len(text)
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)


def test_a_long_document_is_tokenized_only_as_far_as_the_windows_taken(tmp_path):
    from itertools import islice

    from featuredb.indexer.corpus import PIECE_CHARS

    text = LONG_TEXT * 3000  # ~3.6 MB, one document
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    tokenizer = CountingTokenizer(build_tokenizer())
    taken = list(islice(iter_windows(path, tokenizer, 1, context=64), 50))  # ~3k tokens, as --tokens 3000
    assert len(taken) == 50
    assert tokenizer.longest <= PIECE_CHARS
    assert tokenizer.chars <= 2 * PIECE_CHARS < len(text) // 20


# --- a tokenizer that cannot read the corpus -----------------------------------------------------


def write_texts(path, texts: list[str]):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_a_corpus_mostly_unknown_to_the_tokenizer_is_refused_with_the_share(tmp_path):
    tokenizer = trained_tokenizer("wordpiece")  # knows the English test corpus only
    greek = write_texts(tmp_path / "greek.jsonl", ["Ένα δύο τρία τέσσερα πέντε έξι επτά οκτώ."] * 200)
    windows = iter_windows(greek, tokenizer, tokenizer.bos_token_id, context=16)
    with pytest.raises(CorpusError, match=r"greek.jsonl: (8\d|9\d|100)% of the first \d+ tokens are the tokenizer's "
                                          r"unknown token '<unk>'") as error:
        next(windows)  # refused before the first window
    assert "\n" not in str(error.value)
    # a short corpus is judged on all of it, at its end
    short = write_texts(tmp_path / "short.jsonl", ["Ένα δύο τρία τέσσερα", "The cat sat"])
    with pytest.raises(CorpusError, match=r"short.jsonl: 57% of the first 7 tokens"):
        list(iter_windows(short, tokenizer, tokenizer.bos_token_id, context=16))


def test_some_unknown_tokens_are_fine(tmp_path):
    tokenizer = trained_tokenizer("wordpiece")
    texts = ["The cat sat on the mat. Ένα δύο. The dog sat on the log."] * 100  # ~15% unknown
    windows = list(iter_windows(write_texts(tmp_path / "c.jsonl", texts), tokenizer, tokenizer.bos_token_id, 16))
    assert len(windows) >= 100
    unk = sum((w.token_ids == tokenizer.unk_token_id).sum() for w in windows)
    assert 0 < unk < 0.5 * sum(len(w.token_ids) for w in windows)


@pytest.mark.slow
def test_memory_of_a_30_mb_document_follows_the_tokens_asked_for():
    """scripts/measure_corpus_memory.py: 6.5 GB peak RSS before pieces, ~0.6 GB after (tiny model)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "measure_corpus_memory.py"
    done = subprocess.run([sys.executable, str(script), "--megabytes", "30", "--tokens", "3000"],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1])["peak_rss_mib"] < 1500
