"""The map (issue 25): 2-D coordinates of every feature, stored per (model, decoder space), the
`featuredb map` command and its PNG, the /api/map routes and a catalogue without a map."""

from __future__ import annotations

import shutil
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from catalogue_fixtures import MODEL, TRICKY_ID, WIDTH, build_catalogue
from featuredb.cli import main
from featuredb.server import create_app
from featuredb.store import FeatureStore
from featuredb.store.decoder_vectors import write_decoder_vectors
from featuredb.store.feature_map import MapConfig, exact_neighbours, stale_groups, update_map
from featuredb.store.schema import MAP_TABLE, is_decoders_table

pytest.importorskip("umap")
# tiny-model's residual coders (64 features: UMAP, 40 fitted and 24 placed), att-L5 alone in its
# space and other-model's coder (16 each: too few for a neighbour graph, principal components)
CONFIG = MapConfig(fit_rows=40, progress=False)
RESIDUAL = ["mlp-L12", "res-L12", "res-L5", TRICKY_ID]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A catalogue without a map (written before the map existed, or without umap-learn)."""
    return build_catalogue(tmp_path_factory.mktemp("plain") / "catalogue").uri


@pytest.fixture(scope="module")
def mapped(plain, tmp_path_factory):
    path = tmp_path_factory.mktemp("mapped") / "catalogue"
    shutil.copytree(plain, path)
    store = FeatureStore(str(path))
    result = update_map(store, CONFIG)
    assert {(g["model"], g["space"]) for g in result.groups} == {
        (MODEL, "residual"), (MODEL, "model.layers.5.self_attn.o_proj.input"), ("other-model", "residual")}
    return str(path)


def _rows(table) -> dict[tuple[str, int], tuple]:
    return {(r["coder_id"], r["feature"]): r for r in table.search().limit(None).to_arrow().to_pylist()}


def test_every_decoder_direction_has_finite_coordinates(mapped):
    store = FeatureStore(mapped, read_only=True)
    decoders = {}
    for name in store.table_names():
        if is_decoders_table(name):
            decoders.update(_rows(store.table(name)))
    points = _rows(store.table(MAP_TABLE))
    assert set(points) == set(decoders) and len(points) == 6 * WIDTH
    for key, point in points.items():
        assert np.isfinite([point["x"], point["y"]]).all()
        assert (point["model"], point["space"], point["layer"]) == (decoders[key]["model"], decoders[key]["space"],
                                                                    decoders[key]["layer"])
    assert points[("res-L12", 4)]["density"] == pytest.approx(0.05)  # copied from the features row
    assert stale_groups(store) == []
    assert update_map(FeatureStore(mapped), CONFIG).groups == []  # a rerun finds nothing to do


def test_the_same_seed_gives_the_same_coordinates(mapped, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(mapped, again)
    result = update_map(FeatureStore(str(again)), CONFIG, force=True)
    assert len(result.groups) == 3
    first, second = _rows(FeatureStore(mapped).table(MAP_TABLE)), _rows(FeatureStore(str(again)).table(MAP_TABLE))
    assert first.keys() == second.keys()
    assert all((first[k]["x"], first[k]["y"]) == (second[k]["x"], second[k]["y"]) for k in first)
    other = update_map(FeatureStore(str(again)), MapConfig(seed=1, fit_rows=40, progress=False), force=True)
    assert other.groups
    third = _rows(FeatureStore(str(again)).table(MAP_TABLE))
    assert any((first[k]["x"], first[k]["y"]) != (third[k]["x"], third[k]["y"]) for k in first)


def test_parallel_directions_land_together(mapped):
    """res-L12/11 and mlp-L12/6 point nearly along res-L12/3 (catalogue_fixtures): nearer to it on
    the map than most features of the group are."""
    points = _rows(FeatureStore(mapped).table(MAP_TABLE))
    xy = {k: np.array([p["x"], p["y"]]) for k, p in points.items() if p["space"] == "residual" and p["model"] == MODEL}
    anchor = xy[("res-L12", 3)]
    distances = sorted(np.linalg.norm(v - anchor) for k, v in xy.items() if k != ("res-L12", 3))
    median = distances[len(distances) // 2]
    for twin in [("res-L12", 11), ("mlp-L12", 6)]:
        assert np.linalg.norm(xy[twin] - anchor) < median


def test_exact_neighbours_match_brute_force():
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, 12)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    indices, distances = exact_neighbours(vectors, 5, block=64)
    cosine = vectors @ vectors.T
    for i in range(len(vectors)):
        order = np.argsort(-cosine[i])
        assert indices[i, 0] == i and distances[i, 0] == 0
        assert set(indices[i, 1:]) == set(order[order != i][:4])
        np.testing.assert_allclose(distances[i, 1:], 1 - cosine[i, indices[i, 1:]], atol=1e-5)


def test_new_directions_put_their_group_off_the_map_until_it_is_mapped_again(mapped, tmp_path):
    from featuredb.store.indexes import finalize

    path = tmp_path / "rewritten"
    shutil.copytree(mapped, path)
    store = FeatureStore(str(path))
    rng = np.random.default_rng(7)
    write_decoder_vectors(store, "res-L5", rng.standard_normal((WIDTH, 8)).astype(np.float32))
    assert stale_groups(store) == [("decoders_8", MODEL, "residual")]
    assert not any(k[0] == "res-L5" for k in _rows(store.table(MAP_TABLE)))
    assert MAP_TABLE not in finalize(str(path))  # finalize maps only when asked (UMAP compiles for minutes)
    built = finalize(str(path), feature_map=True)
    assert MAP_TABLE in built and stale_groups(FeatureStore(str(path))) == []
    assert sum(k[0] == "res-L5" for k in _rows(FeatureStore(str(path)).table(MAP_TABLE))) == WIDTH


def _png_pixels(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert (depth, colour) == (8, 2)
    at, idat = 8, b""
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IDAT":
            idat += data[at + 8:at + 8 + length]
        at += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * 3)
    assert (rows[:, 0] == 0).all()  # filter byte: none
    return rows[:, 1:].reshape(height, width, 3)


def test_map_command_recomputes_and_draws_a_png(mapped, tmp_path):
    path = tmp_path / "cli"
    shutil.copytree(mapped, path)
    runner = CliRunner()
    result = runner.invoke(main, ["map", "--db", str(path), "--quiet", "--fit-rows", "40"])
    assert result.exit_code == 0, result.output
    assert result.output.count("mapped ") == 3
    png = tmp_path / "map.png"
    result = runner.invoke(main, ["map", "--db", str(path), "--png", str(png), "--size", "120", "--colour", "layer"])
    assert result.exit_code == 0, result.output
    assert "every feature is on the map already" in result.output and f"{4 * WIDTH} features" in result.output
    pixels = _png_pixels(png.read_bytes())
    assert pixels.shape == (120, 120, 3)
    assert (pixels.min(axis=2) < 250).sum() >= 4 * WIDTH  # a 3x3 dot per point, overlaps allowed
    result = runner.invoke(main, ["map", "--db", str(path), "--png", str(png), "--coder", "att-L5", "--coder", "res-L5"])
    assert result.exit_code == 1 and "different spaces" in result.output


def test_api_returns_the_stored_points(mapped):
    client = TestClient(create_app(mapped))
    stored = _rows(FeatureStore(mapped).table(MAP_TABLE))
    body = client.get("/api/map", params={"limit": 10_000}).json()
    assert body["coders"] == sorted(RESIDUAL) and body["count"] == 4 * WIDTH and body["space"] == "residual"
    for point in body["results"]:
        row = stored[(point["coder_id"], point["feature"])]
        assert (point["x"], point["y"], point["layer"]) == pytest.approx((row["x"], row["y"], row["layer"]))
    page = client.get("/api/map", params={"coder": ["att-L5"], "limit": 5, "offset": 10}).json()
    assert [p["feature"] for p in page["results"]] == [10, 11, 12, 13, 14] and page["next_offset"] == 15

    data = client.get("/api/map/points", params={"coder": [TRICKY_ID, "res-L5"]}).content
    header_length = struct.unpack("<I", data[:4])[0]
    import json

    header = json.loads(data[4:4 + header_length])
    n, at = header["count"], 4 + header_length
    arrays = {}
    for name, dtype in [("x", "<f4"), ("y", "<f4"), ("density", "<f4"), ("feature", "<i4"), ("coder", "<u2"), ("layer", "<i2")]:
        arrays[name] = np.frombuffer(data, dtype, n, at)
        at += n * np.dtype(dtype).itemsize
    assert at == len(data) and n == 2 * WIDTH and header["coders"] == sorted([TRICKY_ID, "res-L5"])
    for i in range(n):
        row = stored[(header["coders"][arrays["coder"][i]], int(arrays["feature"][i]))]
        assert (arrays["x"][i], arrays["y"][i], arrays["layer"][i]) == (np.float32(row["x"]), np.float32(row["y"]), row["layer"])

    label = client.get(f"/api/map/label/res-L12/3").json()
    assert label["description"].startswith("French cities") and label["layer"] == 12
    assert client.get("/api/map", params={"coder": "nope"}).status_code == 404
    assert client.get("/api/map", params={"coder": ["att-L5", "res-L5"]}).status_code == 400
    assert client.get("/api/map/label/res-L12/999").status_code == 404
    html = client.get("/map")
    assert html.status_code == 200 and 'id="map"' in html.text and "/api/map/points" in html.text


def test_a_catalogue_without_a_map_still_opens_and_serves(plain):
    client = TestClient(create_app(plain))
    assert client.get("/api/map").status_code == 404
    page = client.get("/map")
    assert page.status_code == 200 and "No map yet" in page.text and "featuredb map" in page.text
    assert client.get("/").status_code == 200
    assert client.get("/features/res-L12/3").status_code == 200
    assert client.get("/api/features/res-L12/3").json()["feature"] == 3
