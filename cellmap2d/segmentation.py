"""Cell detection on fluorescence sections.

All parameters are physical (µm), so one setting works at any pyramid level.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

__all__ = ["DETECTION_COLUMNS", "detect_cells"]

DETECTION_COLUMNS = ("x", "y", "intensity", "background", "contrast", "radius_um")


def detect_cells(
    image: np.ndarray,
    *,
    pixel_size_um: float,
    cell_diameter_um: float,
    method: str = "log",
    threshold: float = 6.0,
    background_um: float | None = None,
) -> pd.DataFrame:
    """Detect labeled cells as bright blobs of about ``cell_diameter_um``.

    ``log``: scale-normalised Laplacian of Gaussian at the cell size; a detection is a local
    maximum of the response at least ``threshold`` noise units above zero. The noise is that of
    the image, estimated robustly (MAD) from a pixel-scale residual that cells and smooth
    tissue barely touch, and carried into response units by the ratio of the kernels' L2 norms
    (exact for white noise), so dense fields of cells do not raise the threshold. Background
    is a wide median-free Gaussian estimate (``background_um``, default 10 cell diameters);
    ``contrast`` is (peak − background) in noise units of the image. Maxima on the image's
    outermost pixels are not reported (one-sided, and noisier there).

    Parameters
    ----------
    image
        2-D section, any real dtype.
    pixel_size_um
        Pixel size of ``image``.
    cell_diameter_um
        Expected cell diameter.
    method
        ``"log"``.
    threshold
        Detection threshold in noise units.

    Returns
    -------
    pandas.DataFrame
        One row per cell: ``x``, ``y`` (sub-pixel, column/row of ``image``), ``intensity``
        (peak), ``background``, ``contrast``, ``radius_um``.
    """
    if method != "log":
        raise ValueError(f"unknown detection method {method!r}; available: 'log'")
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"detect_cells takes a 2-D image, not shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise TypeError(f"image dtype {image.dtype} is not numeric")
    if pixel_size_um <= 0 or cell_diameter_um <= 0:
        raise ValueError("pixel_size_um and cell_diameter_um must be positive")
    data = image.astype(np.float32)
    if not np.isfinite(data).all():
        raise ValueError("image contains NaN or infinite values; fill or mask them first")
    empty = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in DETECTION_COLUMNS})
    if data.size == 0 or float(data.max()) == float(data.min()):
        return empty
    radius_px = cell_diameter_um / 2 / pixel_size_um
    sigma = max(radius_px / np.sqrt(2), 0.5)
    response = _log_response(data, sigma)
    image_noise = _pixel_noise(data)
    if image_noise == 0:
        return empty
    noise = image_noise * _log_kernel(sigma)[1]
    size = max(3, int(2 * np.floor(radius_px) + 1))
    peaks = (response == ndi.maximum_filter(response, size=size)) & (response > threshold * noise)
    # the outermost pixels see half a neighbourhood: a maximum there is one-sided (a blob cut
    # by the edge, or a ramp towards it) and the reflected border inflates the response noise
    # (×1.2 along edges, ×1.6 in corners), so the threshold does not hold there
    peaks[[0, -1], :] = False
    peaks[:, [0, -1]] = False
    ys, xs = np.nonzero(peaks)
    if len(xs) == 0:
        return empty
    dx, dy = _subpixel(response, ys, xs)
    bg_sigma = (background_um or 10 * cell_diameter_um) / pixel_size_um
    background = ndi.gaussian_filter(data, bg_sigma)[ys, xs]
    smooth = ndi.gaussian_filter(data, sigma / 2)
    intensity = smooth[ys, xs]
    return pd.DataFrame(
        {
            "x": xs + dx,
            "y": ys + dy,
            "intensity": intensity.astype(np.float64),
            "background": background.astype(np.float64),
            "contrast": ((intensity - background) / max(image_noise, 1e-6)).astype(np.float64),
            "radius_um": np.full(len(xs), cell_diameter_um / 2),
        }
    )


# Immerkær's noise-estimation kernel: the product of second differences along x and y. It
# cancels planes, axis-aligned edges and anything smooth, so on a section it sees the pixel
# noise and only the sharpest detail (few pixels, which the MAD ignores).
_RESIDUAL_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], np.float32)


def _impulse_response(filter_: Callable[[np.ndarray], np.ndarray], reach: int) -> np.ndarray:
    """The kernel of a linear filter: its response to a unit impulse.

    ``reach`` bounds the kernel's half-width; the impulse sits in a zero field wide enough that
    no part of the kernel meets the border. For white noise of σ, the filtered noise has
    standard deviation σ × the kernel's L2 norm.
    """
    size = 2 * reach + 3
    impulse = np.zeros((size, size), dtype=np.float64)
    impulse[reach + 1, reach + 1] = 1.0
    return filter_(impulse)


def _residual(data: np.ndarray, mode: str = "reflect") -> np.ndarray:
    return ndi.convolve(data, _RESIDUAL_KERNEL, mode=mode)


def _log_response(data: np.ndarray, sigma: float, mode: str = "reflect") -> np.ndarray:
    """Scale-normalised LoG (bright blobs positive), its kernel made to sum to zero.

    scipy's sampled, truncated (4 σ) LoG kernel does not sum to 0 (≈ 10⁻³ for cells a few
    pixels across, 0.28 at σ = 0.5 px), so a flat background of level b would add that times b
    to the response: with a high offset and low noise that is many noise units, and every
    noise maximum would pass the threshold. Subtracting the sum times the Gaussian-smoothed
    image removes the leak.
    """
    return _zero_sum_log(data, sigma, _log_kernel(sigma)[0], mode)


def _zero_sum_log(data: np.ndarray, sigma: float, leak: float, mode: str) -> np.ndarray:
    response = -ndi.gaussian_laplace(data, sigma, mode=mode) * sigma**2
    response -= leak * ndi.gaussian_filter(data, sigma, mode=mode)
    return response


@lru_cache(maxsize=64)
def _log_kernel(sigma: float) -> tuple[float, float]:
    """Sum of the σ²-scaled LoG kernel, and the L2 norm of the zero-sum kernel of
    :func:`_log_response` (image noise σ → response noise σ, for white noise)."""
    reach = int(4.0 * sigma + 0.5)  # scipy truncates its Gaussians at 4 σ
    log = _impulse_response(
        lambda a: -ndi.gaussian_laplace(a, sigma, mode="constant") * sigma**2, reach
    )
    leak = float(log.sum())
    zero_sum = _impulse_response(lambda a: _zero_sum_log(a, sigma, leak, "constant"), reach)
    return leak, float(np.sqrt(np.sum(zero_sum**2)))


@lru_cache(maxsize=1)
def _residual_norm() -> float:
    kernel = _impulse_response(lambda a: _residual(a, mode="constant"), 1)
    return float(np.sqrt(np.sum(kernel**2)))


def _pixel_noise(data: np.ndarray) -> float:
    """Standard deviation of the image's pixel noise, robust to cells and tissue structure.

    MAD of the pixel-scale residual divided by the residual kernel's norm. If more than half
    the residual is exactly zero (noise-free or heavily quantised background) the MAD is 0, and
    the mean absolute residual (Gaussian-equivalent) stands in; 0 only for a flat image.
    """
    residual = _residual(data)
    noise = _mad(residual)
    if noise == 0:
        sample = residual.ravel()[:: max(1, residual.size // 1_000_000)]
        noise = float(np.sqrt(np.pi / 2) * np.mean(np.abs(sample - np.median(sample))))
    return noise / _residual_norm()


def _mad(values: np.ndarray) -> float:
    sample = values.ravel()[:: max(1, values.size // 1_000_000)]
    return float(1.4826 * np.median(np.abs(sample - np.median(sample))))


def _subpixel(response: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Peak offsets from a parabola through each peak and its two neighbours per axis."""
    padded = np.pad(response, 1, mode="edge")
    y, x = ys + 1, xs + 1
    c = padded[y, x]
    offsets = []
    for lo, hi in ((padded[y, x - 1], padded[y, x + 1]), (padded[y - 1, x], padded[y + 1, x])):
        denom = lo - 2 * c + hi
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(denom < 0, 0.5 * (lo - hi) / denom, 0.0)
        offsets.append(np.clip(off, -0.5, 0.5))
    return offsets[0], offsets[1]
