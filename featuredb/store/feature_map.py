"""The map of a catalogue: 2-D coordinates for every feature, UMAP of its decoder direction.

Features are mapped per group, one group per (model, decoder space) of the `decoders_<d>` tables
(store/decoder_vectors.py): only directions in the same basis are comparable. The coordinates are
rows of the `feature_map` table (schema.map_schema), written in one commit per group, so a rerun
of `finalize` reads two small columns, sees every group mapped, and does nothing.

How a group is mapped (MapConfig):
1. Up to `fit_rows` features (all of them in a small group, else a seeded random sample) are fitted
   with umap-learn. Their exact cosine neighbours are computed here with block matrix products and
   handed to UMAP (`precomputed_knn`): UMAP's own neighbour search (pynndescent) costs minutes of
   numba compilation on first use, the exact search seconds (docs/benchmarks.md, "The map").
2. The rest (groups larger than `fit_rows`) are streamed in batches: each is placed at the
   inverse-distance-weighted mean of the coordinates of its `place_neighbours` nearest fitted
   features, searched in the fitted sample's top `place_dims` principal components through cells
   of the sample (an IVF search, `_place_rest`). This is the starting point of UMAP's own
   `transform` without its refinement epochs (and without its numba compilation); memory is one
   read batch and the sample.
3. The group's rows replace its old ones in one commit.

A coder whose decoder directions are rewritten or deleted loses its map rows with them (see
decoder_vectors.replace_decoder_rows), so its group is mapped again by the next `finalize`.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featuredb.store.connect import connect
from featuredb.store.failures import writing
from featuredb.store.filters import Filter
from featuredb.store.schema import MAP_TABLE, StoreError, is_decoders_table, map_schema

if TYPE_CHECKING:
    from featuredb.store.feature_store import FeatureStore


@dataclass(frozen=True)
class MapConfig:
    """How features are laid out in 2-D (see the module docstring)."""

    seed: int = 0
    """Seeds the sample and UMAP: the same catalogue and seed give the same coordinates."""
    n_neighbors: int = 15
    """UMAP's neighbourhood size (its default): larger keeps more of the global layout."""
    min_dist: float = 0.1
    """UMAP's minimum distance between embedded points (its default)."""
    n_epochs: int = 200
    """UMAP's optimisation epochs (its own default above 10k points; fewer blur the clusters)."""
    fit_rows: int = 20_000
    """At most this many features of a group are fitted by UMAP; the rest are placed by neighbours."""
    place_neighbours: int = 10
    """Fitted features whose coordinates place each remaining feature."""
    place_dims: int = 64
    """Principal components of the fitted sample in which the remaining features' neighbours are found."""
    batch_rows: int = 2048
    """Rows a block of neighbour search holds against its candidates (memory: rows x candidates x 4 bytes)."""
    read_rows: int = 65_536
    """Decoder rows read at a time."""
    progress: bool = True
    """A progress bar with its rate while placing the remaining features."""


@dataclass
class MapResult:
    """What `compute_map` did, per group: features mapped and seconds."""

    groups: list[dict] = field(default_factory=list)

    @property
    def features(self) -> int:
        return sum(g["features"] for g in self.groups)

    @property
    def seconds(self) -> float:
        return sum(g["seconds"] for g in self.groups)


# --- which groups need mapping ---------------------------------------------------------------------


def _decoder_groups(store: FeatureStore) -> list[tuple[str, str, str, dict[str, int]]]:
    """(decoders table, model, space, {coder_id: rows}) of every group stored."""
    groups = []
    for name in sorted(n for n in store.table_names() if is_decoders_table(n)):
        keys = store.table(name).search().select(["model", "space", "coder_id"]).limit(None).to_arrow()
        for (model, space), counts in _counts_by_group(keys).items():
            groups.append((name, model, space, counts))
    return groups


def _counts_by_group(keys: pa.Table) -> dict[tuple[str, str], dict[str, int]]:
    """{(model, space): {coder_id: rows}} of a table's key columns."""
    if keys.num_rows == 0:
        return {}
    grouped = keys.group_by(["model", "space", "coder_id"]).aggregate([([], "count_all")])
    out: dict[tuple[str, str], dict[str, int]] = {}
    for row in grouped.to_pylist():
        out.setdefault((row["model"], row["space"]), {})[row["coder_id"]] = row["count_all"]
    return out


def _mapped_counts(store: FeatureStore) -> dict[tuple[str, str], dict[str, int]]:
    if MAP_TABLE not in store.table_names():
        return {}
    return _counts_by_group(store.table(MAP_TABLE).search().select(["model", "space", "coder_id"]).limit(None).to_arrow())


def stale_groups(store: FeatureStore) -> list[tuple[str, str, str]]:
    """The (decoders table, model, space) groups whose map rows do not match their decoder rows."""
    mapped = _mapped_counts(store)
    return [(name, model, space) for name, model, space, counts in _decoder_groups(store)
            if mapped.get((model, space)) != counts]


def umap_available() -> bool:
    """Whether umap-learn is installed (found, not imported: its import compiles for seconds)."""
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def compile_umap_in_background():
    """Start importing umap-learn in a low-priority process of its own and return it (None where
    umap-learn is not installed). Its import compiles pynndescent's numba functions (~15 s of one
    core on a fresh install) into numba's on-disk cache, so a job that maps later, after stages
    that leave a core idle, imports it from the cache instead. Wait for it before importing."""
    if not umap_available():
        return None
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import os; os.nice(10); import umap"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def update_map(store: FeatureStore, config: MapConfig = MapConfig(), *, force: bool = False) -> MapResult:
    """Map the groups that are not mapped yet (force=True: every group) and drop the map rows of
    groups that no longer exist."""
    groups = _decoder_groups(store)
    mapped = _mapped_counts(store)
    todo = [(name, model, space) for name, model, space, counts in groups
            if force or mapped.get((model, space)) != counts]
    result = MapResult()
    for name, model, space in todo:
        result.groups.append(map_group(store, name, model, space, config))
    gone = set(mapped) - {(model, space) for _, model, space, _ in groups}
    if gone:
        table = store.table(MAP_TABLE)
        with writing("the feature map", store.uri):
            for model, space in sorted(gone):
                table.delete(Filter().eq("model", model).eq("space", space).render(table.schema))
    return result


def delete_map_rows(store: FeatureStore, coder_id: str, commits) -> None:
    """Drop a coder's map rows (its decoder directions changed), recorded in `commits`."""
    if MAP_TABLE in store.table_names():
        table = store.table(MAP_TABLE)
        commits.commit(table, lambda t: t.delete(Filter().eq("coder_id", coder_id).render(t.schema)))


# --- mapping one group -----------------------------------------------------------------------------


def map_group(store: FeatureStore, table_name: str, model: str, space: str, config: MapConfig = MapConfig()) -> dict:
    """Compute and store the coordinates of one group; returns {model, space, features, fitted,
    seconds, fit_seconds, place_seconds}."""
    started = time.perf_counter()
    table = store.table(table_name)
    where = Filter().eq("model", model).eq("space", space).render(table.schema)
    rows = table.count_rows(where)
    rng = np.random.default_rng(config.seed)
    fit_mask = np.zeros(rows, dtype=bool)
    fit_mask[rng.choice(rows, size=min(rows, config.fit_rows), replace=False)] = True
    keys, fit_vectors = _read_keys_and_sample(table, where, fit_mask, config)
    if keys.num_rows != rows:
        raise StoreError(f"map: the decoders of {model!r} ({space}) changed while being read; run it again")
    if config.progress:
        print(f"mapping {rows:,} features of {space} ({model}): UMAP of {int(fit_mask.sum()):,}", file=sys.stderr,
              flush=True)

    coords = np.zeros((rows, 2), dtype=np.float32)
    coords[fit_mask] = fit_coordinates(fit_vectors, config)
    fit_seconds = time.perf_counter() - started
    if not fit_mask.all():
        placed, placed_keys = _place_rest(table, where, fit_mask, fit_vectors, coords[fit_mask], config)
        rest = pa.array(np.nonzero(~fit_mask)[0])
        if not (placed_keys.equals(keys.select(["coder_id", "feature"]).take(rest))):  # two scans, one order
            raise StoreError(f"map: the decoders of {model!r} ({space}) changed while being read; run it again")
        coords[~fit_mask] = placed
    place_seconds = time.perf_counter() - started - fit_seconds

    out = pa.table({
        "coder_id": keys["coder_id"], "feature": keys["feature"],
        "model": pa.array([model] * rows, pa.string()), "space": pa.array([space] * rows, pa.string()),
        "layer": keys["layer"], "density": _densities(store, keys), "x": pa.array(coords[:, 0]), "y": pa.array(coords[:, 1]),
    }, schema=map_schema())
    _replace_group(store, model, space, out)
    return {"model": model, "space": space, "features": rows, "fitted": int(fit_mask.sum()),
            "seconds": time.perf_counter() - started, "fit_seconds": fit_seconds, "place_seconds": place_seconds}


def _batches(table, where: str, columns: list[str], config: MapConfig):
    return table.search().where(where).select(columns).limit(None).to_batches(batch_size=config.read_rows)


def _unit_vectors(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    column = batch.column(batch.schema.get_field_index("vector"))
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    # stored unit rows, rounded to float16: renormalised so that a dot product is a cosine
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def _read_keys_and_sample(table, where: str, fit_mask: np.ndarray, config: MapConfig) -> tuple[pa.Table, np.ndarray]:
    """Every row's key columns and the fitted rows' unit vectors, in one streamed pass."""
    keys, sample, start = [], [], 0
    for batch in _batches(table, where, ["coder_id", "feature", "layer", "vector"], config):
        n = batch.num_rows
        keys.append(pa.Table.from_batches([batch.select(["coder_id", "feature", "layer"])]))
        chosen = fit_mask[start:start + n] if start + n <= len(fit_mask) else np.zeros(n, dtype=bool)
        if chosen.any():
            sample.append(_unit_vectors(batch)[chosen])
        start += n
    dim = table.schema.field("vector").type.list_size
    key_table = pa.concat_tables(keys) if keys else pa.table({"coder_id": pa.array([], pa.string()),
                                                              "feature": pa.array([], pa.int64()),
                                                              "layer": pa.array([], pa.int32())})
    return key_table, np.concatenate(sample) if sample else np.zeros((0, dim), np.float32)


def exact_neighbours(vectors: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each unit row's k nearest rows by cosine (itself first), as (indices, cosine distances)."""
    n = len(vectors)
    k = min(k, n)
    indices = np.empty((n, k), dtype=np.int32)
    distances = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, block):
        similarity = vectors[start:start + block] @ vectors.T
        rows = np.arange(similarity.shape[0])
        similarity[rows, start + rows] = np.inf  # itself first, even beside a duplicate direction
        part = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(similarity, part, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        indices[start:start + block] = np.take_along_axis(part, order, axis=1)
        distances[start:start + block] = np.clip(1.0 - np.take_along_axis(values, order, axis=1), 0.0, 2.0)
    distances[:, 0] = 0.0
    return indices, distances


def fit_coordinates(vectors: np.ndarray, config: MapConfig = MapConfig()) -> np.ndarray:
    """UMAP coordinates [n, 2] of unit vectors [n, d], seeded. A handful of vectors (too few for a
    neighbour graph) get their top two principal components instead."""
    n = len(vectors)
    if n <= config.n_neighbors + 1:
        return _principal_coordinates(vectors)
    try:
        import umap
    except ImportError:
        raise StoreError("the map needs umap-learn: pip install umap-learn (or featuredb[map])") from None
    indices, distances = exact_neighbours(vectors, config.n_neighbors)
    reducer = umap.UMAP(n_components=2, n_neighbors=config.n_neighbors, min_dist=config.min_dist, metric="cosine",
                        n_epochs=config.n_epochs, random_state=config.seed, precomputed_knn=(indices, distances, None))
    with warnings.catch_warnings():  # n_jobs=1 under a seed, and the precomputed neighbours: said by design
        warnings.simplefilter("ignore")
        coords = reducer.fit_transform(vectors)
    return np.asarray(coords, dtype=np.float32)


def _principal_coordinates(vectors: np.ndarray) -> np.ndarray:
    coords = np.zeros((len(vectors), 2), dtype=np.float32)
    if len(vectors) > 1:
        centred = vectors - vectors.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projected = centred @ vt[:2].T
        coords[:, :projected.shape[1]] = projected
    return coords


def _place_rest(table, where: str, fit_mask: np.ndarray, fit_vectors: np.ndarray, fit_coords: np.ndarray,
                config: MapConfig) -> tuple[np.ndarray, pa.Table]:
    """Coordinates of the rows not fitted, in row order, streamed (see the module docstring), and
    their keys (the caller checks that this second scan read the rows in the first one's order).

    Neighbours are searched like an IVF index: the sample is cut into cells (a few k-means
    iterations), and a row is compared with the sample points of the `PROBE_CELLS` cells nearest
    to its own cell's centre, not with the whole sample (1M rows x 20k sample would be minutes of
    distance computations; this is ~1k candidates a row)."""
    from tqdm import tqdm

    mean = fit_vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(fit_vectors - mean, full_matrices=False)
    basis = vt[:config.place_dims].T.astype(np.float32)  # [d, place_dims]
    sample = ((fit_vectors - mean) @ basis).astype(np.float32)
    cells = _cells(sample, config.seed)
    placed, placed_keys, start = [], [], 0
    bar = tqdm(total=int((~fit_mask).sum()), unit="feature", unit_scale=True, desc="placing on the map",
               file=sys.stderr, disable=not config.progress)
    for batch in _batches(table, where, ["coder_id", "feature", "vector"], config):
        n = batch.num_rows
        rest = ~fit_mask[start:start + n]
        start += n
        if not rest.any():
            continue
        placed_keys.append(pa.Table.from_batches([batch.select(["coder_id", "feature"])]).filter(pa.array(rest)))
        points = ((_unit_vectors(batch)[rest] - mean) @ basis).astype(np.float32)
        coords = np.empty((len(points), 2), np.float32)
        home = _nearest_centre(points, cells.centres)
        for cell in np.unique(home):
            rows = np.nonzero(home == cell)[0]
            candidates = cells.candidates[cell]
            k = min(config.place_neighbours, len(candidates))
            for block in range(0, len(rows), config.batch_rows):
                part = rows[block:block + config.batch_rows]
                d2 = ((points[part] ** 2).sum(1, keepdims=True) + cells.norms[candidates][None, :]
                      - 2.0 * points[part] @ sample[candidates].T)
                nearest = np.argpartition(d2, k - 1, axis=1)[:, :k]
                weights = 1.0 / (np.sqrt(np.maximum(np.take_along_axis(d2, nearest, axis=1), 0.0)) + 1e-3)
                weights /= weights.sum(axis=1, keepdims=True)
                coords[part] = (weights[:, :, None] * fit_coords[candidates[nearest]]).sum(axis=1)
        placed.append(coords)
        bar.update(len(points))
    bar.close()
    if not placed:
        return np.zeros((0, 2), np.float32), pa.table({"coder_id": pa.array([], pa.string()), "feature": pa.array([], pa.int64())})
    return np.concatenate(placed), pa.concat_tables(placed_keys).combine_chunks()


PROBE_CELLS = 8  # cells whose sample points are a placed row's candidate neighbours
SAMPLE_PER_CELL = 128


@dataclass(frozen=True)
class _Cells:
    centres: np.ndarray  # [cells, dims]
    candidates: list[np.ndarray]  # per cell: the sample rows of it and its nearest cells
    norms: np.ndarray  # squared norms of the sample rows


def _nearest_centre(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return np.argmin((centres ** 2).sum(1)[None, :] - 2.0 * points @ centres.T, axis=1)


def _cells(sample: np.ndarray, seed: int, iterations: int = 5) -> _Cells:
    """The sample cut into ~SAMPLE_PER_CELL-point cells by a few seeded k-means iterations."""
    count = max(1, min(256, len(sample) // SAMPLE_PER_CELL))
    rng = np.random.default_rng(seed)
    centres = sample[rng.choice(len(sample), size=count, replace=False)].copy()
    for _ in range(iterations):
        home = _nearest_centre(sample, centres)
        for cell in range(count):
            members = sample[home == cell]
            if len(members):
                centres[cell] = members.mean(axis=0)
    home = _nearest_centre(sample, centres)
    members = [np.nonzero(home == cell)[0] for cell in range(count)]
    between = (centres ** 2).sum(1)[None, :] - 2.0 * centres @ centres.T
    probes = np.argsort(between, axis=1, kind="stable")[:, :min(PROBE_CELLS, count)]
    candidates = [np.concatenate([members[c] for c in probes[cell]]) for cell in range(count)]
    # a cell whose neighbourhood came out empty (never in practice) searches the whole sample
    candidates = [c if len(c) else np.arange(len(sample)) for c in candidates]
    return _Cells(centres, candidates, (sample ** 2).sum(1))


def _densities(store: FeatureStore, keys: pa.Table) -> pa.Array:
    """The features' densities in the order of `keys` (null where the feature has no row)."""
    from featuredb.store.schema import FEATURES_TABLE

    if FEATURES_TABLE not in store.table_names() or keys.num_rows == 0:
        return pa.nulls(keys.num_rows, pa.float32())
    features = store.table(FEATURES_TABLE)
    coder_ids = pc.unique(keys["coder_id"]).to_pylist()
    stored = features.search().where(Filter().isin("coder_id", coder_ids).render(features.schema)) \
        .select(["coder_id", "feature", "density"]).limit(None).to_arrow()
    joined = keys.select(["coder_id", "feature"]).append_column("order", pa.array(np.arange(keys.num_rows))) \
        .join(stored, ["coder_id", "feature"], join_type="left outer").sort_by("order")
    return joined["density"].cast(pa.float32()).combine_chunks()


def _replace_group(store: FeatureStore, model: str, space: str, rows: pa.Table) -> None:
    """The group's map rows become `rows`, in one commit."""
    db = connect(store.uri)
    with writing(f"the map of {model!r} ({space})", store.uri):
        table = db.create_table(MAP_TABLE, schema=map_schema(), exist_ok=True)
        (
            table.merge_insert(["coder_id", "feature"])
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .when_not_matched_by_source_delete(Filter().eq("model", model).eq("space", space).render(table.schema))
            .execute(rows)
        )


# --- reading ---------------------------------------------------------------------------------------


_GROUPS_CACHE: dict[tuple[str, int], list[dict]] = {}  # (uri, map table version) -> map_groups


def map_version(store: FeatureStore) -> int | None:
    """The map table's version (None: no map), which changes with every write of it."""
    return store.table(MAP_TABLE).version if MAP_TABLE in store.table_names() else None


def map_groups(store: FeatureStore) -> list[dict]:
    """The mapped groups: {model, space, coders: {coder_id: features}}, largest first (counted
    once per version of the map table: 2 s at 1M features)."""
    version = map_version(store)
    if version is None:
        return []
    key = (store.uri, version)
    if key not in _GROUPS_CACHE:
        groups = [{"model": model, "space": space, "coders": dict(sorted(counts.items()))}
                  for (model, space), counts in _mapped_counts(store).items()]
        _GROUPS_CACHE.clear()  # one catalogue's, at its latest version
        _GROUPS_CACHE[key] = sorted(groups, key=lambda g: (-sum(g["coders"].values()), g["model"], g["space"]))
    return _GROUPS_CACHE[key]


def read_map(store: FeatureStore, coder_ids: list[str]) -> pa.Table:
    """The map rows of these coders (coder_id, feature, layer, density, x, y), sorted by coder and
    feature; empty when the catalogue has no map."""
    columns = ["coder_id", "feature", "layer", "density", "x", "y"]
    if MAP_TABLE not in store.table_names() or not coder_ids:
        return map_schema().empty_table().select(columns)
    table = store.table(MAP_TABLE)
    rows = table.search().where(Filter().isin("coder_id", sorted(coder_ids)).render(table.schema)) \
        .select(columns).limit(None).to_arrow()
    return rows.sort_by([("coder_id", "ascending"), ("feature", "ascending")])


__all__ = ["MapConfig", "MapResult", "delete_map_rows", "exact_neighbours", "fit_coordinates", "map_group",
           "map_groups", "read_map", "stale_groups", "umap_available", "update_map"]
