"""Anchoring search and refinement on real images (``../shared/data``; skipped without it).

- The per-slice coronal search, in the real Allen reference at 200 µm, must put the real
  25 µm average-template slices ``Atlas_Hipp.tif`` (AP index ≈ 293) and ``Atlas_Str.tif``
  (≈ 213) within ±250 µm of their true AP (a bit more than one 200 µm template voxel; the
  slices are 2000 µm apart, so a search returning one AP for both fails).
- :func:`cellmap2d.registration.refine` of the real fluorescence section ``sample_hipp.tif``
  (318 × 428) onto ``Atlas_Hipp.tif`` (320 × 456), shapes as they are, must cover the
  section's tissue and agree with a reference from hand-placed landmarks
  (``benchmarks/registration_real.py``) better than the image centres on each other; padded
  to one frame (the pipeline's case) it must raise the tissue-mask Dice.

``benchmarks/real_sections.py`` measures the same things at full size (``docs/registration.md``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellmap2d._plane_search import _AtlasPlanes, _prepare
from cellmap2d.atlas import Atlas, read_ontology

TRUE_AP_UM = {"Atlas_Hipp": 293 * 25.0, "Atlas_Str": 213 * 25.0}
TOLERANCE_UM = 250.0


def _tif(path: Path) -> np.ndarray:
    tifffile = pytest.importorskip("tifffile")
    return tifffile.imread(path).astype(np.float32)


@pytest.fixture(scope="module")
def planes(shared_data: Path) -> _AtlasPlanes:
    """The real 200 µm reference, at the search's 75 µm pixels."""
    with np.load(shared_data / "ccf" / "allen_mouse_200um.npz") as npz:
        template = npz["reference"].astype(np.float32)
        annotation = npz["annotation"].astype(np.uint32)
    ontology = read_ontology(shared_data / "ccf" / "structures.json")
    return _AtlasPlanes(Atlas(annotation, template, 200.0, ontology), 75.0)


def _search(planes: _AtlasPlanes, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NCC of a 25 µm-pixel section with coronal planes every 25 µm of AP."""
    prepared, _ = _prepare([image], [0], 25.0, 64.0)
    assert len(prepared) == 1, "the template slice should hold tissue"
    candidates = np.arange(0.0, planes.ap_max + 1e-6, 25.0)
    return candidates, np.array([planes.score(prepared[0], ap) for ap in candidates])


@pytest.mark.parametrize("name", sorted(TRUE_AP_UM))
def test_real_template_slice_found_at_its_ap(shared_data: Path, planes: _AtlasPlanes, name: str):
    image = _tif(shared_data / "sections" / "brainglobe" / f"{name}.tif")
    candidates, scores = _search(planes, image)
    found = candidates[np.argmax(scores)]
    assert abs(found - TRUE_AP_UM[name]) <= TOLERANCE_UM, (name, found)
    # a real optimum, not a flat profile: 1 mm away the match is clearly worse
    far = np.abs(candidates - found) >= 1000.0
    assert scores.max() > 0.8
    assert scores[far].max() < scores.max() - 0.1


def _benchmark():
    """``benchmarks/registration_real.py`` (its hand-placed landmarks and scores)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "registration_real.py"
    spec = importlib.util.spec_from_file_location("registration_real", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_pair(shared_data: Path) -> dict:
    """sample_hipp (318 × 428) as it is, Atlas_Hipp (320 × 456), the annotation plane."""
    nrrd = pytest.importorskip("nrrd")
    folder = shared_data / "sections" / "brainglobe"
    annotation, _ = nrrd.read(str(shared_data / "ccf" / "annotation_25.nrrd"))
    return {
        "section": _tif(folder / "sample_hipp.tif"),
        "atlas": _tif(folder / "Atlas_Hipp.tif"),
        "ids": np.ascontiguousarray(annotation[293]),
    }


def test_refine_real_section_across_shapes(shared_data: Path, real_pair: dict) -> None:
    """refine(sample_hipp 318 × 428, Atlas_Hipp 320 × 456), no padding, 25 µm both: the
    warped annotation covers the section's tissue better than the image centres on each
    other, and agrees better with the hand-placed landmark reference.

    Measured (benchmarks/registration_real.py): outline Dice 0.992 vs 0.972, weighted Dice
    of major divisions against the reference 0.879 vs 0.845, landmark error median 4.3 vs
    6.3 px.
    """
    from cellmap2d.registration import (
        _frame_affine,
        _linear_refinement,
        _outline_mask,
        refine,
    )

    bench = _benchmark()
    section, atlas, ids_slice = real_pair["section"], real_pair["atlas"], real_pair["ids"]
    result = refine(section, atlas, section_pixel_um=25.0, atlas_pixel_um=25.0)
    assert result.shape == section.shape
    assert result.method in ("affine", "syn")
    assert result.qc["min_jacobian"] > 0  # no folding
    frame = _linear_refinement(
        _frame_affine(section.shape, atlas.shape, 1.0), section.shape, 1.0, "frame"
    )

    got_ids = result.warp_labels(ids_slice)  # raw Allen ids, no compaction needed here
    assert got_ids.shape == section.shape and got_ids.dtype == ids_slice.dtype
    assert set(np.unique(got_ids)) <= set(np.unique(ids_slice))

    outline = _outline_mask(section)

    def outline_dice(r) -> float:  # noqa: ANN001
        warped = r.warp_labels(ids_slice) > 0
        return 2 * (warped & outline).sum() / (warped.sum() + outline.sum())

    assert outline_dice(result) > 0.98
    assert outline_dice(result) > outline_dice(frame) + 0.01

    ontology = read_ontology(shared_data / "ccf" / "structures.json")
    ids, compact = np.unique(ids_slice, return_inverse=True)
    compact = compact.reshape(ids_slice.shape)
    major = bench.major_divisions(ids, ontology)
    sec, atl, _ = bench.landmark_arrays()
    reference = major[bench.tps_refinement(sec, atl, section.shape).warp_labels(compact)]

    def score(r) -> float:  # noqa: ANN001
        return bench.weighted_dice(major[r.warp_labels(compact)], reference)

    assert score(result) > 0.86
    assert score(result) > score(frame) + 0.02
    error = np.linalg.norm(result.map_points(sec) - atl, axis=1)
    frame_error = np.linalg.norm(frame.map_points(sec) - atl, axis=1)
    assert np.median(error) < 5.5
    assert np.median(error) < np.median(frame_error) - 1.0


def test_refinement_of_real_section_raises_mask_dice(shared_data: Path):
    """The pipeline's case: section padded to the atlas frame (same shape), binned 2×."""
    from scipy import ndimage as ndi

    from cellmap2d.registration import refine

    folder = shared_data / "sections" / "brainglobe"
    atlas_slice = _tif(folder / "Atlas_Hipp.tif")  # 320 × 456
    sample = _tif(folder / "sample_hipp.tif")  # 318 × 428: pad to the atlas frame, centred
    section = np.zeros_like(atlas_slice)
    top, left = (np.array(atlas_slice.shape) - sample.shape) // 2
    section[top : top + sample.shape[0], left : left + sample.shape[1]] = sample
    # bin 2× (160 × 228) to keep ANTs fast
    section, atlas_slice = (ndi.zoom(im, 0.5, order=1) for im in (section, atlas_slice))

    result = refine(section, atlas_slice)

    qc = result.qc
    assert result.method in ("affine", "syn")
    assert qc["mask_dice"] > qc["mask_dice_anchoring"] + 0.01, qc
    assert qc["mask_dice"] > 0.9, qc
    assert qc["similarity_affine"] > qc["similarity_anchoring"], qc
    assert qc["min_jacobian"] > 0, qc  # no folding


def test_inplane_registration_leaves_no_ants_files(
    shared_data: Path, planes: _AtlasPlanes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ANTs writes its transforms to the temp folder; hundreds of brains must not fill it."""
    import tempfile

    from cellmap2d._plane_search import _fit_inplane

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    image = _tif(shared_data / "sections" / "brainglobe" / "Atlas_Hipp.tif")
    prepared, _ = _prepare([image], [0], 25.0, 75.0)
    section = prepared[0]
    _fit_inplane(planes, section, TRUE_AP_UM["Atlas_Hipp"], np.zeros(2))
    assert section.inplane is not None and section.inplane.shape == (2, 3)
    assert list(tmp_path.iterdir()) == []
