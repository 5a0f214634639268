"""Cell detection on fluorescence sections.

All parameters are physical (µm), so one setting works at any pyramid level. Every method runs
window by window (:func:`detect_cells_tiled`); :func:`detect_cells` is the one-window case, and
the image-wide statistics (pixel noise, background, tissue mask, bright range) are computed
on a grid fixed in image coordinates, so tiled and untiled detection give the same cells.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

__all__ = [
    "DETECTION_COLUMNS",
    "METHODS",
    "Plane",
    "detect_cells",
    "detect_cells_tiled",
]

DETECTION_COLUMNS = (
    "x",
    "y",
    "intensity",
    "mean_intensity",
    "background",
    "contrast",
    "radius_um",
)
METHODS = ("log", "watershed", "trained")
# sampled residual values used for the noise estimate (the sampling stride follows from this)
_NOISE_SAMPLE = 250_000
# about this many response values (on a grid of coarse pixels) give the response spread
_RESPONSE_SAMPLE = 500_000
# options of detect_cells used here, not passed on to the window functions
_SHARED_OPTIONS = (
    "autofluorescence",
    "autofluorescence_threshold",
    "bleed_through",
    "fdr",
    "return_qc",
    "background_um",
    "noise",
    "threshold",
    "threshold_unit",
    "min_brightness",
    "min_sigma_px",
    "scales",
)


@dataclass(frozen=True)
class Context:
    """Image-wide settings and statistics shared by every window of one image."""

    height: int
    width: int
    pixel_size_um: float
    cell_diameter_um: float
    radius_px: float
    sigma: float  # LoG scale, level pixels
    factor: int  # block-mean factor the filters run at
    block: int  # background block size (a multiple of ``factor``)
    threshold: float
    noise: float  # pixel noise of the image
    background: np.ndarray  # smoothed block means, (ceil(H/block), ceil(W/block))
    tissue: np.ndarray  # bool per block: not constant
    options: dict[str, Any]
    scales: tuple[float, ...] = (1.0,)  # LoG scales, × the nominal cell size
    sample_step: int = 1  # coarse-pixel stride of the response sampling grid
    bright_range: float = 1.0  # 99.9th percentile − median of the sampled pixels
    median: float = 0.0  # median of the sampled pixels
    fdr: bool = False  # the "fdr" threshold unit: dark blobs are collected as the null
    window: float = 1.0  # local maxima over squares of ± this × the cell radius
    precut: float = 1.0  # window-level cut (noise units) = threshold × this
    bleed: float = 0.0  # autofluorescence bleed-through subtracted from the signal
    auto_noise: float = 0.0  # pixel noise of the autofluorescence channel
    # local noise: pixel noise σ (noise model bins) against the raw signal's block-mean level
    noise_levels: np.ndarray | None = None
    noise_sigmas: np.ndarray | None = None
    raw_background: np.ndarray | None = None  # smoothed raw-signal block means

    def noise_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Local pixel noise at image positions (the global noise without a noise model)."""
        if self.noise_levels is None or self.raw_background is None:
            return np.full(np.shape(xs), self.noise)
        coords = [
            (np.asarray(ys) + 0.5) / self.block - 0.5,
            (np.asarray(xs) + 0.5) / self.block - 0.5,
        ]
        level = ndi.map_coordinates(self.raw_background, coords, order=1, mode="nearest")
        return np.interp(level, self.noise_levels, self.noise_sigmas)

    def background_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Background (bilinear on the block grid) at image positions."""
        coords = [
            (np.asarray(ys) + 0.5) / self.block - 0.5,
            (np.asarray(xs) + 0.5) / self.block - 0.5,
        ]
        return ndi.map_coordinates(self.background, coords, order=1, mode="nearest")

    def in_tissue(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        by = np.clip((np.asarray(ys) // self.block).astype(int), 0, self.tissue.shape[0] - 1)
        bx = np.clip((np.asarray(xs) // self.block).astype(int), 0, self.tissue.shape[1] - 1)
        return self.tissue[by, bx]


class Plane:
    """A lazy 2-D view of the last two axes of an N-D array (zarr, dask, numpy): windows are read
    as ``array[*lead, y0:y1, x0:x1]``, so only their chunks are decompressed.

    Parameters
    ----------
    array
        N-D array-like.
    lead
        Indices of the leading axes, e.g. ``(channel, z)`` of a ``(c, z, y, x)`` array.
    """

    def __init__(self, array: Any, lead: tuple[int, ...]) -> None:
        if len(lead) != len(array.shape) - 2:
            raise ValueError(f"need {len(array.shape) - 2} leading indices, got {len(lead)}")
        self.array, self.lead = array, tuple(int(i) for i in lead)
        self.shape = tuple(int(s) for s in array.shape[-2:])
        self.dtype = np.dtype(array.dtype)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return np.asarray(self.array[(*self.lead, *key)])


def detect_cells(
    image: np.ndarray,
    *,
    pixel_size_um: float,
    cell_diameter_um: float,
    method: str = "log",
    **kw: Any,
) -> pd.DataFrame:
    """Detect labeled cells as bright blobs of about ``cell_diameter_um``.

    Default (``log`` with ``threshold_unit="fdr"``), needing only the cell diameter and the
    pixel size: the signal, less the autofluorescence's bleed-through when ``autofluorescence=``
    is given (a robust slope of signal on autofluorescence over the tissue), is filtered by a
    scale-normalised LoG at 0.8 × the cell's scale, in units of a *local* noise model (the
    pixel noise as a function of the local level, fitted on tissue blocks: shot noise grows
    with intensity). Candidates are the response maxima; the threshold is the lowest at which
    the dark blobs (response minima, which noise and texture make as often as bright blobs
    while cells make only bright ones) number at most ``fdr`` (default 0.02) of the bright
    candidates above it, never below ``threshold`` (default 3) local noise units. Candidates
    fail as ridges (principal-curvature test), as too small (half-scale LoG), or as
    both-channel objects (dust, lipofuscin: a blob in the autofluorescence at least 0.25 of
    the signal's). ``return_qc=True`` also returns a dict: tissue area (mm²), noise, threshold,
    number of candidates, the fraction rejected for each reason (``rejected_threshold``,
    ``rejected_shape``, ``rejected_autofluorescence``, ``rejected_border``), cells per mm² of
    tissue; the same dict is in the result's ``attrs["qc"]``. The other units below are the
    previous defaults (``threshold_unit="noise"``, ``threshold=6``).

    ``log`` (default): scale-normalised Laplacian of Gaussian at the cell size (separable
    float32 OpenCV filters, on a block-mean image when cells span many pixels so the LoG scale
    there stays ≥ 1.5 px); with ``scales``, at several sizes, a cell being a spatial maximum of
    the highest scale-normalised response and its ``radius_um`` that scale's. A detection is a
    local maximum at least ``threshold`` units above zero. The unit (``threshold_unit``) is
    ``"noise"``: the response σ of the image's pixel noise (estimated robustly from a
    pixel-scale residual, × the kernel's L2 norm), so dense fields of cells do not raise it;
    or ``"spread"``: the robust (MAD) spread of the response over the tissue, sampled on a grid
    fixed in image coordinates and never below the noise unit — where dim cells, neurites or
    texture make the response vary, the unit grows with them and only cells that stand out of
    their image are kept. ``min_brightness`` (default 0) also drops cells whose peak is less
    than that fraction of the image's bright range (99.9th percentile − median) above the
    background. Background is a Gaussian (``background_um``, default 10 cell diameters) of
    block means; blocks of constant value (zero padding, missing data) are not tissue, give
    no cells and are left out of the noise and value samples. A maximum must be a blob, not a
    ridge: its principal curvatures (Hessian of the response) both negative and their ratio
    below ``max_elongation`` (default 20; 0 turns the test off) — the LoG of a straight edge
    of tissue, a neurite or a vessel is a ridge whose noise makes a row of maxima. Cells cut
    by the image border are found when their centre lies inside the image (a cell centred
    outside belongs to the abutting image): the filters mirror the image at its border, and
    a maximum on the outermost pixels is kept only if the pixels across and along the border
    fit a cell's profile (not a ramp or an edge of tissue running into the border); cells
    within one radius of the border are placed by that fit.

    ``watershed``: markers = the ``log`` detections (same ``threshold``, ``threshold_unit``,
    ``scales``); watershed of the smoothed image from them, each cell being the pixels at least
    half its peak above the background; cells kept when their area is within ``area_range``
    (× the expected cell area) and ``circularity`` ≥ ``min_circularity``; positions are the
    cells' centroids.

    ``trained``: LoG candidates at a low threshold (at the model's scales), kept by a
    scikit-learn classifier over their multi-scale features, all in units of the image's own
    bright range (``model=`` a :class:`cellmap2d._detectors.DetectorModel` or the path of one
    saved by ``cellmap2d train-detector``).

    Parameters
    ----------
    image
        2-D section, integer or float dtype.
    pixel_size_um
        Pixel size of ``image``.
    cell_diameter_um
        Expected cell diameter.
    method
        ``"log"``, ``"watershed"`` or ``"trained"``.
    **kw
        ``threshold`` (default 6), ``threshold_unit`` (``log``, ``watershed``: ``"noise"``
        (default) or ``"spread"``), ``scales`` (``log``, ``watershed``: cell sizes relative
        to ``cell_diameter_um``, default ``(1.0,)``, e.g. ``(0.7, 1.0, 1.4)``),
        ``min_brightness`` (any method; fraction of the bright range), ``background_um``,
        ``noise`` (pixel noise, to skip the estimate), ``max_elongation`` (``log`` and the
        methods built on it; principal-curvature ratio), ``min_sigma_px`` (smallest LoG σ in
        block-mean pixels, default 1.5: sets the block-mean factor), ``area_range``,
        ``min_circularity``, ``model``.

    Returns
    -------
    pandas.DataFrame
        One row per cell: ``x``, ``y`` (sub-pixel, column/row of ``image``), ``intensity``
        (peak, smoothed at σ/2), ``mean_intensity`` (within one cell radius), ``background``,
        ``contrast`` ((peak − background) / pixel noise), ``radius_um`` (the best scale's);
        ``watershed`` adds ``area_um2`` and ``circularity``, ``trained`` adds ``probability``.

    Raises
    ------
    ValueError
        NaN/inf values, a saturated section (> 50 % of pixels at the dtype maximum), a non 2-D
        image, non-positive sizes or scales, an unknown method or threshold unit.
    TypeError
        A non-numeric (or bool/complex) dtype.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"detect_cells takes a 2-D image, not shape {image.shape}")
    tile = max(image.shape) if image.size else 1
    return detect_cells_tiled(
        image,
        pixel_size_um=pixel_size_um,
        cell_diameter_um=cell_diameter_um,
        method=method,
        tile=tile,
        workers=1,
        **kw,
    )


def detect_cells_tiled(
    array: Any,
    *,
    pixel_size_um: float,
    cell_diameter_um: float,
    method: str = "log",
    tile: int = 4096,
    overlap: int | None = None,
    workers: int = 1,
    **kw: Any,
) -> pd.DataFrame:
    """:func:`detect_cells` window by window, reading ``array`` lazily.

    Two passes over ``tile``² windows: the first samples the pixel noise (on rows fixed in image
    coordinates), the block means for the background and tissue mask, and the pixels for the
    bright range; the second detects in each window grown by ``overlap`` pixels (default:
    enough for the filters and one cell) and keeps the cells whose position lies in the window's
    core, so each cell is reported once and as the whole image would report it; the response
    spread (``log``) comes from a grid of the windows' core pixels fixed in image coordinates.
    Peak memory is a few window-sized float32 arrays per worker, whatever the image size.

    Parameters
    ----------
    array
        2-D array-like with ``shape``, ``dtype`` and slicing: numpy, zarr (e.g.
        ``arrays[level][channel, z]``), dask.
    tile, overlap
        Window core size and margin, level pixels (rounded up to the block-mean factor).
    workers
        Threads (OpenCV, scipy.ndimage and zarr release the GIL; OpenCV's own threads are
        turned off meanwhile).
    **kw
        As :func:`detect_cells`.
    """
    if method not in (*METHODS, "_candidates"):
        raise ValueError(f"unknown detection method {method!r}; available: {', '.join(METHODS)}")
    if len(array.shape) != 2:
        raise ValueError(f"detect_cells takes a 2-D image, not shape {tuple(array.shape)}")
    dtype = np.dtype(array.dtype)
    if dtype.kind == "b" or not (
        np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
    ):
        raise TypeError(f"image dtype {dtype} is not numeric")
    if not (pixel_size_um > 0 and cell_diameter_um > 0):
        raise ValueError("pixel_size_um and cell_diameter_um must be positive")
    scales = tuple(float(s) for s in kw.get("scales", (1.0,)))
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive numbers, not {kw.get('scales')!r}")
    elongation = kw.get("max_elongation", _MAX_ELONGATION)
    if not (elongation is None or elongation == 0 or float(elongation) > 1):
        raise ValueError(f"max_elongation must be > 1 (or 0: off), not {elongation!r}")
    auto = kw.get("autofluorescence")
    if auto is not None:
        if tuple(int(v) for v in auto.shape) != tuple(int(v) for v in array.shape):
            raise ValueError(
                f"autofluorescence shape {tuple(auto.shape)} is not the image's "
                f"{tuple(array.shape)}"
            )
        if method != "log":
            raise ValueError("autofluorescence= is for method='log'")
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        cells, qc = _detect_tiled(
            array,
            dtype=dtype,
            pixel_size_um=float(pixel_size_um),
            cell_diameter_um=float(cell_diameter_um),
            method=method,
            tile=tile,
            overlap=overlap,
            workers=workers,
            scales=scales,
            kw=kw,
        )
    finally:
        cv2.setNumThreads(cv_threads)
    cells.attrs["qc"] = qc
    return (cells, qc) if kw.get("return_qc") else cells


def _detect_tiled(
    array: Any,
    *,
    dtype: np.dtype,
    pixel_size_um: float,
    cell_diameter_um: float,
    method: str,
    tile: int,
    overlap: int | None,
    workers: int,
    scales: tuple[float, ...],
    kw: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    height, width = (int(s) for s in array.shape)
    columns = _columns(method)
    empty = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in columns})
    auto = kw.get("autofluorescence")
    unit = kw.get("threshold_unit", "fdr" if method == "log" else "noise")
    if unit not in ("noise", "spread", "fdr"):
        raise ValueError(f"threshold_unit must be 'fdr', 'noise' or 'spread', not {unit!r}")
    if unit == "fdr" and method != "log":
        raise ValueError("threshold_unit='fdr' is for method='log'")
    fdr_mode = unit == "fdr"
    threshold = float(kw.get("threshold", _FDR_FLOOR if fdr_mode else 6.0))
    q = float(kw.get("fdr", _FDR))
    if not 0 < q < 1:
        raise ValueError(f"fdr must be in (0, 1), not {q!r}")
    qc = _empty_qc(unit, threshold, q if fdr_mode else None)
    if height == 0 or width == 0:
        return empty, qc

    radius_px = cell_diameter_um / 2 / pixel_size_um
    # the fdr unit's LoG runs a little below the (median) cell's scale, which separates
    # touching cells, and takes maxima over a smaller square
    sigma = max(radius_px / math.sqrt(2) * (_FDR_SIGMA if fdr_mode else 1.0), 0.5)
    factor = max(1, int(sigma * min(scales) // kw.get("min_sigma_px", 1.5)))
    bg_sigma = kw.get("background_um") or 10 * cell_diameter_um
    bg_sigma /= pixel_size_um
    block = factor * max(1, round(bg_sigma / 4 / factor))
    step = block * max(1, -(-int(tile) // block))
    margin = 1  # the residual needs one neighbour each side

    # pass 1: noise sample, block statistics, value sample
    stride = max(1, -(-height * width // _NOISE_SAMPLE))
    cores = list(_cores(height, width, step))

    def stats(core: tuple[int, int, int, int]) -> tuple[Any, ...]:
        y0, y1, x0, x1 = core
        wy0, wy1, wx0, wx1 = (
            max(0, y0 - margin),
            min(height, y1 + margin),
            max(0, x0 - margin),
            min(width, x1 + margin),
        )
        data = _read(array, wy0, wy1, wx0, wx1)
        inner = data[y0 - wy0 : y0 - wy0 + (y1 - y0), x0 - wx0 : x0 - wx0 + (x1 - x0)]
        means, tissue, saturated = _block_stats(inner, block, factor, dtype)
        # noise and values are sampled in tissue only (zero padding would shrink both)
        residual, rows, cols, level = _residual_sample(data, wy0, wx0, height, width, stride)
        values, value_rows, value_cols = _value_sample(inner, y0, x0, stride)
        in_tissue = _tissue_pixels(tissue, rows - y0, cols - x0, block)
        # the image-wide block of each tissue sample (for the noise model's interior test)
        sample_blocks = np.stack(
            np.broadcast_arrays((rows // block)[:, None], (cols // block)[None, :])
        )[:, in_tissue]
        out = [
            residual[in_tissue],
            values[_tissue_pixels(tissue, value_rows - y0, value_cols - x0, block)],
            means,
            tissue,
            saturated,
            level[in_tissue],
            sample_blocks,
        ]
        if auto is not None:
            adata = _read(auto, wy0, wy1, wx0, wx1)
            ainner = adata[y0 - wy0 : y0 - wy0 + (y1 - y0), x0 - wx0 : x0 - wx0 + (x1 - x0)]
            ameans, _, _ = _block_stats(ainner, block, factor, np.dtype(adata.dtype))
            ares = _residual_sample(adata, wy0, wx0, height, width, stride)[0]
            out += [ares[in_tissue], ameans]
        return tuple(out)

    results = _map(stats, cores, workers)
    residuals = np.concatenate([r[0] for r in results])
    values = np.concatenate([r[1] for r in results])
    levels = np.concatenate([r[5] for r in results])
    n_blocks = (-(-height // block), -(-width // block))
    means = np.zeros(n_blocks, np.float64)
    auto_means = np.zeros(n_blocks, np.float64)
    tissue = np.zeros(n_blocks, bool)
    for (y0, _, x0, _), r in zip(cores, results, strict=True):
        by, bx = y0 // block, x0 // block
        means[by : by + r[2].shape[0], bx : bx + r[2].shape[1]] = r[2]
        tissue[by : by + r[2].shape[0], bx : bx + r[2].shape[1]] = r[3]
        if auto is not None:
            auto_means[by : by + r[8].shape[0], bx : bx + r[8].shape[1]] = r[8]
    saturated = sum(r[4] for r in results)
    if saturated > 0.5 * height * width:
        raise ValueError(
            f"section is saturated: {saturated / (height * width):.0%} of pixels at the "
            f"{dtype} maximum {np.iinfo(dtype).max}"
        )
    if not tissue.any():
        return empty, qc  # constant (e.g. all-zero) section
    # tissue area: the tissue blocks, clipped to the image
    block_h = np.minimum(block, height - np.arange(n_blocks[0]) * block)
    block_w = np.minimum(block, width - np.arange(n_blocks[1]) * block)
    tissue_px = float((np.outer(block_h, block_w) * tissue).sum())
    qc["tissue_mm2"] = tissue_px * (pixel_size_um / 1000) ** 2
    bleed, auto_noise = 0.0, 0.0
    if auto is not None:
        auto_res = np.concatenate([r[7] for r in results])
        auto_noise = _noise_from_residuals(auto_res)
        bleed = kw.get("bleed_through")
        if bleed is None:
            bleed = _bleed_coefficient(means[tissue], auto_means[tissue])
        bleed = float(bleed)
        if bleed:
            residuals = residuals - np.float32(bleed) * auto_res
        qc["bleed_through"] = bleed
    noise = kw.get("noise")
    if noise is None:
        noise = _noise_from_residuals(residuals)
    if noise <= 0:
        return empty, qc
    qc["noise"] = float(noise)
    raw_background = ndi.gaussian_filter(means, bg_sigma / block, mode="nearest")
    background = ndi.gaussian_filter(means - bleed * auto_means, bg_sigma / block, mode="nearest")
    noise_levels = noise_sigmas = None
    precut = 1.0
    if fdr_mode and kw.get("noise") is None:
        # blocks at the edge of tissue mix it with padding or bare slide: left out
        interior = tissue & ~ndi.binary_dilation(~tissue, np.ones((3, 3), bool))
        by, bx = np.concatenate([r[6] for r in results], axis=1)
        use = interior[by, bx]
        noise_levels, noise_sigmas = _noise_model(residuals[use], levels[use])
        if noise_levels is not None:
            in_tissue = raw_background[tissue]
            lo = float(np.interp(in_tissue, noise_levels, noise_sigmas).min())
            precut = min(1.0, max(lo, 1e-6 * noise) / noise)
            qc["noise_range"] = (float(noise_sigmas.min()), float(noise_sigmas.max()))
    bright_range = float(np.percentile(values, 99.9) - np.median(values)) if len(values) else 0.0
    min_brightness = float(kw.get("min_brightness", 0.0))
    options = {k: v for k, v in kw.items() if k not in _SHARED_OPTIONS}
    if method == "trained":
        from ._detectors import load_model

        options["model"] = load_model(options.get("model"))
    coarse_pixels = -(-height // factor) * -(-width // factor)
    ctx = Context(
        height=height,
        width=width,
        pixel_size_um=pixel_size_um,
        cell_diameter_um=cell_diameter_um,
        radius_px=radius_px,
        sigma=sigma,
        factor=factor,
        block=block,
        threshold=threshold,
        noise=float(noise),
        background=background,
        tissue=tissue,
        options=options,
        scales=scales if method != "trained" else _model_scales(options),
        sample_step=max(1, math.ceil(math.sqrt(coarse_pixels / _RESPONSE_SAMPLE))),
        bright_range=max(bright_range, 1e-12),
        median=float(np.median(values)) if len(values) else 0.0,
        fdr=fdr_mode,
        window=_FDR_WINDOW if fdr_mode else 1.0,
        precut=precut,
        bleed=bleed,
        auto_noise=auto_noise,
        noise_levels=noise_levels,
        noise_sigmas=noise_sigmas,
        raw_background=raw_background if noise_levels is not None else None,
    )
    if overlap is None:
        sigma_c = _coarse_sigma(sigma * max(ctx.scales), factor)
        reach = int(4 * sigma_c * 2 + 0.5) * factor  # up to 2 σ for features
        overlap = max(reach, int(3 * radius_px * max(ctx.scales))) + 2 * factor + 2
    overlap = factor * -(-int(overlap) // factor)
    detector = _detector(method)

    sample_response = method in ("log", "watershed") and unit == "spread"

    def in_core(x: np.ndarray, y: np.ndarray, core: tuple[int, int, int, int]) -> np.ndarray:
        y0, y1, x0, x1 = core
        keep = (y >= y0 - 0.5) & (y < y1 - 0.5) & (x >= x0 - 0.5) & (x < x1 - 0.5)
        keep[keep] = ctx.in_tissue(x[keep], y[keep])
        return keep

    def detect(core: tuple[int, int, int, int]) -> tuple[Any, ...]:
        y0, y1, x0, x1 = core
        if not tissue[y0 // block : -(-y1 // block), x0 // block : -(-x1 // block)].any():
            return None, None, None, None
        wy0, wy1 = max(0, y0 - overlap), min(height, y1 + overlap)
        wx0, wx1 = max(0, x0 - overlap), min(width, x1 + overlap)
        data = _read(array, wy0, wy1, wx0, wx1)
        adata = _read(auto, wy0, wy1, wx0, wx1) if auto is not None else None
        cells, response, extra = detector(data, wy0, wx0, ctx, adata)
        samples = _grid_samples(response, wy0, wx0, core, ctx) if sample_response else None
        auto_samples = dark = None
        if extra.get("auto_response") is not None:
            auto_samples = _grid_samples(extra["auto_response"], wy0, wx0, core, ctx)
        if extra.get("dark") is not None and len(extra["dark"]):
            d = extra["dark"]
            dark = d[in_core(d[:, 0], d[:, 1], core), 2]
        if cells is None or len(cells) == 0:
            return None, samples, auto_samples, dark
        keep = in_core(cells["x"].to_numpy(), cells["y"].to_numpy(), core)
        return cells[keep], samples, auto_samples, dark

    found = _map(detect, cores, workers)
    frames = [f[0] for f in found if f[0] is not None and len(f[0])]
    if not frames:
        return empty, qc
    cells = pd.concat(frames, ignore_index=True)
    reason = (
        cells.pop("_reason").to_numpy() if "_reason" in cells else np.zeros(len(cells), np.int8)
    )
    if auto is not None and "auto_response" in cells:
        auto_samples = np.concatenate([f[2] for f in found if f[2] is not None])
        auto_unit = max(1.0, robust_spread(auto_samples))
        auto_response = cells.pop("auto_response").to_numpy()
        # both responses in intensity units: the signal's after the bleed-through is removed
        auto_intensity = auto_response * cells.pop("auto_scale").to_numpy()
        auto_threshold = float(kw.get("autofluorescence_threshold", _AUTO_THRESHOLD))
        both = (auto_response / auto_unit >= auto_threshold) & (
            auto_intensity >= _AUTO_RATIO * cells["response"].to_numpy()
        )
        reason[(reason == 0) & both] = _REASONS.index("autofluorescence")
    response = cells["response"].to_numpy()
    if fdr_mode:
        darks = [f[3] for f in found if f[3] is not None]
        dark = np.concatenate(darks) if darks else np.zeros(0)
        dark = dark[dark > threshold]
        ok = reason == 0
        t = max(threshold, fdr_threshold(response[ok & (response > threshold)], dark, q, threshold))
        qc["n_dark"] = int(len(dark))
        qc["threshold"] = float(t)
    elif sample_response:
        samples = np.concatenate([f[1] for f in found if f[1] is not None])
        # on white noise the spread is 1 (noise units) but a small image's estimate scatters
        # by ~10 %: the margin keeps the unit at the pixel noise's there
        spread = max(1.0, robust_spread(samples) - 0.25)
        t = threshold * spread
        qc["threshold"] = float(t)
    else:
        t = threshold
    below = response < t
    if min_brightness > 0:
        above = cells["intensity"].to_numpy() - cells["background"].to_numpy()
        below |= above < min_brightness * ctx.bright_range
    reason[(reason == 0) & below] = _REASONS.index("threshold")
    n = len(cells)
    qc["n_candidates"] = int(n)
    for i, name in enumerate(_REASONS[1:], start=1):
        qc[f"rejected_{name}"] = float((reason == i).sum() / n) if n else 0.0
    cells = cells[reason == 0]
    qc["n_cells"] = int(len(cells))
    if qc["tissue_mm2"] > 0:
        qc["cells_per_mm2"] = len(cells) / qc["tissue_mm2"]
    order = _row_major_order(cells["x"].to_numpy(), cells["y"].to_numpy())
    return cells.iloc[order][list(columns)].reset_index(drop=True), qc


# why a candidate (a response maximum above the window cut) is not a cell: 0 = it is
_REASONS = ("", "border", "shape", "autofluorescence", "threshold")
# the "fdr" unit's defaults: floor (local noise units) and false-detection rate
_FDR_FLOOR = 3.0
_FDR = 0.02
# the fdr unit's LoG σ (× the cell's, r/√2) and its maxima's square (± this × the radius)
_FDR_SIGMA = 0.8
_FDR_WINDOW = 0.56
# a candidate is a both-channel object (dust, lipofuscin) when the autofluorescence has a
# blob there of this many units of its own response spread, at least this fraction of the
# signal's response (both in intensity units)
_AUTO_THRESHOLD = 5.0
_AUTO_RATIO = 0.25


def _empty_qc(unit: str, threshold: float, fdr: float | None) -> dict[str, Any]:
    qc: dict[str, Any] = {
        "threshold_unit": unit,
        "threshold": threshold,
        "fdr": fdr,
        "tissue_mm2": 0.0,
        "noise": float("nan"),
        "n_candidates": 0,
        "n_cells": 0,
        "cells_per_mm2": 0.0,
    }
    qc.update({f"rejected_{name}": 0.0 for name in _REASONS[1:]})
    return qc


def fdr_threshold(bright: np.ndarray, dark: np.ndarray, q: float, floor: float) -> float:
    """The smallest ``t`` among the ``bright`` values (all above ``floor``) with
    ``E(t) / #bright ≥ t ≤ q``, where ``E(t)``, the number of false maxima expected at ``t`` or
    above, is the number of ``dark`` blobs there: noise and texture make dark and bright blobs
    alike, cells only bright ones. Beyond the 10th deepest dark blob ``E`` follows an
    exponential tail fitted to the deepest ones (heavier than the Gaussian tail of noise, so
    the estimate errs on the safe side), so a few cells far above every dark blob pass; ``inf``
    when no ``t`` does."""
    if len(bright) == 0:
        return float("inf")
    values = np.sort(np.asarray(bright, np.float64))[::-1]
    dark = np.sort(np.asarray(dark, np.float64))
    expected = len(dark) - np.searchsorted(dark, values, side="left").astype(np.float64)
    if len(dark) >= _TAIL_POINTS:
        top = dark[-_TAIL_POINTS:]
        anchor, count = float(top[0]), _TAIL_POINTS
        scale = max(float(np.mean(top - anchor)), 0.25)
    else:
        # too few dark blobs to fit: an exponential from the floor, at least 1 unit wide
        anchor, count = floor, max(len(dark), 1)
        scale = max(float(np.mean(dark - floor)) if len(dark) else 0.0, 1.0)
    beyond = values > anchor
    expected[beyond] = count * np.exp(-(values[beyond] - anchor) / scale)
    ok = expected / np.arange(1, len(values) + 1) <= q
    if not ok.any():
        return float("inf")
    return float(values[np.flatnonzero(ok).max()])


# the deepest dark blobs the tail of the null is fitted to
_TAIL_POINTS = 10


def _bleed_coefficient(signal: np.ndarray, auto: np.ndarray) -> float:
    """Bleed-through of the autofluorescence into the signal: the slope of the signal's median
    block mean against the autofluorescence's, over ~20 quantile bins of the autofluorescence
    (medians ignore the few blocks with cells), ≥ 0."""
    if len(signal) < 10:
        return 0.0
    order = np.argsort(auto)
    bins = np.array_split(order, min(20, len(order) // 5))
    a = np.array([np.median(auto[b]) for b in bins])
    s = np.array([np.median(signal[b]) for b in bins])
    if np.ptp(a) <= 0:
        return 0.0
    slope = np.polyfit(a, s, 1)[0]
    return float(max(slope, 0.0))


def _noise_model(
    residual: np.ndarray, level: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Pixel noise against the raw signal level (shot noise grows with it): the residual
    noise (:func:`_noise_from_residuals`) in up to 16 quantile bins of the 3×3 mean it is
    centred on (≥ 5000 samples each), and the bins' median levels; ``None`` with
    too few samples."""
    n_bins = min(16, len(residual) // 5000)
    if n_bins < 2:
        return None, None
    step = max(1, len(residual) // 80_000)  # ~5000 a bin are plenty
    residual, level = residual[::step], level[::step]
    order = np.argsort(level, kind="stable")
    bins = np.array_split(order, n_bins)
    levels = np.array([np.median(level[b]) for b in bins])
    sigmas = np.array([_noise_from_residuals(residual[b]) for b in bins])
    # constant pixels (padding, clipped background) have no noise to measure; equal levels
    # (quantised data) are one level
    ok = (sigmas > 0) & np.r_[True, np.diff(levels) > 0]
    if ok.sum() < 2:
        return None, None
    return levels[ok], sigmas[ok]


def _row_major_order(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``np.lexsort((x, y))`` (by y, then x, then position), fast when ties in y are rare."""
    order = np.argsort(y)
    ys = y[order]
    tied = np.flatnonzero(ys[1:] == ys[:-1])
    if len(tied):
        # runs of equal y: sort each by x, then by original position
        run_start = tied[np.r_[True, np.diff(tied) > 1]]
        run_end = tied[np.r_[np.diff(tied) > 1, True]] + 2
        for a, b in zip(run_start, run_end, strict=True):
            members = order[a:b]
            order[a:b] = members[np.lexsort((members, x[members]))]
    return order


def _model_scales(options: dict[str, Any]) -> tuple[float, ...]:
    model = options.get("model")
    return tuple(getattr(model, "scales", (1.0,))) if model is not None else (1.0,)


def _columns(method: str) -> tuple[str, ...]:
    if method == "watershed":
        return (*DETECTION_COLUMNS, "area_um2", "circularity")
    if method == "trained":
        return (*DETECTION_COLUMNS, "probability")
    if method == "_candidates":
        from ._detectors import FEATURES

        return (*DETECTION_COLUMNS, *(f for f in FEATURES if f not in DETECTION_COLUMNS))
    return DETECTION_COLUMNS


Detector = Callable[..., tuple[pd.DataFrame | None, np.ndarray | None, dict[str, Any]]]


def _detector(method: str) -> Detector:
    """The window function of ``method``: cells, the LoG response (noise units; ``log`` and
    ``watershed``) and extras (``log``: the dark blobs, the autofluorescence response)."""
    if method == "log":

        def log(data: np.ndarray, y0: int, x0: int, ctx: Context, auto: Any = None) -> Any:
            cells, extra = log_window(data, y0, x0, ctx, auto=auto, keep_rejected=True)
            return cells, extra["response"], extra

        return log
    from . import _detectors

    if method == "watershed":

        def watershed(data: np.ndarray, y0: int, x0: int, ctx: Context, auto: Any = None) -> Any:
            cells, response = _detectors.watershed_window(data, y0, x0, ctx)
            return cells, response, {}

        return watershed
    window = _detectors.candidates_window if method == "_candidates" else _detectors.trained_window
    return lambda data, y0, x0, ctx, auto=None: (window(data, y0, x0, ctx), None, {})


def _cores(height: int, width: int, step: int) -> Iterator[tuple[int, int, int, int]]:
    for y0 in range(0, height, step):
        for x0 in range(0, width, step):
            yield y0, min(height, y0 + step), x0, min(width, x0 + step)


def _map(func: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    if workers <= 1 or len(items) <= 1:
        return [func(i) for i in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(func, items))


def _read(array: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    data = np.asarray(array[y0:y1, x0:x1])
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise ValueError("image contains NaN or infinite values; fill or mask them first")
    return data


def _saturated(data: np.ndarray, dtype: np.dtype) -> int:
    if not np.issubdtype(dtype, np.integer):
        return 0
    top = np.iinfo(dtype).max
    return int(np.count_nonzero(data >= top)) if top > 0 else 0


# Immerkær's noise-estimation kernel: the product of second differences along x and y. It
# cancels planes, axis-aligned edges and anything smooth, so on a section it sees the pixel
# noise and only the sharpest detail (few pixels, which the MAD ignores). Its L2 norm is 6.
_RESIDUAL_NORM = 6.0


def _residual_sample(
    data: np.ndarray, y0: int, x0: int, height: int, width: int, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The residual on image rows ``r ≡ 1 (mod stride)``, interior pixels only, of a window
    at ``(y0, x0)`` that holds each such row's neighbours; its image rows and columns; and
    the 3×3 mean it is centred on (the level, for the noise model)."""
    rows = np.arange(max(1, y0 + 1), min(height - 1, y0 + data.shape[0] - 1))
    rows = rows[(rows - 1) % stride == 0]
    cols = np.arange(1, data.shape[1] - 1) + x0
    ok = (cols >= 1) & (cols <= width - 2)
    if len(rows) == 0 or not ok.any():
        empty = np.zeros((0, 0), np.float32)
        return empty, rows[:0], cols[:0], empty
    local = rows - y0
    above, here, below = (data[r].astype(np.float32) for r in (local - 1, local, local + 1))
    d = above - 2 * here + below
    res = d[:, :-2] - 2 * d[:, 1:-1] + d[:, 2:]  # centred on columns 1 … n-2 of the window
    # the 3×3 mean: the residual's kernel sums to zero over it, so the two are uncorrelated
    m = above + here + below
    level = (m[:, :-2] + m[:, 1:-1] + m[:, 2:]) / 9
    return res[:, ok], rows, cols[ok], level[:, ok]


def _value_sample(
    inner: np.ndarray, y0: int, x0: int, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels of image rows ``r ≡ 1 (mod stride)`` and columns ``c ≡ 0 (mod 4)`` of
    ``inner`` (at ``(y0, x0)``), float32, and those rows and columns."""
    rows = np.arange(y0, y0 + inner.shape[0])
    rows = rows[(rows - 1) % stride == 0]
    cols = np.arange(x0, x0 + inner.shape[1])
    cols = cols[cols % 4 == 0]
    return inner[np.ix_(rows - y0, cols - x0)].astype(np.float32), rows, cols


def _tissue_pixels(
    tissue: np.ndarray, rows: np.ndarray, cols: np.ndarray, block: int
) -> np.ndarray:
    """``(len(rows), len(cols))``: whether each pixel (tile-local rows and columns; one pixel
    of margin is clipped to the edge blocks) lies in a tissue block of the tile."""
    by = np.clip(rows // block, 0, tissue.shape[0] - 1)
    bx = np.clip(cols // block, 0, tissue.shape[1] - 1)
    return tissue[np.ix_(by, bx)]


def _block_stats(
    inner: np.ndarray, block: int, factor: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, int]:
    """Block means of ``inner`` (edge-padded), whether each block is tissue, and the number of
    pixels at the integer ``dtype``'s maximum.

    A block is tissue when its ``factor``² area means (what the filters see) are not all equal:
    zero padding and missing data are constant; a real section's noise never is."""
    h, w = inner.shape
    ph, pw = -h % block, -w % block
    padded = cv2.copyMakeBorder(inner, 0, ph, 0, pw, cv2.BORDER_REPLICATE) if ph or pw else inner
    fine = _area_mean(padded, factor)
    sub = block // factor
    hb, wb = fine.shape[0] // sub, fine.shape[1] // sub
    rows = fine.reshape(hb, sub, fine.shape[1])
    top = rows.max(axis=1).reshape(hb, wb, sub).max(axis=2)
    bottom = rows.min(axis=1).reshape(hb, wb, sub).min(axis=2)
    means = block_mean(fine, sub)
    saturated = 0
    if np.issubdtype(dtype, np.integer) and inner.size:
        # an area mean holding one pixel at the maximum (the others at the minimum, at worst)
        # reaches this: the pixels are counted only when some block does
        info, n = np.iinfo(dtype), factor * factor
        if (top >= (float(info.max) + (n - 1) * float(info.min)) / n - 1).any():
            saturated = _saturated(inner, dtype)
    return means, top > bottom, saturated


def _noise_from_residuals(residual: np.ndarray) -> float:
    """Pixel noise σ: MAD of the residual / its kernel norm; if more than half the residual is
    exactly zero (noise-free or quantised background), the mean absolute deviation
    (Gaussian-equivalent) stands in; 0 only for a flat image."""
    if len(residual) == 0:
        return 0.0
    med = np.median(residual)
    dev = np.abs(residual - med)
    noise = float(1.4826 * np.median(dev))
    if noise == 0:
        noise = float(np.sqrt(np.pi / 2) * np.mean(dev))
    return noise / _RESIDUAL_NORM


def _coarse_sigma(sigma: float, factor: int) -> float:
    """LoG scale on the ``factor`` block-mean image whose effective scale is ``sigma``: a box of
    ``factor`` pixels adds (factor² − 1)/12 to the variance."""
    if factor == 1:
        return sigma
    return math.sqrt(max(sigma**2 - (factor**2 - 1) / 12, 0.25)) / factor


# dtypes averaged as they are (OpenCV rounds uint16 means to the integer, an error below the
# data's own quantisation); anything else is averaged as float32
_NATIVE_AREA = (np.dtype(np.uint16), np.dtype(np.float32))


def block_mean(data: np.ndarray, factor: int) -> np.ndarray:
    """``factor``² block means as float32 (edge-padded to a multiple of ``factor``)."""
    return _area_mean(data, factor).astype(np.float32, copy=False)


def _area_mean(data: np.ndarray, factor: int) -> np.ndarray:
    """:func:`block_mean` in the data's own dtype where OpenCV averages it natively."""
    if data.dtype not in _NATIVE_AREA:
        data = data.astype(np.float32)
    if factor == 1:
        return data
    h, w = data.shape
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        data = cv2.copyMakeBorder(data, 0, ph, 0, pw, cv2.BORDER_REPLICATE)
    size = (data.shape[1] // factor, data.shape[0] // factor)
    return cv2.resize(data, size, interpolation=cv2.INTER_AREA)


# the 4-neighbour discrete Laplacian (cv2.Laplacian with ksize=1); it adds 1/6 px² of variance
# along each axis, which the Gaussian before it leaves out
_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)


@lru_cache(maxsize=64)
def _log_kernel(sigma: float) -> tuple[np.ndarray, float]:
    """The Gaussian (1-D, truncated at 4 σ, sums to 1) that, followed by the discrete Laplacian
    and × −σ², gives the scale-normalised LoG at ``sigma`` (bright blobs positive); and the L2
    norm of that combined 2-D kernel. The Laplacian stencil sums to 0, so a flat background
    gives exactly 0 whatever the truncation."""
    inner = math.sqrt(max(sigma**2 - 1 / 6, 0.09))
    reach = max(1, int(4.0 * inner + 0.5))
    x = np.arange(-reach, reach + 1, dtype=np.float64)
    g = np.exp(-0.5 * x**2 / inner**2)
    g /= g.sum()
    combined = -(sigma**2) * ndi.convolve(np.pad(np.outer(g, g), 1), _LAPLACIAN)
    return g.astype(np.float32), float(np.sqrt(np.sum(combined**2)))


def log_response(data: np.ndarray, sigma: float) -> tuple[np.ndarray, float]:
    """Scale-normalised LoG of ``data`` (float32; mirrored edges) and its kernel's L2 norm."""
    g, norm = _log_kernel(float(sigma))
    smooth = cv2.sepFilter2D(data, cv2.CV_32F, g, g, borderType=cv2.BORDER_REFLECT)
    out = cv2.Laplacian(smooth, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT)
    out *= np.float32(-(sigma**2))
    return out, norm


def _scale_responses(
    coarse: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[float], np.ndarray | None]:
    """The scale-normalised LoG response, its maximum over ``ctx.scales`` (where blobs and
    their positions are found); the same response in noise units of the scale that gave it
    (what the threshold applies to); the index of that scale (``None`` for one scale); each
    scale's coarse σ; and (``fdr`` unit, several scales) the minimum over the scales in noise
    units, where dark blobs are found (for one scale: the response itself)."""
    sigmas = [_coarse_sigma(ctx.sigma * scale, ctx.factor) for scale in ctx.scales]
    best, norm = log_response(coarse, sigmas[0])
    if len(sigmas) == 1:
        best *= np.float32(ctx.factor / (ctx.noise * norm))
        return best, best, None, sigmas, best
    units = best * np.float32(ctx.factor / (ctx.noise * norm))
    low = units.copy() if ctx.fdr else None
    which = np.zeros(best.shape, np.uint8)
    for i, sigma_c in enumerate(sigmas[1:], start=1):
        response, norm = log_response(coarse, sigma_c)
        higher = response > best
        which[higher] = i
        scaled = response * np.float32(ctx.factor / (ctx.noise * norm))
        units[higher] = scaled[higher]
        np.maximum(best, response, out=best)
        if low is not None:
            np.minimum(low, scaled, out=low)
    return best, units, which, sigmas, low


def log_window(
    data: np.ndarray,
    y0: int,
    x0: int,
    ctx: Context,
    *,
    threshold: float | None = None,
    auto: np.ndarray | None = None,
    keep_rejected: bool = False,
) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """LoG detections of one window at image offset ``(y0, x0)`` (``y0``, ``x0`` multiples of
    ``ctx.factor``), in image coordinates, and the window's filtered images for reuse.

    ``response`` (column and ``extra["response"]``) is in pixel-noise units (the ``fdr``
    unit: the column in local noise units). With ``keep_rejected``, candidates failing the
    border or shape tests are kept with their reason (``_reason``, index into ``_REASONS``).
    With ``ctx.fdr``, ``extra["dark"]`` holds the dark blobs ``(x, y, depth)`` (local noise
    units); with ``auto``, the column ``auto_response`` holds the autofluorescence's response
    at each candidate (its pixel-noise units, ``extra["auto_response"]`` the whole window)."""
    f = ctx.factor
    coarse = block_mean(data, f)
    coarse_auto = None
    if auto is not None:
        coarse_auto = block_mean(auto, f)
        if ctx.bleed:
            coarse = coarse - np.float32(ctx.bleed) * coarse_auto
    best, response, which, sigmas, low = _scale_responses(coarse, ctx)
    extra: dict[str, Any] = {"coarse": coarse, "response": response, "sigma_c": sigmas[0]}
    thr = ctx.threshold if threshold is None else threshold
    cut = thr * ctx.precut if ctx.fdr else thr
    radius_c = ctx.radius_px * min(ctx.scales) / f
    size = max(3, int(2 * np.floor(radius_c * ctx.window) + 1))
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    gh, gw = -(-ctx.height // f), -(-ctx.width // f)
    cy0, cx0 = y0 // f, x0 // f
    max_elongation = float(ctx.options.get("max_elongation", _MAX_ELONGATION) or 0)
    reach_c = int(np.ceil(3 * max(sigmas)))  # a blob's negative ring lies within ~2.8 σ
    local_max = cv2.dilate(best, kernel, borderType=cv2.BORDER_REFLECT)
    if ctx.fdr:
        local_min = cv2.erode(low, kernel, borderType=cv2.BORDER_REFLECT)
        # one scale: ``low`` is ``best`` (the same array)
        low_max = local_max if low is best else cv2.dilate(low, kernel)
        extra["dark"] = _dark_blobs(
            low, local_min, low_max, cut, reach_c, size // 2, max_elongation, y0, x0, ctx
        )
    peaks = cv2.compare(response, np.float64(cut), cv2.CMP_GT)
    if not cv2.countNonZero(peaks):
        return None, extra
    cv2.bitwise_and(peaks, cv2.compare(best, local_max, cv2.CMP_GE), dst=peaks)
    points = cv2.findNonZero(peaks)
    if points is None:
        return None, extra
    points = points.reshape(-1, 2).astype(np.intp)
    xs, ys = points[:, 0], points[:, 1]
    dx, dy, blob = _peak_shape(best, ys, xs, max_elongation)
    x = (xs + dx + 0.5) * f - 0.5 + x0
    y = (ys + dy + 0.5) * f - 0.5 + y0
    scale = np.asarray(ctx.scales)[which[ys, xs]] if which is not None else ctx.scales[0]
    scale = np.broadcast_to(np.asarray(scale, np.float64), x.shape)
    values = response[ys, xs].astype(np.float64)
    if ctx.fdr:
        values *= ctx.noise / ctx.noise_at(x, y)
        above = values > thr
        if not above.all():
            xs, ys, x, y, dx, dy, blob, scale, values = (
                v[above] for v in (xs, ys, x, y, dx, dy, blob, scale, values)
            )
            if not len(xs):
                return None, extra
    # the image's outermost coarse pixels see half a neighbourhood (the filters mirror the
    # image there): their maxima are checked, and maxima near the border re-placed, on the
    # pixels themselves
    edge = np.stack(
        [
            (cx0 + xs == 0) if cx0 == 0 else np.zeros(len(xs), bool),
            (cx0 + xs == gw - 1) if cx0 + peaks.shape[1] == gw else np.zeros(len(xs), bool),
            (cy0 + ys == 0) if cy0 == 0 else np.zeros(len(ys), bool),
            (cy0 + ys == gh - 1) if cy0 + peaks.shape[0] == gh else np.zeros(len(ys), bool),
        ]
    )
    border_ok, x, y = _border_cells(data, y0, x0, x, y, scale, edge, ctx)
    reason = np.where(border_ok, 0, _REASONS.index("border")).astype(np.int8)
    shape_ok = np.ones(len(xs), bool)
    if max_elongation:
        # next to the image border a cell merges with its mirror image into an elongated
        # response; _border_cells has checked those
        reach = 1.5 * ctx.radius_px * scale
        inside = (np.minimum(x + 0.5, ctx.width - 0.5 - x) > reach) & (
            np.minimum(y + 0.5, ctx.height - 0.5 - y) > reach
        )
        shape_ok &= ~inside | blob
    if ctx.fdr:
        # a maximum in the positive ring around a deeper dark blob is that blob's echo
        deepest = -_window_extreme(local_min, ys, xs, reach_c, size // 2, np.minimum)
        shape_ok &= response[ys, xs] > _RING * deepest
    if ctx.fdr and _MIN_SIZE:
        # an object much smaller than a cell (a granule, a thin fibre) answers the LoG at
        # half the cell's scale more than at its own
        half_scale = _half_scale_response(coarse, ys, xs, sigmas[int(np.argmin(ctx.scales))] / 2)
        raw = response[ys, xs] * np.float32(ctx.noise * _log_kernel(float(sigmas[0]))[1] / f)
        shape_ok &= half_scale <= _MIN_SIZE * raw
    reason[(reason == 0) & ~shape_ok] = _REASONS.index("shape")
    if not keep_rejected and (reason > 0).any():
        ok = reason == 0
        xs, ys, x, y, scale, values, reason = (v[ok] for v in (xs, ys, x, y, scale, values, reason))
        if not len(xs):
            return None, extra
    intensity, mean = peak_features(coarse, ys, xs, ctx)
    background = ctx.background_at(x, y)
    cells = pd.DataFrame(
        {
            "x": x,
            "y": y,
            "intensity": intensity,
            "mean_intensity": mean,
            "background": background,
            "contrast": (intensity - background) / max(ctx.noise, 1e-6),
            "radius_um": ctx.cell_diameter_um / 2 * scale,
            "response": values,
        }
    )
    if keep_rejected:
        cells["_reason"] = reason
    if coarse_auto is not None:
        auto_response, norm = log_response(coarse_auto, sigmas[0])
        auto_response *= np.float32(f / (max(ctx.auto_noise, 1e-12) * norm))
        extra["auto_response"] = auto_response
        # in intensity units relative to the signal's response (the ratio test's scale)
        cells["auto_response"] = auto_response[ys, xs].astype(np.float64)
        cells["auto_scale"] = max(ctx.auto_noise, 1e-12) / ctx.noise
    extra["peaks"] = (ys, xs)
    return cells, extra


# a maximum of the response is an echo (the positive ring around a dark blob, or the negative
# ring of a bright one for a dark blob) when the opposite extreme within 3 σ is deeper than
# this fraction of it: a blob's LoG ring is ~14 % of its peak, two or three neighbours' add up
_RING = 0.5
_DARK_RING = 1.0


# objects smaller than half the cell diameter are not cells: for a Gaussian blob of σ_b the
# scale-normalised LoG at s/2 over that at s is (1/4)·((s² + σ_b²) / (s²/4 + σ_b²))², 1.18 for
# σ_b = s/1.6 (half the default scale's cell, s = 0.8 × the cell's σ); 0 turns the test off
_MIN_SIZE = 1.18


@lru_cache(maxsize=64)
def _log_kernel_2d(sigma: float) -> np.ndarray:
    """The 2-D kernel :func:`log_response` applies at ``sigma`` (Gaussian, Laplacian, −σ²)."""
    g, _ = _log_kernel(sigma)
    g = g.astype(np.float64)
    return (-(sigma**2) * ndi.convolve(np.pad(np.outer(g, g), 1), _LAPLACIAN)).astype(np.float32)


def _half_scale_response(
    coarse: np.ndarray, ys: np.ndarray, xs: np.ndarray, sigma: float
) -> np.ndarray:
    """The scale-normalised LoG at ``sigma`` (coarse px) at the pixels ``(ys, xs)`` only."""
    kernel = _log_kernel_2d(max(float(sigma), 0.5)).ravel()
    k = (int(math.isqrt(kernel.size)) - 1) // 2
    h, w = coarse.shape
    offs = np.arange(-k, k + 1)
    out = np.empty(len(ys), np.float64)
    for start in range(0, len(ys), 50_000):
        sl = slice(start, start + 50_000)
        rows = np.clip(ys[sl, None] + offs, 0, h - 1) * w
        cols = np.clip(xs[sl, None] + offs, 0, w - 1)
        patches = coarse.ravel()[(rows[:, :, None] + cols[:, None, :]).reshape(len(rows), -1)]
        out[sl] = np.einsum("nk,k->n", patches, kernel)  # per row, without BLAS
    return out


def _window_extreme(
    extreme: np.ndarray, ys: np.ndarray, xs: np.ndarray, reach: int, half: int, op: Any
) -> np.ndarray:
    """The extreme (``op``: np.maximum / np.minimum) of a map over the (2·reach+1)² square
    around each ``(ys, xs)``, from ``extreme``, the map's extreme over (2·half+1)² squares
    (a grey dilation or erosion): a few gathers of it whose squares tile the larger one."""
    h, w = extreme.shape
    inner = max(reach - half, 0)
    offsets = np.arange(-inner, inner + 1, 2 * half + 1)
    if offsets[-1] != inner:
        offsets = np.append(offsets, inner)
    out = None
    for dy in offsets:
        rows = np.clip(ys + dy, 0, h - 1) * w
        for dx in offsets:
            values = extreme.ravel()[rows + np.clip(xs + dx, 0, w - 1)]
            out = values if out is None else op(out, values)
    return out.astype(np.float64)


def _dark_blobs(
    low: np.ndarray,
    local_min: np.ndarray,
    low_max: np.ndarray,
    cut: float,
    reach_c: int,
    half: int,
    max_elongation: float,
    y0: int,
    x0: int,
    ctx: Context,
) -> np.ndarray:
    """Dark blobs of one window (the null of the ``fdr`` unit): local minima of the response
    ``low`` (``local_min``, ``low_max``: its grey erosion and dilation over the maxima's
    square) below ``−cut`` that pass the same shape tests as bright ones (a blob, not a
    ridge, and not the ring of a brighter blob), as rows ``(x, y, depth)``, depth in local
    noise units."""
    f = ctx.factor
    dark = cv2.compare(low, np.float64(-cut), cv2.CMP_LT)
    cv2.bitwise_and(dark, cv2.compare(low, local_min, cv2.CMP_LE), dst=dark)
    points = cv2.findNonZero(dark)
    if points is None:
        return np.zeros((0, 3))
    points = points.reshape(-1, 2).astype(np.intp)
    xs, ys = points[:, 0], points[:, 1]
    _, _, blob = _peak_shape(low, ys, xs, max_elongation, sign=-1.0)
    depth = -low[ys, xs].astype(np.float64)
    highest = _window_extreme(low_max, ys, xs, reach_c, half, np.maximum)
    ok = blob & (depth > _DARK_RING * highest)
    x = (xs[ok] + 0.5) * f - 0.5 + x0
    y = (ys[ok] + 0.5) * f - 0.5 + y0
    depth = depth[ok] * ctx.noise / ctx.noise_at(x, y)
    return np.stack([x, y, depth], axis=1)


# Lowe's principal-curvature ratio above which a maximum is a ridge, not a blob (max_elongation)
_MAX_ELONGATION = 20.0

# a cell cut by the border must explain its profiles at least this much better than a straight
# line (a ramp or an edge running into the border) does: residual ratio
_BORDER_FIT = 0.7


def _border_cells(
    data: np.ndarray,
    y0: int,
    x0: int,
    x: np.ndarray,
    y: np.ndarray,
    scale: np.ndarray,
    edge: np.ndarray,
    ctx: Context,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check and place the maxima next to the true image border on the window's pixels.

    The filters mirror the image at its border, so a cell cut by the border is completed by its
    mirror image and found; but a ramp or an edge of tissue running into the border also gives
    a maximum on the outermost pixels, and a cell centred a little inside merges with its mirror
    image there. So, for a maximum within one cell radius of a border, the profile across the
    border (averaged over a few pixels along it) is fitted with a Gaussian of the cell's size
    (σ = radius / 1.3) at a free centre plus a constant: the centre places the cell. A maximum
    on the outermost (coarse) pixels (``edge``: left, right, top, bottom) is kept only if that
    fit puts the centre inside the image (a cell centred outside belongs to the abutting image)
    and explains the profile, and the profile along the border around it, at least
    ``_BORDER_FIT`` better than a straight line.

    Returns which maxima are kept, and their (re-placed) ``x``, ``y``.
    """
    keep = np.ones(len(x), bool)
    x, y = x.copy(), y.copy()
    sigma_t = ctx.radius_px * scale / 1.3  # a cell's profile, as a Gaussian
    radius = ctx.radius_px * scale
    for axis in (1, 0):  # x (left/right borders), then y (top/bottom) with the new x
        pos, along = (x, y) if axis == 1 else (y, x)
        size, start = (ctx.width, x0) if axis == 1 else (ctx.height, y0)
        new_pos = pos.copy()
        for side in (0, 1):
            if (side == 0 and start != 0) or (side == 1 and start + data.shape[axis] != size):
                continue  # this window does not reach that border
            dist = pos + 0.5 if side == 0 else size - 0.5 - pos
            on_edge = edge[2 * (1 - axis) + side]
            todo = np.flatnonzero((dist <= radius) | on_edge)
            if not len(todo):
                continue
            plane = data if axis == 1 else data.T
            if side == 1:
                plane = plane[:, ::-1]
            rows = along[todo] - (y0 if axis == 1 else x0)
            centre, good, fitted = _border_profile_fits(plane, rows, sigma_t[todo], radius[todo])
            for j, i in enumerate(todo):
                if not fitted[j]:
                    keep[i] &= not on_edge[i]
                    continue
                if on_edge[i]:
                    if not (good[j] and centre[j] >= -0.5):
                        keep[i] = False
                        continue
                    # the profile along the border must be a peak too (not an edge of tissue)
                    if not _peak_along_border(plane, rows[j], sigma_t[i], radius[i]):
                        keep[i] = False
                        continue
                if good[j]:
                    new_pos[i] = centre[j] if side == 0 else size - 1 - centre[j]
        pos[:] = new_pos
    return keep, x, y


def _border_profile_fits(
    plane: np.ndarray, rows: np.ndarray, sigma_t: np.ndarray, radius: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_profile_fit` (free centre) for many ``rows`` of one ``plane`` at once: the best
    centres, whether each fits, and whether each had pixels to fit."""
    n = len(rows)
    centre, good, fitted = np.zeros(n), np.zeros(n, bool), np.zeros(n, bool)
    height = plane.shape[0]
    for s, r in set(zip(sigma_t.tolist(), radius.tolist(), strict=True)):
        idx = np.flatnonzero((sigma_t == s) & (radius == r))
        half = max(1.0, s / 2)
        r0 = np.maximum(0, np.floor(rows[idx] - half).astype(np.int64))
        r1 = np.minimum(height, np.ceil(rows[idx] + half).astype(np.int64) + 1)
        c1 = min(plane.shape[1], int(np.ceil(r + 2.5 * s)))
        ok = (r1 > r0) & (c1 >= 4)
        if not ok.any():
            continue
        idx, r0, r1 = idx[ok], r0[ok], r1[ok]
        sums = np.zeros((height + 1, c1))
        np.cumsum(plane[:, :c1], axis=0, dtype=np.float64, out=sums[1:])
        profiles = (sums[r1] - sums[r0]) / (r1 - r0)[:, None]
        centres = np.arange(-1.5 * s, r + 1e-9, 0.05 * s)
        centre[idx], good[idx] = _gaussian_profile_fit(profiles, np.arange(c1), centres, s)
        fitted[idx] = True
    return centre, good, fitted


def _gaussian_profile_fit(
    profiles: np.ndarray, u: np.ndarray, centres: np.ndarray, sigma_t: float
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit of ``B + A·exp(−(u − c)²/2σ²)``, ``A > 0``, ``c`` over ``centres``, to
    each row of ``profiles`` (sampled at ``u``): the best centres, and whether each fit's
    residual is ``_BORDER_FIT`` times a straight line's or less."""
    u = np.asarray(u, np.float64)
    p = profiles - profiles.mean(axis=1, keepdims=True)
    pp = np.einsum("ij,ij->i", p, p)
    uc = u - u.mean()
    rss_line = pp - np.einsum("ij,j->i", p, uc) ** 2 / float(uc @ uc)
    g = np.exp(-0.5 * ((u[None, :] - centres[:, None]) / sigma_t) ** 2)
    g -= g.mean(axis=1, keepdims=True)
    gp, gg = np.einsum("ij,kj->ik", p, g), np.einsum("ij,ij->i", g, g)
    with np.errstate(divide="ignore", invalid="ignore"):
        amp = np.where(gg > 0, gp / gg, 0.0)
        rss = np.where(amp > 0, pp[:, None] - amp * gp, np.inf)
    best = np.argmin(rss, axis=1)
    rss_best = rss[np.arange(len(best)), best]
    good = np.isfinite(rss_best) & (rss_best <= _BORDER_FIT * rss_line)
    return centres[best], good


def _peak_along_border(plane: np.ndarray, along: float, sigma_t: float, radius: float) -> bool:
    """Whether the profile along the border of ``plane`` (rows: along the border; column 0:
    the outermost pixels), averaged over the outermost σ/2 pixels and covering ``along`` ±
    (radius + 2.5σ), fits ``B + A·exp(−(u − c)²/2σ²)``, ``A > 0``, with ``c`` within σ/2 of
    ``along``, ``_BORDER_FIT`` better than a straight line (False without pixels)."""
    depth = min(plane.shape[1], int(np.ceil(sigma_t / 2)) + 1)
    reach = int(np.ceil(radius + 2.5 * sigma_t))
    c0 = max(0, int(np.floor(along - reach)))
    c1 = min(plane.shape[0], int(np.ceil(along + reach)) + 1)
    if depth < 1 or c1 - c0 < 4:
        return False
    profile = np.asarray(plane[c0:c1, :depth], np.float64).mean(axis=1)
    centres = along + np.arange(-0.5, 0.5 + 1e-9, 0.05) * sigma_t
    _, good = _gaussian_profile_fit(profile[None, :], np.arange(c0, c1), centres, sigma_t)
    return bool(good[0])


def _grid_samples(
    response: np.ndarray, y0: int, x0: int, core: tuple[int, int, int, int], ctx: Context
) -> np.ndarray:
    """The response of a window at ``(y0, x0)`` on the coarse pixels ``(i, j)`` with
    ``i, j ≡ 0 (mod ctx.sample_step)`` (image-wide coarse indices) that lie in the window's
    ``core`` and in tissue, so every grid pixel is sampled once whatever the tiling."""
    f, step = ctx.factor, ctx.sample_step
    cy0, cx0 = y0 // f, x0 // f
    cy1, cx1 = cy0 + response.shape[0], cx0 + response.shape[1]
    core_y0, core_y1, core_x0, core_x1 = core
    # coarse rows whose first pixel lies in the core
    lo_y, hi_y = -(-core_y0 // f), -(-core_y1 // f)
    lo_x, hi_x = -(-core_x0 // f), -(-core_x1 // f)
    rows = np.arange(-(-max(lo_y, cy0) // step) * step, min(hi_y, cy1), step)
    cols = np.arange(-(-max(lo_x, cx0) // step) * step, min(hi_x, cx1), step)
    if len(rows) == 0 or len(cols) == 0:
        return np.zeros(0, np.float32)
    values = response[np.ix_(rows - cy0, cols - cx0)]
    yy, xx = np.meshgrid(rows * f, cols * f, indexing="ij")
    return values[ctx.in_tissue(xx, yy)].astype(np.float32)


def robust_spread(samples: np.ndarray) -> float:
    """1.4826 × the median absolute deviation (σ of Gaussian samples); 0 without samples."""
    if len(samples) == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(samples - np.median(samples))))


def peak_features(
    coarse: np.ndarray, ys: np.ndarray, xs: np.ndarray, ctx: Context
) -> tuple[np.ndarray, np.ndarray]:
    """Peak intensity (Gaussian σ/2 weighted) and mean intensity within one cell radius around
    coarse pixels ``(ys, xs)`` of the block-mean image (edge-extended)."""
    f = ctx.factor
    s = _coarse_sigma(max(ctx.sigma / 2, 0.5), f)
    radius_c = max(ctx.radius_px / f, 1.0)
    k = int(np.ceil(max(3 * s, radius_c)))
    offs = np.arange(-k, k + 1)
    gauss = np.exp(-0.5 * offs**2 / s**2)
    gauss2 = np.outer(gauss, gauss)
    gauss2 /= gauss2.sum()
    disk = (offs[:, None] ** 2 + offs[None, :] ** 2) <= radius_c**2
    weights = np.stack([gauss2.ravel(), disk.ravel() / disk.sum()]).astype(np.float32)
    # every (2k+1)² patch (edge-extended) in one gather through a sliding-window view, then
    # one product; the few patches that cross the edge are gathered with clipped indices
    h, w = coarse.shape
    patches = np.empty((len(ys), (2 * k + 1) ** 2), coarse.dtype)
    inner = (ys >= k) & (ys < h - k) & (xs >= k) & (xs < w - k)
    if inner.any():
        windows = np.lib.stride_tricks.sliding_window_view(coarse, (2 * k + 1, 2 * k + 1))
        patches[inner] = windows[ys[inner] - k, xs[inner] - k].reshape(int(inner.sum()), -1)
    if not inner.all():
        rows = np.clip(ys[~inner, None] + offs, 0, h - 1)
        cols = np.clip(xs[~inner, None] + offs, 0, w - 1)
        patches[~inner] = coarse[rows[:, :, None], cols[:, None, :]].reshape(len(rows), -1)
    # einsum, not BLAS: a threaded GEMM here would take the other core
    intensity, mean = np.einsum("nk,fk->fn", patches, weights)
    return intensity.astype(np.float64), mean.astype(np.float64)


def _peak_shape(
    response: np.ndarray, ys: np.ndarray, xs: np.ndarray, ratio: float, sign: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-pixel offsets of the maxima ``(ys, xs)`` of ``response`` (a parabola through each
    and its two neighbours per axis), and whether each is a blob rather than a ridge: both
    principal curvatures negative and their ratio below ``ratio`` (Lowe's edge test on the
    Hessian's trace and determinant, ``tr² / det < (r + 1)² / r``; 0: every maximum is). Ridges
    are what the LoG makes of tissue edges, neurites and vessels."""
    h, w = response.shape
    flat = response.ravel() if sign > 0 else _Negated(response.ravel())
    at = ys * w + xs
    step_x, step_y = (xs < w - 1).astype(np.intp), w * (ys < h - 1)
    back_x, back_y = (xs > 0).astype(np.intp), w * (ys > 0)
    c = flat[at]
    left, right, up, down = (
        flat[at - back_x],
        flat[at + step_x],
        flat[at - back_y],
        flat[at + step_y],
    )
    dxx, dyy = left + right - 2 * c, up + down - 2 * c
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = np.clip(np.where(dxx < 0, 0.5 * (left - right) / dxx, 0.0), -0.5, 0.5)
        dy = np.clip(np.where(dyy < 0, 0.5 * (up - down) / dyy, 0.0), -0.5, 0.5)
    if not ratio:
        return dx, dy, np.ones(len(at), bool)
    dxy = (
        flat[at - back_y + step_x]
        - flat[at - back_y - back_x]
        - flat[at + step_y + step_x]
        + flat[at + step_y - back_x]
    ) / 4
    tr, det = dxx + dyy, dxx * dyy - dxy * dxy
    return dx, dy, (tr < 0) & (det > 0) & (tr * tr * ratio < (ratio + 1) ** 2 * det)


class _Negated:
    """``-array[index]`` without negating the whole array (dark blobs' shape test)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __getitem__(self, index: Any) -> np.ndarray:
        return -self.array[index]
