"""How far mapped cells land from their true CCF positions on phantom brains.

Two ways to run it::

    python benchmarks/phantom_mapping.py --store store/demo         # after `cellmap2d demo`
    python benchmarks/phantom_mapping.py --seeds 11 12 --max-angle 5 --work /tmp/phantoms

The second builds fresh phantom worlds (three brains each, one missing and one damaged section
per brain, cutting angles up to ``--max-angle``; imaged with ``Realism.realistic()``, or the
original bright-cells rendering with ``--realism easy``) with seeds nothing was tuned on, runs the
pipeline up to the refined sections and measures. For every brain it prints the median and 95th
percentile distance between each planted cell's true CCF position and where its section pixel is
mapped by

- ``true anchoring``: the phantom's own linear anchoring (the baseline a perfect QuickNII
  anchoring gives; what remains is the phantom's nonlinear deformation and section thickness),
- ``search``: cellmap2d's series anchoring alone,
- ``search + ANTs``: anchoring plus the per-section refinement (what ``cells.h5ad`` holds),

with the AP error of the anchoring at each section's centre and the cutting angles found.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellmap2d.anchoring import read_quint
from cellmap2d.assemble import SectionPlacement, map_section_points
from cellmap2d.registration import Refinement


def brain_errors(store: Path, world: Path, brain_id: str) -> tuple[dict[str, np.ndarray], dict]:
    truth = pd.read_csv(world / "truth" / brain_id / "cells.csv")
    ours = {a.nr: a for a in read_quint(store / "brains" / brain_id / "anchoring.json")}
    true = {a.nr: a for a in read_quint(world / "truth" / brain_id / "anchoring.json")}
    errors: dict[str, list[np.ndarray]] = {"true anchoring": [], "search": [], "search + ANTs": []}
    for z, cells in truth.groupby("section"):
        xy = cells[["x_px", "y_px"]].to_numpy()
        target = cells[["ap_um", "dv_um", "ml_um"]].to_numpy()
        anchor = ours[z]
        size = {"width": anchor.width, "height": anchor.height}
        with np.load(store / "brains" / brain_id / "thumbnails" / f"s{z:04d}.npz") as thumb:
            factor = float(thumb["factor"])
        refinement = Refinement.load(store / "brains" / brain_id / "transforms" / f"s{z:04d}.npz")
        placement = SectionPlacement(anchor, refinement, factor, (anchor.height, anchor.width))
        for name, mapped in (
            ("true anchoring", true[z].to_ccf(xy[:, 0], xy[:, 1], **size)),
            ("search", anchor.to_ccf(xy[:, 0], xy[:, 1], **size)),
            ("search + ANTs", map_section_points(xy, placement)),
        ):
            errors[name].append(np.linalg.norm(mapped - target, axis=1))
    ap_errors = {}
    for z in sorted(set(ours) & set(true)):
        size = {"width": ours[z].width, "height": ours[z].height}
        centre = (ours[z].width / 2, ours[z].height / 2)
        ap_errors[z] = ours[z].to_ccf(*centre, **size)[0, 0] - true[z].to_ccf(*centre, **size)[0, 0]
    return {k: np.concatenate(v) for k, v in errors.items()}, ap_errors


def table(store: Path, world: Path, label: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    config = json.loads((world / "world.json").read_text())
    rows, per_section = [], []
    for brain in config["brains"]:
        bid = brain["brain_id"]
        errors, ap_errors = brain_errors(store, world, bid)
        per_section.append(pd.Series(ap_errors, name=(label, bid)))
        fit = json.loads((store / "brains" / bid / "anchoring.json").read_text())["cellmap2d"]
        row = {"world": label, "brain": bid, "cells": len(errors["search"])}
        for name, e in errors.items():
            row[f"{name} median"] = np.median(e)
            row[f"{name} p95"] = np.percentile(e, 95)
        ap = np.abs(list(ap_errors.values()))
        row["AP err median |µm|"] = np.median(ap)
        row["AP err max |µm|"] = np.max(ap)
        row["angles true"] = "{:+.1f}, {:+.1f}".format(*brain["angles_deg"])
        row["angles found"] = f"{fit['angle_ml_deg']:+.1f}, {fit['angle_dv_deg']:+.1f}"
        flags = [f for f in fit["sections"]["flag"] if f]
        row["flagged"] = ",".join(flags)
        rows.append(row)
    return pd.DataFrame(rows), pd.DataFrame(per_section)


def run_world(
    seed: int, max_angle: float, work: Path, workers: int, realism: str = "realistic"
) -> tuple[Path, Path, float]:
    import luigi

    from cellmap2d.cli import configure_world
    from cellmap2d.synthetic import Realism, WorldConfig, make_world

    preset = Realism.easy() if realism == "easy" else Realism.realistic()
    config = WorldConfig.demo(seed, max_angle_deg=max_angle, realism=preset)
    store = work / (f"seed{seed}" if realism == "realistic" else f"seed{seed}-{realism}")
    world = make_world(store / "world", config)
    configure_world(world, store)
    from tasks import RefineSection
    from tasks.brain import per_section

    started = time.perf_counter()
    result = luigi.build(
        [t for b in config.brains for t in per_section(RefineSection, b.brain_id).values()],
        local_scheduler=True,
        workers=workers,
        detailed_summary=True,
        log_level="WARNING",
    )
    if not result.scheduling_succeeded or result.status.name.startswith("FAILED"):
        raise SystemExit(result.summary_text)
    return store, world.root, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, help="an existing demo store (with world/)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--max-angle", type=float, default=5.0)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/phantoms"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--realism", choices=["realistic", "easy"], default="realistic")
    args = parser.parse_args()
    tables, sections = [], []
    if args.store:
        summary, ap = table(args.store, args.store / "world", "demo")
        tables.append(summary)
        sections.append(ap)
    for seed in args.seeds:
        store, world, seconds = run_world(
            seed, args.max_angle, args.work, args.workers, args.realism
        )
        print(
            f"seed {seed}: 3 brains anchored and refined in {seconds:.0f} s ({args.workers} workers)"
        )
        summary, ap = table(store, world, f"seed {seed} ({args.realism})")
        tables.append(summary)
        sections.append(ap)
    if not tables:
        parser.error("give --store and/or --seeds")
    result = pd.concat(tables, ignore_index=True).set_index(["world", "brain"])
    pd.set_option("display.width", 250)
    print("\nCCF error of planted cells (µm)")
    print(result.round(0).to_string())
    print("\nAP error of the anchoring at each section's centre (µm; columns: section z)")
    print(pd.concat(sections).round(0).to_string())
    ratio = result["search + ANTs median"] / result["true anchoring median"]
    print("\nmedian error, search + ANTs / true anchoring:", ", ".join(f"{r:.2f}" for r in ratio))
    print(
        f"pooled over brains: median of medians {result['search + ANTs median'].median():.0f} µm,"
        f" worst brain p95 {result['search + ANTs p95'].max():.0f} µm"
    )


if __name__ == "__main__":
    main()
