"""Identity per brain, the brain's AnnData with it, and the tables joined over the cohort."""

from __future__ import annotations

import anndata as ad
import luigi
import numpy as np
import pandas as pd

from cellmap2d.anchoring import read_quint
from cellmap2d.assemble import attach_identity
from cellmap2d.density import DensityFile
from cellmap2d.identity import brain_identity, challenge_table

from ._base import StoreTask
from ._config import brain_sections, brain_spec, cached_atlas, manifest, settings, store
from .brain import (
    AnchorSeries,
    BrainQC,
    MappedCells,
    QuickNIIFolder,
    SectionQC,
    SectionsTable,
    section_flags,
)
from .celltypes import PrepareAtlas, TypeDensities


def densities_task() -> TypeDensities:
    cfg = settings()
    return TypeDensities(
        level=cfg.level, voxel_um=cfg.density_voxel_um, sigma_um=cfg.density_sigma_um
    )


class Identity(StoreTask):
    """Which atlas types the brain's labeled cells look like: one row per type."""

    brain_id = luigi.Parameter()
    depends_on_anchoring = True
    relative_path = "brains/{brain_id}/identity.csv"

    def requires(self) -> dict[str, luigi.Task]:
        return {
            "cells": MappedCells(brain_id=self.brain_id),
            "anchoring": AnchorSeries(brain_id=self.brain_id),
            "densities": densities_task(),
            "atlas": PrepareAtlas(),
        }

    def run(self) -> None:
        cells = ad.read_h5ad(self.input()["cells"].path)
        flags = section_flags(self.input()["anchoring"].path)
        planes = []
        for a in read_quint(self.input()["anchoring"].path):
            if flags.get(a.nr) != "empty":
                centre = a.to_ccf(a.width / 2, a.height / 2, width=a.width, height=a.height)[0]
                planes.append((centre, a.normal()))
        the_atlas = cached_atlas(self.input()["atlas"].path)
        region = settings().identity_region.strip()
        region_mask = (
            np.isin(the_atlas.annotation, the_atlas.ontology.descendants(region))
            if region
            else None
        )
        with DensityFile(self.input()["densities"].path) as densities:
            table = brain_identity(
                cells.obsm["ccf"],
                planes,
                densities,
                brain_mask=the_atlas.annotation > 0,
                brain_mask_voxel_um=the_atlas.resolution_um,
                section_spacing_um=brain_spec(self.brain_id).section_spacing_um,
                n_boot=settings().bootstrap,
                progress=self.progress,
                region_mask=region_mask,
                mixture=settings().identity_mixture,
                background=settings().identity_background,
            )
        with self.output().temporary_path() as tmp:
            table.to_csv(tmp, index=False)


class BrainCells(StoreTask):
    """The brain's AnnData (``cells.h5ad``): the mapped cells, and the identity table in
    ``uns['identity']`` when an ABC atlas is configured (without one, cells only)."""

    brain_id = luigi.Parameter()
    depends_on_anchoring = True
    relative_path = "brains/{brain_id}/cells.h5ad"

    def requires(self) -> dict[str, luigi.Task]:
        kw = {"brain_id": self.brain_id}
        if settings().abc:
            return {"cells": MappedCells(**kw), "identity": Identity(**kw)}
        return {"cells": MappedCells(**kw)}

    def run(self) -> None:
        adata = ad.read_h5ad(self.input()["cells"].path)
        if "identity" in self.input():
            adata = attach_identity(adata, pd.read_csv(self.input()["identity"].path))
        with self.output().temporary_path() as tmp:
            adata.write_h5ad(tmp)


class _CohortTable(StoreTask):
    """A cohort table; complete only when it covers exactly the manifest's brains."""

    def brain_ids(self) -> list[str]:
        return sorted(manifest())

    def anchoring_paths(self) -> list[str]:
        return [str(store() / "brains" / b / "anchoring.json") for b in self.brain_ids()]

    def complete(self) -> bool:
        if not super().complete():
            return False
        done = pd.read_csv(self.output().path, usecols=["brain_id"], dtype=str)["brain_id"]
        return sorted(done.unique()) == self.brain_ids()


class CohortIdentity(_CohortTable):
    """All brains' identity tables, long format with a ``brain_id`` column."""

    relative_path = "cohort/identity.csv"

    def requires(self) -> dict[str, Identity]:
        return {b: Identity(brain_id=b) for b in self.brain_ids()}

    def run(self) -> None:
        frames = [pd.read_csv(t.path).assign(brain_id=b) for b, t in self.input().items()]
        table = pd.concat(frames, ignore_index=True)
        table = table[["brain_id", *[c for c in table.columns if c != "brain_id"]]]
        with self.output().temporary_path() as tmp:
            table.to_csv(tmp, index=False)


class ChallengeTable(_CohortTable):
    """MapMySections submission: ``brain_id`` + 27 subclass fractions per brain, summing to 1."""

    relative_path = "cohort/mapmysections.csv"

    def requires(self) -> CohortIdentity:
        return CohortIdentity()

    def run(self) -> None:
        long = pd.read_csv(self.input().path, dtype={"brain_id": str})
        with self.output().temporary_path() as tmp:
            challenge_table(long).to_csv(tmp, index=False)


class BrainReport(luigi.WrapperTask):
    """Everything for one brain: identity and the QC figures and table."""

    brain_id = luigi.Parameter()

    def requires(self) -> list[luigi.Task]:
        kw = {"brain_id": self.brain_id}
        sections = [SectionQC(section=z, **kw) for z in brain_sections(self.brain_id)]
        return [
            BrainCells(**kw),
            BrainQC(**kw),
            SectionsTable(**kw),
            QuickNIIFolder(**kw),
            *sections,
        ]


class Pipeline(luigi.WrapperTask):
    """Everything for every brain of the manifest, and the cohort tables.

    A brain that cannot even be opened fails its own tasks only; the others run to the end.
    """

    def requires(self) -> list[luigi.Task]:
        return [ChallengeTable(), *(BrainReport(brain_id=b) for b in sorted(manifest()))]
