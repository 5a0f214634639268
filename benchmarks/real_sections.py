"""Anchoring search and ANTs refinement on real images (not the phantom).

Run ``python benchmarks/real_sections.py [--data ../shared/data] [--out benchmarks/out/real_overlay.png]``.
It prints three tables:

1. **Search on real template slices.** ``Atlas_Hipp.tif`` and ``Atlas_Str.tif`` (real Allen
   25 µm average-template coronal slices, AP index ≈ 293 and ≈ 213) are fed in as sections and
   searched in an atlas whose template is the *real* Allen reference at 200 µm (the only real
   template volume in the shared data), upsampled ×8 (trilinear) onto the 25 µm grid of the
   real 25 µm annotation. Methods: the per-slice ("alone") search at 25 µm AP steps, the
   ``ap_alone_um`` that :func:`cellmap2d.anchoring.search_series` reports (100 µm steps), and
   the series fit of the two slices (z = 213 and 293, spacing 25 µm).
2. **Synthetic series cut from the real reference.** Eight oblique slices of the same upsampled
   reference at known AP positions and known cutting angles (with an in-plane rotation, shift,
   intensity change and noise), anchored by ``search_series``: AP, angle and 3-D pixel errors.
   The series is cut from the volume it is searched in, so this measures the optimiser, not the
   domain gap.
3. **Refinement of a real fluorescence section.** ``sample_hipp.tif`` (318 × 428) is padded
   with zeros, centred, to the 320 × 456 frame of ``Atlas_Hipp.tif`` (both are 25 µm-scale
   coronal hippocampal-level images of a similar field; the pad keeps the section's own scale and
   leaves the scale to the affine step), refined with :func:`cellmap2d.registration.refine`,
   and the annotation slice ``annotation_25[293]`` (ids compacted first) is warped onto it and
   drawn as an overlay PNG.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from cellmap2d._plane_search import _AtlasPlanes, _prepare
from cellmap2d.anchoring import search_series
from cellmap2d.atlas import Atlas, read_ontology

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT = Path(__file__).resolve().parent / "out" / "real_overlay.png"
TRUE_INDEX = {"Atlas_Hipp": 293, "Atlas_Str": 213}
PIXEL_UM = 25.0


def read_tif(path: Path) -> np.ndarray:
    """A 2-D TIFF as float32."""
    import tifffile

    return tifffile.imread(path).astype(np.float32)


def load_atlas_200(data: Path) -> Atlas:
    """The real 200 µm Allen reference and annotation as they are (66 × 40 × 57)."""
    with np.load(data / "ccf" / "allen_mouse_200um.npz") as npz:
        template = npz["reference"].astype(np.float32)
        annotation = npz["annotation"].astype(np.uint32)
    ontology = read_ontology(data / "ccf" / "structures.json")
    return Atlas(annotation, template, 200.0, ontology, source="allen_mouse_200um.npz")


def load_atlas_25(data: Path) -> Atlas:
    """Real 25 µm annotation with the real 200 µm reference upsampled ×8 onto its grid.

    The 200 µm grid (66, 40, 57) × 8 is exactly the 25 µm grid (528, 320, 456); voxel centres
    are aligned by sampling the 200 µm volume at ``(i + 0.5) / 8 − 0.5``.
    """
    import nrrd

    annotation, _ = nrrd.read(str(data / "ccf" / "annotation_25.nrrd"))
    annotation = np.ascontiguousarray(annotation, dtype=np.uint32)
    with np.load(data / "ccf" / "allen_mouse_200um.npz") as npz:
        coarse = npz["reference"].astype(np.float32)
    axes = [(np.arange(n) + 0.5) / 8 - 0.5 for n in annotation.shape]
    template = np.empty(annotation.shape, np.float32)
    for i, ap in enumerate(axes[0]):  # slab by slab keeps the memory down
        grid = np.meshgrid([ap], axes[1], axes[2], indexing="ij")
        template[i] = ndi.map_coordinates(coarse, grid, order=1, mode="nearest")[0]
    ontology = read_ontology(data / "ccf" / "structures.json")
    return Atlas(annotation, template, 25.0, ontology, source="annotation_25 + 200 µm reference")


def search_alone(
    planes: _AtlasPlanes, image: np.ndarray, *, step_um: float = 25.0, search_um: float = 64.0
) -> tuple[float, np.ndarray, np.ndarray]:
    """Best coronal AP of one section alone (NCC over AP candidates every ``step_um``).

    Returns the best AP (µm), the candidates and their scores. The section is placed by its
    tissue centroid at physical scale (``PIXEL_UM``), as ``search_series`` does for its own
    per-section ("alone") positions.
    """
    prepared, _ = _prepare([image], [0], PIXEL_UM, search_um)
    if not prepared:
        raise ValueError("the image holds no tissue")
    candidates = np.arange(0.0, planes.ap_max + 1e-6, step_um)
    scores = np.array([planes.score(prepared[0], ap) for ap in candidates])
    return float(candidates[np.argmax(scores)]), candidates, scores


def table_search(atlas: Atlas, slices: dict[str, np.ndarray]) -> list[dict]:
    """Table 1: AP error of each real template slice, per method."""
    rows = []
    planes = _AtlasPlanes(atlas, 75.0)
    for name, image in slices.items():
        t = time.perf_counter()
        ap, _, scores = search_alone(planes, image)
        rows.append(
            {
                "slice": name,
                "method": "alone, 25 µm steps",
                "true_ap": TRUE_INDEX[name] * 25.0,
                "found_ap": ap,
                "ncc": float(scores.max()),
                "seconds": time.perf_counter() - t,
            }
        )
    names = list(slices)
    t = time.perf_counter()
    fit = search_series(
        [slices[n] for n in names],
        [TRUE_INDEX[n] for n in names],
        atlas=atlas,
        thumbnail_pixel_um=PIXEL_UM,
        level0_shape=slices[names[0]].shape,
        level0_pixel_um=PIXEL_UM,
        section_spacing_um=25.0,
    )
    seconds = time.perf_counter() - t
    table = fit.sections.set_index("section")
    for name in names:
        row = table.loc[TRUE_INDEX[name]]
        for method, value in (
            ("search_series ap_alone (100 µm steps)", row["ap_alone_um"]),
            ("search_series fitted (tissue centre)", row["ap_um"]),
        ):
            rows.append(
                {
                    "slice": name,
                    "method": method,
                    "true_ap": TRUE_INDEX[name] * 25.0,
                    "found_ap": float(value),
                    "ncc": float(row["ncc"]),
                    "seconds": seconds,
                }
            )
    p = fit.params
    print(
        f"series fit: a0 = {p['a0_um']:.0f} µm, step = {p['step_um']:.2f} µm/index, "
        f"angles ML {p['angle_ml_deg']:+.2f}°, DV {p['angle_dv_deg']:+.2f}° (true 0, 0), "
        f"flags {fit.sections['flag'].tolist()}"
    )
    return rows


def cut_series(
    atlas: Atlas,
    aps: np.ndarray,
    angles_deg: tuple[float, float],
    *,
    shape: tuple[int, int] = (320, 456),
    seed: int = 0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Oblique slices of the atlas template at known planes (25 µm pixels).

    Each slice ``k`` is the plane ``ap = aps[k] + tan(ml)·(ml − midline) + tan(dv)·(dv − 4000)``
    seen through a small random in-plane rotation and shift, with a gamma change and noise.
    Returns the images and the true CCF µm ``(h, w, 3)`` of their pixels.
    """
    rng = np.random.default_rng(seed)
    tans = np.tan(np.radians(angles_deg))
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    frame = (np.stack([xx, yy], axis=-1) + 0.5) * PIXEL_UM
    centre = np.array([w, h]) * PIXEL_UM / 2
    images, truths = [], []
    for ap in aps:
        theta = np.radians(rng.uniform(-4, 4))
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        shift = rng.uniform(-300, 300, 2)
        plane = (frame - centre) @ rot.T + centre + shift  # (ml, dv) µm
        ml, dv = plane[..., 0], plane[..., 1]
        ccf = np.stack(
            [ap + tans[0] * (ml - atlas.midline_um) + tans[1] * (dv - 4000.0), dv, ml], axis=-1
        )
        image = atlas.plane_image(ccf)
        image = (image / max(float(image.max()), 1e-6)) ** rng.uniform(0.8, 1.25)
        image = image + rng.normal(0, 0.03, image.shape) * (image > 0)
        images.append(np.clip(image, 0, None).astype(np.float32) * 1000)
        truths.append(ccf)
    return images, truths


def table_synthetic(atlas: Atlas, angles_deg: tuple[float, float] = (3.0, -2.0)) -> list[dict]:
    """Table 2: the series search on eight oblique slices of the real reference."""
    spacing = 600.0
    z = np.arange(8) * 2 + 10  # every other section imaged, as in a real series
    aps = 2200.0 + (z - z[0]) * spacing
    images, truths = cut_series(atlas, aps, angles_deg)
    t = time.perf_counter()
    fit = search_series(
        images,
        list(z),
        atlas=atlas,
        thumbnail_pixel_um=PIXEL_UM,
        level0_shape=images[0].shape,
        level0_pixel_um=PIXEL_UM,
        section_spacing_um=spacing,
    )
    seconds = time.perf_counter() - t
    p = fit.params
    rows = []
    table = fit.sections.set_index("section")
    for zi, ap, truth in zip(z, aps, truths, strict=True):
        anchor = next(a for a in fit.anchors if a.nr == zi)
        h, w = truth.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        inside = atlas.plane_image(truth, kind="annotation") > 0
        # pixel (x, y) of the frame sits at (x + 0.5)·p µm; QUINT pixel x at x/W of the width
        mapped = anchor.to_ccf(xx[inside] + 0.5, yy[inside] + 0.5, width=w, height=h)
        err = np.linalg.norm(mapped - truth[inside], axis=1)
        rows.append(
            {
                "section": int(zi),
                "true_ap": float(ap),
                "fitted_ap": p["a0_um"] + p["step_um"] * zi,
                "alone_ap": float(table.loc[zi, "ap_alone_um"]),
                "median_px_err": float(np.median(err)),
                "p95_px_err": float(np.percentile(err, 95)),
                "flag": table.loc[zi, "flag"],
            }
        )
    print(
        f"synthetic series: true angles ML {angles_deg[0]:+.1f}°, DV {angles_deg[1]:+.1f}°; "
        f"found ML {p['angle_ml_deg']:+.2f}°, DV {p['angle_dv_deg']:+.2f}°; "
        f"step {p['step_um']:.0f} µm/index (true {spacing:.0f}); mean NCC {p['mean_ncc']:.3f}; "
        f"{seconds:.0f} s"
    )
    return rows


def pad_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zero-pad (or centre-crop) a 2-D image to ``shape``, keeping it centred."""
    out = np.zeros(shape, np.float32)
    h, w = image.shape
    H, W = shape
    sy, sx = max((h - H) // 2, 0), max((w - W) // 2, 0)
    ty, tx = max((H - h) // 2, 0), max((W - w) // 2, 0)
    ch, cw = min(h, H), min(w, W)
    out[ty : ty + ch, tx : tx + cw] = image[sy : sy + ch, sx : sx + cw]
    return out


def refine_real(data: Path, out: Path, ontology_path: Path | None = None) -> dict:
    """Table 3: refine sample_hipp onto Atlas_Hipp, warp the annotation, write the overlay."""
    import nrrd

    from cellmap2d.registration import refine

    folder = data / "sections" / "brainglobe"
    atlas_slice = read_tif(folder / "Atlas_Hipp.tif")
    section = pad_to(read_tif(folder / "sample_hipp.tif"), atlas_slice.shape)
    annotation, _ = nrrd.read(str(data / "ccf" / "annotation_25.nrrd"))
    labels_ids = np.asarray(annotation[TRUE_INDEX["Atlas_Hipp"]], dtype=np.uint32)
    ids, compact = np.unique(labels_ids, return_inverse=True)
    compact = compact.reshape(labels_ids.shape).astype(np.int32)
    t = time.perf_counter()
    refinement = refine(section, atlas_slice)
    seconds = time.perf_counter() - t
    warped_ids = ids[refinement.warp_labels(compact)]
    ontology = read_ontology(ontology_path or data / "ccf" / "structures.json")
    unwarped_ids = ids[compact]
    overlay(section, warped_ids, unwarped_ids, ontology, out, refinement.method)
    qc = dict(refinement.qc)
    qc["method"] = refinement.method
    qc["seconds"] = seconds
    t = time.perf_counter()
    affine = refine(section, atlas_slice, syn=False)
    qc["affine_only_seconds"] = time.perf_counter() - t
    qc["affine_only_mask_dice"] = affine.qc["mask_dice"]
    qc["affine_only_method"] = affine.method
    return qc


def _edges(labels: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    return edge


def overlay(
    section: np.ndarray,
    warped: np.ndarray,
    unwarped: np.ndarray,
    ontology,  # noqa: ANN001
    out: Path,
    method: str,
) -> None:
    """Section in grey; region boundaries: all (thin), brain, HPF, ventricles (colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    lo, hi = np.percentile(section[section > 0], [1, 99.5])
    grey = np.clip((section - lo) / (hi - lo), 0, 1)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2), dpi=110)
    for ax, labels, title in (
        (axes[0], unwarped, "annotation_25[293], unrefined (identity frame)"),
        (axes[1], warped, f"after refine ({method})"),
    ):
        rgb = np.repeat(grey[..., None], 3, axis=2)
        groups = (
            (_edges(labels), (1.0, 0.85, 0.2), 0.45),
            (_edges(np.isin(labels, ontology.descendants("HPF"))), (0.1, 1.0, 0.2), 1.0),
            (_edges(np.isin(labels, ontology.descendants("VS"))), (0.2, 0.6, 1.0), 1.0),
            (_edges(labels > 0), (1.0, 0.1, 0.1), 1.0),
        )
        for edge, colour, alpha in groups:
            rgb[edge] = (1 - alpha) * rgb[edge] + alpha * np.array(colour)
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(
        "sample_hipp.tif; red: brain outline, green: hippocampal formation, blue: ventricles, "
        "yellow: other structures",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _print(rows: list[dict], columns: list[str], formats: dict[str, str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [format(row[c], formats.get(c, "")) for c in columns]
        print("| " + " | ".join(cells) + " |")
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared real data folder")
    parser.add_argument("--out", type=Path, default=OUT, help="overlay PNG to write")
    parser.add_argument("--skip-synthetic", action="store_true", help="skip table 2")
    args = parser.parse_args(argv)

    folder = args.data / "sections" / "brainglobe"
    slices = {name: read_tif(folder / f"{name}.tif") for name in TRUE_INDEX}
    t = time.perf_counter()
    atlas25 = load_atlas_25(args.data)
    print(f"atlas: 25 µm annotation + 200 µm reference upsampled ({time.perf_counter() - t:.0f} s)")
    rows = table_search(atlas25, slices)
    atlas200 = load_atlas_200(args.data)
    planes200 = _AtlasPlanes(atlas200, 75.0)
    for name, image in slices.items():
        t = time.perf_counter()
        ap, _, scores = search_alone(planes200, image)
        rows.append(
            {
                "slice": name,
                "method": "alone, 25 µm steps, 200 µm atlas as is",
                "true_ap": TRUE_INDEX[name] * 25.0,
                "found_ap": ap,
                "ncc": float(scores.max()),
                "seconds": time.perf_counter() - t,
            }
        )
    for row in rows:
        row["error"] = row["found_ap"] - row["true_ap"]
    print("\nTable 1. AP of real template slices found by the search (µm)\n")
    _print(
        rows,
        ["slice", "method", "true_ap", "found_ap", "error", "ncc", "seconds"],
        {"true_ap": ".0f", "found_ap": ".0f", "error": "+.0f", "ncc": ".3f", "seconds": ".1f"},
    )

    if not args.skip_synthetic:
        print("Table 2. Synthetic oblique series cut from the real 200 µm reference\n")
        syn = table_synthetic(atlas25)
        for row in syn:
            row["error"] = row["fitted_ap"] - row["true_ap"]
            row["alone_error"] = row["alone_ap"] - row["true_ap"]
        print()
        _print(
            syn,
            [
                "section",
                "true_ap",
                "fitted_ap",
                "error",
                "alone_error",
                "median_px_err",
                "p95_px_err",
                "flag",
            ],
            {
                "true_ap": ".0f",
                "fitted_ap": ".0f",
                "error": "+.0f",
                "alone_error": "+.0f",
                "median_px_err": ".0f",
                "p95_px_err": ".0f",
            },
        )
    del atlas25

    qc = refine_real(args.data, args.out)
    print("Table 3. refine(sample_hipp, Atlas_Hipp) — real fluorescence section\n")
    keys = [
        ("similarity (Mattes MI) at the unrefined frame", "similarity_anchoring", ".3f"),
        ("similarity after affine", "similarity_affine", ".3f"),
        ("similarity after SyN (tried)", "similarity_syn", ".3f"),
        ("tissue-mask Dice, unrefined", "mask_dice_anchoring", ".3f"),
        ("tissue-mask Dice, refined", "mask_dice", ".3f"),
        ("method chosen", "method", ""),
        ("minimum Jacobian (in tissue)", "min_jacobian", ".3f"),
        ("time (s)", "seconds", ".1f"),
        ("affine only (syn=False): method", "affine_only_method", ""),
        ("affine only (syn=False): tissue-mask Dice", "affine_only_mask_dice", ".3f"),
        ("affine only (syn=False): time (s)", "affine_only_seconds", ".1f"),
    ]
    print("| quantity | value |\n|---|---|")
    for label, key, fmt in keys:
        value = qc.get(key, float("nan"))
        print(f"| {label} | {format(value, fmt)} |")
    print(f"\noverlay written to {args.out}")


if __name__ == "__main__":
    main()
