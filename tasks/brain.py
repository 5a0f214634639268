"""Per-brain tasks: anchor the series, map the brain's cells into the CCF, QC figures."""

from __future__ import annotations

import json
import math
import os
import tempfile

import anndata as ad
import luigi
import numpy as np

from cellmap2d.anchoring import (
    DEFAULT_METADATA,
    QuintSeries,
    check_deepslice,
    read_quint,
    run_deepslice,
    search_series,
    series_seed,
    write_quicknii_folder,
    write_quint,
    write_section_images,
)
from cellmap2d.assemble import SectionPlacement, brain_anndata
from cellmap2d.registration import Refinement

from ._base import StoreTask
from ._config import brain_image, brain_sections, brain_spec, cached_atlas, settings
from .celltypes import PrepareAtlas
from .sections import (
    DETECTION_QC,
    DetectCells,
    RefineSection,
    SectionThumbnail,
    load_thumbnail,
    read_cells,
    read_detection_qc,
)


def per_section(task: type[luigi.Task], brain_id: str) -> dict[int, luigi.Task]:
    """One ``task`` per section of the brain, keyed by section."""
    return {z: task(brain_id=brain_id, section=z) for z in brain_sections(brain_id)}


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class AnchorSeries(StoreTask):
    """QUINT anchoring of the brain's series (opens in QuickNII/VisuAlign)."""

    brain_id = luigi.Parameter()
    relative_path = "brains/{brain_id}/anchoring.json"

    def requires(self) -> dict[str, object]:
        thumbnails = per_section(SectionThumbnail, self.brain_id)
        return {"atlas": PrepareAtlas(), "thumbnails": thumbnails}

    def run(self) -> None:
        backend = settings().anchoring
        if backend == "quint":
            series = self._user_anchoring()
        elif backend.startswith("deepslice"):
            series = self._deepslice()
            if backend == "deepslice+search":
                atlas = cached_atlas(self.input()["atlas"].path)
                seed = series_seed(series, midline_um=atlas.midline_um)
                series = self._search(seed=seed.params)
        else:
            series = self._search()
        with self.output().temporary_path() as tmp:
            write_quint(tmp, series, metadata=series.metadata)

    def source_paths(self) -> list[str]:
        paths = super().source_paths()
        if settings().anchoring == "quint":
            paths.append(self._quint_path())
        return [p for p in paths if os.path.isfile(p)]

    def _quint_path(self) -> str:
        return os.path.join(settings().quint_dir, f"{self.brain_id}.json")

    def _user_anchoring(self):
        path = self._quint_path()
        series = read_quint(path)
        have = {a.nr for a in series}
        missing = sorted(set(brain_sections(self.brain_id)) - have)
        if missing:
            raise ValueError(
                f"brain {self.brain_id}: {path} has no slice for sections {missing} "
                "(slice `nr` must be the section's z index)"
            )
        return series

    def _deepslice(self):
        weights = settings().deepslice_weights
        check_deepslice(weights)  # before reading anything: fails at once without weights
        thumbs = {z: load_thumbnail(t.path) for z, t in self.input()["thumbnails"].items()}
        self.progress("running DeepSlice")
        with tempfile.TemporaryDirectory() as folder:
            images = {z: t["autofluorescence"] for z, t in thumbs.items()}
            write_section_images(images, folder, brain_id=self.brain_id)
            series = run_deepslice(
                folder,
                weights_dir=weights,
                section_spacing_um=brain_spec(self.brain_id).section_spacing_um,
                brain_id=self.brain_id,
                level0_shapes={
                    z: tuple(int(v) for v in t["level0_shape"]) for z, t in thumbs.items()
                },
            )
        series.metadata["cellmap2d"] = {"method": "deepslice"}
        return series

    def _search(self, seed: dict[str, float] | None = None):
        thumbs = {z: load_thumbnail(t.path) for z, t in self.input()["thumbnails"].items()}
        first = next(iter(thumbs.values()))
        spec, brain = brain_spec(self.brain_id), brain_image(self.brain_id)
        fit = search_series(
            [t["autofluorescence"] for t in thumbs.values()],
            list(thumbs),
            atlas=cached_atlas(self.input()["atlas"].path),
            thumbnail_pixel_um=float(first["pixel_um"]),
            level0_shape=tuple(int(v) for v in first["level0_shape"]),
            level0_pixel_um=brain.pixel_size_um[0],
            section_spacing_um=spec.section_spacing_um,
            seed=seed,
            brain_id=self.brain_id,
            progress=self.progress,
        )
        method = "search" if seed is None else "deepslice+search"
        qc = {"method": method, **fit.params, "sections": fit.sections.to_dict(orient="list")}
        return QuintSeries(
            fit.anchors, {**DEFAULT_METADATA, "name": self.brain_id, "cellmap2d": _json_safe(qc)}
        )


class QuickNIIFolder(StoreTask):
    """``anchoring.json`` with the section images beside it: opens in QuickNII/VisuAlign.

    To correct the anchoring, open ``quicknii/anchoring.json``, save, and copy it over the
    brain's ``anchoring.json`` (or use the ``quint`` backend).
    """

    brain_id = luigi.Parameter()
    depends_on_anchoring = True
    relative_path = "brains/{brain_id}/quicknii"

    def requires(self) -> dict[str, object]:
        return {
            "anchoring": AnchorSeries(brain_id=self.brain_id),
            "thumbnails": per_section(SectionThumbnail, self.brain_id),
        }

    def run(self) -> None:
        series = read_quint(self.input()["anchoring"].path)
        images = {
            z: load_thumbnail(t.path)["autofluorescence"]
            for z, t in self.input()["thumbnails"].items()
        }
        with self.output().temporary_path() as tmp:
            write_quicknii_folder(series, images, tmp, brain_id=self.brain_id)


def section_flags(anchoring_path: str) -> dict[int, str]:
    with open(anchoring_path) as fh:
        qc = json.load(fh).get("cellmap2d", {}).get("sections", {})
    return dict(zip(qc.get("section", []), qc.get("flag", []), strict=True))


def placement_inputs(brain_id: str) -> dict[str, object]:
    """What places a brain's sections: anchoring, atlas, refinements, thumbnails."""
    return {
        "anchoring": AnchorSeries(brain_id=brain_id),
        "atlas": PrepareAtlas(),
        "refined": per_section(RefineSection, brain_id),
        "thumbnails": per_section(SectionThumbnail, brain_id),
    }


class MappedCells(StoreTask):
    """Every detected cell in CCF µm with its atlas region: ``cells.h5ad`` before the identity
    table is attached (what `Identity` reads)."""

    brain_id = luigi.Parameter()
    depends_on_anchoring = True
    relative_path = "brains/{brain_id}/cells_mapped.h5ad"

    def requires(self) -> dict[str, object]:
        return {**placement_inputs(self.brain_id), "cells": per_section(DetectCells, self.brain_id)}

    def run(self) -> None:
        inputs = self.input()
        anchors = {a.nr: a for a in read_quint(inputs["anchoring"].path)}
        flags = section_flags(inputs["anchoring"].path)
        placements = {}
        for z, target in inputs["refined"].items():
            thumb = load_thumbnail(inputs["thumbnails"][z].path)
            placements[z] = SectionPlacement(
                anchor=anchors[z],
                refinement=Refinement.load(target.path),
                factor=float(thumb["factor"]),
                level0_shape=tuple(int(v) for v in thumb["level0_shape"]),
                flag=flags.get(z, "") or "",
            )
        cells = read_cells([t.path for t in inputs["cells"].values()])
        cfg, spec = settings(), brain_spec(self.brain_id)
        adata = brain_anndata(
            self.brain_id,
            cells,
            placements,
            cached_atlas(inputs["atlas"].path),
            pixel_size_um=brain_image(self.brain_id).pixel_size_um[0],
            provenance={
                "anchoring": cfg.anchoring,
                "detection_method": cfg.detection_method,
                "cell_diameter_um": cfg.cell_diameter_um,
                "section_spacing_um": spec.section_spacing_um,
                "image": spec.path,
            },
        )
        # per-section detection QC next to the refinement's, in the same section order
        sections = adata.uns["cellmap2d"]["sections"]
        detection = [read_detection_qc(inputs["cells"][int(z)].path) for z in sections["section"]]
        for key in DETECTION_QC:
            values = [row[key] for row in detection]
            sections[key] = np.asarray(values, dtype=str if key == "detection_flag" else None)
        with self.output().temporary_path() as tmp:
            adata.write_h5ad(tmp)


def _atlas_on_thumbnail(thumb: dict, anchor, refined: str, atlas_path: str) -> np.ndarray:
    """The atlas regions carried onto a section thumbnail: anchoring, then refinement."""
    from cellmap2d.assemble import section_grid_ccf

    grid = section_grid_ccf(
        anchor,
        thumb["autofluorescence"].shape,
        float(thumb["factor"]),
        tuple(int(v) for v in thumb["level0_shape"]),
    )
    annotation = cached_atlas(atlas_path).plane_image(grid, kind="annotation")
    return Refinement.load(refined).warp_labels(annotation)


class BrainQC(StoreTask):
    """Overview figure: every section with the warped atlas boundaries and the mapped cells."""

    brain_id = luigi.Parameter()
    depends_on_anchoring = True
    relative_path = "brains/{brain_id}/qc/overview.png"

    def requires(self) -> dict[str, object]:
        return {**placement_inputs(self.brain_id), "cells": MappedCells(brain_id=self.brain_id)}

    def run(self) -> None:
        from cellmap2d.io import from_level0
        from cellmap2d.plots import SectionView, series_overview

        inputs = self.input()
        anchors = {a.nr: a for a in read_quint(inputs["anchoring"].path)}
        flags = section_flags(inputs["anchoring"].path)
        obs = ad.read_h5ad(inputs["cells"].path).obs
        views = []
        for z, target in inputs["thumbnails"].items():
            thumb = load_thumbnail(target.path)
            labels = _atlas_on_thumbnail(
                thumb, anchors[z], inputs["refined"][z].path, inputs["atlas"].path
            )
            cells = obs.loc[obs["section"] == z, ["x_px", "y_px"]].to_numpy()
            xy = from_level0(cells, float(thumb["factor"]))
            label = f"s{z} {flags.get(z) or ''}".strip()
            views.append(SectionView(z, thumb["autofluorescence"], labels, xy, label))
        figure = series_overview(views, title=f"brain {self.brain_id}")
        with self.output().temporary_path() as tmp:
            figure.savefig(tmp, format="png", dpi=80)


def _section_views(
    brain_id: str,
    z: int,
    thumbnail: str,
    refined: str,
    anchoring: str,
    cells_csv: str,
    atlas_path: str,
):
    """Signal with detected cells, autofluorescence with the warped atlas boundaries."""
    import pandas as pd

    from cellmap2d.io import from_level0
    from cellmap2d.plots import SectionView

    thumb = load_thumbnail(thumbnail)
    factor = float(thumb["factor"])
    anchor = next(a for a in read_quint(anchoring) if a.nr == z)
    labels = _atlas_on_thumbnail(thumb, anchor, refined, atlas_path)
    cells = pd.read_csv(cells_csv)
    xy = from_level0(cells[["x_px", "y_px"]].to_numpy(), factor)
    flag = section_flags(anchoring).get(z) or ""
    return [
        SectionView(z, thumb["signal"], None, xy, f"s{z}: {len(cells)} cells detected"),
        SectionView(z, thumb["autofluorescence"], labels, None, f"s{z}: atlas {flag}".strip()),
    ]


class SectionQC(StoreTask):
    """One section: detected cells on the signal, warped atlas boundaries on the tissue."""

    brain_id = luigi.Parameter()
    section = luigi.IntParameter()
    depends_on_anchoring = True
    relative_path = "brains/{brain_id}/qc/s{section:04d}.png"

    def requires(self) -> dict[str, luigi.Task]:
        kw = {"brain_id": self.brain_id, "section": self.section}
        return {
            "thumbnail": SectionThumbnail(**kw),
            "refined": RefineSection(**kw),
            "cells": DetectCells(**kw),
            "anchoring": AnchorSeries(brain_id=self.brain_id),
            "atlas": PrepareAtlas(),
        }

    def run(self) -> None:
        from cellmap2d.plots import series_overview

        i = self.input()
        views = _section_views(
            self.brain_id,
            self.section,
            i["thumbnail"].path,
            i["refined"].path,
            i["anchoring"].path,
            i["cells"].path,
            i["atlas"].path,
        )
        figure = series_overview(views, columns=2, title=f"brain {self.brain_id}")
        with self.output().temporary_path() as tmp:
            figure.savefig(tmp, format="png", dpi=90)


class SectionsTable(StoreTask):
    """Per-section QC of a brain: anchoring flag and match, refinement, cell count, detection
    QC (cells per mm² of tissue, noise, candidates and the fractions rejected by threshold,
    shape, autofluorescence and border, and ``detection_flag`` for an implausible density)."""

    brain_id = luigi.Parameter()
    depends_on_anchoring = True
    relative_path = "brains/{brain_id}/qc/sections.csv"

    def requires(self) -> dict[str, object]:
        kw = {"brain_id": self.brain_id}
        return {
            "anchoring": AnchorSeries(**kw),
            "refined": per_section(RefineSection, self.brain_id),
            "cells": per_section(DetectCells, self.brain_id),
        }

    def run(self) -> None:
        import pandas as pd

        i = self.input()
        with open(i["anchoring"].path) as fh:
            anchoring = pd.DataFrame(json.load(fh).get("cellmap2d", {}).get("sections", {}))
        rows = []
        for z, target in i["refined"].items():
            refinement = Refinement.load(target.path)
            n_cells = len(pd.read_csv(i["cells"][z].path, usecols=["section"]))
            rows.append(
                {
                    "section": z,
                    "n_cells": n_cells,
                    **read_detection_qc(i["cells"][z].path),
                    "refinement": refinement.method,
                    **refinement.qc,
                }
            )
        table = pd.DataFrame(rows)
        if len(anchoring):
            table = anchoring.rename(columns={"ncc": "anchoring_ncc"}).merge(
                table, on="section", how="right"
            )
        with self.output().temporary_path() as tmp:
            table.to_csv(tmp, index=False)
