"""In-plane refinement of an anchored section with ANTs (affine, then regularised SyN).

In the pipeline the atlas slice is the atlas sampled through the section's anchoring on the
section's own pixel grid (one frame); :func:`refine` also takes an atlas slice of another shape
and pixel size, placing it on the section first. The result is kept as a dense map: for every
section pixel, the atlas-slice pixel it corresponds to.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

__all__ = ["Refinement", "refine", "tissue_mask"]

_MIN_GAIN = 1e-3


@dataclass
class Refinement:
    """Where each section pixel lies in the atlas slice.

    Attributes
    ----------
    section_to_atlas
        ``(2, h, w)`` float32: atlas-slice ``(x, y)`` of every section pixel ``(x, y)``.
    method
        ``"syn"``, ``"affine"`` or ``"anchoring"`` (no step improved on the anchoring).
    qc
        Similarity before/after each step (Mattes mutual information, higher is better),
        minimum Jacobian determinant, tissue-mask Dice after refinement. Every result of
        :func:`refine` carries ``tissue_px``, ``mask_dice``, ``mask_dice_anchoring`` and
        ``min_jacobian`` (1.0 when the anchoring stands); ``similarity_anchoring`` and
        ``similarity_affine`` whenever registration ran, ``similarity_syn`` when SyN was tried.
    """

    section_to_atlas: np.ndarray
    method: str
    qc: dict[str, float] = field(default_factory=dict)

    @classmethod
    def identity(cls, shape: tuple[int, int], qc: dict[str, float] | None = None) -> Refinement:
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
        return cls(np.stack([xx, yy]), "anchoring", dict(qc or {}))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.section_to_atlas.shape[1:])  # type: ignore[return-value]

    def map_points(self, xy_section: np.ndarray) -> np.ndarray:
        """Atlas-slice ``(x, y)`` of section points ``(n, 2)`` (bilinear in the dense map)."""
        xy = np.atleast_2d(np.asarray(xy_section, dtype=np.float64))
        coords = [xy[:, 1], xy[:, 0]]
        return np.stack(
            [
                ndi.map_coordinates(c, coords, order=1, mode="nearest")
                for c in self.section_to_atlas
            ],
            axis=1,
        ).astype(np.float64)

    def warp_labels(self, labels_atlas_slice: np.ndarray) -> np.ndarray:
        """Labels of the atlas slice carried onto the section (nearest neighbour; 0 outside)."""
        labels = np.asarray(labels_atlas_slice)
        x = np.rint(self.section_to_atlas[0]).astype(np.int64)
        y = np.rint(self.section_to_atlas[1]).astype(np.int64)
        inside = (x >= 0) & (x < labels.shape[1]) & (y >= 0) & (y < labels.shape[0])
        out = np.zeros(self.shape, dtype=labels.dtype)
        out[inside] = labels[y[inside], x[inside]]
        return out

    def save(self, path: str | Path) -> None:
        """Write as ``.npz`` to a path or open binary file."""
        keys = np.array(list(self.qc), dtype=str)
        values = np.array([self.qc[k] for k in keys], dtype=np.float64)
        target = path if hasattr(path, "write") else open(path, "wb")  # noqa: SIM115
        try:
            np.savez_compressed(
                target,
                section_to_atlas=self.section_to_atlas,
                method=np.array(self.method),
                qc_keys=keys,
                qc_values=values,
            )
        finally:
            if target is not path:
                target.close()

    @classmethod
    def load(cls, path: str | Path) -> Refinement:
        with np.load(path) as data:
            qc = dict(zip(data["qc_keys"].tolist(), data["qc_values"].tolist(), strict=True))
            return cls(data["section_to_atlas"], str(data["method"]), qc)


def tissue_mask(image: np.ndarray, *, smooth_px: float = 1.0) -> np.ndarray:
    """Foreground by Otsu's threshold on a smoothed image, holes filled, largest parts kept."""
    return _otsu_mask(image, smooth_px=smooth_px)


def _outline_mask(image: np.ndarray) -> np.ndarray:
    """The whole tissue outline, dark fibre tracts included (for the initial placement).

    Half Otsu's threshold on a smoothed image, closed, holes filled, small parts dropped:
    :func:`tissue_mask` leaves out white matter that is dark in a template, which would bias
    the area (hence the scale) of the placement.
    """
    return _otsu_mask(image, smooth_px=2.0, fraction=0.5, close_iterations=3)


def _otsu_mask(
    image: np.ndarray, *, smooth_px: float, fraction: float = 1.0, close_iterations: int = 0
) -> np.ndarray:
    """Pixels above ``fraction`` × Otsu's threshold of the smoothed image, optionally closed,
    opened, holes filled; parts under 5 % of the largest dropped."""
    from skimage.filters import threshold_otsu

    smooth = ndi.gaussian_filter(np.asarray(image, dtype=np.float32), smooth_px)
    if float(smooth.max()) == float(smooth.min()):
        return np.zeros(smooth.shape, dtype=bool)
    mask = smooth > fraction * threshold_otsu(smooth)
    if close_iterations:
        mask = ndi.binary_closing(mask, iterations=close_iterations)
    mask = ndi.binary_fill_holes(ndi.binary_opening(mask, iterations=1))
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum(mask, labels, range(1, n + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.05 * sizes.max()))
    return mask


def _normalise(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    data = np.asarray(image, dtype=np.float32)
    values = data[mask] if mask.any() else data.ravel()
    lo, hi = np.percentile(values, [0.5, 99.5])
    return np.clip((data - lo) / max(hi - lo, 1e-6), 0, 1.2)


def refine(
    section_image: np.ndarray,
    atlas_slice: np.ndarray,
    *,
    section_pixel_um: float = 1.0,
    atlas_pixel_um: float | None = None,
    initial: str = "auto",
    section_mask: np.ndarray | None = None,
    atlas_mask: np.ndarray | None = None,
    syn: bool = True,
    random_seed: int = 1,
    syn_flow_sigma: float = 4.0,
    syn_iterations: tuple[int, ...] = (60, 30, 0),
    syn_metric: str = "CC",
    syn_radius: int = 2,
    syn_total_sigma: float = 1.0,
    min_jacobian: float = 0.3,
) -> Refinement:
    """Refine a section onto an atlas slice: initial placement, ANTs affine, regularised SyN.

    The two images may differ in shape and pixel size: both are put in one physical plane
    (ANTs images with their pixel spacing), the atlas slice is placed on the section
    (``initial``), then an affine and a regularised SyN refine it. A step is kept only if it
    raises the image similarity (Mattes mutual information within the tissue masks);
    otherwise the previous stage stands (``method`` says which). The result maps section
    pixels ``(x, y)`` = (column, row) to atlas-slice pixels. Deterministic for a given
    ``random_seed`` ≥ 1 (ANTs takes 0 as "seed from the clock") as long as ITK runs with one
    thread (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``, which ``import cellmap2d`` sets
    unless the environment already has it).

    Parameters
    ----------
    section_image
        The section (e.g. autofluorescence thumbnail), 2-D.
    atlas_slice
        The atlas template slice, 2-D; in the pipeline, sampled through the anchoring on the
        section's own pixel grid (same shape and pixel size).
    section_pixel_um, atlas_pixel_um
        Pixel sizes (any common unit); ``atlas_pixel_um=None`` means the same as the section.
    initial
        Placement before the affine: ``"frame"`` (image centres on each other at physical
        scale; for images of one shape and pixel size, the identity, i.e. the anchoring),
        ``"moments"`` (tissue-outline centroids on each other at physical scale, the
        rotation within ±20° that maximises the outline overlap), or ``"auto"``: ``"frame"``
        when shape and pixel size agree (the anchoring already placed the slice), else
        whichever of the two gives the higher mutual information over the section's tissue
        (``qc["initial_moments"]`` says which: 1 = moments).
    section_mask, atlas_mask
        Tissue masks; Otsu masks when not given.
    syn
        Whether to try the deformable step.
    syn_flow_sigma
        SyN update-field smoothing (section pixels): larger is stiffer.
    syn_iterations
        SyN iterations at 4×, 2× and 1× shrink. The default skips full resolution: the
        deformation is estimated on the 2×-shrunk grid (smoother, and 2–3× faster).
    syn_metric
        SyN similarity: ``"CC"`` (local normalised cross-correlation, ANTs' usual choice for
        images of the same kind of contrast) or ``"mattes"`` (mutual information).
    syn_radius
        Neighbourhood radius (pixels of each level) of ``"CC"``.
    syn_total_sigma
        Smoothing of the total deformation field (pixels) after each iteration: with the
        update-field smoothing, what keeps the deformation smooth (0 = none).
    min_jacobian
        Least local area ratio (Jacobian determinant) a deformation may have in the tissue: a
        SyN result compressing tissue more than this is retried twice as stiff, then dropped
        for the affine (real sections bend far less than unregularised SyN makes them).
    """
    import ants

    if random_seed < 1:
        raise ValueError("random_seed must be >= 1; ANTs treats 0 as a clock seed")
    if syn_metric not in ("CC", "mattes"):
        raise ValueError(f"syn_metric must be 'CC' or 'mattes', not {syn_metric!r}")
    if initial not in ("auto", "frame", "moments"):
        raise ValueError(f"initial must be 'auto', 'frame' or 'moments', not {initial!r}")
    atlas_um = section_pixel_um if atlas_pixel_um is None else atlas_pixel_um
    if not (section_pixel_um > 0 and atlas_um > 0):
        raise ValueError("pixel sizes must be positive")
    _deterministic(ants, random_seed)
    section = np.asarray(section_image, dtype=np.float32)
    atlas = np.asarray(atlas_slice, dtype=np.float32)
    if section.ndim != 2 or atlas.ndim != 2:
        raise ValueError(f"section {section.shape} and atlas slice {atlas.shape} must be 2-D")
    # physical unit = one section pixel; an atlas pixel is `ratio` of them
    ratio = float(atlas_um) / float(section_pixel_um)
    same_frame = section.shape == atlas.shape and ratio == 1.0
    smask = tissue_mask(section) if section_mask is None else np.asarray(section_mask, bool)
    amask = tissue_mask(atlas) if atlas_mask is None else np.asarray(atlas_mask, bool)
    if smask.shape != section.shape or amask.shape != atlas.shape:
        raise ValueError("each mask must have its image's shape")
    frame = _frame_affine(section.shape, atlas.shape, ratio)
    frame_ref = _linear_refinement(frame, section.shape, ratio, "anchoring")
    if smask.sum() < 50 or amask.sum() < 50:
        return _with_mask_qc(frame_ref, smask, amask, frame_ref)
    fixed = ants.from_numpy(_normalise(section, smask))
    moving = ants.from_numpy(_normalise(atlas, amask), spacing=(ratio, ratio))
    workdir = tempfile.mkdtemp(prefix="cellmap2d-ants-")
    try:
        return _refine_from(
            ants,
            fixed,
            moving,
            smask,
            amask,
            ratio,
            initial,
            same_frame,
            frame,
            frame_ref,
            workdir,
            section_mask is None,
            atlas_mask is None,
            section,
            atlas,
            syn=syn,
            random_seed=random_seed,
            syn_flow_sigma=syn_flow_sigma,
            syn_iterations=syn_iterations,
            syn_metric=syn_metric,
            syn_radius=syn_radius,
            syn_total_sigma=syn_total_sigma,
            min_jacobian=min_jacobian,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _mattes(ants, fixed, warped, mask) -> float:  # noqa: ANN001
    """Mattes mutual information of two images in the fixed frame within ``mask`` (higher
    is better)."""
    value = ants.image_similarity(
        fixed, warped, metric_type="MattesMutualInformation", fixed_mask=mask, moving_mask=mask
    )
    return -float(value)


def _refine_from(  # noqa: PLR0913
    ants,  # noqa: ANN001
    fixed,  # noqa: ANN001
    moving,  # noqa: ANN001
    smask: np.ndarray,
    amask: np.ndarray,
    ratio: float,
    initial: str,
    same_frame: bool,
    frame: np.ndarray,
    frame_ref: Refinement,
    workdir: str,
    own_smask: bool,
    own_amask: bool,
    section: np.ndarray,
    atlas: np.ndarray,
    *,
    syn: bool,
    random_seed: int,
    syn_flow_sigma: float,
    syn_iterations: tuple[int, ...],
    syn_metric: str,
    syn_radius: int,
    syn_total_sigma: float,
    min_jacobian: float,
) -> Refinement:
    """The body of :func:`refine` once images, masks and the unrefined frame are set up."""
    frame_file = _write_affine(ants, frame, os.path.join(workdir, "frame.mat"))
    candidates = {"frame": (frame, frame_ref, frame_file)}
    if initial in ("moments", "auto") and not (initial == "auto" and same_frame):
        moments = _moments_affine(
            _outline_mask(section) if own_smask else smask,
            _outline_mask(atlas) if own_amask else amask,
            ratio,
        )
        candidates["moments"] = (
            moments,
            _linear_refinement(moments, section.shape, ratio, "initial"),
            _write_affine(ants, moments, os.path.join(workdir, "moments.mat")),
        )
    if initial == "auto" and len(candidates) > 1:
        # the placement whose atlas image matches the section's tissue best
        tissue = ants.from_numpy(ndi.binary_dilation(smask, iterations=3).astype(np.float32))
        scores = {
            name: _mattes(ants, fixed, ants.apply_transforms(fixed, moving, [path]), tissue)
            for name, (_, _, path) in candidates.items()
        }
        initial = max(scores, key=scores.get)
    elif initial == "auto":
        initial = "frame"
    _, start_ref, start_file = candidates[initial]
    start_amask = start_ref.warp_labels(amask.astype(np.uint8)).astype(bool)
    region = ndi.binary_dilation(smask | start_amask, iterations=3)
    fixed_mask = ants.from_numpy(region.astype(np.float32))

    def similarity(warped: ants.ANTsImage) -> float:
        return _mattes(ants, fixed, warped, fixed_mask)

    identity_start = same_frame and initial == "frame"
    init: str | list[str] = "identity" if identity_start else [start_file]
    qc = {
        "similarity_anchoring": similarity(
            moving if same_frame else ants.apply_transforms(fixed, moving, [frame_file])
        )
    }
    if not same_frame or initial != "frame":
        qc["initial_moments"] = float(initial == "moments")
    if initial != "frame":
        qc["similarity_initial"] = similarity(ants.apply_transforms(fixed, moving, init))
    base = qc.get("similarity_initial", qc["similarity_anchoring"])
    aff = ants.registration(
        fixed,
        moving,
        type_of_transform="Affine",
        aff_metric="mattes",
        random_seed=random_seed,
        outprefix=os.path.join(workdir, "aff_"),
        initial_transform=init,
        aff_iterations=(200, 100, 50),
        aff_shrink_factors=(4, 2, 1),
        aff_smoothing_sigmas=(2, 1, 0),
    )
    qc["similarity_affine"] = similarity(aff["warpedmovout"])
    if qc["similarity_affine"] <= base + _MIN_GAIN:
        start_ref.qc.update(qc)
        refinement = start_ref
    else:
        transforms, method = aff["fwdtransforms"], "affine"
        if syn:
            for attempt, flow_sigma in enumerate((syn_flow_sigma, 2 * syn_flow_sigma)):
                deform = ants.registration(
                    fixed,
                    moving,
                    type_of_transform="SyNOnly",
                    syn_metric=syn_metric,
                    syn_sampling=syn_radius if syn_metric == "CC" else 32,
                    initial_transform=aff["fwdtransforms"],
                    flow_sigma=flow_sigma,
                    total_sigma=syn_total_sigma,
                    reg_iterations=syn_iterations,
                    random_seed=random_seed,
                    outprefix=os.path.join(workdir, f"syn{attempt}_"),
                )
                gain = similarity(deform["warpedmovout"])
                jac = ants.create_jacobian_determinant_image(
                    fixed, deform["fwdtransforms"][0]
                ).numpy()
                qc["similarity_syn"], qc["syn_min_jacobian"] = gain, float(jac[smask].min())
                qc["syn_flow_sigma"] = flow_sigma
                if qc["syn_min_jacobian"] >= min_jacobian:
                    break
            folds_ok = qc["syn_min_jacobian"] >= min_jacobian
            if folds_ok and qc["similarity_syn"] > qc["similarity_affine"] + _MIN_GAIN:
                transforms, method = deform["fwdtransforms"], "syn"
                qc["min_jacobian"] = qc["syn_min_jacobian"]
        if "min_jacobian" not in qc:
            qc["min_jacobian"] = float(abs(np.linalg.det(_affine_matrix(transforms[-1]))))
        dense = _dense_map(transforms, section.shape, ratio)
        refinement = Refinement(dense, method, qc)
    return _with_mask_qc(refinement, smask, amask, frame_ref, start_ref)


def _frame_affine(
    section_shape: tuple[int, int], atlas_shape: tuple[int, int], ratio: float
) -> np.ndarray:
    """(2, 3) map section physical (row, col) → atlas physical: image centres on each other."""
    centre_s = (np.asarray(section_shape, float) - 1) / 2
    centre_a = (np.asarray(atlas_shape, float) - 1) / 2 * ratio
    return np.hstack([np.eye(2), (centre_a - centre_s)[:, None]])


def _moments_affine(smask: np.ndarray, amask: np.ndarray, ratio: float) -> np.ndarray:
    """(2, 3) similarity map section physical → atlas physical from the two tissue masks.

    Centroids on each other at physical scale (mouse brains differ in size by a few
    percent, left to the affine; an area-based scale would fail on partial sections), then
    the rotation (±20° in 2°
    steps, then ±1° in 0.25° steps) that maximises the Dice of the masks (every 2nd pixel).
    """
    rows, cols = np.nonzero(smask)
    centre_s = np.array([rows.mean(), cols.mean()])
    arows, acols = np.nonzero(amask)
    centre_a = np.array([arows.mean(), acols.mean()]) * ratio
    scale = 1.0  # the pixel sizes fix the physical scale; the affine refines it
    sub = np.mgrid[0 : smask.shape[0] : 2, 0 : smask.shape[1] : 2].reshape(2, -1).astype(float)
    s_sub = smask[::2, ::2].ravel()

    def affine(theta: float) -> np.ndarray:
        c, s = np.cos(theta), np.sin(theta)
        linear = scale * np.array([[c, -s], [s, c]])
        return np.hstack([linear, (centre_a - linear @ centre_s)[:, None]])

    def dice(theta: float) -> float:
        mat = affine(theta)
        pts = (mat[:, :2] @ sub + mat[:, 2:]) / ratio
        hit = ndi.map_coordinates(amask.astype(np.uint8), pts, order=0, cval=0).astype(bool)
        return _dice(hit, s_sub)

    coarse = np.radians(np.arange(-20.0, 20.0 + 1e-9, 2.0))
    best = coarse[int(np.argmax([dice(t) for t in coarse]))]
    fine = best + np.radians(np.arange(-1.0, 1.0 + 1e-9, 0.25))
    return affine(float(fine[int(np.argmax([dice(t) for t in fine]))]))


def _linear_refinement(
    mat: np.ndarray, shape: tuple[int, int], ratio: float, method: str
) -> Refinement:
    """The dense map of a (2, 3) physical affine (exact identity when it is the identity)."""
    if np.array_equal(mat, np.hstack([np.eye(2), np.zeros((2, 1))])) and ratio == 1.0:
        return Refinement.identity(shape)
    rc = np.mgrid[0 : shape[0], 0 : shape[1]].reshape(2, -1).astype(np.float64)
    mapped = (mat[:, :2] @ rc + mat[:, 2:]) / ratio
    dense = mapped[::-1].reshape(2, *shape).astype(np.float32)  # (x, y) = (col, row)
    return Refinement(dense, method, {})


def _write_affine(ants, mat: np.ndarray, path: str) -> str:  # noqa: ANN001
    """Write a (2, 3) physical affine (fixed point → moving point) as an ANTs .mat file."""
    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=2,
        matrix=np.asarray(mat[:, :2], dtype=np.float64),
        translation=np.asarray(mat[:, 2], dtype=np.float64),
        center=np.zeros(2),
    )
    ants.write_transform(tx, path)
    return path


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float(2 * (a & b).sum() / total) if total else float("nan")


def _with_mask_qc(
    refinement: Refinement,
    smask: np.ndarray,
    amask: np.ndarray,
    frame: Refinement,
    start: Refinement | None = None,
) -> Refinement:
    """Add the QC every result carries to ``refinement.qc`` (the dict the result holds)."""
    qc = refinement.qc
    warped = refinement.warp_labels(amask.astype(np.uint8)).astype(bool)
    qc["tissue_px"] = float(smask.sum())
    qc["mask_dice"] = _dice(warped, smask)
    qc["mask_dice_anchoring"] = _dice(frame.warp_labels(amask.astype(np.uint8)) > 0, smask)
    if start is not None and start is not frame:
        qc["mask_dice_initial"] = _dice(start.warp_labels(amask.astype(np.uint8)) > 0, smask)
    qc.setdefault("min_jacobian", 1.0)  # the identity (anchoring) map does not fold
    return refinement


def _deterministic(ants, seed: int) -> None:
    """Fix the seed ANTsPy passes to antsRegistration (newer ANTsPy ignores ``random_seed``)."""
    config = getattr(ants, "config", None)
    if config is not None and hasattr(config, "_random_seed"):
        config._random_seed = seed


def _dense_map(transforms: list[str], shape: tuple[int, int], ratio: float = 1.0) -> np.ndarray:
    """Atlas-slice pixel of every section pixel (ANTs point order is (row, column)).

    Physical units are section pixels; an atlas-slice pixel is ``ratio`` of them.
    """
    import ants

    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    points = pd.DataFrame({"x": yy.ravel().astype(float), "y": xx.ravel().astype(float)})
    mapped = ants.apply_transforms_to_points(2, points, transforms)
    rows = mapped["x"].to_numpy().reshape(shape) / ratio
    cols = mapped["y"].to_numpy().reshape(shape) / ratio
    return np.stack([cols, rows]).astype(np.float32)


def _affine_matrix(path: str) -> np.ndarray:
    import ants

    tx = ants.read_transform(path)
    return np.asarray(tx.parameters[:4]).reshape(2, 2)
