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
sidecar consistency; errors name the file and line) before anything of it is written; a coder is
written with FeatureStore.write_coder (all-or-nothing), then its descriptions and decoder vectors.
Sources are imported one at a time, so an error in a later source leaves earlier ones imported,
each complete. Nothing is unpickled; only JSON is read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from featuredb.store.decoder_vectors import write_decoder_vectors
from featuredb.store.descriptions import Embedder, current_descriptions, sync_features, write_descriptions
from featuredb.store.feature_store import FeatureStore
from featuredb.store.schema import (DEFAULT_VECTOR_DIM, FEATURES_TABLE, StoreError, conform_table, descriptions_schema,
                                    vector_dim_of)
from featuredb.store.neuronpedia.format import SIDECAR_DIR, progress_bar
from featuredb.store.neuronpedia.read_source import ImportedCoder, read_source


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
    replaced with `replace=True`. With an `embedder` (featuredb.runtime.embedding.embed) the imported
    descriptions are embedded with `embedding_model`; without one they are keyword-searchable only."""
    started = time.perf_counter()
    sources = _find_sources(Path(path))
    result = ImportResult()
    store: FeatureStore | None = None
    bar = progress_bar(None, "import", progress)
    try:
        for folder in sources:
            coder = read_source(folder, bar)
            store = store or _open_store(db, coder.vector_dim)
            _write_imported(store, coder, replace, embedder, embedding_model, result)
    finally:
        bar.close()
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


def _open_store(db: str | Path, vector_dim: int | None) -> FeatureStore:
    """A writable store whose description-vector width matches the catalogue already there."""
    try:
        existing = FeatureStore(db, read_only=True)
    except StoreError:
        existing = None  # a new local catalogue
    if existing is not None and FEATURES_TABLE in existing.table_names():
        vector_dim = vector_dim_of(existing.table(FEATURES_TABLE).schema)
    return FeatureStore(db, vector_dim=vector_dim or DEFAULT_VECTOR_DIM)


def _write_imported(store: FeatureStore, coder: ImportedCoder, replace: bool, embedder: Embedder | None,
                    embedding_model: str | None, result: ImportResult) -> None:
    coder_id = coder.row["coder_id"]
    exists = store.coders().filter(pl.col("coder_id") == coder_id).height > 0
    if exists and not replace:
        raise StoreError(f"coder {coder_id!r} is already in {store.uri}; import with --replace to overwrite it")
    descriptions = conform_table({n: [r[n] for r in coder.descriptions] for n in descriptions_schema().names},
                                 descriptions_schema(), f"{coder.folder}: descriptions")
    store.write_coder(coder.row, coder.features, coder.examples)
    try:
        descriptions = _not_yet_stored(store, coder_id, descriptions)
        write_descriptions(store, coder_id, descriptions, sync=False)
        if coder.decoders is not None:
            result.decoder_vectors += write_decoder_vectors(store, coder_id, coder.decoders)
        if embedder is not None:
            result.embedded += sync_features(store, coder_id, embedding_model=embedding_model,
                                             embedder=embedder).embedded
    except Exception:
        if not exists:  # leave no half-imported coder behind
            store.delete_coder(coder_id)
        raise
    if embedder is None:
        described = pc.is_valid(coder.features["description"])
        result.unembedded += pc.sum(pc.and_(described, pc.is_null(coder.features["vector"]))).as_py() or 0
    result.coder_ids.append(coder_id)
    result.features += coder.features.num_rows
    result.examples += coder.examples.num_rows
    result.descriptions += descriptions.num_rows
    result.sidecar = result.sidecar and coder.sidecar


def _not_yet_stored(store: FeatureStore, coder_id: str, descriptions: pa.Table) -> pa.Table:
    """Drop rows already recorded for this indexing, so importing the same export again (or after a
    failed attempt) does not duplicate descriptions."""
    key = ("feature", "description", "method", "created_at")
    stored = {tuple(r[k] for k in key) for r in current_descriptions(store, coder_id)}
    keep = [tuple(r[k] for k in key) not in stored for r in descriptions.to_pylist()]
    return descriptions.filter(pa.array(keep, pa.bool_()))
