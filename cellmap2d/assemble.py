"""Per-brain AnnData: detected cells placed in the CCF with their atlas regions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from . import __version__
from .anchoring import SectionAnchor
from .atlas import Atlas
from .io import from_level0, to_level0
from .registration import Refinement

__all__ = [
    "SectionPlacement",
    "attach_identity",
    "brain_anndata",
    "map_section_points",
    "section_grid_ccf",
]


@dataclass
class SectionPlacement:
    """Everything that places one section: its anchor and its in-plane refinement.

    ``factor`` is the number of level-0 pixels per refinement (thumbnail) pixel; ``flag`` is the
    anchoring QC flag of the section (empty when fine).
    """

    anchor: SectionAnchor
    refinement: Refinement | None
    factor: float
    level0_shape: tuple[int, int]
    flag: str = ""


def map_section_points(xy_level0: np.ndarray, placement: SectionPlacement) -> np.ndarray:
    """CCF µm ``(n, 3)`` of level-0 section pixels: section → atlas slice → anchoring."""
    xy = np.atleast_2d(np.asarray(xy_level0, dtype=np.float64))
    if placement.refinement is not None:
        xy = to_level0(
            placement.refinement.map_points(from_level0(xy, placement.factor)), placement.factor
        )
    height, width = placement.level0_shape
    return placement.anchor.to_ccf(xy[:, 0], xy[:, 1], width=width, height=height)


def brain_anndata(
    brain_id: str,
    cells: pd.DataFrame,
    placements: Mapping[int, SectionPlacement],
    atlas: Atlas,
    *,
    pixel_size_um: float,
    provenance: Mapping[str, Any] | None = None,
) -> ad.AnnData:
    """Assemble the brain's cells into an AnnData (schema: DESIGN.md ``cells.h5ad``).

    Parameters
    ----------
    cells
        Detections with ``section``, ``x_px``, ``y_px`` (level-0 pixels) and feature columns.
    placements
        Placement of every section that has cells.
    atlas
        For region look-up.
    pixel_size_um
        Level-0 pixel size (for ``obsm['spatial']``).
    """
    missing = sorted(set(cells["section"].unique()) - set(placements))
    if missing:
        raise ValueError(f"brain {brain_id}: sections {missing} have cells but no placement")
    cells = cells.sort_values(["section", "y_px", "x_px"], kind="stable").reset_index(drop=True)
    ccf = np.zeros((len(cells), 3))
    flags = np.empty(len(cells), dtype=object)
    for section, rows in cells.groupby("section").indices.items():
        placement = placements[int(section)]
        ccf[rows] = map_section_points(cells.loc[rows, ["x_px", "y_px"]].to_numpy(), placement)
        flags[rows] = placement.flag
    region = atlas.region_ids(ccf)
    obs = cells.copy()
    obs["section"] = obs["section"].astype(np.int64)
    obs["region_id"] = region
    obs["region_acronym"] = pd.Categorical(atlas.ontology.acronyms(region))
    obs["hemisphere"] = pd.Categorical(atlas.hemisphere(ccf), categories=["left", "right"])
    obs["section_flag"] = pd.Categorical(flags.astype(str))
    obs.index = pd.Index([f"{brain_id}-{i}" for i in range(len(obs))], dtype=str)
    adata = ad.AnnData(X=np.zeros((len(obs), 0), dtype=np.float32), obs=obs)
    adata.obsm["ccf"] = ccf
    adata.obsm["spatial"] = cells[["x_px", "y_px"]].to_numpy(dtype=np.float64) * pixel_size_um
    qc = _section_qc(placements)
    adata.uns["cellmap2d"] = {
        "version": __version__,
        "brain_id": brain_id,
        "atlas": atlas.source,
        "atlas_resolution_um": atlas.resolution_um,
        "pixel_size_um": pixel_size_um,
        "sections": qc,
        **dict(provenance or {}),
    }
    return adata


def attach_identity(adata: ad.AnnData, identity: pd.DataFrame) -> ad.AnnData:
    """The brain's AnnData with its identity table in ``uns['identity']`` (rank order).

    ``identity`` is the table `identity.brain_identity` returns (``identity.csv``): one row per
    type with ``type``, ``rank``, ``fraction`` and the scores. ``adata`` is not modified.
    """
    missing = {"type", "rank", "fraction"} - set(identity.columns)
    if missing:
        raise ValueError(f"identity table lacks columns {sorted(missing)}")
    table = identity.sort_values("rank", kind="stable").reset_index(drop=True)
    table["type"] = table["type"].astype(str)
    table.index = table.index.astype(str)  # AnnData writes string indices without a warning
    out = adata.copy()
    out.uns["identity"] = table
    return out


def _section_qc(placements: Mapping[int, SectionPlacement]) -> dict[str, np.ndarray]:
    keys = sorted({k for p in placements.values() if p.refinement for k in p.refinement.qc})
    table: dict[str, list] = {"section": [], "flag": [], "refinement": []}
    table.update({k: [] for k in keys})
    for z in sorted(placements):
        p = placements[z]
        table["section"].append(z)
        table["flag"].append(p.flag)
        table["refinement"].append(p.refinement.method if p.refinement else "none")
        for k in keys:
            table[k].append(p.refinement.qc.get(k, np.nan) if p.refinement else np.nan)
    return {
        k: np.asarray(v, dtype=str if k in ("flag", "refinement") else None)
        for k, v in table.items()
    }


def section_grid_ccf(
    anchor: SectionAnchor, shape: tuple[int, int], factor: float, level0_shape: tuple[int, int]
) -> np.ndarray:
    """CCF µm ``(h, w, 3)`` of every pixel of a section image downsampled by ``factor``."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    x0 = to_level0(xx.ravel(), factor)
    y0 = to_level0(yy.ravel(), factor)
    ccf = anchor.to_ccf(x0, y0, width=level0_shape[1], height=level0_shape[0])
    return ccf.reshape(h, w, 3)
