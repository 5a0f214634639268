"""Detection with its DEFAULT setting on images the project did not tune on, next to baselines.

Run from the project root: ``python benchmarks/detection_defaults.py``. Prints markdown tables
(quoted in the README's status and docs/detection.md):

1. Real images (``../shared/data/cells``), only pixel size and cell diameter given (the pooled
   median mask diameter, as a user would measure it): the default; the previous default (the
   ``noise`` threshold unit at 6, run through today's code); skimage ``blob_log`` with its
   setting chosen on the *other half* of the images (fluocells: halves of one red and one
   yellow image each; StarDist: the left half for the right and the reverse) — a baseline
   that was allowed to tune on ground truth.
2. The realistic phantom (``synthetic.realistic_field``) on seeds 2000–2004, never looked at
   while developing: precision, recall of every cell and of the cells ≥ 5 noise units, with
   and without the autofluorescence channel, next to the previous default.
3. Speed: the default on a 4096² realistic field (with its autofluorescence) against
   ``blob_log`` (one σ) on a 1024² crop, in MP/s on one core; best of 3.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from detection import (  # noqa: E402
    fluocells,
    markdown,
    median_diameter_px,
    run_blob_log,
    scores,
    stardist,
)

from cellmap2d import segmentation, synthetic  # noqa: E402
from cellmap2d._detectors import mask_centroids, match_points  # noqa: E402

PREVIOUS = {"threshold_unit": "noise", "threshold": 6.0}
PIXEL_UM, CELL_UM = 1.4, 15.0
SEEDS = (2000, 2001, 2002, 2003, 2004)


def _pooled(found: list[np.ndarray], masks: list[np.ndarray]) -> tuple[float, float, float]:
    tp = n_found = n_true = 0
    for xy, mask in zip(found, masks, strict=True):
        truth, radii = mask_centroids(mask)
        tp += int((match_points(xy, truth, radii) >= 0).sum())
        n_found, n_true = n_found + len(xy), n_true + len(truth)
    p, r = tp / max(n_found, 1), tp / max(n_true, 1)
    return p, r, 2 * p * r / max(p + r, 1e-12)


def _ours(image: np.ndarray, diameter: float, **kw) -> np.ndarray:
    cells = segmentation.detect_cells(image, pixel_size_um=1.0, cell_diameter_um=diameter, **kw)
    return cells[["x", "y"]].to_numpy()


def _blob_grid(sigma: float) -> list[dict]:
    return [
        {"sigma": sigma * s, "threshold": t}
        for s in (0.5, 0.7, 1.0, 1.4)
        for t in (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
    ]


def _tuned_blob_log(train, test) -> list[np.ndarray]:
    """blob_log on ``test`` with the setting of best pooled F1 on ``train``."""
    sigma = median_diameter_px(train + test) / 2 / np.sqrt(2)
    best = max(
        _blob_grid(sigma),
        key=lambda kw: _pooled(
            [run_blob_log(i, **kw) for _, i, _ in train], [m for *_, m in train]
        )[2],
    )
    return [run_blob_log(i, **best) for _, i, _ in test]


def real_images() -> pd.DataFrame:
    rows = []
    fluo = fluocells()
    halves = ([fluo[0], fluo[2]], [fluo[1], fluo[3]])
    sd = stardist()[0]
    half = sd[1].shape[1] // 2
    sd_halves = (
        [(sd[0] + " left", sd[1][:, :half], sd[2][:, :half])],
        [(sd[0] + " right", sd[1][:, half:], sd[2][:, half:])],
    )
    for dataset, (a, b) in (("fluocells", halves), ("StarDist", sd_halves)):
        items = a + b
        diameter = median_diameter_px(items)
        masks = [m for *_, m in items]
        runs = {
            "default": [_ours(i, diameter) for _, i, _ in items],
            "previous default (noise unit, 6)": [
                _ours(i, diameter, **PREVIOUS) for _, i, _ in items
            ],
            "blob_log tuned on the other half": _tuned_blob_log(b, a) + _tuned_blob_log(a, b),
        }
        for name, found in runs.items():
            p, r, f = _pooled(found, masks)
            per_image = ", ".join(
                f"{scores(xy, m)[2]:.2f}" for xy, m in zip(found, masks, strict=True)
            )
            rows.append(
                {
                    "data": dataset,
                    "method": name,
                    "precision": p,
                    "recall": r,
                    "F1": f,
                    "F1 per image": per_image,
                }
            )
    return pd.DataFrame(rows)


def phantom() -> pd.DataFrame:
    rows = []
    tol = CELL_UM / 2 / PIXEL_UM
    for name, kw, with_auto in (
        ("default + autofluorescence", {}, True),
        ("default, signal only", {}, False),
        ("previous default", PREVIOUS, False),
    ):
        tp = n_found = 0
        hits, strong = [], []
        for seed in SEEDS:
            signal, auto, truth = synthetic.realistic_field((1536, 1536), seed=seed)
            extra = {"autofluorescence": auto} if with_auto else {}
            cells = segmentation.detect_cells(
                signal, pixel_size_um=PIXEL_UM, cell_diameter_um=CELL_UM, **kw, **extra
            )
            m = match_points(cells[["x", "y"]].to_numpy(), truth[["x", "y"]].to_numpy(), tol)
            hit = np.zeros(len(truth), bool)
            hit[m[m >= 0]] = True
            tp, n_found = tp + int((m >= 0).sum()), n_found + len(m)
            hits.append(hit)
            strong.append(truth["snr"].to_numpy() >= 5)
        hit, big = np.concatenate(hits), np.concatenate(strong)
        rows.append(
            {
                "method": name,
                "detections": n_found,
                "cells": len(hit),
                "precision": tp / max(n_found, 1),
                "recall (all)": hit.mean(),
                "recall (snr ≥ 5)": hit[big].mean(),
            }
        )
    return pd.DataFrame(rows)


def _best(fn, repeats: int = 3) -> float:
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def speed() -> pd.DataFrame:
    import cv2
    from skimage.feature import blob_log

    cv2.setNumThreads(1)
    signal, auto, _ = synthetic.realistic_field((4096, 4096), seed=3000)
    kw = {"pixel_size_um": PIXEL_UM, "cell_diameter_um": CELL_UM}
    segmentation.detect_cells(signal[:512, :512], **kw)  # warm-up
    crop = signal[:1024, :1024].astype(np.float32)
    crop = (crop - crop.min()) / (crop.max() - crop.min())
    sigma = CELL_UM / 2 / PIXEL_UM / np.sqrt(2)
    runs = {
        "default + autofluorescence": (
            signal.size,
            lambda: segmentation.detect_cells(signal, autofluorescence=auto, **kw),
        ),
        "default, signal only": (signal.size, lambda: segmentation.detect_cells(signal, **kw)),
        "previous default": (
            signal.size,
            lambda: segmentation.detect_cells(signal, **PREVIOUS, **kw),
        ),
        "skimage blob_log (one σ)": (
            crop.size,
            lambda: blob_log(crop, min_sigma=sigma, max_sigma=sigma, num_sigma=1, threshold=0.02),
        ),
    }
    rows = [{"method": n, "MP/s": size / 1e6 / _best(fn)} for n, (size, fn) in runs.items()]
    table = pd.DataFrame(rows)
    table["× blob_log"] = table["MP/s"] / table["MP/s"].iloc[-1]
    return table


def main() -> None:
    for title, table in (
        ("Real images, default setting", real_images()),
        (
            f"Realistic phantom, unseen seeds {SEEDS[0]}–{SEEDS[-1]} (1536² fields, 1.4 µm px)",
            phantom(),
        ),
        ("Speed (one core)", speed()),
    ):
        print(f"\n### {title}\n")
        print(markdown(table), flush=True)


if __name__ == "__main__":
    main()
