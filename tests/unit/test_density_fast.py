"""The fast density path (box-local BLAS Gaussian, tail cut, parallel writer) against the plain
computation (whole-grid histogram + scipy.ndimage.gaussian_filter)."""

from __future__ import annotations

from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cellmap2d import _density_compute
from cellmap2d.density import (
    MIDLINE_UM,
    DensityFile,
    Grid,
    fold_volume,
    histogram,
    normalise,
    smooth,
    type_densities,
    write_type_densities,
)


def _assert_float32_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("sigma_vox", [0.7, 1.5, 3.0])
def test_gaussian_box_equals_ndimage_gaussian_filter(sigma_vox: float) -> None:
    rng = np.random.default_rng(int(sigma_vox * 10))
    sparse = np.zeros((70, 45, 38), dtype=np.float32)
    sparse[tuple(rng.integers(0, 38, (3, 60)))] = rng.random(60, dtype=np.float32) * 5
    sparse[0, 0, 0] = 3.0  # the reflecting corner
    dense = rng.random((33, 40, 29), dtype=np.float32)
    tiny = rng.random((5, 3, 7), dtype=np.float32)  # axes shorter than the kernel radius
    for volume in (sparse, dense, tiny):
        want = ndimage.gaussian_filter(volume, sigma_vox, mode="reflect", truncate=4.0)
        _assert_float32_close(_density_compute.gaussian_box(volume, sigma_vox), want)


def _cells(n: int, seed: int) -> anndata.AnnData:
    rng = np.random.default_rng(seed)
    compact = rng.normal([6000.0, 4000.0, 8000.0], [400.0, 300.0, 500.0], (n, 3))
    spread = rng.uniform([0, 0, 0], [13200.0, 8000.0, 11400.0], (n, 3))
    two_blobs = np.vstack(
        [
            rng.normal([2000.0, 2000.0, 2000.0], 300.0, (n // 2, 3)),
            rng.normal([11000.0, 6500.0, 10000.0], 300.0, (n - n // 2, 3)),
        ]
    )
    pts = np.vstack([compact, spread, two_blobs, [[13150.0, 7950.0, 11350.0]]])  # + a far corner
    types = ["compact"] * n + ["spread"] * n + ["two blobs"] * n + ["spread"]
    obs = pd.DataFrame(
        {
            "subclass": pd.Categorical(
                types, categories=["two blobs", "none", "compact", "spread"]
            ),
            "dataset": pd.Categorical(rng.choice(["m", "z"], len(types))),
        },
        index=[f"c{i}" for i in range(len(types))],
    )
    return anndata.AnnData(obs=obs, obsm={"ccf": pts.astype(np.float32)})


def _plain(
    cells: anndata.AnnData, name: str, grid: Grid, sigma_um: float, fold: bool
) -> np.ndarray:
    """The straightforward density: whole-grid histogram, ndimage Gaussian, fold."""
    keep = (cells.obs["subclass"] == name).to_numpy()
    weights = np.where(cells.obs["dataset"].to_numpy()[keep] == "z", 0.5, 1.0)
    pts = np.asarray(cells.obsm["ccf"], dtype=np.float64)[keep]
    volume = smooth(histogram(pts, grid, weights=weights, fold_hemispheres=fold), grid, sigma_um)
    return fold_volume(volume, grid) if fold else volume


@pytest.mark.parametrize("fold", [False, True])
def test_type_densities_equal_the_plain_computation(fold: bool) -> None:
    grid = Grid(100.0)
    cells = _cells(1500, seed=1)
    kwargs = dict(grid=grid, sigma_um=250.0, fold_hemispheres=fold, dataset_weights={"z": 0.5})
    one = dict(type_densities(cells, tail_mass=0.0, workers=1, **kwargs))
    two = dict(type_densities(cells, tail_mass=0.0, workers=2, **kwargs))
    assert list(one) == list(two) == ["two blobs", "compact", "spread"]
    for name in one:
        want = _plain(cells, name, grid, 250.0, fold)
        _assert_float32_close(one[name], want.astype(np.float32))
        _assert_float32_close(two[name], want.astype(np.float32))
        if fold:
            assert one[name][:, :, 57:].sum() == 0


def test_write_type_densities_file_matches_type_densities(tmp_path: Path) -> None:
    grid = Grid(100.0)  # 132 × 80 × 114: partial edge chunks of 64³
    cells = _cells(1500, seed=2)
    path = tmp_path / "densities_subclass_100um.h5"
    write_type_densities(
        path, cells, grid=grid, sigma_um=200.0, workers=2, attrs={"source": "test"}
    )
    want = dict(type_densities(cells, grid=grid, sigma_um=200.0, workers=1))
    n_cells = cells.obs["subclass"].value_counts()
    pts = np.asarray(cells.obsm["ccf"], dtype=np.float64)
    with DensityFile(path) as f:
        assert f.names == ["two blobs", "compact", "spread"]
        assert f.attrs["tail_mass"] == 1e-6 and f.attrs["source"] == "test"
        assert f.fold_hemispheres is False
        for name in f.names:
            got = f.read(name)
            _assert_float32_close(got, want[name])
            assert f.counts[name] == pytest.approx(float(got.sum(dtype=np.float64)), rel=1e-6)
            # the tail cut keeps at least 1 - 1e-6 of the cells' mass; normalised, it sums to 1
            assert f.counts[name] >= (1 - 1e-6) * n_cells[name] * (1 - 1e-6)
            assert f.counts[name] <= n_cells[name] * (1 + 1e-6)
            # normalised, the tail-cut density is the plain one but for ≤ 1e-6 of the mass: L1
            # distance ≤ 2e-6 (dropped tail + renormalisation), plus float32 rounding
            keep = (cells.obs["subclass"] == name).to_numpy()
            plain = normalise(smooth(histogram(pts[keep], grid), grid, 200.0))
            probability = normalise(got)
            assert probability.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-6)
            assert np.abs(probability - plain).sum(dtype=np.float64) < 3e-6
            mask = np.zeros(grid.shape, dtype=bool)
            mask[60:70, 30:50, 70:90] = True
            _assert_float32_close(f.read_masked(name, mask), want[name][mask])
    with h5py.File(path, "r") as raw:
        compact = raw["types"]["1"]
        assert compact.attrs["name"] == "compact"
        # 3 × 2 × 2 chunks of 64³ cover the grid; the compact type touches only a few
        assert 0 < compact.id.get_num_chunks() < 12


def test_drop_tail_keeps_mass_and_drops_only_the_smallest_values() -> None:
    grid = Grid(100.0, (4000.0, 4000.0, 4000.0))
    volume = np.zeros(grid.shape)
    volume[20, 20, 20] = 1000.0
    volume[5, 30, 10] = 10.0
    smoothed = smooth(volume, grid, 300.0).astype(np.float32)
    for tail_mass in (1e-6, 1e-3):
        kept = smoothed.copy()
        threshold = _density_compute.drop_tail(kept, tail_mass)
        total = smoothed.sum(dtype=np.float64)
        assert kept.sum(dtype=np.float64) >= (1 - tail_mass) * total
        dropped = (kept == 0) & (smoothed > 0)
        assert dropped.any()  # the far tails of the kernel go
        assert smoothed[dropped].max() < threshold <= kept[kept > 0].min()
        np.testing.assert_array_equal(kept[kept > 0], smoothed[kept > 0])


def test_drop_tail_budget_holds_when_the_sample_misses_the_tail() -> None:
    # even positions (the strided sample) hold large values; odd ones tiny values summing to
    # 10× the budget: the sampled guess would drop them all, the exact check must refuse
    values = np.empty(400_002, dtype=np.float32)
    values[0::2] = 1.0
    values[1::2] = np.linspace(1e-9, 2e-9, 200_001, dtype=np.float32)
    total = values.sum(dtype=np.float64)
    tail_mass = float(values[1::2].sum(dtype=np.float64) / total / 10)
    kept = values.copy()
    _density_compute.drop_tail(kept, tail_mass)
    assert kept.sum(dtype=np.float64) >= (1 - tail_mass) * total
    assert (kept[0::2] == 1).all()
    assert (kept[1::2] == 0).any() and (kept[1::2] > 0).any()


def test_type_densities_reject_bad_options() -> None:
    cells = _cells(10, seed=3)
    with pytest.raises(ValueError, match="workers"):
        list(type_densities(cells, grid=Grid(200.0), sigma_um=100.0, workers=0))
    with pytest.raises(ValueError, match="tail_mass"):
        list(type_densities(cells, grid=Grid(200.0), sigma_um=100.0, tail_mass=1.0))
    with pytest.raises(ValueError, match="sigma_um"):
        list(type_densities(cells, grid=Grid(200.0), sigma_um=-1.0))


def test_fold_keeps_mass_left_of_the_midline_in_the_file(tmp_path: Path) -> None:
    grid = Grid(100.0)
    cells = _cells(300, seed=4)
    path = tmp_path / "folded.h5"
    write_type_densities(path, cells, grid=grid, sigma_um=200.0, fold_hemispheres=True, workers=1)
    right = int(MIDLINE_UM // grid.voxel_um)
    with DensityFile(path) as f:
        assert f.fold_hemispheres is True
        for name in f.names:
            assert f.read(name)[:, :, right:].sum() == 0
