"""Seconds per section for anchoring and refinement, and a 140-section brain end to end.

::

    python benchmarks/registration_speed.py [--sections 140] [--sample 12] [--work DIR]

Builds one phantom brain of ``--sections`` coronal sections (the size of a real series; the
phantom's 50 µm atlas, 8 µm level-0 pixels, registration at 50 µm, as in the demo), then

1. runs the pipeline up to the mapped cells (``cells_mapped.h5ad``) with two Luigi workers and
   reports the wall time, split into the thumbnails, the anchoring (``AnchorSeries``, the whole
   series jointly), the refinements (``RefineSection``) and the rest, then how far its planted
   cells are mapped from their true CCF positions (the table of ``phantom_mapping.py``, on a
   whole series' worth of sections instead of 18);
2. times, in this process and on one core, ``registration.refine`` on ``--sample`` of the
   anchored sections next to the baseline a user would otherwise write — one plain
   ``ants.registration(type_of_transform="SyN")`` call on the same pair — as seconds per section
   and their ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def build_world(root: Path, n_sections: int):
    from cellmap2d.synthetic import PhantomBrain, WorldConfig, make_world

    spacing = 11000.0 / n_sections  # the phantom brain spans ~11.5 mm of AP
    config = WorldConfig(
        seed=31,
        brains=[
            PhantomBrain(
                "series-140",
                {"L6 CT CTX Glut": 1.0},
                n_sections=n_sections,
                section_spacing_um=round(spacing, 1),
                first_ap_um=500.0,
                angles_deg=(2.0, -1.5),
                missing=(n_sections // 3,),
                damaged=(2 * n_sections // 3,),
                n_labeled=100_000,
                seed=32,
            )
        ],
    )
    return make_world(root / "world", config)


def timed_build(tasks: list, workers: int) -> float:
    import luigi

    started = time.perf_counter()
    result = luigi.build(
        tasks, local_scheduler=True, workers=workers, detailed_summary=True, log_level="WARNING"
    )
    if not result.scheduling_succeeded or result.status.name.startswith("FAILED"):
        raise SystemExit(result.summary_text)
    return time.perf_counter() - started


def end_to_end(world, store: Path, workers: int) -> pd.DataFrame:
    from cellmap2d.cli import configure_world

    configure_world(world, store)
    from tasks import AnchorSeries, MappedCells, PrepareAtlas, RefineSection, SectionThumbnail
    from tasks.brain import per_section

    bid = world.config.brains[0].brain_id
    steps = [
        ("atlas cache", [PrepareAtlas()]),
        ("thumbnails", list(per_section(SectionThumbnail, bid).values())),
        ("anchoring (whole series)", [AnchorSeries(brain_id=bid)]),
        ("refinement (all sections)", list(per_section(RefineSection, bid).values())),
        ("detection + mapped cells", [MappedCells(brain_id=bid)]),
    ]
    rows = [{"step": name, "seconds": timed_build(tasks, workers)} for name, tasks in steps]
    rows.append({"step": "total", "seconds": sum(r["seconds"] for r in rows)})
    return pd.DataFrame(rows)


def per_section_refinement(world, store: Path, sample: int) -> pd.DataFrame:
    import ants

    from cellmap2d.anchoring import read_quint
    from cellmap2d.assemble import section_grid_ccf
    from cellmap2d.atlas import read_atlas_h5
    from cellmap2d.registration import refine, tissue_mask
    from tasks.sections import load_thumbnail

    bid = world.config.brains[0].brain_id
    folder = store / "brains" / bid
    atlas = read_atlas_h5(next((store / "atlas").glob("*.h5")))
    anchors = {a.nr: a for a in read_quint(folder / "anchoring.json")}
    present = [z for z in sorted(anchors) if z not in world.config.brains[0].missing]
    chosen = [present[i] for i in np.linspace(0, len(present) - 1, sample).round().astype(int)]
    rows = []
    for z in chosen:
        thumb = load_thumbnail(str(folder / "thumbnails" / f"s{z:04d}.npz"))
        image = thumb["autofluorescence"].astype(np.float32)
        grid = section_grid_ccf(
            anchors[z], image.shape, float(thumb["factor"]), tuple(thumb["level0_shape"])
        )
        atlas_slice = atlas.plane_image(grid, kind="template").astype(np.float32)
        atlas_mask = atlas.plane_image(grid, kind="annotation") > 0
        if tissue_mask(image).mean() < 0.01:
            continue
        started = time.perf_counter()
        result = refine(image, atlas_slice, atlas_mask=atlas_mask)
        ours = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as workdir:
            started = time.perf_counter()
            ants.registration(
                ants.from_numpy(image),
                ants.from_numpy(atlas_slice),
                type_of_transform="SyN",
                outprefix=f"{workdir}/",
            )
            plain = time.perf_counter() - started
        rows.append(
            {
                "section": z,
                "pixels": f"{image.shape[1]}×{image.shape[0]}",
                "refine s": ours,
                "method kept": result.method,
                "ants SyN s": plain,
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", type=int, default=140)
    parser.add_argument("--sample", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/registration_speed"))
    args = parser.parse_args()
    import cellmap2d  # noqa: F401  (sets one ITK thread per process)

    print(f"ITK threads per process: {os.environ.get('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS')}")
    started = time.perf_counter()
    world = build_world(args.work, args.sections)
    print(
        f"phantom brain of {args.sections} sections built in {time.perf_counter() - started:.0f} s"
    )
    store = args.work / "store"
    steps = end_to_end(world, store, args.workers)
    n = args.sections
    steps["seconds per section"] = steps["seconds"] / n
    print(
        f"\nEnd to end, one {n}-section brain, {args.workers} Luigi workers, load {os.getloadavg()[0]:.1f}"
    )
    print(steps.round(2).to_string(index=False))
    from phantom_mapping import table as accuracy_table  # this script's folder is on sys.path

    accuracy, _ = accuracy_table(store, world.root, f"{n} sections")
    print(f"\nCCF error of planted cells on this {n}-section brain (µm; as phantom_mapping.py)")
    print(accuracy.round(1).to_string(index=False))
    table = per_section_refinement(world, store, args.sample)
    print(f"\nRefinement per section, one core, {len(table)} sections sampled along the series")
    print(table.round(2).to_string(index=False))
    ratio = table["refine s"].sum() / table["ants SyN s"].sum()
    print(
        f"\nmean refine {table['refine s'].mean():.2f} s/section, plain ANTs SyN "
        f"{table['ants SyN s'].mean():.2f} s/section: ratio refine / SyN {ratio:.2f}"
    )


if __name__ == "__main__":
    main()
