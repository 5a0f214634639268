"""How far mapped cells land from their true CCF positions on the demo phantom.

Run the demo first (``cellmap2d demo``), then ``python benchmarks/phantom_mapping.py
[--store store/demo]``. For every brain it prints the median and 95th-percentile distance between
the true CCF position of each planted cell and where its section pixel is mapped:

- ``true anchoring``: the phantom's own linear anchoring (the baseline: what a perfect
  QuickNII anchoring gives; the rest is the phantom's nonlinear deformation and section thickness),
- ``search``: cellmap2d's series anchoring alone,
- ``search + ANTs``: anchoring plus the per-section refinement (what ``cells.h5ad`` holds),

and the cutting angles found against the true ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cellmap2d.anchoring import read_quint
from cellmap2d.assemble import SectionPlacement, map_section_points
from cellmap2d.registration import Refinement


def brain_errors(store: Path, brain_id: str) -> dict[str, np.ndarray]:
    world = store / "world"
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
    return {k: np.concatenate(v) for k, v in errors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="store/demo", type=Path)
    args = parser.parse_args()
    world = json.loads((args.store / "world" / "world.json").read_text())
    rows = []
    for brain in world["brains"]:
        bid = brain["brain_id"]
        errors = brain_errors(args.store, bid)
        fit = json.loads((args.store / "brains" / bid / "anchoring.json").read_text())["cellmap2d"]
        row = {"brain": bid, "cells": len(errors["search"])}
        for name, e in errors.items():
            row[f"{name} median"] = np.median(e)
            row[f"{name} p95"] = np.percentile(e, 95)
        row["angles true"] = "{:+.1f}°, {:+.1f}°".format(*brain["angles_deg"])
        row["angles found"] = f"{fit['angle_ml_deg']:+.1f}°, {fit['angle_dv_deg']:+.1f}°"
        rows.append(row)
    table = pd.DataFrame(rows).set_index("brain")
    pd.set_option("display.width", 200)
    print("CCF error of planted cells (µm)")
    print(table.round(0).to_string())
    ratio = table["search + ANTs median"] / table["true anchoring median"]
    print("\nmedian error, search + ANTs / true anchoring:", ", ".join(f"{r:.2f}" for r in ratio))


if __name__ == "__main__":
    main()
