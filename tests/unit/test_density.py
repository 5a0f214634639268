from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from cellmap2d.density import (
    CCF_EXTENT_UM,
    MIDLINE_UM,
    DensityFile,
    Grid,
    fold_volume,
    histogram,
    normalise,
    resample_mask,
    sampled_mask,
    smooth,
    type_densities,
    write_densities,
)


def test_grid_shape_index_and_centres() -> None:
    assert Grid(25.0).shape == (528, 320, 456)
    assert Grid(100.0).shape == (132, 80, 114)
    assert Grid(200.0).shape == (66, 40, 57)
    assert Grid(300.0).shape == (44, 27, 38)  # 8000/300 = 26.7 → 27
    assert Grid(100.0).extent_um == CCF_EXTENT_UM

    grid = Grid(100.0, (1000.0, 500.0, 300.0))
    assert grid.shape == (10, 5, 3)
    pts = np.array([[0.0, 0.0, 0.0], [99.9, 100.0, 250.0], [999.0, 499.0, 299.0], [-0.1, 0.0, 0.0]])
    np.testing.assert_array_equal(grid.index(pts), [[0, 0, 0], [0, 1, 2], [9, 4, 2], [-1, 0, 0]])
    np.testing.assert_array_equal(grid.inside(pts), [True, True, True, False])
    ap, dv, ml = grid.centers()
    np.testing.assert_allclose(ap, np.arange(10) * 100 + 50)
    np.testing.assert_allclose(dv, [50, 150, 250, 350, 450])
    np.testing.assert_allclose(ml, [50, 150, 250])
    with pytest.raises(ValueError):
        Grid(0.0)


def test_histogram_counts_weights_and_outside_points() -> None:
    grid = Grid(100.0, (300.0, 300.0, 300.0))
    pts = np.array(
        [
            [10.0, 10.0, 10.0],
            [90.0, 50.0, 99.0],  # same voxel (0,0,0)
            [150.0, 250.0, 50.0],  # (1,2,0)
            [300.0, 0.0, 0.0],  # outside (AP = 300 is the upper edge)
            [np.nan, 0.0, 0.0],  # dropped
        ]
    )
    hist = histogram(pts, grid)
    assert hist.dtype == np.float64 and hist.shape == (3, 3, 3)
    assert hist[0, 0, 0] == 2 and hist[1, 2, 0] == 1 and hist.sum() == 3
    weighted = histogram(pts, grid, weights=np.array([0.5, 0.25, 2.0, 7.0, 9.0]))
    assert weighted[0, 0, 0] == 0.75 and weighted[1, 2, 0] == 2.0 and weighted.sum() == 2.75


def test_histogram_fold_hemispheres() -> None:
    grid = Grid(100.0)
    pts = np.array(
        [
            [1050.0, 2050.0, MIDLINE_UM + 1000.0],  # right: mirrored to ML 4700 → voxel 47
            [1050.0, 2050.0, MIDLINE_UM - 1000.0],  # left, already at 4700
            [1050.0, 2050.0, 1050.0],  # left, untouched (voxel 10)
            [1050.0, 2050.0, 11350.0],  # right edge → ML 50 → voxel 0
        ]
    )
    unfolded = histogram(pts, grid)
    assert unfolded[10, 20, 67] == 1 and unfolded[10, 20, 47] == 1
    folded = histogram(pts, grid, fold_hemispheres=True)
    assert folded[10, 20, 47] == 2 and folded[10, 20, 10] == 1 and folded[10, 20, 0] == 1
    assert folded.sum() == 4
    assert folded[:, :, 57:].sum() == 0  # nothing right of the midline (voxel 57 starts at 5700)


def test_fold_volume_mirrors_and_keeps_mass() -> None:
    grid = Grid(1900.0)  # ML: 6 voxels, midline 5700 = boundary between voxels 2 and 3
    assert grid.shape[2] == 6
    vol = np.zeros(grid.shape)
    vol[0, 0, :] = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0]
    out = fold_volume(vol, grid)
    # voxel 3 ↔ 2, 4 ↔ 1, 5 ↔ 0
    np.testing.assert_allclose(out[0, 0], [31.0, 22.0, 13.0, 0.0, 0.0, 0.0])
    assert out.sum() == pytest.approx(vol.sum())


def test_smooth_preserves_mass_and_spreads_by_sigma() -> None:
    grid = Grid(100.0, (4100.0, 4100.0, 4100.0))
    vol = np.zeros(grid.shape)
    vol[20, 20, 20] = 5.0
    vol[1, 2, 3] = 2.0  # near the box corner: the reflecting edge keeps its mass
    out = smooth(vol, grid, sigma_um=300.0)
    assert out.sum() == pytest.approx(7.0, rel=1e-9)
    # the central spike becomes a Gaussian of sigma 3 voxels: variance along AP = 9 voxels²
    profile = out[10:31, 20, 20] / out[10:31, 20, 20].sum()
    offsets = np.arange(-10, 11)
    assert (profile * offsets**2).sum() == pytest.approx(9.0, rel=0.02)
    np.testing.assert_array_equal(smooth(vol, grid, 0.0), vol)


def test_normalise_within_mask() -> None:
    vol = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    mask = np.zeros_like(vol, dtype=bool)
    mask[0, 1, :] = True  # values 4, 5, 6, 7 → sum 22
    out = normalise(vol, mask)
    assert out[mask].sum() == pytest.approx(1.0)
    assert (out[~mask] == 0).all()
    np.testing.assert_allclose(out[0, 1], np.array([4, 5, 6, 7]) / 22)
    assert normalise(vol).sum() == pytest.approx(1.0)
    assert (normalise(np.zeros((2, 2, 2))) == 0).all()  # no mass: zeros, not NaN


def test_resample_mask_uses_the_centre_rule() -> None:
    # source: 25 µm voxels; a 2×2×2 source block at indices 4..5 (µm 100–150) is inside
    src = np.zeros((12, 12, 12), dtype=np.uint32)
    src[4:6, 4:6, 4:6] = 315  # any non-zero label counts
    out = resample_mask(src, 25.0, Grid(50.0, (300.0, 300.0, 300.0)))
    # 50 µm grid centres 25, 75, 125, …: only centre 125 (source index 5) is inside
    expected = np.zeros((6, 6, 6), dtype=bool)
    expected[2, 2, 2] = True
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == bool
    # centres beyond the source volume are outside (source covers 0–300 µm, grid to 600)
    big = resample_mask(np.ones((12, 12, 12)), 25.0, Grid(100.0, (600.0, 600.0, 600.0)))
    assert big[:3, :3, :3].all() and not big[3:].any() and not big[:, 3:].any()


def test_resample_mask_real_annotation(shared_data: Path) -> None:
    import nrrd

    annotation, _ = nrrd.read(str(shared_data / "ccf" / "annotation_25.nrrd"))
    brain = annotation > 0
    grid = Grid(100.0)
    out = resample_mask(brain, 25.0, grid)
    assert out.shape == (132, 80, 114)
    # a 100 µm voxel centre (i·100 + 50) lies in 25 µm voxel 4i + 2
    np.testing.assert_array_equal(out, brain[2::4, 2::4, 2::4])
    assert 0.3 < out.mean() < 0.7


def test_sampled_mask_coronal_planes() -> None:
    grid = Grid(100.0, (2000.0, 500.0, 500.0))
    planes = [
        (np.array([1000.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0])),  # AP = 1000
        (np.array([310.0, 7.0, 3.0]), np.array([-2.0, 0.0, 0.0])),  # AP = 310, unnormalised
    ]
    out = sampled_mask(grid, planes, half_thickness_um=60.0)
    # AP centres: 50, 150, …; within 60 µm of 1000: 950, 1050 (voxels 9, 10);
    # of 310: 250, 350 (voxels 2, 3)
    assert out.dtype == bool and out.shape == grid.shape
    hit = np.flatnonzero(out.any(axis=(1, 2)))
    np.testing.assert_array_equal(hit, [2, 3, 9, 10])
    assert out[hit].all()
    inside = np.zeros(grid.shape, dtype=bool)
    inside[:, :2] = True
    restricted = sampled_mask(grid, planes, half_thickness_um=60.0, inside=inside)
    np.testing.assert_array_equal(restricted, out & inside)


def test_sampled_mask_oblique_plane_matches_distances() -> None:
    grid = Grid(100.0, (1500.0, 1200.0, 1300.0))
    point = np.array([700.0, 600.0, 650.0])
    normal = np.array([1.0, 0.4, -0.3])
    h = 130.0
    out = sampled_mask(grid, [(point, normal)], half_thickness_um=h)
    ap, dv, ml = np.meshgrid(*grid.centers(), indexing="ij")
    unit = normal / np.linalg.norm(normal)
    distance = np.abs((ap - 700) * unit[0] + (dv - 600) * unit[1] + (ml - 650) * unit[2])
    np.testing.assert_array_equal(out, distance <= h)
    assert 0 < out.sum() < out.size


def _cells(points: np.ndarray, types: list[str], datasets: list[str]) -> anndata.AnnData:
    obs = pd.DataFrame(
        {
            "subclass": pd.Categorical(types, categories=["A", "L2/3 IT CTX Glut", "empty"]),
            "dataset": pd.Categorical(datasets),
        },
        index=[f"c{i}" for i in range(len(types))],
    )
    return anndata.AnnData(
        X=np.zeros((len(types), 0), dtype=np.float32),
        obs=obs,
        obsm={"ccf": np.asarray(points, dtype=np.float32)},
    )


def test_type_densities_per_type_counts_and_weights() -> None:
    grid = Grid(100.0, (1000.0, 1000.0, 1000.0))
    pts = np.array(
        [[150.0, 150.0, 150.0], [150.0, 150.0, 150.0], [850.0, 850.0, 850.0], [450.0, 450.0, 450.0]]
    )
    cells = _cells(pts, ["A", "A", "L2/3 IT CTX Glut", "A"], ["m", "m", "m", "z"])
    got = dict(type_densities(cells, level="subclass", grid=grid, sigma_um=0.0))
    assert list(got) == ["A", "L2/3 IT CTX Glut"]  # the empty category is skipped
    assert got["A"].dtype == np.float32 and got["A"].shape == grid.shape
    assert got["A"][1, 1, 1] == 2 and got["A"][4, 4, 4] == 1 and got["A"].sum() == 3
    assert got["L2/3 IT CTX Glut"][8, 8, 8] == 1
    weighted = dict(type_densities(cells, grid=grid, sigma_um=100.0, dataset_weights={"z": 0.5}))
    assert weighted["A"].sum() == pytest.approx(2.5, rel=1e-5)
    with pytest.raises(ValueError, match="not in cells"):
        list(type_densities(cells, grid=grid, sigma_um=0.0, dataset_weights={"zz": 1.0}))


def test_type_densities_fold_keeps_mass_on_the_left() -> None:
    grid = Grid(100.0)
    pts = np.array([[5000.0, 4000.0, 5750.0], [5000.0, 4000.0, 9000.0]])
    cells = _cells(pts, ["A", "A"], ["m", "m"])
    ((name, vol),) = list(type_densities(cells, grid=grid, sigma_um=200.0, fold_hemispheres=True))
    assert name == "A"
    assert vol.sum() == pytest.approx(2.0, rel=1e-5)
    assert vol[:, :, 57:].sum() == 0  # reflected at the midline
    # ML 9000 → 2400 (voxel 24); ML 5750 → 5650 (voxel 56)
    assert vol[50, 40, 24] == vol[50, 40, :40].max()


def test_density_file_round_trip(tmp_path: Path) -> None:
    grid = Grid(100.0, (500.0, 400.0, 300.0))
    rng = np.random.default_rng(0)
    volumes = {
        "L2/3 IT CTX Glut": rng.random(grid.shape),
        "Vip Gaba": rng.random(grid.shape) * 3,
        "a/b/c": np.zeros(grid.shape),
    }
    path = tmp_path / "densities_subclass_100um.h5"
    write_densities(
        path,
        iter(volumes.items()),
        grid=grid,
        level="subclass",
        sigma_um=150.0,
        attrs={"fold_hemispheres": True, "source": "test"},
    )
    mask = np.zeros(grid.shape, dtype=bool)
    mask[1:3, 2, :] = True
    mask[4, 0, 1] = True
    with DensityFile(path) as f:
        assert f.names == list(volumes)
        assert f.grid == grid
        assert f.level == "subclass" and f.sigma_um == 150.0
        assert f.fold_hemispheres is True and f.attrs["source"] == "test"
        assert "Vip Gaba" in f and len(f) == 3
        for name, vol in volumes.items():
            got = f.read(name)
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, vol.astype(np.float32))
            np.testing.assert_allclose(f.read_masked(name, mask), vol[mask].astype(np.float32))
            assert f.counts[name] == pytest.approx(vol.sum(), rel=1e-5)
        with pytest.raises(KeyError):
            f.read("nope")


def test_write_densities_rejects_bad_items(tmp_path: Path) -> None:
    grid = Grid(100.0, (200.0, 200.0, 200.0))
    with pytest.raises(ValueError, match="shape"):
        write_densities(
            tmp_path / "a.h5", [("x", np.zeros((3, 3, 3)))], grid=grid, level="s", sigma_um=1
        )
    with pytest.raises(ValueError, match="repeats"):
        write_densities(
            tmp_path / "b.h5",
            [("x", np.zeros(grid.shape)), ("x", np.zeros(grid.shape))],
            grid=grid,
            level="s",
            sigma_um=1,
        )
