"""Per-section tasks: check, detect cells, thumbnail, refine the anchoring."""

from __future__ import annotations

import json

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
            # a lazy 2-D view: windows are read as arr[channel, z, y0:y1, x0:x1]
            plane = Plane(brain.arrays[level], (spec.signal_channel, self.section))
            cells = detect_cells_tiled(
                plane,
                pixel_size_um=brain.pixel_size_um[level],
                cell_diameter_um=cfg.cell_diameter_um,
                method=cfg.detection_method,
                threshold=cfg.detection_threshold,
                **({"model": cfg.detection_model} if cfg.detection_method == "trained" else {}),
            )
        except (ValueError, TypeError, IndexError) as err:
            raise RuntimeError(f"brain {self.brain_id} section {self.section}: {err}") from err
        factor = brain.downsampling(level)
        cells.insert(0, "section", self.section)
        cells["x_px"] = to_level0(cells.pop("x"), factor)
        cells["y_px"] = to_level0(cells.pop("y"), factor)
        with self.output().temporary_path() as tmp:
            cells.to_csv(tmp, index=False)


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
