"""Tests of the watershed and trained methods, tiled detection and bad sections."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cellmap2d._detectors import (
    best_probability_threshold,
    mask_centroids,
    match_points,
    train_detector,
)
from cellmap2d.segmentation import Plane, detect_cells, detect_cells_tiled


def _field(
    centres: np.ndarray, shape: tuple[int, int], *, sigma: float, seed: int = 0
) -> np.ndarray:
    """Gaussian cells (amplitude 200) on background 100 + white noise σ = 4, float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    image = 100 + rng.normal(0, 4, shape)
    for x, y in centres:
        image += 200 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return image.astype(np.float32)


def _grid(shape: tuple[int, int], spacing: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gy, gx = np.meshgrid(
        np.arange(15.0, shape[0] - 15, spacing), np.arange(15.0, shape[1] - 15, spacing)
    )
    return np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(-2, 2, (gx.size, 2))


def _disks(shape: tuple[int, int], centres: np.ndarray, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    mask = np.zeros(shape, np.int32)
    for i, (x, y) in enumerate(centres, start=1):
        mask[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = i
    return mask


def test_watershed_splits_touching_disks_and_measures_them() -> None:
    """Two touching flat disks of radius 8 px (centres 14 px apart) are two cells, each
    of area π·8² ≈ 201 px² (= µm² at 1 µm pixels) and near-circular."""
    shape = (80, 100)
    centres = np.array([[40.0, 40.0], [54.0, 40.0], [30.0, 65.0]])
    image = 100 + 150 * (_disks(shape, centres, 8.0) > 0)
    image = image + np.random.default_rng(1).normal(0, 2, shape)
    found = detect_cells(image, pixel_size_um=1.0, cell_diameter_um=16.0, method="watershed")
    assert len(found) == 3
    assert (match_points(found[["x", "y"]].to_numpy(), centres, 2.0) >= 0).all()
    assert found["area_um2"].to_numpy() == pytest.approx(np.pi * 64, rel=0.2)
    assert (found["circularity"] > 0.7).all()


def test_mask_centroids_of_binary_and_instance_masks() -> None:
    """A 3×3 square at rows 1–3, cols 2–4 has centroid (x=3, y=2) and radius √(9/π)."""
    mask = np.zeros((8, 8), np.uint8)
    mask[1:4, 2:5] = 255
    centres, radii = mask_centroids(mask)
    assert centres.tolist() == [[3.0, 2.0]]
    assert radii[0] == pytest.approx(np.sqrt(9 / np.pi))


def test_trained_method_learns_to_reject_dim_blobs(tmp_path: Path) -> None:
    """Annotated cells are the bright blobs (amplitude 200); dim ones (amplitude 40, still
    far above the candidate threshold) are not annotated. Trained on one image, tested on
    another: it keeps the bright and drops the dim, which plain LoG reports too."""
    shape, sigma = (160, 160), 3.0

    def make(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centres = _grid(shape, 26.0, seed)
        bright = np.random.default_rng(seed).random(len(centres)) < 0.5
        image = _field(centres[bright], shape, sigma=sigma, seed=seed)
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
        for x, y in centres[~bright]:
            image += 40 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        return image, centres[bright], _disks(shape, centres[bright], 4.0)

    image, _, mask = make(1)
    model = train_detector([image], [mask], pixel_size_um=1.0, cell_diameter_um=8.5)
    model.save(tmp_path / "m.joblib")
    test_image, truth, _ = make(2)
    for m in (model, tmp_path / "m.joblib"):
        found = detect_cells(
            test_image, pixel_size_um=1.0, cell_diameter_um=8.5, method="trained", model=m
        )
        matched = match_points(found[["x", "y"]].to_numpy(), truth, 3.0) >= 0
        assert matched.sum() >= 0.9 * len(truth)
        assert matched.mean() >= 0.9
    plain = detect_cells(test_image, pixel_size_um=1.0, cell_diameter_um=8.5)
    assert len(plain) > 1.5 * len(truth)  # the dim blobs are there to be rejected
    with pytest.raises(ValueError, match="model"):
        detect_cells(test_image, pixel_size_um=1.0, cell_diameter_um=8.5, method="trained")


@pytest.mark.parametrize(
    "options",
    [
        {"method": "log"},
        {"method": "log", "threshold_unit": "spread", "scales": (0.7, 1.0, 1.4)},
        {"method": "log", "min_brightness": 0.3},
        {"method": "watershed"},
    ],
    ids=["log", "log-spread-multiscale", "log-brightness", "watershed"],
)
def test_tiled_equals_untiled(options: dict) -> None:
    """Cells across 64-px tile borders: the same cells within 0.5 px, each once (the
    image-wide statistics — noise, background, response spread, bright range — come from
    grids fixed in image coordinates)."""
    shape = (300, 260)
    centres = _grid(shape, 21.0, seed=4)
    image = _field(centres, shape, sigma=3.0, seed=4)
    kw = {"pixel_size_um": 1.0, "cell_diameter_um": 8.5, **options}
    whole = detect_cells(image, **kw)
    tiled = detect_cells_tiled(image, tile=64, workers=2, **kw)
    assert len(whole) >= 0.9 * len(centres)
    assert len(tiled) == len(whole)
    matched = match_points(tiled[["x", "y"]].to_numpy(), whole[["x", "y"]].to_numpy(), 0.5)
    assert (matched >= 0).all()


@pytest.mark.parametrize("diameter", [8.5, 24.0])  # LoG at full resolution / on 5× blocks
def test_tiled_equals_untiled_with_cells_cut_by_the_border(diameter: float) -> None:
    """Cells cut by every border (centres 0–3 px inside, one per 64-px tile along each
    border, so tiles at the image border see them) and a ramp into the left border: tiled
    (64² tiles, 2 workers) and untiled give the same cells, and the cut cells are found."""
    shape = (300, 260)
    rng = np.random.default_rng(9)
    h, w = shape
    cut = []
    for k, along in enumerate(range(32, 260 - 20, 64)):
        d = (0.0, 1.0, 2.0, 3.0)[k % 4]
        cut += [(d, along), (w - 1 - d, along + 10), (along + 5, d), (along - 5, h - 1 - d)]
    centres = np.array(cut, np.float64)
    image = _field(centres, shape, sigma=diameter / 2 / 1.3, seed=9)
    image += np.float32(1.5) * np.maximum(0, 40 - np.arange(w, dtype=np.float32))[None, :]
    image += rng.normal(0, 1, shape).astype(np.float32)
    kw = {"pixel_size_um": 1.0, "cell_diameter_um": diameter}
    whole = detect_cells(image, **kw)
    tiled = detect_cells_tiled(image, tile=64, workers=2, **kw)
    assert len(tiled) == len(whole)
    # the border profile fits run in each window's own float order: equal to ~1e-12 px
    assert np.allclose(tiled[["x", "y"]].to_numpy(), whole[["x", "y"]].to_numpy(), atol=1e-9)
    found = match_points(whole[["x", "y"]].to_numpy(), centres, diameter / 2)
    assert (found >= 0).sum() == len(centres)  # every cut cell, nothing else
    assert len(whole) == len(centres)


def test_tiled_reads_a_plane_of_a_4d_zarr_and_downsampled_cells(tmp_path: Path) -> None:
    """A (c, z, y, x) zarr plane read lazily gives the numpy result; cells of 24 px (σ 8.5,
    LoG on 5×5 block means) are all found, within half a block (2.5 px) of their centres."""
    zarr = pytest.importorskip("zarr")
    shape = (400, 300)
    centres = _grid(shape, 50.0, seed=5)
    image = _field(centres, shape, sigma=24 / 2 / 1.3, seed=5).astype(np.uint16)
    arr = zarr.open_array(
        str(tmp_path / "a.zarr"), mode="w", shape=(2, 3, *shape), chunks=(1, 1, 64, 64), dtype="u2"
    )
    arr[1, 2] = image
    kw = {"pixel_size_um": 1.0, "cell_diameter_um": 24.0}
    lazy = detect_cells_tiled(Plane(arr, (1, 2)), tile=128, **kw)
    direct = detect_cells(image, **kw)
    assert np.allclose(lazy[["x", "y"]].to_numpy(), direct[["x", "y"]].to_numpy(), atol=1e-3)
    matched = match_points(direct[["x", "y"]].to_numpy(), centres, 2.5) >= 0
    assert matched.sum() == len(centres) == len(direct)


def test_bad_sections() -> None:
    """All-zero → no cells; NaN → error naming NaN; saturated → error; bool → TypeError."""
    kw = {"pixel_size_um": 1.0, "cell_diameter_um": 10.0}
    for method in ("log", "watershed"):
        assert (
            len(detect_cells_tiled(np.zeros((300, 300), np.uint16), tile=64, method=method, **kw))
            == 0
        )
    nan = np.ones((100, 100), np.float32)
    nan[50, 50] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        detect_cells_tiled(nan, tile=32, **kw)
    saturated = np.full((100, 100), 65535, np.uint16)
    saturated[:10] = 100
    with pytest.raises(ValueError, match="saturated"):
        detect_cells(saturated, **kw)
    with pytest.raises(TypeError):
        detect_cells_tiled(np.ones((10, 10), bool), **kw)
    with pytest.raises(ValueError, match="method"):
        detect_cells_tiled(np.ones((10, 10)), method="dog", **kw)


def test_zero_padding_is_not_tissue() -> None:
    """A field of cells next to an all-zero region: no cells in the zero region or its edge."""
    shape = (200, 200)
    centres = _grid((200, 100), 25.0, seed=6)
    image = _field(centres, shape, sigma=3.0, seed=6)
    image[:, 100:] = 0
    found = detect_cells(image, pixel_size_um=1.0, cell_diameter_um=8.5)
    assert (found["x"] < 100).all()
    assert (match_points(found[["x", "y"]].to_numpy(), centres, 1.0) >= 0).sum() >= 0.9 * len(
        centres
    )


def test_probability_threshold_maximises_f1_over_the_annotated_cells() -> None:
    """Hand-computed: 4 annotated cells, candidates (p, positive) = (.9 T) (.8 T) (.6 F) (.3 T)
    (.2 F). Keeping p ≥ 0.25–0.30 gives TP 3, FP 1, FN 1: F1 0.75, the best (all: 0.667;
    ≥ 0.35: 0.571; ≥ 0.65: 0.667); of the tied cuts 0.25 and 0.30 the one nearer 0.5 wins. A
    NaN (never out of bag) is ignored."""
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.2, np.nan])
    positive = np.array([True, True, False, True, False, True])
    assert best_probability_threshold(p, positive, 4) == pytest.approx(0.3)
    # one more annotated cell that no candidate reached changes the F1s but not the best cut
    assert best_probability_threshold(p, positive, 5) == pytest.approx(0.3)


def test_train_detector_cli(tmp_path: Path) -> None:
    """``cellmap2d train-detector`` writes a model that method='trained' loads."""
    tifffile = pytest.importorskip("tifffile")
    shape = (120, 120)
    centres = _grid(shape, 25.0, seed=8)
    tifffile.imwrite(tmp_path / "i.tif", _field(centres, shape, sigma=3.0, seed=8))
    tifffile.imwrite(tmp_path / "m.tif", _disks(shape, centres, 4.0).astype(np.uint16))
    out = tmp_path / "model.joblib"
    cmd = [
        sys.executable,
        "-m",
        "cellmap2d.cli",
        "train-detector",
        "--images",
        str(tmp_path / "i.tif"),
    ]
    cmd += ["--masks", str(tmp_path / "m.tif"), "--out", str(out)]
    cmd += ["--pixel-size-um", "1", "--cell-diameter-um", "8.5"]
    from cellmap2d.cli import main

    assert main(cmd[3:]) == 0
    assert out.exists()
    found = detect_cells(
        _field(centres, shape, sigma=3.0, seed=9),
        pixel_size_um=1.0,
        cell_diameter_um=8.5,
        method="trained",
        model=out,
    )
    matched = match_points(found[["x", "y"]].to_numpy(), centres, 2.0) >= 0
    assert matched.sum() >= 0.7 * len(centres)
