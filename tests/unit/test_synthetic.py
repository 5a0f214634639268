"""Tests of cellmap2d.synthetic: the tiny phantom world and its truth."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from cellmap2d.anchoring import read_quint
from cellmap2d.atlas import Atlas, load_atlas
from cellmap2d.io import open_brain, read_manifest
from cellmap2d.synthetic import (
    PhantomWorld,
    Realism,
    WorldConfig,
    _render_realistic,
    evaluate_mapping,
    make_world,
    phantom_atlas,
)

BRAIN = "7001"  # WorldConfig.tiny(): one brain, 10 sections, section 4 missing, 7 torn
CCF_COLUMNS = ["ap_um", "dv_um", "ml_um"]
LAYER_6A = {844: "MOp6a", 1038: "SSp-bfd6a", 33: "VISp6a"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> PhantomWorld:
    """The tiny phantom world, written once for the module (~10 s)."""
    return make_world(tmp_path_factory.mktemp("phantom") / "world", WorldConfig.tiny())


@pytest.fixture(scope="module")
def atlas(world: PhantomWorld) -> Atlas:
    return load_atlas(world.atlas_dir, resolution_um=100)


@pytest.fixture(scope="module")
def truth(world: PhantomWorld) -> pd.DataFrame:
    return world.truth_cells(BRAIN)


def test_world_layout(world: PhantomWorld) -> None:
    """make_world writes atlas, ABC cache, OME-Zarr brain, truth and manifest; no partial dir."""
    root = world.root
    expected = [
        "world.json",
        "manifest.csv",
        "atlas/annotation_100.nrrd",
        "atlas/average_template_100.nrrd",
        "atlas/structures.json",
        "abc/metadata/MERFISH-C57BL6J-638850/20231215/cell_metadata.csv",
        "abc/metadata/MERFISH-C57BL6J-638850-CCF/20231215/ccf_coordinates.csv",
        "abc/metadata/WMB-taxonomy/20231215/views/"
        "cluster_to_cluster_annotation_membership_pivoted.csv",
        f"brains/{BRAIN}.ome.zarr/.zattrs",
        f"truth/{BRAIN}/cells.csv",
        f"truth/{BRAIN}/anchoring.json",
        "truth/mixtures.csv",
    ]
    for rel in expected:
        assert (root / rel).is_file(), rel
    assert not root.with_name(root.name + ".partial").exists()
    assert world.config == WorldConfig.tiny()


def test_reopening_reuses_the_world(world: PhantomWorld) -> None:
    """A second make_world on the same root returns the same world without rewriting files."""
    files = [
        world.root / "world.json",
        world.atlas_dir / "annotation_100.nrrd",
        world.manifest,
        world.root / "truth" / BRAIN / "cells.csv",
    ]
    before = [f.stat().st_mtime_ns for f in files]
    again = make_world(world.root, WorldConfig.tiny())
    assert [f.stat().st_mtime_ns for f in files] == before
    assert again.root == world.root
    assert again.config == world.config
    assert PhantomWorld.open(world.root).config == WorldConfig.tiny()


def test_atlas_loads_with_real_reader(world: PhantomWorld, atlas: Atlas) -> None:
    """load_atlas reads the phantom atlas at 100 µm: CCF grid, real template, same volume."""
    from cellmap2d.synthetic import _STRUCTURES

    assert atlas.shape == (132, 80, 114)
    assert atlas.template_is_pseudo is False
    assert len(atlas.ontology) == len(_STRUCTURES)
    assert set(LAYER_6A) <= set(atlas.ontology.descendants("Isocortex").tolist())
    phantom = phantom_atlas(100.0, seed=world.config.seed)
    assert np.array_equal(atlas.annotation, phantom.annotation)
    np.testing.assert_allclose(atlas.template, phantom.template, atol=1e-4)
    assert atlas.annotation[0, 0, 0] == 0


def test_manifest_lists_the_brain(world: PhantomWorld) -> None:
    """read_manifest gives the one brain: id as a string, absolute zarr path, channels, spacing."""
    (spec,) = read_manifest(world.manifest)
    assert spec.brain_id == BRAIN
    assert Path(spec.path) == (world.root / "brains" / f"{BRAIN}.ome.zarr").resolve()
    assert (spec.signal_channel, spec.autofluorescence_channel) == (0, 1)
    assert spec.section_spacing_um == 800.0


def test_brain_ome_zarr(world: PhantomWorld) -> None:
    """The brain opens with open_brain: 20 µm pixels doubling per level, 10 sections, 4 blank."""
    (spec,) = read_manifest(world.manifest)
    brain = open_brain(spec.path, brain_id=spec.brain_id)
    assert brain.pixel_size_um == pytest.approx([20.0, 40.0, 80.0])
    assert brain.n_channels == 2 and brain.n_sections == 10
    # frame (ml 300–11100, dv 300–7700 µm) at 20 µm
    assert brain.shape == (370, 540)
    for channel in (0, 1):
        assert not brain.section(4, channel).any()
    for z in (1, 5, 9):
        assert brain.section(z, 1).max() > 1000  # autofluorescence shows tissue


def test_planted_cells_are_bright_in_the_signal(world: PhantomWorld, truth: pd.DataFrame) -> None:
    """Every planted cell is a bright spot (> 2× the section median) in the signal channel."""
    brain = open_brain(world.root / "brains" / f"{BRAIN}.ome.zarr")
    assert len(truth) > 100
    assert 4 not in set(truth["section"])
    for z, group in truth.groupby("section"):
        image = brain.section(int(z), 0)
        values = image[np.round(group["y_px"]).astype(int), np.round(group["x_px"]).astype(int)]
        assert values.min() > 2 * np.median(image)


def test_truth_agrees_with_true_anchoring(world: PhantomWorld, truth: pd.DataFrame) -> None:
    """Truth pixels mapped through the true (linear) anchoring land near the true CCF points.

    The anchoring lacks the smooth in-plane deformation (~3 × 30 µm at most) and a cell may sit
    up to half the 60 µm section thickness off the plane, so the error is bounded by ~150 µm;
    along AP (sections nearly coronal) it is bounded by the half thickness plus a few µm.
    """
    anchors = {a.nr: a for a in read_quint(world.truth_anchoring(BRAIN))}
    assert sorted(anchors) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    errors, ap_errors = [], []
    for section, group in truth.groupby("section"):
        anchor = anchors[int(section)]
        assert (anchor.width, anchor.height) == (540, 370)
        ccf = anchor.to_ccf(
            group["x_px"].to_numpy(),
            group["y_px"].to_numpy(),
            width=anchor.width,
            height=anchor.height,
        )
        delta = ccf - group[CCF_COLUMNS].to_numpy()
        errors.append(np.linalg.norm(delta, axis=1))
        ap_errors.append(np.abs(delta[:, 0]))
    errors, ap_errors = np.concatenate(errors), np.concatenate(ap_errors)
    assert np.median(errors) < 60.0
    assert errors.max() < 150.0
    assert ap_errors.max() < 30.0 + 5.0


def test_planted_cells_sit_in_layer_6a(atlas: Atlas, truth: pd.DataFrame) -> None:
    """The brain is labeled with 'L6 CT CTX Glut': its cells are mostly in cortical layer 6a."""
    assert truth["type"].str.endswith("L6 CT CTX Glut").all()
    regions = atlas.region_ids(truth[CCF_COLUMNS].to_numpy())
    assert np.isin(regions, list(LAYER_6A)).mean() >= 0.5
    assert np.isin(regions, atlas.ontology.descendants("Isocortex")).mean() >= 0.8
    for rid in LAYER_6A:  # all three areas are sampled by the 10-section series
        assert (regions == rid).sum() >= 20


def test_truth_mixture(world: PhantomWorld) -> None:
    """truth/mixtures.csv plants a single subclass at fraction 1 in the brain."""
    mixtures = world.truth_mixtures()
    assert mixtures["brain_id"].tolist() == [BRAIN]
    assert mixtures["type"].iloc[0].endswith("L6 CT CTX Glut")
    assert mixtures["planted_fraction"].iloc[0] == 1.0
    assert mixtures["fraction_in_sections"].iloc[0] == 1.0


def test_abc_layout_reads(world: PhantomWorld) -> None:
    """The ABC cache reads with celltypes.read_abc: 37 subclasses, CCF µm inside the volume."""
    from cellmap2d.celltypes import read_abc

    cells = read_abc(world.abc_dir)
    assert cells.n_obs == world.config.n_abc_cells
    assert cells.obs["subclass"].nunique() == 37
    ccf = np.asarray(cells.obsm["ccf"])
    assert ccf.shape == (cells.n_obs, 3)
    assert (ccf >= -100).all()
    assert (ccf <= np.array([13200.0, 8000.0, 11400.0]) + 100).all()


def test_evaluate_mapping_truth_against_itself(truth: pd.DataFrame) -> None:
    """Truth against itself: everything matched, zero error; a known offset is measured."""
    xy = truth[["x_px", "y_px"]].to_numpy()
    section = truth["section"].to_numpy()
    ccf = truth[CCF_COLUMNS].to_numpy()
    result = evaluate_mapping(xy, section, ccf, truth, max_px=1.0)
    assert result["recall"] == 1.0
    assert result["precision"] == 1.0
    assert result["median_um"] == 0.0
    assert result["n_true"] == result["n_detected"] == len(truth)

    shifted = evaluate_mapping(xy, section, ccf + np.array([0.0, 30.0, 40.0]), truth, max_px=1.0)
    assert shifted["median_um"] == pytest.approx(50.0)
    assert shifted["p95_um"] == pytest.approx(50.0)


@pytest.mark.filterwarnings("error")
def test_evaluate_mapping_wrong_section_matches_nothing(truth: pd.DataFrame) -> None:
    """Detections assigned to a section without planted cells (the missing one) match nothing."""
    xy = truth[["x_px", "y_px"]].to_numpy()
    result = evaluate_mapping(
        xy, np.full(len(xy), 4), truth[CCF_COLUMNS].to_numpy(), truth, max_px=1.0
    )
    assert result["recall"] == 0.0 and result["precision"] == 0.0
    assert np.isnan(result["median_um"]) and np.isnan(result["p95_um"])


def test_evaluate_mapping_duplicate_detections_do_not_inflate_recall(truth: pd.DataFrame) -> None:
    """Every planted cell detected twice (0.2 px apart): recall is still 1, not 2."""
    xy = truth[["x_px", "y_px"]].to_numpy()
    section = truth["section"].to_numpy()
    ccf = truth[CCF_COLUMNS].to_numpy()
    result = evaluate_mapping(
        np.vstack([xy, xy + 0.2]),
        np.concatenate([section, section]),
        np.vstack([ccf, ccf]),
        truth,
        max_px=1.0,
    )
    assert result["recall"] == 1.0
    assert result["precision"] == 0.5
    assert result["n_detected"] == 2 * len(truth)
    assert result["median_um"] == 0.0


def _cells(section: int, xy: list[tuple[float, float]]) -> pd.DataFrame:
    xy_arr = np.asarray(xy, dtype=np.float64)
    return pd.DataFrame(
        {
            "section": section,
            "x_px": xy_arr[:, 0],
            "y_px": xy_arr[:, 1],
            "ap_um": 1000.0 * section,
            "dv_um": xy_arr[:, 1],
            "ml_um": xy_arr[:, 0],
        }
    )


def test_evaluate_mapping_is_one_to_one_and_maximal() -> None:
    """Each cell is matched at most once; the assignment matches as many pairs as possible.

    Section 0: truth a=(0,0), b=(1.5,0); detections p=(0.7,0) (0.7 from a, 0.8 from b) and
    q=(-0.9,0) (0.9 from a, the only one in reach). Nearest-first greedy matching takes p–a and
    leaves q and b unmatched; the maximal matching is q–a and p–b. Section 1: one cell detected
    twice and a detection far from any cell. Recall 3/3, precision 3/5.
    """
    truth = pd.concat([_cells(0, [(0.0, 0.0), (1.5, 0.0)]), _cells(1, [(10.0, 10.0)])])
    det_xy = np.array([[0.7, 0.0], [-0.9, 0.0], [10.0, 10.0], [10.5, 10.0], [50.0, 50.0]])
    det_section = np.array([0, 0, 1, 1, 1])
    det_ccf = np.column_stack([1000.0 * det_section, det_xy[:, 1], det_xy[:, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate_mapping(det_xy, det_section, det_ccf, truth, max_px=1.0)
    assert result["n_true"] == 3 and result["n_detected"] == 5
    assert result["recall"] == 1.0
    assert result["precision"] == pytest.approx(3 / 5)
    # matched pairs: q–a 0.9, p–b 0.8, (10,10)–(10,10) 0 (not the 0.5 px duplicate)
    assert result["median_um"] == pytest.approx(0.8)


def test_evaluate_mapping_with_nothing_detected(truth: pd.DataFrame) -> None:
    """No detections: recall 0, precision and errors NaN, without warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate_mapping(
            np.empty((0, 2)), np.empty(0, int), np.empty((0, 3)), truth, max_px=1.0
        )
    assert result["recall"] == 0.0 and result["n_detected"] == 0.0
    assert np.isnan(result["precision"]) and np.isnan(result["median_um"])
    assert np.isnan(result["p95_um"])


def test_make_world_refuses_a_different_config(world: PhantomWorld) -> None:
    """An existing world given a different config raises instead of returning the old world."""
    with pytest.raises(ValueError, match=r"different config.*seed"):
        make_world(world.root, WorldConfig.tiny(seed=5))
    assert make_world(world.root).config == WorldConfig.tiny()  # None: reuse what is there


# --- the realistic rendering ---------------------------------------------------------------


@pytest.fixture(scope="module")
def field() -> tuple[np.ndarray, np.ndarray, pd.DataFrame, dict]:
    """A realistic 1024² field at 1.4 µm (~1 s)."""
    from cellmap2d.synthetic import realistic_field

    return realistic_field(seed=3, extras=True)


def test_realistic_field_shape_and_truth(field) -> None:
    """Two uint16 channels, tissue with bare slide beyond its edge, cells inside tissue."""
    signal, auto, truth, details = field
    assert signal.shape == auto.shape == (1024, 1024)
    assert signal.dtype == auto.dtype == np.uint16
    tissue = details["tissue"]
    assert 0.6 < tissue.mean() < 0.97
    ix, iy = np.round(truth["x"]).astype(int), np.round(truth["y"]).astype(int)
    assert tissue[iy.clip(0, 1023), ix.clip(0, 1023)].all()
    assert {"x", "y", "snr", "in_focus"} <= set(truth.columns)
    assert 100 < len(truth) < 400  # 100 per mm² over ~1.7 mm² of tissue
    # off tissue: the camera offset (100) plus a little glass, far below the tissue
    assert np.median(signal[~tissue]) < 130 < np.median(signal[tissue])


def test_realistic_field_is_deterministic_per_seed() -> None:
    """Same seed, same field; another seed, another field."""
    from cellmap2d.synthetic import realistic_field

    a = realistic_field((256, 256), seed=5)
    b = realistic_field((256, 256), seed=5)
    c = realistic_field((256, 256), seed=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    pd.testing.assert_frame_equal(a[2], b[2])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(("gain", "read_noise"), [(2.0, 6.0), (5.0, 15.0)])
def test_noise_is_poisson_gaussian(gain: float, read_noise: float) -> None:
    """On flat patches the variance is gain · (mean − offset) + read², at several levels.

    The expected means follow from the documented model: offset + bleed · (glass + auto_level
    · t) + stain · t in the signal, offset + glass + auto_level · t in the autofluorescence.
    """
    r = Realism.flat(gain=gain, read_noise=read_noise)
    for level in (60.0, 120.0, 225.0):  # template value: t = 0.5, 1, 1.875
        tissue = np.full((400, 400), level, dtype=np.float32)
        image, _, _ = _render_realistic(
            tissue,
            np.empty((0, 2)),
            pixel_size_um=2.0,
            cell_diameter_um=15.0,
            realism=r,
            rng=np.random.default_rng(int(level)),
        )
        t = level / 120.0
        expected_mean = (
            r.offset + r.bleed * (r.glass + r.auto_level * t) + r.stain * t,
            r.offset + r.glass + r.auto_level * t,
        )
        for channel, mean in enumerate(expected_mean):
            values = image[channel].astype(np.float64)
            assert values.mean() == pytest.approx(mean, rel=0.005)
            want = gain * (mean - r.offset) + read_noise**2
            assert values.var() == pytest.approx(want, rel=0.03)


def test_bleed_through_follows_the_autofluorescence() -> None:
    """Textured tissue: the signal's background rises with the autofluorescence at ``bleed``.

    Smoothed over 4 px (noise averaged out), the least-squares slope of signal on
    autofluorescence is the bleed fraction (the stain's own texture is independent of it);
    with ``bleed=0`` the slope is ~0.
    """
    tissue = np.full((512, 512), 120.0, dtype=np.float32)
    for bleed in (0.3, 0.0):
        image, _, _ = _render_realistic(
            tissue,
            np.empty((0, 2)),
            pixel_size_um=2.0,
            cell_diameter_um=15.0,
            realism=Realism.flat(texture=0.25, bleed=bleed),
            rng=np.random.default_rng(7),
        )
        sig, auto = (ndi.uniform_filter(c.astype(np.float64), 4)[8:-8, 8:-8] for c in image)
        slope = np.polyfit(auto.ravel(), sig.ravel(), 1)[0]
        assert slope == pytest.approx(bleed, abs=0.03)


def test_realistic_field_background_correlates_with_autofluorescence(field) -> None:
    """In cell-free tissue of a full realistic field, signal and autofluorescence correlate."""
    signal, auto, truth, details = field
    free = details["tissue"].copy()
    avoid = np.zeros_like(free)
    for x, y in np.vstack(
        [truth[["x", "y"]].to_numpy(), details["artefacts"][["x", "y"]].to_numpy()]
    ):
        avoid[max(0, int(y) - 25) : int(y) + 26, max(0, int(x) - 25) : int(x) + 26] = True
    free &= ~avoid
    sig = ndi.uniform_filter(signal.astype(np.float64), 5)[free]
    aut = ndi.uniform_filter(auto.astype(np.float64), 5)[free]
    assert free.sum() > 100_000
    assert np.corrcoef(sig, aut)[0, 1] > 0.6


def _excess(image: np.ndarray, x: float, y: float, radius: float) -> float:
    """Brightest 3×3 mean within ``radius`` of (x, y) above the median of an outer ring
    (``radius`` 0: the 3×3 mean at the point)."""
    ix, iy, r = int(round(x)), int(round(y)), int(np.ceil(radius))
    outer = r + 12
    patch = image[iy - outer : iy + outer + 1, ix - outer : ix + outer + 1].astype(np.float64)
    yy, xx = np.mgrid[-outer : outer + 1, -outer : outer + 1]
    rr = np.hypot(xx, yy)
    smooth = ndi.uniform_filter(patch, 3)
    return float(smooth[rr <= radius].max() - np.median(patch[rr > outer - 6]))


def test_specks_are_bright_in_both_channels_cells_only_in_the_signal(field) -> None:
    """Dust/lipofuscin shows in the autofluorescence about as much as in the signal; cells
    (3 % crosstalk) hardly do."""
    signal, auto, truth, details = field
    px = 1.4
    specks = details["artefacts"]
    specks = specks[(specks["kind"] == "cell") & (specks["snr"] > 15)]
    specks = specks[specks["x"].between(60, 964) & specks["y"].between(60, 964)]
    cells = truth[truth["in_focus"] & (truth["snr"] > 15)]
    cells = cells[cells["x"].between(60, 964) & cells["y"].between(60, 964)]
    assert len(specks) >= 2 and len(cells) >= 20

    def ratio(rows: pd.DataFrame, radius: np.ndarray) -> np.ndarray:
        return np.array(
            [
                _excess(auto, x, y, r) / _excess(signal, x, y, r)
                for x, y, r in zip(rows["x"], rows["y"], radius, strict=True)
            ]
        )

    speck_ratio = ratio(specks, specks["diameter_um"].to_numpy() / 2 / px)
    cell_ratio = ratio(cells, np.zeros(len(cells)))
    assert np.median(speck_ratio) > 0.5
    assert np.median(cell_ratio) < 0.12
    # and the specks are bright objects in the autofluorescence (> 5 σ of its noise)
    auto_sigma = np.sqrt(2.0 * (np.median(auto[details["tissue"]]) - 100) + 36)
    in_auto = [_excess(auto, x, y, 5) for x, y in zip(specks["x"], specks["y"], strict=True)]
    assert np.median(in_auto) > 5 * auto_sigma


def test_truth_snr_matches_measured_amplitude_over_noise(field) -> None:
    """Isolated in-focus cells: (centre pixel − surrounding median) / measured pixel noise
    agrees with the truth's ``snr`` (median ratio ~1, tightly correlated)."""
    from scipy.spatial import cKDTree

    signal, _, truth, details = field
    image = signal.astype(np.float64)
    diameter = 15.0 / 1.4
    xy = truth[["x", "y"]].to_numpy()
    nearest = cKDTree(xy).query(xy, 2)[0][:, 1]
    to_speck = cKDTree(details["artefacts"][["x", "y"]].to_numpy()).query(xy)[0]
    ok = (
        truth["in_focus"].to_numpy()
        & (nearest > 3 * diameter)
        & (to_speck > 3 * diameter)
        & (xy.min(axis=1) > 45)
        & (xy.max(axis=1) < 1024 - 45)
    )
    assert ok.sum() >= 30
    yy, xx = np.mgrid[-40:41, -40:41]
    ring = (np.hypot(xx, yy) >= 2.5 * diameter) & (np.hypot(xx, yy) < 3.5 * diameter)
    measured = []
    for x, y in xy[ok]:
        ix, iy = int(round(x)), int(round(y))
        patch = image[iy - 40 : iy + 41, ix - 40 : ix + 41]
        noise = np.std(np.diff(patch, axis=1)[ring[:, 1:]]) / np.sqrt(2)
        measured.append((patch[40, 40] - np.median(patch[ring])) / noise)
    ratio = np.array(measured) / truth["snr"].to_numpy()[ok]
    assert 0.85 < np.median(ratio) < 1.1
    assert np.corrcoef(measured, truth["snr"].to_numpy()[ok])[0, 1] > 0.9


def test_cell_brightness_spans_3_to_40_noise_units(field) -> None:
    """In-focus cells: snr log-uniform over 3–40; out-of-focus ones (~15 %) are dimmer."""
    _, _, truth, _ = field
    focus = truth[truth["in_focus"]]["snr"]
    assert focus.min() > 2.5 and focus.max() < 42
    assert np.median(np.log(focus)) == pytest.approx(np.log(np.sqrt(3 * 40)), abs=0.25)
    blurred = truth[~truth["in_focus"]]["snr"]
    assert 0.05 < len(blurred) / len(truth) < 0.3
    assert blurred.median() < 0.7 * focus.median()


# sha256 of all level-0 sections (signal, autofluorescence; z = 0..9) of WorldConfig.tiny(),
# computed with the code before the realistic model existed (commit 647d876).
EASY_TINY_SHA256 = "f31dd1a9af720cd90162f96d6a2a54ea2b0bff41eb36c4d8d9fe63b5363d1c20"


def test_easy_preset_renders_as_before(world: PhantomWorld) -> None:
    """The easy preset (tiny's default) is bit-identical to the original phantom."""
    import hashlib

    assert world.config.realism == Realism.easy()
    brain = open_brain(world.root / "brains" / f"{BRAIN}.ome.zarr")
    digest = hashlib.sha256()
    for z in range(brain.n_sections):
        for channel in (0, 1):
            digest.update(np.ascontiguousarray(brain.section(z, channel)).tobytes())
    assert digest.hexdigest() == EASY_TINY_SHA256


@pytest.fixture(scope="module")
def realistic_world(tmp_path_factory: pytest.TempPathFactory) -> PhantomWorld:
    """The tiny world imaged with the realistic model (~10 s)."""
    config = WorldConfig.tiny(realism=Realism.realistic())
    return make_world(tmp_path_factory.mktemp("phantom") / "realistic", config)


def test_realistic_world_truth_and_round_trip(realistic_world: PhantomWorld) -> None:
    """A realistic world reopens with its Realism; truth has snr/in_focus; specks recorded;
    cells of ≥ 10 noise units stand out of their section."""
    world = realistic_world
    assert PhantomWorld.open(world.root).config == world.config
    assert make_world(world.root, world.config).config.realism == Realism.realistic()
    truth = world.truth_cells(BRAIN)
    assert {"snr", "in_focus"} <= set(truth.columns)
    assert truth["snr"].between(0.3, 45).all()
    specks = world.truth_artefacts(BRAIN)
    assert set(specks["kind"]) == {"small", "cell", "large"}
    assert 4 not in set(specks["section"])
    brain = open_brain(world.root / "brains" / f"{BRAIN}.ome.zarr")
    bright = truth[truth["in_focus"] & (truth["snr"] >= 10)]
    for z, group in bright.groupby("section"):
        image = brain.section(int(z), 0).astype(np.float64)
        ix, iy = np.round(group["x_px"]).astype(int), np.round(group["y_px"]).astype(int)
        local = ndi.median_filter(image, 9)[iy, ix]
        sigma = np.sqrt(2.0 * (local - 100.0) + 36.0)  # the realistic gain and read noise
        assert np.median((image[iy, ix] - local) / sigma) > 5
