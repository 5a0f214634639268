"""Anchoring a section series by searching the atlas template for each section's plane.

Model: the series shares one cutting plane orientation (two angles) and the sections' AP
positions lie on a line ``ap = a0 + b·z`` (z = section index, ``|b|`` ≈ the section spacing).
Each section's in-plane placement is fitted from tissue-mask moments (centroid, and per-axis
spread clamped to ±20% of the physical scale); rotation and finer in-plane corrections are left
to the refinement step.

1. Each section alone: the best coronal atlas slice by normalised cross-correlation (NCC).
2. Series line by robust fit of those positions (known spacing, both cutting directions tried).
3. Joint fit of ``a0, b`` and the two angles maximising the summed NCC of all good sections.
4. Sections whose own best position disagrees with the series, that hold no tissue or match
   poorly are flagged (and still placed where the series puts them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.optimize import minimize

from .anchoring import SectionAnchor
from .atlas import Atlas
from .registration import tissue_mask

__all__ = ["SeriesFit", "search_series"]

_DV_PIVOT_UM = 4000.0
_MIN_TISSUE_FRACTION = 0.01
_SCALE_RANGE = (0.8, 1.25)


@dataclass
class SeriesFit:
    """Result of anchoring a series.

    Attributes
    ----------
    anchors
        One QUINT anchor per section (``nr`` = section index), level-0 frame.
    sections
        Per-section table: ``section``, ``ap_um`` (fitted, at the image centre),
        ``ap_alone_um`` (the section's own best match), ``ncc`` (at the fitted plane),
        ``flag`` (``""``, ``"empty"``, ``"disagrees"`` or ``"poor_match"``).
    params
        ``a0_um``, ``step_um`` (AP per section index), ``angle_ml_deg`` (AP changes along ML),
        ``angle_dv_deg`` (AP changes along DV).
    """

    anchors: list[SectionAnchor]
    sections: pd.DataFrame
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class _Section:
    z: int
    image: np.ndarray  # normalised, search resolution
    mask: np.ndarray
    centroid: np.ndarray  # (x, y) µm in the section frame
    spread: np.ndarray  # (x, y) std µm


def _moments(mask: np.ndarray, pixel_um: float) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(mask)
    pts = (np.stack([xs, ys], axis=1) + 0.5) * pixel_um
    return pts.mean(axis=0), np.maximum(pts.std(axis=0), pixel_um)


def _normalise(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    values = image[mask]
    lo, hi = np.percentile(values, [1, 99])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1.5).astype(np.float32)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


class _AtlasPlanes:
    """The atlas template and mask at the search resolution, sampled on tilted planes."""

    def __init__(self, atlas: Atlas, pixel_um: float) -> None:
        factor = pixel_um / atlas.resolution_um
        template = atlas.template.astype(np.float32)
        if factor > 1:
            template = ndi.gaussian_filter(template, factor / 2)
        self.template = template
        self.inside = (atlas.annotation > 0).astype(np.float32)
        self.res = atlas.resolution_um
        self.pixel_um = pixel_um
        self.midline = atlas.midline_um
        scale = self.template[self.inside > 0].max() if (self.inside > 0).any() else 1.0
        self.template /= max(float(scale), 1e-6)
        n_ap = atlas.shape[0]
        self.ap_um = np.arange(n_ap) * self.res
        self.slice_moments = [self._mask_moments(self.inside[i]) for i in range(n_ap)]

    def _mask_moments(self, mask2d: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        if mask2d.sum() < 10:
            return None
        ys, xs = np.nonzero(mask2d > 0)
        pts = np.stack([xs, ys], axis=1) * self.res  # (ml, dv) µm
        return pts.mean(axis=0), np.maximum(pts.std(axis=0), self.res)

    def moments_at(self, ap_um: float) -> tuple[np.ndarray, np.ndarray] | None:
        i = int(np.clip(round(ap_um / self.res), 0, len(self.ap_um) - 1))
        return self.slice_moments[i]

    def plane_points(
        self, sec: _Section, ap_um: float, tan_ml: float, tan_dv: float,
        scale: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """CCF µm ``(h, w, 3)`` of the section's search pixels at the given plane."""
        moments = self.moments_at(ap_um)
        if moments is None:
            return None
        centre, spread = moments
        if scale is None:
            scale = np.ones(2)
        h, w = sec.image.shape
        xs = (np.arange(w) + 0.5) * self.pixel_um
        ys = (np.arange(h) + 0.5) * self.pixel_um
        ml = centre[0] + (xs - sec.centroid[0]) * scale[0]
        dv = centre[1] + (ys - sec.centroid[1]) * scale[1]
        ml2, dv2 = np.meshgrid(ml, dv)
        ap = ap_um + tan_ml * (ml2 - self.midline) + tan_dv * (dv2 - _DV_PIVOT_UM)
        return np.stack([ap, dv2, ml2], axis=-1)

    def sample(self, points: np.ndarray) -> np.ndarray:
        coords = np.moveaxis(points, -1, 0) / self.res
        return ndi.map_coordinates(self.template, coords, order=1, cval=0.0, prefilter=False)

    def score(self, sec: _Section, ap_um: float, tan_ml: float = 0.0, tan_dv: float = 0.0) -> float:
        points = self.plane_points(sec, ap_um, tan_ml, tan_dv)
        if points is None:
            return -1.0
        return _ncc(sec.image, self.sample(points))


def _prepare(
    thumbnails: Sequence[np.ndarray], sections: Sequence[int], thumb_um: float, search_um: float
) -> tuple[list[_Section], list[int]]:
    factor = max(1, int(round(search_um / thumb_um)))
    prepared, empty = [], []
    for z, thumb in zip(sections, thumbnails, strict=True):
        image = np.asarray(thumb, dtype=np.float32)
        if factor > 1:
            h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
            image = image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean((1, 3))
        mask = tissue_mask(image) if np.ptp(image) > 0 else np.zeros(image.shape, bool)
        if mask.mean() < _MIN_TISSUE_FRACTION:
            empty.append(z)
            continue
        centroid, spread = _moments(mask, thumb_um * factor)
        norm = _normalise(image, mask)
        norm[~ndi.binary_dilation(mask, iterations=2)] = 0
        prepared.append(_Section(z, norm, mask, centroid, spread))
    return prepared, empty


def search_series(
    thumbnails: Sequence[np.ndarray],
    sections: Sequence[int],
    *,
    atlas: Atlas,
    thumbnail_pixel_um: float,
    level0_shape: tuple[int, int],
    level0_pixel_um: float,
    section_spacing_um: float,
    search_pixel_um: float = 100.0,
    max_angle_deg: float = 8.0,
    brain_id: str = "",
    progress: Callable[[str], None] | None = None,
) -> SeriesFit:
    """Anchor a coronal section series in the atlas by image similarity.

    Parameters
    ----------
    thumbnails
        One 2-D image per section (autofluorescence), all the same shape.
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
        Largest cutting angle considered.

    Returns
    -------
    SeriesFit
    """
    say = progress or (lambda _m: None)
    where = f"brain {brain_id}: " if brain_id else ""
    if len(thumbnails) != len(sections) or not len(sections):
        raise ValueError(f"{where}need one thumbnail per section (got {len(thumbnails)})")
    prepared, empty = _prepare(thumbnails, sections, thumbnail_pixel_um, search_pixel_um)
    if len(prepared) < 2:
        raise ValueError(
            f"{where}only {len(prepared)} section(s) hold tissue; a series needs at least 2 "
            "(check the autofluorescence channel in the manifest)"
        )
    pixel_um = thumbnail_pixel_um * max(1, int(round(search_pixel_um / thumbnail_pixel_um)))
    planes = _AtlasPlanes(atlas, pixel_um)

    say(f"{where}matching {len(prepared)} sections to coronal atlas planes")
    candidates = np.arange(0, planes.ap_um[-1] + 1, max(planes.res, 50.0))
    alone = np.array(
        [candidates[np.argmax([planes.score(s, ap) for ap in candidates])] for s in prepared]
    )
    z = np.array([s.z for s in prepared], dtype=float)
    a0, step, inlier = _series_line(z, alone, section_spacing_um)

    say(f"{where}fitting series position and cutting angles")
    good = [s for s, ok in zip(prepared, inlier, strict=True) if ok]

    def cost(p: np.ndarray) -> float:
        t_ml, t_dv = np.tan(np.radians(p[2:4]))
        return -float(np.mean([planes.score(s, p[0] + p[1] * s.z, t_ml, t_dv) for s in good]))

    best = None
    grid = np.linspace(-max_angle_deg * 0.75, max_angle_deg * 0.75, 4)
    for a_ml in grid:
        for a_dv in grid:
            value = cost(np.array([a0, step, a_ml, a_dv]))
            if best is None or value < best[0]:
                best = (value, a_ml, a_dv)
    start = np.array([a0, step, best[1], best[2]])
    simplex = start + np.diag([150.0, 0.05 * abs(step), 1.5, 1.5])
    result = minimize(
        cost, start, method="Nelder-Mead",
        options={"initial_simplex": np.vstack([start, simplex]), "xatol": 1.0, "fatol": 1e-4,
                 "maxfev": 300},
    )
    a0, step, ang_ml, ang_dv = result.x
    ang_ml, ang_dv = np.clip([ang_ml, ang_dv], -max_angle_deg, max_angle_deg)
    t_ml, t_dv = np.tan(np.radians([ang_ml, ang_dv]))

    rows, anchors = [], []
    by_z = {s.z: s for s in prepared}
    alone_by_z = dict(zip(z.astype(int), alone, strict=True))
    placement = {}
    for s in prepared:
        ap = a0 + step * s.z
        scale = _inplane_scale(planes, s, ap)
        placement[s.z] = (_offset(planes, s, ap, scale), scale)
    typical = tuple(np.median([p[i] for p in placement.values()], axis=0) for i in range(2))
    for zi in sorted(set(sections)):
        ap = a0 + step * zi
        sec = by_z.get(zi)
        if sec is None:
            ncc, flag, ap_alone = float("nan"), "empty", float("nan")
        else:
            ncc = planes.score(sec, ap, t_ml, t_dv)
            ap_alone = float(alone_by_z[zi])
            flag = ""
            if abs(ap_alone - ap) > max(1.5 * abs(step), 500.0):
                flag = "disagrees"
            elif ncc < 0.3:
                flag = "poor_match"
        offset, scale = placement.get(zi, typical)
        anchor = _anchor(ap, t_ml, t_dv, offset, scale, planes.midline, level0_shape,
                         level0_pixel_um)
        anchor.filename = f"{brain_id or 'section'}_s{zi:04d}"
        anchor.nr = int(zi)
        anchors.append(anchor)
        rows.append({"section": int(zi), "ap_um": float(ap), "ap_alone_um": ap_alone,
                     "ncc": ncc, "flag": flag})
    params = {"a0_um": float(a0), "step_um": float(step), "angle_ml_deg": float(ang_ml),
              "angle_dv_deg": float(ang_dv), "mean_ncc": float(-result.fun)}
    return SeriesFit(anchors, pd.DataFrame(rows), params)


def _series_line(z: np.ndarray, ap: np.ndarray, spacing: float) -> tuple[float, float, np.ndarray]:
    """Robust ``ap = a0 + b z`` with ``|b|`` near the spacing; returns a0, b and inliers."""
    tolerance = max(1.5 * spacing, 500.0)
    best = None
    for sign in (1.0, -1.0):
        offsets = ap - sign * spacing * z
        a0 = float(np.median(offsets))
        inlier = np.abs(offsets - a0) < tolerance
        spread = float(np.median(np.abs(offsets - a0)))
        key = (-int(inlier.sum()), spread)
        if best is None or key < best[0]:
            best = (key, sign, a0, inlier)
    _, sign, a0, inlier = best
    if inlier.sum() >= 4 and np.ptp(z[inlier]) > 0:
        slope, intercept = np.polyfit(z[inlier], ap[inlier], 1)
        lo, hi = sorted(sign * spacing * np.array([0.8, 1.25]))
        if lo <= slope <= hi:
            return float(intercept), float(slope), inlier
    return a0, sign * spacing, inlier


def _inplane_scale(planes: _AtlasPlanes, sec: _Section, ap: float) -> np.ndarray:
    moments = planes.moments_at(ap)
    if moments is None:
        return np.ones(2)
    return np.clip(moments[1] / sec.spread, *_SCALE_RANGE)


def _offset(planes: _AtlasPlanes, sec: _Section, ap: float, scale: np.ndarray) -> np.ndarray:
    """In-plane atlas µm of the section frame's origin: atlas centre − scaled section centroid."""
    moments = planes.moments_at(ap)
    centre = moments[0] if moments is not None else np.array([planes.midline, _DV_PIVOT_UM])
    return centre - sec.centroid * scale


def _anchor(
    ap: float, t_ml: float, t_dv: float, offset: np.ndarray, scale: np.ndarray,
    midline: float, level0_shape: tuple[int, int], level0_um: float,
) -> SectionAnchor:
    """The QUINT anchor of a section frame: level-0 pixel x sits at ``(x + 0.5)·p`` µm."""
    h0, w0 = level0_shape

    def ccf(x: float, y: float) -> np.ndarray:
        ml = offset[0] + (x + 0.5) * level0_um * scale[0]
        dv = offset[1] + (y + 0.5) * level0_um * scale[1]
        return np.array([ap + t_ml * (ml - midline) + t_dv * (dv - _DV_PIVOT_UM), dv, ml])

    origin = ccf(0.0, 0.0)
    return SectionAnchor.from_plane(
        origin, ccf(float(w0), 0.0) - origin, ccf(0.0, float(h0)) - origin,
        width=int(w0), height=int(h0),
    )
