from __future__ import annotations

import math
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from cellmap2d.density import DensityFile, Grid, histogram, smooth, type_densities, write_densities
from cellmap2d.identity import (
    CHALLENGE_COLUMNS,
    MIXTURE_NOISE_WEIGHT,
    brain_identity,
    challenge_column,
    challenge_scores,
    challenge_table,
    em_mixture,
    emm_mixture,
    reference_noise_bonus,
    score_fractions,
    score_types,
)

GRID = Grid(100.0, (2000.0, 2000.0, 2000.0))
SIGMA = 150.0
CENTRES = {
    "A": (700.0, 1000.0, 800.0),
    "B": (1300.0, 1000.0, 1200.0),
    "C": (1000.0, 600.0, 1000.0),
}


def _draw(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    return rng.normal(CENTRES[name], 220.0, size=(n, 3))


@pytest.fixture(scope="module")
def type_maps() -> dict[str, np.ndarray]:
    """Three blob-shaped 'ABC types', each the smoothed histogram of 30 000 reference cells."""
    rng = np.random.default_rng(11)
    return {n: smooth(histogram(_draw(rng, n, 30_000), GRID), GRID, SIGMA) for n in CENTRES}


FULL_MASK = np.ones(GRID.shape, dtype=bool)


def test_sample_of_one_type_ranks_it_first_under_every_score(type_maps) -> None:
    sample = _draw(np.random.default_rng(5), "A", 800)  # independent of the reference cells
    for rank_by in (
        "fraction",
        "fraction_emm",
        "fraction_emc",
        "fraction_nnls",
        "reference_score",
        "pearson",
        "js_distance",
        "log_likelihood",
    ):
        table = score_types(
            sample, type_maps, FULL_MASK, grid=GRID, sigma_um=SIGMA, n_boot=0, rank_by=rank_by
        )
        assert table["type"].iloc[0] == "A", rank_by
        assert list(table["rank"]) == [1, 2, 3]
    by_type = table.set_index("type")
    assert by_type["fraction"].idxmax() == "A"
    assert by_type["reference_score"].idxmax() == "A"
    assert by_type["pearson"].idxmax() == "A"
    assert by_type["js_distance"].idxmin() == "A"
    assert by_type["log_likelihood"].idxmax() == "A"
    assert by_type.loc["A", "fraction"] > 0.95
    assert by_type.loc["A", "n_cells"] == pytest.approx(30_000, rel=0.01)
    assert list(table.columns) == [
        "type",
        "rank",
        "fraction",
        "fraction_low",
        "fraction_high",
        "fraction_emm",
        "fraction_emc",
        "fraction_em",
        "fraction_nnls",
        "reference_score",
        "pearson",
        "js_distance",
        "log_likelihood",
        "n_cells",
        "background",
        "background_low",
        "background_high",
    ]


def test_mixture_recovers_planted_fractions(type_maps) -> None:
    rng = np.random.default_rng(123)
    sample = np.vstack([_draw(rng, "A", 1400), _draw(rng, "B", 600)])
    table = score_types(sample, type_maps, FULL_MASK, grid=GRID, sigma_um=SIGMA, n_boot=60, seed=1)
    by_type = table.set_index("type")
    assert by_type["fraction"].sum() == pytest.approx(1.0)
    assert by_type.loc["A", "fraction"] == pytest.approx(0.7, abs=0.04)
    assert by_type.loc["B", "fraction"] == pytest.approx(0.3, abs=0.04)
    assert by_type.loc["C", "fraction"] < 0.04
    for name, truth in (("A", 0.7), ("B", 0.3)):
        low, high = by_type.loc[name, ["fraction_low", "fraction_high"]]
        assert low <= truth <= high, (name, low, high)
        assert high - low < 0.2
    assert list(table["type"][:2]) == ["A", "B"]
    assert table.attrs["n_sample_cells"] == 2000


def test_reference_score_and_other_scores_on_a_hand_computed_case() -> None:
    grid = Grid(100.0, (100.0, 100.0, 400.0))  # 1 × 1 × 4 voxels along ML
    t = np.array([1.0, 1.0, 0.0, 0.0]).reshape(grid.shape)  # → [.5, .5, 0, 0]
    u = np.array([0.0, 0.0, 0.0, 3.0]).reshape(grid.shape)  # → [0, 0, 0, 1]
    cells = np.array([[50.0, 50.0, 50.0]] * 3 + [[50.0, 50.0, 250.0]])  # s = [.75, 0, .25, 0]
    mask = np.ones(grid.shape, dtype=bool)
    table = score_types(
        cells, {"t": t, "u": u}, mask, grid=grid, sigma_um=0.0, n_boot=0, background=False
    )
    row = table.set_index("type").loc["t"]

    # MSE over t > 5 % of max (voxels 0, 1): ((.75 − .5)² + (0 − .5)²) / 2 = 0.15625
    # penalty: t's mass where s < 1 % of max s (voxels 1, 3) = 0.5
    assert row["reference_score"] == pytest.approx(1.0 / (0.15625 + 0.5))
    assert row["pearson"] == pytest.approx(1.0 / math.sqrt(6.0))
    kl_t = 0.5 * math.log2(0.5 / 0.625) + 0.5 * math.log2(0.5 / 0.25)
    kl_s = 0.75 * math.log2(0.75 / 0.625) + 0.25 * math.log2(0.25 / 0.125)
    assert row["js_distance"] == pytest.approx(math.sqrt(0.5 * (kl_t + kl_s)))
    floor = 1e-6 / 4
    assert row["log_likelihood"] == pytest.approx((3 * math.log(0.5) + math.log(floor)) / 4)
    assert row["n_cells"] == 2.0
    # NNLS: a·t + b·u ≈ s → a = 0.75, b = 0 → fractions 1, 0
    assert row["fraction_nnls"] == pytest.approx(1.0)
    assert table.set_index("type").loc["u", "fraction_nnls"] == pytest.approx(0.0)
    # EM: the 3 cells at voxel 0 have likelihood .5 under t and the floor under u; the cell at
    # voxel 2 has the floor under both → the likelihood grows with f_t → f_t = 1 (also with the
    # reference-noise bonus, which only scales each type's likelihood, and with the
    # mixture-aware one, which rewards the pure fit most)
    assert row["fraction_em"] == pytest.approx(1.0, abs=1e-5)
    assert row["fraction"] == pytest.approx(1.0, abs=1e-5)
    assert row["fraction_emm"] == pytest.approx(1.0, abs=1e-5)
    assert row["fraction_emm"] == row["fraction"]
    assert table["fraction_low"].isna().all()  # n_boot = 0: no interval
    # u: no overlap with s at the high voxels: MSE = (0 − 1)², penalty = 1 (s[3] = 0)
    assert table.set_index("type").loc["u", "reference_score"] == pytest.approx(0.5)


def test_identical_maps_have_zero_js_distance_including_crop_and_fold(tmp_path: Path) -> None:
    """A type built from the sample's own cells over the whole grid matches the sample exactly,
    also on a small mask (the sample is smoothed on a crop) and with folded hemispheres."""
    grid = Grid(200.0)
    rng = np.random.default_rng(3)
    sample = rng.normal((6000.0, 4000.0, 5700.0), 500.0, size=(3000, 3))
    other = rng.normal((8000.0, 3000.0, 3000.0), 500.0, size=(3000, 3))
    obs = pd.DataFrame(
        {"subclass": pd.Categorical(["same"] * 3000 + ["other"] * 3000)},
        index=[str(i) for i in range(6000)],
    )
    cells = anndata.AnnData(
        X=np.zeros((6000, 0), dtype=np.float32),
        obs=obs,
        obsm={"ccf": np.vstack([sample, other]).astype(np.float32)},
    )
    mask = np.zeros(grid.shape, dtype=bool)
    mask[26:35, 15:26, 20:33] = True  # around the blob, straddling the midline (voxel 28.5)
    for fold in (False, True):
        path = tmp_path / f"d{fold}.h5"
        items = type_densities(cells, grid=grid, sigma_um=400.0, fold_hemispheres=fold)
        write_densities(
            path,
            items,
            grid=grid,
            level="subclass",
            sigma_um=400.0,
            attrs={"fold_hemispheres": fold},
        )
        with DensityFile(path) as densities:
            table = score_types(cells.obsm["ccf"][:3000], densities, mask, n_boot=5).set_index(
                "type"
            )
        assert table.loc["same", "js_distance"] == pytest.approx(0.0, abs=1e-3)
        assert table.loc["same", "pearson"] == pytest.approx(1.0, abs=1e-6)
        assert table.loc["same", "fraction"] == pytest.approx(1.0, abs=1e-3)
        assert table["rank"].loc["same"] == 1


def test_score_types_errors(type_maps) -> None:
    with pytest.raises(ValueError, match="no sample cells"):
        score_types(np.empty((0, 3)), type_maps, FULL_MASK, grid=GRID, sigma_um=SIGMA)
    with pytest.raises(ValueError, match="no sample cells"):
        score_types(np.full((4, 3), np.nan), type_maps, FULL_MASK, grid=GRID, sigma_um=SIGMA)
    far = np.zeros(GRID.shape, dtype=bool)
    far[0, 0, 0] = True
    with pytest.raises(ValueError, match="inside the mask"):
        score_types(np.array([[1000.0, 1000.0, 1000.0]]), type_maps, far, grid=GRID, sigma_um=SIGMA)
    with pytest.raises(ValueError, match="required"):
        score_types(np.array([[1000.0, 1000.0, 1000.0]]), type_maps, FULL_MASK)
    with pytest.raises(ValueError, match="rank_by"):
        score_types(
            np.array([[1000.0, 1000.0, 1000.0]]),
            type_maps,
            FULL_MASK,
            grid=GRID,
            sigma_um=SIGMA,
            rank_by="best",
        )


# ------------------------------------------------------------------------------ challenge


def test_challenge_column() -> None:
    assert challenge_column("007 L2/3 IT CTX Glut") == "L2.3.IT.CTX.Glut"
    assert challenge_column("001 CLA-EPd-CTX Car3 Glut") == "CLA.EPd.CTX.Car3.Glut"
    assert challenge_column("319 Astro-TE NN") == "Astro.TE.NN"
    assert challenge_column("Pvalb chandelier Gaba") == "Pvalb.chandelier.Gaba"
    assert challenge_column("L6b CTX Glut") == "L6b.CTX.Glut"
    assert len(CHALLENGE_COLUMNS) == 27
    assert CHALLENGE_COLUMNS[0] == "ABC.NN" and CHALLENGE_COLUMNS[-1] == "Vip.Gaba"


def test_challenge_table_rows_sum_to_one() -> None:
    long = pd.DataFrame(
        {
            "brain_id": [101, 101, 101, 202, 202],
            "type": [
                "007 L2/3 IT CTX Glut",
                "046 Vip Gaba",
                "100 Not In Challenge Glut",  # dropped before renormalising
                "100 Not In Challenge Glut",
                "200 Also Not NN",
            ],
            "fraction": [0.3, 0.1, 0.6, 0.9, 0.1],
        }
    )
    table = challenge_table(long)
    assert list(table.columns) == ["brain_id", *CHALLENGE_COLUMNS]
    assert list(table["brain_id"]) == ["101", "202"]
    np.testing.assert_allclose(table[list(CHALLENGE_COLUMNS)].sum(axis=1), 1.0)
    first = table.iloc[0]
    assert first["L2.3.IT.CTX.Glut"] == pytest.approx(0.75)
    assert first["Vip.Gaba"] == pytest.approx(0.25)
    # brain 202 has no mass on the 27 columns → uniform
    np.testing.assert_allclose(table.iloc[1][list(CHALLENGE_COLUMNS)].astype(float), 1 / 27)


def _row(values: dict[str, float]) -> dict[str, float]:
    return {c: values.get(c, 0.0) for c in CHALLENGE_COLUMNS}


def test_challenge_scores_hand_computed() -> None:
    truth = pd.DataFrame(
        [
            {"brain_id": "t1", **_row({"L5.ET.CTX.Glut": 4.0})},  # counts: normalised → 1
            {"brain_id": "t2", **{c: np.nan for c in CHALLENGE_COLUMNS}},  # no truth: skipped
            {"brain_id": "t3", **_row({"Sst.Gaba": 1.0, "Vip.Gaba": 1.0})},
        ]
    )
    predicted = pd.DataFrame(
        [
            {"brain_id": "t3", **_row({"Sst.Gaba": 0.2, "Pvalb.Gaba": 0.8})},
            {"brain_id": "t1", **_row({"L5.ET.CTX.Glut": 0.6, "L6b.CTX.Glut": 0.4})},
            {"brain_id": "t2", **_row({"Sst.Gaba": 1.0})},
        ]
    )
    scores = challenge_scores(truth, predicted)
    assert list(scores.index) == ["t1", "t3"]
    t1 = scores.loc["t1"]
    assert t1["cross_entropy"] == pytest.approx(-math.log(0.6))
    assert t1["brier"] == pytest.approx(0.4**2 + 0.4**2)
    assert t1["any_correct_hit"] == pytest.approx(0.6)
    assert bool(t1["hit"]) and bool(t1["top1"])
    m = 1 / 27  # both rows sum to 1, so both means are 1/27
    r = (0.6 - 27 * m * m) / math.sqrt((1 - 27 * m * m) * (0.6**2 + 0.4**2 - 27 * m * m))
    assert t1["r2"] == pytest.approx(r**2)
    t3 = scores.loc["t3"]
    # truth .5/.5 on Sst/Vip; prediction .2 Sst, .8 Pvalb, 0 Vip (clipped to 1e-15)
    assert t3["cross_entropy"] == pytest.approx(-0.5 * math.log(0.2) - 0.5 * math.log(1e-15))
    assert t3["brier"] == pytest.approx(0.3**2 + 0.5**2 + 0.8**2)
    assert t3["any_correct_hit"] == pytest.approx(0.2)
    assert not bool(t3["hit"]) and not bool(t3["top1"])


def test_challenge_scores_index_keyed_frames() -> None:
    truth = pd.DataFrame([_row({"Oligo.NN": 1.0})], index=["x"])
    predicted = pd.DataFrame([_row({"Oligo.NN": 0.5, "OPC.NN": 0.5})], index=["x"])
    scores = challenge_scores(truth, predicted)
    assert scores.loc["x", "any_correct_hit"] == pytest.approx(0.5)
    assert bool(scores.loc["x", "hit"])
    with pytest.raises(ValueError, match="no tool"):
        challenge_scores(truth, predicted.rename(index={"x": "y"}))
    with pytest.raises(ValueError, match="Vip.Gaba"):
        challenge_scores(truth.drop(columns="Vip.Gaba"), predicted)


@pytest.fixture(scope="module")
def training_truth(shared_data: Path) -> pd.DataFrame:
    path = shared_data / "mapmysections" / "MapMySections_EntrantData.xlsx"
    return pd.read_excel(path, sheet_name="Training Set")


def test_challenge_scores_real_truth_against_itself(training_truth: pd.DataFrame) -> None:
    with_truth = training_truth[list(CHALLENGE_COLUMNS)].fillna(0).sum(axis=1) > 0
    scores = challenge_scores(training_truth, training_truth)
    assert len(scores) == int(with_truth.sum()) > 100
    assert scores["top1"].all()
    np.testing.assert_allclose(scores["brier"], 0.0, atol=1e-15)
    np.testing.assert_allclose(scores["any_correct_hit"], 1.0)
    assert scores["hit"].all()
    assert set(scores.index) == set(training_truth.loc[with_truth, "MapMySectionsID"])


def test_challenge_scores_real_truth_against_uniform(training_truth: pd.DataFrame) -> None:
    # MMS.training.004 as read from the sheet: counts Astro.TE 5, Endo 3, L2/3 IT 1, L4/5 IT 2,
    # L6 CT 1, Pvalb 3, Sst 1 (16 in total; NaN elsewhere would be 0)
    row = training_truth.set_index("MapMySectionsID").loc["MMS.training.004"]
    counts = row[list(CHALLENGE_COLUMNS)].astype(float).fillna(0.0)
    assert counts[counts > 0].to_dict() == {
        "Astro.TE.NN": 5.0,
        "Endo.NN": 3.0,
        "L2.3.IT.CTX.Glut": 1.0,
        "L4.5.IT.CTX.Glut": 2.0,
        "L6.CT.CTX.Glut": 1.0,
        "Pvalb.Gaba": 3.0,
        "Sst.Gaba": 1.0,
    }
    uniform = pd.DataFrame({"brain_id": training_truth["MapMySectionsID"]})
    for column in CHALLENGE_COLUMNS:
        uniform[column] = 1.0
    scores = challenge_scores(training_truth, uniform).loc["MMS.training.004"]
    assert scores["cross_entropy"] == pytest.approx(math.log(27))
    squares = (25 + 9 + 1 + 4 + 1 + 9 + 1) / 16**2
    assert scores["brier"] == pytest.approx(squares - 2 / 27 + 27 / 27**2)
    assert scores["any_correct_hit"] == pytest.approx(7 / 27)
    assert not bool(scores["hit"])
    assert not bool(scores["top1"])  # uniform → first column ABC.NN, truth 0 there
    assert np.isnan(scores["r2"])  # a constant prediction has no correlation


# ------------------------------------------------------------------------------ EM, fractions


def test_em_mixture_matches_the_closed_form_two_type_optimum() -> None:
    # 2 types, 2 voxels: L = [[.8, .2], [.2, .8]], 3 cells at voxel 0, 1 at voxel 1.
    # d/df of 3·log(.2 + .6 f) + log(.8 − .6 f) = 0 → 3(.8 − .6f) = .2 + .6f → f = 2.2 / 2.4
    L = np.array([[0.8, 0.2], [0.2, 0.8]])
    f = em_mixture(L, np.array([3.0, 1.0]))
    assert f == pytest.approx([2.2 / 2.4, 0.2 / 2.4], abs=1e-6)
    # the same with explicit cells instead of weights, and from another start
    f2 = em_mixture(np.repeat(L, [3, 1], axis=1), start=np.array([0.1, 0.9]))
    assert f2 == pytest.approx(f, abs=1e-6)
    # a component that explains nothing better gets ~0
    L3 = np.vstack([L, [0.5, 0.5]])
    assert em_mixture(L3, np.array([1.0, 0.0]))[0] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="> 0"):
        em_mixture(np.array([[0.0, 1.0]]))


def test_reference_noise_bonus_hand_computed() -> None:
    # σ = 0: the kernel is one voxel, V = 1. Type a: 100 cells, Σp² = .02 → noise = 1/100,
    # ρ = .01/.02 = .5 → bonus = w · ½ · ρ; type b: 10 000 cells spread like a → ρ = .005
    b = reference_noise_bonus(np.array([100.0, 10_000.0]), np.array([0.02, 0.02]), 0.0, weight=1)
    assert b == pytest.approx([0.25, 0.0025])
    # saturates at weight / 2 (ρ clipped to 1); no cells or no mass → 0
    b = reference_noise_bonus(np.array([1.0, 0.0, 5.0]), np.array([0.5, 0.3, 0.0]), 0.0)
    assert b == pytest.approx([0.375, 0.0, 0.0])
    # a Gaussian kernel spreads each cell over V = (2√π σ)³ voxels (σ in voxels), within 0.1 %
    b = reference_noise_bonus(np.array([100.0]), np.array([1.0 / 8000]), 1.5, weight=1)
    v = (2 * math.sqrt(math.pi) * 1.5) ** 3
    assert b[0] == pytest.approx(0.5 * 80 / v, rel=1e-3)


def test_noise_correction_gives_a_rare_diffuse_type_its_cells_back() -> None:
    """Cells of a rare, diffuse type (300 reference cells, uniform in the cube) next to a
    well-sampled look-alike (30 000 cells, uniform but 5× sparser in one quarter): plain ML
    hands most cells to the look-alike, whose density is smoother; the corrected EM ranks the
    true type first."""
    rng = np.random.default_rng(0)

    def uniform(n: int) -> np.ndarray:
        return rng.uniform(0, 2000.0, size=(n, 3))

    pts = uniform(80_000)
    keep = rng.uniform(0, 1, len(pts)) < np.where(pts[:, 0] < 500, 0.2, 1.0)
    maps = {
        "rare": smooth(histogram(uniform(300), GRID), GRID, SIGMA),
        "common": smooth(histogram(pts[keep][:30_000], GRID), GRID, SIGMA),
    }
    sample = uniform(2000)
    # no background component: the sample is uniform, so a uniform background would explain it
    table = score_types(
        sample, maps, FULL_MASK, grid=GRID, sigma_um=SIGMA, n_boot=20, background=False
    )
    by_type = table.set_index("type")
    assert by_type.loc["rare", "fraction_em"] < 0.5
    assert by_type.loc["rare", "fraction_emc"] > 0.5
    assert by_type.loc["rare", "fraction_emc"] > by_type.loc["rare", "fraction_em"] + 0.05
    assert by_type.loc["rare", "fraction_emm"] > 0.5
    assert table["type"].iloc[0] == "rare"
    assert by_type.loc["rare", "fraction"] == by_type.loc["rare", "fraction_emm"]
    low, high = by_type.loc["rare", ["fraction_low", "fraction_high"]]
    assert low <= by_type.loc["rare", "fraction"] <= high
    # the same bonus for every type changes nothing: equals the plain ML fit
    L = np.array([[0.8, 0.2], [0.2, 0.8]])
    w = np.array([3.0, 1.0])
    assert em_mixture(L * math.exp(0.3), w) == pytest.approx(em_mixture(L, w), abs=1e-6)


def test_score_fractions_as_an_entrant_would() -> None:
    table = pd.DataFrame(
        {
            "type": ["a", "b", "c"],
            "fraction_em": [0.5, 0.3, 0.2],
            "reference_score": [3.0, 1.0, np.nan],
            "pearson": [0.6, 0.2, -0.4],
            "js_distance": [0.2, 0.6, 1.0],
            "log_likelihood": [-1.0, -1.0 - math.log(3.0) / 10, -50.0],
        }
    )
    assert list(score_fractions(table, "fraction_em")) == pytest.approx([0.5, 0.3, 0.2])
    assert list(score_fractions(table, "reference_score")) == pytest.approx([0.75, 0.25, 0.0])
    assert list(score_fractions(table, "pearson")) == pytest.approx([0.75, 0.25, 0.0])
    assert list(score_fractions(table, "js_distance")) == pytest.approx([2 / 3, 1 / 3, 0.0])
    # 10 cells: posterior ∝ exp(10 · ll) → a : b = 3 : 1
    post = score_fractions(table, "log_likelihood", n_cells=10)
    assert list(post) == pytest.approx([0.75, 0.25, 0.0], abs=1e-12)


def test_brain_identity_region_mask_restricts_the_comparison(tmp_path: Path) -> None:
    """Cells of A and B, but the region holds only A's half of the box: A gets everything."""
    grid = GRID
    with_b = {n: type_maps_volume for n, type_maps_volume in _maps().items()}
    path = tmp_path / "d.h5"
    write_densities(path, with_b.items(), grid=grid, level="subclass", sigma_um=SIGMA)
    rng = np.random.default_rng(2)
    cells = np.vstack([_draw(rng, "A", 600), _draw(rng, "B", 600)])
    brain = np.ones((40, 40, 40), dtype=bool)  # 50 µm voxels over the 2 mm box
    region = np.zeros_like(brain)
    region[:, :, :20] = True  # ML < 1000 µm: A's side (A at ML 800, B at ML 1200)
    planes = [(np.array([ap, 0.0, 0.0]), np.array([1.0, 0.0, 0.0])) for ap in range(50, 2000, 100)]
    with DensityFile(path) as densities:
        whole = brain_identity(
            cells,
            planes,
            densities,
            brain_mask=brain,
            brain_mask_voxel_um=50.0,
            section_spacing_um=100.0,
            n_boot=0,
        ).set_index("type")
        left = brain_identity(
            cells,
            planes,
            densities,
            brain_mask=brain,
            brain_mask_voxel_um=50.0,
            section_spacing_um=100.0,
            n_boot=0,
            region_mask=region,
        )
    assert whole.attrs["n_mask_voxels"] == 20 * 20 * 20
    assert left.attrs["n_mask_voxels"] == 20 * 20 * 10
    # all 1200 cells lie in the whole mask; in the region only those with ML < 1000
    assert whole.attrs["n_sample_cells_in_mask"] == 1200
    assert left.attrs["n_sample_cells_in_mask"] == int((cells[:, 2] < 1000).sum())
    assert whole.loc["A", "fraction"] == pytest.approx(0.5, abs=0.06)
    by = left.set_index("type")
    # inside the region A's share of the cells is ≈ P(A, ML<1000) / (that + P(B, ML<1000))
    from scipy.stats import norm

    pa, pb = norm.cdf((1000 - 800) / 220), norm.cdf((1000 - 1200) / 220)
    assert by.loc["A", "fraction"] == pytest.approx(pa / (pa + pb), abs=0.08)
    with pytest.raises(ValueError, match="region_mask shape"), DensityFile(path) as densities:
        brain_identity(
            cells,
            planes,
            densities,
            brain_mask=brain,
            brain_mask_voxel_um=50.0,
            section_spacing_um=100.0,
            n_boot=0,
            region_mask=region[:10],
        )


def _maps() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {n: smooth(histogram(_draw(rng, n, 30_000), GRID), GRID, SIGMA) for n in CENTRES}


def _bump(x: np.ndarray, centre: float, sd: float) -> np.ndarray:
    p = np.exp(-0.5 * ((x - centre) / sd) ** 2)
    return p / p.sum()


def _noisy_reference_fits(seed: int, planted: dict[str, float]) -> dict[str, np.ndarray]:
    """1-D phantom: types A (100 000 reference cells), R (a look-alike of A, only 300 cells)
    and B (100 000), their densities plain histograms of the reference cells (σ = 0), and 2000
    sample cells drawn from the true densities mixed as ``planted``."""
    rng = np.random.default_rng(seed)
    x = np.arange(200)
    true = {"A": _bump(x, 80, 20), "R": _bump(x, 100, 30), "B": _bump(x, 150, 12)}
    n_ref = np.array([100_000.0, 300.0, 100_000.0])
    hist = np.array(
        [rng.multinomial(int(n), true[k]) / n for k, n in zip(true, n_ref, strict=True)]
    )
    L = np.maximum(hist, 1e-6 / len(x))
    sum_sq = (hist**2).sum(axis=1)
    mix = sum(f * true[k] for k, f in planted.items())
    counts = rng.multinomial(2000, mix / mix.sum()).astype(float)
    em = em_mixture(L, counts)
    emc = em_mixture(L * np.exp(reference_noise_bonus(n_ref, sum_sq, 0.0))[:, None], counts)
    bonus = reference_noise_bonus(n_ref, sum_sq, 0.0, weight=MIXTURE_NOISE_WEIGHT)
    emm = emm_mixture(L, bonus, counts, starts=(em, emc))
    return {"em": em, "emc": emc, "emm": emm}


def test_mixture_aware_correction_keeps_single_type_gain_and_stops_leakage() -> None:
    """A rare look-alike R of a well-sampled type A: alone, R's cells go to A under plain ML
    and the mixture-aware correction gives them back (as emc does); in a 70 % A + 30 % B brain
    emc's linear bonus leaks A's share to R, the mixture-aware correction does not."""
    single = [_noisy_reference_fits(seed, {"R": 1.0}) for seed in range(6)]
    emm_r = np.array([f["emm"][1] for f in single])
    em_r = np.array([f["em"][1] for f in single])
    assert (emm_r > 0.5).all(), emm_r
    assert emm_r.mean() > em_r.mean() + 0.1
    mixed = [_noisy_reference_fits(seed, {"A": 0.7, "B": 0.3}) for seed in range(6)]
    for fits in mixed:
        assert fits["emm"][0] == pytest.approx(0.7, abs=0.06), fits
        assert fits["emm"][2] == pytest.approx(0.3, abs=0.03), fits
        assert fits["emc"][0] < 0.67, fits  # without the mixture-aware correction: leakage
    leak_emm = np.mean([f["emm"][1] for f in mixed])
    leak_emc = np.mean([f["emc"][1] for f in mixed])
    assert leak_emm < 0.5 * leak_emc


def test_emm_mixture_hand_cases() -> None:
    L = np.array([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3]])
    w = np.array([5.0, 2.0, 3.0])
    # no bonus: the plain maximum-likelihood mixture, from any start
    f = emm_mixture(L, np.zeros(3), w)
    assert f == pytest.approx(em_mixture(L, w), abs=1e-5)
    assert emm_mixture(L, np.zeros(3), w, starts=(np.array([1.0, 0, 0]),)) == pytest.approx(
        f, abs=1e-5
    )
    # one type: the bonus changes nothing
    assert emm_mixture(L[:1], np.array([0.3]), w) == pytest.approx([1.0])
    # identical rows: plain ML cannot choose; the bonus goes to the type that explains each
    # cell alone (γ = 1 earns b, a 50/50 split only b / 2), so the bonused type takes all
    L2 = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    f = emm_mixture(L2, np.array([0.0, 0.2]), w)
    assert f == pytest.approx([0.0, 1.0], abs=1e-3)
    # the working set (types a start gives weight) grows until no type left out would gain
    # weight: here it reaches the optimum, which needs type 2 (cells ∝ w at voxel k are best
    # explained by type k alone)
    L3 = np.full((3, 3), 0.1) + 0.7 * np.eye(3)
    for bonus in (np.zeros(3), np.full(3, 0.1)):
        f = emm_mixture(L3, bonus, w, starts=(np.array([0.5, 0.5, 0.0]),), uniform=False)
        assert f == pytest.approx(emm_mixture(L3, bonus, w), abs=1e-4)
        assert f[2] > 0.2
        assert f.sum() == pytest.approx(1.0)
    assert emm_mixture(L, np.zeros(3), np.zeros(3)) == pytest.approx([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="bonus"):
        emm_mixture(L, np.array([0.1, -0.1, 0.0]), w)
    with pytest.raises(ValueError, match="> 0"):
        emm_mixture(np.array([[0.0, 1.0]]), np.zeros(1))


def test_emm_mixture_option_with_bootstrap(type_maps) -> None:
    rng = np.random.default_rng(123)
    sample = np.vstack([_draw(rng, "A", 1400), _draw(rng, "B", 600)])
    table = score_types(
        sample, type_maps, FULL_MASK, grid=GRID, sigma_um=SIGMA, n_boot=30, seed=1, mixture="emm"
    )
    by_type = table.set_index("type")
    assert table.attrs["mixture"] == "emm"
    assert (by_type["fraction"] == by_type["fraction_emm"]).all()
    assert by_type.loc["A", "fraction"] == pytest.approx(0.7, abs=0.04)
    assert by_type.loc["B", "fraction"] == pytest.approx(0.3, abs=0.04)
    for name, truth in (("A", 0.7), ("B", 0.3)):
        low, high = by_type.loc[name, ["fraction_low", "fraction_high"]]
        assert low <= truth <= high, (name, low, high)
    assert list(table["type"][:2]) == ["A", "B"]


def _uniform_in_box(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(0.0, 2000.0, size=(n, 3))


def _in_grid(pts: np.ndarray) -> int:
    return int(((pts >= 0) & (pts < 2000.0)).all(axis=1).sum())


@pytest.mark.parametrize("share", [0.0, 0.5, 0.9])
def test_background_component_survives_uniform_false_detections(type_maps, share) -> None:
    """A planted type A among false detections uniform over the compared tissue (the whole box):
    A ranks first under every mixture fit, the type fractions sum to 1 and the background share
    is estimated within ±0.1 of the truth (near 0 without false detections)."""
    rng = np.random.default_rng(40 + int(share * 10))
    cells = _draw(rng, "A", 1000)
    spurious = _uniform_in_box(rng, int(round(share / (1 - share) * 1000)))
    truth = len(spurious) / (_in_grid(cells) + len(spurious))
    table = score_types(
        np.vstack([cells, spurious]), type_maps, FULL_MASK, grid=GRID, sigma_um=SIGMA, n_boot=0
    )
    by_type = table.set_index("type")
    assert table["type"].iloc[0] == "A"
    for fit in ("fraction_emm", "fraction_emc", "fraction_em", "fraction_nnls"):
        assert by_type[fit].idxmax() == "A", fit
        assert by_type[fit].sum() == pytest.approx(1.0), fit
        assert by_type.loc["A", fit] > 0.85, fit
        assert table.attrs[f"background_{fit[9:]}"] == pytest.approx(truth, abs=0.1), fit
    assert table["background"].nunique() == 1
    assert table["background"].iloc[0] == pytest.approx(truth, abs=0.1)
    if share == 0:
        assert table["background"].iloc[0] < 0.05
    # the map scores are computed on the background-subtracted sample: A stays first
    assert by_type["pearson"].idxmax() == "A"
    assert by_type["js_distance"].idxmin() == "A"
    assert by_type["log_likelihood"].idxmax() == "A"


@pytest.mark.xfail(
    strict=True,
    reason="known shortfall: at 90 % false detections the background share is estimated ~0.88 "
    "for a truth of 0.90 and the 95 % bootstrap interval is too narrow to cover it",
)
def test_background_component_mixture_and_interval(type_maps) -> None:
    """70 % A + 30 % B among 90 % false detections: the type fractions are recovered within 0.1,
    the background interval covers the truth; without the component A and B lose mass to C."""
    rng = np.random.default_rng(8)
    cells = np.vstack([_draw(rng, "A", 1400), _draw(rng, "B", 600)])
    spurious = _uniform_in_box(rng, 18_000)
    sample = np.vstack([cells, spurious])
    truth = len(spurious) / (_in_grid(cells) + len(spurious))
    table = score_types(sample, type_maps, FULL_MASK, grid=GRID, sigma_um=SIGMA, n_boot=30)
    by_type = table.set_index("type")
    assert list(table["type"][:2]) == ["A", "B"]
    assert by_type.loc["A", "fraction"] == pytest.approx(0.7, abs=0.1)
    assert by_type.loc["B", "fraction"] == pytest.approx(0.3, abs=0.1)
    assert by_type["fraction"].sum() == pytest.approx(1.0)
    low, high = table.loc[0, ["background_low", "background_high"]]
    assert low <= truth <= high
    assert high - low < 0.05
    old = score_types(
        sample, type_maps, FULL_MASK, grid=GRID, sigma_um=SIGMA, n_boot=0, background=False
    ).set_index("type")
    assert old.loc["C", "fraction"] > 0.1  # the uniform detections need a home
    assert abs(old.loc["A", "fraction"] - 0.7) > abs(by_type.loc["A", "fraction"] - 0.7)


def test_background_false_is_the_plain_type_mixture(type_maps) -> None:
    """``background=False``: no background column values, and ``fraction_em`` is the EM over the
    types' normalised densities at the cells alone (computed here independently)."""
    rng = np.random.default_rng(9)
    sample = np.vstack([_draw(rng, "A", 700), _draw(rng, "C", 300), _uniform_in_box(rng, 500)])
    table = score_types(
        sample, type_maps, FULL_MASK, grid=GRID, sigma_um=SIGMA, n_boot=0, background=False
    )
    assert table["background"].isna().all()
    assert table.attrs["background"] is False
    names = list(type_maps)
    flat = GRID.flat_index(sample)
    flat = flat[flat >= 0]
    dens = np.array([type_maps[n].ravel()[flat] / type_maps[n].sum() for n in names])
    expected = em_mixture(np.maximum(dens, 1e-6 / FULL_MASK.sum()))
    got = table.set_index("type").loc[names, "fraction_em"].to_numpy()
    assert got == pytest.approx(expected, abs=1e-4)
    assert got.sum() == pytest.approx(1.0)


def test_background_in_sparse_section_slabs(tmp_path: Path) -> None:
    """Sections 50 µm thick every 200 µm in a ball-shaped brain: the compared voxels are very
    unequally sampled (voxel centres 0–100 µm from a plane), yet the background, uniform over the
    compared voxels like the types' densities, gets its share right, since the sampled tissue per
    voxel multiplies every component's likelihood alike."""
    path = tmp_path / "d.h5"
    write_densities(path, _maps().items(), grid=GRID, level="subclass", sigma_um=SIGMA)
    rng = np.random.default_rng(12)
    centres = (np.indices((40, 40, 40)).reshape(3, -1).T + 0.5) * 50.0
    brain = (np.linalg.norm(centres - 1000.0, axis=1) < 900.0).reshape(40, 40, 40)
    planes = [(np.array([ap, 0.0, 0.0]), np.array([1.0, 0.0, 0.0])) for ap in range(60, 2000, 200)]
    aps = np.array([p[0][0] for p in planes])

    def in_slabs(pts: np.ndarray) -> np.ndarray:
        near = np.abs(pts[:, :1] - aps[None, :]).min(axis=1) <= 25.0
        inside = np.linalg.norm(pts - 1000.0, axis=1) < 900.0
        return pts[near & inside]

    cells = in_slabs(_draw(rng, "B", 12_000))
    spurious = in_slabs(_uniform_in_box(rng, 160_000))[: 4 * len(cells)]
    assert len(spurious) == 4 * len(cells)
    with DensityFile(path) as densities:
        table = brain_identity(
            np.vstack([cells, spurious]),
            planes,
            densities,
            brain_mask=brain,
            brain_mask_voxel_um=50.0,
            section_spacing_um=200.0,
            n_boot=0,
        )
    assert table["type"].iloc[0] == "B"
    assert table["fraction"].iloc[0] > 0.9
    # biased low here (0.71 for 0.80), within the ±0.1 asked of it
    assert table["background"].iloc[0] == pytest.approx(0.8, abs=0.1)
