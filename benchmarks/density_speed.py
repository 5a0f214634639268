"""Speed and memory of type densities at ABC scale, and of identity against all types.

``python benchmarks/density_speed.py [--cells 4000000] [--types 338] [--types-25 338]
[--workers 2]``

Synthesises, in memory, ``--cells`` ABC-like cells of ``--types`` subclasses (log-normal
abundances; 90 % of the types are compact: 1–3 Gaussian blobs of 200–1500 µm s.d., 10 % span the
brain box, like non-neuronal types), then times ``write_type_densities`` (the ``TypeDensities``
task) with ``--workers`` processes at 50 µm for all types, and at 25 µm for the ``--types-25``
most abundant types (all by default; fewer are scaled to all types by the share of types and
stated as "scaled"). Baselines, measured in the same run and side by side as ratios:

- the straightforward computation: per type ``histogram`` + ``smooth``
  (``scipy.ndimage.gaussian_filter`` on the whole grid) + an h5py gzip-1/shuffle write of the
  whole volume, on every 16th type, scaled by the share of types;
- a per-cell Python loop that bins each cell (on 200 000 cells, scaled linearly to all cells);
- ``scipy.stats.gaussian_kde`` (fitted on 2 000 cells of one type, evaluated on 20 000 voxel
  centres, scaled linearly to all voxels of all types).

A profile of the stages of the fast path (one process, every 16th type, scaled by the share of
types) shows where the time goes. Then one identity run (``brain_identity``, 2 000 cells, 100 µm
section spacing, 20 bootstrap resamples) against all types at 100 µm. Peak RSS is the largest
sum of the resident memory of this process and its worker processes, sampled every 0.2 s. The
load average (``os.getloadavg``) before and after each timing shows contention from other
processes on the machine; the CPU seconds of this process and its workers (from ``/proc``) do
not depend on it much, and divided by the cores give the time on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
from scipy.stats import gaussian_kde
from threadpoolctl import threadpool_limits

from cellmap2d import _density_compute
from cellmap2d.density import (
    CCF_EXTENT_UM,
    TAIL_MASS,
    DensityFile,
    Grid,
    histogram,
    smooth,
    write_type_densities,
)
from cellmap2d.identity import brain_identity

SIGMA_UM = {25.0: 75.0, 50.0: 75.0, 100.0: 150.0}


class PeakRss:
    """Largest summed RSS (GB) of this process and its descendants, sampled in a thread
    (which also samples their CPU time for :func:`tree_cpu_s`)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.peak_gb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.is_set():
            self.peak_gb = max(self.peak_gb, tree_rss_gb(os.getpid()))
            _sample_cpu()
            self._stop.wait(interval_s)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_gb


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out = []
    for pid in parent:
        p = pid
        while p not in (0, 1, root) and p in parent:
            p = parent[p]
        if p == root:
            out.append(pid)
    return out


def tree_rss_gb(root: int) -> float:
    total = 0
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total / 1e6


_CPU_TICKS: dict[int, int] = {}


def _sample_cpu() -> None:
    """Record the CPU ticks of every live descendant (pool workers are reaped by the pool's
    server process, not by us, so their time must be read while they live)."""
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks = sum(int(x) for x in fields[11:13])  # utime, stime
        if pid == os.getpid():
            ticks += sum(int(x) for x in fields[13:15])  # cutime, cstime
        _CPU_TICKS[pid] = max(_CPU_TICKS.get(pid, 0), ticks)


def tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process and every descendant seen so far (sampled
    by :class:`PeakRss` while it runs)."""
    _sample_cpu()
    return sum(_CPU_TICKS.values()) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def synth_cells(n: int, k: int, rng: np.random.Generator) -> tuple[anndata.AnnData, list]:
    abundance = rng.lognormal(0, 1.2, k)
    counts = rng.multinomial(n, abundance / abundance.sum())
    extent = np.array(CCF_EXTENT_UM)
    lo, hi = extent * 0.15, extent * 0.85
    pts = np.empty((n, 3), dtype=np.float32)
    recipes = []
    start = 0
    for c in counts:
        if rng.random() < 0.1:
            x = rng.uniform(lo, hi, (c, 3))
            recipes.append(("uniform",))
        else:
            nb = int(rng.integers(1, 4))
            centres = rng.uniform(lo, hi, (nb, 3))
            sd = rng.uniform(200, 1500, nb)
            which = rng.integers(0, nb, c)
            x = centres[which] + rng.standard_normal((c, 3)) * sd[which, None]
            recipes.append(("blobs", centres, sd))
        pts[start : start + c] = x
        start += c
    names = [f"{t:03d} type {t}" for t in range(k)]
    obs = pd.DataFrame(
        {"subclass": pd.Categorical.from_codes(np.repeat(np.arange(k), counts), names)}
    )
    obs.index = obs.index.astype(str)
    cells = anndata.AnnData(obs=obs, obsm={"ccf": pts})
    return cells, recipes


def time_densities(
    cells: anndata.AnnData, voxel: float, path: Path, workers: int
) -> tuple[float, str]:
    grid = Grid(voxel)
    before = load()
    cpu = tree_cpu_s()
    t = time.perf_counter()
    write_type_densities(
        path, cells, level="subclass", grid=grid, sigma_um=SIGMA_UM[voxel], workers=workers
    )
    sec = time.perf_counter() - t
    cpu = tree_cpu_s() - cpu
    return sec, (
        f"{path.stat().st_size / 1e6:.0f} MB file; CPU {cpu:.0f} s in all processes; "
        f"load {before} → {load()}"
    )


def type_subset(cells: anndata.AnnData, every: int) -> tuple[anndata.AnnData, float]:
    """Every ``every``-th type's cells, and the share of the types they are (the cost per type
    follows its bounding box, or the whole grid, more than its number of cells)."""
    codes = np.asarray(cells.obs["subclass"].cat.codes)
    keep = codes % every == 0
    sub = cells[keep].copy()
    sub.obs["subclass"] = sub.obs["subclass"].cat.remove_unused_categories()
    return sub, len(np.unique(codes[keep])) / len(np.unique(codes))


def straightforward(cells: anndata.AnnData, voxel: float, path: Path) -> float:
    """The plain computation: whole-grid histogram + ndimage Gaussian + h5py gzip write."""
    grid = Grid(voxel)
    pts = np.asarray(cells.obsm["ccf"])
    codes = np.asarray(cells.obs["subclass"].cat.codes)
    t = time.perf_counter()
    with h5py.File(path, "w") as f:
        for k in np.unique(codes):
            vol = smooth(histogram(pts[codes == k], grid), grid, SIGMA_UM[voxel])
            f.create_dataset(
                str(k),
                data=vol.astype(np.float32),
                chunks=(64, 64, 64),
                compression="gzip",
                compression_opts=1,
                shuffle=True,
            )
    return time.perf_counter() - t


def profile(cells: anndata.AnnData, voxel: float) -> dict[str, float]:
    """Seconds per stage of the fast path (``_density_compute.type_chunks`` step by step), one
    process, one BLAS thread."""
    grid = Grid(voxel)
    sigma_vox = SIGMA_UM[voxel] / voxel
    pts = np.asarray(cells.obsm["ccf"], dtype=np.float64)
    codes = np.asarray(cells.obs["subclass"].cat.codes)
    flat = grid.flat_index(pts)
    stages = dict.fromkeys(["histogram", "Gaussian", "tail cut", "chunks + Blosc"], 0.0)
    with threadpool_limits(1):
        for k in np.unique(codes):
            cell_voxels = flat[(codes == k) & (flat >= 0)]
            t0 = time.perf_counter()
            box = _density_compute.histogram_box(cell_voxels, None, grid.shape, sigma_vox, False)
            t1 = time.perf_counter()
            values = _density_compute.gaussian_box(box.values, sigma_vox)
            t2 = time.perf_counter()
            _density_compute.drop_tail(values, TAIL_MASS)
            t3 = time.perf_counter()
            smoothed = _density_compute.TypeBox(box.lo, box.hi, values, 0.0)
            _density_compute.box_chunks(smoothed, grid.shape, (64, 64, 64))
            t4 = time.perf_counter()
            for stage, sec in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                stages[stage] += sec
    return stages


def python_loop(pts: np.ndarray, grid: Grid) -> np.ndarray:
    out = np.zeros(grid.shape)
    v = grid.voxel_um
    nx, ny, nz = grid.shape
    for x, y, z in pts.tolist():
        i, j, k = int(x // v), int(y // v), int(z // v)
        if 0 <= i < nx and 0 <= j < ny and 0 <= k < nz:
            out[i, j, k] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=4_000_000)
    parser.add_argument("--types", type=int, default=338)
    parser.add_argument("--types-25", type=int, default=338)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    memory = PeakRss()
    rng = np.random.default_rng(args.seed)
    t = time.perf_counter()
    cells, _ = synth_cells(args.cells, args.types, rng)
    print(
        f"synthesised {args.cells} cells of {args.types} types in {time.perf_counter() - t:.1f} s"
    )
    every = 16
    subset, share = type_subset(cells, every)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # --- the fast path at 50 µm, all types
        sec50, note = time_densities(cells, 50.0, tmp / "d50.h5", args.workers)
        rows.append((f"cellmap2d 50 µm, all types, {args.workers} workers", sec50, note))
        # --- 25 µm, all types or the most abundant ones scaled by the share of types
        if args.types_25 >= args.types:
            sec25, note = time_densities(cells, 25.0, tmp / "d25.h5", args.workers)
            rows.append((f"cellmap2d 25 µm, all types, {args.workers} workers", sec25, note))
        else:
            top = cells.obs["subclass"].value_counts().index[: args.types_25]
            sub = cells[cells.obs["subclass"].isin(top).to_numpy()].copy()
            sub.obs["subclass"] = sub.obs["subclass"].cat.remove_unused_categories()
            sec25, note = time_densities(sub, 25.0, tmp / "d25.h5", args.workers)
            rows.append(
                (
                    f"cellmap2d 25 µm ({args.types_25} largest types, scaled), "
                    f"{args.workers} workers",
                    sec25 * args.types / args.types_25,
                    f"measured {sec25:.0f} s; {note}",
                )
            )
        (tmp / "d25.h5").unlink()
        # --- baselines
        before = load()
        plain = straightforward(subset, 50.0, tmp / "plain50.h5") / share
        rows.append(
            (
                f"straightforward 50 µm: whole-grid ndimage Gaussian + gzip (1/{every} of types, "
                "scaled)",
                plain,
                f"load {before} → {load()}",
            )
        )
        grid50 = Grid(50.0)
        pts = np.asarray(cells.obsm["ccf"])
        n_loop = 200_000
        t = time.perf_counter()
        python_loop(pts[:n_loop], grid50)
        loop = (time.perf_counter() - t) * len(pts) / n_loop
        rows.append(("per-cell Python loop, binning only, 50 µm (scaled)", loop, ""))
        one = pts[np.asarray(cells.obs["subclass"].cat.codes) == 0][:2000].astype(np.float64)
        kde = gaussian_kde(one.T, bw_method=SIGMA_UM[50.0] / one.std(axis=0).mean())
        centres = grid50.centers()
        probe = np.stack([rng.choice(c, 20_000) for c in centres], axis=0)  # random voxel centres
        t = time.perf_counter()
        kde(probe)
        kde_s = (time.perf_counter() - t) * grid50.size / 20_000 * args.types
        rows.append(("scipy gaussian_kde (2 000 cells/type, 50 µm, scaled)", kde_s, ""))
        # --- identity at 100 µm against all types
        sec100, note = time_densities(cells, 100.0, tmp / "d100.h5", args.workers)
        rows.append((f"cellmap2d 100 µm, all types, {args.workers} workers", sec100, note))
        brain = np.zeros(Grid(100.0).shape, dtype=bool)
        brain[15:117, 10:70, 15:100] = True
        recipe_cells = pts[np.asarray(cells.obs["subclass"].cat.codes) == 1]
        sample = recipe_cells[rng.choice(len(recipe_cells), 2000)]
        planes = [
            (np.array([ap, 4000.0, 5700.0]), np.array([1.0, 0.0, 0.0]))
            for ap in np.arange(1000.0, 12500.0, 100.0)
        ]
        with DensityFile(tmp / "d100.h5") as dens:
            t = time.perf_counter()
            table = brain_identity(
                sample,
                planes,
                dens,
                brain_mask=brain,
                brain_mask_voxel_um=100.0,
                section_spacing_um=100.0,
                n_boot=20,
            )
            ident = time.perf_counter() - t
        rows.append(
            (
                f"identity, 1 brain vs {args.types} types, 100 µm",
                ident,
                f"top = {table['type'].iloc[0]} (planted {cells.obs['subclass'].cat.categories[1]})",
            )
        )
    before = load()
    stages = {k: v / share for k, v in profile(subset, 50.0).items()}
    after = load()
    peak = memory.stop()
    base = sec50
    print(f"\n{args.cells} cells, {args.types} types; peak RSS (process + workers) {peak:.2f} GB\n")
    print("| what | seconds | × cellmap2d 50 µm | note |")
    print("|---|---|---|---|")
    for what, sec, note in rows:
        print(f"| {what} | {sec:.1f} | {sec / base:.2f} | {note} |")
    total = sum(stages.values())
    print(
        f"\nprofile of the fast path at 50 µm, 1 process, 1/{every} of types scaled "
        f"(load {before} → {after}):\n"
    )
    print("| stage | seconds | share |")
    print("|---|---|---|")
    for stage, sec in stages.items():
        print(f"| {stage} | {sec:.1f} | {sec / total:.0%} |")


if __name__ == "__main__":
    main()
