"""Tests of cellmap2d.atlas: loading Allen-layout directories, the ontology, region look-up."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import nrrd
import numpy as np
import pytest

from cellmap2d.anchoring import atlas_index, ccf_to_quicknii
from cellmap2d.atlas import Atlas, load_atlas, read_ontology

SHAPE_25 = (528, 320, 456)
SHAPE_100 = (132, 80, 114)
# Real Allen ids (CCFv3 2017 ontology).
ISOCORTEX, CP, STRD = 315, 672, 485
VISP_LAYERS = {
    "VISp1": 593,
    "VISp2/3": 821,
    "VISp4": 721,
    "VISp5": 778,
    "VISp6a": 33,
    "VISp6b": 305,
}


def _link(directory: Path, *sources: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for src in sources:
        os.symlink(src, directory / src.name)
    return directory


@pytest.fixture(scope="module")
def raw25(shared_data: Path) -> np.ndarray:
    """The 25 µm annotation read directly with pynrrd (the reference for load_atlas)."""
    data, _ = nrrd.read(str(shared_data / "ccf" / "annotation_25.nrrd"))
    return data


@pytest.fixture(scope="module")
def atlas_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp Allen-layout directory: annotation_25.nrrd + structures.json (no template)."""
    ccf = shared_data / "ccf"
    return _link(
        tmp_path_factory.mktemp("atlas25") / "atlas",
        ccf / "annotation_25.nrrd",
        ccf / "structures.json",
    )


@pytest.fixture(scope="module")
def atlas25(atlas_dir: Path) -> Atlas:
    return load_atlas(atlas_dir, resolution_um=25)


@pytest.fixture(scope="module")
def json_ontology(shared_data: Path):
    return read_ontology(shared_data / "ccf" / "structures.json")


@pytest.fixture(scope="module")
def csv_ontology(shared_data: Path):
    return read_ontology(shared_data / "ccf" / "structure_tree_2017.csv")


# --- loading -------------------------------------------------------------------------------


def test_load_atlas_25um_shape_order_and_pseudo_template(atlas25: Atlas, raw25: np.ndarray) -> None:
    """The 25 µm annotation loads in native (ap, dv, ml) order, unchanged, with a pseudo-template."""
    assert atlas25.shape == SHAPE_25
    assert atlas25.resolution_um == 25.0
    assert atlas25.annotation.dtype == np.uint32
    assert np.array_equal(atlas25.annotation, raw25)
    assert atlas25.template_is_pseudo is True
    assert atlas25.template.shape == SHAPE_25
    assert atlas25.template.dtype == np.float32
    assert atlas25.midline_um == pytest.approx(5700.0)
    assert len(atlas25.ontology) == 1327


def test_pseudo_template_is_zero_outside_and_orders_tissue_classes(
    atlas25: Atlas, json_ontology
) -> None:
    """Pseudo-template: 0 far outside the brain; fibre tracts bright, ventricles dark (by design)."""
    assert atlas25.template[0, 0, 0] == 0.0
    assert atlas25.template[-1, -1, -1] == 0.0
    ann = atlas25.annotation[250:290]
    tpl = atlas25.template[250:290]
    # interior voxels only (away from label borders, where the 1-voxel smoothing mixes values)
    from scipy import ndimage as ndi

    def interior_mean(ids: np.ndarray) -> float:
        mask = ndi.binary_erosion(np.isin(ann, ids), iterations=2)
        assert mask.sum() > 50
        return float(tpl[mask].mean())

    fibre = interior_mean(json_ontology.descendants("fiber tracts"))
    ventricle = interior_mean(json_ontology.descendants("VS"))
    assert fibre > 200.0
    assert ventricle < 60.0
    assert float(tpl[ann != 0].mean()) > 50.0


def test_load_atlas_csv_ontology_and_average_template(
    raw25: np.ndarray, shared_data: Path, tmp_path: Path
) -> None:
    """A 100 µm directory with a structure-tree CSV loads; an average template replaces the pseudo one."""
    directory = _link(tmp_path / "atlas", shared_data / "ccf" / "structure_tree_2017.csv")
    ann100 = np.ascontiguousarray(raw25[::4, ::4, ::4])
    assert ann100.shape == SHAPE_100
    nrrd.write(str(directory / "annotation_100.nrrd"), ann100)

    atlas = load_atlas(directory, resolution_um=100)
    assert atlas.shape == SHAPE_100
    assert atlas.template_is_pseudo
    assert len(atlas.ontology) == 1327
    # the CSV spelling (differs from structures.json) shows the CSV was read
    assert atlas.ontology.table.loc[606826659, "acronym"] == "Mmd"
    # voxel (i, j, k) at 100 µm is voxel (4i, 4j, 4k) at 25 µm by construction
    i, j, k = 66, 30, 40
    point = np.array([[i * 100 - 50.0, j * 100 - 50.0, k * 100 + 50.0]])
    assert atlas.region_ids(point)[0] == raw25[4 * i, 4 * j, 4 * k]

    template = np.linspace(0, 1, ann100.size, dtype=np.float32).reshape(SHAPE_100)
    nrrd.write(str(directory / "average_template_100.nrrd"), template)
    with_template = load_atlas(directory, resolution_um=100)
    assert with_template.template_is_pseudo is False
    assert np.array_equal(with_template.template, template)


# --- ontology ------------------------------------------------------------------------------


def test_json_and_csv_ontologies_agree(json_ontology, csv_ontology) -> None:
    """Both real ontology files give the same 1327 structures, parents and paths.

    Acronyms agree exactly except for 9 spelling variants between the two Allen exports
    ('CUL4, 5' vs 'CUL4 5', 'MMd' vs 'Mmd', ...): they agree ignoring case and commas.
    """
    jt, ct = json_ontology.table, csv_ontology.table
    assert len(jt) == len(ct) == 1327
    assert set(jt.index) == set(ct.index)
    ct = ct.loc[jt.index]
    assert (jt["parent_id"] == ct["parent_id"]).all()
    assert (jt["path"] == ct["path"]).all()
    assert (jt["depth"] == ct["depth"]).all()
    exact = (jt["acronym"] == ct["acronym"]).mean()
    assert exact > 0.99

    def norm(s):
        return s.str.lower().str.replace(",", "", regex=False)

    assert (norm(jt["acronym"]) == norm(ct["acronym"])).all()
    root = jt.loc[997]
    assert root["parent_id"] == 0 and root["depth"] == 0 and root["path"] == (997,)


def test_descendants_of_isocortex(json_ontology) -> None:
    """Isocortex contains itself and every VISp layer, but not the caudoputamen."""
    ids = set(json_ontology.descendants("Isocortex").tolist())
    assert ISOCORTEX in ids
    assert set(VISP_LAYERS.values()) <= ids
    assert CP not in ids
    assert set(json_ontology.descendants(ISOCORTEX).tolist()) == ids
    assert set(json_ontology.descendants("VISp").tolist()) == {385, *VISP_LAYERS.values()}


def test_id_of_and_acronyms(json_ontology) -> None:
    """Acronym ↔ id; 0 and unknown ids read as 'outside'; unknown acronyms raise KeyError."""
    assert json_ontology.id_of("CP") == CP
    assert json_ontology.id_of("821") == 821
    assert json_ontology.id_of(821) == 821
    with pytest.raises(KeyError, match="NOPE"):
        json_ontology.id_of("NOPE")
    with pytest.raises(KeyError):
        json_ontology.id_of(123456789)
    got = json_ontology.acronyms([0, 821, CP, 123456789])
    assert got.tolist() == ["outside", "VISp2/3", "CP", "outside"]


def test_rollup(json_ontology) -> None:
    """Rollup maps ids to their ancestor at a depth; shallower ids kept; 0 and unknown → 0.

    Paths (Allen): VISp2/3 = root/grey/CH/CTX/CTXpl/Isocortex/VIS/VISp/VISp2/3;
    CP = root/grey/CH/CNU/STR/STRd/CP.
    """
    got = json_ontology.rollup(np.array([821, CP, 8, 0, 123456789, 821]), 5)
    assert got.tolist() == [ISOCORTEX, STRD, 8, 0, 0, ISOCORTEX]
    assert json_ontology.rollup([821], 0).tolist() == [997]
    assert json_ontology.rollup([821], 50).tolist() == [821]


def test_structure_graph_round_trip(json_ontology, tmp_path: Path) -> None:
    """to_structure_graph writes a JSON that reads back to the same hierarchy."""
    path = tmp_path / "structures.json"
    path.write_text(json.dumps(json_ontology.to_structure_graph()))
    again = read_ontology(path).table.loc[json_ontology.table.index]
    for column in ("acronym", "name", "parent_id", "path"):
        assert (again[column] == json_ontology.table[column]).all()


def test_read_ontology_errors(tmp_path: Path) -> None:
    """Missing file, unknown suffix, CSV lacking columns and broken JSON: errors name the file."""
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_ontology(tmp_path / "nope.json")
    odd = tmp_path / "tree.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match="tree.txt"):
        read_ontology(odd)
    bad = tmp_path / "tree.csv"
    bad.write_text("id,name\n997,root\n")
    with pytest.raises(ValueError, match=r"tree\.csv.*acronym"):
        read_ontology(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        read_ontology(broken)


def test_read_ontology_broken_parent_chain(tmp_path: Path) -> None:
    """A parent id that is not in the table is reported with the structure."""
    path = tmp_path / "tree.csv"
    path.write_text(
        "id,acronym,name,parent_structure_id,color_hex_triplet\n"
        "997,root,root,,FFFFFF\n8,grey,grey,997,BFDAE3\n567,CH,Cerebrum,4242,B0F0FF\n"
    )
    with pytest.raises(ValueError, match="567"):
        read_ontology(path)


def test_read_ontology_csv_without_colour_column(tmp_path: Path) -> None:
    """A structure-tree CSV without the optional colour column still gives every structure."""
    path = tmp_path / "tree.csv"
    path.write_text(
        "id,acronym,name,parent_structure_id,structure_id_path\n"
        "997,root,root,,/997/\n8,grey,Basic cell groups,997,/997/8/\n567,CH,Cerebrum,8,/997/8/567/\n"
    )
    ontology = read_ontology(path)
    assert len(ontology) == 3
    assert ontology.table.loc[567, "path"] == (997, 8, 567)
    assert ontology.table.loc[8, "name"] == "Basic cell groups"
    assert ontology.id_of("CH") == 567
    assert (ontology.table["color"] == "").all()


# --- region look-up ------------------------------------------------------------------------


def _boundaries(ann: np.ndarray, axis: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Voxels v inside the brain whose label differs from the next voxel along ``axis``."""
    step = [0, 0, 0]
    step[axis] = 1
    a = ann[1:-1, 1:-1, 1:-1]
    b = ann[tuple(slice(1 + s, ann.shape[d] - 1 + s) for d, s in enumerate(step))]
    idx = np.argwhere((a != b) & (a != 0) & (b != 0)) + 1
    return idx[rng.choice(len(idx), n, replace=False)]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_region_ids_follow_quicknii_voxel_convention(
    atlas25: Atlas, raw25: np.ndarray, axis: int
) -> None:
    """ap = ceil(ap_um/25), dv = ceil(dv_um/25), ml = floor(ml_um/25): checked at label borders.

    At a voxel v whose label differs from v+1 along the axis, points just on either side of the
    voxel edge must get the two different labels.
    """
    rng = np.random.default_rng(axis)
    voxels = _boundaries(raw25, axis, 25, rng)
    r = 25.0
    # a point well inside each voxel: ap/dv cover ((i-1)·r, i·r], ml covers [k·r, (k+1)·r)
    centre = np.stack(
        [voxels[:, 0] * r - 12.5, voxels[:, 1] * r - 12.5, voxels[:, 2] * r + 12.5], axis=1
    )
    if axis < 2:
        last_in = voxels[:, axis] * r  # ceil: the top edge belongs to voxel i
        first_next = last_in + 1.0
    else:
        last_in = (voxels[:, axis] + 1) * r - 1.0  # floor: the right edge belongs to voxel k+1
        first_next = (voxels[:, axis] + 1) * r
    inside, beyond = centre.copy(), centre.copy()
    inside[:, axis] = last_in
    beyond[:, axis] = first_next
    nxt = voxels.copy()
    nxt[:, axis] += 1
    own = raw25[tuple(voxels.T)]
    other = raw25[tuple(nxt.T)]
    assert np.all(own != other)
    assert np.array_equal(atlas25.region_ids(centre), own)
    assert np.array_equal(atlas25.region_ids(inside), own)
    assert np.array_equal(atlas25.region_ids(beyond), other)


def test_voxel_index_matches_anchoring_atlas_index(atlas25: Atlas) -> None:
    """Atlas.voxel_index agrees with anchoring.atlas_index (floor in QuickNII space)."""
    rng = np.random.default_rng(3)
    ccf = rng.uniform([100, 100, 100], [13000, 7900, 11300], (500, 3))
    idx, inside = atlas25.voxel_index(ccf)
    assert inside.all()
    assert np.array_equal(idx, atlas_index(ccf_to_quicknii(ccf)))


@pytest.mark.filterwarnings("error")
def test_region_ids_known_structure_and_outside(atlas25: Atlas, raw25: np.ndarray) -> None:
    """A single point gets the id stored at its voxel; points off the volume or NaN give 0."""
    i, j, k = 293, 100, 150
    assert raw25[i, j, k] != 0
    got = atlas25.region_ids(np.array([i * 25.0 - 5, j * 25.0 - 5, k * 25.0 + 5]))
    assert got.tolist() == [raw25[i, j, k]]
    outside = np.array(
        [
            [-30.0, 4000.0, 5000.0],  # anterior of the volume
            [13230.0, 4000.0, 5000.0],  # posterior
            [6000.0, -40.0, 5000.0],  # above
            [6000.0, 4000.0, 11400.0],  # ml index 456: right of the volume
            [6000.0, 4000.0, -1.0],  # left
            [np.nan, 4000.0, 5000.0],
        ]
    )
    assert atlas25.region_ids(outside).tolist() == [0] * len(outside)
    assert atlas25.region_ids(outside).dtype == np.int64


def test_region_ids_of_nan_points_do_not_warn(atlas25: Atlas) -> None:
    """Unmapped (NaN) points give region 0 without a RuntimeWarning about invalid casts."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = atlas25.region_ids(np.array([[np.nan, np.nan, np.nan], [6000.0, 4000.0, 5000.0]]))
    assert got[0] == 0
    assert got[1] != 0


def test_voxel_index_of_non_finite_and_huge_points(atlas25: Atlas) -> None:
    """NaN, ±inf and absurdly large coordinates are outside, quietly; -1 marks non-finite."""
    points = np.array(
        [
            [np.nan, 4000.0, 5000.0],
            [6000.0, np.inf, 5000.0],
            [6000.0, 4000.0, -np.inf],
            [1e300, 4000.0, 5000.0],
            [6000.0, -1e300, 5000.0],
            [6000.0, 4000.0, 5000.0],
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx, inside = atlas25.voxel_index(points)
        ids = atlas25.region_ids(points)
    assert inside.tolist() == [False] * 5 + [True]
    assert (idx[:3] == -1).all()
    assert idx[5].tolist() == [240, 160, 200]
    assert ids[:5].tolist() == [0] * 5 and ids[5] != 0


def test_hemisphere(atlas25: Atlas) -> None:
    """Left of ML 5700 µm is 'left', from the midline on 'right'."""
    pts = np.array([[5000, 3000, 100.0], [5000, 3000, 5699.0], [5000, 3000, 5700.0], [0, 0, 11000]])
    assert atlas25.hemisphere(pts).tolist() == ["left", "left", "right", "right"]


def test_compact_labels_round_trip(atlas25: Atlas, raw25: np.ndarray) -> None:
    """Compact labels are small int32 that survive float32 and map back to the Allen ids."""
    crop = np.ascontiguousarray(raw25[280:300])
    assert crop.max() > 2**24  # ids float32 cannot hold exactly: why compact labels exist
    small = Atlas(crop, np.zeros(crop.shape, np.float32), 25.0, atlas25.ontology)
    compact, ids = small.compact_labels()
    assert compact.dtype == np.int32
    assert compact.shape == crop.shape
    assert np.all(np.diff(ids.astype(np.int64)) > 0)
    assert set(ids.tolist()) == set(np.unique(crop).tolist())
    assert compact.min() == 0 and compact.max() == len(ids) - 1
    assert np.array_equal(ids[compact], crop)
    assert np.array_equal(ids[compact.astype(np.float32).astype(np.int64)], crop)
    assert small.compact_labels()[0] is compact  # cached


def test_plane_image(atlas25: Atlas, raw25: np.ndarray) -> None:
    """plane_image samples annotation ids (h, w) on a grid of CCF points; bad kind raises."""
    grid = np.zeros((2, 3, 3))
    grid[..., 0] = 293 * 25.0
    grid[..., 1] = (100 + np.arange(2))[:, None] * 25.0
    grid[..., 2] = (150 + np.arange(3))[None, :] * 25.0
    labels = atlas25.plane_image(grid, kind="annotation")
    assert labels.shape == (2, 3)
    assert np.array_equal(labels, raw25[293, 100:102, 150:153])
    assert atlas25.plane_image(grid).shape == (2, 3)
    with pytest.raises(ValueError, match="kind"):
        atlas25.plane_image(grid, kind="nope")


# --- errors --------------------------------------------------------------------------------


def test_load_atlas_missing_directory(tmp_path: Path) -> None:
    """A missing directory raises FileNotFoundError naming it."""
    missing = tmp_path / "no-such-atlas"
    with pytest.raises(FileNotFoundError, match="no-such-atlas"):
        load_atlas(missing)


def test_load_atlas_wrong_resolution(atlas_dir: Path) -> None:
    """A resolution without its file names the missing file and what is present."""
    with pytest.raises(FileNotFoundError) as err:
        load_atlas(atlas_dir, resolution_um=10)
    assert str(atlas_dir / "annotation_10.nrrd") in str(err.value)
    assert "annotation_25.nrrd" in str(err.value)
    with pytest.raises(ValueError, match="30"):
        load_atlas(atlas_dir, resolution_um=30)


def test_load_atlas_wrong_shape_nrrd(tmp_path: Path, shared_data: Path) -> None:
    """An annotation that is not on the CCF grid is rejected, naming the file and its shape."""
    directory = _link(tmp_path / "atlas", shared_data / "ccf" / "structures.json")
    path = directory / "annotation_100.nrrd"
    nrrd.write(str(path), np.zeros((4, 5, 6), dtype=np.uint32))
    with pytest.raises(ValueError) as err:
        load_atlas(directory, resolution_um=100)
    assert str(path) in str(err.value)
    assert "(4, 5, 6)" in str(err.value)
    # the right shape in the wrong axis order is rejected too
    nrrd.write(str(path), np.zeros(SHAPE_100[::-1], dtype=np.uint32))
    with pytest.raises(ValueError, match="annotation_100.nrrd"):
        load_atlas(directory, resolution_um=100)


def test_load_atlas_corrupt_nrrd_and_missing_ontology(tmp_path: Path) -> None:
    """A corrupt NRRD and a directory without ontology give errors naming the path."""
    directory = tmp_path / "atlas"
    directory.mkdir()
    path = directory / "annotation_100.nrrd"
    path.write_bytes(b"this is not an nrrd file\n")
    with pytest.raises(ValueError, match="annotation_100.nrrd"):
        load_atlas(directory, resolution_um=100)
    nrrd.write(str(path), np.zeros(SHAPE_100, dtype=np.uint32))
    with pytest.raises(FileNotFoundError) as err:
        load_atlas(directory, resolution_um=100)
    assert str(directory) in str(err.value)
    assert "structures.json" in str(err.value)
