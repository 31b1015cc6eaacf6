"""Index management for a catalogue: vector, full-text and scalar indexes.

- features.vector and decoders_<d>.vector: IVF-RQ (RaBitQ, 4 bits per dimension, cosine, about
  8k rows per partition) once a table holds MIN_VECTOR_INDEX_ROWS vectors; below that, exact
  search is as fast and needs no upkeep. Queries refine the index's candidates with exact
  distances. IVF-RQ measured better than IVF-PQ here: at 1M rows the same recall@10 with a 5x
  faster build (28 s vs 151 s), see docs/benchmarks.md.
- features.description: a full-text (BM25) index (LanceDB's native FTS) that keeps every word:
  no stop-word removal and no stemming, because descriptions quote tokens (' not', ' if', 'def')
  and a token-level word must be findable as itself. Symbols cannot be terms of LanceDB's word
  tokenizer, so descriptions name them ("left parenthesis") and `keyword_terms` turns a symbol in
  a keyword query into the same name (`SYMBOL_NAMES`, the one vocabulary both sides use).
- scalar indexes on the filter and lookup columns (bitmap for the coder columns, btree for the
  feature index), so filters run inside the index and `feature()` is a lookup.

`create_indexes` builds what is missing (or everything, with replace=True); `optimize` folds rows
added since into the indexes, compacts files, rebuilds a vector index whose partitions the table
has outgrown, and then creates what is missing. Call `finalize(db)` after writing coders.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from datetime import timedelta
from typing import Any

from lancedb.index import FTS, BTree, Bitmap, IvfPq, IvfRq

from featuredb.store import EXAMPLES_TABLE, FEATURES_TABLE, FeatureStore
from featuredb.store.failures import writing
from featuredb.store.schema import CONTEXTS_TABLE, MAP_TABLE, is_decoders_table
from featuredb.errors import one_line
from featuredb.errors import QueryError

# Measured by scripts/bench_query.py (docs/benchmarks.md).
MIN_VECTOR_INDEX_ROWS = 50_000  # below this, exact search is fast and k-means has too little to cluster
TARGET_PARTITION_ROWS = 8192
RQ_BITS = 4  # 4-bit RaBitQ codes rank candidates well enough that refining 5x the limit suffices
VECTOR_INDEX_KINDS = ("ivf_pq", "ivf_rq")
DEFAULT_VECTOR_INDEX = "ivf_rq"
_VECTOR_NAME = re.compile(r"^vector_(ivf_pq|ivf_rq)_p([0-9]+)$")

# The full-text index of descriptions: word tokens, lower-cased, ASCII-folded, every word kept and
# none stemmed. An index built with other options (LanceDB's defaults drop "not", "if", "and") is
# rebuilt by the next `create_indexes` / `finalize`: LanceDB records the options in index_details.
FTS_OPTIONS: dict[str, Any] = {"base_tokenizer": "simple", "lower_case": True, "stem": False,
                               "remove_stop_words": False, "ascii_folding": True}


def description_fts() -> FTS:
    return FTS(**FTS_OPTIONS)


def _fts_is_current(table) -> bool:
    for cfg in table.list_indices():
        if list(cfg.columns) == ["description"]:
            details = getattr(cfg, "index_details", None) or {}
            return all(details.get(k) == v for k, v in FTS_OPTIONS.items())
    return False


# Everyday names first (what people type), then the Unicode name. Unicode's names alone are
# often not what anyone searches for ("FULL STOP", "LOW LINE", "SOLIDUS").
SYMBOL_NAMES: dict[str, str] = {
    "=": "equals sign", "(": "left parenthesis (opening bracket)", ")": "right parenthesis (closing bracket)",
    "[": "left square bracket (opening bracket)", "]": "right square bracket (closing bracket)",
    "{": "left curly brace (opening bracket)", "}": "right curly brace (closing bracket)",
    ".": "full stop (period, dot)", ",": "comma", ":": "colon", ";": "semicolon",
    "_": "underscore (low line)", "/": "slash (solidus)", "\\": "backslash (reverse solidus)",
    "#": "hash sign (number sign)", "@": "at sign", "*": "asterisk (star)", "-": "hyphen (minus sign, dash)",
    "+": "plus sign", "%": "percent sign", "&": "ampersand", "|": "vertical bar (pipe)", "^": "caret",
    "~": "tilde", "!": "exclamation mark", "?": "question mark", "<": "less-than sign (left angle bracket)",
    ">": "greater-than sign (right angle bracket)", "'": "apostrophe (single quote)",
    '"': "quotation mark (double quote)", "`": "backtick (grave accent)", "$": "dollar sign",
}



def char_name(ch: str) -> str:
    """A symbol's everyday name, else its Unicode name in lower case ('ellipsis', 'em dash')."""
    if ch in SYMBOL_NAMES:
        return SYMBOL_NAMES[ch]
    try:
        return unicodedata.name(ch).lower()
    except ValueError:
        return f"U+{ord(ch):04X}"


def short_char_name(ch: str) -> str:
    """The name without its parenthesised alternatives: 'full stop'."""
    return char_name(ch).split(" (")[0]


def symbol_names(text: str) -> list[str]:
    """Distinct names of the symbol characters in `text`, in order."""
    names: list[str] = []
    for ch in text:
        if ch.isspace() or ch.isalnum():
            continue
        name = char_name(ch)
        if name not in names:
            names.append(name)
    return names


def keyword_terms(text: str) -> str:
    """A keyword query as the full-text index can match it. A chunk made only of symbols ("(",
    "'=='") becomes their short names ("left parenthesis"), the words the descriptions carry for
    the symbols they quote, since the index's word tokenizer drops symbols; a plural word also
    brings its singular; everything else passes through unchanged (the tokenizer splits it as it
    split the descriptions)."""
    out: list[str] = []
    for chunk in text.split():
        bare = chunk[1:-1] if len(chunk) > 2 and chunk[0] == chunk[-1] and chunk[0] in "'\"`" else chunk
        if any(ch.isalnum() for ch in bare):
            out.append(chunk)
            out.extend(_singular(chunk))
        else:
            out.extend(short_char_name(ch) for ch in dict.fromkeys(bare))
    return " ".join(out)


def _singular(word: str) -> list[str]:
    """The singular of a plural query word, added beside it: the index stems nothing (so ' not'
    and ' is' stay findable), and "prepositions" must still find "preposition". Query-side only,
    and only added: the word itself is always searched too."""
    if not word.isalpha() or len(word) <= 3 or not word.lower().endswith("s") or word.lower().endswith("ss"):
        return []
    if word.lower().endswith("ies"):
        return [word[:-3] + "y"]
    return [word[:-1]]


_SCALAR: dict[str, dict[str, type]] = {
    # No index on density / max_activation: a range that keeps most rows is slower through a btree
    # (an allow-list of millions of ids) than checked on the rows the other conditions keep.
    FEATURES_TABLE: {"coder_id": Bitmap, "layer": Bitmap, "site": Bitmap, "model": Bitmap, "hook": Bitmap,
                     "feature": BTree},
    EXAMPLES_TABLE: {"coder_id": Bitmap, "kind": Bitmap, "feature": BTree, "peak_token": BTree},
    CONTEXTS_TABLE: {"context_key": BTree},
    "decoders": {"coder_id": Bitmap, "model": Bitmap, "space": Bitmap, "layer": Bitmap, "site": Bitmap,
                 "hook": Bitmap, "feature": BTree},
}


def _store(db: FeatureStore | str | Any) -> FeatureStore:
    return db if isinstance(db, FeatureStore) else FeatureStore(db, read_only=True)


def _tables(store: FeatureStore) -> list[str]:
    names = store.table_names()
    return [n for n in names if n in (FEATURES_TABLE, EXAMPLES_TABLE, CONTEXTS_TABLE) or is_decoders_table(n)]


def _indexed_columns(table) -> dict[str, str]:
    """column -> index name, for single-column indexes."""
    return {cfg.columns[0]: cfg.name for cfg in table.list_indices() if len(cfg.columns) == 1}


def vector_config(kind: str, partitions: int, dim: int):
    if kind == "ivf_pq":
        # 8 dimensions per sub-vector: 48 sub-vectors for 384-d embeddings
        sub_vectors = dim // 8 if dim % 8 == 0 else (dim // 16 if dim % 16 == 0 else 1)
        return IvfPq(distance_type="cosine", num_partitions=partitions, num_sub_vectors=sub_vectors)
    if kind == "ivf_rq":
        return IvfRq(distance_type="cosine", num_partitions=partitions, num_bits=RQ_BITS)
    raise QueryError(f"unknown vector index kind {kind!r} (one of {', '.join(VECTOR_INDEX_KINDS)})")


def _vector_rows(table, min_rows: int = MIN_VECTOR_INDEX_ROWS) -> int:
    """Rows that have a vector (constant predicates, no user input). Decoder vectors are never
    null; described features carry their embedding model beside the vector, and counting that
    small column is ~100x faster than the vectors' validity (0.08 s vs 7.6 s at 10M rows)."""
    if "embedding_model" not in table.schema.names:
        return table.count_rows()
    described = table.count_rows("`embedding_model` IS NOT NULL")
    return described if described >= min_rows else table.count_rows("`vector` IS NOT NULL")


def create_indexes(db: FeatureStore | str, *, vector_index: str = DEFAULT_VECTOR_INDEX, replace: bool = False,
                   min_vector_rows: int = MIN_VECTOR_INDEX_ROWS, partitions: int | None = None) -> dict[str, list[str]]:
    """Create the catalogue's indexes; existing ones are kept unless replace=True.

    Returns {table: [names of the indexes created]}."""
    if vector_index not in VECTOR_INDEX_KINDS:
        raise QueryError(f"unknown vector index kind {vector_index!r} (one of {', '.join(VECTOR_INDEX_KINDS)})")
    store = _store(db)
    created: dict[str, list[str]] = {}
    for name in _tables(store):
        table = store.table(name)
        made: list[str] = []
        if table.count_rows() == 0:
            created[name] = made
            continue
        existing = _indexed_columns(table)
        scalar = _SCALAR["decoders" if is_decoders_table(name) else name]
        for column, config in scalar.items():
            if column in existing and not replace:
                continue
            _create(table, column, config(), replace, made)
        if name == FEATURES_TABLE and (replace or not _fts_is_current(table)):
            _create(table, "description", description_fts(), True, made)
        if (name == FEATURES_TABLE or is_decoders_table(name)) and ("vector" not in existing or replace):
            _create_vector_index(table, name, existing, vector_index, min_vector_rows, partitions, made)
        created[name] = made
    return created


def _create_vector_index(table, name: str, existing: dict[str, str], kind: str, min_rows: int,
                         partitions: int | None, made: list[str]) -> None:
    rows = _vector_rows(table, min_rows)
    if rows < min_rows:
        return
    parts = partitions or max(1, round(rows / TARGET_PARTITION_ROWS))
    dim = table.schema.field("vector").type.list_size
    index_name = f"vector_{kind}_p{parts}"
    if "vector" in existing:
        table.drop_index(existing["vector"])
    try:
        table.create_index("vector", config=vector_config(kind, parts, dim), name=index_name, replace=True)
    except Exception as e:
        raise QueryError(f"building the vector index of {name!r} failed: {one_line(e)}") from None
    made.append(index_name)


def _create(table, column: str, config, replace: bool, made: list[str]) -> None:
    try:
        table.create_index(column, config=config, replace=replace)
    except Exception as e:
        raise QueryError(f"building the {type(config).__name__} index on {column!r} failed: {one_line(e)}") from None
    made.append(f"{column}_idx")


def optimize(db: FeatureStore | str, *, cleanup_older_than: timedelta | None = None,
             vector_index: str = DEFAULT_VECTOR_INDEX, min_vector_rows: int = MIN_VECTOR_INDEX_ROWS) -> dict[str, list[str]]:
    """Bring the indexes up to date after rows were added, updated or deleted.

    Compacts files and adds new rows to every existing index (LanceDB's optimize); rebuilds a
    vector index when the table has grown to twice the rows its partitions were trained for;
    then creates indexes that are missing (e.g. a vector index once the table is large enough).
    Returns {table: [names of the indexes created or rebuilt]}."""
    store = _store(db)
    rebuilt: dict[str, list[str]] = {}
    if cleanup_older_than is not None:  # the tables without indexes get compacted and cleaned up too
        for name in sorted(set(store.table_names()) - set(_tables(store))):
            with writing(f"the files of table {name!r}", store.uri):
                _optimize_files(store.table(name), cleanup_older_than)
    for name in _tables(store):
        table = store.table(name)
        with writing(f"the indexes of table {name!r}", store.uri):
            if _needs_optimize(table, cleanup_older_than):
                _optimize_files(table, cleanup_older_than)
            existing = _indexed_columns(table)
            match = _VECTOR_NAME.match(existing.get("vector", ""))
            if match:
                trained = int(match.group(2))
                rows = _vector_rows(table)
                wanted = max(1, round(rows / TARGET_PARTITION_ROWS))
                if wanted >= 2 * trained:  # partitions trained on far fewer rows: retrain
                    index_name = f"vector_{match.group(1)}_p{wanted}"
                    dim = table.schema.field("vector").type.list_size
                    table.drop_index(existing["vector"])
                    table.create_index("vector", config=vector_config(match.group(1), wanted, dim), name=index_name,
                                       replace=True)
                    rebuilt.setdefault(name, []).append(index_name)
    created = create_indexes(store, vector_index=vector_index, min_vector_rows=min_vector_rows)
    for name, made in created.items():
        rebuilt.setdefault(name, []).extend(made)
    return rebuilt


def _optimize_files(table, cleanup_older_than: timedelta | None) -> None:
    with warnings.catch_warnings():  # LanceDB warns of what a caller asking for 0 has already weighed
        warnings.simplefilter("ignore", UserWarning)
        table.optimize(cleanup_older_than=cleanup_older_than)


def _needs_optimize(table, cleanup_older_than: timedelta | None) -> bool:
    """Only when an index misses rows, files are fragmented, or old versions are to go: LanceDB's
    optimize is not free even with nothing to do (minutes at 10M rows, measured)."""
    if cleanup_older_than is not None:
        return True
    indices = list(table.list_indices())
    if not indices:
        return False
    if any(getattr(i, "num_unindexed_rows", 0) for i in indices):
        return True
    try:
        return bool(table.stats()["fragment_stats"]["num_small_fragments"])
    except Exception:  # stats shape differs between LanceDB versions: optimize to be safe
        return True


# Old table versions (every commit leaves one) are removed once they are this old: a query reading
# one of them, even a long export scan, has long finished. The demo, which owns its catalogue,
# removes them at once.
READER_GRACE = timedelta(minutes=10)


def finalize(db: FeatureStore | str, cleanup_older_than: timedelta | None = READER_GRACE, *,
             feature_map: bool = False) -> dict[str, list[str]]:
    """After a run wrote coders (or descriptions): create missing indexes, fold new rows into the
    rest, compact the files, remove table versions older than `cleanup_older_than`, then map the
    features not on the map yet when feature_map=True and umap-learn is installed
    (store/feature_map.py; off by default: UMAP's first call in a process compiles for minutes
    whatever the size, so `featuredb map` and the demo ask for it). Returns {table: [what was built]}."""
    from featuredb.store.feature_map import update_map, umap_available

    built = optimize(db, cleanup_older_than=cleanup_older_than)  # first: a map that fails leaves the indexes built
    if feature_map and umap_available():
        groups = update_map(_writable(db)).groups
        if groups:
            built[MAP_TABLE] = [f"{g['features']:,} features of {g['space']} mapped in {g['seconds']:.0f}s"
                                for g in groups]
    return built


def _writable(db: FeatureStore | str | Any) -> FeatureStore:
    if isinstance(db, FeatureStore):
        return db if not db.read_only else FeatureStore(db.uri)
    return FeatureStore(str(db))


def index_summary(db: FeatureStore | str) -> dict[str, list[dict]]:
    """Per table: its indexes with indexed / unindexed row counts."""
    store = _store(db)
    out: dict[str, list[dict]] = {}
    for name in _tables(store):
        table = store.table(name)
        out[name] = [
            {"name": cfg.name, "type": str(cfg.index_type), "columns": list(cfg.columns),
             "indexed_rows": getattr(cfg, "num_indexed_rows", None),
             "unindexed_rows": getattr(cfg, "num_unindexed_rows", None)}
            for cfg in table.list_indices()
        ]
    return out


__all__ = ["FTS_OPTIONS", "MIN_VECTOR_INDEX_ROWS", "SYMBOL_NAMES", "char_name", "description_fts", "keyword_terms",
           "short_char_name", "symbol_names", "TARGET_PARTITION_ROWS", "create_indexes", "finalize",
           "index_summary", "optimize"]
