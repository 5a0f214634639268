"""Atlas cell types: the ABC cells as one AnnData, and their densities on a CCF grid."""

from __future__ import annotations

import luigi

from cellmap2d.celltypes import read_abc
from cellmap2d.density import Grid, write_type_densities

from ._base import StoreTask
from ._config import atlas_cache_name, settings, source_atlas


class PrepareAtlas(StoreTask):
    """The configured atlas cached in the store as one fast-to-read HDF5 file."""

    def path(self):  # noqa: ANN201
        from ._config import store

        return store() / "atlas" / atlas_cache_name()

    def run(self) -> None:
        from cellmap2d.atlas import write_atlas_h5

        with self.output().temporary_path() as tmp:
            write_atlas_h5(tmp, source_atlas())


class AtlasCellTypes(StoreTask):
    """ABC cells of the configured datasets (obs taxonomy, obsm['ccf'] µm)."""

    relative_path = "celltypes/abc_cells.h5ad"

    def run(self) -> None:
        cfg = settings()
        if not cfg.abc:
            raise ValueError("no ABC directory configured: set [cellmap2d] abc or pass --abc")
        datasets = tuple(d.strip() for d in cfg.abc_datasets.split(",") if d.strip())
        cells = read_abc(cfg.abc, datasets, progress=self.progress)
        with self.output().temporary_path() as tmp:
            cells.write_h5ad(tmp)


class TypeDensities(StoreTask):
    """Smoothed density of every type at one taxonomy level and voxel size."""

    level = luigi.Parameter()
    voxel_um = luigi.FloatParameter()
    sigma_um = luigi.FloatParameter()
    workers = luigi.IntParameter(
        default=0, significant=False, description="processes; 0 = all cores"
    )
    relative_path = "celltypes/densities_{level}_{voxel_um:g}um.h5"

    def requires(self) -> AtlasCellTypes:
        return AtlasCellTypes()

    def run(self) -> None:
        import anndata as ad

        cells = ad.read_h5ad(self.input().path)
        with self.output().temporary_path() as tmp:
            write_type_densities(
                tmp,
                cells,
                level=self.level,
                grid=Grid(self.voxel_um),
                sigma_um=self.sigma_um,
                workers=self.workers or None,
                progress=self.progress,
            )
