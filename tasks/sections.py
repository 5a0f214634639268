"""Per-section tasks: check, detect cells, thumbnail, refine the anchoring."""

from __future__ import annotations

import json
import os

import ants  # noqa: F401  (imported once before the workers fork, not once per task)
import luigi
import numpy as np
import pandas as pd

from cellmap2d.anchoring import read_quint
from cellmap2d.assemble import section_grid_ccf
from cellmap2d.io import inspect_section, section_thumbnail, to_level0
from cellmap2d.registration import Refinement, refine, tissue_mask
from cellmap2d.segmentation import Plane, detect_cells_tiled

from ._base import StoreTask
from ._config import brain_image, brain_spec, cached_atlas, settings


class ReadSection(StoreTask):
    """Check one section is readable and usable; record its size and intensity summary."""

    brain_id = luigi.Parameter()
    section = luigi.IntParameter()
    relative_path = "brains/{brain_id}/sections/s{section:04d}.json"

    def run(self) -> None:
        spec = brain_spec(self.brain_id)
        stats = inspect_section(
            brain_image(self.brain_id),
            self.section,
            [spec.signal_channel, spec.autofluorescence_channel],
        )
        with self.output().temporary_path() as tmp, open(tmp, "w") as fh:
            json.dump(stats, fh, indent=1)


class DetectCells(StoreTask):
    """Detected cells of one section, in level-0 pixels."""

    brain_id = luigi.Parameter()
    section = luigi.IntParameter()
    relative_path = "brains/{brain_id}/cells/s{section:04d}.csv"

    def requires(self) -> ReadSection:
        return ReadSection(brain_id=self.brain_id, section=self.section)

    def run(self) -> None:
        cfg, spec = settings(), brain_spec(self.brain_id)
        brain = brain_image(self.brain_id)
        level = spec.level or 0
        self.progress(f"detecting at level {level}")
        try:
            brain.check_index(self.section, spec.signal_channel, level)
            # lazy 2-D views: windows are read as arr[channel, z, y0:y1, x0:x1]
            plane = Plane(brain.arrays[level], (spec.signal_channel, self.section))
            options: dict = {"method": cfg.detection_method}
            if cfg.detection_threshold > 0:
                options["threshold"] = cfg.detection_threshold
            if cfg.detection_method == "trained":
                options["model"] = cfg.detection_model
            if cfg.detection_method == "log":
                options["fdr"] = cfg.detection_fdr
                if spec.autofluorescence_channel != spec.signal_channel:
                    brain.check_index(self.section, spec.autofluorescence_channel, level)
                    options["autofluorescence"] = Plane(
                        brain.arrays[level], (spec.autofluorescence_channel, self.section)
                    )
            cells, qc = detect_cells_tiled(
                plane,
                pixel_size_um=brain.pixel_size_um[level],
                cell_diameter_um=cfg.cell_diameter_um,
                return_qc=True,
                **options,
            )
        except (ValueError, TypeError, IndexError) as err:
            raise RuntimeError(f"brain {self.brain_id} section {self.section}: {err}") from err
        factor = brain.downsampling(level)
        cells.insert(0, "section", self.section)
        cells["x_px"] = to_level0(cells.pop("x"), factor)
        cells["y_px"] = to_level0(cells.pop("y"), factor)
        # the QC sidecar first: the cells table (the task's output) marks completion
        qc = {"section": self.section, "level": level, **qc}
        qc["detection_flag"] = detection_flag(qc, cfg.detection_max_cells_per_mm2)
        os.makedirs(os.path.dirname(self.output().path), exist_ok=True)
        write_json_atomic(qc_path(self.output().path), qc)
        with self.output().temporary_path() as tmp:
            cells.to_csv(tmp, index=False)


# per-section detection QC in qc/sections.csv and uns['cellmap2d']['sections']
DETECTION_QC = (
    "cells_per_mm2",
    "tissue_mm2",
    "noise",
    "n_candidates",
    "rejected_threshold",
    "rejected_shape",
    "rejected_autofluorescence",
    "rejected_border",
    "detection_threshold",
    "bleed_through",
    "detection_flag",
)


def qc_path(cells_csv: str) -> str:
    """The detection QC sidecar of a section's cells table."""
    return cells_csv[: -len(".csv")] + ".qc.json" if cells_csv.endswith(".csv") else cells_csv


def detection_flag(qc: dict, max_cells_per_mm2: float) -> str:
    """Why a section's detections are implausible (empty when they are not): more cells per
    mm² of tissue than ``max_cells_per_mm2`` (see ``detection_max_cells_per_mm2``)."""
    density = qc.get("cells_per_mm2") or 0.0
    if max_cells_per_mm2 > 0 and density > max_cells_per_mm2:
        return f"implausible density {density:.0f} cells/mm² > {max_cells_per_mm2:.0f}"
    return ""


def read_detection_qc(cells_csv: str) -> dict:
    """A section's detection QC (:data:`DETECTION_QC` keys; NaN / "" where not recorded)."""
    try:
        with open(qc_path(cells_csv)) as fh:
            qc = json.load(fh)
    except FileNotFoundError:
        qc = {}
    qc["detection_threshold"] = qc.get("threshold")
    out = {}
    for key in DETECTION_QC:
        value = qc.get(key)
        if key == "detection_flag":
            out[key] = value or ""
        else:
            out[key] = float("nan") if value is None else float(value)
    return out


def write_json_atomic(path: str, doc: dict) -> None:
    import os

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(value: object) -> object:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, np.ndarray)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


class SectionThumbnail(StoreTask):
    """The autofluorescence (and signal) at the registration resolution."""

    brain_id = luigi.Parameter()
    section = luigi.IntParameter()
    relative_path = "brains/{brain_id}/thumbnails/s{section:04d}.npz"

    def requires(self) -> ReadSection:
        return ReadSection(brain_id=self.brain_id, section=self.section)

    def run(self) -> None:
        spec, brain = brain_spec(self.brain_id), brain_image(self.brain_id)
        pixel = settings().registration_pixel_um
        auto, level = section_thumbnail(
            brain, self.section, spec.autofluorescence_channel, pixel_size_um=pixel
        )
        signal, _ = section_thumbnail(brain, self.section, spec.signal_channel, pixel_size_um=pixel)
        with self.output().temporary_path() as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                autofluorescence=auto,
                signal=signal,
                level=level,
                pixel_um=brain.pixel_size_um[level],
                factor=brain.downsampling(level),
                level0_shape=np.array(brain.shape),
            )


def load_thumbnail(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


class RefineSection(StoreTask):
    """ANTs refinement of one anchored section (dense map section → atlas slice)."""

    brain_id = luigi.Parameter()
    section = luigi.IntParameter()
    depends_on_anchoring = True
    relative_path = "brains/{brain_id}/transforms/s{section:04d}.npz"

    def requires(self) -> dict[str, luigi.Task]:
        from .brain import AnchorSeries
        from .celltypes import PrepareAtlas

        return {
            "thumbnail": SectionThumbnail(brain_id=self.brain_id, section=self.section),
            "anchoring": AnchorSeries(brain_id=self.brain_id),
            "atlas": PrepareAtlas(),
        }

    def run(self) -> None:
        thumb = load_thumbnail(self.input()["thumbnail"].path)
        anchors = {a.nr: a for a in read_quint(self.input()["anchoring"].path)}
        if self.section not in anchors:
            raise ValueError(
                f"brain {self.brain_id} section {self.section}: no slice with nr={self.section} "
                f"in {self.input()['anchoring'].path}"
            )
        image = thumb["autofluorescence"]
        grid = section_grid_ccf(
            anchors[self.section], image.shape, float(thumb["factor"]), tuple(thumb["level0_shape"])
        )
        the_atlas = cached_atlas(self.input()["atlas"].path)
        atlas_slice = the_atlas.plane_image(grid, kind="template")
        atlas_mask = the_atlas.plane_image(grid, kind="annotation") > 0
        self.progress("registering with ANTs")
        if tissue_mask(image).mean() < 0.01:
            result = Refinement.identity(image.shape, {"tissue_px": 0.0})
        else:
            result = refine(image, atlas_slice, atlas_mask=atlas_mask, syn=settings().syn)
        with self.output().temporary_path() as tmp, open(tmp, "wb") as fh:
            result.save(fh)


def read_cells(paths: list[str]) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in paths]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.read_csv(paths[0]) if paths else pd.DataFrame()
    return pd.concat(frames, ignore_index=True)
