"""The fast path for an activations batch file, the bulk of a source (tens of rows per feature,
each a context's tokens and values): the file (and its sidecar batch) read column-wise
(columnar.py), checked with vectorised versions of what read_source._example_from_activation
checks per line, and turned into the same examples rows, in the same order.

None means "read it line by line": for any file the slow path rejects, and for anything unusual
it might accept (the slow path then decides), so errors keep their file:line and wording."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featuredb.store.schema import examples_schema
from featuredb.store.neuronpedia.columnar import (
    all_true,
    casts,
    equal_to,
    feature_indices,
    finite,
    list_lengths,
    plain_list,
    parse_table,
    required,
    same_lengths,
)
from featuredb.store.neuronpedia.format import TOP_MARKER, SourceIds

# The fields the slow path reads (it ignores the others, so Arrow must too), as Python's json
# gives them: a JSON int where a number is expected becomes a float, as `Line.number` does.
_ACTIVATION_FIELDS = {
    "modelId": pa.string(), "layer": pa.string(), "tokens": pa.list_(pa.string()), "values": pa.list_(pa.float64()),
    "maxValueTokenIndex": pa.int64(), "maxValue": pa.float64(), "binMin": pa.float64(), "binMax": pa.float64(),
}
_SIDECAR_FIELDS = {"id": pa.string(), "rank": pa.int64(), "token_ids": pa.list_(pa.int64()), "doc_id": pa.string(),
                   "context_index": pa.int64()}


def read_activations_batch(loaded: tuple[bytes | None, ...], ids: SourceIds, coder_id: str, known: pa.Array,
                           next_rank: Counter) -> pa.Table | None:
    """The examples rows of one activations batch file, from `loaded`: the checked bytes of the
    file and, with a sidecar, of its sidecar batch (columnar.load_jsonl); `known`: the source's
    feature indices; `next_rank` as for assign_ranks (without a sidecar), updated only on success.
    None: read it line by line."""
    has_sidecar = len(loaded) == 2
    fields = {**_ACTIVATION_FIELDS, "id": pa.string()} if has_sidecar else _ACTIVATION_FIELDS
    table = parse_table(loaded[0], fields, with_index=True)
    columns = _activation_columns(table, ids, known) if table is not None else None
    if columns is None:
        return None
    if has_sidecar:
        extra = _sidecar_columns(loaded[1], table["id"], columns["tokens"])
        if extra is None:
            return None
        return _examples_table(coder_id, {**columns, **extra})
    ranked = _ranked(columns, next_rank)
    return _examples_table(coder_id, _without_sidecar(ranked)) if ranked is not None else None


def _activation_columns(table: pa.RecordBatch, ids: SourceIds, known: pa.Array) -> dict | None:
    """Our example columns from Neuronpedia's (stored types; bin_min / max_value also as read,
    for ranking), after the checks of _known_feature and _example_from_activation."""
    model, source = table["modelId"], table["layer"]
    if not (required(model) and required(source) and equal_to(model, ids.model) and equal_to(source, ids.source)):
        return None
    index = feature_indices(table["index"])
    if index is None or not all_true(pc.is_in(index, value_set=known)):
        return None
    tokens, values, peak = table["tokens"], table["values"], table["maxValueTokenIndex"]
    if not (plain_list(tokens) and plain_list(values, finite_values=True) and same_lengths(tokens, values)):
        return None
    if not (required(peak) and all_true(pc.and_(pc.greater_equal(peak, 0), pc.less(peak, list_lengths(tokens))))):
        return None  # (peak < length also rules out no tokens)
    bin_min, bin_max, max_value = table["binMin"], table["binMax"], table["maxValue"]
    if not (finite(bin_min) and finite(bin_max) and required(max_value) and finite(max_value)):
        return None
    is_top = pc.fill_null(pc.equal(bin_min, TOP_MARKER), True)  # no binMin, or SAEDashboard's marker
    if not all_true(pc.or_(is_top, pc.is_valid(bin_max))):
        return None  # an interval activation needs binMax
    no_bin = pa.scalar(None, pa.float64())
    bin_min, bin_max = pc.if_else(is_top, no_bin, bin_min), pc.if_else(is_top, no_bin, bin_max)
    stored = casts([bin_min, bin_max, values, max_value, peak],
                   [pa.float32(), pa.float32(), pa.list_(pa.float32()), pa.float32(), pa.int32()])
    if stored is None:
        return None
    return {"feature": index, "kind": pc.if_else(is_top, "top", "interval"), "is_top": is_top,
            "bin_min_read": bin_min, "max_value_read": max_value, "tokens": tokens,
            **dict(zip(("bin_min", "bin_max", "values", "max_value", "max_position"), stored))}


def _sidecar_columns(data: bytes | None, row_ids: pa.Array, tokens: pa.Array) -> dict | None:
    """rank, token_ids, doc_id and context_index from the sidecar batch, in the order of `row_ids`,
    if its rows and the batch's pair up one to one by id (as _SidecarBatch.take requires)."""
    side = parse_table(data, _SIDECAR_FIELDS, with_index=False)
    if side is None or side.num_rows != len(row_ids) or not (required(row_ids) and required(side["id"])):
        return None
    if not row_ids.equals(side["id"]):  # our export writes both in the same order
        if pc.count_distinct(row_ids).as_py() != len(row_ids):
            return None
        position = pc.index_in(row_ids, value_set=side["id"])  # n distinct ids, all among n: one to one
        if position.null_count:
            return None
        side = side.take(position)
    elif pc.count_distinct(row_ids).as_py() != len(row_ids):
        return None
    token_ids = side["token_ids"]
    if not (required(side["rank"]) and required(side["doc_id"]) and required(side["context_index"])
            and plain_list(token_ids) and same_lengths(token_ids, tokens)):
        return None
    stored = casts([side["rank"], token_ids], [pa.int32(), pa.list_(pa.int32())])
    if stored is None:
        return None
    return {"rank": stored[0], "token_ids": stored[1], "doc_id": side["doc_id"], "context_index": side["context_index"]}


def _ranked(columns: dict, next_rank: Counter) -> dict | None:
    """Without a sidecar: the rows in assign_ranks' order (a stable sort by feature, kind, bin_min
    and descending max value, on the values as read) with its ranks, continuing `next_rank`."""
    feature = columns["feature"].to_numpy()
    is_top = columns["is_top"].to_numpy(zero_copy_only=False)
    bin_key = _no_negative_zero(pc.fill_null(columns["bin_min_read"], 0.0).to_numpy())
    descending = _no_negative_zero(-columns["max_value_read"].to_numpy())
    order = np.lexsort((descending, bin_key, is_top, feature))  # last key first; stable ("interval" < "top")
    feature, is_top = feature[order], is_top[order]
    starts_group = np.ones(len(order), dtype=bool)
    starts_group[1:] = (feature[1:] != feature[:-1]) | (is_top[1:] != is_top[:-1])
    starts = np.flatnonzero(starts_group)
    group = np.cumsum(starts_group) - 1
    keys = [(int(feature[s]), "top" if is_top[s] else "interval") for s in starts]
    rank = np.array([next_rank[k] for k in keys], dtype=np.int64)[group] + np.arange(len(order)) - starts[group]
    if len(rank) and rank.max() > np.iinfo(np.int32).max:
        return None
    for key, size in zip(keys, np.diff(np.append(starts, len(order)))):
        next_rank[key] += int(size)
    sorted_columns = {name: columns[name] if _is_identity(order) else columns[name].take(pa.array(order))
                      for name in ("feature", "kind", "bin_min", "bin_max", "tokens", "values", "max_value",
                                   "max_position")}
    return {**sorted_columns, "rank": pa.array(rank.astype(np.int32))}


def _without_sidecar(columns: dict) -> dict:
    """The columns only our sidecar knows, as the slow path fills them: unknown token ids (-1)."""
    lengths = list_lengths(columns["tokens"]).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    token_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.full(offsets[-1], -1, dtype=np.int32)))
    n = len(lengths)
    return {**columns, "token_ids": token_ids, "doc_id": pa.array([""] * n, pa.string()),
            "context_index": pa.array(np.full(n, -1, dtype=np.int64))}


def _examples_table(coder_id: str, columns: dict) -> pa.Table:
    n = len(columns["feature"])
    columns = {**columns, "coder_id": pa.array([coder_id] * n, pa.string())}
    schema = examples_schema()
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def _no_negative_zero(values: np.ndarray) -> np.ndarray:
    """-0.0 as 0.0: Python's sort sees them equal (a stable sort keeps their order)."""
    return np.where(values == 0.0, 0.0, values)


def _is_identity(order: np.ndarray) -> bool:
    return bool(np.array_equal(order, np.arange(len(order))))
