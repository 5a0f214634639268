"""Luigi tasks of the cellmap2d pipeline (thin: load, call one library function, write).

Run with the ``cellmap2d`` command, or ``python -m luigi --module tasks Pipeline``.
"""

from ._config import cellmap2d
from .brain import AnchorSeries, BrainQC, MappedCells, QuickNIIFolder, SectionQC, SectionsTable
from .celltypes import AtlasCellTypes, PrepareAtlas, TypeDensities
from .cohort import BrainCells, BrainReport, ChallengeTable, CohortIdentity, Identity, Pipeline
from .sections import DetectCells, ReadSection, RefineSection, SectionThumbnail

__all__ = [
    "AnchorSeries",
    "AtlasCellTypes",
    "BrainCells",
    "BrainQC",
    "BrainReport",
    "ChallengeTable",
    "CohortIdentity",
    "DetectCells",
    "Identity",
    "MappedCells",
    "Pipeline",
    "PrepareAtlas",
    "QuickNIIFolder",
    "ReadSection",
    "RefineSection",
    "SectionQC",
    "SectionsTable",
    "SectionThumbnail",
    "TypeDensities",
    "cellmap2d",
]
