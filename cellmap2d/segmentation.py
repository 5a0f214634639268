"""Cell detection on fluorescence sections.

All parameters are physical (µm), so one setting works at any pyramid level. Every method runs
window by window (:func:`detect_cells_tiled`); :func:`detect_cells` is the one-window case, and
the image-wide statistics (pixel noise, background, tissue mask, global threshold) are computed
on a grid fixed in image coordinates, so tiled and untiled detection give the same cells.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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
_NOISE_SAMPLE = 1_000_000


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
    otsu: float  # global threshold of the sampled pixels
    options: dict[str, Any]

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

    ``log`` (default): scale-normalised Laplacian of Gaussian at the cell size (separable
    float32 Gaussian derivatives, on a block-mean image when cells span many pixels so the LoG
    scale there stays ≥ 2 px); a detection is a local maximum of the response at least
    ``threshold`` noise units above zero. The noise is that of the image, estimated robustly
    (MAD) from a pixel-scale residual that cells and smooth tissue barely touch, and carried into
    response units by the kernel's L2 norm (exact for white noise), so dense fields of cells do
    not raise the threshold. Background is a Gaussian (``background_um``, default 10 cell
    diameters) of block means; blocks of constant value (zero padding, missing data) are not
    tissue and give no cells. Maxima on the image's outermost pixels are not reported.

    ``watershed``: foreground = above the global Otsu threshold of the image and ``threshold``
    noise units above the local background; markers = distance-transform peaks at least 0.6 cell
    radii apart; watershed within the foreground; objects kept when their area is within
    ``area_range`` (× the expected cell area) and ``circularity`` ≥ ``min_circularity``.

    ``trained``: LoG candidates at a low threshold, kept by a scikit-learn classifier over their
    multi-scale features (``model=`` a :class:`cellmap2d._detectors.DetectorModel` or the path of
    one saved by ``cellmap2d train-detector``).

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
        ``threshold`` (noise units, default 6 for ``log``/``trained`` candidates, 3 for
        ``watershed``), ``background_um``, ``noise`` (pixel noise, to skip the estimate),
        ``area_range``, ``min_circularity``, ``model``.

    Returns
    -------
    pandas.DataFrame
        One row per cell: ``x``, ``y`` (sub-pixel, column/row of ``image``), ``intensity``
        (peak, smoothed at σ/2), ``mean_intensity`` (within one cell radius), ``background``,
        ``contrast`` ((peak − background) / pixel noise), ``radius_um``; ``watershed`` adds
        ``area_um2`` and ``circularity``, ``trained`` adds ``probability``.

    Raises
    ------
    ValueError
        NaN/inf values, a saturated section (> 50 % of pixels at the dtype maximum), a non 2-D
        image, non-positive sizes or an unknown method.
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
    tile: int = 2048,
    overlap: int | None = None,
    workers: int = 1,
    **kw: Any,
) -> pd.DataFrame:
    """:func:`detect_cells` window by window, reading ``array`` lazily.

    Two passes over ``tile``² windows: the first samples the pixel noise (on rows fixed in image
    coordinates), the block means for the background and tissue mask, and the pixels for the
    global threshold; the second detects in each window grown by ``overlap`` pixels (default:
    enough for the filters and one cell) and keeps the cells whose position lies in the window's
    core, so each cell is reported once and as the whole image would report it. Peak memory is
    a few window-sized float32 arrays per worker, whatever the image size.

    Parameters
    ----------
    array
        2-D array-like with ``shape``, ``dtype`` and slicing: numpy, zarr (e.g.
        ``arrays[level][channel, z]``), dask.
    tile, overlap
        Window core size and margin, level pixels (rounded up to the block-mean factor).
    workers
        Threads (scipy.ndimage and zarr release the GIL).
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
    height, width = (int(s) for s in array.shape)
    columns = _columns(method)
    empty = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in columns})
    if height == 0 or width == 0:
        return empty

    radius_px = cell_diameter_um / 2 / pixel_size_um
    sigma = max(radius_px / math.sqrt(2), 0.5)
    factor = max(1, int(sigma // kw.get("min_sigma_px", 1.5)))
    bg_sigma = kw.get("background_um") or 10 * cell_diameter_um
    bg_sigma /= pixel_size_um
    block = factor * max(1, round(bg_sigma / 4 / factor))
    step = block * max(1, -(-int(tile) // block))
    margin = 1  # the residual needs one neighbour each side

    # pass 1: noise sample, block statistics, value sample
    stride = max(1, -(-height * width // _NOISE_SAMPLE))
    cores = list(_cores(height, width, step))

    def stats(core: tuple[int, int, int, int]) -> tuple[np.ndarray, ...]:
        y0, y1, x0, x1 = core
        wy0, wy1, wx0, wx1 = (
            max(0, y0 - margin),
            min(height, y1 + margin),
            max(0, x0 - margin),
            min(width, x1 + margin),
        )
        data = _read(array, wy0, wy1, wx0, wx1, raw=True)
        inner = data[y0 - wy0 : y0 - wy0 + (y1 - y0), x0 - wx0 : x0 - wx0 + (x1 - x0)]
        return (
            _residual_sample(data, wy0, wx0, height, width, stride),
            _value_sample(inner, y0, stride),
            *_block_stats(inner, block),
            np.int64(_saturated(inner, dtype)),
        )

    results = _map(stats, cores, workers)
    residuals = np.concatenate([r[0] for r in results])
    values = np.concatenate([r[1] for r in results])
    n_blocks = (-(-height // block), -(-width // block))
    means = np.zeros(n_blocks, np.float64)
    tissue = np.zeros(n_blocks, bool)
    lo = np.inf
    for (y0, _, x0, _), r in zip(cores, results, strict=True):
        by, bx = y0 // block, x0 // block
        means[by : by + r[2].shape[0], bx : bx + r[2].shape[1]] = r[2]
        tissue[by : by + r[2].shape[0], bx : bx + r[2].shape[1]] = r[3]
        lo = min(lo, float(r[4]))
    saturated = sum(int(r[5]) for r in results)
    if saturated > 0.5 * height * width:
        raise ValueError(
            f"section is saturated: {saturated / (height * width):.0%} of pixels at the "
            f"{dtype} maximum {np.iinfo(dtype).max}"
        )
    if not tissue.any():
        return empty  # constant (e.g. all-zero) section
    noise = kw.get("noise")
    if noise is None:
        noise = _noise_from_residuals(residuals)
    if noise <= 0:
        return empty
    background = ndi.gaussian_filter(means, bg_sigma / block, mode="nearest")
    otsu = _otsu(values) if len(values) else 0.0
    default_threshold = 3.0 if method == "watershed" else 6.0
    options = {
        k: v
        for k, v in kw.items()
        if k not in ("background_um", "noise", "threshold", "min_sigma_px")
    }
    if method == "trained":
        from ._detectors import load_model

        options["model"] = load_model(options.get("model"))
    ctx = Context(
        height=height,
        width=width,
        pixel_size_um=float(pixel_size_um),
        cell_diameter_um=float(cell_diameter_um),
        radius_px=radius_px,
        sigma=sigma,
        factor=factor,
        block=block,
        threshold=float(kw.get("threshold", default_threshold)),
        noise=float(noise),
        background=background,
        tissue=tissue,
        otsu=otsu,
        options=options,
    )
    if overlap is None:
        reach = int(4 * _coarse_sigma(sigma, factor) * 2 + 0.5) * factor  # up to 2 σ for features
        overlap = max(reach, int(3 * radius_px)) + 2 * factor + 2
    overlap = factor * -(-int(overlap) // factor)
    detector = _detector(method)

    def detect(core: tuple[int, int, int, int]) -> pd.DataFrame | None:
        y0, y1, x0, x1 = core
        if not tissue[y0 // block : -(-y1 // block), x0 // block : -(-x1 // block)].any():
            return None
        wy0, wy1 = max(0, y0 - overlap), min(height, y1 + overlap)
        wx0, wx1 = max(0, x0 - overlap), min(width, x1 + overlap)
        data = _read(array, wy0, wy1, wx0, wx1)
        cells = detector(data, wy0, wx0, ctx)
        if cells is None or len(cells) == 0:
            return None
        keep = (cells["y"] >= y0 - 0.5) & (cells["y"] < y1 - 0.5)
        keep &= (cells["x"] >= x0 - 0.5) & (cells["x"] < x1 - 0.5)
        keep &= ctx.in_tissue(cells["x"].to_numpy(), cells["y"].to_numpy())
        return cells[keep.to_numpy()]

    frames = [f for f in _map(detect, cores, workers) if f is not None and len(f)]
    if not frames:
        return empty
    cells = pd.concat(frames, ignore_index=True)
    cells = cells.sort_values(["y", "x"], kind="stable").reset_index(drop=True)
    return cells[list(columns)]


def _columns(method: str) -> tuple[str, ...]:
    if method == "watershed":
        return (*DETECTION_COLUMNS, "area_um2", "circularity")
    if method == "trained":
        return (*DETECTION_COLUMNS, "probability")
    if method == "_candidates":
        from ._detectors import FEATURES

        return (*DETECTION_COLUMNS, *(f for f in FEATURES if f not in DETECTION_COLUMNS))
    return DETECTION_COLUMNS


def _detector(method: str) -> Callable[[np.ndarray, int, int, Context], pd.DataFrame | None]:
    if method == "log":
        return lambda data, y0, x0, ctx: log_window(data, y0, x0, ctx)[0]
    from . import _detectors

    if method == "_candidates":
        return _detectors.candidates_window
    return _detectors.watershed_window if method == "watershed" else _detectors.trained_window


def _cores(height: int, width: int, step: int) -> Iterator[tuple[int, int, int, int]]:
    for y0 in range(0, height, step):
        for x0 in range(0, width, step):
            yield y0, min(height, y0 + step), x0, min(width, x0 + step)


def _map(func: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    if workers <= 1 or len(items) <= 1:
        return [func(i) for i in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(func, items))


def _read(array: Any, y0: int, y1: int, x0: int, x1: int, *, raw: bool = False) -> np.ndarray:
    data = np.asarray(array[y0:y1, x0:x1])
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise ValueError("image contains NaN or infinite values; fill or mask them first")
    return data if raw else data.astype(np.float32, copy=False)


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
) -> np.ndarray:
    """The residual on image rows ``r ≡ 1 (mod stride)``, interior pixels only, of a window
    at ``(y0, x0)`` that holds each such row's neighbours."""
    rows = np.arange(max(1, y0 + 1), min(height - 1, y0 + data.shape[0] - 1))
    rows = rows[(rows - 1) % stride == 0] - y0
    if len(rows) == 0 or data.shape[1] < 3:
        return np.zeros(0, np.float32)
    above, here, below = (data[r].astype(np.float32) for r in (rows - 1, rows, rows + 1))
    d = above - 2 * here + below
    res = d[:, :-2] - 2 * d[:, 1:-1] + d[:, 2:]  # centred on columns 1 … n-2 of the window
    cols = np.arange(1, data.shape[1] - 1) + x0
    ok = (cols >= 1) & (cols <= width - 2)
    return res[:, ok].ravel()


def _value_sample(inner: np.ndarray, y0: int, stride: int) -> np.ndarray:
    rows = np.arange(y0, y0 + inner.shape[0])
    return inner[(rows - 1) % stride == 0].ravel()[::4].astype(np.float32)


def _block_stats(inner: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Block means, whether each block is non-constant, and the minimum of ``inner``."""
    h, w = inner.shape
    ph, pw = -h % block, -w % block
    padded = np.pad(inner, ((0, ph), (0, pw)), mode="edge") if ph or pw else inner
    hb, wb = padded.shape[0] // block, padded.shape[1] // block
    rows = padded.reshape(hb, block, padded.shape[1])
    means = rows.sum(axis=1, dtype=np.float32).reshape(hb, wb, block).sum(axis=2) / block**2
    top = rows.max(axis=1).reshape(hb, wb, block).max(axis=2)
    bottom = rows.min(axis=1).reshape(hb, wb, block).min(axis=2)
    return means, top > bottom, float(bottom.min())


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


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.min() == values.max():
        return float(values.min())
    return float(threshold_otsu(values))


def _coarse_sigma(sigma: float, factor: int) -> float:
    """LoG scale on the ``factor`` block-mean image whose effective scale is ``sigma``: a box of
    ``factor`` pixels adds (factor² − 1)/12 to the variance."""
    if factor == 1:
        return sigma
    return math.sqrt(max(sigma**2 - (factor**2 - 1) / 12, 0.25)) / factor


def block_mean(data: np.ndarray, factor: int) -> np.ndarray:
    """``factor``² block means (edge-padded to a multiple of ``factor``)."""
    if factor == 1:
        return data
    h, w = data.shape
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        data = np.pad(data, ((0, ph), (0, pw)), mode="edge")
    hb, wb = data.shape[0] // factor, data.shape[1] // factor
    rows = data[0::factor].copy()
    for i in range(1, factor):
        rows += data[i::factor]
    out = rows.reshape(hb, wb, factor).sum(axis=2)
    out *= np.float32(1 / factor**2)
    return out


@lru_cache(maxsize=64)
def _log_kernels(sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Separable parts of the zero-sum, σ²-scaled LoG (bright blobs positive) and its L2 norm.

    response = (g0 along y, then ``a`` along x) + (g2 along y, then ``b`` along x), with
    ``a = −σ² g2 − leak g0`` and ``b = −σ² g0``. The sampled, truncated (4 σ) kernel does not
    sum to 0 (≈ 10⁻³ for cells a few pixels across, 0.28 at σ = 0.5 px), so a flat background of
    level b would add that times b to the response; ``leak`` removes it.
    """
    reach = int(4.0 * sigma + 0.5)
    x = np.arange(-reach, reach + 1, dtype=np.float64)
    g0 = np.exp(-0.5 * x**2 / sigma**2)
    g0 /= g0.sum()
    g2 = g0 * (x**2 / sigma**4 - 1 / sigma**2)
    leak = -2 * sigma**2 * g2.sum()
    a = -(sigma**2) * g2 - leak * g0
    b = -(sigma**2) * g0
    kernel = np.outer(g0, a) + np.outer(g2, b)
    norm = float(np.sqrt(np.sum(kernel**2)))
    f32 = np.float32
    return g0.astype(f32), g2.astype(f32), a.astype(f32), b.astype(f32), norm


def log_response(data: np.ndarray, sigma: float) -> tuple[np.ndarray, float]:
    """Zero-sum scale-normalised LoG of ``data`` (float32) and its kernel's L2 norm."""
    g0, g2, a, b, norm = _log_kernels(float(sigma))
    smooth_y = ndi.correlate1d(data, g0, axis=0, mode="reflect")
    out = ndi.correlate1d(smooth_y, a, axis=1, mode="reflect")
    ndi.correlate1d(data, g2, axis=0, output=smooth_y, mode="reflect")
    out += ndi.correlate1d(smooth_y, b, axis=1, mode="reflect")
    return out, norm


def log_window(
    data: np.ndarray, y0: int, x0: int, ctx: Context, *, threshold: float | None = None
) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """LoG detections of one window at image offset ``(y0, x0)`` (``y0``, ``x0`` multiples of
    ``ctx.factor``), in image coordinates, and the window's filtered images for reuse."""
    f = ctx.factor
    coarse = block_mean(data, f)
    sigma_c = _coarse_sigma(ctx.sigma, f)
    response, norm = log_response(coarse, sigma_c)
    extra = {"coarse": coarse, "response": response, "sigma_c": sigma_c}
    noise_c = ctx.noise / f * norm
    thr = ctx.threshold if threshold is None else threshold
    radius_c = ctx.radius_px / f
    size = max(3, int(2 * np.floor(radius_c) + 1))
    above = response > thr * noise_c
    if not above.any():
        return None, extra
    peaks = above & (response == ndi.maximum_filter(response, size=size, mode="reflect"))
    # the image's outermost (coarse) pixels see half a neighbourhood: a maximum there is
    # one-sided (a blob cut by the edge, or a ramp towards it), so it is not reported
    gh, gw = -(-ctx.height // f), -(-ctx.width // f)
    cy0, cx0 = y0 // f, x0 // f
    if cy0 == 0:
        peaks[0, :] = False
    if cx0 == 0:
        peaks[:, 0] = False
    if cy0 + peaks.shape[0] == gh:
        peaks[-1, :] = False
    if cx0 + peaks.shape[1] == gw:
        peaks[:, -1] = False
    ys, xs = np.nonzero(peaks)
    if len(xs) == 0:
        return None, extra
    dx, dy = _subpixel(response, ys, xs)
    x = (xs + dx + 0.5) * f - 0.5
    y = (ys + dy + 0.5) * f - 0.5
    cells = peak_features(data, x, y, ctx)
    cells.insert(0, "y", y + y0)
    cells.insert(0, "x", x + x0)
    cells["background"] = ctx.background_at(cells["x"].to_numpy(), cells["y"].to_numpy())
    cells["contrast"] = (cells["intensity"] - cells["background"]) / max(ctx.noise, 1e-6)
    cells["radius_um"] = ctx.cell_diameter_um / 2
    cells["response"] = response[ys, xs] / noise_c
    extra["peaks"] = (ys, xs)
    return cells[[*DETECTION_COLUMNS, "response"]], extra


def peak_features(data: np.ndarray, x: np.ndarray, y: np.ndarray, ctx: Context) -> pd.DataFrame:
    """Peak intensity (Gaussian σ/2 weighted) and mean intensity within one cell radius around
    window positions ``(x, y)``, from small windows of ``data`` (edge-extended)."""
    s = max(ctx.sigma / 2, 0.5)
    k = max(int(4 * s + 0.5), int(np.ceil(ctx.radius_px)))
    yi = np.clip(np.round(y).astype(int), 0, data.shape[0] - 1)
    xi = np.clip(np.round(x).astype(int), 0, data.shape[1] - 1)
    offs = np.arange(-k, k + 1)
    rows = np.clip(yi[:, None, None] + offs[None, :, None], 0, data.shape[0] - 1)
    cols = np.clip(xi[:, None, None] + offs[None, None, :], 0, data.shape[1] - 1)
    patches = data[rows, cols]
    gauss = np.exp(-0.5 * offs**2 / s**2)
    gauss2 = np.outer(gauss, gauss)
    gauss2 /= gauss2.sum()
    disk = (offs[:, None] ** 2 + offs[None, :] ** 2) <= max(ctx.radius_px, 1.0) ** 2
    intensity = np.einsum("nij,ij->n", patches, gauss2.astype(np.float32))
    mean = patches[:, disk].mean(axis=1)
    return pd.DataFrame(
        {"intensity": intensity.astype(np.float64), "mean_intensity": mean.astype(np.float64)}
    )


def _subpixel(response: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Peak offsets from a parabola through each peak and its two neighbours per axis."""
    h, w = response.shape
    c = response[ys, xs]
    offsets = []
    for lo, hi in (
        (response[ys, np.maximum(xs - 1, 0)], response[ys, np.minimum(xs + 1, w - 1)]),
        (response[np.maximum(ys - 1, 0), xs], response[np.minimum(ys + 1, h - 1), xs]),
    ):
        denom = lo - 2 * c + hi
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(denom < 0, 0.5 * (lo - hi) / denom, 0.0)
        offsets.append(np.clip(off, -0.5, 0.5))
    return offsets[0], offsets[1]
