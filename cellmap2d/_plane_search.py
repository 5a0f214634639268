"""Anchoring a section series by searching the atlas template for each section's plane.

Model: the series shares one cutting-plane orientation (two angles) and the sections' AP
positions lie on a line ``ap = a0 + b·z`` (z = section index, ``|b|`` ≈ the section spacing).
Each section has its own in-plane affine placement (rotation, scale, shift).

1. Each section alone: the best coronal atlas plane by normalised cross-correlation (NCC), the
   section placed by its tissue centroid at physical scale.
2. The series line, by a robust fit of those positions (known spacing, both cutting directions).
3. ``a0, b`` and the two angles by maximising the mean NCC inside the tissue (a grid over the
   angles, then Nelder-Mead), every section placed in-plane by matching its tissue's centroid
   and covariance to the atlas plane's (re-fitted for every candidate plane: a fixed in-plane
   placement from the wrong plane hides the angle signal). Each section's in-plane affine is
   then refined by ANTs.
4. Sections whose own best position disagrees with the series, that hold no tissue, that hold
   clearly less tissue than their atlas plane (torn), or that match poorly are flagged, and
   still placed where the series puts them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.optimize import minimize

from .anchoring import SectionAnchor, section_image_name
from .atlas import Atlas
from .registration import tissue_mask

__all__ = ["SeriesFit", "search_series"]

_DV_PIVOT_UM = 4000.0
_MIN_TISSUE_FRACTION = 0.01
_POOR_NCC = 0.3
# a section holding less than this share of the series' typical tissue area (relative to its
# atlas plane) lost tissue: torn or folded. Intact phantom sections stay above 0.9, torn ones
# (a fifth of the frame torn off) fall to 0.5–0.8.
_DAMAGED_AREA = 0.85


@dataclass
class SeriesFit:
    """Result of anchoring a series.

    Attributes
    ----------
    anchors
        One QUINT anchor per section (``nr`` = section index), level-0 frame.
    sections
        Per-section table: ``section``, ``ap_um`` (fitted, at the tissue centre),
        ``ap_alone_um`` (the section's own best coronal match), ``ncc`` (at the fitted plane),
        ``tissue_area`` (tissue area relative to the atlas plane's, over the series' median:
        1 = typical), ``flag`` (``""``, ``"empty"``, ``"disagrees"``, ``"damaged"`` — less
        than 0.85 of the typical tissue area, torn or folded — or ``"poor_match"``).
    params
        ``a0_um``, ``step_um`` (AP per section index), ``angle_ml_deg`` (AP changes along ML),
        ``angle_dv_deg`` (AP changes along DV), ``mean_ncc``.
    """

    anchors: list[SectionAnchor]
    sections: pd.DataFrame
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class _Section:
    z: int
    image: np.ndarray  # normalised, at the search resolution
    mask: np.ndarray
    centroid: np.ndarray  # (x, y) µm of the tissue in the section frame
    frame_um: np.ndarray  # (h, w, 2) µm of pixel centres in the section frame
    inv_root_cov: np.ndarray  # inverse square root of the tissue's covariance (µm⁻¹)
    inner: np.ndarray  # tissue pixels away from its outline
    inplane: np.ndarray | None = None  # (2, 3): frame µm → plane (ml, dv) µm


def _normalise(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image[mask], [1, 99])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1.5).astype(np.float32)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def _plane_ap(
    ml: np.ndarray, dv: np.ndarray, ap: float, tans: Sequence[float], midline: float
) -> np.ndarray:
    return ap + tans[0] * (ml - midline) + tans[1] * (dv - _DV_PIVOT_UM)


class _AtlasPlanes:
    """The atlas template at the search resolution, sampled on tilted planes."""

    def __init__(self, atlas: Atlas, pixel_um: float) -> None:
        factor = pixel_um / atlas.resolution_um
        template = atlas.template.astype(np.float32)
        if factor > 1:
            template = ndi.gaussian_filter(template, factor / 2)
        inside = atlas.annotation > 0
        self.template = template / max(float(template[inside].max()) if inside.any() else 1, 1e-6)
        self.inside = inside.astype(np.float32)
        self.res = atlas.resolution_um
        self.pixel_um = pixel_um
        coarse = max(2 * pixel_um, 100.0)  # tissue moments need no fine grid
        ml = np.arange(0, atlas.shape[2] * self.res, coarse)
        dv = np.arange(0, atlas.shape[1] * self.res, coarse)
        self.canvas = np.meshgrid(ml, dv)
        self.midline = atlas.midline_um
        self.ap_max = (atlas.shape[0] - 1) * self.res
        self.centres: list[np.ndarray | None] = []
        for i in range(atlas.shape[0]):
            ys, xs = np.nonzero(inside[i])
            ok = len(xs) >= 10
            self.centres.append(np.array([xs.mean(), ys.mean()]) * self.res if ok else None)

    def centre_at(self, ap_um: float) -> np.ndarray | None:
        return self.centres[int(np.clip(round(ap_um / self.res), 0, len(self.centres) - 1))]

    def inside_at(self, ap: float, tans: Sequence[float]) -> np.ndarray:
        """Which canvas points of the plane lie in the brain."""
        ml, dv = self.canvas
        coords = np.stack([_plane_ap(ml, dv, ap, tans, self.midline), dv, ml]) / self.res
        return ndi.map_coordinates(self.inside, coords, order=0) > 0.5

    def inside_weight(self, ap: float, tans: Sequence[float]) -> np.ndarray:
        """Share of each canvas point's neighbourhood in the brain (linear interpolation).

        Unlike :meth:`inside_at`, it varies continuously with the plane, so the moments of the
        plane's brain area (and the series objective built on them) do not jump.
        """
        ml, dv = self.canvas
        coords = np.stack([_plane_ap(ml, dv, ap, tans, self.midline), dv, ml]) / self.res
        return ndi.map_coordinates(self.inside, coords, order=1, prefilter=False)

    def area_ratio(self, sec: _Section, ap: float, tans: Sequence[float]) -> float:
        """The section's tissue area over its atlas plane's brain area."""
        ml, dv = self.canvas
        canvas_cell = (ml[0, 1] - ml[0, 0]) * (dv[1, 0] - dv[0, 0])
        brain = self.inside_at(ap, tans).sum() * canvas_cell
        return float(sec.mask.sum() * self.pixel_um**2 / brain) if brain > 0 else np.nan

    def moment_inplane(self, sec: _Section, ap: float, tans: Sequence[float]) -> np.ndarray | None:
        """In-plane affine matching the tissue's centroid and covariance to the atlas plane's."""
        ml, dv = self.canvas
        weight = self.inside_weight(ap, tans)
        if weight.sum() < 10:
            return None
        centre_a, cov_a = _moments(np.stack([ml.ravel(), dv.ravel()], axis=1), weight.ravel())
        centre_s, inv_root_s = sec.centroid, sec.inv_root_cov
        root_a = _sqrtm(cov_a)
        u, _, vt = np.linalg.svd(np.linalg.inv(root_a) @ np.linalg.inv(inv_root_s))
        rotation = u @ vt if np.linalg.det(u @ vt) > 0 else np.eye(2)
        linear = root_a @ rotation @ inv_root_s
        return np.column_stack([linear, centre_a - linear @ centre_s])

    def points(
        self, sec: _Section, ap: float, tans: Sequence[float], inplane: np.ndarray | None = None
    ) -> np.ndarray | None:
        """CCF µm ``(h, w, 3)`` of the section's pixels on the plane."""
        if inplane is None:
            inplane = sec.inplane
        if inplane is None:
            centre = self.centre_at(ap)
            if centre is None:
                return None
            inplane = np.column_stack([np.eye(2), centre - sec.centroid])
        plane = sec.frame_um @ inplane[:, :2].T + inplane[:, 2]
        ml, dv = plane[..., 0], plane[..., 1]
        return np.stack([_plane_ap(ml, dv, ap, tans, self.midline), dv, ml], axis=-1)

    def sample(self, points: np.ndarray) -> np.ndarray:
        coords = np.moveaxis(points, -1, 0) / self.res
        return ndi.map_coordinates(self.template, coords, order=1, cval=0.0, prefilter=False)

    def score(
        self,
        sec: _Section,
        ap: float,
        tans: Sequence[float] = (0.0, 0.0),
        inplane: np.ndarray | None = None,
        *,
        inner: bool = False,
    ) -> float:
        """NCC of the section and the atlas plane; ``inner``: only inside the tissue.

        Inside the tissue is what tells cutting angles apart once the outline is matched by
        moments: the outline dominates a whole-frame NCC and flattens it over the angles.
        """
        pts = self.points(sec, ap, tans, inplane)
        if pts is None:
            return -1.0
        if inner:
            return _ncc(sec.image[sec.inner], self.sample(pts[sec.inner]))
        return _ncc(sec.image, self.sample(pts))


def _moments(
    points: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and covariance of points ``(n, 2)``, optionally weighted."""
    if weights is None:
        centre = points.mean(axis=0)
        return centre, np.cov((points - centre).T)
    w = weights / weights.sum()
    centre = w @ points
    d = points - centre
    return centre, (d * w[:, None]).T @ d


def _sqrtm(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return vectors @ np.diag(np.sqrt(np.maximum(values, 1e-6))) @ vectors.T


def _prepare(
    thumbnails: Sequence[np.ndarray], sections: Sequence[int], thumb_um: float, search_um: float
) -> tuple[list[_Section], float]:
    factor = max(1, int(round(search_um / thumb_um)))
    pixel = thumb_um * factor
    prepared = []
    for z, thumb in zip(sections, thumbnails, strict=True):
        image = np.asarray(thumb, dtype=np.float32)
        if factor > 1:
            h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
            image = image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean((1, 3))
        mask = tissue_mask(image) if np.ptp(image) > 0 else np.zeros(image.shape, bool)
        if mask.mean() < _MIN_TISSUE_FRACTION:
            continue
        norm = _normalise(image, mask)
        norm[~ndi.binary_dilation(mask, iterations=2)] = 0
        yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
        frame = (np.stack([xx, yy], axis=-1) + 0.5) * pixel
        centroid, cov = _moments(frame[mask])
        inv_root = np.linalg.inv(_sqrtm(cov))
        inner = ndi.binary_erosion(mask, iterations=1)
        if inner.sum() < 10:
            inner = mask
        prepared.append(_Section(int(z), norm, mask, centroid, frame, inv_root, inner))
    return prepared, pixel


def search_series(
    thumbnails: Sequence[np.ndarray],
    sections: Sequence[int],
    *,
    atlas: Atlas,
    thumbnail_pixel_um: float,
    level0_shape: tuple[int, int],
    level0_pixel_um: float,
    section_spacing_um: float,
    search_pixel_um: float = 64.0,
    max_angle_deg: float = 9.0,
    seed: Mapping[str, float] | None = None,
    brain_id: str = "",
    progress: Callable[[str], None] | None = None,
) -> SeriesFit:
    """Anchor a coronal section series in the atlas by image similarity.

    Parameters
    ----------
    thumbnails
        One 2-D image per section (autofluorescence), all the same shape, covering the same
        field as level 0.
    sections
        Section (z) index of each thumbnail.
    atlas
        The atlas with its template.
    thumbnail_pixel_um
        Pixel size of the thumbnails.
    level0_shape
        ``(height, width)`` of the sections at level 0: the anchors' frame.
    level0_pixel_um
        Level-0 pixel size.
    section_spacing_um
        Nominal spacing between consecutive section indices.
    search_pixel_um
        Resolution of the search.
    max_angle_deg
        Largest cutting angle allowed.
    seed
        A starting point from another anchoring (e.g. DeepSlice's, via
        :func:`cellmap2d.anchoring.series_seed`): ``a0_um``, ``step_um`` (AP at the midline and
        DV 4000 µm as ``a0 + step·z``) and ``angle_ml_deg``, ``angle_dv_deg``. The series line
        then starts there instead of at the sections' own coronal matches, and the angles are
        refined from the seed's instead of searched on a grid.
    """
    say = progress or (lambda _m: None)
    where = f"brain {brain_id}: " if brain_id else ""
    if len(thumbnails) != len(sections) or not len(sections):
        raise ValueError(f"{where}need one thumbnail per section (got {len(thumbnails)})")
    prepared, pixel_um = _prepare(thumbnails, sections, thumbnail_pixel_um, search_pixel_um)
    if len(prepared) < 2:
        raise ValueError(
            f"{where}only {len(prepared)} section(s) hold tissue; a series needs at least 2 "
            "(check the autofluorescence channel in the manifest)"
        )
    planes = _AtlasPlanes(atlas, pixel_um)

    say(f"{where}matching {len(prepared)} sections to coronal atlas planes")
    candidates = np.arange(0, planes.ap_max + 1, max(planes.res, 100.0))
    alone = np.array(
        [candidates[np.argmax([planes.score(s, ap) for ap in candidates])] for s in prepared]
    )
    z = np.array([s.z for s in prepared], dtype=float)
    if seed is None:
        params = np.array([*_series_line(z, alone, section_spacing_um), 0.0, 0.0])
    else:
        params = _seed_params(seed, z, alone, section_spacing_um, max_angle_deg, where)
    a0, step = params[:2]
    inlier = np.abs(alone - (a0 + step * z)) < max(1.5 * section_spacing_um, 500.0)
    good = [s for s, ok in zip(prepared, inlier, strict=True) if ok]
    if len(good) < 2:
        good = prepared

    say(f"{where}fitting the series position and cutting angles")
    params = _fit_series(
        planes,
        good,
        params,
        section_spacing_um,
        max_angle_deg,
        seeded=seed is not None,
    )
    say(f"{where}in-plane placement of each section")
    tans = np.tan(np.radians(params[2:4]))
    area = {s.z: planes.area_ratio(s, params[0] + params[1] * s.z, tans) for s in prepared}
    typical_area = np.nanmedian(list(area.values()))
    damaged = {z for z, r in area.items() if r < _DAMAGED_AREA * typical_area}
    for s in prepared:
        ap = params[0] + params[1] * s.z
        s.inplane = planes.moment_inplane(s, ap, tans)
        if s.z not in damaged:
            _fit_inplane(planes, s, ap, tans)
    # A torn or folded section misleads its own moments and registration (and its own best AP
    # may disagree with the series). Such sections start from the series' typical in-plane
    # placement (sections are imaged in the same frame); the refinement step adjusts it.
    typical = np.median(
        [s.inplane for s in good if s.z not in damaged and s.inplane is not None], axis=0
    )
    for s, ok in zip(prepared, inlier, strict=True):
        if not ok:
            s.inplane = typical.copy()
        elif s.z in damaged:
            s.inplane = typical.copy()
            _fit_inplane(planes, s, params[0] + params[1] * s.z, tans)

    a0, step, ang_ml, ang_dv = params
    tans = np.tan(np.radians([ang_ml, ang_dv]))
    by_z = {s.z: s for s in prepared}
    alone_by_z = dict(zip(z.astype(int), alone, strict=True))
    rows, anchors, nccs = [], [], []
    for zi in sorted({int(v) for v in sections}):
        ap = a0 + step * zi
        sec = by_z.get(zi)
        if sec is None:
            ncc, flag, ap_alone, inplane, centre = np.nan, "empty", np.nan, typical, None
            area_ratio = np.nan
        else:
            ncc = planes.score(sec, ap, tans)
            nccs.append(ncc)
            ap_alone = float(alone_by_z[zi])
            inplane, centre = sec.inplane, sec.centroid
            area_ratio = area[zi] / typical_area
            flag = ""
            if abs(ap_alone - ap) > max(1.5 * abs(step), 500.0):
                flag = "disagrees"
            elif zi in damaged:
                flag = "damaged"
            elif ncc < _POOR_NCC:
                flag = "poor_match"
        anchor = _anchor(ap, tans, inplane, planes.midline, level0_shape, level0_pixel_um)
        anchor.filename = section_image_name(brain_id or "section", zi)
        anchor.nr = zi
        anchors.append(anchor)
        if centre is not None:
            plane = inplane[:, :2] @ centre + inplane[:, 2]
            ap = float(_plane_ap(plane[0], plane[1], ap, tans, planes.midline))
        rows.append(
            {
                "section": zi,
                "ap_um": float(ap),
                "ap_alone_um": ap_alone,
                "ncc": float(ncc),
                "tissue_area": float(area_ratio),
                "flag": flag,
            }
        )
    fit = {
        "a0_um": float(a0),
        "step_um": float(step),
        "angle_ml_deg": float(ang_ml),
        "angle_dv_deg": float(ang_dv),
        "mean_ncc": float(np.mean(nccs)),
    }
    return SeriesFit(anchors, pd.DataFrame(rows), fit)


def _series_line(z: np.ndarray, ap: np.ndarray, spacing: float) -> tuple[float, float]:
    """Robust ``ap = a0 + b z`` with ``|b|`` near the spacing (both cutting directions tried)."""
    tolerance = max(1.5 * spacing, 500.0)
    best = None
    for sign in (1.0, -1.0):
        offsets = ap - sign * spacing * z
        a0 = float(np.median(offsets))
        inlier = np.abs(offsets - a0) < tolerance
        key = (-int(inlier.sum()), float(np.median(np.abs(offsets - a0))))
        if best is None or key < best[0]:
            best = (key, sign, a0, inlier)
    _, sign, a0, inlier = best
    if inlier.sum() >= 4 and np.ptp(z[inlier]) > 0:
        slope, intercept = np.polyfit(z[inlier], ap[inlier], 1)
        lo, hi = sorted(sign * spacing * np.array([0.8, 1.25]))
        if lo <= slope <= hi:
            return float(intercept), float(slope)
    return a0, sign * spacing


def _seed_params(
    seed: Mapping[str, float],
    z: np.ndarray,
    alone: np.ndarray,
    spacing: float,
    max_angle: float,
    where: str,
) -> np.ndarray:
    """``[a0, step, angle_ml, angle_dv]`` from a seed, checked against the search's limits."""
    try:
        a0, step = float(seed["a0_um"]), float(seed["step_um"])
        angles = [float(seed["angle_ml_deg"]), float(seed["angle_dv_deg"])]
    except KeyError as err:
        raise ValueError(f"{where}the anchoring seed lacks {err.args[0]!r}") from None
    if not np.isfinite(step):
        sign = 1.0 if np.polyfit(z, alone, 1)[0] >= 0 or len(z) < 2 else -1.0
        step = sign * spacing
    if not 0.8 * spacing <= abs(step) <= 1.25 * spacing:
        raise ValueError(
            f"{where}the anchoring seed's step ({step:.0f} µm per section) is not within 0.8–1.25× "
            f"the manifest's section spacing ({spacing:g} µm): check section_spacing_um"
        )
    clipped = np.clip(angles, -max_angle, max_angle)
    return np.array([a0, step, *clipped])


def _fit_series(
    planes: _AtlasPlanes,
    good: list[_Section],
    params: np.ndarray,
    spacing: float,
    max_angle: float,
    *,
    seeded: bool = False,
) -> np.ndarray:
    """Series line and angles maximising the mean NCC inside the tissue.

    Each section is placed in-plane by its moments for every candidate plane. The angles are
    first searched on a grid unless ``params`` already holds a good start (``seeded``).
    """
    lo_step, hi_step = sorted(np.sign(params[1]) * spacing * np.array([0.8, 1.25]))

    def cost(p: np.ndarray) -> float:
        if not (lo_step <= p[1] <= hi_step) or np.any(np.abs(p[2:]) > max_angle):
            return 1.0
        tans = np.tan(np.radians(p[2:4]))
        scores = []
        for s in good:
            ap = p[0] + p[1] * s.z
            inplane = planes.moment_inplane(s, ap, tans)
            scores.append(planes.score(s, ap, tans, inplane, inner=True))
        return -float(np.mean(scores))

    if seeded:
        start = np.asarray(params, dtype=float)
    else:
        grid = np.arange(-max_angle, max_angle + 1e-9, 3.0)
        start = min((np.array([params[0], params[1], a, b]) for a in grid for b in grid), key=cost)
    simplex = np.vstack([start, start + np.diag([100.0, 0.02 * abs(start[1]), 1.0, 1.0])])
    result = minimize(
        cost,
        start,
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 0.1, "fatol": 1e-6, "maxfev": 400},
    )
    return result.x if result.fun <= cost(start) else start


def _fit_inplane(planes: _AtlasPlanes, sec: _Section, ap: float, tans: np.ndarray) -> None:
    """Update the section's in-plane affine by ANTs affine registration to its atlas plane."""
    import ants

    from .registration import _deterministic

    current = sec.inplane
    if current is None:
        centre = planes.centre_at(ap)
        if centre is None:
            centre = np.array([planes.midline, _DV_PIVOT_UM])
        current = np.column_stack([np.eye(2), centre - sec.centroid])
    pts = planes.points(sec, ap, tans, current)
    rendered = planes.sample(pts).astype(np.float32)
    before = _ncc(sec.image, rendered)
    _deterministic(ants, 1)
    fixed = ants.from_numpy(sec.image)
    moving = ants.from_numpy(rendered)
    # three frame points (row, col) → where the atlas render sees them → affine in µm
    h, w = sec.image.shape
    probe = np.array([[0.0, 0.0], [0.0, w - 1.0], [h - 1.0, 0.0]])
    with tempfile.TemporaryDirectory(prefix="cellmap2d-ants-") as workdir:
        reg = ants.registration(
            fixed,
            moving,
            type_of_transform="Affine",
            aff_metric="GC",
            initial_transform="identity",
            aff_iterations=(100, 50),
            aff_shrink_factors=(2, 1),
            aff_smoothing_sigmas=(1, 0),
            outprefix=os.path.join(workdir, "aff_"),  # ANTs leaves its files in /tmp otherwise
        )
        mapped = ants.apply_transforms_to_points(
            2, pd.DataFrame({"x": probe[:, 0], "y": probe[:, 1]}), reg["fwdtransforms"]
        )[["x", "y"]].to_numpy()
    src = (probe[:, ::-1] + 0.5) * planes.pixel_um
    dst = (mapped[:, ::-1] + 0.5) * planes.pixel_um @ current[:, :2].T + current[:, 2]
    design = np.column_stack([src, np.ones(3)])
    updated = np.linalg.solve(design, dst).T
    after = _ncc(sec.image, planes.sample(planes.points(sec, ap, tans, updated)))
    sec.inplane = updated if after > before else current


def _anchor(
    ap: float,
    tans: np.ndarray,
    inplane: np.ndarray,
    midline: float,
    level0_shape: tuple[int, int],
    level0_um: float,
) -> SectionAnchor:
    """The QUINT anchor of a section frame: level-0 pixel x sits at ``(x + 0.5)·p`` µm."""
    h0, w0 = level0_shape

    def ccf(x: float, y: float) -> np.ndarray:
        frame = (np.array([x, y]) + 0.5) * level0_um
        ml, dv = inplane[:, :2] @ frame + inplane[:, 2]
        return np.array([_plane_ap(ml, dv, ap, tans, midline), dv, ml])

    origin = ccf(0.0, 0.0)
    return SectionAnchor.from_plane(
        origin,
        ccf(float(w0), 0.0) - origin,
        ccf(0.0, float(h0)) - origin,
        width=int(w0),
        height=int(h0),
    )
