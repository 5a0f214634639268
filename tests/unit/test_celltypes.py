from __future__ import annotations

import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from cellmap2d.celltypes import TAXONOMY_LEVELS, read_abc

MERFISH = "MERFISH-C57BL6J-638850"
ZHUANG = "Zhuang-ABCA-1"

TAXONOMY = pd.DataFrame(
    {
        "cluster_alias": [1, 2, 3],
        "neurotransmitter": ["Glut", "GABA", ""],
        "class": ["01 IT-ET Glut", "06 CTX-CGE GABA", "30 Astro-Epen"],
        "subclass": ["007 L2/3 IT CTX Glut", "046 Vip Gaba", "319 Astro-TE NN"],
        "supertype": ["0030 L2/3 IT CTX Glut_1", "0200 Vip Gaba_1", "1163 Astro-TE NN_1"],
        "cluster": ["0100 L2/3 IT CTX Glut_1", "0800 Vip Gaba_1", "5200 Astro-TE NN_1"],
    }
)


def _write(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


@pytest.fixture()
def abc_dir(tmp_path: Path) -> Path:
    """A tiny ABC cache in the real abc_atlas_access layout (2 datasets, 2 MERFISH versions)."""
    root = tmp_path / "abc"
    meta = root / "metadata"
    _write(
        meta
        / "WMB-taxonomy"
        / "20231215"
        / "views"
        / "cluster_to_cluster_annotation_membership_pivoted.csv",
        TAXONOMY,
    )
    # an older MERFISH version that must be ignored (latest wins)
    _write(
        meta / MERFISH / "20230830" / "cell_metadata.csv",
        pd.DataFrame({"cell_label": ["old-1"], "cluster_alias": [1], "donor_label": ["D0"]}),
    )
    # latest MERFISH: extra columns as in the real file (x/y/z here are section coordinates)
    _write(
        meta / MERFISH / "20241115" / "cell_metadata.csv",
        pd.DataFrame(
            {
                "cell_label": ["m1", "m2", "m3", "m4", "m5", "shared"],
                "brain_section_label": ["s1"] * 6,
                "cluster_alias": [1, 2, 3, 1, 99, 2],  # m5: alias not in the taxonomy
                "donor_label": ["D1", "D1", "D2", "D2", "D1", "D2"],
                "x": [9.0] * 6,
                "y": [9.0] * 6,
                "z": [9.0] * 6,
            }
        ),
    )
    _write(
        meta / f"{MERFISH}-CCF" / "20231215" / "ccf_coordinates.csv",
        pd.DataFrame(
            {
                # m4 has no CCF row; "ghost" is not in the metadata
                "cell_label": ["m1", "m2", "m3", "m5", "shared", "ghost"],
                "x": [1.0, 2.5, 13.0, 4.0, 5.0, 6.0],
                "y": [0.5, 1.25, 7.5, 1.0, 2.0, 3.0],
                "z": [2.0, 9.0, 5.7, 3.0, 4.0, 5.0],
                "parcellation_index": [1, 2, 3, 4, 5, 6],
            }
        ),
    )
    # Zhuang without donor_label
    _write(
        meta / ZHUANG / "20230830" / "cell_metadata.csv",
        pd.DataFrame({"cell_label": ["z1", "shared"], "cluster_alias": [3, 1]}),
    )
    _write(
        meta / f"{ZHUANG}-CCF" / "20230830" / "ccf_coordinates.csv",
        pd.DataFrame(
            {
                "cell_label": ["z1", "shared"],
                "x": [6.0, 7.0],
                "y": [3.0, 4.0],
                "z": [1.0, 2.0],
                "parcellation_index": [0, 0],
            }
        ),
    )
    return root


def test_read_abc_two_datasets(abc_dir: Path) -> None:
    messages: list[str] = []
    adata = read_abc(abc_dir, [MERFISH, ZHUANG], chunksize=2, progress=messages.append)

    # m4 (no CCF) and m5 (unknown cluster) dropped; "shared" occurs in both → prefixed
    assert list(adata.obs_names) == [
        "m1",
        "m2",
        "m3",
        f"{MERFISH}:shared",
        "z1",
        f"{ZHUANG}:shared",
    ]
    assert adata.obs_names.is_unique
    assert all(isinstance(x, str) for x in adata.obs_names)
    assert adata.X.shape == (6, 0)
    assert adata.X.dtype == np.float32

    ccf = adata.obsm["ccf"]
    assert ccf.dtype == np.float32 and ccf.shape == (6, 3)
    # mm (x=AP, y=DV, z=ML) → µm (ap, dv, ml)
    np.testing.assert_allclose(ccf[0], [1000.0, 500.0, 2000.0])
    np.testing.assert_allclose(ccf[1], [2500.0, 1250.0, 9000.0])
    np.testing.assert_allclose(ccf[2], [13000.0, 7500.0, 5700.0])
    np.testing.assert_allclose(ccf[4], [6000.0, 3000.0, 1000.0])
    np.testing.assert_allclose(ccf[5], [7000.0, 4000.0, 2000.0])

    for column in (*TAXONOMY_LEVELS, "dataset", "donor"):
        assert isinstance(adata.obs[column].dtype, pd.CategoricalDtype), column
    assert list(adata.obs["subclass"].astype(str)) == [
        "007 L2/3 IT CTX Glut",
        "046 Vip Gaba",
        "319 Astro-TE NN",
        "046 Vip Gaba",
        "319 Astro-TE NN",
        "007 L2/3 IT CTX Glut",
    ]
    assert adata.obs["cluster"].iloc[1] == "0800 Vip Gaba_1"
    # empty neurotransmitter (non-neuronal) is missing, the cell is kept
    assert pd.isna(adata.obs["neurotransmitter"].iloc[2])
    assert adata.obs["neurotransmitter"].iloc[0] == "Glut"
    assert list(adata.obs["dataset"].astype(str)) == [MERFISH] * 4 + [ZHUANG] * 2
    # donor from donor_label, else the dataset name
    assert list(adata.obs["donor"].astype(str)) == ["D1", "D1", "D2", "D2", ZHUANG, ZHUANG]

    abc = adata.uns["abc"]
    assert abc["versions"][MERFISH] == "20241115"  # latest wins
    assert abc["versions"][f"{MERFISH}-CCF"] == "20231215"
    assert abc["versions"]["WMB-taxonomy"] == "20231215"
    counts = abc["counts"][MERFISH]
    assert counts["metadata_rows"] == 6
    assert counts["kept"] == 4
    assert counts["dropped_no_ccf"] == 1
    assert counts["dropped_no_taxonomy"] == 1
    assert counts["ccf_rows"] == 6
    assert counts["ccf_without_metadata"] == 1
    assert abc["counts"][ZHUANG]["kept"] == 2
    assert abc["n_relabelled"] == 2
    assert messages, "progress was never called"


def test_read_abc_pinned_version_and_default_dataset(abc_dir: Path) -> None:
    # the old MERFISH version has only "old-1", which has no CCF row → nothing left
    with pytest.raises(ValueError, match="no ABC cell"):
        read_abc(abc_dir, version={MERFISH: "20230830"})
    adata = read_abc(abc_dir)  # default dataset = MERFISH, latest version
    assert adata.n_obs == 4
    assert "shared" in adata.obs_names  # no collision with a single dataset


def test_read_abc_h5ad_round_trip_and_scanpy_without_warnings(
    abc_dir: Path, tmp_path: Path
) -> None:
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adata = read_abc(abc_dir, [MERFISH, ZHUANG])
        path = tmp_path / "abc_cells.h5ad"
        adata.write_h5ad(path)
        back = anndata.read_h5ad(path)
        frame = sc.get.obs_df(back, keys=["subclass", "class"])
        sub = back[back.obs["class"] == "30 Astro-Epen"].copy()
    assert list(back.obs_names) == list(adata.obs_names)
    np.testing.assert_array_equal(back.obsm["ccf"], adata.obsm["ccf"])
    assert frame.shape == (6, 2)
    assert sub.n_obs == 2
    assert back.uns["abc"]["counts"][MERFISH]["dropped_no_ccf"] == 1


def test_read_abc_missing_ccf_file_names_the_path(abc_dir: Path) -> None:
    ccf = abc_dir / "metadata" / f"{ZHUANG}-CCF" / "20230830" / "ccf_coordinates.csv"
    ccf.unlink()
    with pytest.raises(FileNotFoundError, match="ccf_coordinates.csv") as info:
        read_abc(abc_dir, [ZHUANG])
    assert str(ccf) in str(info.value)


def test_read_abc_missing_inputs(abc_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Zhuang-ABCA-3"):
        read_abc(abc_dir, ["Zhuang-ABCA-3"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        read_abc(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="20990101"):
        read_abc(abc_dir, version="20990101")


def test_read_abc_missing_column_is_a_value_error(abc_dir: Path) -> None:
    path = abc_dir / "metadata" / ZHUANG / "20230830" / "cell_metadata.csv"
    pd.DataFrame({"cell_label": ["z1"], "cluster": ["x"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="cluster_alias") as info:
        read_abc(abc_dir, [ZHUANG])
    assert str(path) in str(info.value)
