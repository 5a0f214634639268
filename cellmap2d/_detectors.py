"""The ``watershed`` and ``trained`` detection methods (window functions for
:func:`cellmap2d.segmentation.detect_cells_tiled`) and the trained model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from . import segmentation as seg

__all__ = [
    "DetectorModel",
    "load_model",
    "mask_centroids",
    "match_points",
    "read_annotated",
    "train_detector",
]

# LoG scales (× the cell's σ) whose responses describe a candidate for the classifier
_SCALES = (0.5, 0.7, 1.0, 1.4, 2.0)
FEATURES = (
    *(f"log_{s}" for s in _SCALES),
    "contrast",
    "intensity",
    "mean_intensity",
    "background",
    "peak_over_background",
    "mean_over_peak",
)


def watershed_window(data: np.ndarray, y0: int, x0: int, ctx: seg.Context) -> pd.DataFrame | None:
    """Watershed detections of one window, image coordinates (see ``detect_cells``)."""
    from skimage.feature import peak_local_max
    from skimage.measure import regionprops_table
    from skimage.segmentation import watershed

    f = ctx.factor
    coarse = seg.block_mean(data, f)
    radius_c = ctx.radius_px / f
    smooth = ndi.gaussian_filter(coarse, max(radius_c / 4, 0.7), mode="reflect")
    gy = (np.arange(coarse.shape[0]) + 0.5) * f - 0.5 + y0
    gx = (np.arange(coarse.shape[1]) + 0.5) * f - 0.5 + x0
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    background = ctx.background_at(xx.ravel(), yy.ravel()).reshape(coarse.shape)
    above = smooth - background
    # half the local maximum: an object's extent does not grow with its brightness
    local_max = ndi.maximum_filter(above, size=max(3, int(2 * radius_c + 1)), mode="reflect")
    foreground = (smooth > ctx.otsu) & (above > ctx.threshold * ctx.noise)
    foreground &= above >= 0.5 * local_max
    foreground = ndi.binary_opening(foreground, iterations=max(1, int(radius_c / 4)))
    foreground = ndi.binary_fill_holes(foreground)
    if not foreground.any():
        return None
    distance = ndi.gaussian_filter(ndi.distance_transform_edt(foreground), 1.0)
    components, _ = ndi.label(foreground)
    markers = peak_local_max(
        distance,
        min_distance=max(1, int(0.6 * radius_c)),
        labels=components,
        exclude_border=False,
    )
    marker_image = np.zeros(coarse.shape, np.int32)
    marker_image[tuple(markers.T)] = np.arange(1, len(markers) + 1)
    labels = watershed(-distance, marker_image, mask=foreground)
    props = regionprops_table(
        labels,
        intensity_image=smooth,
        properties=("label", "area", "perimeter", "centroid", "intensity_max", "intensity_mean"),
    )
    table = pd.DataFrame(props)
    if table.empty:
        return None
    area_px = table["area"].to_numpy() * f * f
    expected = np.pi * ctx.radius_px**2
    lo, hi = ctx.options.get("area_range", (0.2, 5.0))
    perimeter = np.maximum(table["perimeter"].to_numpy() * f, 1e-6)
    circularity = np.clip(4 * np.pi * area_px / perimeter**2, 0, 1)
    keep = (area_px >= lo * expected) & (area_px <= hi * expected)
    keep &= circularity >= ctx.options.get("min_circularity", 0.3)
    table, area_px, circularity = table[keep], area_px[keep], circularity[keep]
    if table.empty:
        return None
    x = (table["centroid-1"].to_numpy() + 0.5) * f - 0.5 + x0
    y = (table["centroid-0"].to_numpy() + 0.5) * f - 0.5 + y0
    bg = ctx.background_at(x, y)
    peak = table["intensity_max"].to_numpy()
    return pd.DataFrame(
        {
            "x": x,
            "y": y,
            "intensity": peak,
            "mean_intensity": table["intensity_mean"].to_numpy(),
            "background": bg,
            "contrast": (peak - bg) / max(ctx.noise, 1e-6),
            "radius_um": np.sqrt(area_px / np.pi) * ctx.pixel_size_um,
            "area_um2": area_px * ctx.pixel_size_um**2,
            "circularity": circularity,
        }
    )


def candidate_features(
    data: np.ndarray, y0: int, x0: int, ctx: seg.Context, *, threshold: float
) -> pd.DataFrame | None:
    """LoG candidates of one window (at ``threshold``) with the classifier's features."""
    cells, extra = seg.log_window(data, y0, x0, ctx, threshold=threshold)
    if cells is None:
        return None
    ys, xs = extra["peaks"]
    coarse, f = extra["coarse"], ctx.factor
    for s in _SCALES:
        sigma_c = max(seg._coarse_sigma(ctx.sigma * s, f), 0.5)
        response, norm = seg.log_response(coarse, sigma_c)
        cells[f"log_{s}"] = response[ys, xs] / (ctx.noise / f * norm)
    bg = cells["background"].to_numpy()
    peak = cells["intensity"].to_numpy()
    cells["peak_over_background"] = np.log1p(np.maximum(peak - bg, 0)) - np.log1p(np.abs(bg))
    cells["mean_over_peak"] = (cells["mean_intensity"] - bg) / np.maximum(peak - bg, 1e-6)
    return cells


def trained_window(data: np.ndarray, y0: int, x0: int, ctx: seg.Context) -> pd.DataFrame | None:
    """Trained-classifier detections of one window (see ``detect_cells``)."""
    model: DetectorModel = ctx.options["model"]
    cells = candidate_features(data, y0, x0, ctx, threshold=model.candidate_threshold)
    if cells is None:
        return None
    clf = model.classifier
    if len(clf.classes_) == 1:  # every training candidate was a cell (or none was)
        proba = np.full(len(cells), float(clf.classes_[0]))
    else:
        proba = clf.predict_proba(cells[list(FEATURES)].to_numpy())[:, 1]
    cells["probability"] = proba
    return cells[proba >= model.probability_threshold]


@dataclass
class DetectorModel:
    """A candidate classifier for ``detect_cells(method="trained", model=...)``."""

    classifier: Any
    pixel_size_um: float
    cell_diameter_um: float
    candidate_threshold: float = 3.0
    probability_threshold: float = 0.5
    features: tuple[str, ...] = FEATURES
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        import joblib

        joblib.dump(self, path)


def load_model(model: DetectorModel | str | Path | None) -> DetectorModel:
    """A :class:`DetectorModel`, loading it with joblib when given a path."""
    if model is None:
        raise ValueError("method='trained' needs model= (a DetectorModel or a .joblib path)")
    if isinstance(model, DetectorModel):
        return model
    import joblib

    loaded = joblib.load(model)
    if not isinstance(loaded, DetectorModel):
        raise TypeError(f"{model} does not hold a cellmap2d DetectorModel")
    return loaded


def match_points(found: np.ndarray, truth: np.ndarray, tol: np.ndarray | float) -> np.ndarray:
    """One-to-one (Hungarian) matching: for each ``found`` point the index of its truth point
    within ``tol`` (per truth point or one value), or −1."""
    out = np.full(len(found), -1)
    if len(found) == 0 or len(truth) == 0:
        return out
    dist = np.linalg.norm(found[:, None, :] - truth[None, :, :], axis=2)
    tol = np.broadcast_to(np.asarray(tol, float), (len(truth),))
    cost = np.where(dist <= tol[None, :], dist, 1e9)
    rows, cols = linear_sum_assignment(cost)
    ok = cost[rows, cols] < 1e9
    out[rows[ok]] = cols[ok]
    return out


def mask_centroids(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids ``(x, y)`` and equivalent radii (px) of a mask's cells: the labels of an
    instance mask, or the connected components of a binary one."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if np.unique(mask).size <= 2:
        labels, n = ndi.label(mask > 0)
        ids = np.arange(1, n + 1)
    else:
        labels = mask
        ids = np.unique(mask)
        ids = ids[ids > 0]
    ones = np.ones(labels.shape)
    if len(ids) == 0:
        return np.zeros((0, 2)), np.zeros(0)
    centres = np.array(ndi.center_of_mass(ones, labels, ids))[:, ::-1]
    areas = np.asarray(ndi.sum(ones, labels, ids))
    return centres, np.sqrt(areas / np.pi)


def read_annotated(
    image_path: str | Path, mask_path: str | Path, *, channels: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """An image (RGB summed over ``channels``, default all) and its mask, from TIFF or PNG."""

    def read(path: str | Path) -> np.ndarray:
        if str(path).lower().endswith((".tif", ".tiff")):
            import tifffile

            return tifffile.imread(path)
        import imageio.v3 as iio

        return iio.imread(path)

    image = read(image_path).astype(np.float32)
    if image.ndim == 3:
        image = image[..., channels if channels is not None else slice(None)].sum(axis=2)
    return image, read(mask_path)


def train_detector(
    images: list[np.ndarray],
    masks: list[np.ndarray],
    *,
    pixel_size_um: float,
    cell_diameter_um: float,
    candidate_threshold: float = 3.0,
    seed: int = 0,
) -> DetectorModel:
    """Train the candidate classifier from annotated images.

    Candidates are LoG maxima at ``candidate_threshold``; a candidate is positive when it is
    matched one-to-one within the cell's equivalent radius to a mask cell (:func:`match_points`).

    Parameters
    ----------
    images, masks
        2-D images and their masks (instance labels or binary, one component per cell).
    """
    from sklearn.ensemble import RandomForestClassifier

    model = DetectorModel(None, pixel_size_um, cell_diameter_um, candidate_threshold)
    rows, labels = [], []
    for image, mask in zip(images, masks, strict=True):
        truth, radii = mask_centroids(mask)
        cand = candidates(image, model)
        if cand is None or len(cand) == 0:
            continue
        matched = match_points(cand[["x", "y"]].to_numpy(), truth, radii)
        rows.append(cand[list(FEATURES)].to_numpy())
        labels.append(matched >= 0)
    if not rows:
        raise ValueError("no candidates in the training images")
    x, y = np.concatenate(rows), np.concatenate(labels)
    clf = RandomForestClassifier(
        n_estimators=300, min_samples_leaf=2, class_weight="balanced", random_state=seed, n_jobs=1
    )
    clf.fit(x, y)
    model.classifier = clf
    model.info = {"n_candidates": int(len(y)), "n_positive": int(y.sum())}
    return model


def candidates_window(data: np.ndarray, y0: int, x0: int, ctx: seg.Context) -> pd.DataFrame | None:
    return candidate_features(data, y0, x0, ctx, threshold=ctx.threshold)


def candidates(image: np.ndarray, model: DetectorModel) -> pd.DataFrame:
    """All LoG candidates of a whole image with the classifier's features."""
    return seg.detect_cells(
        image,
        pixel_size_um=model.pixel_size_um,
        cell_diameter_um=model.cell_diameter_um,
        method="_candidates",
        threshold=model.candidate_threshold,
    )
