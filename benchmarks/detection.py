"""Cell detection: accuracy on real images, speed, memory and tiling, next to skimage blob_log.

Run from the project root: ``python benchmarks/detection.py [--quick]``. Prints markdown tables
(the ones in docs/detection.md). Real data from ``../shared/data/cells``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellmap2d import segmentation  # noqa: E402
from cellmap2d._detectors import mask_centroids, match_points, train_detector  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cells"
FLUO_PIXEL_UM = 0.5  # assumed: the dataset gives no pixel size (200× objective, 1600 px wide)
SECTION_PIXEL_UM, SECTION_CELL_UM = 1.4, 15.0


# --- data -----------------------------------------------------------------------------------


def fluocells() -> list[tuple[str, np.ndarray, np.ndarray]]:
    import imageio.v3 as iio

    out = []
    for path in sorted((DATA / "fluocells" / "images").glob("*.png")):
        rgb = iio.imread(path).astype(np.float32)
        image = rgb[..., 0] if path.name.startswith("red") else rgb[..., 0] + rgb[..., 1]
        mask = iio.imread(DATA / "fluocells" / "masks" / path.name)
        out.append((path.stem, image, mask))
    return out


def stardist() -> list[tuple[str, np.ndarray, np.ndarray]]:
    import tifffile

    image = tifffile.imread(DATA / "stardist" / "img2d.tif").astype(np.float32)
    mask = tifffile.imread(DATA / "stardist" / "mask2d.tif")
    return [("stardist img2d", image, mask)]


def median_diameter_px(items: list[tuple[str, np.ndarray, np.ndarray]]) -> float:
    radii = np.concatenate([mask_centroids(m)[1] for _, _, m in items])
    return float(2 * np.median(radii))


def scores(found: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall, F1: one-to-one within each cell's equivalent radius."""
    truth, radii = mask_centroids(mask)
    matched = (match_points(found, truth, radii) >= 0).sum()
    p = matched / len(found) if len(found) else float(len(truth) == 0)
    r = matched / len(truth) if len(truth) else 1.0
    return p, r, (0.0 if p + r == 0 else 2 * p * r / (p + r))


# --- methods ---------------------------------------------------------------------------------


def run_blob_log(
    image: np.ndarray, sigma: float, threshold: float, num_sigma: int = 1, ratio: float = 1.0
) -> np.ndarray:
    """skimage blob_log on the min–max scaled image: one σ, or ``num_sigma`` from σ/ratio to
    σ·ratio."""
    from skimage.feature import blob_log

    scaled = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
    blobs = blob_log(
        scaled,
        min_sigma=sigma / ratio,
        max_sigma=sigma * ratio,
        num_sigma=num_sigma,
        threshold=threshold,
    )
    return blobs[:, [1, 0]] if len(blobs) else np.zeros((0, 2))


def run_ours(image: np.ndarray, pixel: float, diameter: float, **kw) -> np.ndarray:
    cells = segmentation.detect_cells(image, pixel_size_um=pixel, cell_diameter_um=diameter, **kw)
    return cells[["x", "y"]].to_numpy()


def best_setting(items, run, grid) -> tuple[dict, list[tuple[float, float, float]]]:
    """The grid setting with the best mean F1 over ``items`` (one setting per dataset)."""
    best = None
    for setting in grid:
        rows = [scores(run(image, **setting), mask) for _, image, mask in items]
        mean_f1 = float(np.mean([r[2] for r in rows]))
        if best is None or mean_f1 > best[0]:
            best = (mean_f1, setting, rows)
    return best[1], best[2]


SINGLE_SCALES = (0.7, 0.85)  # one LoG scale below the median cell size (blob_log: 0.5–1.4)
MULTI_SCALE = (0.7, 1.0, 1.4)
WIDE_SCALE = (0.7, 1.0, 1.4, 2.0)


def grids(sigma_px: float, quick: bool) -> dict[str, list[dict]]:
    """Each method's settings; the one with the best mean F1 on a dataset is reported."""
    blob_thresholds = [0.02, 0.05, 0.1, 0.2] if quick else [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]
    blob = [
        {"sigma": sigma_px * s, "threshold": t}
        for s in (0.5, 0.7, 1.0, 1.4)
        for t in blob_thresholds
    ]
    blob += [
        {"sigma": sigma_px, "threshold": t, "num_sigma": 3, "ratio": 1.4} for t in blob_thresholds
    ]
    brightness = [0.0, 0.1, 0.2] if quick else [0.0, 0.1, 0.15, 0.2, 0.3]
    scale_sets = (
        {},
        *({"scales": (s,)} for s in SINGLE_SCALES),
        {"scales": MULTI_SCALE},
        {"scales": WIDE_SCALE},
    )
    log = [
        {"threshold": t, "min_brightness": b, **scales}
        for scales in scale_sets
        for b in brightness
        for t in (6, 25, 100, 400)
    ]
    log += [
        {"threshold_unit": "spread", "threshold": t, "min_brightness": b, **scales}
        for scales in scale_sets
        for b in brightness
        for t in ((1, 3, 6, 10, 15) if quick else (1, 2, 3, 4, 6, 8, 10, 12, 15))
    ]
    watershed = log  # the watershed's markers are the log detections
    # training settings × the detection-time brightness cut-off (no retraining for the latter)
    trained = [
        ({"scales": scales}, [{"min_brightness": b} for b in brightness])
        for scales in ((1.0,), *((s,) for s in SINGLE_SCALES), MULTI_SCALE, WIDE_SCALE)
    ]
    return {"blob_log": blob, "log": log, "watershed": watershed, "trained": trained}


def accuracy(quick: bool) -> pd.DataFrame:
    rows = []
    for dataset, items, pixel in (
        ("fluocells", fluocells(), FLUO_PIXEL_UM),
        ("stardist", stardist(), 1.0),
    ):
        dpx = median_diameter_px(items)
        diameter = dpx * pixel
        print(
            f"{dataset}: pixel {pixel} µm (assumed), cell diameter {diameter:.1f} µm = median "
            f"equivalent diameter {dpx:.1f} px of the masks",
            flush=True,
        )
        grid = grids(dpx / 2 / np.sqrt(2), quick)
        results = {"blob_log": best_setting(items, run_blob_log, grid["blob_log"])}
        for method in ("log", "watershed"):
            results[method] = best_setting(
                items,
                lambda image, _p=pixel, _d=diameter, _m=method, **kw: run_ours(
                    image, _p, _d, method=_m, **kw
                ),
                grid[method],
            )
        best = None
        for train_kw, detect_settings in grid["trained"]:
            for detect_kw, per_image in zip(
                detect_settings,
                trained_held_out(items, pixel, diameter, detect_settings, **train_kw),
                strict=True,
            ):
                mean_f1 = float(np.mean([r[2] for r in per_image]))
                if best is None or mean_f1 > best[0]:
                    best = (mean_f1, {"held out": "yes", **train_kw, **detect_kw}, per_image)
        results["trained"] = (best[1], best[2])
        for method, (setting, per_image) in results.items():
            print(f"  {method}: {_fmt(setting)}", flush=True)
            for (name, _, mask), (p, r, f1) in zip(items, per_image, strict=True):
                rows.append(
                    {
                        "dataset": dataset,
                        "image": name,
                        "method": method,
                        "setting": _fmt(setting),
                        "cells": len(mask_centroids(mask)[0]),
                        "precision": p,
                        "recall": r,
                        "F1": f1,
                    }
                )
    return pd.DataFrame(rows)


def trained_held_out(
    items, pixel: float, diameter: float, detect_settings: list[dict], **train_kw
) -> list[list[tuple[float, float, float]]]:
    """Per detection setting, the per-image scores of models trained without the image:
    leave-one-image-out; a single image is split in left/right halves (train left, test right,
    and the reverse; the two test halves are scored together)."""

    def train(images, masks):
        return train_detector(
            images, masks, pixel_size_um=pixel, cell_diameter_um=diameter, **train_kw
        )

    if len(items) == 1:
        _, image, mask = items[0]
        half = image.shape[1] // 2
        parts = [(image[:, :half], mask[:, :half]), (image[:, half:], mask[:, half:])]
        models = [train([parts[1 - test][0]], [parts[1 - test][1]]) for test in (0, 1)]
        out = []
        for kw in detect_settings:
            found = [
                run_ours(
                    parts[test][0], pixel, diameter, method="trained", model=models[test], **kw
                )
                + [test * half, 0]
                for test in (0, 1)
            ]
            out.append([scores(np.concatenate(found), mask)])
        return out
    models = []
    for i in range(len(items)):
        train_items = [it for j, it in enumerate(items) if j != i]
        models.append(train([t[1] for t in train_items], [t[2] for t in train_items]))
    return [
        [
            scores(run_ours(image, pixel, diameter, method="trained", model=model, **kw), mask)
            for (_, image, mask), model in zip(items, models, strict=True)
        ]
        for kw in detect_settings
    ]


def _fmt(setting: dict) -> str:
    def value(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, tuple):
            return "/".join(f"{x:g}" for x in v)
        return str(v)

    return ", ".join(f"{k}={value(v)}" for k, v in setting.items())


# --- synthetic sections ----------------------------------------------------------------------


def synthetic_tile(
    y0: int, x0: int, shape: tuple[int, int], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A uint16 piece of a section: textured tissue background, shot-like noise, and Gaussian
    cells (15 µm at 1.4 µm/px, ~300 cells/mm²); returns the tile and its cells' (x, y)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng([seed, y0, x0])
    h, w = shape
    texture = ndi.zoom(rng.normal(0, 1, (h // 16 + 2, w // 16 + 2)), 16, order=1)[:h, :w]
    image = 400 + 80 * texture + rng.normal(0, 15, (h, w))
    n = rng.poisson(h * w * (SECTION_PIXEL_UM / 1000) ** 2 * 300)
    xy = rng.uniform(8, [w - 8, h - 8], (n, 2))
    sigma = SECTION_CELL_UM / 2 / SECTION_PIXEL_UM / 1.3
    offs = np.arange(-12, 13)
    for (x, y), amp in zip(xy, rng.uniform(150, 600, n), strict=True):
        xi, yi = int(x), int(y)
        ys = np.clip(yi + offs, 0, h - 1)
        xs = np.clip(xi + offs, 0, w - 1)
        g = amp * np.exp(-((ys[:, None] - y) ** 2 + (xs[None, :] - x) ** 2) / (2 * sigma**2))
        image[np.ix_(ys, xs)] += g
    return np.clip(image, 0, 65535).astype(np.uint16), xy + [x0, y0]


def write_section(path: Path, size: int, chunk: int = 1024) -> None:
    import zarr

    arr = zarr.open_array(
        str(path), mode="w", shape=(size, size), chunks=(chunk, chunk), dtype="u2"
    )
    for y0 in range(0, size, chunk):
        for x0 in range(0, size, chunk):
            shape = (min(chunk, size - y0), min(chunk, size - x0))
            arr[y0 : y0 + shape[0], x0 : x0 + shape[1]] = synthetic_tile(y0, x0, shape)[0]


SPEED_REPEATS = 5  # each timing is the best of this many runs (the machine's speed varies ~10 %)


def _best_time(func, repeats: int) -> tuple[float, object]:
    """The shortest of ``repeats`` runs (the machine is shared) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - t)
    return min(times), result


def speed(size: int, quick: bool) -> pd.DataFrame:
    import cv2

    image = np.zeros((size, size), np.uint16)
    step = 1024
    for y0 in range(0, size, step):
        for x0 in range(0, size, step):
            shape = (min(step, size - y0), min(step, size - x0))
            image[y0 : y0 + shape[0], x0 : x0 + shape[1]] = synthetic_tile(y0, x0, shape)[0]
    train_img, train_xy = synthetic_tile(0, 0, (1024, 1024), seed=7)
    train_mask = _disk_mask(train_img.shape, train_xy, SECTION_CELL_UM / 2 / SECTION_PIXEL_UM)
    model = train_detector(
        [train_img], [train_mask], pixel_size_um=SECTION_PIXEL_UM, cell_diameter_um=SECTION_CELL_UM
    )
    crop = 2000 if quick else 3000
    spread = {"threshold_unit": "spread", "scales": MULTI_SCALE}
    runs = [
        ("log", image, {"method": "log"}),
        ("log (2 threads)", image, {"method": "log", "workers": 2}),
        ("log (spread unit, 3 scales)", image, {"method": "log", **spread}),
        ("watershed", image[:crop, :crop], {"method": "watershed"}),
        ("trained", image[:crop, :crop], {"method": "trained", "model": model}),
    ]
    rows = []
    print(f"load average before: {os.getloadavg()}", flush=True)
    # warm-up (imports, kernel caches, first touch of the image's pages)
    segmentation.detect_cells_tiled(
        image[:1024, :1024], pixel_size_um=SECTION_PIXEL_UM, cell_diameter_um=SECTION_CELL_UM
    )
    for name, data, kw in runs:
        seconds, cells = _best_time(
            lambda data=data, kw=kw: segmentation.detect_cells_tiled(
                data, pixel_size_um=SECTION_PIXEL_UM, cell_diameter_um=SECTION_CELL_UM, **kw
            ),
            SPEED_REPEATS,
        )
        rows.append(_speed_row(name, data.shape, seconds, len(cells), kw.get("workers", 1)))
        print(rows[-1], flush=True)
    from skimage.feature import blob_log

    # the accuracy table's blob_log: min–max scaled image, σ at the cell size, one σ (what won
    # on both datasets) and, for reference, three σ (0.7–1.4×)
    cv2.setNumThreads(1)
    blob_crop = image[:1000, :1000].astype(np.float32)
    blob_crop = (blob_crop - blob_crop.min()) / (blob_crop.max() - blob_crop.min())
    sigma = SECTION_CELL_UM / 2 / SECTION_PIXEL_UM / np.sqrt(2)
    for name, lo, hi, num in (
        ("skimage blob_log (one σ)", sigma, sigma, 1),
        ("skimage blob_log (3 σ, 0.7–1.4×)", sigma / 1.4, sigma * 1.4, 3),
    ):
        seconds, blobs = _best_time(
            lambda lo=lo, hi=hi, num=num: blob_log(
                blob_crop, min_sigma=lo, max_sigma=hi, num_sigma=num, threshold=0.02
            ),
            SPEED_REPEATS,
        )
        rows.append(_speed_row(name, blob_crop.shape, seconds, len(blobs), 1))
    print(f"load average after: {os.getloadavg()}", flush=True)
    table = pd.DataFrame(rows)
    base = table.loc[table["method"] == "skimage blob_log (one σ)", "MP/s per core"].iloc[0]
    table["× blob_log (one σ)"] = table["MP/s per core"] / base
    return table


def _speed_row(name, shape, seconds, n, workers) -> dict:
    mp = shape[0] * shape[1] / 1e6
    return {
        "method": name,
        "image": f"{shape[0]}×{shape[1]}",
        "seconds": seconds,
        "cells": n,
        "MP/s per core": mp / seconds / workers,
    }


def _disk_mask(shape, xy, radius) -> np.ndarray:
    mask = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for i, (x, y) in enumerate(xy, start=1):
        y0, y1 = int(max(0, y - radius - 1)), int(min(shape[0], y + radius + 2))
        x0, x1 = int(max(0, x - radius - 1)), int(min(shape[1], x + radius + 2))
        disk = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 <= radius**2
        mask[y0:y1, x0:x1][disk] = i
    return mask


# --- memory (each size in its own processes) ---------------------------------------------------

_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import zarr
from cellmap2d import segmentation
arr = zarr.open_array({path!r}, mode="r")
t = time.perf_counter()
cells = segmentation.detect_cells_tiled(arr, pixel_size_um={pixel}, cell_diameter_um={cell})
print(json.dumps({{"cells": len(cells), "seconds": time.perf_counter() - t,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def memory(sizes: list[int]) -> pd.DataFrame:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = Path(tmp) / f"s{size}.zarr"
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
                    f"import detection; detection.write_section(__import__('pathlib').Path({str(path)!r}), {size})",
                ],
                check=True,
            )
            code = _CHILD.format(
                root=str(ROOT), path=str(path), pixel=SECTION_PIXEL_UM, cell=SECTION_CELL_UM
            )
            out = subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "section": f"{size}×{size} (zarr, 1024² chunks)",
                    "MP": size * size / 1e6,
                    "cells": res["cells"],
                    "seconds": res["seconds"],
                    "peak RSS (MB)": res["maxrss_mb"],
                }
            )
            print(rows[-1], flush=True)
            import shutil

            shutil.rmtree(path)
    return pd.DataFrame(rows)


def tiling() -> pd.DataFrame:
    from scipy.spatial import cKDTree

    image, _ = synthetic_tile(0, 0, (3000, 3000), seed=3)
    rows = []
    for name, options in (
        ("log", {"method": "log"}),
        ("log (spread unit, 3 scales)", {"threshold_unit": "spread", "scales": MULTI_SCALE}),
        ("watershed", {"method": "watershed"}),
    ):
        kw = {"pixel_size_um": SECTION_PIXEL_UM, "cell_diameter_um": SECTION_CELL_UM, **options}
        whole = segmentation.detect_cells(image, **kw)[["x", "y"]].to_numpy()
        tiled = segmentation.detect_cells_tiled(image, tile=512, **kw)[["x", "y"]].to_numpy()
        distance, nearest = cKDTree(whole).query(tiled, distance_upper_bound=0.5)
        same = np.unique(nearest[np.isfinite(distance)])
        rows.append(
            {
                "method": name,
                "untiled cells": len(whole),
                "tiled cells (512² tiles)": len(tiled),
                "same within 0.5 px": len(same),
            }
        )
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A pandas table as markdown (no tabulate dependency)."""

    def cell(v: object) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{v:.{digits}g}" if abs(v) >= 100 else f"{v:.{digits - 1}f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    lines += [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and grids")
    parser.add_argument("--only", choices=["accuracy", "speed", "memory", "tiling"])
    args = parser.parse_args()
    if args.only in (None, "accuracy"):
        table = accuracy(args.quick)
        print("\n## Accuracy (one setting per dataset and method)\n")
        print(markdown(table))
        means = table.groupby(["dataset", "method"])["F1"].mean().unstack(0).reset_index()
        print("\nmean F1 per dataset\n")
        print(markdown(means))
    if args.only in (None, "tiling"):
        print("\n## Tiled vs untiled\n")
        print(markdown(tiling()))
    if args.only in (None, "speed"):
        print("\n## Speed (1 core unless stated; uint16 synthetic section)\n")
        print(markdown(speed(4000 if args.quick else 10000, args.quick)))
    if args.only in (None, "memory"):
        sizes = [2500, 5000] if args.quick else [5000, 10000, 20000]
        print("\n## Peak memory (each size in its own process)\n")
        print(markdown(memory(sizes)))


if __name__ == "__main__":
    main()
