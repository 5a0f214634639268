"""How the cell detector does on the realistic phantom, next to easier renderings of it.

Two parts, each one markdown table::

    python benchmarks/realistic_phantom.py                       # fields, seeds 101–104
    python benchmarks/realistic_phantom.py --quick               # one field seed
    python benchmarks/realistic_phantom.py --world /tmp/easy/world /tmp/real/world

- **fields**: ``synthetic.realistic_field`` (1024², 1.4 µm pixels, 15 µm cells, 100 cells per
  mm²) with ``Realism.realistic()`` and, as the baseline in the same run, the same fields with
  every spatial effect off (``noise only``: Poisson–Gaussian noise and the flat bleed-through
  background; no texture, illumination, streaks, specks or defocus); ``--ablation`` adds one
  effect at a time to that baseline.
- **worlds** (``--world``): the level-0 signal of phantom worlds' sections (e.g. an easy and
  a realistic demo world made with ``WorldConfig.demo(seed, realism=…)``).

The detector is ``segmentation.detect_cells`` with its defaults (only pixel size and cell
diameter given). Detections are matched one to one with planted cells within half a cell
diameter (fields) or one diameter (worlds, 2 px, as the demo reports); precision counts a
detection matched to any planted cell as right; ``recall ≥5`` is over cells of ``snr`` ≥ 5
(peak ≥ 5 noise σ above the local background).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from cellmap2d.segmentation import detect_cells
from cellmap2d.synthetic import Realism, _match_one_to_one, realistic_field

PIXEL_UM, CELL_UM = 1.4, 15.0


def noise_only() -> Realism:
    """The realistic camera and background level with every spatial effect off."""
    return Realism.flat(out_of_focus=0.0)


# one realistic effect at a time on top of "noise only": which ones make false detections
EFFECTS = {
    "+ texture": {"texture": 0.25},
    "+ illumination, tiles, gain": {
        "illumination": 0.12,
        "vignetting": 0.2,
        "tile_jitter": 0.03,
        "section_gain": 0.3,
    },
    "+ streaks": {"streaks_per_mm2": 8.0},
    "+ specks": {"specks_per_mm2": (20.0, 4.0, 0.3)},
    "+ defocus": {"out_of_focus": 0.15},
}


def score(
    detected: pd.DataFrame, truth: pd.DataFrame, max_px: float, xy_cols=("x", "y")
) -> dict[str, float]:
    det = detected[["x", "y"]].to_numpy(dtype=float).reshape(-1, 2)
    tru = truth[list(xy_cols)].to_numpy(dtype=float).reshape(-1, 2)
    if len(det) and len(tru):
        d_idx, t_idx = _match_one_to_one(cKDTree(det), cKDTree(tru), max_px)
    else:
        d_idx = t_idx = np.empty(0, int)
    strong = truth["snr"].to_numpy() >= 5
    found = np.zeros(len(tru), bool)
    found[t_idx] = True
    return {
        "cells": len(tru),
        "cells ≥5": int(strong.sum()),
        "detections": len(det),
        "matched": len(d_idx),
        "found ≥5": int((found & strong).sum()),
    }


def summarise(rows: list[dict], label: str, extra: dict) -> dict:
    total = pd.DataFrame(rows).sum(numeric_only=True)
    return {
        "setting": label,
        **extra,
        "cells": int(total["cells"]),
        "cells ≥5": int(total["cells ≥5"]),
        "detections": int(total["detections"]),
        "precision": total["matched"] / max(total["detections"], 1),
        "recall ≥5": total["found ≥5"] / max(total["cells ≥5"], 1),
    }


def fields(seeds: list[int], ablation: bool) -> pd.DataFrame:
    out = []
    settings = [("noise only (baseline)", noise_only())]
    if ablation:
        settings += [(k, dataclasses.replace(noise_only(), **v)) for k, v in EFFECTS.items()]
    for label, realism in [*settings, ("realistic", Realism.realistic())]:
        rows, seconds, pixels, tissue_mm2, false = [], 0.0, 0, 0.0, 0
        for seed in seeds:
            signal, _, truth, details = realistic_field(seed=seed, realism=realism, extras=True)
            started = time.perf_counter()
            found = detect_cells(signal, pixel_size_um=PIXEL_UM, cell_diameter_um=CELL_UM)
            seconds += time.perf_counter() - started
            pixels += signal.size
            r = score(found, truth, 0.5 * CELL_UM / PIXEL_UM)
            rows.append(r)
            tissue_mm2 += details["tissue"].sum() * PIXEL_UM**2 / 1e6
            false += r["detections"] - r["matched"]
        row = summarise(rows, label, {"fields": len(seeds)})
        row["false / mm² tissue"] = false / tissue_mm2
        row["MP/s"] = pixels / 1e6 / seconds
        out.append(row)
    return pd.DataFrame(out)


def worlds(paths: list[Path], max_sections: int) -> pd.DataFrame:
    from cellmap2d.io import open_brain, read_manifest

    out = []
    for root in paths:
        doc = json.loads((root / "world.json").read_text())
        preset = doc.get("realism", {"preset": "easy"})["preset"]
        diameter_px = doc["cell_diameter_um"] / doc["pixel_size_um"]
        rows, sections = [], 0
        for spec in read_manifest(root / "manifest.csv"):
            truth = pd.read_csv(root / "truth" / spec.brain_id / "cells.csv")
            brain = open_brain(spec.path, brain_id=spec.brain_id)
            present = sorted(truth["section"].unique())
            pick = present[:: max(1, int(np.ceil(len(present) / max_sections)))]
            for z in pick:
                image = brain.section(int(z), spec.signal_channel)
                found = detect_cells(
                    image,
                    pixel_size_um=brain.pixel_size_um[0],
                    cell_diameter_um=doc["cell_diameter_um"],
                )
                cells = truth[truth["section"] == z]
                rows.append(score(found, cells, diameter_px, ("x_px", "y_px")))
                sections += 1
        row = summarise(rows, f"{preset} world (seed {doc['seed']})", {"sections": sections})
        row["detections / cell"] = row["detections"] / max(row["cells"], 1)
        out.append(row)
    return pd.DataFrame(out)


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (3 significant digits), without the optional tabulate package."""

    def cell(v) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.to_numpy()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[101, 102, 103, 104])
    parser.add_argument("--quick", action="store_true", help="one field seed, no worlds")
    parser.add_argument("--world", type=Path, nargs="*", default=[])
    parser.add_argument("--max-sections", type=int, default=6, help="per brain")
    parser.add_argument("--ablation", action="store_true", help="one effect at a time too")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    pd.set_option("display.width", 250)
    print(f"\n### Fields: 1024², {PIXEL_UM} µm pixels, {CELL_UM:g} µm cells, seeds {seeds}\n")
    print(markdown(fields(seeds, args.ablation)))
    if args.world and not args.quick:
        print(f"\n### Worlds: level-0 signal, ≤ {args.max_sections} sections per brain\n")
        print(markdown(worlds(args.world, args.max_sections)))


if __name__ == "__main__":
    main()
