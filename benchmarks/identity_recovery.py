"""Recovery of planted cell types and mixtures on the phantom, every score side by side.

``python benchmarks/identity_recovery.py [--seed 1000] [--cells 2000] [--spurious 0,0.5,0.9]
[--quick]``

World: the 37 phantom type densities (``synthetic.phantom_cell_types``). The reference atlas is an
ABC-layout cell table drawn from them (``synthetic.write_abc`` → ``celltypes.read_abc``, 400 000
cells, abundances as in the phantom), turned into subclass densities at 100 µm with σ = 150 µm
(the pipeline defaults). Brains are drawn without images: 3-D cells of the planted types, kept
within ±25 µm of coronal section planes (spacing 100 or 200 µm over the whole brain, all
planes tilted by the same random 0–3°), then displaced by a registration error (a smooth
per-section offset, 40 µm s.d. per axis, plus 30 µm s.d. per cell). ``brain_identity`` then
compares them with the atlas inside the mask of the (displaced) section planes ∧ brain.

Scenarios: ``single`` (every type planted alone, at each spacing), ``mixture`` (2–3 random types
of all 37, Dirichlet fractions with every part ≥ 10 %), ``VISp`` (2–3 of the 27 challenge
subclasses, compared inside VISp via ``region_mask``; metrics on the 27 challenge columns as the
challenge computes them). Truth = the planted types' shares among the kept cells inside the mask.

Contamination (``--spurious``): every brain is also run with false detections making up that
share of its detections, drawn uniformly inside the brain, kept within the same ±25 µm of the
section planes and displaced by the same registration error (what a detector's false positives
look like after mapping); the true cells are the same at every level. Each brain is scored twice
in the same run: ``baseline`` = ``brain_identity(..., background=False)`` (the fit before the
background component) and ``background`` = the default (a background component uniform over the
compared tissue). Truth stays the planted types' shares among the true cells in the mask; the
background truth is the false detections' share of all detections in the mask.

Scores as fractions (``identity.score_fractions``): the mixture with the mixture-aware
reference-noise correction (``fraction_emm``, the default ``fraction``), EM with the per-type
reference-noise bonus (``fraction_emc``), plain EM, and NNLS mixtures as fitted; reference
score and Pearson: positive scores normalised to sum 1; JS distance: ``1 − d`` normalised;
log-likelihood: posterior of "all cells are one type", ``softmax(n · mean log-likelihood)``.

``top1 (group)`` counts a hit when the top type is indistinguishable by construction from a
true top type (same phantom density recipe, differing only in random texture): {OPC, Microglia,
Lymphoid, Endo, Peri, SMC}, {VLMC, ABC}.

The benchmark seeds (default 1000+) differ from the seeds used while developing (0–99; the
weights of the reference-noise corrections of ``fraction_emc`` and ``fraction_emm`` were chosen
on seeds 7 and 11).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from cellmap2d import synthetic
from cellmap2d.celltypes import read_abc
from cellmap2d.density import DensityFile, Grid, type_densities, write_densities
from cellmap2d.identity import (
    CHALLENGE_COLUMNS,
    brain_identity,
    challenge_column,
    challenge_scores,
    score_fractions,
)

SCORES = (
    "fraction_emm",
    "fraction_emc",
    "fraction_em",
    "fraction_nnls",
    "reference_score",
    "pearson",
    "js_distance",
    "log_likelihood",
)
DEFAULT = "fraction_emm"  # the mixture brain_identity's `fraction` is (and gets the CI)
VOXEL_UM, SIGMA_UM = 100.0, 150.0  # pipeline defaults; --voxel/--sigma override
THICKNESS_UM = 50.0
OFFSET_SD_UM, CELL_SD_UM = 40.0, 30.0


def indistinguishable_groups() -> dict[str, str]:
    """Type → group label; types whose phantom recipe differs only by random texture share one."""
    texture_only = {"", "smooth", "vessels"}
    out = {}
    for name, (_, _, _, weights, modifier) in synthetic._TYPES.items():
        mod = "" if modifier in texture_only else modifier
        out[name] = repr((sorted(weights.items()), mod))
    return out


def make_atlas(
    types: synthetic.PhantomTypes,
    root: Path,
    n_cells: int,
    seed: int,
    voxel_um: float = VOXEL_UM,
    sigma_um: float = SIGMA_UM,
) -> Path:
    synthetic.write_abc(root / "abc", types, n_cells=n_cells, rng=np.random.default_rng(seed))
    cells = read_abc(root / "abc")
    cells.obs["subclass"] = cells.obs["subclass"].cat.rename_categories(
        lambda c: c.split(" ", 1)[1]
    )
    grid = Grid(voxel_um)
    path = root / "densities.h5"
    items = type_densities(cells, level="subclass", grid=grid, sigma_um=sigma_um)
    write_densities(path, items, grid=grid, level="subclass", sigma_um=sigma_um)
    return path


def make_brain(
    types: synthetic.PhantomTypes,
    planted: dict[str, float],
    spacing_um: float,
    n_cells: int,
    ap_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Cells (CCF µm), their type labels, the displaced section planes of one brain and each
    section's displacement (µm, ``(sections, 3)``)."""
    tilt = np.deg2rad(rng.uniform(0, 3)), rng.uniform(0, 2 * np.pi)
    normal = np.array(
        [np.cos(tilt[0]), np.sin(tilt[0]) * np.cos(tilt[1]), np.sin(tilt[0]) * np.sin(tilt[1])]
    )
    start = ap_range[0] + rng.uniform(0, spacing_um)
    aps = np.arange(start, ap_range[1], spacing_um)
    centre = np.array([0.0, 4000.0, 5700.0])
    points = [centre + np.array([ap, 0, 0]) for ap in aps]
    # smooth per-section offsets (s.d. OFFSET_SD_UM per axis)
    raw = rng.standard_normal((len(aps), 3))
    smooth = ndimage.gaussian_filter1d(raw, 2.0, axis=0, mode="nearest")
    offsets = smooth / smooth.std(axis=0) * OFFSET_SD_UM
    keep_fraction = THICKNESS_UM / spacing_um
    xyz, labels = [], []
    for name, frac in planted.items():
        n3d = int(np.ceil(frac * n_cells / keep_fraction * 1.05))
        pts = types.sample(name, n3d, rng)
        d = (pts - centre) @ normal
        k = np.rint((d - start * normal[0]) / (spacing_um * normal[0])).astype(int)
        k = np.clip(k, 0, len(aps) - 1)
        dist = np.abs(d - (start + k * spacing_um) * normal[0])
        ok = dist <= THICKNESS_UM / 2
        pts, k = pts[ok], k[ok]
        pts = pts + offsets[k] + rng.normal(0, CELL_SD_UM, pts.shape)
        xyz.append(pts)
        labels.append(np.full(len(pts), name, dtype=object))
    planes = [(p + o, normal) for p, o in zip(points, offsets, strict=True)]
    return np.concatenate(xyz), np.concatenate(labels), planes, offsets


def truth_in_mask(
    xyz: np.ndarray, labels: np.ndarray, table: pd.DataFrame, mask: np.ndarray, grid: Grid
) -> pd.Series:
    flat = grid.flat_index(xyz)
    ok = flat >= 0
    ok[ok] = mask.ravel()[flat[ok]]
    counts = pd.Series(labels[ok]).value_counts()
    return (counts / counts.sum()).reindex(table["type"], fill_value=0.0)


def make_spurious(
    n: int,
    brain50: np.ndarray,
    planes: list[tuple[np.ndarray, np.ndarray]],
    offsets: np.ndarray,
    spacing_um: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """``n`` false detections: uniform inside the brain, within ±THICKNESS_UM/2 of the true
    section planes, then displaced like the cells (section offset + per-detection noise)."""
    if n <= 0:
        return np.empty((0, 3))
    voxels = np.argwhere(brain50)
    normal = planes[0][1]  # all planes share one normal (make_brain)
    # each true (undisplaced) plane's offset along the normal, increasing with the section
    level = (np.array([p for p, _ in planes]) - offsets) @ normal
    out: list[np.ndarray] = []
    have = 0
    while have < n:
        m = int(np.ceil((n - have) * spacing_um / THICKNESS_UM * 1.2)) + 16
        pts = (voxels[rng.integers(0, len(voxels), m)] + rng.uniform(0, 1, (m, 3))) * 50.0
        d = pts @ normal
        j = np.clip(np.searchsorted(level, d), 1, len(level) - 1)
        k = np.where(np.abs(d - level[j - 1]) < np.abs(d - level[j]), j - 1, j)
        ok = np.abs(d - level[k]) <= THICKNESS_UM / 2
        pts, k = pts[ok], k[ok]
        pts = pts + offsets[k] + rng.normal(0, CELL_SD_UM, pts.shape)
        out.append(pts)
        have += len(pts)
    return np.concatenate(out)[:n]


def run(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    types = synthetic.phantom_cell_types(50.0, seed=0)
    atlas = synthetic.phantom_atlas(50.0, seed=0)
    brain = atlas.annotation > 0
    visp = np.isin(atlas.annotation, atlas.ontology.descendants("VISp"))
    ap_any = np.flatnonzero(brain.any(axis=(1, 2)))
    ap_range = (ap_any[0] * 50.0 + 100.0, (ap_any[-1] + 1) * 50.0 - 100.0)
    groups = indistinguishable_groups()
    names = list(types.names)
    visp_types = [n for n in names if challenge_column(n) in CHALLENGE_COLUMNS]
    levels = [float(x) for x in args.spurious.split(",")]
    fits = ("baseline", "background") if not args.no_baseline else ("background",)
    print(f"phantom world ready in {time.perf_counter() - t0:.0f} s")

    rng = np.random.default_rng(args.seed)
    spacings = (100.0, 200.0) if not args.quick else (200.0,)
    cases: list[tuple[str, dict[str, float], float]] = []
    singles = names[::4] if args.quick else names
    for sp in spacings:
        cases += [("single", {n: 1.0}, sp) for n in singles]
    for scenario, pool, n_mix in (
        ("mixture", names, 6 if args.quick else 40),
        ("VISp", visp_types, 4 if args.quick else 24),
    ):
        for _ in range(n_mix):
            k = int(rng.integers(2, 4))
            chosen = rng.choice(pool, size=k, replace=False)
            frac = rng.dirichlet(np.ones(k))
            frac = 0.1 + frac * (1 - 0.1 * k)
            cases.append(
                (scenario, dict(zip(chosen, frac, strict=True)), float(rng.choice(spacings)))
            )

    # keyed by (level, fit)
    runs = [(lv, fit) for lv in levels for fit in fits]
    rows: dict[tuple[float, str], list[dict]] = {r: [] for r in runs}
    preds: dict[tuple[float, str, str], list[pd.Series]] = {
        (lv, fit, s): [] for lv, fit in runs for s in SCORES
    }
    truths = []
    t_id: dict[tuple[float, str], list[float]] = {r: [] for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_atlas(
            types, Path(tmp), 400_000, seed=args.seed + 1, voxel_um=args.voxel, sigma_um=args.sigma
        )
        print(f"atlas densities ready in {time.perf_counter() - t0:.0f} s")
        with DensityFile(path) as densities:
            grid = densities.grid
            for i, (scenario, planted, spacing) in enumerate(cases):
                xyz, labels, planes, offsets = make_brain(
                    types, planted, spacing, args.cells, ap_range, rng
                )
                region = visp if scenario == "VISp" else None
                mask = _mask_of(grid, planes, spacing, brain if region is None else brain & region)
                bid = f"b{i:03d}"
                truth = None
                for li, level in enumerate(levels):
                    n_spur = int(round(level / (1.0 - level) * len(xyz))) if level > 0 else 0
                    spur_rng = np.random.default_rng([args.seed, i, li])
                    spur = make_spurious(n_spur, brain, planes, offsets, spacing, spur_rng)
                    all_xyz = np.concatenate([xyz, spur])
                    n_true_in = _n_in_mask(xyz, mask, grid)
                    n_spur_in = _n_in_mask(spur, mask, grid)
                    bg_truth = n_spur_in / max(n_true_in + n_spur_in, 1)
                    for fit in fits:
                        t1 = time.perf_counter()
                        table = brain_identity(
                            all_xyz,
                            planes,
                            densities,
                            brain_mask=brain,
                            brain_mask_voxel_um=50.0,
                            section_spacing_um=spacing,
                            n_boot=args.boot,
                            seed=i,
                            region_mask=region,
                            background=fit == "background",
                        )
                        t_id[(level, fit)].append(time.perf_counter() - t1)
                        if truth is None:
                            truth = truth_in_mask(xyz, labels, table, mask, grid)
                            truths.append(truth.rename(bid))
                        for s in SCORES:
                            preds[(level, fit, s)].append(score_fractions(table, s).rename(bid))
                        top_true = truth.idxmax()
                        by_type = table.set_index("type")
                        ci = by_type.loc[top_true, ["fraction_low", "fraction_high"]]
                        bg = float(table["background"].iloc[0])
                        rows[(level, fit)].append(
                            {
                                "brain_id": bid,
                                "scenario": scenario,
                                "spacing": spacing,
                                "planted": top_true,
                                "ci_covers": bool(ci.iloc[0] <= truth[top_true] <= ci.iloc[1]),
                                "bg_truth": bg_truth,
                                "bg": bg,
                                "bg_covers": bool(
                                    table["background_low"].iloc[0]
                                    <= bg_truth
                                    <= table["background_high"].iloc[0]
                                ),
                            }
                        )
    truth_df = pd.DataFrame(truths)
    times = ", ".join(f"{fit} {lv:.0%} {np.median(t_id[(lv, fit)]):.2f} s" for lv, fit in runs)
    print(
        f"{len(cases)} brains, {args.cells} cells each before masking (false detections added "
        f"on top: {', '.join(f'{lv:.0%}' for lv in levels)} of all detections); identity per "
        f"brain (37 types, {args.voxel:g} µm voxels, σ {args.sigma:g} µm, {args.boot} bootstrap) "
        f"median {times}; total {time.perf_counter() - t0:.0f} s\n"
    )

    group_of = np.vectorize(lambda n: groups[n])
    summary = []
    per_type = {}
    cases_df = pd.DataFrame(rows[runs[0]]).set_index("brain_id")
    for lv, fit in runs:
        for s in SCORES:
            pred_df = pd.DataFrame(preds[(lv, fit, s)])
            for scenario in ("single", "mixture", "VISp"):
                ids = cases_df.index[cases_df["scenario"] == scenario]
                if len(ids) == 0:
                    continue
                t, p = truth_df.loc[ids], pred_df.loc[ids]
                cols = names
                if scenario == "VISp":
                    t = _to_challenge(t)
                    p = _to_challenge(p)
                    cols = list(CHALLENGE_COLUMNS)
                m = challenge_scores(
                    t.reset_index(names="brain_id"), p.reset_index(names="brain_id"), columns=cols
                )
                top_pred = p.idxmax(axis=1)
                top_true = t.idxmax(axis=1)
                if scenario == "VISp":
                    grp_hit = top_pred == top_true
                else:
                    grp_hit = pd.Series(
                        group_of(top_pred.to_numpy()) == group_of(top_true.to_numpy()), index=ids
                    )
                summary.append(
                    {
                        "spurious": lv,
                        "fit": fit,
                        "scenario": scenario,
                        "score": s,
                        "top1": m["top1"].mean(),
                        "top1 (group)": grp_hit.mean(),
                        "brier": m["brier"].mean(),
                        "cross_entropy": m["cross_entropy"].mean(),
                        "any_correct_hit": m["any_correct_hit"].mean(),
                        "r2": m["r2"].mean(),
                    }
                )
                if scenario == "single" and s == DEFAULT:
                    hit = pd.Series(top_pred.to_numpy() == top_true.to_numpy(), index=ids)
                    per_type[f"{fit} {lv:.0%}"] = hit.groupby(
                        cases_df.loc[ids, "planted"].to_numpy()
                    ).mean()
    table = pd.DataFrame(summary)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 200)

    # 1. the default fraction, baseline vs background, per contamination level
    print(f"## default `fraction` ({DEFAULT}): baseline (background=False) vs background\n")
    for scenario in ("single", "mixture", "VISp"):
        sub = table[(table["scenario"] == scenario) & (table["score"] == DEFAULT)]
        if not len(sub):
            continue
        n = int((cases_df["scenario"] == scenario).sum())
        sub = sub.drop(columns=["scenario", "score"]).copy()
        bg = []
        for lv, fit in zip(sub["spurious"], sub["fit"], strict=True):
            r = pd.DataFrame(rows[(lv, fit)])
            r = r[r["scenario"] == scenario]
            bg.append((r["bg_truth"].mean(), r["bg"].mean(), (r["bg"] - r["bg_truth"]).abs().max()))
        sub["background true"] = [b[0] for b in bg]
        sub["background est."] = [b[1] for b in bg]
        sub["max |error|"] = [b[2] for b in bg]
        sub["spurious"] = [f"{v:.0%}" for v in sub["spurious"]]
        print(f"### {scenario} ({n} brains)\n")
        print(_markdown(sub.set_index("spurious")))
        print()

    # 2. every score, top-1 / Brier, per (level, fit)
    print("## every score: top1 / brier per contamination level and fit\n")
    for scenario in ("single", "mixture", "VISp"):
        sub = table[table["scenario"] == scenario]
        if not len(sub):
            continue
        wide = {}
        for (lv, fit), g in sub.groupby(["spurious", "fit"], sort=False):
            g = g.set_index("score")
            wide[f"{fit} {lv:.0%}"] = [
                f"{a:.2f} / {b:.3f}" for a, b in zip(g["top1"], g["brier"], strict=True)
            ]
        out = pd.DataFrame(wide, index=pd.Index(list(SCORES), name="score"))
        print(f"### {scenario}\n")
        print(_markdown(out))
        print()

    print(f"## single: {DEFAULT} top-1 per planted type (both spacings)\n")
    pt = pd.DataFrame(per_type)
    pt.index.name = "planted"
    print(_markdown(pt, ".2f"))
    print()
    for lv, fit in runs:
        r = pd.DataFrame(rows[(lv, fit)])
        ci = r.groupby("scenario")["ci_covers"].mean()
        line = f"{fit} {lv:.0%}: {DEFAULT} 95% CI covers the top true type's fraction: " + (
            ", ".join(f"{k} {v:.0%}" for k, v in ci.items())
        )
        if fit == "background":
            line += f"; background CI covers the true share: {r['bg_covers'].mean():.0%}"
        print(line)


def _n_in_mask(xyz: np.ndarray, mask: np.ndarray, grid: Grid) -> int:
    if len(xyz) == 0:
        return 0
    flat = grid.flat_index(xyz)
    ok = flat >= 0
    ok[ok] = mask.ravel()[flat[ok]]
    return int(ok.sum())


def _markdown(frame: pd.DataFrame, fmt: str = ".3f") -> str:
    """A pipe table (pandas' ``to_markdown`` needs tabulate)."""
    cols = [frame.index.name or ""] + [str(c) for c in frame.columns]

    def cell(v: object) -> str:
        return format(v, fmt) if isinstance(v, float | np.floating) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [cell(v) for v in row]) + " |")
    return "\n".join(lines)


def _to_challenge(frame: pd.DataFrame) -> pd.DataFrame:
    cols = {c: challenge_column(c) for c in frame.columns}
    out = frame.rename(columns=cols)
    out = out.T.groupby(level=0).sum().T
    return out.reindex(columns=list(CHALLENGE_COLUMNS), fill_value=0.0)


def _mask_of(grid: Grid, planes, spacing: float, inside50: np.ndarray) -> np.ndarray:
    from cellmap2d.density import resample_mask, sampled_mask

    inside = resample_mask(inside50, 50.0, grid)
    return sampled_mask(grid, planes, half_thickness_um=spacing / 2, inside=inside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--boot", type=int, default=20)
    parser.add_argument("--voxel", type=float, default=VOXEL_UM)
    parser.add_argument("--sigma", type=float, default=SIGMA_UM)
    parser.add_argument(
        "--spurious", default="0,0.5,0.9", help="shares of false detections, comma-separated"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="only the default (background) fit"
    )
    parser.add_argument("--quick", action="store_true", help="fewer brains")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
