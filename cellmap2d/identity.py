"""Which cell types were labeled: compare a sample's cell density with ABC type densities.

:func:`score_types` ranks the types of a :class:`~cellmap2d.density.DensityFile` (or a mapping of
volumes) for one brain; :func:`challenge_table` and :func:`challenge_scores` turn per-brain results
into the MapMySections submission table and score it against the challenge's truth.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.optimize import nnls
from scipy.special import rel_entr

from cellmap2d._density_compute import gaussian_weights
from cellmap2d.density import (
    DensityFile,
    Grid,
    _bbox,
    _fold_ml,
    _fold_points,
    _points,
    resample_mask,
    sampled_mask,
)

__all__ = [
    "CHALLENGE_COLUMNS",
    "MIXTURES",
    "RANK_BY",
    "SCORE_COLUMNS",
    "challenge_column",
    "challenge_scores",
    "challenge_table",
    "brain_identity",
    "em_mixture",
    "emm_mixture",
    "reference_noise_bonus",
    "score_fractions",
    "score_types",
]

CHALLENGE_COLUMNS: tuple[str, ...] = (
    "ABC.NN",
    "Astro.TE.NN",
    "CLA.EPd.CTX.Car3.Glut",
    "Endo.NN",
    "L2.3.IT.CTX.Glut",
    "L4.5.IT.CTX.Glut",
    "L5.ET.CTX.Glut",
    "L5.IT.CTX.Glut",
    "L5.NP.CTX.Glut",
    "L6.CT.CTX.Glut",
    "L6.IT.CTX.Glut",
    "L6b.CTX.Glut",
    "Lamp5.Gaba",
    "Lamp5.Lhx6.Gaba",
    "Lymphoid.NN",
    "Microglia.NN",
    "OPC.NN",
    "Oligo.NN",
    "Peri.NN",
    "Pvalb.Gaba",
    "Pvalb.chandelier.Gaba",
    "SMC.NN",
    "Sncg.Gaba",
    "Sst.Chodl.Gaba",
    "Sst.Gaba",
    "VLMC.NN",
    "Vip.Gaba",
)
SCORE_COLUMNS: tuple[str, ...] = ("reference_score", "pearson", "js_distance", "log_likelihood")
MIXTURES: tuple[str, ...] = ("emc", "emm", "em", "nnls")
# score → True when larger is better
RANK_BY: dict[str, bool] = {
    "fraction": True,
    "fraction_emm": True,
    "fraction_emc": True,
    "fraction_em": True,
    "fraction_nnls": True,
    "reference_score": True,
    "pearson": True,
    "js_distance": False,
    "log_likelihood": True,
}
HIGH_FRACTION = 0.05  # reference score: MSE over voxels where the type density > 5 % of its max
LOW_FRACTION = 0.01  # reference score: penalty where the sample density < 1 % of its max
LOG_FLOOR = 1e-6  # log_likelihood floor, relative to the uniform density 1 / n_mask_voxels
_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter default
_BLOCK = 1 << 16  # voxels per block in float64 products
_SCORE_BLOCK = 1 << 22  # matrix elements per block when scoring
_ID_COLUMNS = ("brain_id", "MapMySectionsID")
_EM_TOL = 1e-7  # EM stops when no fraction moves by more than this
_EM_MAX_ITER = 2000
# weight of the reference-noise correction (fraction_emc): 1 is the second-order (Jensen) bias of
# the log of a kernel density estimate; 0.75 was chosen on development seeds 7 and 11 of
# benchmarks/identity_recovery.py (never on its default seed 1000)
NOISE_WEIGHT = 0.75
# weight of the mixture-aware reference-noise correction (fraction_emm): chosen on development
# seeds 7 and 11 of benchmarks/identity_recovery.py (1.25–2 did equally well there)
MIXTURE_NOISE_WEIGHT = 1.25
# emm_mixture works on the types with a start weight ≥ _SUPPORT and adds every type whose
# objective gradient exceeds 1 + _KKT_SLACK (1 at an interior optimum) until none is left
_SUPPORT = 1e-4
_KKT_SLACK = 1e-2
_BOOT_TOL = 1e-6  # emm bootstrap refits


# ------------------------------------------------------------------------------ scoring


def brain_identity(
    cells_ccf_um: np.ndarray,
    section_planes: list[tuple[np.ndarray, np.ndarray]],
    densities: DensityFile,
    *,
    brain_mask: np.ndarray,
    brain_mask_voxel_um: float,
    section_spacing_um: float,
    n_boot: int = 100,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    region_mask: np.ndarray | None = None,
    mixture: str = "emm",
    rank_by: str = "fraction",
    background: bool = True,
) -> pd.DataFrame:
    """Identity table of one brain, compared only where the brain was sampled.

    The comparison mask holds the voxels within half a section spacing of the brain's section
    planes and inside the brain (``brain_mask``, e.g. atlas annotation > 0 at its own voxel size),
    and, with ``region_mask``, inside that region too.

    Parameters
    ----------
    cells_ccf_um
        The brain's cells, CCF µm ``(n, 3)``.
    section_planes
        ``(point_um, normal)`` of every imaged section with tissue.
    densities
        The atlas type densities.
    brain_mask, brain_mask_voxel_um
        Inside-the-brain volume (any non-zero = inside) and its voxel size (µm).
    section_spacing_um
        Distance between consecutive sections; voxels within half of it from a plane count.
    region_mask
        Optional volume of ``brain_mask.shape`` at the same voxel size (e.g.
        ``np.isin(annotation, ontology.descendants("VISp"))``): compare only inside it, so the
        fractions are the shares of the labeled cells in that region.
    n_boot, seed, progress, mixture, rank_by, background
        As in :func:`score_types` (``background``: fit a component of false detections spread
        uniformly over the compared tissue; the default).
    """
    grid = densities.grid
    brain_mask = np.asarray(brain_mask) != 0
    if region_mask is not None:
        region_mask = np.asarray(region_mask) != 0
        if region_mask.shape != brain_mask.shape:
            raise ValueError(
                f"region_mask shape {region_mask.shape} differs from brain_mask shape "
                f"{brain_mask.shape} (both at brain_mask_voxel_um)"
            )
        brain_mask = brain_mask & region_mask
        if not brain_mask.any():
            raise ValueError("region_mask does not overlap the brain mask")
    inside = resample_mask(brain_mask, brain_mask_voxel_um, grid)
    mask = sampled_mask(
        grid, section_planes, half_thickness_um=section_spacing_um / 2, inside=inside
    )
    return score_types(
        cells_ccf_um,
        densities,
        mask,
        n_boot=n_boot,
        seed=seed,
        progress=progress,
        mixture=mixture,
        rank_by=rank_by,
        background=background,
    )


def score_types(
    sample_ccf_um: np.ndarray,
    densities: DensityFile | Mapping[str, np.ndarray],
    mask: np.ndarray,
    *,
    grid: Grid | None = None,
    sigma_um: float | None = None,
    n_boot: int = 100,
    seed: int = 0,
    rank_by: str = "fraction",
    fold_hemispheres: bool | None = None,
    progress: Callable[[str], None] | None = None,
    mixture: str = "emm",
    background: bool = True,
) -> pd.DataFrame:
    """Score and rank cell types by how well their density explains the sample's cells.

    The sample density is the histogram of the sample cells on the grid, smoothed with
    ``sigma_um`` and normalised to sum 1 over ``mask``. Each type density is restricted to the
    mask and renormalised there (types are read one at a time; only the masked values are kept,
    as a types × mask-voxels float32 matrix, so memory ≈ 4 · n_types · mask.sum() bytes).

    Parameters
    ----------
    sample_ccf_um
        (n, 3) CCF µm ``(ap, dv, ml)`` of the sample's cells; non-finite rows are ignored.
    densities
        A :class:`~cellmap2d.density.DensityFile`, or a mapping type name → volume of
        ``grid.shape`` (e.g. from :func:`~cellmap2d.density.type_densities`).
    mask
        bool volume of ``grid.shape``: the voxels compared (e.g. imaged sections ∧ brain, from
        :func:`~cellmap2d.density.sampled_mask`).
    grid, sigma_um
        Taken from a DensityFile (a different ``grid`` is an error; ``sigma_um`` overrides the
        file's sigma for the sample only); required for a mapping.
    n_boot, seed
        Bootstrap resamples of the cells for the fraction confidence interval (0: no interval,
        NaN columns) and the random seed.
    rank_by
        ``"fraction"`` (default), ``"fraction_emm"``, ``"fraction_emc"``, ``"fraction_em"``,
        ``"fraction_nnls"``, ``"reference_score"``, ``"pearson"``, ``"js_distance"`` (smaller is
        better) or ``"log_likelihood"``.
    mixture
        Which mixture fit is ``fraction`` (and gets the bootstrap interval): ``"emm"``
        (default; the mixture with the mixture-aware reference-noise correction,
        :func:`emm_mixture`), ``"emc"`` (the EM mixture over the cells with the per-type
        reference-noise bonus), ``"em"`` (plain maximum-likelihood EM mixture) or ``"nnls"``
        (least squares on the smoothed maps).
    fold_hemispheres
        Mirror sample cells right of the midline to the left (and reflect the smoothed sample
        at the midline) before comparing; default: the DensityFile's ``fold_hemispheres``
        attribute, False for a mapping.
    progress
        Called with short progress messages.

    Returns
    -------
    pandas.DataFrame
        One row per type, sorted by ``rank`` (1 = best), columns ``type, rank, fraction,
        fraction_low, fraction_high, fraction_emm, fraction_emc, fraction_em, fraction_nnls,
        reference_score, pearson, js_distance, log_likelihood, n_cells``:

        - ``fraction``: the ``mixture`` fit — the estimated share of the labeled cells per type
          in the compared region; ``fraction_low/high``: 2.5/97.5 percentiles over ``n_boot``
          bootstrap resamples of the cells.
        - ``fraction_emm``: the mixture with the mixture-aware reference-noise correction
          (:func:`emm_mixture`, bonus :func:`reference_noise_bonus` with weight
          ``MIXTURE_NOISE_WEIGHT``): a type earns its bonus on a cell in proportion to the
          square of its responsibility for the cell, so single-type brains keep the gain of
          ``fraction_emc`` while a rare type that is a minor component of a mixture earns
          little and no longer takes cells from the major one (bootstrap refits with
          ``mixture="emm"`` start from it). The default.
        - ``fraction_emc``: the EM mixture with each type's likelihood multiplied by
          ``exp(reference_noise_bonus)``, which undoes the expected log-likelihood deficit of a
          density estimated from few reference cells (:func:`reference_noise_bonus`); without
          it rare types lose their cells to well-sampled look-alikes.
        - ``fraction_em``: maximum-likelihood mixture weights of the cells inside the mask
          (:func:`em_mixture`): each cell's likelihood under type k is the type's normalised
          masked density at the cell's voxel (floored like ``log_likelihood``).
        - ``fraction_nnls``: non-negative least-squares fit of the smoothed sample density by the
          type densities, normalised to sum 1.
        - ``reference_score``: the CellMap2D score ``1 / (MSE + penalty)``, MSE over the voxels
          where the type density exceeds 5 % of its maximum, penalty = share of the type's
          density where the sample density is below 1 % of its maximum (normalised maps).
        - ``pearson``: correlation of the two maps over the mask.
        - ``js_distance``: Jensen–Shannon distance (base 2, in [0, 1]; 0 = identical maps).
        - ``log_likelihood``: mean log of the type's normalised masked density at the voxels
          of the sample cells inside the mask, floored at ``LOG_FLOOR / mask.sum()``.
        - ``n_cells``: reference cells of the type (the DensityFile's count, or the total of the
          mapping's volume).

        Types with no density in the mask get fraction 0 and NaN scores (log_likelihood = log
        of the floor). ``df.attrs`` holds ``n_sample_cells``, ``n_sample_cells_in_mask``,
        ``n_mask_voxels``, ``sigma_um``, ``voxel_um``, ``rank_by``.

    Notes
    -----
    Ranking: by ``rank_by`` (default the mixture-aware corrected fraction ``fraction_emm``: on
    the phantom benchmark ``benchmarks/identity_recovery.py`` it has the best Brier score for
    single types and mixtures and the best mixture top-1, and it keeps the major type of a
    mixture where ``fraction_emc`` leaks it to rare look-alikes, the more so the more types are
    compared; ``fraction_emc`` has the better single-type top-1, see ``docs/identity.md``),
    ties broken by Pearson correlation, NaN last.

    Raises
    ------
    ValueError
        No sample cells, no sample cell inside the mask, an empty mask, shape mismatches, an
        unknown ``rank_by``.
    """
    say = progress or (lambda _msg: None)
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {list(RANK_BY)}, got {rank_by!r}")
    if mixture not in MIXTURES:
        raise ValueError(f"mixture must be one of {list(MIXTURES)}, got {mixture!r}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")

    if isinstance(densities, DensityFile):
        if grid is not None and grid != densities.grid:
            raise ValueError(f"grid {grid} differs from the density file's grid {densities.grid}")
        grid = densities.grid
        sigma_um = densities.sigma_um if sigma_um is None else sigma_um
        fold = densities.fold_hemispheres if fold_hemispheres is None else fold_hemispheres
        names = list(densities.names)
    else:
        if grid is None or sigma_um is None:
            raise ValueError("grid and sigma_um are required when densities is a mapping")
        fold = bool(fold_hemispheres)
        keys = list(densities)
        names = [str(n) for n in keys]
    if not names:
        raise ValueError("no type densities given")
    if not (math.isfinite(sigma_um) and sigma_um >= 0):
        raise ValueError(f"sigma_um must be >= 0, got {sigma_um!r}")

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != grid.shape:
        raise ValueError(f"mask shape {mask.shape} does not match grid shape {grid.shape}")
    n_mask = int(mask.sum())
    if n_mask == 0:
        raise ValueError("the mask is empty: no voxel to compare")

    pts = _points(sample_ccf_um) if np.size(sample_ccf_um) else np.empty((0, 3))
    pts = pts[np.isfinite(pts).all(axis=1)]
    n_cells_total = len(pts)
    if n_cells_total == 0:
        raise ValueError(
            "no sample cells (zero cells with finite CCF coordinates): nothing to score"
        )
    if fold:
        pts = _fold_points(pts)

    sample = _Sample(pts, grid, mask, sigma_um, fold)
    if sample.n_in_mask == 0:
        raise ValueError(
            f"none of the {n_cells_total} sample cells lies inside the mask ({n_mask} voxels)"
        )
    s = sample.vector(sample.counts)
    if s is None:
        raise ValueError("the smoothed sample density has no mass inside the mask")

    # ---- type matrix (types × mask voxels), one type at a time; with ``background`` one more
    # row: the background's smoothed map (for NNLS, comparable with the smoothed sample)
    k = len(names)
    T = np.zeros((k + int(background), n_mask), dtype=np.float32)
    n_ref = np.zeros(k, dtype=np.float64)
    n_in_mask = np.zeros(k, dtype=np.float64)  # reference cells in the mask
    sum_sq = np.zeros(k, dtype=np.float64)  # Σ p² of the normalised masked density
    for i, name in enumerate(names):
        if isinstance(densities, DensityFile):
            values = densities.read_masked(name, mask)
            n_ref[i] = densities.counts.get(name, np.nan)
        else:
            volume = np.asarray(densities[keys[i]])
            if volume.shape != grid.shape:
                raise ValueError(
                    f"density of {name!r} has shape {volume.shape}, expected {grid.shape}"
                )
            values = volume[mask]
            n_ref[i] = float(volume.sum(dtype=np.float64))
        total = float(values.sum(dtype=np.float64))
        if total > 0 and math.isfinite(total):
            T[i] = values / total
            n_in_mask[i] = total
            sum_sq[i] = float(np.square(T[i], dtype=np.float64).sum())
        say(f"types {i + 1}/{len(names)}: {name}")
    has_mass = T[:k].sum(axis=1, dtype=np.float64) > 0
    # rows of the cell-likelihood fits in the full (types + background) index space
    rows = np.flatnonzero(has_mass)
    if background:
        T[k] = sample.uniform(smoothed=True)
        rows = np.append(rows, k)

    # ---- mixture fits and bootstrap (full weight vectors: types, then background)
    solver = _MixtureSolver(T)
    full_nnls = solver.fit(_matvec(T, s))
    in_mask = sample.mask_pos >= 0
    cell_pos = sample.mask_pos[in_mask]
    cell_w = sample.counts[in_mask]
    floor = LOG_FLOOR / n_mask
    L = np.maximum(T[np.ix_(has_mass, cell_pos)].astype(np.float64), floor)
    if background:
        L = np.vstack([L, np.maximum(sample.uniform(smoothed=False)[cell_pos], floor)])
    ref_sigma = densities.sigma_um if isinstance(densities, DensityFile) else sigma_um
    bonus = reference_noise_bonus(n_in_mask[has_mass], sum_sq[has_mass], ref_sigma / grid.voxel_um)
    bonus_m = reference_noise_bonus(
        n_in_mask[has_mass],
        sum_sq[has_mass],
        ref_sigma / grid.voxel_um,
        weight=MIXTURE_NOISE_WEIGHT,
    )
    if background:  # the background density is exact: no reference-noise bonus
        bonus, bonus_m = np.append(bonus, 0.0), np.append(bonus_m, 0.0)
    Lc = L * np.exp(bonus)[:, None]

    def full(f: np.ndarray) -> np.ndarray:
        out = np.zeros(len(T))
        out[rows] = f
        return out

    full_em = full(em_mixture(L, cell_w))
    if background:
        # the reference-noise bonuses would let diffuse, rarely sampled types take the false
        # detections from the exact background: the corrected fits keep the plain EM's
        # background share and fit the types to each cell's chance of being a real cell
        share, cell_real = _real_cell_weights(L, full_em[rows], cell_w)
        if not cell_real.sum() > 0:  # every detection is background: nothing to share out
            cell_real = cell_w.astype(np.float64)
        types_emc = em_mixture(Lc[:-1], cell_real)
        types_emm = emm_mixture(
            L[:-1], bonus_m[:-1], cell_real, starts=(full_em[rows][:-1], types_emc)
        )
        full_emc = full(np.append((1 - share) * types_emc, share))
        full_emm = full(np.append((1 - share) * types_emm, share))
    else:
        full_emc = full(em_mixture(Lc, cell_w))
        full_emm = full(emm_mixture(L, bonus_m, cell_w, starts=(full_em[rows], full_emc[rows])))
    fits = {"emm": full_emm, "emc": full_emc, "em": full_em, "nnls": full_nnls}
    chosen = fits[mixture]
    fraction_of = {m: _type_shares(f, k) for m, f in fits.items()}
    fraction = fraction_of[mixture]
    low = np.full(k, np.nan)
    high = np.full(k, np.nan)
    bg_low = bg_high = np.nan
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        boots = np.zeros((n_boot, len(T)))
        valid = np.zeros(n_boot, dtype=bool)
        # the cell-likelihood fits, refitted to resampled cell counts from the full-data fit
        refit: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            "emm": lambda w: emm_mixture(
                L, bonus_m, w, starts=(chosen[rows],), uniform=False, tol=_BOOT_TOL
            ),
            "emc": lambda w: em_mixture(Lc, w, start=chosen[rows]),
            "em": lambda w: em_mixture(L, w, start=chosen[rows]),
        }
        if background:

            def corrected(w: np.ndarray, fit: str) -> np.ndarray:
                share, real = _real_cell_weights(L, em_mixture(L, w, start=full_em[rows]), w)
                if not real.sum() > 0:
                    real = w.astype(np.float64)
                start = chosen[rows][:-1] / max(1 - chosen[k], 1e-12)
                if fit == "emc":
                    types = em_mixture(Lc[:-1], real, start=start)
                else:
                    types = emm_mixture(
                        L[:-1], bonus_m[:-1], real, starts=(start,), uniform=False, tol=_BOOT_TOL
                    )
                return np.append((1 - share) * types, share)

            refit["emm"] = lambda w: corrected(w, "emm")
            refit["emc"] = lambda w: corrected(w, "emc")
        if mixture in refit:
            for b in range(n_boot):
                w = sample.resample(rng)[in_mask]
                if w.sum() > 0:
                    boots[b, rows] = refit[mixture](w)
                    valid[b] = True
                if (b + 1) % 16 == 0 or b + 1 == n_boot:
                    say(f"bootstrap {b + 1}/{n_boot}")
        else:
            batch = 16
            for start in range(0, n_boot, batch):
                stop = min(start + batch, n_boot)
                S = np.zeros((n_mask, stop - start))
                ok = np.zeros(stop - start, dtype=bool)
                for j in range(stop - start):
                    sb = sample.vector(sample.resample(rng))
                    if sb is not None:
                        S[:, j] = sb
                        ok[j] = True
                C = _matvec(T, S)
                for j in np.flatnonzero(ok):
                    boots[start + j] = solver.fit(C[:, j])
                valid[start:stop] = ok
                say(f"bootstrap {stop}/{n_boot}")
        if valid.any():
            shares = np.array([_type_shares(f, k) for f in boots[valid]])
            low, high = np.percentile(shares, [2.5, 97.5], axis=0)
            if background:
                bg_low, bg_high = np.percentile(boots[valid, k], [2.5, 97.5])

    # ---- scores; with a background, on the cells and map the default fit gives to the types
    s_types, ll_weight = s, None
    if background:
        beta = float(chosen[k])
        cleaned = np.clip(s - beta * T[k].astype(np.float64), 0.0, None)
        if cleaned.sum() > 0:
            s_types = cleaned / cleaned.sum()
        mix = chosen[rows] @ L
        ll_weight = cell_w * np.clip(1.0 - chosen[k] * L[-1] / mix, 0.0, 1.0)
        if not ll_weight.sum() > 0:
            ll_weight = None
    scores = _scores(T[:k], s_types, sample, n_mask, ll_weight)

    nan = float("nan")
    table = pd.DataFrame(
        {
            "type": names,
            "fraction": fraction,
            "fraction_low": low,
            "fraction_high": high,
            "fraction_emm": fraction_of["emm"],
            "fraction_emc": fraction_of["emc"],
            "fraction_em": fraction_of["em"],
            "fraction_nnls": fraction_of["nnls"],
            **scores,
            "n_cells": n_ref,
            "background": float(chosen[k]) if background else nan,
            "background_low": bg_low,
            "background_high": bg_high,
        }
    )
    table.loc[~has_mass, ["reference_score", "pearson", "js_distance"]] = np.nan
    larger_better = RANK_BY[rank_by]
    keys = [rank_by] if rank_by == "pearson" else [rank_by, "pearson"]
    table = table.sort_values(
        keys,
        ascending=[not larger_better] + [False] * (len(keys) - 1),
        na_position="last",
        kind="mergesort",
    ).reset_index(drop=True)
    table.insert(1, "rank", np.arange(1, len(table) + 1))
    table.attrs.update(
        {
            "n_sample_cells": int(n_cells_total),
            "n_sample_cells_in_mask": int(sample.n_in_mask),
            "n_mask_voxels": n_mask,
            "sigma_um": float(sigma_um),
            "voxel_um": float(grid.voxel_um),
            "rank_by": rank_by,
            "mixture": mixture,
            "background": bool(background),
            # every fit's background share (of the detections in the mask)
            **{f"background_{m}": float(f[k]) if background else nan for m, f in fits.items()},
        }
    )
    return table


def _real_cell_weights(
    L: np.ndarray, fit: np.ndarray, weights: np.ndarray
) -> tuple[float, np.ndarray]:
    """The background share of a fit whose last row of ``L`` is the background, and each
    occupied voxel's cell weight × its posterior chance of holding real cells."""
    mix = np.maximum(fit @ L, 1e-300)
    real = weights * np.clip(1.0 - fit[-1] * L[-1] / mix, 0.0, 1.0)
    return float(fit[-1]), real


def _type_shares(f: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` (type) weights of a fit renormalised to sum 1 (zeros if none)."""
    types = np.asarray(f[:k], dtype=np.float64)
    total = float(types.sum())
    return types / total if total > 0 else np.zeros(k)


class _Sample:
    """The sample's cells on a crop of the grid large enough to smooth the masked voxels exactly.

    The crop is the mask's bounding box grown by the Gaussian kernel radius (the full ML axis when
    folding), so smoothing the crop with reflecting edges gives the same values on the mask as
    smoothing the whole grid.
    """

    def __init__(
        self, pts: np.ndarray, grid: Grid, mask: np.ndarray, sigma_um: float, fold: bool
    ) -> None:
        self.grid = grid
        self.fold = fold
        self.sigma_vox = sigma_um / grid.voxel_um
        radius = int(_TRUNCATE * self.sigma_vox + 0.5) + 1
        box = _bbox(mask)
        assert box is not None
        crop = []
        for axis, (sl, n) in enumerate(zip(box, grid.shape, strict=True)):
            if fold and axis == 2:
                crop.append(slice(0, n))
            else:
                crop.append(slice(max(sl.start - radius, 0), min(sl.stop + radius, n)))
        self.crop = tuple(crop)
        self.crop_shape = tuple(s.stop - s.start for s in self.crop)
        self.crop_mask = mask[self.crop]
        # crop-local voxel of each cell (-1 outside the crop)
        idx = grid.index(pts) - np.array([s.start for s in self.crop])
        inside = grid.inside(pts) & ((idx >= 0) & (idx < np.array(self.crop_shape))).all(axis=1)
        local = np.full(len(pts), -1, dtype=np.int64)
        local[inside] = np.ravel_multi_index(tuple(idx[inside].T), self.crop_shape)
        self.n_total = len(pts)
        self.voxels, self.counts = np.unique(local[inside], return_counts=True)
        # mask-local position of each occupied voxel (-1 outside the mask)
        mask_pos = np.full(int(np.prod(self.crop_shape)), -1, dtype=np.int64)
        mask_pos[np.flatnonzero(self.crop_mask.ravel())] = np.arange(int(self.crop_mask.sum()))
        self.mask_pos = mask_pos[self.voxels]
        self.n_in_mask = int(self.counts[self.mask_pos >= 0].sum())
        n_out = self.n_total - int(self.counts.sum())
        self._p = np.append(self.counts, n_out) / self.n_total

    def resample(self, rng: np.random.Generator) -> np.ndarray:
        """Counts per occupied voxel of one bootstrap resample of all cells."""
        return rng.multinomial(self.n_total, self._p)[:-1]

    def uniform(self, *, smoothed: bool) -> np.ndarray:
        """The background density: uniform over the mask's voxels (folded like the cells),
        optionally smoothed like the sample; normalised over the mask (float64, mask order)."""
        vol = self.crop_mask.astype(np.float64)
        if smoothed and self.sigma_vox > 0:
            vol = ndimage.gaussian_filter(
                vol, sigma=self.sigma_vox, mode="reflect", truncate=_TRUNCATE
            )
        if self.fold:
            _fold_ml(vol, self.grid)
        values = vol[self.crop_mask]
        return values / values.sum()

    def vector(self, counts: np.ndarray) -> np.ndarray | None:
        """Smoothed density normalised over the mask (float64, mask order); None if no mass."""
        hist = np.bincount(
            self.voxels, weights=counts.astype(np.float64), minlength=int(np.prod(self.crop_shape))
        ).reshape(self.crop_shape)
        if self.sigma_vox > 0:
            hist = ndimage.gaussian_filter(
                hist, sigma=self.sigma_vox, mode="reflect", truncate=_TRUNCATE
            )
        if self.fold:
            _fold_ml(hist, self.grid)
        values = hist[self.crop_mask]
        total = float(values.sum())
        if not (total > 0 and math.isfinite(total)):
            return None
        return values / total


def _matvec(T: np.ndarray, S: np.ndarray) -> np.ndarray:
    """``T @ S`` in float64, in voxel blocks (T is float32 types × voxels)."""
    out = np.zeros((T.shape[0],) + S.shape[1:])
    for lo in range(0, T.shape[1], _BLOCK):
        hi = min(lo + _BLOCK, T.shape[1])
        out += T[:, lo:hi].astype(np.float64) @ S[lo:hi]
    return out


class _MixtureSolver:
    """Non-negative least squares ``min ||Tᵀf − s||, f ≥ 0`` through the Gram matrix ``T Tᵀ``.

    With ``G = V Λ Vᵀ`` the problem equals ``min ||Λ^½ Vᵀ f − Λ^-½ Vᵀ (T s)||`` (T s lies in the
    range of G), a small types × types NNLS whatever the number of voxels.
    """

    def __init__(self, T: np.ndarray) -> None:
        G = (T @ T.T).astype(np.float64)  # one float32 GEMM: rel. error ~1e-6 per element
        self.gram_diag = np.diag(G).copy()
        w, V = np.linalg.eigh(G)
        keep = w > max(float(w.max()), 0.0) * 1e-12
        self.sqrt_w = np.sqrt(w[keep])
        self.Vt = V[:, keep].T
        self.A = self.sqrt_w[:, None] * self.Vt

    def fit(self, c: np.ndarray) -> np.ndarray:
        """Normalised NNLS weights for ``c = T s``; zeros if none is positive."""
        k = self.Vt.shape[1]
        if self.A.shape[0] == 0:
            return np.zeros(k)
        b = (self.Vt @ c) / self.sqrt_w
        f, _ = nnls(self.A, b, maxiter=50 * k)
        total = f.sum()
        return f / total if total > 0 else np.zeros(k)


def reference_noise_bonus(
    n_reference: np.ndarray,
    sum_sq: np.ndarray,
    sigma_vox: float,
    *,
    weight: float = NOISE_WEIGHT,
) -> np.ndarray:
    """Per-type log-likelihood correction for densities estimated from few reference cells.

    A type density that is a Gaussian kernel estimate from ``n`` cells is noisy: at a voxel with
    true density ``p`` (normalised over the compared voxels) its variance is
    ``p / (n · V)``, with ``V = 1 / Σ K²`` the kernel's effective volume in voxels. The log of a
    noisy estimate is biased low (Jensen) by half its relative variance, so a fresh sample of
    the type scores on average ``½ · M / (n · V)`` nats per cell worse than under the true
    density, ``M = 1 / Σ p²`` the type's effective volume. Well-sampled look-alike types do not
    pay this, so the plain likelihood hands a rare type's cells to them. The bonus is
    ``weight · ½ · ρ`` with ``ρ = (1 / (n · V)) / Σ p̂²``: since ``Σ p̂² ≈ Σ p² + 1 / (n · V)``,
    ``ρ = r / (1 + r)`` for the relative variance ``r = M / (n · V)``, so the bonus saturates at
    ``weight / 2`` for types with hardly any cells. A bonus equal for all types changes nothing.

    Parameters
    ----------
    n_reference
        Per type, the reference cells in the compared voxels (the masked sum of a density in
        count units, as :func:`~cellmap2d.density.type_densities` writes them).
    sum_sq
        Per type, ``Σ p̂²`` of its density normalised over the compared voxels.
    sigma_vox
        Gaussian sigma of the type densities, in voxels (0: a plain histogram).
    weight
        Multiplier of the second-order bias (1 = the bias itself).

    Returns
    -------
    numpy.ndarray
        Per type, the bonus in nats per cell (in ``[0, weight / 2]``; 0 where ``n`` or
        ``sum_sq`` is not positive).
    """
    n = np.asarray(n_reference, dtype=np.float64)
    s2 = np.asarray(sum_sq, dtype=np.float64)
    noise = 1.0 / (np.where(n > 0, n, np.inf) * _kernel_volume(sigma_vox))
    rho = np.where(s2 > 0, noise / np.where(s2 > 0, s2, 1.0), 0.0)
    return weight * 0.5 * np.clip(rho, 0.0, 1.0)


def _kernel_volume(sigma_vox: float) -> float:
    """``1 / Σ K²`` of the separable, normalised 3-D Gaussian of scipy's ``gaussian_filter``."""
    if sigma_vox <= 0:
        return 1.0
    k = gaussian_weights(sigma_vox)
    return float(1.0 / (k @ k) ** 3)


def em_mixture(
    likelihood: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    start: np.ndarray | None = None,
    tol: float = _EM_TOL,
    max_iter: int = _EM_MAX_ITER,
) -> np.ndarray:
    """Maximum-likelihood mixture weights by EM (SQUAREM-accelerated).

    Maximises ``Σ_j w_j log Σ_k f_k L[k, j]`` over ``f ≥ 0, Σ f = 1``, a concave problem, so
    the optimum does not depend on the start (up to ties between identical rows).

    Parameters
    ----------
    likelihood
        ``(types, cells)`` positive likelihood of each cell (or occupied voxel) under each type.
    weights
        Per column multiplicity (e.g. cells per voxel); ones by default.
    start
        Initial weights (uniform by default), e.g. the full-data fit when bootstrapping.
    tol, max_iter
        Stop when no weight moves by more than ``tol`` in an iteration, or after ``max_iter``.

    Returns
    -------
    numpy.ndarray
        ``(types,)`` weights summing to 1 (all zero when ``weights`` sums to 0).
    """
    k = np.shape(likelihood)[0]
    inputs = _mixture_inputs(likelihood, weights)
    if inputs is None:
        return np.zeros(k)
    L, w = inputs

    def step(f: np.ndarray) -> np.ndarray:
        out = f * (L @ (w / (f @ L)))
        return out / out.sum()

    def loglik(f: np.ndarray) -> float:
        return float(w @ np.log(f @ L))

    f = np.full(k, 1.0 / k) if start is None else np.asarray(start, dtype=np.float64).copy()
    if f.shape != (k,):
        raise ValueError(f"start must have shape ({k},), got {f.shape}")
    return _squarem(f, step, loglik, tol, max_iter)


def _mixture_inputs(
    likelihood: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Checked ``(types, cells)`` likelihoods of the cells with positive weight and their
    weights summing to 1; None when there is nothing to fit (no types, no weight)."""
    L = np.asarray(likelihood, dtype=np.float64)
    k, m = L.shape
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (m,):
        raise ValueError(f"weights must have shape ({m},), got {w.shape}")
    keep = w > 0
    L, w = L[:, keep], w[keep]
    total = float(w.sum())
    if k == 0 or total <= 0:
        return None
    if not (np.isfinite(L).all() and (L > 0).all()):
        raise ValueError("likelihoods must be finite and > 0 (floor them)")
    return L, w / total


def _squarem(
    f: np.ndarray,
    step: Callable[[np.ndarray], np.ndarray],
    objective: Callable[[np.ndarray], float],
    tol: float,
    max_iter: int,
) -> np.ndarray:
    """Iterate the fixed-point map ``step`` (EM or MM on the simplex) from ``f``, SQUAREM-
    accelerated: an extrapolated point is kept only if its ``objective`` is no worse."""
    # a start on the boundary cannot leave it under EM: keep every weight slightly positive
    f = np.maximum(f, 1e-3 / len(f))
    f /= f.sum()
    for _ in range(max_iter):
        f1 = step(f)
        f2 = step(f1)
        r = f1 - f
        v = f2 - f1 - r
        if np.abs(f2 - f1).max() < tol:
            return f2
        nv = float(np.sqrt(v @ v))
        if nv == 0:
            f = f2
            continue
        alpha = min(-float(np.sqrt(r @ r)) / nv, -1.0)
        # extrapolate, but never to the boundary (EM cannot leave a zero weight): a weight may
        # shrink by at most 1000× per iteration
        g = np.maximum(f - 2 * alpha * r + alpha * alpha * v, 1e-3 * f)
        g = step(g / g.sum())
        f = g if objective(g) >= objective(f2) else f2
    return f


def emm_mixture(
    likelihood: np.ndarray,
    bonus: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    starts: Sequence[np.ndarray] = (),
    uniform: bool = True,
    tol: float = _EM_TOL,
    max_iter: int = _EM_MAX_ITER,
) -> np.ndarray:
    """Mixture weights with the mixture-aware reference-noise correction.

    Maximises, over ``f ≥ 0, Σ f = 1``,

    ``J(f) = Σ_j w_j [log m_j + Σ_k b_k γ_jk²]``, ``m_j = Σ_k f_k L[k, j]``,
    ``γ_jk = f_k L[k, j] / m_j``

    (``γ_jk`` is type k's responsibility for cell j, ``b_k`` its :func:`reference_noise_bonus`).

    Why: each type density is a kernel estimate from ``n_k`` reference cells, and the log of a
    noisy estimate is biased low by half its relative variance (Jensen). For a mixture the noisy
    quantity is ``m_j = Σ_k f_k p̂_k``, whose variance is ``Σ_k f_k² Var(p̂_k)``: relative to
    ``m_j²`` that is ``Σ_k γ_jk² r_k`` with ``r_k`` the relative variance of type k, so the
    expected deficit is ``½ Σ_k γ_jk² r_k`` and ``b_k γ_jk²`` adds it back (``b_k = weight · ½ ·
    ρ_k``, ``ρ_k`` a bounded estimate of ``r_k``). A brain of one type (``γ = 1``) gets exactly
    the bonus of :func:`em_mixture` on ``L · exp(b)`` (``fraction_emc``), which gives rare types
    their cells back; but a type that explains only a share of a cell earns only the square of
    that share, so in a mixture a rare look-alike no longer takes cells from a well-sampled major
    component for its bonus (``fraction_emc`` rewards shares linearly and leaks mass to rare
    look-alikes).

    ``J`` is not concave (the bonus term is convex in the responsibilities): the fit runs from
    the uniform weights (unless ``uniform=False``) and from every ``starts`` entry (e.g. the
    plain and the ``emc`` EM solutions) and keeps the best objective. Each run is the
    fixed-point iteration ``f_k ← f_k (∂J/∂f_k + a) / (1 + a)`` (EM when ``b = 0``;
    ``a = max(0, 2 max b − 1)`` keeps it positive), SQUAREM-accelerated with an objective
    check, as :func:`em_mixture`. With ``starts``, the runs only move the types some start
    gives a weight ≥ 1e-4 (a working set); every type whose gradient ``∂J/∂f_k`` then exceeds
    1.01 (it would gain weight) joins and the fit resumes from the best run, until the result
    is stationary over all types (every type at 0 has gradient ≤ 1.01). This keeps refits
    against hundreds of types fast.

    Parameters
    ----------
    likelihood
        ``(types, cells)`` positive likelihood of each cell (or occupied voxel) under each type.
    bonus
        ``(types,)`` per-type bonus ``b_k ≥ 0`` in nats (:func:`reference_noise_bonus`); all
        zero gives the plain maximum-likelihood mixture.
    weights
        Per column multiplicity (e.g. cells per voxel); ones by default.
    starts
        Extra initial weights ``(types,)``.
    uniform
        Also start from uniform weights.
    tol, max_iter
        Per run: stop when no weight moves by more than ``tol`` in an iteration, or after
        ``max_iter``.

    Returns
    -------
    numpy.ndarray
        ``(types,)`` weights summing to 1 (all zero when ``weights`` sums to 0).
    """
    k = np.shape(likelihood)[0]
    b = np.asarray(bonus, dtype=np.float64)
    if b.shape != (k,):
        raise ValueError(f"bonus must have shape ({k},), got {b.shape}")
    if not (np.isfinite(b).all() and (b >= 0).all()):
        raise ValueError("bonus must be finite and >= 0")
    inputs = _mixture_inputs(likelihood, weights)
    if inputs is None:
        return np.zeros(k)
    L, w = inputs
    L2 = L * L
    shift = max(0.0, 2.0 * float(b.max()) - 1.0)
    inits = [np.asarray(s, dtype=np.float64) for s in starts]
    for init in inits:
        if init.shape != (k,):
            raise ValueError(f"start must have shape ({k},), got {init.shape}")
    if not inits and not uniform:
        raise ValueError("no start: give starts or uniform=True")
    # working set: the types some start gives weight (all of them without starts)
    work = np.zeros(k, dtype=bool)
    for init in inits:
        work |= init >= _SUPPORT * init.sum()
    if not inits or not work.any():
        work[:] = True
    runs = ([None] if uniform else []) + inits
    best = np.zeros(k)
    for _ in range(k):
        idx = np.flatnonzero(work)
        best_obj = -np.inf
        for init in runs:
            f0 = np.full(len(idx), 1.0 / len(idx)) if init is None else init[idx]
            f = _emm_run(f0, L[idx], L2[idx], b[idx], w, shift, tol, max_iter)
            obj = _emm_parts(f, L[idx], L2[idx], b[idx], w)[2]
            if obj > best_obj:
                best_obj = obj
                best = np.zeros(k)
                best[idx] = f
        if work.all():
            break
        # KKT on all types: add those that would gain weight; else best is stationary
        add = (_emm_gradient(best, L, b, w, L2) > 1.0 + _KKT_SLACK) & ~work
        if not add.any():
            break
        work |= add
        runs = [best]
    return best


def _emm_parts(
    f: np.ndarray, L: np.ndarray, L2: np.ndarray, b: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Mixture ``m_j``, bonus ``c_j = Σ_k b_k γ_jk²`` and objective of :func:`emm_mixture`."""
    mix = f @ L
    c = ((b * f * f) @ L2) / (mix * mix)
    return mix, c, float(w @ (np.log(mix) + c))


def _emm_step(
    f: np.ndarray, L: np.ndarray, L2: np.ndarray, b: np.ndarray, w: np.ndarray, shift: float
) -> np.ndarray:
    """``f_k (∂J/∂f_k + shift) / (1 + shift)``, renormalised (``Σ_k f_k ∂J/∂f_k = 1``)."""
    mix, c, _ = _emm_parts(f, L, L2, b, w)
    out = f * (L @ (w * (1.0 + shift - 2.0 * c) / mix))
    out += 2.0 * b * f * f * (L2 @ (w / (mix * mix)))
    out = np.maximum(out, 0.0)
    return out / out.sum()


def _emm_run(
    f0: np.ndarray,
    L: np.ndarray,
    L2: np.ndarray,
    b: np.ndarray,
    w: np.ndarray,
    shift: float,
    tol: float,
    max_iter: int,
) -> np.ndarray:
    """One SQUAREM-accelerated run of :func:`_emm_step` from ``f0``."""
    return _squarem(
        np.asarray(f0, dtype=np.float64),
        lambda f: _emm_step(f, L, L2, b, w, shift),
        lambda f: _emm_parts(f, L, L2, b, w)[2],
        tol,
        max_iter,
    )


def _emm_gradient(
    f: np.ndarray, L: np.ndarray, b: np.ndarray, w: np.ndarray, L2: np.ndarray | None = None
) -> np.ndarray:
    """``∂J/∂f`` of :func:`emm_mixture`'s objective (``w`` summing to 1): 1 on the types with
    weight at a stationary point, ≤ 1 on those at 0."""
    L2 = L * L if L2 is None else L2
    mix, c, _ = _emm_parts(f, L, L2, b, w)
    return L @ (w * (1.0 - 2.0 * c) / mix) + 2.0 * b * f * (L2 @ (w / (mix * mix)))


def score_fractions(table: pd.DataFrame, score: str, *, n_cells: int | None = None) -> pd.Series:
    """Turn one score column of an identity table into fractions, as an entrant would.

    - ``fraction*``: the mixture fit itself;
    - ``reference_score``, ``pearson``: positive scores normalised to sum 1 (negative → 0);
    - ``js_distance``: similarity ``1 − d`` normalised to sum 1;
    - ``log_likelihood``: the posterior of "all cells come from type k" under a uniform prior,
      ``softmax(n_cells · log_likelihood)`` (``n_cells`` default: ``table.attrs
      ["n_sample_cells_in_mask"]``).

    NaN scores count as 0. Returns a Series indexed by ``type`` summing to 1 (uniform if no
    score is positive).
    """
    if score not in RANK_BY:
        raise ValueError(f"score must be one of {list(RANK_BY)}, got {score!r}")
    x = pd.to_numeric(table[score], errors="coerce").to_numpy(dtype=np.float64)
    if score == "log_likelihood":
        n = n_cells if n_cells is not None else int(table.attrs.get("n_sample_cells_in_mask", 1))
        z = np.where(np.isfinite(x), x * n, -np.inf)
        z = np.exp(z - z.max()) if np.isfinite(z).any() else np.zeros_like(z)
    elif score == "js_distance":
        z = np.where(np.isfinite(x), 1.0 - x, 0.0)
    else:
        z = np.where(np.isfinite(x), np.clip(x, 0.0, None), 0.0)
    total = z.sum()
    z = z / total if total > 0 else np.full(len(z), 1.0 / max(len(z), 1))
    return pd.Series(z, index=pd.Index(table["type"].astype(str), name="type"), name=score)


def _scores(
    T: np.ndarray,
    s: np.ndarray,
    sample: _Sample,
    n_mask: int,
    cell_weight: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Map scores of every type against the sample map ``s``; ``log_likelihood`` over the
    occupied voxels in the mask weighted by ``cell_weight`` (default: their cell counts)."""
    k = T.shape[0]
    ref = np.full(k, np.nan)
    pearson = np.full(k, np.nan)
    js = np.full(k, np.nan)
    low = s < LOW_FRACTION * s.max()
    s_c = s - s.mean()
    s_norm = math.sqrt(float(s_c @ s_c))
    s_varies = bool(np.ptp(s) > 1e-12 * s.max())
    rows = max(1, _SCORE_BLOCK // max(n_mask, 1))
    for lo in range(0, k, rows):
        t = T[lo : lo + rows].astype(np.float64)
        total = t.sum(axis=1)
        ok = total > 0
        # reference score (CellMap2D)
        high = t > HIGH_FRACTION * t.max(axis=1, keepdims=True)
        n_high = high.sum(axis=1)
        mse = np.where(high, (s - t) ** 2, 0.0).sum(axis=1) / np.maximum(n_high, 1)
        penalty = t[:, low].sum(axis=1) / np.where(ok, total, 1.0)
        with np.errstate(divide="ignore"):
            ref[lo : lo + rows] = np.where(ok, 1.0 / (mse + penalty), np.nan)
        # Pearson
        t_c = t - t.mean(axis=1, keepdims=True)
        denom = np.sqrt((t_c * t_c).sum(axis=1)) * s_norm
        varies = (np.ptp(t, axis=1) > 1e-12 * t.max(axis=1)) & s_varies
        with np.errstate(invalid="ignore", divide="ignore"):
            pearson[lo : lo + rows] = np.where(varies & (denom > 0), (t_c @ s_c) / denom, np.nan)
        # Jensen–Shannon distance, base 2
        m = 0.5 * (t + s)
        div = 0.5 * (rel_entr(t, m).sum(axis=1) + rel_entr(s, m).sum(axis=1)) / math.log(2.0)
        js[lo : lo + rows] = np.where(ok, np.sqrt(np.clip(div, 0.0, 1.0)), np.nan)
    # log-likelihood of the sample cells inside the mask
    in_mask = sample.mask_pos >= 0
    pos = sample.mask_pos[in_mask]
    weight = (sample.counts[in_mask] if cell_weight is None else cell_weight).astype(np.float64)
    floor = LOG_FLOOR / n_mask
    log_density = np.log(np.maximum(T[:, pos].astype(np.float64), floor))
    loglik = log_density @ weight / weight.sum()
    return {"reference_score": ref, "pearson": pearson, "js_distance": js, "log_likelihood": loglik}


# ------------------------------------------------------------------------------ challenge


def challenge_column(subclass: str) -> str:
    """MapMySections column of an ABC subclass name.

    Drops a leading number prefix and replaces every character that is not a letter or digit
    with ``.``: ``"007 L2/3 IT CTX Glut"`` → ``"L2.3.IT.CTX.Glut"``.
    """
    name = re.sub(r"^\s*\d+\s+", "", str(subclass)).strip()
    return re.sub(r"[^A-Za-z0-9]", ".", name)


def challenge_table(identity_long: pd.DataFrame) -> pd.DataFrame:
    """The MapMySections submission table from per-brain type fractions.

    Parameters
    ----------
    identity_long
        Long table with columns ``brain_id``, ``type`` (ABC subclass names, with or without
        number prefix) and ``fraction`` (e.g. the concatenated ``identity.csv`` files).

    Returns
    -------
    pandas.DataFrame
        ``brain_id`` (str) + the 27 :data:`CHALLENGE_COLUMNS`, one row per brain (in order of first
        appearance), each row summing to 1: fractions of types outside the 27 are dropped and the
        rest renormalised (types mapping to the same column add up). A brain with no mass on the
        27 columns gets the uniform row 1/27 (no information is expressed as no preference).
    """
    missing = [c for c in ("brain_id", "type", "fraction") if c not in identity_long]
    if missing:
        raise ValueError(
            f"identity table lacks column(s) {missing}; expected brain_id, type, fraction, "
            f"found {list(identity_long.columns)}"
        )
    frame = pd.DataFrame(
        {
            "brain_id": identity_long["brain_id"].astype(str).to_numpy(),
            "column": [challenge_column(t) for t in identity_long["type"]],
            "fraction": pd.to_numeric(identity_long["fraction"], errors="coerce")
            .fillna(0.0)
            .to_numpy(),
        }
    )
    if (frame["fraction"] < 0).any():
        raise ValueError("identity fractions must be >= 0")
    brains = pd.unique(frame["brain_id"])
    known = frame[frame["column"].isin(CHALLENGE_COLUMNS)]
    wide = known.pivot_table(
        index="brain_id", columns="column", values="fraction", aggfunc="sum", fill_value=0.0
    ).reindex(index=brains, columns=list(CHALLENGE_COLUMNS), fill_value=0.0)
    values = wide.to_numpy(dtype=np.float64)
    total = values.sum(axis=1, keepdims=True)
    values = np.where(
        total > 0, values / np.where(total > 0, total, 1.0), 1.0 / len(CHALLENGE_COLUMNS)
    )
    out = pd.DataFrame(values, columns=list(CHALLENGE_COLUMNS))
    out.insert(0, "brain_id", list(brains))
    return out


def challenge_scores(
    truth: pd.DataFrame,
    predicted: pd.DataFrame,
    *,
    columns: Sequence[str] = CHALLENGE_COLUMNS,
) -> pd.DataFrame:
    """MapMySections metrics of predicted against true subclass fractions, per tool.

    Parameters
    ----------
    truth, predicted
        Frames with the 27 :data:`CHALLENGE_COLUMNS` (extra columns ignored), one row per tool.
        ``columns`` replaces the 27 (e.g. every type of a phantom benchmark).
        The tool id is a ``brain_id`` or ``MapMySectionsID`` column if present, else the first
        column when it is not one of the 27 and not numeric, else the index. Truth may hold
        counts or fractions: NaN counts as 0 in a row with any value; rows that are all NaN or
        all zero (tools without truth) are skipped. Prediction NaN counts as 0; an all-zero
        prediction row counts as uniform.

    Returns
    -------
    pandas.DataFrame
        Indexed by tool id (index name ``brain_id``), one row per tool that has truth and a
        prediction, in truth order. After normalising both rows to sum 1:
        ``cross_entropy`` = −Σ truth·log(clip(pred, 1e-15, 1 − 1e-15)); ``brier`` =
        Σ (pred − truth)²; ``r2`` = squared Pearson correlation of the two rows (NaN when one is
        constant); ``any_correct_hit`` = predicted mass on subclasses with truth > 0; ``hit`` =
        any_correct_hit ≥ 0.5; ``top1`` = the predicted top subclass (first on ties) is a top
        truth subclass.

    Raises
    ------
    ValueError
        Missing columns, repeated ids, negative values, or no tool with both truth and
        prediction.
    """
    columns = tuple(columns)
    t = _challenge_frame(truth, "truth", columns)
    p = _challenge_frame(predicted, "predicted", columns)
    t = t[t.notna().any(axis=1)].fillna(0.0)
    t = t[t.sum(axis=1) > 0]
    common = t.index[t.index.isin(p.index)]
    if len(common) == 0:
        raise ValueError(
            "no tool has both truth and a prediction: truth ids (with truth) "
            f"{list(t.index[:5])}…, predicted ids {list(p.index[:5])}…"
        )
    tv = t.loc[common].to_numpy(dtype=np.float64)
    pv = p.loc[common].fillna(0.0).to_numpy(dtype=np.float64)
    k = len(columns)
    tv = tv / tv.sum(axis=1, keepdims=True)
    p_total = pv.sum(axis=1, keepdims=True)
    pv = np.where(p_total > 0, pv / np.where(p_total > 0, p_total, 1.0), 1.0 / k)

    eps = 1e-15
    cross_entropy = -(tv * np.log(np.clip(pv, eps, 1.0 - eps))).sum(axis=1)
    brier = ((pv - tv) ** 2).sum(axis=1)
    tc = tv - tv.mean(axis=1, keepdims=True)
    pc = pv - pv.mean(axis=1, keepdims=True)
    denom = np.sqrt((tc * tc).sum(axis=1) * (pc * pc).sum(axis=1))
    constant = (np.ptp(tv, axis=1) <= 1e-12) | (np.ptp(pv, axis=1) <= 1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(~constant & (denom > 0), (tc * pc).sum(axis=1) / denom, np.nan)
    any_correct = np.where(tv > 0, pv, 0.0).sum(axis=1)
    top_pred = np.argmax(pv, axis=1)
    top1 = tv[np.arange(len(tv)), top_pred] >= tv.max(axis=1)
    out = pd.DataFrame(
        {
            "cross_entropy": cross_entropy,
            "brier": brier,
            "r2": r**2,
            "any_correct_hit": any_correct,
            "hit": any_correct >= 0.5,
            "top1": top1,
        },
        index=pd.Index(common, name="brain_id"),
    )
    return out


def _challenge_frame(
    frame: pd.DataFrame, what: str, columns: tuple[str, ...] = CHALLENGE_COLUMNS
) -> pd.DataFrame:
    """The challenge columns as float, indexed by str tool id."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} table lacks challenge column(s) {missing}")
    key: Any = None
    for name in _ID_COLUMNS:
        if name in frame.columns:
            key = name
            break
    if key is None and len(frame.columns) > 0:
        first = frame.columns[0]
        if first not in columns and not pd.api.types.is_numeric_dtype(frame[first]):
            key = first
    ids = frame[key] if key is not None else frame.index.to_series()
    ids = pd.Index(ids.astype(str).to_numpy(), name="brain_id")
    if not ids.is_unique:
        raise ValueError(f"{what} tool ids repeat: {list(ids[ids.duplicated()][:5])}")
    values = frame.loc[:, list(columns)].apply(pd.to_numeric, errors="raise")
    values.index = ids
    if (values < 0).any().any():
        raise ValueError(f"{what} values must be >= 0")
    return values.astype(np.float64)
