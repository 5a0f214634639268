"""The per-type work behind :mod:`cellmap2d.density`: histogram, Gaussian, tail cut, HDF5 chunks.

Everything here runs on one type's bounding box (its cells' voxels grown by the kernel radius),
and is picklable so a process pool can run one type per task.

The Gaussian is the one of :func:`scipy.ndimage.gaussian_filter` (same kernel weights, truncation
and ``"reflect"`` boundary), applied per axis as a product with a banded matrix, block by block,
so that BLAS does the arithmetic. Chunks are encoded here as HDF5 stores them (Blosc: byte
shuffle + LZ4), so workers compress and the writer only stores bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import hdf5plugin
import numpy as np
from numcodecs import Blosc

TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter default
_BLOCK = 32  # output rows per matrix product; its input spans _BLOCK + 2·radius rows
_DENSE_SHARE = 0.5  # above this share of AP columns with mass, smooth all (no gather/scatter)
_BLOSC_LEVEL = 5
_BLOSC = Blosc(cname="lz4", clevel=_BLOSC_LEVEL, shuffle=Blosc.SHUFFLE)
CHUNK_FILTERS: dict[str, Any] = dict(
    hdf5plugin.Blosc(cname="lz4", clevel=_BLOSC_LEVEL, shuffle=hdf5plugin.Blosc.SHUFFLE)
)
"""h5py ``create_dataset`` keywords of the chunk encoding: Blosc (byte shuffle + LZ4)."""


def kernel_radius(sigma_vox: float) -> int:
    """Half-width of the truncated kernel, as in ``scipy.ndimage.gaussian_filter1d``."""
    return int(TRUNCATE * sigma_vox + 0.5)


def gaussian_weights(sigma_vox: float) -> np.ndarray:
    """Normalised weights of the truncated 1-D Gaussian of ``scipy.ndimage.gaussian_filter1d``."""
    radius = kernel_radius(sigma_vox)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 / sigma_vox**2 * offsets**2)
    return weights / weights.sum()


@functools.lru_cache(maxsize=32)
def _reflect_band(length: int, sigma_vox: float) -> np.ndarray:
    """(length, length) float32 ``M``: ``M @ x`` is ``gaussian_filter1d(x, mode="reflect")``."""
    weights = gaussian_weights(sigma_vox)
    radius = (weights.size - 1) // 2
    offsets = np.arange(-radius, radius + 1)
    rows = np.repeat(np.arange(length), offsets.size)
    cols = (rows.reshape(length, -1) + offsets).ravel() % (2 * length)
    cols = np.where(cols >= length, 2 * length - 1 - cols, cols)  # "reflect": d c b a | a b c d
    band = np.zeros((length, length), dtype=np.float64)
    np.add.at(band, (rows, cols), np.tile(weights, length))
    band.setflags(write=False)
    return band.astype(np.float32)


def gaussian_box(volume: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Separable Gaussian of a 3D array (``"reflect"`` edges), float32.

    Equal to ``scipy.ndimage.gaussian_filter(volume, sigma_vox, mode="reflect", truncate=4)`` up
    to float32 rounding (products are summed in float32 by BLAS instead of float64). The axes go
    last to first; lines (or AP slabs) without mass are skipped while they are many.
    """
    out = np.ascontiguousarray(volume, dtype=np.float32)
    return _gaussian_ap(_gaussian_dv(_gaussian_ml(out, sigma_vox), sigma_vox), sigma_vox)


def _gaussian_ml(src: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Along the last axis, on the rows holding mass."""
    rows_in = src.reshape(-1, src.shape[2])
    active = rows_in.any(axis=1)
    out = np.zeros(src.shape, dtype=np.float32)
    out.reshape(rows_in.shape)[active] = _band_product(
        rows_in[active], sigma_vox, lines_first=False
    )
    return out


def _gaussian_dv(src: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Along the middle axis, one AP slab (a contiguous (DV, ML) matrix) at a time, on the runs
    of slabs holding mass."""
    active = src.any(axis=(1, 2))
    edges = np.flatnonzero(np.diff(np.concatenate([[False], active, [False]]).astype(np.int8)))
    out = np.zeros(src.shape, dtype=np.float32)
    for first, stop in edges.reshape(-1, 2):
        _band_product(src[first:stop], sigma_vox, lines_first=True, out=out[first:stop], axis=1)
    return out


def _gaussian_ap(src: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Along the first axis, on all columns, or on those holding mass while they are few."""
    length = src.shape[0]
    columns_in = src.reshape(length, -1)
    active = columns_in.any(axis=0)
    if active.mean() > _DENSE_SHARE:
        out = np.empty(src.shape, dtype=np.float32)
        _band_product(columns_in, sigma_vox, lines_first=True, out=out.reshape(length, -1))
        return out
    out = np.zeros(src.shape, dtype=np.float32)
    out.reshape(length, -1)[:, active] = _band_product(
        columns_in[:, active], sigma_vox, lines_first=True
    )
    return out


def _band_product(
    lines: np.ndarray,
    sigma_vox: float,
    *,
    lines_first: bool,
    out: np.ndarray | None = None,
    axis: int | None = None,
) -> np.ndarray:
    """Lines times the Gaussian band matrix, block by block so the zeros outside the band are
    skipped. The lines run along ``axis`` (default: 0 when ``lines_first``, else the last)."""
    if axis is None:
        axis = 0 if lines_first else lines.ndim - 1
    length = lines.shape[axis]
    radius = kernel_radius(sigma_vox)
    band = _reflect_band(length, sigma_vox)
    if out is None:
        out = np.empty(lines.shape, dtype=np.float32)
    for start in range(0, length, _BLOCK):
        stop = min(length, start + _BLOCK)
        lo, hi = max(0, start - radius), min(length, stop + radius)
        weights = band[start:stop, lo:hi]
        if not lines_first:
            np.matmul(lines[..., lo:hi], weights.T, out=out[..., start:stop])
        elif axis == 0:
            np.matmul(weights, lines[lo:hi], out=out[start:stop])
        else:  # a stack of matrices with their lines along axis 1
            np.matmul(weights, lines[:, lo:hi], out=out[:, start:stop])
    return out


def drop_tail(volume: np.ndarray, tail_mass: float) -> float:
    """Zero, in place, the smallest values of a non-negative C-contiguous float32 array, dropping
    at most ``tail_mass`` × its total; returns the threshold (values below it are now 0).

    Values are binned by their float32 bit pattern (8 exponent + 7 mantissa bits: bins < 1 %
    wide) and the largest threshold at a bin edge whose dropped mass fits the budget is taken, so
    the kept mass is ≥ (1 − ``tail_mass``) × total. A threshold is first guessed from about a
    200 000 sampled values for half the budget, and kept if the exact dropped mass fits.
    """
    if tail_mass <= 0 or volume.size == 0:
        return 0.0
    flat = volume.reshape(-1)
    total = float(flat.sum(dtype=np.float64))
    budget = tail_mass * total
    if not budget > 0:
        return 0.0
    step = max(1, flat.size // 200_000)
    threshold = _tail_threshold(flat[::step], 0.5 * budget / step)
    below = flat < threshold
    if float(np.sum(flat, where=below, dtype=np.float64)) > budget:
        threshold = _tail_threshold(flat, budget)
        below = flat < threshold
    np.putmask(flat, below, 0)
    return threshold


def _tail_threshold(values: np.ndarray, budget: float) -> float:
    """Largest bin edge below which ``values`` sum to at most ``budget``."""
    keys = values.view(np.int32) >> 16  # monotone in the value for values >= 0
    mass = np.bincount(keys, weights=values, minlength=1 << 15)
    n_bins = int(np.searchsorted(np.cumsum(mass), budget, side="right"))
    return float(np.array(n_bins << 16, dtype=np.int32).view(np.float32))


@dataclass(frozen=True)
class FoldPairs:
    """ML voxels right of the midline (``cleared``), and which of them (``source``) add onto
    which mirrored voxel (``destination``)."""

    cleared: np.ndarray
    source: np.ndarray
    destination: np.ndarray


def fold_pairs(ml_centres_um: np.ndarray, voxel_um: float, midline_um: float) -> FoldPairs:
    """The voxel pairs of the midline fold of an ML axis with these voxel centres."""
    cleared = np.flatnonzero(ml_centres_um > midline_um)
    destination = np.floor((2.0 * midline_um - ml_centres_um[cleared]) / voxel_um).astype(np.int64)
    ok = destination >= 0
    return FoldPairs(cleared, cleared[ok], destination[ok])


def fold_voxels(values: np.ndarray, pairs: FoldPairs) -> None:
    """In place: add each source ML voxel onto its mirror, then zero the right side."""
    moved = values[..., pairs.source].copy()
    values[..., pairs.cleared] = 0
    for j, d in enumerate(pairs.destination):
        values[..., d] += moved[..., j]


@dataclass
class TypeBox:
    """One type's smoothed density on its box ``grid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]``."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]
    values: np.ndarray
    count: float  # float64 sum of ``values``

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi, strict=True))  # type: ignore[return-value]

    def full(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The density on the whole grid (float32, zero outside the box)."""
        out = np.zeros(shape, dtype=np.float32)
        out[self.slices] = self.values
        return out


def histogram_box(
    flat: np.ndarray,
    weights: np.ndarray | None,
    shape: tuple[int, int, int],
    sigma_vox: float,
    full_ml: bool,
) -> TypeBox:
    """(Weighted) cell counts per voxel on the box the smoothed density of these cells needs.

    ``flat`` are the cells' raveled voxel indices in a grid of ``shape`` (all valid), ``weights``
    their weights or None. The box is the cells' bounding box grown by the kernel radius + 1, so
    smoothing it equals smoothing the whole grid (the kernel is zero beyond its radius; at the
    grid edges the box is clipped and ``"reflect"`` applies as on the whole grid); with
    ``full_ml`` it spans the whole ML axis.
    """
    idx = np.stack(np.unravel_index(flat, shape), axis=1)
    radius = kernel_radius(sigma_vox) + 1 if sigma_vox > 0 else 0
    lo = np.maximum(idx.min(axis=0) - radius, 0)
    hi = np.minimum(idx.max(axis=0) + radius + 1, shape)
    if full_ml:
        lo[2], hi[2] = 0, shape[2]
    box_shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    local = np.ravel_multi_index(tuple((idx - lo).T), box_shape)
    voxels, inverse = np.unique(local, return_inverse=True)
    values = np.zeros(box_shape, dtype=np.float32)
    values.flat[voxels] = np.bincount(inverse.ravel(), weights=weights, minlength=voxels.size)
    return TypeBox(
        tuple(int(a) for a in lo),  # type: ignore[arg-type]
        tuple(int(b) for b in hi),  # type: ignore[arg-type]
        values,
        float(values.sum(dtype=np.float64)),
    )


def type_box(
    flat: np.ndarray,
    weights: np.ndarray | None,
    shape: tuple[int, int, int],
    sigma_vox: float,
    fold_ml: FoldPairs | None,
    tail_mass: float,
) -> TypeBox:
    """:func:`histogram_box`, Gaussian (:func:`gaussian_box`), midline fold when ``fold_ml``
    (:func:`fold_pairs`), then :func:`drop_tail`: one type's density on its box."""
    box = histogram_box(flat, weights, shape, sigma_vox, fold_ml is not None)
    values = gaussian_box(box.values, sigma_vox) if sigma_vox > 0 else box.values
    if fold_ml is not None:
        fold_voxels(values, fold_ml)
    np.maximum(values, 0, out=values)  # float32 sums of non-negative terms; guards the tail cut
    drop_tail(values, tail_mass)
    return TypeBox(box.lo, box.hi, values, float(values.sum(dtype=np.float64)))


def encode_chunk(block: np.ndarray) -> bytes:
    """A full float32 chunk as HDF5 stores it with the filter of :data:`CHUNK_FILTERS` (a Blosc
    frame: byte shuffle + LZ4)."""
    return bytes(_BLOSC.encode(np.ascontiguousarray(block, dtype=np.float32)))


def box_chunks(
    box: TypeBox, shape: tuple[int, int, int], chunks: tuple[int, int, int]
) -> list[tuple[tuple[int, int, int], bytes]]:
    """Encoded chunks (grid offset, bytes) of the grid chunks the box touches with any mass;
    chunks without mass are left out (they read as the fill value 0)."""
    first = [a // c for a, c in zip(box.lo, chunks, strict=True)]
    last = [(b - 1) // c for b, c in zip(box.hi, chunks, strict=True)]
    out = []
    for i in range(first[0], last[0] + 1):
        for j in range(first[1], last[1] + 1):
            for k in range(first[2], last[2] + 1):
                start = (i * chunks[0], j * chunks[1], k * chunks[2])
                src, dst = [], []
                for a in range(3):
                    g0 = max(start[a], box.lo[a])
                    g1 = min(start[a] + chunks[a], box.hi[a], shape[a])
                    src.append(slice(g0 - box.lo[a], g1 - box.lo[a]))
                    dst.append(slice(g0 - start[a], g1 - start[a]))
                part = box.values[tuple(src)]
                if not part.any():
                    continue
                block = np.zeros(chunks, dtype=np.float32)
                block[tuple(dst)] = part
                out.append((start, encode_chunk(block)))
    return out


def type_chunks(
    flat: np.ndarray,
    weights: np.ndarray | None,
    shape: tuple[int, int, int],
    sigma_vox: float,
    fold_ml: FoldPairs | None,
    tail_mass: float,
    chunks: tuple[int, int, int],
) -> tuple[float, list[tuple[tuple[int, int, int], bytes]]]:
    """:func:`type_box` then :func:`box_chunks`: the type's count and its encoded chunks."""
    box = type_box(flat, weights, shape, sigma_vox, fold_ml, tail_mass)
    return box.count, box_chunks(box, shape, chunks)
