"""Read and validate one Neuronpedia source folder completely, nothing written: its features,
activations and explanations become our features, examples and descriptions rows, with the
columns Neuronpedia has no field for from our sidecar when there is one (defaults.py otherwise)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from featuredb.store.descriptions import MAX_DESCRIPTION_CHARS, METHOD_RANK
from featuredb.store.schema import StoreError, conform_table, examples_schema, features_schema, coders_schema
from featuredb.store.neuronpedia.columnar import loading_ahead
from featuredb.store.neuronpedia.defaults import assign_ranks, fill_derived_columns, histogram_from_bars, coder_row_from_metadata
from featuredb.store.neuronpedia.fast_activations import read_activations_batch
from featuredb.store.neuronpedia.format import NEURONPEDIA_SOURCE, SIDECAR_CODER_FILE, SIDECAR_DIR, SOURCE_ID, TOP_MARKER, SourceIds, sidecar_path
from featuredb.store.neuronpedia.jsonl import Line, batch_files, read_jsonl


@dataclass
class ImportedCoder:
    """One source, read and validated, ready to write."""

    folder: Path
    row: dict  # its coders-table row
    features: pa.Table
    examples: pa.Table
    descriptions: list[dict]
    decoders: np.ndarray | None
    vector_dim: int | None
    sidecar: bool


def read_source(folder: Path, bar, imported_at: dt.datetime | None = None) -> ImportedCoder:
    """Read and validate one source folder completely; nothing is written here. `imported_at`
    (default: now) stamps the coder row and descriptions of a source without our sidecar."""
    imported_at = imported_at or dt.datetime.now(dt.timezone.utc)
    sidecar_coder = _read_sidecar_coder(folder)
    has_sidecar = sidecar_coder is not None
    feature_files = batch_files(folder / "features")
    if not feature_files:
        raise StoreError(f"{folder / 'features'}: no batch-N.jsonl.gz files")
    ids: SourceIds | None = None
    features: dict[int, dict] = {}
    decoders: dict[int, list[float]] = {}
    for path in feature_files:
        sidecar = _SidecarBatch(folder, "features", path, "index") if has_sidecar else None
        for line in read_jsonl(path):
            ids = _check_ids(line, ids)
            index = line.index()
            if index in features:
                raise line.error(f"feature {index} appears twice")
            extra = sidecar.take(line, str(index), f"feature {index}") if sidecar is not None else None
            features[index] = _feature_from_neuron(line, extra)
            vector = line.numbers("vector")
            if vector:
                decoders[index] = vector
            bar.update(1)
        if sidecar is not None:
            sidecar.check_all_taken()
    if ids is None:
        raise StoreError(f"{folder / 'features'}: no feature rows")
    coder = sidecar_coder if has_sidecar else coder_row_from_metadata(folder, ids, features, decoders, imported_at)
    width = coder["width"]
    out_of_range = [i for i in features if i >= width]
    if out_of_range:
        raise StoreError(f"{folder / 'features'}: feature index {out_of_range[0]} is out of range for width {width}")
    examples = _read_examples(folder, ids, coder["coder_id"], features, has_sidecar)
    descriptions = _read_explanations(folder, ids, features, coder, has_sidecar, imported_at)
    if not has_sidecar:
        fill_derived_columns(coder, features, examples, descriptions)
    feature_table = _features_table(coder, features)
    example_table = conform_table(_concat_or_empty(examples, examples_schema()), examples_schema(),
                                  f"{folder}: examples")
    vector_dims = {len(r["vector"]) for r in features.values() if r["vector"] is not None}
    if len(vector_dims) > 1:
        raise StoreError(f"{folder}: description vectors of different lengths {sorted(vector_dims)}")
    return ImportedCoder(folder, coder, feature_table, example_table, descriptions,
                         _decoder_matrix(folder, decoders, width), next(iter(vector_dims), None), has_sidecar)


def _check_ids(line: Line, ids: SourceIds | None) -> SourceIds:
    """Every row of a source must name the same modelId and source (`layer`)."""
    model, source = line.text("modelId"), line.text("layer")
    if ids is None:
        match = SOURCE_ID.match(source)
        if not match:
            raise line.error(f"source id {source!r} is not of the form {{layer}}-{{sourceSetName}}")
        return SourceIds(model, source, int(match.group(1)), match.group(2))
    if (model, source) != (ids.model, ids.source):
        raise line.error(f"row is for {model}/{source}, but this folder holds {ids.model}/{ids.source}")
    return ids


def _known_feature(line: Line, ids: SourceIds, features: dict[int, dict], what: str) -> int:
    """The index of the feature an activation or explanation row belongs to, which must have a row."""
    _check_ids(line, ids)
    index = line.index()
    if index not in features:
        raise line.error(f"{what} of feature {index}, which has no row in features/")
    return index


# --- the sidecar ------------------------------------------------------------------------------


def _read_sidecar_coder(folder: Path) -> dict | None:
    path = folder / SIDECAR_DIR / SIDECAR_CODER_FILE
    if not (folder / SIDECAR_DIR).exists():
        return None
    if not path.is_file():
        raise StoreError(f"{folder / SIDECAR_DIR}: sidecar without {SIDECAR_CODER_FILE}")
    lines = list(read_jsonl(path))
    if len(lines) != 1:
        raise StoreError(f"{path}: expected one coder row, got {len(lines)}")
    line = lines[0]
    row = {name: line.row.get(name) for name in coders_schema().names}
    row["created_at"] = line.timestamp("created_at")
    conform_table({k: [v] for k, v in row.items()}, coders_schema(), f"{path}:1")  # types, before anything else
    return row


class _SidecarBatch:
    """The sidecar rows mirroring one Neuronpedia batch file, by `key` (index or id); each row of
    the batch file takes its own, and none may be left over."""

    def __init__(self, folder: Path, kind: str, batch: Path, key: str) -> None:
        self.path, self.kind, self.batch_name, self.key = sidecar_path(folder, kind, batch.name), kind, batch.name, key
        if not self.path.is_file():
            raise StoreError(f"{self.path}: missing (the sidecar must mirror every batch file of {kind}/)")
        self.rows: dict[str, Line] = {}
        for line in read_jsonl(self.path):
            value = line.text(key) if key == "id" else str(line.index())
            if value in self.rows:
                raise line.error(f"{key} {value!r} appears twice")
            self.rows[value] = line

    def take(self, line: Line, value: str, what: str) -> Line:
        """The sidecar row of `line` (keyed `value`, named `what` in the error)."""
        extra = self.rows.pop(value, None)
        if extra is None:
            raise line.error(f"{what} has no row in the featuredb sidecar")
        return extra

    def check_all_taken(self) -> None:
        if self.rows:
            shown = 3 if self.key == "index" else 2  # ids are long
            raise StoreError(f"{self.path}: has rows for {self.kind} {sorted(self.rows)[:shown]} "
                             f"that {self.batch_name} does not have")


# --- features ---------------------------------------------------------------------------------


def _feature_from_neuron(line: Line, extra: Line | None) -> dict:
    """Our feature columns from a Neuron row (and its sidecar row)."""
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
        row.update(histogram_from_bars(heights, centres, row["max_activation"]))
        row.update(top_logit_ids=[-1] * len(pos_str), bottom_logit_ids=[-1] * len(neg_str), description=None,
                   description_method=None, description_model=None, embedding_model=None, vector=None)
        return row
    row.update(_feature_columns_from_sidecar(extra))
    row["hist_counts"] = [int(h) for h in heights]
    extra.same_length("top_logit_ids", row["top_logit_ids"], "pos_str", pos_str)
    extra.same_length("bottom_logit_ids", row["bottom_logit_ids"], "neg_str", neg_str)
    return row


def _feature_columns_from_sidecar(extra: Line) -> dict:
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


def _features_table(coder: dict, features: dict[int, dict]) -> pa.Table:
    names = features_schema().names
    coder_columns = {name: coder[name] for name in ("coder_id", "model", "layer", "hook", "site")}
    rows = [{**{n: row.get(n) for n in names}, **coder_columns} for _, row in sorted(features.items())]
    return pa.Table.from_pylist(rows) if rows else pa.table({n: [] for n in names})


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


# --- activations ------------------------------------------------------------------------------


def _read_examples(folder: Path, ids: SourceIds, coder_id: str, features: dict[int, dict],
                   has_sidecar: bool) -> list[pa.Table]:
    """One table of example rows per activations batch file: column-wise where the fast path
    takes the file (fast_activations.py), line by line (naming the line of an error) otherwise."""
    tables = []
    next_rank: Counter = Counter()  # (feature, kind) -> next rank, without a sidecar
    known = pa.array(sorted(features), pa.int64())
    paths = batch_files(folder / "activations")
    groups = [(path, sidecar_path(folder, "activations", path.name)) if has_sidecar else (path,) for path in paths]
    for path, loaded in zip(paths, loading_ahead(groups)):
        table = read_activations_batch(loaded, ids, coder_id, known, next_rank)
        if table is None:
            table = _read_activations_by_line(folder, path, ids, coder_id, features, has_sidecar, next_rank)
        tables.append(table)
    return tables


def _read_activations_by_line(folder: Path, path: Path, ids: SourceIds, coder_id: str, features: dict[int, dict],
                              has_sidecar: bool, next_rank: Counter) -> pa.Table:
    sidecar = _SidecarBatch(folder, "activations", path, "id") if has_sidecar else None
    rows = []
    for line in read_jsonl(path):
        index = _known_feature(line, ids, features, "activation")
        extra = None
        if sidecar is not None:
            row_id = line.text("id")
            extra = sidecar.take(line, row_id, f"activation {row_id!r}")
        rows.append({"coder_id": coder_id, **_example_from_activation(line, index, extra)})
    if sidecar is not None:
        sidecar.check_all_taken()
    if not has_sidecar:
        assign_ranks(rows, next_rank)
    return pa.Table.from_pylist(rows, schema=examples_schema()) if rows else examples_schema().empty_table()


def _example_from_activation(line: Line, index: int, extra: Line | None) -> dict:
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


def _concat_or_empty(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables) if tables else schema.empty_table()


# --- explanations -----------------------------------------------------------------------------


def _read_explanations(folder: Path, ids: SourceIds, features: dict[int, dict], coder: dict,
                       has_sidecar: bool, imported_at: dt.datetime) -> list[dict]:
    """descriptions rows (only those that were descriptions rows, with a sidecar)."""
    rows: list[dict] = []
    for path in batch_files(folder / "explanations"):
        sidecar = _SidecarBatch(folder, "explanations", path, "id") if has_sidecar else None
        for line in read_jsonl(path):
            index = _known_feature(line, ids, features, "explanation")
            text = line.text("description")
            if not text.strip() or len(text) > MAX_DESCRIPTION_CHARS:
                raise line.error(f"description must be 1 to {MAX_DESCRIPTION_CHARS} characters")
            type_name, model = line.text("typeName", optional=True), line.text("explanationModelName", optional=True)
            base = {"coder_id": coder["coder_id"], "feature": index, "description": text, "explainer_model": model,
                    "indexed_at": coder["created_at"]}
            if sidecar is None:
                rows.append({**base, "method": "llm" if model else "manual", "explainer_source": NEURONPEDIA_SOURCE,
                             "prompt_version": type_name or "", "created_at": imported_at, "detection_score": None,
                             "fuzz_score": None, "detection_n": None, "fuzz_n": None, "score_details": None, "evidence": None})
                continue
            row_id = line.text("id")
            extra = sidecar.take(line, row_id, f"explanation {row_id!r}")
            if extra.text("from") == "descriptions":
                rows.append({**base, **_description_columns_from_sidecar(extra)})
        if sidecar is not None:
            sidecar.check_all_taken()
    return rows


def _description_columns_from_sidecar(extra: Line) -> dict:
    method = extra.text("method")
    if method not in METHOD_RANK:
        raise extra.error(f"method {method!r} is not one of {sorted(METHOD_RANK)}")
    scores = {name: extra.number(name, optional=True) for name in ("detection_score", "fuzz_score")}
    if any(s is not None and not 0.0 <= s <= 1.0 for s in scores.values()):
        raise extra.error("scores must be in [0, 1]")
    created_at = extra.timestamp("created_at")
    return {
        "method": method, "explainer_source": extra.text("explainer_source", optional=True),
        "prompt_version": extra.text("prompt_version"), "created_at": created_at, **scores,
        "detection_n": extra.integer("detection_n", optional=True), "fuzz_n": extra.integer("fuzz_n", optional=True),
        "score_details": extra.text("score_details", optional=True),
        "evidence": extra.text("evidence", optional=True),
    }
