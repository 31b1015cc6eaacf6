"""Export a catalogue's coders as Neuronpedia sources (layout and sidecar: see the package docstring).

Source ids: `source_ids` maps a coder_id to the Neuronpedia id of the coder it is (`gemma-2-2b/
12-gemmascope-res-16k`, which cli.py finds in featuredb.runtime.registry from the coder's stored
source: the store does not know the registry); other coders get ids derived from their model and
coder_id. --model-id / --source-set override both.

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
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from featuredb.store.descriptions import current_descriptions
from featuredb.store.feature_store import FeatureStore
from featuredb.store.filters import Filter
from featuredb.store.schema import FEATURES_TABLE, StoreError, is_decoders_table
from featuredb.store.neuronpedia.format import (
    CREATOR_ID,
    DEFAULT_BATCH_SIZE,
    DESCRIPTION_EXTRAS,
    FEATURE_EXTRAS,
    KINDS,
    NEURON_FIELDS,
    NEURONPEDIA_SOURCE,
    SIDECAR_CODER_FILE,
    SIDECAR_DIR,
    model_id_for,
    progress_bar,
    sidecar_path,
    slug,
    source_set_for,
    stable_id,
    width_label,
)
from featuredb.store.neuronpedia.export_activations import activation_frames
from featuredb.store.neuronpedia.jsonl import write_frame, write_jsonl


@dataclass
class ExportResult:
    sources: list[str] = field(default_factory=list)  # "{modelId}/{sourceId}", one per coder
    features: int = 0
    activations: int = 0
    explanations: int = 0
    seconds: float = 0.0


def export_neuronpedia(
    db: FeatureStore | str | Path,
    out: str | Path,
    *,
    coder_ids: list[str] | None = None,
    model_id: str | None = None,
    source_set: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    source_ids: Mapping[str, str] | None = None,
) -> ExportResult:
    """Write the catalogue's coders (or `coder_ids`) to `out` in Neuronpedia's format (see the package
    docstring). `out` must be empty or not exist. `source_ids`: coder_id -> Neuronpedia's
    `modelId/{layer}-{set}` of the coders Neuronpedia already has (see the module doc)."""
    started = time.perf_counter()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise StoreError(f"batch size must be a positive integer, got {batch_size!r}")
    out = Path(out)
    _require_empty_dir(out)
    store = db if isinstance(db, FeatureStore) else FeatureStore(db, read_only=True)
    coders = _selected_coders(store, coder_ids)
    plans = _source_plans(coders, model_id, source_set, source_ids or {})
    indices = {c["coder_id"]: store.features(c["coder_id"], columns=["feature"])["feature"].to_list() for c in coders}
    result = ExportResult()
    bar = progress_bar(sum(map(len, indices.values())), "export", progress)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for coder in coders:
            model, set_name = plans[coder["coder_id"]]
            _export_coder(store, coder, indices[coder["coder_id"]], model, set_name, out, batch_size, bar, result)
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    return result


def _require_empty_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"export directory {out} already exists and is not empty; choose a new --out")


def _selected_coders(store: FeatureStore, coder_ids: list[str] | None) -> list[dict]:
    coders = store.coders().to_dicts()
    if coder_ids:
        known = {c["coder_id"] for c in coders}
        missing = [s for s in coder_ids if s not in known]
        if missing:
            raise StoreError(f"no coder {missing[0]!r} in {store.uri} (coders: {sorted(known)})")
        coders = [c for c in coders if c["coder_id"] in set(coder_ids)]
    if not coders:
        raise StoreError(f"nothing to export: no coders in {store.uri}")
    return coders


def _source_plans(coders: list[dict], model_id: str | None, source_set: str | None,
                  source_ids: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """coder_id -> (modelId, sourceSetName); two coders may not become the same source."""
    plans: dict[str, tuple[str, str]] = {}
    taken: dict[str, str] = {}
    for coder in coders:
        known = _known_source(coder, source_ids.get(coder["coder_id"]))
        model = slug(model_id) if model_id else (known[0] if known else model_id_for(coder["model"]))
        set_name = slug(source_set) if source_set else (
            known[1] if known else source_set_for(coder["coder_id"], coder["site"], coder["width"]))
        if not model or not set_name:
            raise StoreError(f"--model-id / --source-set must contain letters or digits, got {model_id!r} / {source_set!r}")
        source = f"{model}/{coder['layer']}-{set_name}"
        if source in taken:
            raise StoreError(f"coders {taken[source]!r} and {coder['coder_id']!r} would both be exported as {source}; "
                             f"export them separately with --coder and --source-set")
        taken[source] = coder["coder_id"]
        plans[coder["coder_id"]] = (model, set_name)
    return plans


# Neuronpedia's ids as the registry has them: lowercase, '-', and '__' in gemmascope-res-16k__l0-82
_NEURONPEDIA_ID = re.compile(r"([a-z0-9][a-z0-9._-]*)/([0-9]+)-([a-z0-9][a-z0-9._-]*)")


def _known_source(coder: dict, source_id: str | None) -> tuple[str, str] | None:
    """(modelId, sourceSetName) of a Neuronpedia id `modelId/{layer}-{set}` given for the coder; its
    layer must be the coder's (the folder is named by it, and import reads the layer back from it)."""
    if source_id is None:
        return None
    match = _NEURONPEDIA_ID.fullmatch(source_id)
    if match is None or int(match.group(2)) != coder["layer"]:
        raise StoreError(f"Neuronpedia id {source_id!r} for coder {coder['coder_id']!r} is not "
                         f"modelId/{coder['layer']}-sourceSetName (the coder's layer is {coder['layer']})")
    return match.group(1), match.group(3)


def _export_coder(store: FeatureStore, coder: dict, indices: list[int], model: str, set_name: str, out: Path,
                  batch_size: int, bar, result: ExportResult) -> None:
    source = _ExportedSource(model, f"{coder['layer']}-{set_name}", set_name, coder,
                             _descriptions_by_feature(store, coder["coder_id"]), _decoders_table(store, coder["coder_id"]))
    folder = out / model / source.source_id
    for kind in KINDS:
        (folder / kind).mkdir(parents=True)
        (folder / SIDECAR_DIR / kind).mkdir(parents=True)
    _write_source_metadata(folder, coder, model, set_name, source.source_id)
    for number, start in enumerate(range(0, len(indices), batch_size)):
        chunk = indices[start:start + batch_size]  # batches of features, read one at a time
        rows = _batch_rows(store, source, chunk[0], chunk[-1])
        name = f"batch-{number}.jsonl.gz"
        for kind in KINDS:
            write = write_frame if kind == "activations" else partial(write_jsonl, compress=True)
            write(folder / kind / name, rows[kind][0])
            write(sidecar_path(folder, kind, name), rows[kind][1])
        result.features += len(rows["features"][0])
        result.activations += len(rows["activations"][0])
        result.explanations += len(rows["explanations"][0])
        bar.update(len(rows["features"][0]))
    result.sources.append(f"{model}/{source.source_id}")


@dataclass
class _ExportedSource:
    model: str
    source_id: str  # {layer}-{set_name}
    set_name: str
    coder: dict
    descriptions: dict[int, list[dict]]
    decoders: Any  # the decoders_<d> table holding the coder's directions, or None

    @property
    def row_keys(self) -> dict:
        """The fields naming the source in each of its rows."""
        return {"modelId": self.model, "layer": self.source_id}


def _batch_rows(store: FeatureStore, source: _ExportedSource, low: int, high: int) -> dict[str, tuple]:
    """kind -> (Neuronpedia rows, sidecar rows) for the features low..high of one coder: lists of
    dicts, and data frames for the activations (the bulk, built column-wise)."""
    coder_id, source_keys = source.coder["coder_id"], source.row_keys
    features = _rows_between(store.table(FEATURES_TABLE), coder_id, low, high)
    examples = store.read_examples(Filter().eq("coder_id", coder_id).between("feature", low, high))
    vectors = {r["feature"]: r["vector"] for r in _rows_between(source.decoders, coder_id, low, high)} \
        if source.decoders is not None else {}
    rows: dict[str, tuple] = {kind: ([], []) for kind in ("features", "explanations")}
    for row in features:
        feature_keys = {**source_keys, "index": str(row["feature"])}
        rows["features"][0].append(_neuron_row(row, source_keys, source.coder["hook"], source.set_name,
                                               vectors.get(row["feature"])))
        rows["features"][1].append({**feature_keys, **{k: row[k] for k in FEATURE_EXTRAS}})
        descriptions = source.descriptions.get(row["feature"], [])
        for position, (explanation, extra) in enumerate(_explanation_rows(row, descriptions)):
            row_id = stable_id(source.model, source.source_id, row["feature"], "explanation", position)
            rows["explanations"][0].append({"id": row_id, **feature_keys, **explanation})
            rows["explanations"][1].append({"id": row_id, **feature_keys, **extra})
    rows["activations"] = activation_frames(examples, {r["feature"]: r for r in features}, source.model,
                                            source.source_id)
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
            f"{width_label(coder['width'])} features", "type": coder["site"], "creatorName": CREATOR_ID,
            "creatorId": CREATOR_ID, "urls": [], "releaseName": set_name, "hasDashboards": True, "createdAt": now,
        },
        "source.jsonl": {
            "id": source, "modelId": model, "setName": set_name, "creatorId": CREATOR_ID, "hasDashboards": True,
            "num_prompts": coder["contexts_indexed"], "num_tokens_in_prompt": coder["context"],
            "dataset": None, "notes": f"featuredb coder {coder['coder_id']}", "createdAt": now,
        },
    }
    for name, row in rows.items():
        write_jsonl(folder / name, [row], compress=False)
    coder_row = {**coder, "created_at": coder["created_at"].isoformat()}
    write_jsonl(folder / SIDECAR_DIR / SIDECAR_CODER_FILE, [coder_row], compress=False)


def _descriptions_by_feature(store: FeatureStore, coder_id: str) -> dict[int, list[dict]]:
    rows: dict[int, list[dict]] = {}
    for row in sorted(current_descriptions(store, coder_id), key=lambda r: (r["feature"], r["created_at"])):
        rows.setdefault(row["feature"], []).append(row)
    return rows


def _decoders_table(store: FeatureStore, coder_id: str):
    """The decoders_<d> table holding the coder's directions, or None."""
    for name in store.table_names():
        if is_decoders_table(name):
            table = store.table(name)
            if table.count_rows(Filter().eq("coder_id", coder_id).render(table.schema)):
                return table
    return None


def _rows_between(table, coder_id: str, low: int, high: int) -> list[dict]:
    return sorted(_arrow_between(table, coder_id, low, high).to_pylist(), key=lambda r: r["feature"])


def _arrow_between(table, coder_id: str, low: int, high: int) -> pa.Table:
    where = Filter().eq("coder_id", coder_id).between("feature", low, high).render(table.schema)
    return table.search().where(where).limit(None).to_arrow()


def _neuron_row(row: dict, source_keys: dict, hook: str, set_name: str, decoder: list[float] | None) -> dict:
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
    return {name: values.get(name, source_keys.get(name, [])) for name in NEURON_FIELDS}


def _explanation_rows(feature: dict, descriptions: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(Neuronpedia explanation fields, sidecar fields) per description of a feature."""
    empty = {"authorId": CREATOR_ID, "embedding": None, "umap_x": None, "umap_y": None, "umap_cluster": None,
             "umap_log_feature_sparsity": None}
    for row in descriptions:
        from_neuronpedia = row["explainer_source"] == NEURONPEDIA_SOURCE
        type_name = (row["prompt_version"] or None) if from_neuronpedia else f"featuredb_{row['method']}"
        extra = {k: row.get(k) for k in DESCRIPTION_EXTRAS}  # an older catalogue's rows lack evidence
        extra["created_at"] = row["created_at"].isoformat()
        yield ({**empty, "description": row["description"], "typeName": type_name,
                "explanationModelName": row["explainer_model"]}, {"from": "descriptions", **extra})
    if not descriptions and feature["description"]:
        method = feature["description_method"]
        yield ({**empty, "description": feature["description"],
                "typeName": f"featuredb_{method}" if method else None,
                "explanationModelName": feature["description_model"]}, {"from": "features"})
