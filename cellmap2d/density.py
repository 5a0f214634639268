"""Spatial cell densities on a voxel grid over the Allen CCFv3 box.

All coordinates are CCF µm ``(ap, dv, ml)`` (see DESIGN.md). Voxel ``i`` of a :class:`Grid` covers
``[i·v, (i+1)·v)`` µm along each axis; its centre is ``(i + 0.5)·v``. Volumes are C-ordered numpy
arrays of shape ``grid.shape`` indexed ``[ap, dv, ml]``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from scipy import ndimage

from . import _density_compute as _compute

__all__ = [
    "CCF_EXTENT_UM",
    "MIDLINE_UM",
    "TAIL_MASS",
    "DensityFile",
    "Grid",
    "fold_volume",
    "histogram",
    "normalise",
    "resample_mask",
    "sampled_mask",
    "smooth",
    "type_densities",
    "write_densities",
    "write_type_densities",
]

CCF_EXTENT_UM: tuple[float, float, float] = (13200.0, 8000.0, 11400.0)
MIDLINE_UM: float = 5700.0
_FORMAT = "cellmap2d-densities"
_FORMAT_VERSION = 1
TAIL_MASS: float = 1e-6
"""Default share of each type's mass that may be dropped from its smallest voxel values."""


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid over a box starting at the CCF origin.

    Parameters
    ----------
    voxel_um
        Voxel edge length (µm), the same along all axes.
    extent_um
        Box size (µm) along ``(ap, dv, ml)``; the CCF box by default.
    """

    voxel_um: float
    extent_um: tuple[float, float, float] = CCF_EXTENT_UM

    def __post_init__(self) -> None:
        if not (math.isfinite(self.voxel_um) and self.voxel_um > 0):
            raise ValueError(f"voxel_um must be a positive number, got {self.voxel_um!r}")
        extent = tuple(float(e) for e in self.extent_um)
        if len(extent) != 3 or not all(math.isfinite(e) and e > 0 for e in extent):
            raise ValueError(f"extent_um must be 3 positive numbers, got {self.extent_um!r}")
        object.__setattr__(self, "voxel_um", float(self.voxel_um))
        object.__setattr__(self, "extent_um", extent)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxels per axis: ``ceil(extent / voxel)`` (exact ratios are not rounded up)."""
        return tuple(int(math.ceil(e / self.voxel_um - 1e-9)) for e in self.extent_um)  # type: ignore[return-value]

    @property
    def size(self) -> int:
        """Number of voxels."""
        return int(np.prod(self.shape))

    def index(self, ccf_um: np.ndarray) -> np.ndarray:
        """Voxel index ``floor(ccf / voxel)`` of each point, (n, 3) int64; not clipped."""
        pts = _points(ccf_um)
        return np.floor(pts / self.voxel_um).astype(np.int64)

    def inside(self, ccf_um: np.ndarray) -> np.ndarray:
        """Boolean (n,): the point lies in the grid box (finite and within every axis)."""
        pts = _points(ccf_um)
        with np.errstate(invalid="ignore"):
            idx = np.floor(pts / self.voxel_um)
            ok = np.isfinite(pts).all(axis=1)
            return ok & ((idx >= 0) & (idx < np.asarray(self.shape))).all(axis=1)

    def centers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre µm along each axis, ``(i + 0.5)·voxel`` (three 1D float64 arrays)."""
        return tuple((np.arange(n) + 0.5) * self.voxel_um for n in self.shape)  # type: ignore[return-value]

    def flat_index(self, ccf_um: np.ndarray) -> np.ndarray:
        """Raveled voxel index per point (int64), -1 for points outside the grid."""
        pts = _points(ccf_um)
        ok = self.inside(pts)
        out = np.full(len(pts), -1, dtype=np.int64)
        if ok.any():
            out[ok] = np.ravel_multi_index(tuple(self.index(pts[ok]).T), self.shape)
        return out


def _points(ccf_um: np.ndarray) -> np.ndarray:
    pts = np.asarray(ccf_um, dtype=np.float64)
    if pts.ndim == 1 and pts.size == 3:
        pts = pts[None, :]
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"expected CCF µm points of shape (n, 3), got {pts.shape}")
    return pts


def _fold_points(pts: np.ndarray) -> np.ndarray:
    pts = pts.copy()
    right = pts[:, 2] > MIDLINE_UM
    pts[right, 2] = 2.0 * MIDLINE_UM - pts[right, 2]
    return pts


def histogram(
    ccf_um: np.ndarray,
    grid: Grid,
    *,
    weights: np.ndarray | None = None,
    fold_hemispheres: bool = False,
) -> np.ndarray:
    """Count (or sum ``weights`` of) points per voxel.

    Points outside the grid or with non-finite coordinates are dropped. With
    ``fold_hemispheres`` points with ``ml > MIDLINE_UM`` are mirrored to ``2·MIDLINE_UM − ml``
    first, so all mass lies in the left hemisphere.

    Returns
    -------
    numpy.ndarray
        float64 array of ``grid.shape``.
    """
    pts = _points(ccf_um)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(pts),):
            raise ValueError(f"weights must have shape ({len(pts)},), got {weights.shape}")
    if fold_hemispheres:
        pts = _fold_points(pts)
    flat = grid.flat_index(pts)
    ok = flat >= 0
    counts = np.bincount(
        flat[ok], weights=None if weights is None else weights[ok], minlength=grid.size
    )
    return counts.astype(np.float64, copy=False).reshape(grid.shape)


def smooth(volume: np.ndarray, grid: Grid, sigma_um: float) -> np.ndarray:
    """Separable Gaussian smoothing with standard deviation ``sigma_um`` (µm).

    Uses :func:`scipy.ndimage.gaussian_filter` with ``mode="reflect"``, so the total mass is kept
    (mass that would leave the box is reflected back). ``sigma_um = 0`` returns a copy. The result
    has the dtype of ``volume`` (float64 for integer input).
    """
    volume = np.asarray(volume)
    if volume.shape != grid.shape:
        raise ValueError(f"volume shape {volume.shape} does not match grid shape {grid.shape}")
    if not (sigma_um >= 0 and math.isfinite(sigma_um)):
        raise ValueError(f"sigma_um must be >= 0, got {sigma_um!r}")
    if not np.issubdtype(volume.dtype, np.floating):
        volume = volume.astype(np.float64)
    if sigma_um == 0:
        return volume.copy()
    return ndimage.gaussian_filter(volume, sigma=sigma_um / grid.voxel_um, mode="reflect")


def fold_volume(volume: np.ndarray, grid: Grid) -> np.ndarray:
    """Add the right hemisphere onto the mirrored left one and zero the right one.

    A voxel whose centre lies right of ``MIDLINE_UM`` is added to the voxel containing its mirror
    image (exact when ``2·MIDLINE_UM / voxel`` is an integer, as for 10/25/50/100/200 µm grids).
    Used after smoothing a folded histogram, so the folded density is reflected at the midline
    instead of leaking into the right hemisphere. Mass is kept.
    """
    volume = np.asarray(volume)
    if volume.shape != grid.shape:
        raise ValueError(f"volume shape {volume.shape} does not match grid shape {grid.shape}")
    out = np.array(volume, dtype=np.result_type(volume.dtype, np.float32), copy=True)
    _fold_ml(out, grid)
    return out


def _fold_pairs(grid: Grid) -> _compute.FoldPairs:
    return _compute.fold_pairs(grid.centers()[2], grid.voxel_um, MIDLINE_UM)


def _fold_ml(out: np.ndarray, grid: Grid) -> None:
    """In place :func:`fold_volume` on any array whose last axis is the grid's full ML axis."""
    if out.shape[-1] != grid.shape[2]:
        raise ValueError(
            f"last axis has {out.shape[-1]} voxels, expected the full ML axis {grid.shape[2]}"
        )
    _compute.fold_voxels(out, _fold_pairs(grid))


def normalise(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Scale ``volume`` to a probability map: sum over ``mask`` = 1, zero outside the mask.

    A volume with no mass in the mask gives all zeros. The result is float64 for float64 or
    integer input, float32 for float32 input.
    """
    volume = np.asarray(volume)
    dtype = np.result_type(volume.dtype, np.float32)
    if mask is None:
        out = volume.astype(dtype, copy=True)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != volume.shape:
            raise ValueError(f"mask shape {mask.shape} does not match volume shape {volume.shape}")
        out = np.where(mask, volume, 0).astype(dtype, copy=False)
    total = float(out.sum(dtype=np.float64))
    if total > 0 and math.isfinite(total):
        out /= out.dtype.type(total)
    else:
        out[...] = 0
    return out


def type_densities(
    cells: Any,
    *,
    level: str = "subclass",
    grid: Grid,
    sigma_um: float,
    fold_hemispheres: bool = False,
    dataset_weights: Mapping[str, float] | None = None,
    tail_mass: float = TAIL_MASS,
    workers: int | None = 1,
    progress: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Smoothed density of each cell type, one type at a time.

    Parameters
    ----------
    cells
        AnnData (e.g. from :func:`cellmap2d.celltypes.read_abc`) with ``obs[level]`` and
        ``obsm['ccf']`` (CCF µm); ``obs['dataset']`` when ``dataset_weights`` is given.
    level
        Taxonomy column of ``obs``; cells with a missing value are ignored.
    grid, sigma_um
        Voxel grid and Gaussian sigma (µm).
    fold_hemispheres
        Mirror cells right of the midline to the left, smooth, and reflect at the midline
        (:func:`fold_volume`), so all mass is in the left hemisphere.
    dataset_weights
        Weight per ``obs['dataset']`` value multiplying each cell's contribution (datasets not
        listed weigh 1). A key naming no dataset of ``cells`` raises ``ValueError``.
    tail_mass
        Per type, the smallest voxel values summing to at most this share of the type's mass are
        set to 0 (far Gaussian tails; lets empty chunks be skipped and the rest compress). 0 keeps
        every value.
    workers
        Processes computing types in parallel; None uses every available core, 1 computes in
        this process.
    progress
        Called with a short message per type.

    Yields
    ------
    (str, numpy.ndarray)
        Type name (category order, types without cells skipped) and its float32 density of
        ``grid.shape``: smoothed (weighted) cell counts per voxel, not normalised; its sum is the
        (weighted) number of the type's cells inside the grid, less at most ``tail_mass`` of it.

    Notes
    -----
    The Gaussian is that of :func:`smooth` (same kernel, truncation and reflecting edges), equal
    up to float32 rounding; each type is computed on its cells' bounding box grown by the kernel
    radius.
    """
    say = progress or (lambda _msg: None)
    jobs = _type_jobs(cells, level, grid, sigma_um, fold_hemispheres, dataset_weights, tail_mass)
    boxes = _run(_compute.type_box, [job.args for job in jobs], workers, ordered=True)
    for done, (job, box) in enumerate(zip(jobs, boxes, strict=True), start=1):
        say(f"{level} {done}/{len(jobs)}: {job.name} ({job.n_cells} cells)")
        yield job.name, box.full(grid.shape)


def write_type_densities(
    path: str | Path,
    cells: Any,
    *,
    level: str = "subclass",
    grid: Grid,
    sigma_um: float,
    fold_hemispheres: bool = False,
    dataset_weights: Mapping[str, float] | None = None,
    tail_mass: float = TAIL_MASS,
    workers: int | None = None,
    attrs: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Compute every type's density and write them to one file, in parallel.

    Same densities as :func:`type_densities` (see there for the parameters) and the same file as
    :func:`write_densities` would write from them, with attr ``fold_hemispheres`` and
    ``tail_mass`` set; each worker process also compresses its type's chunks, so only compressed
    bytes reach the writer. ``workers=None`` uses every available core.
    """
    say = progress or (lambda _msg: None)
    extra = {"fold_hemispheres": bool(fold_hemispheres), "tail_mass": float(tail_mass)}
    clash = sorted(set(extra) & set(attrs or {}))
    if clash:
        raise ValueError(f"attrs may not set {clash}: they are written from the arguments")
    extra.update(attrs or {})
    jobs = _type_jobs(cells, level, grid, sigma_um, fold_hemispheres, dataset_weights, tail_mass)
    chunks = _chunk_shape(grid)
    tasks = [(*job.args, chunks) for job in jobs]
    with _DensityWriter(path, grid=grid, level=level, sigma_um=sigma_um, attrs=extra) as out:
        for done, (i, (count, encoded)) in enumerate(
            _run(_compute.type_chunks, tasks, workers, ordered=False), start=1
        ):
            out.add_encoded(i, jobs[i].name, count, encoded)
            say(f"{level} {done}/{len(jobs)}: {jobs[i].name} ({jobs[i].n_cells} cells)")


@dataclass(frozen=True)
class _TypeJob:
    name: str
    n_cells: int
    args: tuple[Any, ...]  # for _compute.type_box


def _type_jobs(
    cells: Any,
    level: str,
    grid: Grid,
    sigma_um: float,
    fold_hemispheres: bool,
    dataset_weights: Mapping[str, float] | None,
    tail_mass: float,
) -> list[_TypeJob]:
    """Per type with cells (category order): its cells' voxels and weights, ready to compute."""
    if level not in cells.obs:
        raise ValueError(f"cells.obs has no column {level!r}; columns: {list(cells.obs.columns)}")
    if "ccf" not in cells.obsm:
        raise ValueError("cells.obsm has no 'ccf' (CCF µm (ap, dv, ml)) coordinates")
    if not (sigma_um >= 0 and math.isfinite(sigma_um)):
        raise ValueError(f"sigma_um must be >= 0, got {sigma_um!r}")
    if not 0 <= tail_mass < 1:
        raise ValueError(f"tail_mass must be in [0, 1), got {tail_mass!r}")
    labels = cells.obs[level]
    if not isinstance(labels.dtype, pd.CategoricalDtype):
        labels = labels.astype("category")
    names = [str(c) for c in labels.cat.categories]
    codes = labels.cat.codes.to_numpy()
    pts = np.asarray(cells.obsm["ccf"], dtype=np.float64)
    if fold_hemispheres:
        pts = _fold_points(pts)
    weights = _cell_weights(cells, dataset_weights)
    # one pass over all cells: voxel per cell, then a single sort by type
    flat = grid.flat_index(pts)
    ok = (flat >= 0) & (codes >= 0)
    if weights is not None:
        ok &= weights != 0
    order = np.flatnonzero(ok)
    order = order[np.argsort(codes[order], kind="stable")]
    n_per_type = np.bincount(codes[order], minlength=len(names))
    bounds = np.concatenate([[0], np.cumsum(n_per_type)])
    flat_sorted = flat[order]
    weights_sorted = None if weights is None else weights[order]
    fold = _fold_pairs(grid) if fold_hemispheres else None
    sigma_vox = sigma_um / grid.voxel_um
    jobs = []
    for k, name in enumerate(names):
        lo, hi = bounds[k], bounds[k + 1]
        if hi == lo:
            continue
        w = None if weights_sorted is None else weights_sorted[lo:hi]
        args = (flat_sorted[lo:hi], w, grid.shape, sigma_vox, fold, tail_mass)
        jobs.append(_TypeJob(name, int(hi - lo), args))
    return jobs


def _run(
    function: Callable[..., Any],
    tasks: list[tuple[Any, ...]],
    workers: int | None,
    *,
    ordered: bool,
) -> Iterator[Any]:
    """``function(*task)`` for each task, in a process pool when ``workers`` > 1.

    Ordered: the results in task order; unordered: ``(task index, result)`` as they finish.
    """
    n = _n_workers(workers)
    if n == 1 or len(tasks) <= 1:
        results = (function(*task) for task in tasks)
        yield from results if ordered else enumerate(results)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # A pool closed by its ``with`` block: a pool left for interpreter exit leaks its
    # resources when the caller is a forked Luigi worker (which exits without cleanup).
    # At most 2 tasks per worker are in flight, and each result is handed on as soon as it
    # is done, so memory holds a few results, not all of them.
    context = multiprocessing.get_context("forkserver")
    queue = iter(enumerate(tasks))
    done: dict[int, Any] = {}
    following = 0
    with ProcessPoolExecutor(max_workers=n, mp_context=context) as pool:
        running: dict[Any, int] = {}
        while True:
            for i, task in queue:
                running[pool.submit(function, *task)] = i
                if len(running) >= 2 * n:
                    break
            if not running:
                return
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                i = running.pop(future)
                if not ordered:
                    yield i, future.result()
                    continue
                done[i] = future.result()
                while following in done:
                    yield done.pop(following)
                    following += 1


def _n_workers(workers: int | None) -> int:
    if workers is None:
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    if workers < 1:
        raise ValueError(f"workers must be >= 1 or None (all cores), got {workers!r}")
    return int(workers)


def _cell_weights(cells: Any, dataset_weights: Mapping[str, float] | None) -> np.ndarray | None:
    if not dataset_weights:
        return None
    if "dataset" not in cells.obs:
        raise ValueError("dataset_weights given but cells.obs has no 'dataset' column")
    dataset = cells.obs["dataset"].astype(str).to_numpy()
    unknown = sorted(set(dataset_weights) - set(np.unique(dataset)))
    if unknown:
        raise ValueError(
            f"dataset_weights names dataset(s) not in cells: {unknown}; "
            f"datasets: {sorted(np.unique(dataset))}"
        )
    weights = np.ones(len(dataset), dtype=np.float64)
    for name, value in dataset_weights.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"dataset weight for {name!r} must be >= 0, got {value!r}")
        weights[dataset == name] = value
    return weights


# ------------------------------------------------------------------------------ HDF5 file


def write_densities(
    path: str | Path,
    items: Iterable[tuple[str, np.ndarray]],
    *,
    grid: Grid,
    level: str,
    sigma_um: float,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write type densities to one HDF5 file, one type at a time.

    Layout: ``/types/<i>`` (i = 0, 1, …) chunked (64³), Blosc-compressed (byte shuffle + LZ4;
    an ``hdf5plugin`` filter, so readers other than :class:`DensityFile` need ``import
    hdf5plugin``) float32 datasets of ``grid.shape`` with attrs ``name`` (any string, may
    contain ``/``) and ``count`` (sum of the volume = (weighted) cells of the type inside the
    grid); chunks without mass are not written (they read as the fill value 0). Root attrs
    ``format``, ``voxel_um``, ``extent_um``, ``shape``, ``level``, ``sigma_um``, ``names``,
    ``n_types`` and any extra ``attrs`` (e.g. ``fold_hemispheres``). Names must be unique.
    Values are written as given (float32); :func:`write_type_densities` computes and writes
    in parallel.
    """
    chunks = _chunk_shape(grid)
    with _DensityWriter(path, grid=grid, level=level, sigma_um=sigma_um, attrs=attrs) as out:
        for i, (name, volume) in enumerate(items):
            volume = np.asarray(volume)
            if volume.shape != grid.shape:
                raise ValueError(
                    f"density of {str(name)!r} has shape {volume.shape}, expected grid shape "
                    f"{grid.shape} (writing {path})"
                )
            data = np.ascontiguousarray(volume, dtype=np.float32)
            whole = _compute.TypeBox((0, 0, 0), grid.shape, data, float(data.sum(dtype=np.float64)))
            out.add_encoded(i, name, whole.count, _compute.box_chunks(whole, grid.shape, chunks))


def _chunk_shape(grid: Grid) -> tuple[int, int, int]:
    return tuple(min(n, 64) for n in grid.shape)  # type: ignore[return-value]


class _DensityWriter:
    """An open density file taking pre-encoded chunks (see :func:`write_densities`)."""

    _reserved = frozenset(
        {"format", "format_version", "voxel_um", "extent_um", "shape", "level", "sigma_um"}
        | {"names", "n_types"}
    )

    def __init__(
        self,
        path: str | Path,
        *,
        grid: Grid,
        level: str,
        sigma_um: float,
        attrs: Mapping[str, Any] | None,
    ) -> None:
        self.path = Path(path)
        extra = dict(attrs or {})
        clash = sorted(self._reserved & set(extra))
        if clash:
            raise ValueError(f"attrs may not override reserved attribute(s) {clash}")
        self.grid = grid
        self.chunks = _chunk_shape(grid)
        self.names: dict[int, str] = {}
        self._file = h5py.File(self.path, "w")
        a = self._file.attrs
        a["format"] = _FORMAT
        a["format_version"] = _FORMAT_VERSION
        a["voxel_um"] = grid.voxel_um
        a["extent_um"] = np.asarray(grid.extent_um, dtype=np.float64)
        a["shape"] = np.asarray(grid.shape, dtype=np.int64)
        a["level"] = str(level)
        a["sigma_um"] = float(sigma_um)
        for key, value in extra.items():
            a[key] = value
        self._group = self._file.create_group("types")

    def __enter__(self) -> _DensityWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                names = [self.names[i] for i in sorted(self.names)]
                self._file.attrs["names"] = np.asarray(names, dtype=h5py.string_dtype())
                self._file.attrs["n_types"] = len(names)
        finally:
            self._file.close()

    def add_encoded(
        self,
        index: int,
        name: str,
        count: float,
        encoded: list[tuple[tuple[int, int, int], bytes]],
    ) -> None:
        """Type number ``index`` from its chunks as HDF5 stores them (``_compute.encode_chunk``)."""
        name = str(name)
        if name in self.names.values():
            raise ValueError(f"type name {name!r} repeats in the densities written to {self.path}")
        self.names[index] = name
        dset = self._group.create_dataset(
            str(index),
            shape=self.grid.shape,
            dtype=np.float32,
            chunks=self.chunks,
            fillvalue=0.0,
            **_compute.CHUNK_FILTERS,
        )
        for offset, data in encoded:
            dset.id.write_direct_chunk(offset, data)
        dset.attrs["name"] = name
        dset.attrs["count"] = float(count)


class DensityFile:
    """Read a file written by :func:`write_densities`, one type at a time.

    Importing this module registers the ``hdf5plugin`` filters the files are compressed with.

    Attributes
    ----------
    names : list[str]
        Type names in file order.
    grid : Grid
    level : str
    sigma_um : float
    counts : dict[str, float]
        Per type, the sum of its density (= (weighted) cells inside the grid).
    fold_hemispheres : bool
        The ``fold_hemispheres`` attribute if written, else False.
    attrs : dict
        All root attributes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"density file not found: {self.path}")
        self._file = h5py.File(self.path, "r")
        try:
            a = self._file.attrs
            if a.get("format") != _FORMAT or "types" not in self._file:
                raise ValueError(
                    f"{self.path} is not a cellmap2d density file (written by write_densities)"
                )
            self.attrs: dict[str, Any] = {k: _plain(v) for k, v in a.items()}
            self.grid = Grid(float(a["voxel_um"]), tuple(float(x) for x in a["extent_um"]))  # type: ignore[arg-type]
            self.level = str(self.attrs["level"])
            self.sigma_um = float(a["sigma_um"])
            self.fold_hemispheres = bool(self.attrs.get("fold_hemispheres", False))
            group = self._file["types"]
            keys = sorted(group.keys(), key=int)
            self.names: list[str] = [str(_plain(group[k].attrs["name"])) for k in keys]
            self._key = dict(zip(self.names, keys, strict=True))
            self.counts: dict[str, float] = {
                n: float(group[k].attrs["count"]) for n, k in self._key.items()
            }
        except Exception:
            self._file.close()
            raise

    def __repr__(self) -> str:
        return (
            f"DensityFile({str(self.path)!r}, {len(self.names)} types, level={self.level!r}, "
            f"voxel_um={self.grid.voxel_um}, sigma_um={self.sigma_um})"
        )

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._key

    def __enter__(self) -> DensityFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()

    def _dataset(self, name: str) -> h5py.Dataset:
        if name not in self._key:
            raise KeyError(f"no type {name!r} in {self.path}")
        return self._file["types"][self._key[name]]

    def read(self, name: str) -> np.ndarray:
        """The float32 density of ``name``, shape ``grid.shape``."""
        return self._dataset(name)[...]

    def read_masked(self, name: str, mask: np.ndarray) -> np.ndarray:
        """``read(name)[mask]`` (1D float32, C order), reading only the mask's bounding box."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.grid.shape:
            raise ValueError(f"mask shape {mask.shape} does not match grid shape {self.grid.shape}")
        box = _bbox(mask)
        if box is None:
            return np.empty(0, dtype=np.float32)
        return self._dataset(name)[box][mask[box]]


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


# ------------------------------------------------------------------------------ masks


def resample_mask(mask: np.ndarray, source_voxel_um: float, grid: Grid) -> np.ndarray:
    """Resample a mask (e.g. ``annotation > 0`` at 25 µm) onto ``grid``.

    A grid voxel is inside when its centre falls in an inside source voxel, the source voxel of a
    position being ``floor(µm / source_voxel_um)``; centres outside the source volume are outside.
    Any non-zero source value counts as inside. Returns bool of ``grid.shape``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    if not source_voxel_um > 0:
        raise ValueError(f"source_voxel_um must be > 0, got {source_voxel_um!r}")
    idx = []
    valid = []
    for centres, n in zip(grid.centers(), mask.shape, strict=True):
        i = np.floor(centres / source_voxel_um).astype(np.int64)
        ok = (i >= 0) & (i < n)
        idx.append(np.clip(i, 0, n - 1))
        valid.append(ok)
    out = mask[np.ix_(*idx)] != 0
    out &= valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    return out


def sampled_mask(
    grid: Grid,
    planes: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    half_thickness_um: float,
    inside: np.ndarray | None = None,
) -> np.ndarray:
    """Voxels whose centre lies within ``half_thickness_um`` of any plane (the sampled tissue).

    Parameters
    ----------
    grid
        The voxel grid.
    planes
        ``(point_um, normal)`` pairs in CCF µm ``(ap, dv, ml)``; normals need not be unit length.
    half_thickness_um
        Distance (µm) from a plane up to which a voxel centre counts (inclusive).
    inside
        Optional bool volume of ``grid.shape`` (e.g. the brain); the result is ANDed with it.

    Returns
    -------
    numpy.ndarray
        bool of ``grid.shape``.

    Notes
    -----
    Runs in O(planes × the two in-plane axes) plus one cumulative sum: along each plane's
    dominant normal axis the slab is an interval per column, marked by +1/−1 and summed.
    """
    if not half_thickness_um >= 0:
        raise ValueError(f"half_thickness_um must be >= 0, got {half_thickness_um!r}")
    shape = grid.shape
    v = grid.voxel_um
    centres = grid.centers()
    diffs: dict[int, np.ndarray] = {}
    for n_plane, plane in enumerate(planes):
        point, normal = (np.asarray(x, dtype=np.float64).reshape(3) for x in plane)
        norm = np.linalg.norm(normal)
        if not (np.isfinite(norm) and norm > 0 and np.isfinite(point).all()):
            raise ValueError(f"plane {n_plane}: need a finite point and a non-zero normal")
        normal = normal / norm
        k = int(np.argmax(np.abs(normal)))
        a, b = (ax for ax in range(3) if ax != k)
        # n_k x_k + s(a, b) = p·n ± h  →  x_k interval per (a, b) column
        s = centres[a][:, None] * normal[a] + centres[b][None, :] * normal[b]
        edge1 = (point @ normal - s - half_thickness_um) / normal[k]
        edge2 = (point @ normal - s + half_thickness_um) / normal[k]
        lo_um, hi_um = np.minimum(edge1, edge2), np.maximum(edge1, edge2)
        eps = 1e-9 * max(v, 1.0)
        lo = np.ceil((lo_um - eps) / v - 0.5).astype(np.int64)
        hi = np.floor((hi_um + eps) / v - 0.5).astype(np.int64)
        lo = np.clip(lo, 0, shape[k])
        hi = np.clip(hi, -1, shape[k] - 1)
        ok = hi >= lo
        if not ok.any():
            continue
        if k not in diffs:
            dshape = tuple(s_ + (1 if ax == k else 0) for ax, s_ in enumerate(shape))
            diffs[k] = np.zeros(dshape, dtype=np.int32)
        ia, ib = np.nonzero(ok)
        for edge, delta in ((lo[ok], 1), (hi[ok] + 1, -1)):
            index: list[np.ndarray] = [np.empty(0, np.int64)] * 3
            index[a], index[b], index[k] = ia, ib, edge
            # each (a, b) column appears once per plane, so plain fancy-index += is safe
            diffs[k][tuple(index)] += delta
    out = np.zeros(shape, dtype=bool)
    for k, diff in diffs.items():
        covered = np.cumsum(diff, axis=k, dtype=np.int32) > 0
        out |= np.take(covered, np.arange(shape[k]), axis=k)
    if inside is not None:
        inside = np.asarray(inside, dtype=bool)
        if inside.shape != shape:
            raise ValueError(f"inside shape {inside.shape} does not match grid shape {shape}")
        out &= inside
    return out
