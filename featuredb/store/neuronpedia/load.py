"""Import a Neuronpedia export (layout and sidecar: see the package docstring) into a catalogue.

Import of a real Neuronpedia export (no sidecar) fills what it can: coder_id `{modelId}/{sourceId}`;
layer, site and kind from the source id, set name and hookName; width from the highest index (or
saelensConfig's d_sae); tokens/contexts indexed from source.jsonl (num_prompts x
num_tokens_in_prompt, else 0); active_count = round(frac_nonzero x tokens indexed); mean/std and
hist_counts re-binned from the frequency histogram; logit and example token ids -1 (unknown);
doc_id "" and context_index -1; top_tokens = the peak tokens of the top examples; explanations
become descriptions with method "llm" (with an explainer model) or "manual" (without),
explainer_source "neuronpedia" and prompt_version = typeName. Neuronpedia's embeddings are ignored
(another model), so imported features have no description vectors until they are embedded
(`embed=True`, or `featuredb describe`); keyword search works at once.

Safety: every source is read and validated completely (types, lengths, indices, row counts,
sidecar consistency; errors name the file and line) before anything of it is written. A coder is
then written all or nothing, in an order that keeps it unlisted until it is complete: a stored
version is unlisted and removed, its decoder vectors and descriptions are written, then
FeatureStore.write_coder writes examples, features and, last, the coders row (and `embed` embeds);
an error undoes every commit of the coder. Sources are imported one at a time, so an error in a
later source leaves earlier ones imported, each complete. A kill leaves the run's marker
(progress.py), and running the same import again finishes it, with the tables of an
uninterrupted import. Nothing is unpickled; only JSON is read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from featuredb.store.connect import connect
from featuredb.store.decoder_vectors import decoder_rows, delete_decoder_vectors, replace_decoder_rows
from featuredb.store.descriptions import (Embedder, append_descriptions, check_descriptions, descriptions_of_indexing,
                                          sync_features)
from featuredb.store.failures import Commits, all_or_nothing
from featuredb.store.feature_store import FeatureStore
from featuredb.store.filters import Filter
from featuredb.store.indexes import finalize
from featuredb.store.schema import (CODERS_TABLE, CONTEXTS_TABLE, DEFAULT_VECTOR_DIM, EXAMPLES_TABLE, FEATURES_TABLE,
                                    VOCABULARY_TABLE, StoreError, coders_schema, conform_table, contexts_schema,
                                    descriptions_schema, example_activations_schema, features_schema,
                                    imports_schema, vector_dim_of, vocabulary_schema)
from featuredb.store.neuronpedia.format import SIDECAR_DIR, progress_bar
from featuredb.store.neuronpedia.progress import ImportRun, claim, finish, import_run, may_replace, start
from featuredb.store.neuronpedia.read_source import ImportedCoder, read_source

T = TypeVar("T")


@dataclass
class ImportResult:
    coder_ids: list[str] = field(default_factory=list)
    features: int = 0
    examples: int = 0
    descriptions: int = 0
    decoder_vectors: int = 0
    embedded: int = 0  # features embedded by this import (embed=True)
    unembedded: int = 0  # described features left without a description vector
    sidecar: bool = True  # every source carried a featuredb sidecar (an exact round trip)
    seconds: float = 0.0


def import_neuronpedia(
    path: str | Path,
    db: str | Path,
    *,
    replace: bool = False,
    embedder: Embedder | None = None,
    embedding_model: str | None = None,
    progress: bool = False,
) -> ImportResult:
    """Load a Neuronpedia export (features, activations, explanations) into the catalogue at `db`.

    `path` is an export root, a model folder or one source folder. A coder already in `db` is only
    replaced with `replace=True`, or by a rerun of an import that was killed after it started to
    write that coder (progress.py). With an `embedder` (featuredb.runtime.embedding.embed) the
    imported descriptions are embedded with `embedding_model`; without one they are
    keyword-searchable only."""
    started = time.perf_counter()
    sources = _find_sources(Path(path))
    existing = _existing_store(db)
    run = import_run(existing, sources, replace)
    result = ImportResult()
    store: FeatureStore | None = None
    bar = progress_bar(None, "import", progress)
    try:
        for folder in sources:
            coder = read_source(folder, bar, run.imported_at)
            store = store or _writable_store(db, existing, coder.vector_dim)
            _write_imported(store, coder, run, embedder, embedding_model, result)
    except Exception:
        if store is not None:  # the failed coder is undone: the run is over, not to be resumed
            with contextlib.suppress(Exception):  # else the marker stays, and a rerun finishes the run
                finish(store, run)
        raise
    finally:
        bar.close()
    if store is not None:
        finalize(store)  # before the run ends: a rerun of a run killed while indexing indexes again
        finish(store, run)
    result.seconds = time.perf_counter() - started
    return result


def _find_sources(path: Path) -> list[Path]:
    """Source folders (holding `features/`) at `path`, or one or two levels below it."""
    if not path.is_dir():
        raise StoreError(f"import path {path} is not a directory")
    for depth in range(3):
        pattern = "/".join(["*"] * depth + ["features"]) if depth else "features"
        found = sorted(p.parent for p in path.glob(pattern) if p.is_dir() and p.parent.name != SIDECAR_DIR)
        if found:
            return found
    raise StoreError(f"no Neuronpedia source under {path} (expected {{modelId}}/{{sourceId}}/features/batch-N.jsonl.gz)")


def _existing_store(db: str | Path) -> FeatureStore | None:
    """The catalogue at `db` opened read-only, or None where there is none yet."""
    try:
        return FeatureStore(db, read_only=True)
    except StoreError:
        return None  # a new local catalogue


def _writable_store(db: str | Path, existing: FeatureStore | None, vector_dim: int | None) -> FeatureStore:
    """A writable store whose description-vector width matches the catalogue already there."""
    if existing is not None and FEATURES_TABLE in existing.table_names():
        vector_dim = vector_dim_of(existing.table(FEATURES_TABLE).schema)
    return FeatureStore(db, vector_dim=vector_dim or DEFAULT_VECTOR_DIM)


def _write_imported(store: FeatureStore, coder: ImportedCoder, run: ImportRun, embedder: Embedder | None,
                    embedding_model: str | None, result: ImportResult) -> None:
    """Write one coder, all or nothing. Its coders row is written last (by write_coder), after its
    decoder vectors and descriptions, and a stored version of it is unlisted first, so a reader
    sees the coder complete (old or new) or not at all."""
    coder_id = coder.row["coder_id"]
    if not may_replace(run, coder_id) and _is_listed(store, coder_id):
        raise StoreError(f"coder {coder_id!r} is already in {store.uri}; import with --replace to overwrite it")
    descriptions = _checked_descriptions(coder)
    decoders = None if coder.decoders is None else decoder_rows(coder.row, coder.decoders)
    new_descriptions = _not_yet_stored(store, coder_id, coder.row["created_at"], descriptions)
    start(store, run)
    claim(store, run, coder_id)
    with all_or_nothing(f"coder {coder_id!r}", store.uri) as commits:
        _ensure_coder_tables(store)
        _remove_coder(store, coder_id, commits)
        if decoders is not None:
            replace_decoder_rows(store, coder_id, decoders, commits)
        append_descriptions(store, new_descriptions, commits)
        # provenance before listing: an imported coder is never listed as if indexed here
        commits.commit(store.imports_table(), _record_import, coder_id, str(coder.folder))
        _recorded(store, commits, lambda: store.write_coder(coder.row, coder.features, coder.examples))
        if embedder is not None:
            synced = _recorded(store, commits, lambda: sync_features(store, coder_id, embedding_model=embedding_model,
                                                                     embedder=embedder))
            result.embedded += synced.embedded
    if embedder is None:
        described = pc.is_valid(coder.features["description"])
        result.unembedded += pc.sum(pc.and_(described, pc.is_null(coder.features["vector"]))).as_py() or 0
    result.coder_ids.append(coder_id)
    result.features += coder.features.num_rows
    result.examples += coder.examples.num_rows
    result.descriptions += descriptions.num_rows
    result.decoder_vectors += 0 if decoders is None else decoders.num_rows
    result.sidecar = result.sidecar and coder.sidecar


def _is_listed(store: FeatureStore, coder_id: str) -> bool:
    return store.coders().filter(pl.col("coder_id") == coder_id).height > 0


def _checked_descriptions(coder: ImportedCoder) -> pa.Table:
    """The coder's descriptions rows, checked against the coder before anything is written."""
    schema = descriptions_schema()
    table = conform_table({n: [r.get(n) for r in coder.descriptions] for n in schema.names}, schema,
                          f"{coder.folder}: descriptions")
    check_descriptions(table, coder.row["coder_id"], coder.row["created_at"], set(coder.features["feature"].to_pylist()))
    return table


def _not_yet_stored(store: FeatureStore, coder_id: str, indexed_at: dt.datetime, descriptions: pa.Table) -> pa.Table:
    """Drop rows already recorded for this indexing, so importing the same export again (or after a
    failed or killed attempt) does not duplicate descriptions."""
    key = ("feature", "description", "method", "created_at")
    stored = {tuple(r[k] for k in key) for r in descriptions_of_indexing(store, coder_id, indexed_at)}
    keep = [tuple(r[k] for k in key) not in stored for r in descriptions.to_pylist()]
    return descriptions.filter(pa.array(keep, pa.bool_()))


def _ensure_coder_tables(store: FeatureStore) -> None:
    """Create the coder tables where missing, so every commit to them can be undone by a restore."""
    db = connect(store.uri)
    for name, schema in _coder_table_schemas(store).items():
        db.create_table(name, schema=schema, exist_ok=True)


def _coder_table_schemas(store: FeatureStore) -> dict[str, pa.Schema]:
    return {CODERS_TABLE: coders_schema(), FEATURES_TABLE: store.schema(FEATURES_TABLE),
            EXAMPLES_TABLE: example_activations_schema(), CONTEXTS_TABLE: contexts_schema(),
            VOCABULARY_TABLE: vocabulary_schema()}


def _remove_coder(store: FeatureStore, coder_id: str, commits: Commits) -> None:
    """Remove what is stored of the coder, its coders row first (unlisting it): a replaced version,
    or what a killed attempt left."""
    for name in (CODERS_TABLE, FEATURES_TABLE, EXAMPLES_TABLE):  # contexts stay: other coders may show them
        commits.commit(store.table(name), _delete_rows, coder_id)
    delete_decoder_vectors(store, coder_id, commits)


def _record_import(table, coder_id: str, folder: str) -> None:
    table.merge_insert("coder_id").when_matched_update_all().when_not_matched_insert_all().execute(
        pa.table({"coder_id": [coder_id], "format": ["neuronpedia"], "path": [folder]}, schema=imports_schema()))


def _delete_rows(table, coder_id: str) -> None:
    table.delete(Filter().eq("coder_id", coder_id).render(table.schema))


def _recorded(store: FeatureStore, commits: Commits, write: Callable[[], T]) -> T:
    """`write()`, which commits to the coder tables itself (all or nothing), with its commits
    recorded in `commits` so that a later failure undoes them too."""
    tables = [store.table(name) for name in _coder_table_schemas(store)]  # handles that read the latest version
    versions = [table.version for table in tables]
    done = write()
    commits.made.extend((table, version) for table, version in zip(tables, versions) if table.version != version)
    return done
