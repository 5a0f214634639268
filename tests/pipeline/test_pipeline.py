"""The whole task graph on a tiny phantom brain, through ``luigi.build``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import luigi
import luigi.configuration
import numpy as np
import pandas as pd
import pytest
from luigi.execution_summary import LuigiStatusCode

from cellmap2d.anchoring import read_quint
from cellmap2d.identity import CHALLENGE_COLUMNS
from cellmap2d.synthetic import WorldConfig, evaluate_mapping, make_world


def _configure(**values: object) -> None:
    config = luigi.configuration.get_config()
    for key, value in values.items():
        config.set("cellmap2d", key, str(value))


def _build(tasks: list) -> luigi.execution_summary.LuigiRunResult:
    return luigi.build(
        tasks, local_scheduler=True, workers=1, detailed_summary=True, log_level="WARNING"
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    return make_world(tmp_path_factory.mktemp("world") / "tiny", WorldConfig.tiny())


@pytest.fixture(scope="module")
def store(world, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store")
    _configure(
        store=store,
        manifest=world.manifest,
        atlas=world.atlas_dir,
        atlas_resolution=100,
        abc=world.abc_dir,
        cell_diameter_um=world.config.cell_diameter_um,
        registration_pixel_um=50,
        density_voxel_um=100,
        density_sigma_um=150,
        bootstrap=20,
        anchoring="search",
    )
    from tasks import Pipeline

    result = _build([Pipeline()])
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    return store


def test_planted_type_ranks_first(world, store: Path) -> None:
    planted = world.truth_mixtures()
    for brain_id, rows in planted.groupby("brain_id"):
        table = pd.read_csv(store / "brains" / brain_id / "identity.csv")
        top = rows.sort_values("planted_fraction").iloc[-1]["type"]
        assert table.loc[table["rank"] == 1, "type"].item() == top
        assert table["fraction"].sum() == pytest.approx(1.0)
        assert (table["fraction_low"] <= table["fraction_high"] + 1e-12).all()


def test_cells_h5ad_schema_and_accuracy(world, store: Path) -> None:
    import scanpy as sc

    brain_id = world.config.brains[0].brain_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adata = sc.read_h5ad(store / "brains" / brain_id / "cells.h5ad")
    assert adata.n_obs > 100
    obs = adata.obs
    for column in (
        "section",
        "x_px",
        "y_px",
        "intensity",
        "radius_um",
        "region_id",
        "region_acronym",
        "hemisphere",
    ):
        assert column in obs
    assert obs["section"].dtype == np.int64
    assert isinstance(obs["region_acronym"].dtype, pd.CategoricalDtype)
    assert set(obs["hemisphere"].cat.categories) == {"left", "right"}
    assert adata.obsm["ccf"].shape == (adata.n_obs, 3)
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
    np.testing.assert_allclose(
        adata.obsm["spatial"], obs[["x_px", "y_px"]].to_numpy() * world.config.pixel_size_um
    )
    identity = pd.read_csv(store / "brains" / brain_id / "identity.csv")
    pd.testing.assert_frame_equal(
        adata.uns["identity"].reset_index(drop=True), identity, check_dtype=False
    )
    provenance = adata.uns["cellmap2d"]
    assert provenance["brain_id"] == brain_id and "version" in provenance
    assert len(provenance["sections"]["section"]) == world.config.brains[0].n_sections
    quality = evaluate_mapping(
        obs[["x_px", "y_px"]].to_numpy(),
        obs["section"].to_numpy(),
        adata.obsm["ccf"],
        world.truth_cells(brain_id),
        max_px=2.0,
    )
    assert quality["recall"] > 0.8 and quality["precision"] > 0.8
    # 100 µm atlas, 40 µm registration pixels: well under a voxel is the aim
    assert quality["median_um"] < 100.0, quality


def test_anchoring_json_is_quint_and_flags_bad_sections(world, store: Path) -> None:
    brain = world.config.brains[0]
    path = store / "brains" / brain.brain_id / "anchoring.json"
    series = read_quint(path)
    assert [a.nr for a in series] == list(range(brain.n_sections))
    qc = json.loads(path.read_text())["cellmap2d"]["sections"]
    flags = dict(zip(qc["section"], qc["flag"], strict=True))
    for missing in brain.missing:
        assert flags[missing] == "empty"
    for torn in brain.damaged:
        assert flags[torn] in ("damaged", "disagrees"), flags
    intact = set(range(brain.n_sections)) - set(brain.missing) - set(brain.damaged)
    assert all(flags[z] == "" for z in intact), flags
    truth = {a.nr: a for a in read_quint(world.truth_anchoring(brain.brain_id))}
    for a in series:
        if a.nr in truth:
            centre = (a.width / 2, a.height / 2)
            mine = a.to_ccf(*centre, width=a.width, height=a.height)
            true = truth[a.nr].to_ccf(*centre, width=a.width, height=a.height)
            assert abs(mine[0, 0] - true[0, 0]) < 300, (a.nr, mine, true)


def test_quicknii_folder_opens_the_anchoring(world, store: Path) -> None:
    """QuickNII finds each slice's image by its ``filename`` in the JSON's own folder."""
    import imageio.v3 as iio

    brain = world.config.brains[0]
    folder = store / "brains" / brain.brain_id / "quicknii"
    series = read_quint(folder / "anchoring.json")
    assert series == read_quint(store / "brains" / brain.brain_id / "anchoring.json")
    for anchor in series:
        assert anchor.filename.endswith(".png") and f"_s{anchor.nr:04d}" in anchor.filename
        image = iio.imread(folder / anchor.filename)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    present = [a for a in series if a.nr not in brain.missing]
    assert all(iio.imread(folder / a.filename).std() > 10 for a in present)


def test_search_seeded_by_another_anchoring(world, store: Path) -> None:
    """A seed (as from DeepSlice) starts the search; a seed off the section spacing is refused."""
    from cellmap2d.anchoring import search_series, series_seed
    from cellmap2d.atlas import read_atlas_h5
    from tasks.sections import load_thumbnail

    brain = world.config.brains[0]
    folder = store / "brains" / brain.brain_id
    thumbs = {int(p.stem[1:]): load_thumbnail(str(p)) for p in folder.glob("thumbnails/*.npz")}
    first = next(iter(thumbs.values()))
    atlas = read_atlas_h5(next((store / "atlas").glob("*.h5")))
    truth = read_quint(world.truth_anchoring(brain.brain_id))
    seed = series_seed(truth, midline_um=atlas.midline_um).params
    kwargs = {
        "atlas": atlas,
        "thumbnail_pixel_um": float(first["pixel_um"]),
        "level0_shape": tuple(int(v) for v in first["level0_shape"]),
        "level0_pixel_um": world.config.pixel_size_um,
        "section_spacing_um": brain.section_spacing_um,
        "brain_id": brain.brain_id,
    }
    images = [t["autofluorescence"] for t in thumbs.values()]
    fit = search_series(images, list(thumbs), seed=seed, **kwargs)
    assert abs(fit.params["angle_ml_deg"] - brain.angles_deg[0]) < 1.0, fit.params
    assert abs(fit.params["angle_dv_deg"] - brain.angles_deg[1]) < 1.0, fit.params
    true_by_nr = {a.nr: a for a in truth}
    for a in (a for a in fit.anchors if a.nr in true_by_nr):  # the missing section has no truth
        centre = (a.width / 2, a.height / 2)
        ap = a.to_ccf(*centre, width=a.width, height=a.height)[0, 0]
        assert (
            abs(ap - true_by_nr[a.nr].to_ccf(*centre, width=a.width, height=a.height)[0, 0]) < 200
        )
    with pytest.raises(ValueError, match=f"brain {brain.brain_id}.*section spacing"):
        search_series(images, list(thumbs), seed={**seed, "step_um": 2 * seed["step_um"]}, **kwargs)


def test_cohort_tables(world, store: Path) -> None:
    long = pd.read_csv(store / "cohort" / "identity.csv", dtype={"brain_id": str})
    assert set(long["brain_id"]) == {b.brain_id for b in world.config.brains}
    challenge = pd.read_csv(store / "cohort" / "mapmysections.csv", dtype={"brain_id": str})
    assert list(challenge.columns) == ["brain_id", *CHALLENGE_COLUMNS]
    np.testing.assert_allclose(challenge[list(CHALLENGE_COLUMNS)].sum(axis=1), 1.0)
    row = challenge.iloc[0]
    assert row[list(CHALLENGE_COLUMNS)].astype(float).idxmax() == "L6.CT.CTX.Glut"


def test_rerun_does_nothing(store: Path) -> None:
    from tasks import Pipeline

    outputs = sorted(p for p in store.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in outputs}
    result = _build([Pipeline()])
    assert result.status == LuigiStatusCode.SUCCESS
    assert "Did not run any tasks" in result.summary_text
    assert {p: p.stat().st_mtime_ns for p in outputs} == before


def test_hand_corrected_anchoring_reruns_only_downstream(world, store: Path) -> None:
    """Editing anchoring.json (as in QuickNII/VisuAlign) recomputes what depends on it only."""
    from cellmap2d.anchoring import write_quint
    from tasks import Pipeline

    brain = world.config.brains[0].brain_id
    folder = store / "brains" / brain
    path = folder / "anchoring.json"
    series = read_quint(path)
    series[2].anchoring = series[2].anchoring + np.r_[0.0, 4.0, 0.0, np.zeros(6)]  # 100 µm AP
    write_quint(path, series, metadata=series.metadata)
    upstream = [*folder.glob("cells/*.csv"), *folder.glob("thumbnails/*.npz")]
    downstream = [
        *folder.glob("transforms/*.npz"),
        folder / "cells_mapped.h5ad",
        folder / "identity.csv",
        folder / "cells.h5ad",
        folder / "quicknii" / "anchoring.json",
        store / "cohort" / "mapmysections.csv",
    ]
    before = {p: p.stat().st_mtime_ns for p in upstream + downstream}
    result = _build([Pipeline()])
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    assert all(p.stat().st_mtime_ns == before[p] for p in upstream)
    assert all(p.stat().st_mtime_ns > before[p] for p in downstream)
    assert read_quint(path)[2] == series[2]  # the correction is kept, not overwritten


def test_bad_brain_fails_the_run_but_not_the_others(world, store: Path, tmp_path: Path) -> None:
    manifest = pd.read_csv(world.manifest, dtype=str)
    manifest["path"] = [str(world.root / p) for p in manifest["path"]]
    bad = manifest.iloc[[0]].assign(brain_id="broken", path=str(tmp_path / "nowhere.ome.zarr"))
    both = tmp_path / "manifest.csv"
    pd.concat([manifest, bad]).to_csv(both, index=False)
    _configure(manifest=both)
    try:
        from tasks import Identity, Pipeline

        result = _build([Pipeline()])
        assert result.status != LuigiStatusCode.SUCCESS
        good = Identity(brain_id=world.config.brains[0].brain_id)
        assert good.complete()
        assert not (store / "brains" / "broken" / "identity.csv").exists()
    finally:
        _configure(manifest=world.manifest)


def test_identity_mixture_setting_chooses_the_reported_fraction(world, store: Path) -> None:
    """``identity_mixture`` picks which mixture fit is ``fraction``; the default is ``emm``."""
    from tasks import Identity

    brain_id = world.config.brains[-1].brain_id
    path = store / "brains" / brain_id / "identity.csv"
    default = pd.read_csv(path)
    np.testing.assert_array_equal(default["fraction"], default["fraction_emm"])
    try:
        _configure(identity_mixture="nnls")
        path.unlink()
        assert _build([Identity(brain_id=brain_id)]).status == LuigiStatusCode.SUCCESS
        table = pd.read_csv(path)
        np.testing.assert_array_equal(table["fraction"], table["fraction_nnls"])
        assert table.loc[table["rank"] == 1, "fraction"].item() == table["fraction_nnls"].max()
    finally:
        _configure(identity_mixture="emm")
        path.unlink(missing_ok=True)
        assert _build([Identity(brain_id=brain_id)]).status == LuigiStatusCode.SUCCESS
