"""Export a catalogue in Neuronpedia's dataset format, and import such an export.

Layout (as Neuronpedia publishes its datasets, one folder per source):

    OUT/{modelId}/{sourceId}/model.jsonl, release.jsonl, sourceset.jsonl, source.jsonl
    OUT/{modelId}/{sourceId}/features|activations|explanations/batch-N.jsonl.gz
    OUT/{modelId}/{sourceId}/featuredb/...            (our sidecar, see below)

A coder (`saes` row) is a source `{layer}-{sourceSetName}`; the set name is derived from the
sae_id without its layer part (`smollm2-res-L15-w4096-k32` -> `smollm2-res-w4096-k32`), the model
id from the model name (`google/gemma-2-2b` -> `gemma-2-2b`); both can be overridden. Batch N of
each kind holds the rows of the same `batch_size` features (1024, as Neuronpedia's exports).

Field mapping (Neuronpedia <- ours):
- Neuron: maxActApprox <- max_activation, frac_nonzero <- density, freq_hist_data_bar_heights /
  _bar_values <- hist_counts and the bin centres on [0, hist_max] (SAEDashboard's bar_values are
  centres too), pos_str/pos_values <- top logits, neg_str/neg_values <- bottom logits,
  topkCosSimIndices/Values <- neighbours, vector <- the unit-norm decoder direction from
  decoders_<d> (when stored), hookName <- hook. Fields we have no data for are empty / null.
- Activation: tokens, values, maxValue <- max_value, maxValueTokenIndex <- max_position,
  minValue; top examples carry SAEDashboard's markers binMin = binContains = -1, binMax = the
  feature's max; interval examples binMin/binMax and binContains = the fraction of the feature's
  activations in that interval (from the histogram).
- Explanation: one per description of the coder's current indexing (the features' current
  description when it has none): description, explanationModelName <- explainer model,
  typeName <- `featuredb_<method>` (or the original typeName of an imported one), authorId.
  `embedding` is written null: Neuronpedia's column is vector(256) of another embedding model, so
  our MiniLM vectors would be rejected there; they travel in the sidecar.

Sidecar: everything we store that Neuronpedia has no field for (the saes row; per feature
active_count, mean/std, hist_max, logit token ids, top tokens, the description columns and their
embedding; per example rank, token_ids, doc_id, context_index; per description method, source,
prompt version, time and scores) is written to `featuredb/` beside the Neuronpedia files, in
gzipped JSONL batches mirroring theirs and keyed like them (`layer`, `index`, `id`), so their rows
hold only their own field names and export -> import restores every row exactly.

Import of a real Neuronpedia export (no sidecar) fills what it can: sae_id `{modelId}/{sourceId}`;
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

import datetime as dt
import gzip
import hashlib
import json
import math
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from .decoders import is_decoders_table, write_decoder_vectors
from .descriptions import (
    MAX_DESCRIPTION_CHARS,
    METHOD_RANK,
    Embedder,
    best_description,
    current_descriptions,
    descriptions_schema,
    sync_features,
    write_descriptions,
)
from .feature_store import FeatureStore
from .filters import Filter
from .schema import (
    DEFAULT_VECTOR_DIM,
    EXAMPLES_TABLE,
    FEATURES_TABLE,
    StoreError,
    conform_table,
    examples_schema,
    features_schema,
    saes_schema,
    vector_dim_of,
)

DEFAULT_BATCH_SIZE = 1024
KINDS = ("features", "activations", "explanations")
SIDECAR_DIR = "featuredb"
SIDECAR_CODER_FILE = "coder.jsonl"
CREATOR_ID = "featuredb"  # Neuronpedia's exports replace creator/author ids with their own anyway
NEURONPEDIA_SOURCE = "neuronpedia"  # explainer_source of descriptions imported from Neuronpedia
TOP_MARKER = -1.0  # binMin / binContains of a top example (SAEDashboard's convention)

# Field names of Neuronpedia's tables, as its public dataset exports write them.
NEURON_FIELDS = (
    "modelId", "layer", "index", "maxActApprox", "creatorId", "frac_nonzero",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "neuron_alignment_indices", "neuron_alignment_l1", "neuron_alignment_values",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
    "decoder_weights_dist", "neg_str", "neg_values", "pos_str", "pos_values", "sourceSetName",
    "topkCosSimIndices", "topkCosSimValues", "vector", "vectorLabel", "hookName", "vectorDefaultSteerStrength",
    "hasVector",
)
ACTIVATION_FIELDS = (
    "id", "modelId", "layer", "index", "creatorId", "dataSource", "tokens", "maxValue", "minValue", "values",
    "maxValueTokenIndex", "dfaValues", "dfaMaxValue", "dfaTargetIndex", "binContains", "binMin", "binMax",
)
EXPLANATION_FIELDS = (
    "id", "modelId", "layer", "index", "authorId", "description", "embedding", "typeName", "explanationModelName",
    "umap_x", "umap_y", "umap_cluster", "umap_log_feature_sparsity",
)
# Our feature / example / description columns that Neuronpedia has no field for (sidecar).
FEATURE_EXTRAS = (
    "active_count", "mean_activation", "std_activation", "hist_max", "top_logit_ids", "bottom_logit_ids",
    "top_tokens", "top_token_counts", "description", "description_method", "description_model", "embedding_model",
    "vector",
)
EXAMPLE_EXTRAS = ("rank", "token_ids", "doc_id", "context_index")
DESCRIPTION_EXTRAS = (
    "method", "explainer_source", "prompt_version", "created_at", "detection_score", "fuzz_score", "detection_n",
    "fuzz_n", "score_details",
)
_BATCH_FILE = re.compile(r"^batch-([0-9]+)\.jsonl(\.gz)?$")
# A layer in a sae_id: layer_12, layer-12, blocks.3, L15 (not the l0 of average_l0_82).
_LAYER_PART = re.compile(r"(?<![A-Za-z0-9])(?:(?i:layers?|blocks?)[._-]?|L)[0-9]+(?![A-Za-z0-9])")
_SOURCE_ID = re.compile(r"^([0-9]+)-(.+)$")


@dataclass
class ExportResult:
    sources: list[str] = field(default_factory=list)  # "{modelId}/{sourceId}", one per coder
    features: int = 0
    activations: int = 0
    explanations: int = 0
    seconds: float = 0.0


@dataclass
class ImportResult:
    sae_ids: list[str] = field(default_factory=list)
    features: int = 0
    examples: int = 0
    descriptions: int = 0
    decoder_vectors: int = 0
    embedded: int = 0  # features embedded by this import (embed=True)
    unembedded: int = 0  # described features left without a description vector
    sidecar: bool = True  # every source carried a featuredb sidecar (an exact round trip)
    seconds: float = 0.0


# --- names ------------------------------------------------------------------------------------


def model_id_for(model: str) -> str:
    """Neuronpedia's model id for a model name, path or hub id: `google/gemma-2-2b` -> `gemma-2-2b`."""
    name = re.split(r"[/\\]", model.rstrip("/\\"))[-1]
    name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    return _slug(name) or "model"


def source_set_for(sae_id: str, site: str, width: int) -> str:
    """A source set name from a coder's sae_id without its layer part, else `{site}-{width}`; a
    source imported from Neuronpedia (`{modelId}/{layer}-{set}`) keeps its set name."""
    imported = _SOURCE_ID.match(sae_id.rsplit("/", 1)[-1])
    name = imported.group(2) if imported else _LAYER_PART.sub("", sae_id)
    return _slug(name) or f"{site}-{_width_label(width)}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _width_label(width: int) -> str:
    return f"{width // 1024}k" if width >= 1024 and width % 1024 == 0 else str(width)


def _stable_id(*parts: object) -> str:
    """A deterministic cuid-length id, so exporting twice gives the same files."""
    return "fdb" + hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:22]


# --- JSONL files ------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict], *, compress: bool) -> None:
    try:
        text = "".join(json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n" for row in rows)
    except ValueError as e:  # NaN / inf, which Neuronpedia's JSON parser would reject
        raise StoreError(f"{path}: cannot write a non-finite number as JSON ({e})") from None
    data = text.encode()
    path.write_bytes(gzip.compress(data, compresslevel=5, mtime=0) if compress else data)


def _read_jsonl(path: Path) -> Iterator[_Line]:
    """The rows of a .jsonl or .jsonl.gz file, streamed; StoreError naming the file (and line)."""
    compressed = path.name.endswith(".gz")
    try:
        with (gzip.open if compressed else open)(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield _Line(path, number, _parse_json_object(path, number, line))
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise StoreError(f"{path}: cannot read{' gzip' if compressed else ''} file: {e}") from None
    except UnicodeDecodeError as e:
        raise StoreError(f"{path}: not UTF-8 text: {e}") from None


def _parse_json_object(path: Path, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}:{number}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(row, dict):
        raise StoreError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    return row


def _batch_files(folder: Path) -> list[Path]:
    """batch-N.jsonl(.gz) files of a folder, by N."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _BATCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


class _Line:
    """One JSON row of an input file, with typed getters whose errors name the file and line."""

    def __init__(self, path: Path, line_no: int, row: dict) -> None:
        self.path, self.line_no, self.row = path, line_no, row

    def error(self, message: str) -> StoreError:
        return StoreError(f"{self.path}:{self.line_no}: {message}")

    def _get(self, name: str, optional: bool) -> Any:
        if name not in self.row:
            if optional:
                return None
            raise self.error(f"missing field {name!r}")
        value = self.row[name]
        if value is None and not optional:
            raise self.error(f"field {name!r} is null")
        return value

    def text(self, name: str, *, optional: bool = False) -> str | None:
        value = self._get(name, optional)
        if value is not None and not isinstance(value, str):
            raise self.error(f"field {name!r} must be a string, got {type(value).__name__}")
        return value

    def integer(self, name: str, *, optional: bool = False) -> int | None:
        value = self._get(name, optional)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise self.error(f"field {name!r} must be an integer, got {value!r:.40}")
        return value

    def number(self, name: str, *, optional: bool = False) -> float | None:
        value = self._get(name, optional)
        if value is not None:
            if not _is_number(value):
                raise self.error(f"field {name!r} must be a finite number, got {value!r:.40}")
            value = float(value)
        return value

    def index(self) -> int:
        """The feature index: a string in Neuronpedia's database exports, an int in some others."""
        value = self._get("index", False)
        if isinstance(value, str) and value.isdigit():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise self.error(f"field 'index' must be a non-negative integer (or its string), got {value!r:.40}")

    def numbers(self, name: str) -> list[float]:
        return [float(v) for v in self._list(name, _is_number, "finite numbers")]

    def integers(self, name: str) -> list[int]:
        return self._list(name, lambda v: isinstance(v, int) and not isinstance(v, bool), "integers")

    def texts(self, name: str) -> list[str]:
        return self._list(name, lambda v: isinstance(v, str), "strings")

    def _list(self, name: str, ok: Callable[[Any], bool], what: str) -> list:
        value = self._get(name, True)  # Neuronpedia's list columns default to [] (null in some dumps)
        if value is None:
            return []
        if not isinstance(value, list) or not all(ok(v) for v in value):
            raise self.error(f"field {name!r} must be a list of {what}")
        return value

    def same_length(self, first: str, first_values: list, second: str, second_values: list) -> None:
        if len(first_values) != len(second_values):
            raise self.error(f"{first!r} has {len(first_values)} entries but {second!r} has {len(second_values)}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- export -----------------------------------------------------------------------------------


def export_neuronpedia(
    db: FeatureStore | str | Path,
    out: str | Path,
    *,
    sae_ids: list[str] | None = None,
    model_id: str | None = None,
    source_set: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> ExportResult:
    """Write the catalogue's coders (or `sae_ids`) to `out` in Neuronpedia's format (see the module
    docstring). `out` must be empty or not exist."""
    started = time.perf_counter()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise StoreError(f"batch size must be a positive integer, got {batch_size!r}")
    out = Path(out)
    _require_empty_dir(out)
    store = db if isinstance(db, FeatureStore) else FeatureStore(db, read_only=True)
    coders = _selected_coders(store, sae_ids)
    plans = _source_plans(coders, model_id, source_set)
    indices = {c["sae_id"]: store.features(c["sae_id"], columns=["feature"])["feature"].to_list() for c in coders}
    result = ExportResult()
    bar = _progress_bar(sum(map(len, indices.values())), "export", progress)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for coder in coders:
            model, set_name = plans[coder["sae_id"]]
            _export_coder(store, coder, indices[coder["sae_id"]], model, set_name, out, batch_size, bar, result)
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    return result


def _require_empty_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"export directory {out} already exists and is not empty; choose a new --out")


def _selected_coders(store: FeatureStore, sae_ids: list[str] | None) -> list[dict]:
    coders = store.saes().to_dicts()
    if sae_ids:
        known = {c["sae_id"] for c in coders}
        missing = [s for s in sae_ids if s not in known]
        if missing:
            raise StoreError(f"no coder {missing[0]!r} in {store.uri} (coders: {sorted(known)})")
        coders = [c for c in coders if c["sae_id"] in set(sae_ids)]
    if not coders:
        raise StoreError(f"nothing to export: no coders in {store.uri}")
    return coders


def _source_plans(coders: list[dict], model_id: str | None, source_set: str | None) -> dict[str, tuple[str, str]]:
    """sae_id -> (modelId, sourceSetName); two coders may not become the same source."""
    plans: dict[str, tuple[str, str]] = {}
    taken: dict[str, str] = {}
    for coder in coders:
        model = _slug(model_id) if model_id else model_id_for(coder["model"])
        set_name = _slug(source_set) if source_set else source_set_for(coder["sae_id"], coder["site"], coder["width"])
        if not model or not set_name:
            raise StoreError(f"--model-id / --source-set must contain letters or digits, got {model_id!r} / {source_set!r}")
        source = f"{model}/{coder['layer']}-{set_name}"
        if source in taken:
            raise StoreError(f"coders {taken[source]!r} and {coder['sae_id']!r} would both be exported as {source}; "
                             f"export them separately with --sae and --source-set")
        taken[source] = coder["sae_id"]
        plans[coder["sae_id"]] = (model, set_name)
    return plans


def _export_coder(store: FeatureStore, coder: dict, indices: list[int], model: str, set_name: str, out: Path,
                  batch_size: int, bar, result: ExportResult) -> None:
    source = _ExportedSource(model, f"{coder['layer']}-{set_name}", set_name, coder,
                             _descriptions_by_feature(store, coder["sae_id"]), _decoders_table(store, coder["sae_id"]))
    folder = out / model / source.source
    for kind in KINDS:
        (folder / kind).mkdir(parents=True)
        (folder / SIDECAR_DIR / kind).mkdir(parents=True)
    _write_source_metadata(folder, coder, model, set_name, source.source)
    for number, start in enumerate(range(0, len(indices), batch_size)):
        chunk = indices[start:start + batch_size]  # batches of features, read one at a time
        rows = _batch_rows(store, source, chunk[0], chunk[-1])
        name = f"batch-{number}.jsonl.gz"
        for kind, (neuronpedia_rows, sidecar_rows) in rows.items():
            _write_jsonl(folder / kind / name, neuronpedia_rows, compress=True)
            _write_jsonl(folder / SIDECAR_DIR / kind / name, sidecar_rows, compress=True)
        result.features += len(rows["features"][0])
        result.activations += len(rows["activations"][0])
        result.explanations += len(rows["explanations"][0])
        bar.update(len(rows["features"][0]))
    result.sources.append(f"{model}/{source.source}")


@dataclass
class _ExportedSource:
    model: str
    source: str
    set_name: str
    coder: dict
    descriptions: dict[int, list[dict]]
    decoders: Any  # the decoders_<d> table holding the coder's directions, or None

    @property
    def ids(self) -> dict:
        return {"modelId": self.model, "layer": self.source}


def _batch_rows(store: FeatureStore, source: _ExportedSource, low: int, high: int) -> dict[str, tuple[list, list]]:
    """kind -> (Neuronpedia rows, sidecar rows) for the features low..high of one coder."""
    sae_id, ids = source.coder["sae_id"], source.ids
    features = _rows_between(store.table(FEATURES_TABLE), sae_id, low, high)
    examples = _rows_between(store.table(EXAMPLES_TABLE), sae_id, low, high)
    vectors = {r["feature"]: r["vector"] for r in _rows_between(source.decoders, sae_id, low, high)} \
        if source.decoders is not None else {}
    rows: dict[str, tuple[list, list]] = {kind: ([], []) for kind in KINDS}
    for row in features:
        key = {**ids, "index": str(row["feature"])}
        rows["features"][0].append(_neuron_row(row, ids, source.coder["hook"], source.set_name,
                                               vectors.get(row["feature"])))
        rows["features"][1].append({**key, **{k: row[k] for k in FEATURE_EXTRAS}})
        for position, (explanation, extra) in enumerate(_explanations(row, source.descriptions.get(row["feature"], []))):
            row_id = _stable_id(source.model, source.source, row["feature"], "explanation", position)
            rows["explanations"][0].append({"id": row_id, **key, **explanation})
            rows["explanations"][1].append({"id": row_id, **key, **extra})
    by_feature = {r["feature"]: r for r in features}
    for example in examples:
        row_id = _stable_id(source.model, source.source, example["feature"], example["kind"], example["rank"])
        rows["activations"][0].append({"id": row_id, **ids, **_activation_row(example, by_feature[example["feature"]])})
        rows["activations"][1].append({"id": row_id, **ids, "index": str(example["feature"]),
                                       **{k: example[k] for k in EXAMPLE_EXTRAS}})
    return rows


def _write_source_metadata(folder: Path, coder: dict, model: str, set_name: str, source: str) -> None:
    """model / release / sourceset / source rows with Neuronpedia's fields, and our coder row."""
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    rows = {
        "model.jsonl": {
            "id": model, "displayName": coder["model"], "displayNameShort": model, "creatorId": CREATOR_ID,
            "owner": coder["model"].split("/")[0] if "/" in coder["model"] else "unknown",
            "layers": coder["layer"] + 1,  # at least; the catalogue does not know the model's depth
            "neuronsPerLayer": 0, "instruct": bool(re.search(r"(-it|instruct)$", model)),
            "createdAt": now, "updatedAt": now,
        },
        "release.jsonl": {
            "name": set_name, "description": f"{set_name} (exported by featuredb)", "descriptionShort": set_name,
            "urls": [], "creatorName": CREATOR_ID, "creatorNameShort": CREATOR_ID, "creatorId": CREATOR_ID,
            "createdAt": now,
        },
        "sourceset.jsonl": {
            "modelId": model, "name": set_name, "description": f"{coder['site']} {coder['kind']}s, "
            f"{_width_label(coder['width'])} features", "type": coder["site"], "creatorName": CREATOR_ID,
            "creatorId": CREATOR_ID, "urls": [], "releaseName": set_name, "hasDashboards": True, "createdAt": now,
        },
        "source.jsonl": {
            "id": source, "modelId": model, "setName": set_name, "creatorId": CREATOR_ID, "hasDashboards": True,
            "num_prompts": coder["contexts_indexed"], "num_tokens_in_prompt": coder["context"],
            "dataset": None, "notes": f"featuredb coder {coder['sae_id']}", "createdAt": now,
        },
    }
    for name, row in rows.items():
        _write_jsonl(folder / name, [row], compress=False)
    coder_row = {**coder, "created_at": coder["created_at"].isoformat()}
    _write_jsonl(folder / SIDECAR_DIR / SIDECAR_CODER_FILE, [coder_row], compress=False)


def _descriptions_by_feature(store: FeatureStore, sae_id: str) -> dict[int, list[dict]]:
    rows: dict[int, list[dict]] = {}
    for row in sorted(current_descriptions(store, sae_id), key=lambda r: (r["feature"], r["created_at"])):
        rows.setdefault(row["feature"], []).append(row)
    return rows


def _decoders_table(store: FeatureStore, sae_id: str):
    """The decoders_<d> table holding the coder's directions, or None."""
    for name in store.table_names():
        if is_decoders_table(name):
            table = store.table(name)
            if table.count_rows(Filter().eq("sae_id", sae_id).render(table.schema)):
                return table
    return None


def _rows_between(table, sae_id: str, low: int, high: int) -> list[dict]:
    where = Filter().eq("sae_id", sae_id).between("feature", low, high).render(table.schema)
    rows = table.search().where(where).limit(None).to_arrow().to_pylist()
    sort_key = ("feature", "kind", "rank") if "rank" in table.schema.names else ("feature",)
    return sorted(rows, key=lambda r: tuple(r[k] for k in sort_key))


def _neuron_row(row: dict, ids: dict, hook: str, set_name: str, decoder: list[float] | None) -> dict:
    counts, hist_max = row["hist_counts"], row["hist_max"]
    width = hist_max / len(counts) if counts else 0.0
    values = {
        "index": str(row["feature"]), "maxActApprox": row["max_activation"], "creatorId": CREATOR_ID,
        "frac_nonzero": row["density"],
        "freq_hist_data_bar_heights": [float(c) for c in counts],
        "freq_hist_data_bar_values": [(i + 0.5) * width for i in range(len(counts))],
        "neg_str": row["bottom_logit_tokens"], "neg_values": row["bottom_logit_values"],
        "pos_str": row["top_logit_tokens"], "pos_values": row["top_logit_values"],
        "sourceSetName": set_name, "topkCosSimIndices": row["neighbours"], "topkCosSimValues": row["neighbour_cosines"],
        "vector": decoder or [], "vectorLabel": None, "hookName": hook,
        "vectorDefaultSteerStrength": row["max_activation"] if decoder else None, "hasVector": bool(decoder),
    }
    return {name: values.get(name, ids.get(name, [])) for name in NEURON_FIELDS}


def _activation_row(example: dict, feature: dict) -> dict:
    is_top = example["kind"] == "top"
    if is_top:
        bins = (TOP_MARKER, feature["max_activation"], TOP_MARKER)
    else:
        bins = (example["bin_min"], example["bin_max"],
                _bin_fraction(feature["hist_counts"], feature["hist_max"], example["bin_min"], example["bin_max"]))
    values = example["values"]
    return {
        "index": str(example["feature"]), "creatorId": CREATOR_ID, "dataSource": None, "tokens": example["tokens"],
        "maxValue": example["max_value"], "minValue": min(values) if values else 0.0, "values": values,
        "maxValueTokenIndex": example["max_position"], "dfaValues": [], "dfaMaxValue": None, "dfaTargetIndex": None,
        "binMin": bins[0], "binMax": bins[1], "binContains": bins[2],
    }


def _bin_fraction(counts: list[int], hist_max: float, low: float, high: float) -> float | None:
    """The fraction of the feature's activations in [low, high), from histogram bin centres."""
    total = sum(counts)
    if not counts or total == 0:
        return None
    width = hist_max / len(counts)
    inside = sum(c for i, c in enumerate(counts) if low <= (i + 0.5) * width < high)
    return inside / total


def _explanations(feature: dict, descriptions: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(Neuronpedia explanation fields, sidecar fields) per description of a feature."""
    empty = {"authorId": CREATOR_ID, "embedding": None, "umap_x": None, "umap_y": None, "umap_cluster": None,
             "umap_log_feature_sparsity": None}
    for row in descriptions:
        from_neuronpedia = row["explainer_source"] == NEURONPEDIA_SOURCE
        type_name = (row["prompt_version"] or None) if from_neuronpedia else f"featuredb_{row['method']}"
        extra = {k: row[k] for k in DESCRIPTION_EXTRAS}
        extra["created_at"] = row["created_at"].isoformat()
        yield ({**empty, "description": row["description"], "typeName": type_name,
                "explanationModelName": row["explainer_model"]}, {"from": "descriptions", **extra})
    if not descriptions and feature["description"]:
        method = feature["description_method"]
        yield ({**empty, "description": feature["description"],
                "typeName": f"featuredb_{method}" if method else None,
                "explanationModelName": feature["description_model"]}, {"from": "features"})


# --- import -----------------------------------------------------------------------------------


def import_neuronpedia(
    path: str | Path,
    db: str | Path,
    *,
    replace: bool = False,
    embed: bool = False,
    embedder: Embedder | None = None,
    progress: bool = False,
) -> ImportResult:
    """Load a Neuronpedia export (features, activations, explanations) into the catalogue at `db`.

    `path` is an export root, a model folder or one source folder. A coder already in `db` is only
    replaced with `replace=True`. `embed=True` embeds the imported descriptions with the default
    embedding model (`embedder` overrides how, e.g. in tests)."""
    started = time.perf_counter()
    sources = _find_sources(Path(path))
    result = ImportResult()
    store: FeatureStore | None = None
    bar = _progress_bar(None, "import", progress)
    try:
        for folder in sources:
            coder = _read_source(folder, bar)
            store = store or _open_store(db, coder.vector_dim)
            _write_imported(store, coder, replace, embed, embedder, result)
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


@dataclass
class _ImportedCoder:
    """One source, read and validated, ready to write."""

    folder: Path
    sae: dict
    features: pa.Table
    examples: pa.Table
    descriptions: list[dict]
    decoders: np.ndarray | None
    vector_dim: int | None
    sidecar: bool


@dataclass
class _SourceIds:
    model: str
    source: str
    layer: int
    set_name: str


def _read_source(folder: Path, bar) -> _ImportedCoder:
    """Read and validate one source folder completely; nothing is written here."""
    sidecar_coder = _read_sidecar_coder(folder)
    has_sidecar = sidecar_coder is not None
    feature_files = _batch_files(folder / "features")
    if not feature_files:
        raise StoreError(f"{folder / 'features'}: no batch-N.jsonl.gz files")
    ids: _SourceIds | None = None
    features: dict[int, dict] = {}
    decoders: dict[int, list[float]] = {}
    for path in feature_files:
        sidecar = _sidecar_rows(folder, "features", path, "index") if has_sidecar else None
        for line in _read_jsonl(path):
            ids = _check_ids(line, ids)
            index = line.index()
            if index in features:
                raise line.error(f"feature {index} appears twice")
            features[index] = _feature_from_neuron(line, sidecar.pop(str(index), None) if sidecar is not None else None,
                                                   has_sidecar)
            vector = line.numbers("vector")
            if vector:
                decoders[index] = vector
            bar.update(1)
        if sidecar:
            raise StoreError(f"{_sidecar_path(folder, 'features', path)}: has rows for features {sorted(sidecar)[:3]} "
                             f"that {path.name} does not have")
    if ids is None:
        raise StoreError(f"{folder / 'features'}: no feature rows")
    sae = _sae_row(folder, ids, sidecar_coder, features, decoders)
    width = sae["width"]
    out_of_range = [i for i in features if i >= width]
    if out_of_range:
        raise StoreError(f"{folder / 'features'}: feature index {out_of_range[0]} is out of range for width {width}")
    examples = _read_examples(folder, ids, sae["sae_id"], features, has_sidecar)
    descriptions = _read_explanations(folder, ids, features, sae, has_sidecar)
    if not has_sidecar:
        _fill_derived_columns(sae, features, examples, descriptions)
    feature_table = _features_table(sae, features)
    example_table = conform_table(_concat(examples, examples_schema()), examples_schema(), f"{folder}: examples")
    vector_dims = {len(r["vector"]) for r in features.values() if r["vector"] is not None}
    if len(vector_dims) > 1:
        raise StoreError(f"{folder}: description vectors of different lengths {sorted(vector_dims)}")
    return _ImportedCoder(folder, sae, feature_table, example_table, descriptions,
                          _decoder_matrix(folder, decoders, width), next(iter(vector_dims), None), has_sidecar)


def _check_ids(line: _Line, ids: _SourceIds | None) -> _SourceIds:
    """Every row of a source must name the same modelId and source (`layer`)."""
    model, source = line.text("modelId"), line.text("layer")
    if ids is None:
        match = _SOURCE_ID.match(source)
        if not match:
            raise line.error(f"source id {source!r} is not of the form {{layer}}-{{sourceSetName}}")
        return _SourceIds(model, source, int(match.group(1)), match.group(2))
    if (model, source) != (ids.model, ids.source):
        raise line.error(f"row is for {model}/{source}, but this folder holds {ids.model}/{ids.source}")
    return ids


def _sidecar_path(folder: Path, kind: str, path: Path) -> Path:
    return folder / SIDECAR_DIR / kind / path.name


def _read_sidecar_coder(folder: Path) -> dict | None:
    path = folder / SIDECAR_DIR / SIDECAR_CODER_FILE
    if not (folder / SIDECAR_DIR).exists():
        return None
    if not path.is_file():
        raise StoreError(f"{folder / SIDECAR_DIR}: sidecar without {SIDECAR_CODER_FILE}")
    lines = list(_read_jsonl(path))
    if len(lines) != 1:
        raise StoreError(f"{path}: expected one coder row, got {len(lines)}")
    line = lines[0]
    row = {name: line.row.get(name) for name in saes_schema().names}
    try:
        row["created_at"] = dt.datetime.fromisoformat(line.text("created_at"))
    except ValueError as e:
        raise line.error(f"bad created_at: {e}") from None
    conform_table({k: [v] for k, v in row.items()}, saes_schema(), f"{path}:1")  # types, before anything else
    return row


def _sidecar_rows(folder: Path, kind: str, path: Path, key: str) -> dict[str, _Line]:
    """The sidecar rows mirroring one Neuronpedia batch file, by `key` (index or id)."""
    sidecar = _sidecar_path(folder, kind, path)
    if not sidecar.is_file():
        raise StoreError(f"{sidecar}: missing (the sidecar must mirror every batch file of {kind}/)")
    rows: dict[str, _Line] = {}
    for line in _read_jsonl(sidecar):
        value = line.text(key) if key == "id" else str(line.index())
        if value in rows:
            raise line.error(f"{key} {value!r} appears twice")
        rows[value] = line
    return rows


def _feature_from_neuron(line: _Line, extra: _Line | None, has_sidecar: bool) -> dict:
    """Our feature columns from a Neuron row (and its sidecar row)."""
    if has_sidecar and extra is None:
        raise line.error(f"feature {line.index()} has no row in the featuredb sidecar")
    pos_str, pos_values = line.texts("pos_str"), line.numbers("pos_values")
    neg_str, neg_values = line.texts("neg_str"), line.numbers("neg_values")
    neighbours, cosines = line.integers("topkCosSimIndices"), line.numbers("topkCosSimValues")
    heights, centres = line.numbers("freq_hist_data_bar_heights"), line.numbers("freq_hist_data_bar_values")
    line.same_length("pos_str", pos_str, "pos_values", pos_values)
    line.same_length("neg_str", neg_str, "neg_values", neg_values)
    line.same_length("topkCosSimIndices", neighbours, "topkCosSimValues", cosines)
    line.same_length("freq_hist_data_bar_heights", heights, "freq_hist_data_bar_values", centres)
    if any(h < 0 for h in heights):
        raise line.error("freq_hist_data_bar_heights has negative heights")
    density = line.number("frac_nonzero")
    if not 0.0 <= density <= 1.0:
        raise line.error(f"frac_nonzero {density} is not in [0, 1]")
    row = {
        "feature": line.index(), "density": density, "max_activation": line.number("maxActApprox"),
        "top_logit_tokens": pos_str, "top_logit_values": pos_values,
        "bottom_logit_tokens": neg_str, "bottom_logit_values": neg_values,
        "neighbours": neighbours, "neighbour_cosines": cosines, "hook_name": line.text("hookName", optional=True),
    }
    if extra is None:
        row.update(_histogram_from_bars(heights, centres, row["max_activation"]))
        row.update(top_logit_ids=[-1] * len(pos_str), bottom_logit_ids=[-1] * len(neg_str), description=None,
                   description_method=None, description_model=None, embedding_model=None, vector=None)
        return row
    row.update(_feature_extras(extra))
    row["hist_counts"] = [int(h) for h in heights]
    extra.same_length("top_logit_ids", row["top_logit_ids"], "pos_str", pos_str)
    extra.same_length("bottom_logit_ids", row["bottom_logit_ids"], "neg_str", neg_str)
    return row


def _feature_extras(extra: _Line) -> dict:
    vector = extra.row.get("vector")
    return {
        "active_count": extra.integer("active_count"), "mean_activation": extra.number("mean_activation"),
        "std_activation": extra.number("std_activation"), "hist_max": extra.number("hist_max"),
        "top_logit_ids": extra.integers("top_logit_ids"), "bottom_logit_ids": extra.integers("bottom_logit_ids"),
        "top_tokens": extra.texts("top_tokens"), "top_token_counts": extra.integers("top_token_counts"),
        "description": extra.text("description", optional=True),
        "description_method": extra.text("description_method", optional=True),
        "description_model": extra.text("description_model", optional=True),
        "embedding_model": extra.text("embedding_model", optional=True),
        "vector": None if vector is None else extra.numbers("vector"),
    }


def _histogram_from_bars(heights: list[float], centres: list[float], max_activation: float) -> dict:
    """Neuronpedia's histogram (bars over [min, max] of the nonzero activations) re-binned onto
    our equal-width bins on [0, hist_max]; mean and std of the activations estimated from it."""
    if not heights or sum(heights) <= 0:
        return {"hist_counts": [], "hist_max": max_activation, "mean_activation": 0.0, "std_activation": 0.0}
    half = (centres[1] - centres[0]) / 2 if len(centres) > 1 else abs(centres[0]) or 1.0
    hist_max = max(max(centres) + half, max_activation, 1e-12)
    counts = [0] * len(heights)
    for height, centre in zip(heights, centres):
        counts[min(len(counts) - 1, max(0, int(centre / hist_max * len(counts))))] += int(round(height))
    weights = np.asarray(heights)
    mean = float(np.average(centres, weights=weights))
    std = float(np.sqrt(np.average((np.asarray(centres) - mean) ** 2, weights=weights)))
    return {"hist_counts": counts, "hist_max": hist_max, "mean_activation": mean, "std_activation": std}


def _sae_row(folder: Path, ids: _SourceIds, sidecar: dict | None, features: dict[int, dict],
             decoders: dict[int, list[float]]) -> dict:
    if sidecar is not None:
        return sidecar
    source = _read_source_metadata(folder)
    config = source.get("saelensConfig") if isinstance(source.get("saelensConfig"), dict) else {}
    hook = next((f["hook_name"] for f in features.values() if f["hook_name"]), None) or config.get("hook_name")
    hook = str(hook) if hook else "unknown"
    site = _site_from_names(ids.set_name, hook)
    contexts = _non_negative_int(source.get("num_prompts"))
    context = _non_negative_int(source.get("num_tokens_in_prompt"))
    d_in = len(next(iter(decoders.values()), [])) or _non_negative_int(config.get("d_in"))
    return {
        "sae_id": f"{ids.model}/{ids.source}", "model": ids.model, "hook": hook, "hook_out": hook, "site": site,
        "layer": ids.layer, "architecture": str(config.get("architecture") or "unknown"),
        "kind": "transcoder" if site == "transcoder" else "sae", "d_in": d_in, "d_out": d_in,
        "width": max(max(features) + 1, _non_negative_int(config.get("d_sae"))),
        "source": f"neuronpedia:{ids.model}/{ids.source}", "tokens_indexed": contexts * context,
        "contexts_indexed": contexts, "context": context, "top_k": 0,
        "created_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
    }


def _read_source_metadata(folder: Path) -> dict:
    path = folder / "source.jsonl"
    lines = list(_read_jsonl(path)) if path.is_file() else []
    return lines[0].row if lines else {}


def _non_negative_int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _site_from_names(set_name: str, hook: str) -> str:
    text = f"{set_name} {hook}".lower()
    for needle, site in (("transcoder", "transcoder"), ("mlp", "mlp"), ("att", "att"), ("res", "res")):
        if needle in text:
            return site
    return "other"


def _read_examples(folder: Path, ids: _SourceIds, sae_id: str, features: dict[int, dict],
                   has_sidecar: bool) -> list[pa.Table]:
    """One table of example rows per activations batch file."""
    tables = []
    next_rank: Counter = Counter()  # (feature, kind) -> next rank, without a sidecar
    for path in _batch_files(folder / "activations"):
        sidecar = _sidecar_rows(folder, "activations", path, "id") if has_sidecar else None
        rows = []
        for line in _read_jsonl(path):
            _check_ids(line, ids)
            index = line.index()
            if index not in features:
                raise line.error(f"activation of feature {index}, which has no row in features/")
            extra = sidecar.pop(line.text("id"), None) if sidecar is not None else None
            if has_sidecar and extra is None:
                raise line.error(f"activation {line.text('id')!r} has no row in the featuredb sidecar")
            rows.append({"sae_id": sae_id, **_example_from_activation(line, index, extra)})
        if sidecar:
            raise StoreError(f"{_sidecar_path(folder, 'activations', path)}: has rows for activations "
                             f"{sorted(sidecar)[:2]} that {path.name} does not have")
        if not has_sidecar:
            _assign_ranks(rows, next_rank)
        tables.append(pa.Table.from_pylist(rows, schema=examples_schema()) if rows else examples_schema().empty_table())
    return tables


def _example_from_activation(line: _Line, index: int, extra: _Line | None) -> dict:
    tokens, values = line.texts("tokens"), line.numbers("values")
    line.same_length("tokens", tokens, "values", values)
    peak = line.integer("maxValueTokenIndex")
    if not tokens or not 0 <= peak < len(tokens):
        raise line.error(f"maxValueTokenIndex {peak} is outside the {len(tokens)} tokens")
    bin_min, bin_max = line.number("binMin", optional=True), line.number("binMax", optional=True)
    is_top = bin_min is None or bin_min == TOP_MARKER
    if not is_top and bin_max is None:
        raise line.error("an interval activation (binMin set) needs binMax")
    row = {
        "feature": index, "kind": "top" if is_top else "interval", "bin_min": None if is_top else bin_min,
        "bin_max": None if is_top else bin_max, "tokens": tokens, "values": values,
        "max_value": line.number("maxValue"), "max_position": peak,
    }
    if extra is None:
        return {**row, "rank": None, "token_ids": [-1] * len(tokens), "doc_id": "", "context_index": -1}
    token_ids = extra.integers("token_ids")
    extra.same_length("token_ids", token_ids, "tokens", tokens)
    return {**row, "rank": extra.integer("rank"), "token_ids": token_ids, "doc_id": extra.text("doc_id"),
            "context_index": extra.integer("context_index")}


def _assign_ranks(rows: list[dict], next_rank: Counter) -> None:
    """Top examples ranked by max value, interval ones by interval then max value (per feature)."""
    rows.sort(key=lambda r: (r["feature"], r["kind"], r["bin_min"] or 0.0, -r["max_value"]))
    for row in rows:
        key = (row["feature"], row["kind"])
        row["rank"] = next_rank[key]
        next_rank[key] += 1


def _read_explanations(folder: Path, ids: _SourceIds, features: dict[int, dict], sae: dict,
                       has_sidecar: bool) -> list[dict]:
    """descriptions rows (only those that were descriptions rows, with a sidecar)."""
    rows: list[dict] = []
    imported_at = dt.datetime.now(dt.timezone.utc)
    for path in _batch_files(folder / "explanations"):
        sidecar = _sidecar_rows(folder, "explanations", path, "id") if has_sidecar else None
        for line in _read_jsonl(path):
            _check_ids(line, ids)
            index = line.index()
            if index not in features:
                raise line.error(f"explanation of feature {index}, which has no row in features/")
            text = line.text("description")
            if not text.strip() or len(text) > MAX_DESCRIPTION_CHARS:
                raise line.error(f"description must be 1 to {MAX_DESCRIPTION_CHARS} characters")
            type_name, model = line.text("typeName", optional=True), line.text("explanationModelName", optional=True)
            base = {"sae_id": sae["sae_id"], "feature": index, "description": text, "explainer_model": model,
                    "indexed_at": sae["created_at"]}
            if sidecar is None:
                rows.append({**base, "method": "llm" if model else "manual", "explainer_source": NEURONPEDIA_SOURCE,
                             "prompt_version": type_name or "", "created_at": imported_at, "detection_score": None,
                             "fuzz_score": None, "detection_n": None, "fuzz_n": None, "score_details": None})
                continue
            extra = sidecar.pop(line.text("id"), None)
            if extra is None:
                raise line.error(f"explanation {line.text('id')!r} has no row in the featuredb sidecar")
            if extra.text("from") == "descriptions":
                rows.append({**base, **_description_extras(extra)})
        if sidecar:
            raise StoreError(f"{_sidecar_path(folder, 'explanations', path)}: has rows for explanations "
                             f"{sorted(sidecar)[:2]} that {path.name} does not have")
    return rows


def _description_extras(extra: _Line) -> dict:
    method = extra.text("method")
    if method not in METHOD_RANK:
        raise extra.error(f"method {method!r} is not one of {sorted(METHOD_RANK)}")
    scores = {name: extra.number(name, optional=True) for name in ("detection_score", "fuzz_score")}
    if any(s is not None and not 0.0 <= s <= 1.0 for s in scores.values()):
        raise extra.error("scores must be in [0, 1]")
    try:
        created_at = dt.datetime.fromisoformat(extra.text("created_at"))
    except ValueError as e:
        raise extra.error(f"bad created_at: {e}") from None
    return {
        "method": method, "explainer_source": extra.text("explainer_source", optional=True),
        "prompt_version": extra.text("prompt_version"), "created_at": created_at, **scores,
        "detection_n": extra.integer("detection_n", optional=True), "fuzz_n": extra.integer("fuzz_n", optional=True),
        "score_details": extra.text("score_details", optional=True),
    }


def _fill_derived_columns(sae: dict, features: dict[int, dict], examples: list[pa.Table],
                          descriptions: list[dict]) -> None:
    """Without a sidecar: active counts, top tokens, top_k and current descriptions from what we have."""
    peaks: dict[int, Counter] = {}
    top_counts: Counter = Counter()
    for table in examples:
        top = table.filter(pc.equal(table["kind"], "top"))
        for feature, tokens, peak in zip(*(top[c].to_pylist() for c in ("feature", "tokens", "max_position"))):
            peaks.setdefault(feature, Counter())[tokens[peak]] += 1
            top_counts[feature] += 1
    sae["top_k"] = max(top_counts.values(), default=0)
    sae["context"] = sae["context"] or max((pc.max(pc.list_value_length(t["tokens"])).as_py() or 0
                                            for t in examples), default=0)
    by_feature: dict[int, list[dict]] = {}
    for row in descriptions:
        by_feature.setdefault(row["feature"], []).append(row)
    for index, row in features.items():
        row["active_count"] = round(row["density"] * sae["tokens_indexed"])
        common = peaks.get(index, Counter()).most_common()
        row["top_tokens"], row["top_token_counts"] = [t for t, _ in common], [c for _, c in common]
        best = best_description(by_feature.get(index, []))
        if best is not None:
            row.update(description=best["description"], description_method=best["method"],
                       description_model=best["explainer_model"])


def _features_table(sae: dict, features: dict[int, dict]) -> pa.Table:
    names = features_schema().names
    coder_columns = {name: sae[name] for name in ("sae_id", "model", "layer", "hook", "site")}
    rows = [{**{n: row.get(n) for n in names}, **coder_columns} for _, row in sorted(features.items())]
    return pa.Table.from_pylist(rows) if rows else pa.table({n: [] for n in names})


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _decoder_matrix(folder: Path, vectors: dict[int, list[float]], width: int) -> np.ndarray | None:
    if not vectors:
        return None
    dims = {len(v) for v in vectors.values()}
    if len(dims) > 1:
        raise StoreError(f"{folder / 'features'}: decoder vectors of different lengths {sorted(dims)}")
    matrix = np.zeros((width, dims.pop()), dtype=np.float32)  # features without one: zero rows, skipped
    for index, vector in vectors.items():
        matrix[index] = vector
    return matrix


def _write_imported(store: FeatureStore, coder: _ImportedCoder, replace: bool, embed: bool,
                    embedder: Embedder | None, result: ImportResult) -> None:
    sae_id = coder.sae["sae_id"]
    exists = store.saes().filter(pl.col("sae_id") == sae_id).height > 0
    if exists and not replace:
        raise StoreError(f"coder {sae_id!r} is already in {store.uri}; import with --replace to overwrite it")
    descriptions = conform_table({n: [r[n] for r in coder.descriptions] for n in descriptions_schema().names},
                                 descriptions_schema(), f"{coder.folder}: descriptions")
    store.write_coder(coder.sae, coder.features, coder.examples)
    try:
        descriptions = _not_yet_stored(store, sae_id, descriptions)
        write_descriptions(store, sae_id, descriptions, sync=False)
        if coder.decoders is not None:
            result.decoder_vectors += write_decoder_vectors(store, sae_id, coder.decoders)
        if embed:
            result.embedded += sync_features(store, sae_id, embedder=embedder).embedded
    except Exception:
        if not exists:  # leave no half-imported coder behind
            store.delete_coder(sae_id)
        raise
    if not embed:
        described = pc.is_valid(coder.features["description"])
        result.unembedded += pc.sum(pc.and_(described, pc.is_null(coder.features["vector"]))).as_py() or 0
    result.sae_ids.append(sae_id)
    result.features += coder.features.num_rows
    result.examples += coder.examples.num_rows
    result.descriptions += descriptions.num_rows
    result.sidecar = result.sidecar and coder.sidecar


def _not_yet_stored(store: FeatureStore, sae_id: str, descriptions: pa.Table) -> pa.Table:
    """Drop rows already recorded for this indexing, so importing the same export again (or after a
    failed attempt) does not duplicate descriptions."""
    key = ("feature", "description", "method", "created_at")
    stored = {tuple(r[k] for k in key) for r in current_descriptions(store, sae_id)}
    keep = [tuple(r[k] for k in key) not in stored for r in descriptions.to_pylist()]
    return descriptions.filter(pa.array(keep, pa.bool_()))


def _progress_bar(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="feature", unit_scale=True, desc=desc, disable=not enabled, dynamic_ncols=True)


__all__ = ["DEFAULT_BATCH_SIZE", "ExportResult", "ImportResult", "export_neuronpedia", "import_neuronpedia",
           "model_id_for", "source_set_for"]
