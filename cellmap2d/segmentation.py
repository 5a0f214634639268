"""Cell detection on fluorescence sections.

All parameters are physical (µm), so one setting works at any pyramid level.
"""

from __future__ import annotations

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
    maximum of the response at least ``threshold`` robust noise units (MAD of the response)
    above zero. Background is a wide median-free Gaussian estimate (``background_um``, default
    10 cell diameters); ``contrast`` is (peak − background) in noise units of the image.

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
    response = -ndi.gaussian_laplace(data, sigma) * sigma**2
    noise = _mad(response)
    if noise == 0:
        return empty
    size = max(3, int(2 * np.floor(radius_px) + 1))
    peaks = (response == ndi.maximum_filter(response, size=size)) & (response > threshold * noise)
    ys, xs = np.nonzero(peaks)
    if len(xs) == 0:
        return empty
    dx, dy = _subpixel(response, ys, xs)
    bg_sigma = (background_um or 10 * cell_diameter_um) / pixel_size_um
    background = ndi.gaussian_filter(data, bg_sigma)[ys, xs]
    smooth = ndi.gaussian_filter(data, sigma / 2)
    image_noise = _mad(data - ndi.gaussian_filter(data, sigma))
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
