"""Attaching the identity table to a brain's AnnData."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellmap2d.assemble import attach_identity


def _cells(n: int = 5) -> ad.AnnData:
    obs = pd.DataFrame(
        {"section": np.arange(n, dtype=np.int64)}, index=[f"b-{i}" for i in range(n)]
    )
    adata = ad.AnnData(X=np.zeros((n, 0), dtype=np.float32), obs=obs)
    adata.obsm["ccf"] = np.arange(3 * n, dtype=float).reshape(n, 3)
    return adata


def test_identity_lands_in_uns_in_rank_order_and_survives_h5ad(tmp_path: Path) -> None:
    import scanpy as sc

    table = pd.DataFrame(
        {
            "type": ["Sst Gaba", "L2/3 IT CTX Glut", "Vip Gaba"],
            "rank": [2, 1, 3],
            "fraction": [0.3, 0.6, 0.1],
            "fraction_low": [0.2, 0.5, 0.0],
            "fraction_high": [0.4, 0.7, 0.2],
        }
    )
    cells = _cells()
    out = attach_identity(cells, table)
    assert "identity" not in cells.uns  # the input is left as it was
    assert list(out.uns["identity"]["type"]) == ["L2/3 IT CTX Glut", "Sst Gaba", "Vip Gaba"]
    path = tmp_path / "cells.h5ad"
    out.write_h5ad(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = sc.read_h5ad(path)
    expected = table.sort_values("rank").reset_index(drop=True)
    pd.testing.assert_frame_equal(back.uns["identity"].reset_index(drop=True), expected)
    np.testing.assert_array_equal(back.obsm["ccf"], cells.obsm["ccf"])


def test_identity_without_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="rank"):
        attach_identity(_cells(), pd.DataFrame({"type": ["a"], "fraction": [1.0]}))
