"""Tests of cellmap2d.registration: ANTs refinement of a section against its atlas slice.

The test image is a real Allen 25 µm template slice (``Atlas_Hipp.tif``, AP index ≈ 293), binned
2× to 160 × 228 to keep ANTs fast. The "section" is that slice warped by a known map
(section pixel → atlas-slice pixel: affine about the centre + a smooth sinusoidal displacement),
so the true answer of ``Refinement.map_points`` is known everywhere.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellmap2d.registration import Refinement, refine, tissue_mask

H, W = 160, 228
THETA = np.radians(3.0)
LINEAR = np.array([[np.cos(THETA), -np.sin(THETA)], [np.sin(THETA), np.cos(THETA)]]) @ np.diag(
    [1.04, 0.97]
)
CENTRE = np.array([W / 2, H / 2])
SHIFT = np.array([3.0, -2.0])
QC_KEYS = ("tissue_px", "mask_dice", "mask_dice_anchoring", "min_jacobian")


def true_map(xy: np.ndarray) -> np.ndarray:
    """Atlas-slice (x, y) of section pixels (x, y): the map the section was made with."""
    xy = np.atleast_2d(np.asarray(xy, dtype=np.float64))
    linear = (xy - CENTRE) @ LINEAR.T + CENTRE + SHIFT
    bend = np.stack(
        [1.0 * np.sin(2 * np.pi * xy[:, 1] / H), 0.75 * np.sin(2 * np.pi * xy[:, 0] / W)], axis=1
    )
    return linear + bend


def _grid() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)


@pytest.fixture(scope="module")
def atlas_slice(shared_data: Path) -> np.ndarray:
    """The real template slice, binned 2× (float32, 160 × 228)."""
    import tifffile

    full = tifffile.imread(shared_data / "sections" / "brainglobe" / "Atlas_Hipp.tif")
    assert full.shape == (320, 456)
    return full.astype(np.float32).reshape(H, 2, W, 2).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def atlas_labels(shared_data: Path) -> np.ndarray:
    """Real Allen ids of the same plane (annotation_25 AP index 293), every 2nd pixel."""
    import nrrd

    annotation, _ = nrrd.read(str(shared_data / "ccf" / "annotation_25.nrrd"))
    return np.ascontiguousarray(annotation[293, ::2, ::2])


@pytest.fixture(scope="module")
def section(atlas_slice: np.ndarray) -> np.ndarray:
    """The atlas slice pulled through the known map (bilinear, 0 outside)."""
    pts = true_map(_grid())
    warped = ndi.map_coordinates(atlas_slice, [pts[:, 1], pts[:, 0]], order=1, cval=0.0)
    return warped.reshape(H, W).astype(np.float32)


@pytest.fixture(scope="module")
def refinement(section: np.ndarray, atlas_slice: np.ndarray) -> Refinement:
    return refine(section, atlas_slice)


def test_refine_recovers_known_map(refinement: Refinement, section: np.ndarray) -> None:
    """Section → atlas-slice positions match the known map within ~1 px over the tissue."""
    assert refinement.method in ("affine", "syn")
    assert refinement.shape == (H, W)
    assert refinement.section_to_atlas.shape == (2, H, W)
    tissue = tissue_mask(section).ravel()
    grid = _grid()
    error = np.linalg.norm(refinement.map_points(grid) - true_map(grid), axis=1)[tissue]
    assert np.median(error) < 0.5
    assert np.percentile(error, 95) < 1.5
    # the anchoring alone (identity) would be several pixels off: the test can tell
    assert np.median(np.linalg.norm(grid - true_map(grid), axis=1)[tissue]) > 3.0
    assert refinement.qc["mask_dice"] > refinement.qc["mask_dice_anchoring"]


def test_syn_undoes_the_bend_the_affine_cannot(
    refinement: Refinement, section: np.ndarray, atlas_slice: np.ndarray
) -> None:
    """The default SyN recovers the known map's smooth bend, which an affine cannot express.

    Measured: median error 0.12 px with the default SyN, 0.37 px with the affine alone.
    """
    affine = refine(section, atlas_slice, syn=False)
    assert refinement.method == "syn" and affine.method == "affine"
    tissue = tissue_mask(section).ravel()
    grid = _grid()

    def median_error(result: Refinement) -> float:
        error = np.linalg.norm(result.map_points(grid) - true_map(grid), axis=1)[tissue]
        return float(np.median(error))

    assert median_error(refinement) < 0.2
    assert median_error(refinement) < 0.5 * median_error(affine)
    assert refinement.qc["min_jacobian"] >= 0.3  # the Jacobian guard's default


def test_jacobian_guard_drops_syn_that_compresses_too_much(
    section: np.ndarray, atlas_slice: np.ndarray
) -> None:
    """A SyN whose least Jacobian stays below ``min_jacobian`` (here an unreachable 0.99, even
    retried twice as stiff) is dropped for the affine, and the QC says why."""
    result = refine(section, atlas_slice, min_jacobian=0.99)
    assert result.method == "affine"
    assert result.qc["syn_min_jacobian"] < 0.99
    assert result.qc["syn_flow_sigma"] == 8.0  # the stiffer retry ran


def test_map_points_direction_section_to_atlas(refinement: Refinement) -> None:
    """map_points takes section points to atlas-slice points (not the inverse) at sub-pixel level."""
    pts = np.array([[0.3 * W, 0.4 * H], [0.5 * W, 0.5 * H], [0.7 * W, 0.6 * H], [60.25, 90.75]])
    got = refinement.map_points(pts)
    assert got.shape == (4, 2)
    np.testing.assert_allclose(got, true_map(pts), atol=1.0)
    # the inverse direction would be off by about twice the shift
    inverse = 2 * pts - true_map(pts)
    assert np.all(np.linalg.norm(got - inverse, axis=1) > 2.0)
    single = refinement.map_points(pts[1])
    assert single.shape == (1, 2)


def test_warp_labels_agree_with_known_map(
    refinement: Refinement, section: np.ndarray, atlas_labels: np.ndarray, shared_data: Path
) -> None:
    """Atlas labels carried onto the section agree with the labels the known map carries.

    Checked on ≥ 95 % of tissue pixels at depth 6 of the ontology (78 regions here; at the full
    170-id detail every 1-px border band counts, agreement is still ≥ 90 %). Allen ids above
    2^24 come through unchanged (no float conversion).
    """
    from cellmap2d.atlas import read_ontology

    ontology = read_ontology(shared_data / "ccf" / "structures.json")
    got = refinement.warp_labels(atlas_labels)
    assert got.dtype == atlas_labels.dtype and got.shape == (H, W)
    target = np.rint(true_map(_grid())).astype(np.int64)
    inside = (target[:, 0] >= 0) & (target[:, 0] < W) & (target[:, 1] >= 0) & (target[:, 1] < H)
    expected = np.zeros(H * W, dtype=atlas_labels.dtype)
    expected[inside] = atlas_labels[target[inside, 1], target[inside, 0]]
    expected = expected.reshape(H, W)
    tissue = tissue_mask(section)

    def coarse(labels: np.ndarray) -> np.ndarray:
        return ontology.rollup(labels.ravel(), 6).reshape(labels.shape)

    assert (coarse(got) == coarse(expected))[tissue].mean() >= 0.95
    assert (got == expected)[tissue].mean() >= 0.90
    assert (atlas_labels == expected)[tissue].mean() < 0.6  # the anchoring alone is far off
    big = atlas_labels[atlas_labels > 2**24]
    assert big.size and set(np.unique(got[got > 2**24])) <= set(np.unique(big))
    assert set(np.unique(got)) <= set(np.unique(atlas_labels)) | {0}


def test_refine_is_deterministic(
    refinement: Refinement, section: np.ndarray, atlas_slice: np.ndarray
) -> None:
    """A second run with the same inputs gives an identical dense map and method."""
    again = refine(section, atlas_slice)
    assert again.method == refinement.method
    assert np.array_equal(again.section_to_atlas, refinement.section_to_atlas)


def test_identical_images_keep_anchoring(atlas_slice: np.ndarray) -> None:
    """Section = atlas slice: the anchoring stands, or the map is within 0.5 px of identity."""
    result = refine(atlas_slice, atlas_slice)
    grid = _grid()
    shift = np.linalg.norm(result.map_points(grid) - grid, axis=1)
    assert result.method == "anchoring" or shift.max() < 0.5
    assert shift.max() < 0.5


def test_anchoring_result_has_documented_qc(atlas_slice: np.ndarray) -> None:
    """When the anchoring stands, qc still reports the tissue-mask Dice (≈ 1 here)."""
    result = refine(atlas_slice, atlas_slice)
    assert result.method == "anchoring"
    assert set(QC_KEYS) <= set(result.qc)
    assert {"similarity_anchoring", "similarity_affine"} <= set(result.qc)
    assert result.qc["mask_dice"] == pytest.approx(1.0)
    assert result.qc["mask_dice_anchoring"] == pytest.approx(1.0)
    assert result.qc["min_jacobian"] == pytest.approx(1.0)
    assert result.qc["tissue_px"] == float(tissue_mask(atlas_slice).sum())


def test_refined_result_has_documented_qc(refinement: Refinement) -> None:
    """A refined (affine or SyN) result carries the same QC keys as an anchoring one."""
    assert refinement.method in ("affine", "syn")
    assert set(QC_KEYS) <= set(refinement.qc)
    assert refinement.qc["min_jacobian"] > 0
    assert 0 <= refinement.qc["mask_dice_anchoring"] < refinement.qc["mask_dice"] <= 1


def test_empty_section_gives_identity(atlas_slice: np.ndarray) -> None:
    """An all-zero section gives the identity map ('anchoring') without error."""
    result = refine(np.zeros((H, W), np.float32), atlas_slice)
    assert result.method == "anchoring"
    yy, xx = np.mgrid[0:H, 0:W]
    assert np.array_equal(result.section_to_atlas, np.stack([xx, yy]).astype(np.float32))
    assert result.qc["tissue_px"] == 0.0
    assert set(QC_KEYS) <= set(result.qc)
    assert result.qc["mask_dice"] == result.qc["mask_dice_anchoring"] == 0.0
    assert result.qc["min_jacobian"] == 1.0


def test_refine_rejects_bad_arguments(atlas_slice: np.ndarray) -> None:
    """random_seed 0 (ANTs: clock seed), an unknown SyN metric or placement, a non-positive
    pixel size, images that are not 2-D and a mask of the wrong shape raise ValueError."""
    with pytest.raises(ValueError, match="random_seed"):
        refine(atlas_slice, atlas_slice, random_seed=0)
    with pytest.raises(ValueError, match="syn_metric"):
        refine(atlas_slice, atlas_slice, syn_metric="MI")
    with pytest.raises(ValueError, match="initial"):
        refine(atlas_slice, atlas_slice, initial="landmarks")
    with pytest.raises(ValueError, match="pixel"):
        refine(atlas_slice, atlas_slice, atlas_pixel_um=0.0)
    with pytest.raises(ValueError, match="2-D"):
        refine(atlas_slice[None], atlas_slice[None])
    with pytest.raises(ValueError, match="mask"):
        refine(atlas_slice[:-1], atlas_slice, section_mask=np.ones(atlas_slice.shape, bool))


def test_identity_map_points_and_warp_labels() -> None:
    """The identity refinement maps points to themselves and copies labels; outside gives 0."""
    ident = Refinement.identity((4, 5))
    pts = np.array([[0.0, 0.0], [4.0, 3.0], [1.25, 2.5]])
    np.testing.assert_allclose(ident.map_points(pts), pts)
    labels = np.arange(20, dtype=np.uint32).reshape(4, 5) + 600_000_000
    assert np.array_equal(ident.warp_labels(labels), labels)
    shifted = Refinement(ident.section_to_atlas + np.float32(2.0), "affine")
    out = shifted.warp_labels(labels)
    assert np.array_equal(out[:2, :3], labels[2:, 2:])
    assert (out[2:, :] == 0).all() and (out[:, 3:] == 0).all()


def test_save_load_round_trip(refinement: Refinement, tmp_path: Path) -> None:
    """save/load through a path (name kept as given) and through an open binary file."""
    path = tmp_path / "section_007.refine"
    refinement.save(path)
    assert path.is_file()
    loaded = Refinement.load(path)
    assert np.array_equal(loaded.section_to_atlas, refinement.section_to_atlas)
    assert loaded.section_to_atlas.dtype == refinement.section_to_atlas.dtype
    assert loaded.method == refinement.method
    assert loaded.qc == refinement.qc

    buffer = io.BytesIO()
    refinement.save(buffer)
    assert not buffer.closed
    buffer.seek(0)
    from_buffer = Refinement.load(buffer)
    assert np.array_equal(from_buffer.section_to_atlas, refinement.section_to_atlas)
    assert from_buffer.method == refinement.method and from_buffer.qc == refinement.qc

    with open(tmp_path / "open.npz", "wb") as fh:
        refinement.save(fh)
    with open(tmp_path / "open.npz", "rb") as fh:
        assert Refinement.load(fh).qc == refinement.qc

    empty = Refinement.identity((3, 3))
    empty.save(tmp_path / "empty.npz")
    back = Refinement.load(tmp_path / "empty.npz")
    assert back.qc == {} and back.method == "anchoring"


# --- across shapes and pixel sizes -------------------------------------------------------
#
# The atlas slice is the binned template above (160 × 228) at 50 µm pixels. The "section" is a
# 260 × 330 image at 36 µm pixels in which the brain is rotated by 10°, scaled anisotropically
# (1.05, 0.96), placed off the image centre (500 µm right, 700 µm up) and bent smoothly
# (40 / 30 µm sinusoids): the true map section pixel → atlas-slice pixel is known everywhere.

SECTION_UM, ATLAS_UM = 36.0, 50.0
SECTION_SHAPE = (260, 330)
_ROT = np.radians(10.0)
X_LINEAR = np.array([[np.cos(_ROT), -np.sin(_ROT)], [np.sin(_ROT), np.cos(_ROT)]]) @ np.diag(
    [1.05, 0.96]
)
X_SECTION_CENTRE_UM = np.array(
    [SECTION_SHAPE[1] / 2 * SECTION_UM + 500, SECTION_SHAPE[0] / 2 * SECTION_UM - 700]
)
X_ATLAS_CENTRE_UM = np.array([W / 2 * ATLAS_UM, H / 2 * ATLAS_UM])


def cross_true_map(xy: np.ndarray) -> np.ndarray:
    """Atlas-slice pixel (x, y) of section pixels (x, y) in the cross-shape case."""
    um = np.atleast_2d(np.asarray(xy, dtype=np.float64)) * SECTION_UM
    linear = (um - X_SECTION_CENTRE_UM) @ X_LINEAR.T + X_ATLAS_CENTRE_UM
    bend = np.stack(
        [40 * np.sin(2 * np.pi * um[:, 1] / 6000), 30 * np.sin(2 * np.pi * um[:, 0] / 8000)],
        axis=1,
    )
    return (linear + bend) / ATLAS_UM


def _section_grid() -> np.ndarray:
    yy, xx = np.mgrid[0 : SECTION_SHAPE[0], 0 : SECTION_SHAPE[1]]
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)


@pytest.fixture(scope="module")
def cross_section(atlas_slice: np.ndarray) -> np.ndarray:
    pts = cross_true_map(_section_grid())
    warped = ndi.map_coordinates(atlas_slice, [pts[:, 1], pts[:, 0]], order=1, cval=0.0)
    return warped.reshape(SECTION_SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def cross_refinement(cross_section: np.ndarray, atlas_slice: np.ndarray) -> Refinement:
    return refine(cross_section, atlas_slice, section_pixel_um=SECTION_UM, atlas_pixel_um=ATLAS_UM)


def _cross_error(result: Refinement, section: np.ndarray) -> np.ndarray:
    """Error (atlas-slice pixels) of ``result.map_points`` over the section's tissue."""
    grid = _section_grid()
    tissue = tissue_mask(section).ravel()
    return np.linalg.norm(result.map_points(grid) - cross_true_map(grid), axis=1)[tissue]


def test_refine_across_shapes_and_pixel_sizes_recovers_known_map(
    cross_refinement: Refinement, cross_section: np.ndarray, atlas_slice: np.ndarray
) -> None:
    """Different shapes, pixel sizes, an off-centre rotated brain: the map is sub-pixel.

    Measured: median 0.15, 95th percentile 0.60 atlas pixels (50 µm); the affine alone leaves
    0.68 / 1.2 (the bend), the moments placement alone 2.7 px, the image centres 20+ px.
    """
    assert cross_refinement.shape == SECTION_SHAPE
    assert cross_refinement.method == "syn"
    error = _cross_error(cross_refinement, cross_section)
    assert np.median(error) < 0.3
    assert np.percentile(error, 95) < 1.0
    frame = refine(
        cross_section,
        atlas_slice,
        section_pixel_um=SECTION_UM,
        atlas_pixel_um=ATLAS_UM,
        syn=False,
    )
    assert np.median(_cross_error(frame, cross_section)) > 2 * np.median(error)
    qc = cross_refinement.qc
    assert qc["similarity_initial"] > qc["similarity_anchoring"]  # moments beat the centres
    assert qc["mask_dice_anchoring"] < qc["mask_dice_initial"] < qc["mask_dice"]
    assert qc["mask_dice"] > 0.97


def test_initial_placement_alone_is_the_coarse_step(
    cross_section: np.ndarray, atlas_slice: np.ndarray
) -> None:
    """Image centres on each other are far off; the moments placement brings it within a few
    pixels (what the affine then starts from)."""
    from cellmap2d.registration import (
        _frame_affine,
        _linear_refinement,
        _moments_affine,
        _outline_mask,
    )

    ratio = ATLAS_UM / SECTION_UM
    centres = _linear_refinement(
        _frame_affine(SECTION_SHAPE, atlas_slice.shape, ratio), SECTION_SHAPE, ratio, "anchoring"
    )
    moments = _linear_refinement(
        _moments_affine(_outline_mask(cross_section), _outline_mask(atlas_slice), ratio),
        SECTION_SHAPE,
        ratio,
        "initial",
    )
    assert np.median(_cross_error(centres, cross_section)) > 10
    assert np.median(_cross_error(moments, cross_section)) < 5


def test_warp_labels_across_shapes(
    cross_refinement: Refinement,
    cross_section: np.ndarray,
    atlas_labels: np.ndarray,
    shared_data: Path,
) -> None:
    """Real Allen ids (some above 2^24) carried onto a section of another shape: section
    shape, the input's dtype, only ids of the input (no interpolated ids), and agreement with
    the labels the true map carries on ≥ 95 % of tissue at ontology depth 6."""
    from cellmap2d.atlas import read_ontology

    got = cross_refinement.warp_labels(atlas_labels)
    assert got.shape == SECTION_SHAPE and got.dtype == atlas_labels.dtype
    assert set(np.unique(got)) <= set(np.unique(atlas_labels)) | {0}
    big = atlas_labels[atlas_labels > 2**24]
    assert big.size and (got > 2**24).any()
    target = np.rint(cross_true_map(_section_grid())).astype(np.int64)
    inside = (target[:, 0] >= 0) & (target[:, 0] < W) & (target[:, 1] >= 0) & (target[:, 1] < H)
    expected = np.zeros(target.shape[0], dtype=atlas_labels.dtype)
    expected[inside] = atlas_labels[target[inside, 1], target[inside, 0]]
    expected = expected.reshape(SECTION_SHAPE)
    tissue = tissue_mask(cross_section)
    ontology = read_ontology(shared_data / "ccf" / "structures.json")

    def coarse(labels: np.ndarray) -> np.ndarray:
        return ontology.rollup(labels.ravel(), 6).reshape(labels.shape)

    assert (coarse(got) == coarse(expected))[tissue].mean() >= 0.95
    assert (got == expected)[tissue].mean() >= 0.90


def test_pixel_size_alone_is_honoured(atlas_slice: np.ndarray) -> None:
    """Same array shape, different pixel sizes: the section at 25 µm is the template at 50 µm
    zoomed 2× (its central half); the map is x_atlas ≈ (x_section + c) / 2 with the centre
    offset c, not the identity."""
    zoomed = ndi.zoom(atlas_slice, 2.0, order=1)[H // 2 : H // 2 + H, W // 2 : W // 2 + W]
    result = refine(zoomed, atlas_slice, section_pixel_um=25.0, atlas_pixel_um=50.0, syn=False)
    assert result.shape == (H, W)
    grid = _grid()
    # ndi.zoom maps output o to input o·(n−1)/(2n−1); the crop starts at n/2
    expected = np.stack(
        [
            (grid[:, 0] + W // 2) * (W - 1) / (2 * W - 1),
            (grid[:, 1] + H // 2) * (H - 1) / (2 * H - 1),
        ],
        axis=1,
    )
    tissue = tissue_mask(zoomed).ravel()
    error = np.linalg.norm(result.map_points(grid) - expected, axis=1)[tissue]
    assert np.median(error) < 0.5


def test_save_load_round_trip_across_shapes(cross_refinement: Refinement, tmp_path: Path) -> None:
    """A map of a section whose shape differs from the atlas slice's round-trips unchanged."""
    path = tmp_path / "cross.npz"
    cross_refinement.save(path)
    back = Refinement.load(path)
    assert back.shape == SECTION_SHAPE and back.method == cross_refinement.method
    assert np.array_equal(back.section_to_atlas, cross_refinement.section_to_atlas)
    assert back.qc == cross_refinement.qc
    pts = np.array([[100.0, 120.0], [200.5, 80.25]])
    np.testing.assert_array_equal(back.map_points(pts), cross_refinement.map_points(pts))
