"""The ``watershed`` and ``trained`` detection methods (window functions for
:func:`cellmap2d.segmentation.detect_cells_tiled`) and the trained model."""

from __future__ import annotations

import warnings
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
    "best_probability_threshold",
    "load_model",
    "mask_centroids",
    "match_points",
    "read_annotated",
    "train_detector",
]

# LoG scales (× the cell's σ) whose responses describe a candidate for the classifier
_SCALES = (0.5, 0.7, 1.0, 1.4, 2.0)
# every feature is in units of the image's own bright range (99.9th percentile − median) or a
# ratio, so a classifier trained on some images transfers to others of another gain or offset
FEATURES = (
    *(f"log_{s}" for s in _SCALES),
    "brightness",
    "mean_brightness",
    "background_level",
    "peak_over_background",
    "mean_over_peak",
)


def watershed_window(
    data: np.ndarray, y0: int, x0: int, ctx: seg.Context
) -> tuple[pd.DataFrame | None, np.ndarray]:
    """Watershed detections of one window, image coordinates (see ``detect_cells``), and the
    window's LoG response (noise units)."""
    from skimage.measure import regionprops_table
    from skimage.segmentation import watershed

    markers, extra = seg.log_window(data, y0, x0, ctx)
    if markers is None:
        return None, extra["response"]
    f, coarse = ctx.factor, extra["coarse"]
    radius_c = ctx.radius_px / f
    smooth = ndi.gaussian_filter(coarse, max(radius_c / 4, 0.7), mode="reflect")
    gy = (np.arange(coarse.shape[0]) + 0.5) * f - 0.5 + y0
    gx = (np.arange(coarse.shape[1]) + 0.5) * f - 0.5 + x0
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    above = smooth - ctx.background_at(xx.ravel(), yy.ravel()).reshape(coarse.shape)
    ys, xs = extra["peaks"]
    marker_image = np.zeros(coarse.shape, np.int32)
    marker_image[ys, xs] = np.arange(1, len(ys) + 1)
    labels = watershed(-smooth, marker_image, mask=above > 0)
    # a cell is where it is at least half its own peak above the background, so its extent
    # does not grow with its brightness
    height = np.concatenate([[np.inf], above[ys, xs]])
    labels[above < 0.5 * height[labels]] = 0
    table = pd.DataFrame(
        regionprops_table(
            labels,
            intensity_image=smooth,
            properties=(
                "label",
                "area",
                "perimeter",
                "centroid",
                "intensity_max",
                "intensity_mean",
            ),
        )
    )
    if table.empty:
        return None, extra["response"]
    area_px = table["area"].to_numpy() * f * f
    expected = np.pi * ctx.radius_px**2
    lo, hi = ctx.options.get("area_range", (0.2, 5.0))
    perimeter = np.maximum(table["perimeter"].to_numpy() * f, 1e-6)
    circularity = np.clip(4 * np.pi * area_px / perimeter**2, 0, 1)
    keep = (area_px >= lo * expected) & (area_px <= hi * expected)
    keep &= circularity >= ctx.options.get("min_circularity", 0.3)
    table, area_px, circularity = table[keep], area_px[keep], circularity[keep]
    if table.empty:
        return None, extra["response"]
    x = (table["centroid-1"].to_numpy() + 0.5) * f - 0.5 + x0
    y = (table["centroid-0"].to_numpy() + 0.5) * f - 0.5 + y0
    bg = ctx.background_at(x, y)
    peak = table["intensity_max"].to_numpy()
    cells = pd.DataFrame(
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
            "response": markers["response"].to_numpy()[table["label"].to_numpy() - 1],
        }
    )
    return cells, extra["response"]


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
        response, _ = seg.log_response(coarse, sigma_c)
        cells[f"log_{s}"] = response[ys, xs] / ctx.bright_range
    bg = cells["background"].to_numpy()
    peak = cells["intensity"].to_numpy()
    cells["brightness"] = (peak - bg) / ctx.bright_range
    cells["mean_brightness"] = (cells["mean_intensity"].to_numpy() - bg) / ctx.bright_range
    cells["background_level"] = (bg - ctx.median) / ctx.bright_range
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
    scales: tuple[float, ...] = (1.0,)
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
    scales: tuple[float, ...] = (1.0,),
    seed: int = 0,
) -> DetectorModel:
    """Train the candidate classifier from annotated images.

    Candidates are LoG maxima at ``candidate_threshold``; a candidate is positive when it is
    matched one-to-one within the cell's equivalent radius to a mask cell (:func:`match_points`).
    The random forest's probability threshold is the one with the best F1 over the training
    cells on its out-of-bag predictions (each candidate judged by the trees that did not see
    it; :func:`best_probability_threshold`), so a model whose probabilities run low or high
    (as balanced class weights make them) still cuts where detection is best.

    Parameters
    ----------
    images, masks
        2-D images and their masks (instance labels or binary, one component per cell).
    """
    from sklearn.ensemble import RandomForestClassifier

    model = DetectorModel(
        None, pixel_size_um, cell_diameter_um, candidate_threshold, scales=tuple(scales)
    )
    rows, labels, n_truth = [], [], 0
    for image, mask in zip(images, masks, strict=True):
        truth, radii = mask_centroids(mask)
        n_truth += len(truth)
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
        n_estimators=300,
        min_samples_leaf=5,
        class_weight="balanced",
        oob_score=True,
        random_state=seed,
        n_jobs=1,
    )
    with warnings.catch_warnings():
        # a candidate in every tree's bootstrap has no out-of-bag estimate (NaN, ignored)
        warnings.filterwarnings("ignore", message="Some inputs do not have OOB scores")
        clf.fit(x, y)
    model.classifier = clf
    if len(clf.classes_) == 2:
        oob = clf.oob_decision_function_[:, 1]
        model.probability_threshold = best_probability_threshold(oob, y, n_truth)
    model.info = {"n_candidates": int(len(y)), "n_positive": int(y.sum()), "n_cells": n_truth}
    return model


def best_probability_threshold(
    probability: np.ndarray, positive: np.ndarray, n_cells: int
) -> float:
    """The probability cut (0.05, 0.10, …, 0.95) with the best F1 when candidates at or above
    it are detections: true positives are the ``positive`` candidates kept, false negatives
    the ``n_cells`` annotated cells not among them (those no candidate reached included).
    Ties go to the cut closest to 0.5; NaN probabilities (never out of bag) are ignored."""
    cuts = np.round(np.arange(0.05, 0.951, 0.05), 2)
    p = np.asarray(probability, float)
    ok = np.isfinite(p)
    kept = p[None, ok] >= cuts[:, None]
    positive = np.asarray(positive, bool)[ok]
    tp = (kept & positive).sum(axis=1)
    fp = (kept & ~positive).sum(axis=1)
    f1 = 2 * tp / np.maximum(2 * tp + fp + (n_cells - tp), 1)
    best = cuts[np.isclose(f1, f1.max())]
    return float(best[np.argmin(np.abs(best - 0.5))])


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
        scales=model.scales,
    )
