"""The ``cellmap2d`` command: run the Luigi pipeline, or the phantom demo.

``cellmap2d run`` wraps ``luigi.build`` over the ``tasks`` package; flags override the
``[cellmap2d]`` section of ``luigi.cfg`` (read from the working directory). Without
``--scheduler-url`` or ``--local-scheduler`` the central scheduler is used when ``luigi.cfg``
names one (``[core] default_scheduler_url``), else the embedded one. The exit status is 0 only
when every requested task is complete, otherwise the ``[retcode]`` code of what went wrong.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

_RUN_FLAGS = {
    "store": "store",
    "manifest": "manifest",
    "atlas": "atlas",
    "atlas_resolution": "atlas_resolution",
    "abc": "abc",
    "abc_datasets": "abc_datasets",
    "level": "level",
    "anchoring": "anchoring",
    "quint_dir": "quint_dir",
    "deepslice_weights": "deepslice_weights",
    "cell_diameter_um": "cell_diameter_um",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellmap2d", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build a phantom world and run the whole pipeline on it")
    demo.add_argument("--store", default="store", help="output root (default: ./store)")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)

    run = sub.add_parser("run", help="run the pipeline on the brains of a manifest")
    run.add_argument("--manifest", required=True, help="CSV: brain_id, path, channels, spacing")
    run.add_argument("--store", help="output root")
    run.add_argument("--atlas", help="Allen-layout atlas directory or BrainGlobe atlas name")
    run.add_argument("--atlas-resolution", type=int, help="atlas voxel size in µm")
    run.add_argument("--abc", help="ABC Atlas cache directory (abc_atlas_access layout)")
    run.add_argument("--abc-datasets", help="comma-separated ABC datasets")
    run.add_argument("--level", help="taxonomy level (default subclass)")
    run.add_argument("--anchoring", choices=["search", "deepslice", "deepslice+search", "quint"])
    run.add_argument("--quint-dir", help="folder with <brain_id>.json for --anchoring quint")
    run.add_argument("--deepslice-weights", help="folder of DeepSlice's weight files")
    run.add_argument("--cell-diameter-um", type=float)
    run.add_argument("--workers", type=int, default=1)
    where = run.add_mutually_exclusive_group()
    where.add_argument("--scheduler-url", help="central scheduler, e.g. http://localhost:8082/")
    where.add_argument("--local-scheduler", action="store_true", help="embedded scheduler")
    run.add_argument("--log-level", default="INFO")

    train = sub.add_parser("train-detector", help="train the 'trained' cell detector")
    train.add_argument("--images", nargs="+", required=True, help="2-D images (TIFF/PNG)")
    train.add_argument("--masks", nargs="+", required=True, help="masks, same order")
    train.add_argument("--out", required=True, help="model file (.joblib)")
    train.add_argument("--pixel-size-um", type=float, required=True)
    train.add_argument("--cell-diameter-um", type=float, required=True)
    train.add_argument(
        "--channels", help="RGB channels to sum, e.g. 0 or 0,1 (default: all)", default=None
    )
    return parser


def _train_detector(args: argparse.Namespace) -> int:
    from cellmap2d._detectors import read_annotated, train_detector

    if len(args.images) != len(args.masks):
        raise ValueError("--images and --masks need the same number of files")
    channels = [int(c) for c in args.channels.split(",")] if args.channels else None
    pairs = [
        read_annotated(i, m, channels=channels)
        for i, m in zip(args.images, args.masks, strict=True)
    ]
    model = train_detector(
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        pixel_size_um=args.pixel_size_um,
        cell_diameter_um=args.cell_diameter_um,
    )
    model.save(args.out)
    info = model.info
    print(f"{args.out}: {info['n_candidates']} candidates, {info['n_positive']} cells")
    return 0


def _configure(values: dict[str, object]) -> None:
    import luigi.configuration

    config = luigi.configuration.get_config()
    for key, value in values.items():
        if value is not None:
            config.set("cellmap2d", key, str(value))


def _build(
    tasks: list, *, workers: int, local: bool, scheduler_url: str | None, log_level: str
) -> tuple[int, object]:
    import luigi
    import luigi.configuration
    from luigi.execution_summary import LuigiStatusCode
    from luigi.retcodes import retcode

    kwargs: dict[str, object] = {
        "workers": workers,
        "detailed_summary": True,
        "log_level": log_level,
    }
    if scheduler_url:
        kwargs["scheduler_url"] = scheduler_url
    elif local or not luigi.configuration.get_config().get("core", "default_scheduler_url", ""):
        kwargs["local_scheduler"] = True
    result = luigi.build(tasks, **kwargs)
    codes = retcode()
    status = result.status
    code = {
        LuigiStatusCode.SUCCESS: 0,
        LuigiStatusCode.SUCCESS_WITH_RETRY: 0,
        LuigiStatusCode.FAILED: codes.task_failed,
        LuigiStatusCode.FAILED_AND_SCHEDULING_FAILED: codes.task_failed,
        LuigiStatusCode.SCHEDULING_FAILED: codes.scheduling_error,
        LuigiStatusCode.NOT_RUN: codes.not_run,
        LuigiStatusCode.MISSING_EXT: codes.missing_data,
    }.get(status, codes.unhandled_exception)
    return (code or 1) if status not in (
        LuigiStatusCode.SUCCESS,
        LuigiStatusCode.SUCCESS_WITH_RETRY,
    ) else 0, result


def _run(args: argparse.Namespace) -> int:
    values = {key: getattr(args, flag) for flag, key in _RUN_FLAGS.items()}
    values["manifest"] = str(Path(args.manifest).resolve())
    from .io import read_manifest

    read_manifest(values["manifest"])  # a bad manifest is one clear error, not a failed run
    _configure(values)
    from tasks import Pipeline, cellmap2d

    settings = cellmap2d()
    if settings.anchoring.startswith("deepslice"):
        from .anchoring import check_deepslice

        try:  # fail at once, not once per brain after the thumbnails are made
            check_deepslice(settings.deepslice_weights)
        except (ImportError, FileNotFoundError, ValueError) as err:
            print(f"cellmap2d: anchoring = {settings.anchoring}: {err}", file=sys.stderr)
            return 2

    code, result = _build(
        [Pipeline()],
        workers=args.workers,
        local=args.local_scheduler,
        scheduler_url=args.scheduler_url,
        log_level=args.log_level,
    )
    print(result.summary_text)
    _print_detection_flags(Path(settings.store))
    return code


def _print_detection_flags(store: Path) -> None:
    """One line per section whose detection QC is flagged (``qc/sections.csv``)."""
    import pandas as pd

    for table in sorted(store.glob("brains/*/qc/sections.csv")):
        qc = pd.read_csv(table, keep_default_na=False)
        flagged = qc[qc.get("detection_flag", pd.Series("", index=qc.index)) != ""]
        for row in flagged.itertuples():
            print(
                f"detection QC: brain {table.parent.parent.name} section {row.section}: "
                f"{row.detection_flag}"
            )


def _demo(args: argparse.Namespace) -> int:
    from .synthetic import WorldConfig, make_world

    started = time.perf_counter()
    store = Path(args.store).resolve() / ("demo" if args.seed == 0 else f"demo-seed{args.seed}")
    config = WorldConfig.demo(seed=args.seed)
    world_dir = store / "world"
    if not (world_dir / "world.json").is_file():
        print(f"Building the phantom world in {world_dir} …")
    world = make_world(world_dir, config, progress=lambda m: print(f"  {m}", flush=True))
    configure_world(world, store)
    from tasks import Pipeline

    if Pipeline().complete():
        print(f"Nothing to do: all targets exist in {store}.")
    else:
        print(
            f"Running the pipeline on {len(config.brains)} phantom brains "
            f"({args.workers} workers, embedded scheduler) …",
            flush=True,
        )
    code, result = _build(
        [Pipeline()], workers=args.workers, local=True, scheduler_url=None, log_level="WARNING"
    )
    if code:
        print(result.summary_text)
        return code
    _report_demo(world, store)
    _print_detection_flags(store)
    print(f"\nFinished in {time.perf_counter() - started:.0f} s.")
    return 0


def configure_world(world, store: Path) -> None:
    """Point the pipeline settings at a phantom world (atlas, ABC cells, manifest)."""
    config = world.config
    _configure(
        {
            "store": store,
            "manifest": world.manifest,
            "atlas": world.atlas_dir,
            "atlas_resolution": int(config.atlas_resolution_um),
            "abc": world.abc_dir,
            "cell_diameter_um": config.cell_diameter_um,
            "anchoring": "search",
            "density_voxel_um": 100,
            "density_sigma_um": 150,
            "registration_pixel_um": 50,
        }
    )


def _report_demo(world, store: Path) -> None:
    import anndata as ad

    from .synthetic import evaluate_mapping

    mixtures = world.truth_mixtures()
    config = world.config
    print("\nPer brain: top five inferred types (fraction, 95% CI) next to the planted truth")
    for brain in config.brains:
        bid = brain.brain_id
        truth = mixtures[mixtures["brain_id"] == bid]
        cells = ad.read_h5ad(store / "brains" / bid / "cells.h5ad")
        table = cells.uns["identity"]  # the same table as identity.csv
        planted = world.truth_cells(bid)
        detected = (
            cells.obs[["x_px", "y_px"]].to_numpy(),
            cells.obs["section"].to_numpy(),
            cells.obsm["ccf"],
        )
        max_px = config.cell_diameter_um / config.pixel_size_um
        quality = evaluate_mapping(*detected, planted, max_px=max_px)
        strong = ""
        if "snr" in planted:  # recall of the cells at least 5 noise σ above their background
            bright = evaluate_mapping(*detected, planted[planted["snr"] >= 5], max_px=max_px)
            strong = f", {bright['recall']:.0%} of those ≥ 5 noise σ"
        mixture = ", ".join(
            f"{t} {f:.0%}" for t, f in zip(truth["type"], truth["planted_fraction"], strict=True)
        )
        print(f"\n  brain {bid}: planted {mixture}")
        print(
            f"  {quality['n_detected']:.0f} cells detected for {quality['n_true']:.0f} planted "
            f"(recall {quality['recall']:.0%}{strong}; precision {quality['precision']:.0%}); "
            f"CCF error of detected cells: median "
            f"{quality['median_um']:.0f} µm, 95th percentile {quality['p95_um']:.0f} µm"
        )
        for row in table.head(5).itertuples():
            mark = "  <- planted" if row.type in set(truth["type"]) else ""
            print(
                f"    {row.rank}. {row.type:<28} {row.fraction:6.1%} "
                f"[{row.fraction_low:.1%}, {row.fraction_high:.1%}]{mark}"
            )
    print(f"\nOutputs in {store}:")
    print(
        "  brains/<id>/cells.h5ad (identity in uns['identity']), identity.csv, anchoring.json,"
        " quicknii/ (opens in QuickNII/VisuAlign), qc/"
    )
    print("  cohort/identity.csv, cohort/mapmysections.csv")
    print(f"  phantom world and its truth: {world.root}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train-detector":
            return _train_detector(args)
        return _demo(args) if args.command == "demo" else _run(args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"cellmap2d: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
