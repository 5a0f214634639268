"""Speed and memory of type densities at ABC scale, and of identity against all types.

``python benchmarks/density_speed.py [--cells 4000000] [--types 338] [--types-25 24]``

Synthesises, in memory, ``--cells`` ABC-like cells of ``--types`` subclasses (log-normal
abundances; 90 % of the types are compact: 1–3 Gaussian blobs of 200–1500 µm s.d., 10 % span the
brain box, like non-neuronal types), then times ``type_densities`` + ``write_densities`` (the
``TypeDensities`` task) at 50 µm for all types, and at 25 µm for the ``--types-25`` most abundant
types, scaled to all types by the share of types (stated as "scaled"). Baselines, side by side as
ratios: a per-cell Python loop that bins each cell (on 200 000 cells, scaled linearly to all
cells) and ``scipy.stats.gaussian_kde`` (fitted on 2 000 cells of one type, evaluated on 20 000
voxel centres, scaled linearly to all voxels of all types). Then one identity run
(``brain_identity``, 2 000 cells, 100 µm section spacing, 20 bootstrap resamples) against all
types at 100 µm. Peak RSS is the process maximum (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from scipy.stats import gaussian_kde

from cellmap2d.density import CCF_EXTENT_UM, DensityFile, Grid, type_densities, write_densities
from cellmap2d.identity import brain_identity

SIGMA_UM = {25.0: 75.0, 50.0: 75.0, 100.0: 150.0}


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


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


def time_densities(cells: anndata.AnnData, voxel: float, path: Path) -> tuple[float, int]:
    grid = Grid(voxel)
    t = time.perf_counter()
    items = type_densities(cells, level="subclass", grid=grid, sigma_um=SIGMA_UM[voxel])
    write_densities(path, items, grid=grid, level="subclass", sigma_um=SIGMA_UM[voxel])
    return time.perf_counter() - t, grid.size


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
    parser.add_argument("--types-25", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    t = time.perf_counter()
    cells, _ = synth_cells(args.cells, args.types, rng)
    print(
        f"synthesised {args.cells} cells of {args.types} types in {time.perf_counter() - t:.1f} s"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # --- 50 µm, all types
        sec50, size50 = time_densities(cells, 50.0, tmp / "d50.h5")
        mb50 = (tmp / "d50.h5").stat().st_size / 1e6
        rows.append(("cellmap2d 50 µm, all types", sec50, f"{mb50:.0f} MB file"))
        # --- 25 µm, the most abundant types, scaled by type share
        counts = cells.obs["subclass"].value_counts()
        top = counts.index[: args.types_25]
        sub = cells[cells.obs["subclass"].isin(top).to_numpy()].copy()
        sub.obs["subclass"] = sub.obs["subclass"].cat.remove_unused_categories()
        sec25, size25 = time_densities(sub, 25.0, tmp / "d25.h5")
        scaled25 = sec25 * args.types / args.types_25
        rows.append(
            (
                f"cellmap2d 25 µm ({args.types_25} largest types, scaled)",
                scaled25,
                f"measured {sec25:.0f} s",
            )
        )
        # --- baselines
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
        kde_s = (time.perf_counter() - t) * size50 / 20_000 * args.types
        rows.append(("scipy gaussian_kde (2 000 cells/type, 50 µm, scaled)", kde_s, ""))
        # --- identity at 100 µm against all types
        sec100, _ = time_densities(cells, 100.0, tmp / "d100.h5")
        rows.append(("cellmap2d 100 µm, all types", sec100, ""))
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
    base = sec50
    print(f"\n{args.cells} cells, {args.types} types; peak RSS {rss_gb():.2f} GB\n")
    print("| what | seconds | × cellmap2d 50 µm | note |")
    print("|---|---|---|---|")
    for what, sec, note in rows:
        print(f"| {what} | {sec:.1f} | {sec / base:.1f} | {note} |")


if __name__ == "__main__":
    main()
