"""The map of a catalogue as the query layer reads it: which coders a map shows, their points, and
a static PNG of them (a numpy rasteriser and a zlib PNG writer: no plotting library).

The coordinates are computed by store/feature_map.py (on `finalize`, or `featuredb map`). Points
of different groups (model, decoder space) are separate UMAPs, so one map shows one group.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import polars as pl

from featuredb.errors import NotFound, QueryError
from featuredb.store.feature_map import map_groups, read_map

# The colours of the page and of the PNG (Tableau 10, then a ramp for layer and density).
CODER_COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                 "#9c755f", "#bab0ac"]
RAMP = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]  # viridis stops: low to high
COLOUR_BY = ("coder", "layer", "density")
NO_MAP = "the catalogue has no map yet: run `featuredb map --db DB` (needs umap-learn)"


@dataclass(frozen=True)
class MapSelection:
    """The group a map shows and its chosen coders."""

    model: str
    space: str
    coder_ids: list[str]  # sorted
    groups: list[dict]  # every mapped group (store.feature_map.map_groups)


def select(store, coder_ids: list[str] | None, known: set[str]) -> MapSelection:
    """The chosen coders (default: the largest group's), all in one group; NotFound for a coder the
    catalogue does not hold, QueryError for one that is not mapped or coders of two groups."""
    groups = map_groups(store)
    if not groups:
        raise NotFound(NO_MAP)
    if not coder_ids:
        first = groups[0]
        return MapSelection(first["model"], first["space"], sorted(first["coders"]), groups)
    unknown = sorted(set(coder_ids) - known)
    if unknown:
        raise NotFound(f"unknown coder_id {unknown[0]!r}")
    chosen = sorted(set(coder_ids))
    group_of = {c: g for g in groups for c in g["coders"]}
    unmapped = [c for c in chosen if c not in group_of]
    if unmapped:
        raise QueryError(f"coder {unmapped[0]!r} is not on the map yet (run `featuredb map --db DB`)")
    spaces = {(group_of[c]["model"], group_of[c]["space"]) for c in chosen}
    if len(spaces) > 1:
        raise QueryError("these coders are mapped in different spaces (model or decoder space): choose coders of one")
    model, space = spaces.pop()
    return MapSelection(model, space, chosen, groups)


def points(store, selection: MapSelection) -> pl.DataFrame:
    """The chosen coders' points: coder_id, feature, layer, density, x, y (by coder, then feature)."""
    return pl.from_arrow(read_map(store, selection.coder_ids))  # type: ignore[return-value]


# --- a static image --------------------------------------------------------------------------------


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)


def point_colours(frame: pl.DataFrame, colour_by: str, coder_ids: list[str]) -> np.ndarray:
    """RGB [n, 3] of each point: its coder's colour, or its layer / log-density on the ramp."""
    if colour_by not in COLOUR_BY:
        raise QueryError(f"colour by one of {', '.join(COLOUR_BY)}, not {colour_by!r}")
    if colour_by == "coder":
        palette = np.stack([_rgb(c) for c in CODER_COLOURS])
        index = {c: i % len(CODER_COLOURS) for i, c in enumerate(coder_ids)}
        return palette[frame["coder_id"].replace_strict(index, return_dtype=pl.Int64).to_numpy()]
    values = frame["layer"].cast(pl.Float64).to_numpy() if colour_by == "layer" else \
        np.log10(np.maximum(frame["density"].fill_null(0).cast(pl.Float64).to_numpy(), 1e-7))
    low, high = (values.min(), values.max()) if len(values) else (0.0, 1.0)
    t = (values - low) / (high - low) if high > low else np.zeros_like(values)
    stops = np.stack([_rgb(c) for c in RAMP])
    position = t * (len(RAMP) - 1)
    left = np.minimum(position.astype(int), len(RAMP) - 2)
    frac = (position - left)[:, None]
    return stops[left] * (1 - frac) + stops[left + 1] * frac


def rasterise(x: np.ndarray, y: np.ndarray, colours: np.ndarray, size: int = 800, margin: int = 12) -> np.ndarray:
    """An RGB image [size, size, 3] (uint8, white ground) of the points: each pixel the mean colour
    of the points on it, more opaque the more points it holds."""
    image = np.full((size, size, 3), 255.0, dtype=np.float64)
    if len(x) == 0:
        return image.astype(np.uint8)
    # framed on all but the outermost 0.2% each side (a few far-off points would shrink the rest);
    # the points outside the frame are left out
    x0, y0 = np.percentile(x, 0.2, method="lower"), np.percentile(y, 0.2, method="lower")
    x1, y1 = np.percentile(x, 99.8, method="higher"), np.percentile(y, 99.8, method="higher")
    pad = 0.03 * max(x1 - x0, y1 - y0, 1e-9)
    x0, x1, y0, y1 = x0 - pad, x1 + pad, y0 - pad, y1 + pad
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    x, y, colours = x[inside], y[inside], colours[inside]
    scale = (size - 2 * margin - 1) / max(x1 - x0, y1 - y0)
    cx = margin + ((x - x0) * scale + (size - 2 * margin - 1 - (x1 - x0) * scale) / 2)
    cy = margin + ((y1 - y) * scale + (size - 2 * margin - 1 - (y1 - y0) * scale) / 2)
    # a point covers dot x dot pixels: few points are drawn larger so that they show
    dot = 3 if len(x) <= 30_000 else 2 if len(x) <= 300_000 else 1
    counts = np.zeros(size * size)
    sums = np.zeros((size * size, 3))
    for dy in range(dot):
        for dx in range(dot):
            pixel = np.clip(cy.astype(np.int64) + dy, 0, size - 1) * size + np.clip(cx.astype(np.int64) + dx, 0, size - 1)
            counts += np.bincount(pixel, minlength=size * size)
            sums += np.stack([np.bincount(pixel, weights=colours[:, c], minlength=size * size) for c in range(3)], axis=1)
    held = counts > 0
    mean = np.zeros_like(sums)
    mean[held] = sums[held] / counts[held, None]
    alpha = np.zeros(size * size)
    alpha[held] = 0.6 + 0.4 * np.minimum(1.0, np.log1p(counts[held]) / np.log1p(8))
    flat = image.reshape(-1, 3)
    flat[:] = flat * (1 - alpha[:, None]) + mean * alpha[:, None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 image [h, w, 3] as a PNG file (8-bit truecolour, no filter, zlib level 9)."""
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + chunk(b"IEND", b""))


def map_png(frame: pl.DataFrame, coder_ids: list[str], colour_by: str = "coder", size: int = 800) -> bytes:
    """The PNG of a map's points (from `points`)."""
    colours = point_colours(frame, colour_by, coder_ids)
    return png_bytes(rasterise(frame["x"].to_numpy(), frame["y"].to_numpy(), colours, size=size))


__all__ = ["CODER_COLOURS", "COLOUR_BY", "MapSelection", "NO_MAP", "RAMP", "map_png", "png_bytes", "point_colours",
           "points", "rasterise", "select"]
