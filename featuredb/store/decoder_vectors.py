"""Decoder directions, one table per decoder width: `decoders_<d>` (coder_id, feature, model, layer,
hook, site, space, vector[d]), each row a unit-norm decoder direction, for similarity search.

`space` names the basis a direction lives in, so only comparable directions are compared across
coders (the schema and the table names are in store/schema.py). The indexer writes a coder's rows
right after FeatureStore.write_coder (`write_decoder_vectors`); an import builds them first
(`decoder_rows`) and writes them as one step of its own all-or-nothing write
(`replace_decoder_rows`). The query layer searches them (featuredb.query.similar).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
from lancedb.table import Table

from featuredb.store.connect import connect
from featuredb.store.failures import Commits, all_or_nothing
from featuredb.store.feature_map import delete_map_rows
from featuredb.store.filters import Filter
from featuredb.store.schema import StoreError, decoders_schema, decoders_table_name, is_decoders_table, slot_of_features

if TYPE_CHECKING:  # feature_store builds on this module
    from featuredb.store.feature_store import FeatureStore


def decoder_space(site: str, hook_out: str) -> str:
    """"residual" when a direction adds into the residual stream as is (residual and MLP-out SAEs,
    transcoders), else the output hook itself (e.g. attention SAEs before o_proj)."""
    return "residual" if site in ("res", "mlp", "transcoder") else hook_out


def write_decoder_vectors(store: FeatureStore, coder_id: str, W_dec: Any, *, new: bool = False) -> int:
    """Store a coder's decoder directions W_dec [width, d_out] (torch tensor or numpy array) for
    similarity search, replacing what was stored for it. The coder must already be in the store's
    coders table. Rows are normalised; all-zero or non-finite rows are skipped. Returns rows written.
    new=True: the coder was just written for the first time (write_coder returned False), so it has
    no directions stored and they are appended, with no merge over the whole table."""
    coders = store.coders()
    rows = coders.filter(pl.col("coder_id") == coder_id)
    if rows.height == 0:
        raise StoreError(f"write_decoder_vectors: coder {coder_id!r} is not in the store (write_coder it first)")
    table_rows = decoder_rows(rows.row(0, named=True), W_dec)
    with all_or_nothing(f"decoder vectors of coder {coder_id!r}", store.uri) as commits:
        replace_decoder_rows(store, coder_id, table_rows, commits, new=new)
    return table_rows.num_rows


def decoder_rows(coder: Mapping[str, Any], W_dec: Any) -> pa.Table:
    """The decoders_<d> rows of W_dec [width, d_out] for `coder` (its coders-table row): unit rows,
    all-zero or non-finite rows skipped; StoreError if the shape does not fit the coder."""
    coder_id = coder["coder_id"]
    if hasattr(W_dec, "detach"):  # torch
        W_dec = W_dec.detach().float().cpu().numpy()
    matrix = np.asarray(W_dec, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != coder["width"]:
        raise StoreError(f"write_decoder_vectors: W_dec of {coder_id!r} has shape {matrix.shape}, "
                         f"expected [width={coder['width']}, d]")
    dim = matrix.shape[1]
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    good = np.isfinite(norms) & (norms > 0) & np.all(np.isfinite(matrix), axis=1)
    features = np.nonzero(good)[0].astype(np.int64)
    # Rows already of unit length (to float32 precision) are kept bit for bit, so writing stored
    # directions again (e.g. an export imported back) does not perturb their last bits.
    scale = np.where(np.abs(norms - 1.0) <= 1e-6, 1.0, norms)
    unit = (matrix[good] / scale[good, None]).astype(np.float32)
    n = len(features)
    layers, hooks = slot_of_features(coder, features)
    return pa.table({
        "coder_id": pa.array([coder_id] * n, pa.string()),
        "feature": pa.array(features),
        "model": pa.array([coder["model"]] * n, pa.string()),
        "layer": pa.array(layers),
        "hook": pa.array(hooks, pa.string()),
        "site": pa.array([coder["site"]] * n, pa.string()),
        "space": pa.array([decoder_space(coder["site"], coder["hook_out"])] * n, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(unit.reshape(-1), pa.float32()), dim),
    }, schema=decoders_schema(dim, pa.float32()))


def replace_decoder_rows(store: FeatureStore, coder_id: str, rows: pa.Table, commits: Commits, *,
                         new: bool = False) -> None:
    """The coder's decoder rows become `rows` (from `decoder_rows`); each commit is recorded in
    `commits`, so the caller can undo them with the rest of its write."""
    dim = rows.schema.field("vector").type.list_size
    name = decoders_table_name(dim)
    db = connect(store.uri)
    table = db.create_table(name, schema=decoders_schema(dim), exist_ok=True)
    rows = rows.cast(table.schema)  # float16 (float32 in a table written before)
    if new:
        commits.commit(table, lambda t: t.add(rows))
        return
    delete_map_rows(store, coder_id, commits)  # the map follows the directions: mapped again by finalize
    # a coder lives in one decoders table: drop rows a previous version left in another width
    for other in store.table_names():
        if is_decoders_table(other) and other != name:
            commits.commit(db.open_table(other), _delete_rows_of, coder_id)
    commits.commit(table, _replace_rows_of, coder_id, rows)


def _replace_rows_of(table: Table, coder_id: str, rows: pa.Table) -> None:
    """The coder's rows in `table` become `rows`, in one commit."""
    (
        table.merge_insert(["coder_id", "feature"])
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .when_not_matched_by_source_delete(Filter().eq("coder_id", coder_id).render(table.schema))
        .execute(rows)
    )


def _delete_rows_of(table: Table, coder_id: str) -> None:
    table.delete(Filter().eq("coder_id", coder_id).render(table.schema))


def delete_decoder_vectors(store: FeatureStore, coder_id: str, commits: Commits | None = None) -> None:
    """Remove a coder's decoder directions (a no-op where none are stored); with `commits`, each
    commit is recorded there for the caller to undo."""
    commits = commits if commits is not None else Commits()
    delete_map_rows(store, coder_id, commits)
    for name in store.table_names():
        if is_decoders_table(name):
            commits.commit(store.table(name), _delete_rows_of, coder_id)
