"""Anchoring search and refinement on real images (``../shared/data``; skipped without it).

- The per-slice coronal search, in the real Allen reference at 200 µm, must put the real
  25 µm average-template slices ``Atlas_Hipp.tif`` (AP index ≈ 293) and ``Atlas_Str.tif``
  (≈ 213) within ±250 µm of their true AP (a bit more than one 200 µm template voxel; the
  slices are 2000 µm apart, so a search returning one AP for both fails).
- :func:`cellmap2d.registration.refine` of the real fluorescence section ``sample_hipp.tif``
  onto ``Atlas_Hipp.tif`` must raise the tissue-mask Dice over the unrefined frame.

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


def test_refinement_of_real_section_raises_mask_dice(shared_data: Path):
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
