"""Refinement across shapes on the real section: annotation placed by ``refine`` vs a reference.

Run ``python benchmarks/registration_real.py [--data ../shared/data] [--quick] [--plot DIR]``.

The real fluorescence section ``sample_hipp.tif`` (318 × 428) is refined *as it is* (no
padding, no cropping) onto the real Allen 25 µm template slice ``Atlas_Hipp.tif`` (320 × 456,
annotation_25 AP index 293). The section's pixel size is not recorded anywhere (the data
README and brainglobe-registration, where both images come from, give none); brainglobe
registers it directly to the 25 µm slice and its brain is as wide as the template's
(414 vs 411 px), so it is taken as 25 µm. The annotation slice is compacted to small ints
(``np.unique``), carried onto the section by each placement, and compared with the annotation
carried by the **reference**: a thin-plate spline through landmarks placed by hand (below).

Scores (all on the section's pixel grid):

- *weighted Dice, major divisions*: every annotation id is rolled up to one of
  ``MAJOR`` (Isocortex, OLF, HPF, CTXsp, STR, PAL, TH, HY, MB, fiber tracts, VS; else
  "other brain"); per division the Dice of the placement's map with the reference's, weighted
  by the division's area in the reference.
- *weighted Dice, all ids*: the same over every annotation id of the slice (≈ 170).
- *landmark error*: distance (atlas px = 25 µm) between where a placement sends each section
  landmark and its hand-placed atlas position (the reference passes through them up to its
  smoothing; its own leave-one-out error is printed).
- *outline Dice*: warped brain (annotation > 0) against the section's tissue outline.

Placements: the image centres on each other at physical scale (``initial="frame"``, what
padding the section to the atlas frame did before), the moments placement alone, ``refine``
with ``syn=False`` (affine), the default ``refine``, and a landmark affine (least squares
through the same landmarks, a reference-side baseline).

Uncertainty of the reference: the landmarks are perturbed by their estimated placement
uncertainty (``LANDMARKS`` column ``sd``; Gaussian, 20 draws) and the reference re-fitted;
the weighted Dice of the perturbed references with the reference is the noise floor: a
placement scoring at that level cannot be told from the reference.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from cellmap2d.atlas import read_ontology
from cellmap2d.registration import Refinement, _outline_mask, refine

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ATLAS_INDEX = 293
PIXEL_UM = 25.0  # assumed for sample_hipp (see the module docstring)
MAJOR = (
    "Isocortex",
    "OLF",
    "HPF",
    "CTXsp",
    "STR",
    "PAL",
    "TH",
    "HY",
    "MB",
    "fiber tracts",
    "VS",
)

# Landmarks placed by hand, section (x, y) → Atlas_Hipp (x, y), pixels (x = column, y = row).
# How: each image was shown at ~8 screen px per image px with a 10-px grid (crops of the
# midline, both hippocampi, both lateral halves, the ventral hypothalamus); a point was taken
# only where the same anatomical feature is visible in both images; positions were read off
# the grid to ~1 px. ``sd`` is my estimate of each landmark's uncertainty (px), larger where
# the feature is a curve without a corner (lateral-most points slide along the outline) or
# looks different in the two images (ventral notches, where the section is torn).
# Not used: the torn left lateral edge, fine thalamic nuclei (no contrast in the section).
LANDMARKS = [
    # name,                                   sx,    sy,    ax,    ay,  sd
    ("dorsal interhemispheric fissure, tip", 219.0, 28.0, 227.5, 26.0, 2.0),
    ("corpus callosum, dorsal edge, midline", 219.0, 66.0, 228.0, 63.0, 2.0),
    ("corpus callosum, ventral edge, midline", 218.0, 87.0, 228.0, 84.0, 2.0),
    ("dorsal third ventricle, ventral tip", 215.0, 134.0, 228.0, 133.0, 2.0),
    ("mammillothalamic tract, left", 189.0, 213.0, 205.0, 216.0, 1.5),
    ("mammillothalamic tract, right", 234.0, 215.0, 250.0, 216.0, 1.5),
    ("small dark tract, ventral hypothalamus, left", 172.0, 256.0, 191.0, 256.0, 2.0),
    ("small dark tract, ventral hypothalamus, right", 247.0, 257.0, 264.0, 256.0, 2.0),
    ("third ventricle, ventral end", 208.0, 283.0, 227.5, 287.0, 2.0),
    ("ventral surface, midline", 212.0, 294.0, 228.0, 292.0, 3.0),
    ("hippocampus, upper dark arch, peak, left", 150.0, 70.0, 170.0, 74.0, 3.0),
    ("hippocampus, lower dark arch, peak, left", 148.0, 86.0, 170.0, 89.0, 3.0),
    ("hippocampus, upper dark arch, peak, right", 285.0, 79.0, 288.0, 74.0, 3.0),
    ("hippocampus, lower dark arch, peak, right", 285.0, 95.0, 288.0, 89.0, 3.0),
    ("hippocampus, lateral-most edge, left", 80.0, 104.0, 101.0, 110.0, 3.0),
    ("hippocampus, lateral-most edge, right", 343.0, 115.0, 356.0, 117.0, 3.0),
    ("ventral lobe / hypothalamus notch, left", 152.0, 276.0, 166.0, 262.0, 4.0),
    ("ventral lobe / hypothalamus notch, right", 272.0, 275.0, 290.0, 262.0, 4.0),
    ("ventral lobe, lowest point, left", 88.0, 289.0, 100.0, 298.0, 4.0),
    ("ventral lobe, lowest point, right", 330.0, 300.0, 355.0, 298.0, 4.0),
    ("cortex, lateral-most point, left", 6.0, 160.0, 22.0, 160.0, 4.0),
    ("lateral surface notch, right", 413.0, 186.0, 428.0, 188.0, 3.0),
    ("cortex, lateral-most point, right", 419.0, 160.0, 433.0, 160.0, 4.0),
]
TPS_SMOOTHING = 1.0


def read_tif(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path).astype(np.float32)


def landmark_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sec = np.array([[r[1], r[2]] for r in LANDMARKS])
    atl = np.array([[r[3], r[4]] for r in LANDMARKS])
    sd = np.array([r[5] for r in LANDMARKS])
    return sec, atl, sd


def _grid(shape: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)


def tps_refinement(sec: np.ndarray, atl: np.ndarray, shape: tuple[int, int]) -> Refinement:
    """Thin-plate spline section → atlas through the landmarks (lightly smoothed)."""
    from scipy.interpolate import RBFInterpolator

    tps = RBFInterpolator(sec, atl, kernel="thin_plate_spline", smoothing=TPS_SMOOTHING)
    mapped = tps(_grid(shape))
    dense = mapped.T.reshape(2, *shape).astype(np.float32)
    return Refinement(dense, "landmarks")


def affine_refinement(sec: np.ndarray, atl: np.ndarray, shape: tuple[int, int]) -> Refinement:
    """Least-squares affine section → atlas through the landmarks."""
    design = np.hstack([sec, np.ones((len(sec), 1))])
    coef, *_ = np.linalg.lstsq(design, atl, rcond=None)
    grid = _grid(shape)
    mapped = np.hstack([grid, np.ones((len(grid), 1))]) @ coef
    return Refinement(mapped.T.reshape(2, *shape).astype(np.float32), "landmark affine")


def loo_error(sec: np.ndarray, atl: np.ndarray) -> np.ndarray:
    """Leave-one-out error (atlas px) of the thin-plate spline at each landmark."""
    from scipy.interpolate import RBFInterpolator

    out = []
    for i in range(len(sec)):
        keep = np.arange(len(sec)) != i
        tps = RBFInterpolator(
            sec[keep], atl[keep], kernel="thin_plate_spline", smoothing=TPS_SMOOTHING
        )
        out.append(np.linalg.norm(tps(sec[i : i + 1])[0] - atl[i]))
    return np.array(out)


def weighted_dice(got: np.ndarray, ref: np.ndarray) -> float:
    """Area-weighted Dice over the regions (non-zero labels) of ``ref``."""
    labels, areas = np.unique(ref[ref > 0], return_counts=True)
    dice = []
    for label in labels:
        a, b = got == label, ref == label
        dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    return float(np.average(dice, weights=areas))


def major_divisions(ids: np.ndarray, ontology) -> np.ndarray:  # noqa: ANN001
    """Per id, the index (1…) of the first ``MAJOR`` division above it; other brain → len+1."""
    out = np.where(ids > 0, len(MAJOR) + 1, 0)
    for k, acronym in enumerate(MAJOR, start=1):
        out[np.isin(ids, ontology.descendants(acronym))] = k
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def main(argv: list[str] | None = None) -> None:
    import nrrd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--quick", action="store_true", help="5 reference draws, not 20")
    parser.add_argument("--plot", type=Path, default=None, help="write overlay PNGs here")
    args = parser.parse_args(argv)

    folder = args.data / "sections" / "brainglobe"
    section = read_tif(folder / "sample_hipp.tif")
    atlas_slice = read_tif(folder / "Atlas_Hipp.tif")
    annotation, _ = nrrd.read(str(args.data / "ccf" / "annotation_25.nrrd"))
    ids_slice = np.asarray(annotation[ATLAS_INDEX], dtype=np.int64)
    ontology = read_ontology(args.data / "ccf" / "structures.json")
    ids, compact = np.unique(ids_slice, return_inverse=True)
    compact = compact.reshape(ids_slice.shape).astype(np.int32)  # 0 stays 0 (ids[0] == 0)
    assert ids[0] == 0
    major_of_compact = major_divisions(ids, ontology)
    outline = _outline_mask(section)
    sec, atl, sd = landmark_arrays()

    reference = tps_refinement(sec, atl, section.shape)
    ref_compact = reference.warp_labels(compact)
    ref_major = major_of_compact[ref_compact]
    if args.plot is not None:
        _overlay(section, ids[ref_compact], ontology, args.plot, "reference (landmarks)")

    def scores(result: Refinement) -> dict:
        got = result.warp_labels(compact)
        err = np.linalg.norm(result.map_points(sec) - atl, axis=1)
        return {
            "dice_major": weighted_dice(major_of_compact[got], ref_major),
            "dice_ids": weighted_dice(got, ref_compact),
            "lm_median": float(np.median(err)),
            "lm_max": float(err.max()),
            "outline": _dice(got > 0, outline),
        }

    kw = {"section_pixel_um": PIXEL_UM, "atlas_pixel_um": PIXEL_UM}
    rows = []
    for name, call in (
        ("image centres (initial='frame', no refinement)", None),
        ("moments placement alone", None),
        ("refine(syn=False): affine", lambda: refine(section, atlas_slice, syn=False, **kw)),
        ("**refine() default: affine + SyN**", lambda: refine(section, atlas_slice, **kw)),
        ("refine(initial='frame'): affine + SyN", None),
    ):
        t = time.perf_counter()
        if name.startswith("image centres"):
            from cellmap2d.registration import _frame_affine, _linear_refinement

            result = _linear_refinement(
                _frame_affine(section.shape, atlas_slice.shape, 1.0),
                section.shape,
                1.0,
                "frame",
            )
        elif name.startswith("moments"):
            from cellmap2d.registration import _linear_refinement, _moments_affine

            result = _linear_refinement(
                _moments_affine(outline, _outline_mask(atlas_slice), 1.0),
                section.shape,
                1.0,
                "initial",
            )
        elif call is None:
            result = refine(section, atlas_slice, initial="frame", **kw)
        else:
            result = call()
        seconds = time.perf_counter() - t
        rows.append({"placement": name, "method": result.method, **scores(result), "s": seconds})
        if args.plot is not None:
            _overlay(section, ids[result.warp_labels(compact)], ontology, args.plot, name)
    rows.append(
        {
            "placement": "landmark affine (reference side)",
            "method": "-",
            **scores(affine_refinement(sec, atl, section.shape)),
            "s": 0.0,
        }
    )

    rng = np.random.default_rng(20261204)
    draws = 5 if args.quick else 20
    floor = []
    for _ in range(draws):
        noisy = tps_refinement(
            sec + rng.normal(0, 1, sec.shape) * sd[:, None] / np.sqrt(2),
            atl + rng.normal(0, 1, atl.shape) * sd[:, None] / np.sqrt(2),
            section.shape,
        )
        floor.append(scores(noisy))
    loo = loo_error(sec, atl)
    ref_scores = scores(reference)

    print(
        f"sample_hipp.tif {section.shape} (assumed {PIXEL_UM:g} µm/px) → Atlas_Hipp.tif "
        f"{atlas_slice.shape} (25 µm), annotation_25[{ATLAS_INDEX}] ({len(ids) - 1} ids); "
        f"reference: thin-plate spline through {len(sec)} hand-placed landmarks\n"
    )
    print(
        "| placement | method | weighted Dice, major divisions | weighted Dice, all ids | "
        "landmark err median / max (px) | outline Dice | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['placement']} | {r['method']} | {r['dice_major']:.3f} | {r['dice_ids']:.3f} | "
            f"{r['lm_median']:.1f} / {r['lm_max']:.1f} | {r['outline']:.3f} | {r['s']:.1f} |"
        )
    fm = np.array([f["dice_major"] for f in floor])
    fi = np.array([f["dice_ids"] for f in floor])
    print(
        f"| reference perturbed by its landmark sd ({draws} draws; noise floor) | landmarks | "
        f"{fm.mean():.3f} ± {fm.std():.3f} | {fi.mean():.3f} ± {fi.std():.3f} | - | "
        f"{np.mean([f['outline'] for f in floor]):.3f} | - |"
    )
    print(
        f"| reference itself | landmarks | 1 | 1 | {ref_scores['lm_median']:.1f} / "
        f"{ref_scores['lm_max']:.1f} | {ref_scores['outline']:.3f} | - |"
    )
    print(
        f"\nreference leave-one-out landmark error: median {np.median(loo):.1f} px, "
        f"max {loo.max():.1f} px ({LANDMARKS[int(np.argmax(loo))][0]})"
    )
    print(
        "\nTable 2. The same section re-shaped by a known transform (scored in the new frame "
        "against the reference carried along; default refine)\n"
    )
    print(
        "| section as given to refine | shape | px (µm) | method | weighted Dice, major "
        "divisions | landmark err median / max (atlas px) | centres-only Dice | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, image, to_original, pixel in reshaped_sections(section):
        ref_here = ndi.map_coordinates(
            ref_compact, to_original(_grid(image.shape))[:, ::-1].T, order=0, cval=0
        ).reshape(image.shape)
        lm_here = np.linalg.solve(*_inverse_args(to_original, sec)).T
        t = time.perf_counter()
        result = refine(image, atlas_slice, section_pixel_um=pixel, atlas_pixel_um=PIXEL_UM)
        seconds = time.perf_counter() - t
        from cellmap2d.registration import _frame_affine, _linear_refinement

        ratio = PIXEL_UM / pixel
        centres = _linear_refinement(
            _frame_affine(image.shape, atlas_slice.shape, ratio), image.shape, ratio, "frame"
        )
        err = np.linalg.norm(result.map_points(lm_here) - atl, axis=1)
        print(
            f"| {label} | {image.shape[0]}×{image.shape[1]} | {pixel:g} | {result.method} | "
            f"{weighted_dice(major_of_compact[result.warp_labels(compact)], major_of_compact[ref_here]):.3f} | "
            f"{np.median(err):.1f} / {err.max():.1f} | "
            f"{weighted_dice(major_of_compact[centres.warp_labels(compact)], major_of_compact[ref_here]):.3f} | "
            f"{seconds:.1f} |"
        )
    if not args.quick:
        which = {}
        for name in ("Atlas_Hipp", "Atlas_Str"):
            r = refine(section, read_tif(folder / f"{name}.tif"), **kw)
            which[name] = (r.qc.get("similarity_syn", r.qc["similarity_affine"]), r.method)
        print(
            "which template slice: Mattes MI after refine — "
            + ", ".join(f"{n} {v:.3f} ({m})" for n, (v, m) in which.items())
        )


def reshaped_sections(section: np.ndarray) -> list[tuple]:
    """The section binned 2× (50 µm px) and rotated by 15° off-centre in a larger canvas.

    Each entry: label, image, ``to_original`` (affine: new-frame pixel (x, y) → original
    section pixel, as a function of an ``(n, 2)`` array) and the pixel size (µm).
    """
    h, w = (section.shape[0] // 2) * 2, (section.shape[1] // 2) * 2
    binned = section[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    def from_binned(q: np.ndarray) -> np.ndarray:
        return 2 * q + 0.5

    theta = np.radians(15.0)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    canvas = (420, 520)
    pivot_new = np.array([300.0, 190.0])  # where the section centre lands (x, y): off-centre
    centre = np.array([section.shape[1] / 2, section.shape[0] / 2])

    def from_rotated(q: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(q) - pivot_new) @ rot.T + centre

    grid = from_rotated(_grid(canvas))
    rotated = ndi.map_coordinates(section, [grid[:, 1], grid[:, 0]], order=1, cval=0.0)
    return [
        ("binned 2×", binned.astype(np.float32), from_binned, 2 * PIXEL_UM),
        (
            "rotated 15°, off-centre in a 420 × 520 canvas",
            rotated.reshape(canvas).astype(np.float32),
            from_rotated,
            PIXEL_UM,
        ),
    ]


def _inverse_args(to_original, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """``(A, B)`` such that ``solve(A, B)`` gives the new-frame points of original ``points``
    under the affine ``to_original`` (returned as (n, 2) via a stacked system)."""
    origin = to_original(np.zeros((1, 2)))[0]
    linear = np.stack(
        [
            to_original(np.array([[1.0, 0.0]]))[0] - origin,
            to_original(np.array([[0.0, 1.0]]))[0] - origin,
        ],
        axis=1,
    )
    return linear, (points - origin).T


def _overlay(section: np.ndarray, labels: np.ndarray, ontology, folder: Path, name: str) -> None:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    lo, hi = np.percentile(section[section > 0], [1, 99.5])
    rgb = np.repeat(np.clip((section - lo) / (hi - lo), 0, 1)[..., None], 3, axis=2)
    rgb[edge] = 0.5 * rgb[edge] + 0.5 * np.array([1.0, 0.8, 0.1])
    sec, _, _ = landmark_arrays()
    fig, ax = plt.subplots(figsize=(9, 6.8), dpi=110)
    ax.imshow(rgb, interpolation="nearest")
    ax.plot(sec[:, 0], sec[:, 1], "c+", ms=8)
    ax.set_title(name)
    ax.axis("off")
    slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
    fig.savefig(folder / f"{slug}.png", bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
