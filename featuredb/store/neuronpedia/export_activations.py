"""Activation rows of an export built column-wise (polars) rather than as one Python dict per
example: a source has tens of examples per feature, each with a context's tokens and values, and
per-row dicts plus json.dumps were most of an export's time. Same fields, field order and values
as Neuronpedia's Activation rows (the mapping: export.py's docstring); numbers are written as
float64, so a stored float32 reads back as exactly the double json.dumps would have written."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from featuredb.store.neuronpedia.format import CREATOR_ID, TOP_MARKER, stable_id


def activation_frames(examples: pa.Table, features: dict[int, dict], model: str, source_id: str
                      ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(Neuronpedia Activation rows, sidecar rows) for the examples of some features (`features`:
    their rows, by index), ordered by feature, kind and rank."""
    df = pl.from_arrow(examples).sort(["feature", "kind", "rank"], maintain_order=True)
    keys = df.select("feature", "kind", "rank").rows()
    ids = pl.Series("id", [stable_id(model, source_id, *key) for key in keys], pl.String)
    source_keys = [pl.lit(model, pl.String).alias("modelId"), pl.lit(source_id, pl.String).alias("layer"),
                   pl.col("feature").cast(pl.String).alias("index")]
    bins = _bins(df, features)
    neuronpedia = df.select(
        ids, *source_keys, pl.lit(CREATOR_ID, pl.String).alias("creatorId"), pl.lit(None).alias("dataSource"),
        "tokens", pl.col("max_value").cast(pl.Float64).alias("maxValue"),
        pl.col("values").list.min().cast(pl.Float64).fill_null(0.0).alias("minValue"),
        pl.col("values").cast(pl.List(pl.Float64)).alias("values"),
        pl.col("max_position").alias("maxValueTokenIndex"),
        pl.lit([], pl.List(pl.Float64)).alias("dfaValues"), pl.lit(None).alias("dfaMaxValue"),
        pl.lit(None).alias("dfaTargetIndex"), *bins,
    )
    sidecar = df.select(ids, *source_keys, "rank", "token_ids", "doc_id", "context_index")
    return neuronpedia, sidecar


def _bins(df: pl.DataFrame, features: dict[int, dict]) -> list[pl.Series]:
    """binMin, binMax, binContains: SAEDashboard's markers for top examples (-1, the feature's max,
    -1), the interval and the fraction of the feature's activations in it for interval ones."""
    low, high, contains = [], [], []
    fractions: dict[tuple, float | None] = {}  # an interval's examples share their fraction
    for index, kind, bin_min, bin_max in df.select("feature", "kind", "bin_min", "bin_max").iter_rows():
        feature = features[index]
        if kind == "top":
            low.append(TOP_MARKER), high.append(feature["max_activation"]), contains.append(TOP_MARKER)
            continue
        key = (index, bin_min, bin_max)
        if key not in fractions:
            fractions[key] = bin_fraction(feature["hist_counts"], feature["hist_max"], bin_min, bin_max)
        low.append(bin_min), high.append(bin_max), contains.append(fractions[key])
    return [pl.Series(name, values, pl.Float64) for name, values in
            (("binMin", low), ("binMax", high), ("binContains", contains))]


def bin_fraction(counts: list[int], hist_max: float, low: float, high: float) -> float | None:
    """The fraction of the feature's activations in [low, high), from histogram bin centres."""
    total = sum(counts)
    if not counts or total == 0:
        return None
    width = hist_max / len(counts)
    inside = sum(c for i, c in enumerate(counts) if low <= (i + 0.5) * width < high)
    return inside / total
