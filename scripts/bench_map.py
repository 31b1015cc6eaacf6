"""The map (issue 25): time to compute it and to load the /map page, on a catalogue or on a
synthetic decoder set.

    cp -r /tmp/demo-before/featuredb-demo/catalogue /tmp/bench-map/cat11k     # work on a copy
    python scripts/bench_map.py --db /tmp/bench-map/cat11k
    python scripts/bench_map.py --synthetic 1M --dim 256 --db /tmp/bench-map/syn1m

--synthetic N writes a catalogue of N decoder directions (4 coders of N/4 features, clustered
around 2,000 seeded centres so that the map has structure; no feature rows), then:
1. `import umap` (numba's first compilation, if its cache is cold) and the map, forced, in this
   process: UMAP compiles its layout functions on every first fit in a process (they are not cached);
2. a rerun of `update_map` with nothing to do (what every later `finalize` costs);
3. the page: `featuredb serve` in a thread, headless Chromium opens /map and waits for every point
   to be drawn (navigation to drawn, the points' fetch and parse, one draw), then one zoom redraw.
Prints each figure and one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's uvicorn thread and Chromium finder
from serving import CHROMIUM_ARGS, chromium, serving  # noqa: E402


def parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def write_synthetic(db: str, n: int, dim: int, seed: int = 0, coders: int = 4, centres: int = 2000) -> float:
    """A catalogue of `n` clustered unit decoder directions in one residual space; returns seconds."""
    import datetime as dt

    import pyarrow as pa

    from featuredb.store.connect import connect
    from featuredb.store.schema import coders_schema, decoders_schema, decoders_table_name, features_schema

    started = time.perf_counter()
    db_ = connect(db)
    rng = np.random.default_rng(seed)
    width = n // coders
    centre_vectors = rng.standard_normal((centres, dim)).astype(np.float32)
    rows = [dict(coder_id=f"syn-L{layer}", model="synthetic", hook=f"model.layers.{layer}.output",
                 hook_out=f"model.layers.{layer}.output", site="res", layer=layer, architecture="jumprelu", kind="sae",
                 d_in=dim, d_out=dim, width=width, source="synthetic", tokens_indexed=0, contexts_indexed=0, context=0,
                 top_k=0, created_at=dt.datetime.now(dt.timezone.utc), layers=None, cooccurrence_tokens=None)
            for layer in range(coders)]
    db_.create_table("coders", pa.Table.from_pylist(rows, schema=coders_schema()), mode="overwrite")
    db_.create_table("features", schema=features_schema(), mode="overwrite")
    table = db_.create_table(decoders_table_name(dim), schema=decoders_schema(dim), mode="overwrite")
    chunk = 131_072
    for layer in range(coders):
        for start in range(0, width, chunk):
            m = min(chunk, width - start)
            # a layer prefers its own quarter of the centres: layers form neighbouring regions
            which = (rng.integers(0, centres // coders, m) + layer * (centres // coders) * (rng.random(m) < 0.7)) % centres
            vectors = centre_vectors[which] + 0.6 * rng.standard_normal((m, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            table.add(pa.table({
                "coder_id": pa.array([f"syn-L{layer}"] * m), "feature": pa.array(np.arange(start, start + m)),
                "model": pa.array(["synthetic"] * m), "layer": pa.array(np.full(m, layer, np.int32)),
                "hook": pa.array([f"model.layers.{layer}.output"] * m), "site": pa.array(["res"] * m),
                "space": pa.array(["residual"] * m),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float16).reshape(-1)), dim),
            }, schema=decoders_schema(dim)))
    return time.perf_counter() - started


def page_load(db: str) -> dict:
    """Chromium opens /map (a fresh server: nothing kept) and draws every point; one zoom redraw; a
    reload; then /api/map/points alone (the answer the server kept)."""
    import httpx
    from playwright.sync_api import sync_playwright

    from featuredb.server import create_app

    binary = chromium()
    if binary is None:
        raise click.ClickException("no Chromium installed (apt-get install chromium)")
    with serving(create_app(db)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.set_default_timeout(600_000)
        t = time.perf_counter()
        page.goto(f"{url}/map")
        page.wait_for_function("window.mapState && window.mapState.ready", polling=50)
        ready_seconds = time.perf_counter() - t
        state = page.evaluate("window.mapState")
        box = page.locator("#map").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, -400)
        page.wait_for_timeout(500)
        zoomed = page.evaluate("window.mapState")
        t = time.perf_counter()
        page.reload()  # the server keeps its last points answer: a reload reads nothing again
        page.wait_for_function("window.mapState && window.mapState.ready", polling=50)
        reload_seconds = time.perf_counter() - t
        browser.close()
        t = time.perf_counter()
        points = httpx.get(f"{url}/api/map/points", timeout=600)
        api_seconds, api_bytes = time.perf_counter() - t, len(points.content)
    return {"api_points_seconds": api_seconds, "api_points_bytes": api_bytes, "page_ready_seconds": ready_seconds,
            "points_load_ms": state["loadMs"], "first_draw_ms": state["drawMs"], "points_drawn": state["drawn"],
            "zoom_redraw_ms": zoomed["drawMs"], "points_in_view_after_zoom": zoomed["drawn"],
            "page_reload_seconds": reload_seconds}


@click.command()
@click.option("--db", required=True, help="Catalogue to map (a copy: the map is written into it).")
@click.option("--synthetic", default=None, help="Write N synthetic decoder directions into --db first (e.g. 1M).")
@click.option("--dim", type=int, default=256, show_default=True, help="Synthetic decoder width.")
@click.option("--fit-rows", type=int, default=None, help="MapConfig.fit_rows (default: its default).")
@click.option("--no-page", is_flag=True, help="Skip the browser page load.")
@click.option("--page-only", is_flag=True, help="Only the page load, of the map --db holds already.")
def main(db: str, synthetic: str | None, dim: int, fit_rows: int | None, no_page: bool, page_only: bool) -> None:
    from featuredb.store import FeatureStore
    from featuredb.store.feature_map import MapConfig, update_map

    out: dict = {"db": db}
    if page_only:
        out["page"] = page_load(db)
        print_page(out["page"])
        print(json.dumps(out, default=float))
        return
    if synthetic:
        n = parse_count(synthetic)
        out["synthetic_write_seconds"] = write_synthetic(db, n, dim)
        out.update(features=n, dim=dim)
        print(f"wrote {n:,} synthetic {dim}-d directions in {out['synthetic_write_seconds']:.1f}s", flush=True)
    t = time.perf_counter()
    import umap  # noqa: F401  (numba compiles on a cold cache; timed on its own)

    out["umap_import_seconds"] = time.perf_counter() - t
    print(f"import umap: {out['umap_import_seconds']:.1f}s", flush=True)
    config = MapConfig(**({"fit_rows": fit_rows} if fit_rows else {}))
    t = time.perf_counter()
    result = update_map(FeatureStore(db), config, force=True)
    out["map_seconds"] = time.perf_counter() - t
    out["groups"] = result.groups
    for g in result.groups:
        print(f"mapped {g['features']:,} features ({g['space']} of {g['model']}): {g['fitted']:,} fitted in "
              f"{g['fit_seconds']:.1f}s (first UMAP fit in this process: its numba compilation included), the rest "
              f"placed in {g['place_seconds']:.1f}s; {g['seconds']:.1f}s in all "
              f"({g['features'] / g['seconds']:,.0f} features/s)", flush=True)
    t = time.perf_counter()
    again = update_map(FeatureStore(db), config)
    out["rerun_seconds"] = time.perf_counter() - t
    print(f"rerun with the map stored: {out['rerun_seconds']:.2f}s ({len(again.groups)} groups mapped)", flush=True)
    if not no_page:
        out["page"] = page_load(db)
        print_page(out["page"])
    print(json.dumps(out, default=float))


def print_page(p: dict) -> None:
    print(f"/api/map/points (kept answer): {p['api_points_bytes'] / 1e6:.1f} MB in {p['api_points_seconds']:.2f}s; "
              f"page: every point drawn {p['page_ready_seconds']:.2f}s after navigation (points fetched and parsed in "
              f"{p['points_load_ms']:.0f} ms, drawn in {p['first_draw_ms']:.0f} ms; {p['points_drawn']:,} points); "
              f"zoom redraw {p['zoom_redraw_ms']:.0f} ms; reload {p['page_reload_seconds']:.2f}s", flush=True)


if __name__ == "__main__":
    main()
