"""cellmap2d: labeled cells in 2D mouse brain section series → Allen CCFv3 → cell-type identity.

The library is pure Python on arrays, DataFrames and AnnData; the Luigi workflow lives in the
separate ``tasks`` package. Submodules are imported on first use so ``import cellmap2d`` is cheap.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# ANTs registration is reproducible only single-threaded; ITK reads this when ANTs is first
# imported, so it is set here, before any cellmap2d module can import ANTs.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

__version__ = "0.1.0"

_SUBMODULES = (
    "anchoring",
    "assemble",
    "atlas",
    "celltypes",
    "density",
    "identity",
    "io",
    "plots",
    "registration",
    "segmentation",
    "synthetic",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
