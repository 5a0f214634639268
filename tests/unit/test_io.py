"""Tests of cellmap2d.io: the manifest CSV, OME-Zarr writing/reading, level coordinates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cellmap2d.io import (
    BrainSpec,
    from_level0,
    open_brain,
    parse_sections,
    read_manifest,
    to_level0,
    write_ome_zarr,
)

HEADER = "brain_id,path,signal_channel,autofluorescence_channel,section_spacing_um"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- manifest ------------------------------------------------------------------------------


def test_read_manifest_resolves_paths_and_keeps_ids_as_strings(tmp_path: Path) -> None:
    """Relative paths resolve against the manifest folder; ids like 0012 stay strings."""
    manifest = _write(
        tmp_path / "cohort" / "manifest.csv",
        f"{HEADER}\n"
        "0012,brains/a.ome.zarr,0,1,100\n"
        f"13,{tmp_path / 'elsewhere' / 'b.zarr'},1,0,50.5\n"
        "x-3,s3://bucket/key/c.zarr,0,1,100\n",
    )
    specs = read_manifest(manifest)
    assert [s.brain_id for s in specs] == ["0012", "13", "x-3"]
    assert all(isinstance(s.brain_id, str) for s in specs)
    assert specs[0].path == str((tmp_path / "cohort" / "brains" / "a.ome.zarr").resolve())
    assert specs[1].path == str(tmp_path / "elsewhere" / "b.zarr")
    assert specs[2].path == "s3://bucket/key/c.zarr"
    assert (specs[1].signal_channel, specs[1].autofluorescence_channel) == (1, 0)
    assert specs[1].section_spacing_um == 50.5
    assert specs[0] == BrainSpec(
        "0012", specs[0].path, 0, 1, 100.0, pixel_size_um=None, level=None, sections=None
    )


def test_read_manifest_optional_columns(tmp_path: Path) -> None:
    """pixel_size_um, level and sections are read when present; blanks give None."""
    manifest = _write(
        tmp_path / "manifest.csv",
        f"{HEADER},pixel_size_um,level,sections\n"
        'A,a.zarr,0,1,100,0.35,2,"10-12,15"\n'
        "B,b.zarr,1,0,100,,,\n",
    )
    a, b = read_manifest(manifest)
    assert a.pixel_size_um == 0.35
    assert a.level == 2 and isinstance(a.level, int)
    assert a.sections == (10, 11, 12, 15)
    assert (b.pixel_size_um, b.level, b.sections) == (None, None, None)


def test_read_manifest_missing_column(tmp_path: Path) -> None:
    """A missing required column raises ValueError naming the file and the column."""
    manifest = _write(
        tmp_path / "bad.csv",
        "brain_id,path,signal_channel,section_spacing_um\nA,a.zarr,0,100\n",
    )
    with pytest.raises(ValueError) as err:
        read_manifest(manifest)
    assert str(manifest) in str(err.value)
    assert "autofluorescence_channel" in str(err.value)


def test_read_manifest_duplicate_ids(tmp_path: Path) -> None:
    """Duplicate brain ids raise ValueError naming the file and the id."""
    manifest = _write(
        tmp_path / "dup.csv", f"{HEADER}\n0012,a.zarr,0,1,100\n7,b.zarr,0,1,100\n0012,c,0,1,100\n"
    )
    with pytest.raises(ValueError) as err:
        read_manifest(manifest)
    assert str(manifest) in str(err.value)
    assert "0012" in str(err.value)


@pytest.mark.parametrize(
    ("row", "what"),
    [
        ("B,b.zarr,red,1,100", "red"),
        ("B,b.zarr,0,1,-5", "section_spacing_um"),
        ("B,b.zarr,0,1,100,,,5-3", "backwards"),
        ("B,b.zarr,0,1,100,,,ten", "ten"),
    ],
)
def test_read_manifest_bad_row_names_line_and_brain(tmp_path: Path, row: str, what: str) -> None:
    """A bad value raises ValueError naming the file, the line (header = 1) and the brain."""
    manifest = _write(
        tmp_path / "m.csv",
        f"{HEADER},pixel_size_um,level,sections\nA,a.zarr,0,1,100,,,\n{row}\n",
    )
    with pytest.raises(ValueError) as err:
        read_manifest(manifest)
    message = str(err.value)
    assert str(manifest) in message
    assert "line 3" in message
    assert "brain B" in message
    assert what in message


def test_read_manifest_missing_file(tmp_path: Path) -> None:
    """A missing manifest raises FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_manifest(tmp_path / "nope.csv")


def test_read_manifest_empty_brain_id(tmp_path: Path) -> None:
    """An empty brain_id is an error naming the line, not a brain called 'nan'."""
    manifest = _write(tmp_path / "m.csv", f"{HEADER}\nA,a.zarr,0,1,100\n,b.zarr,0,1,100\n")
    with pytest.raises(ValueError, match="line 3") as err:
        read_manifest(manifest)
    assert str(manifest) in str(err.value)
    assert "brain_id" in str(err.value)
    assert "nan" not in str(err.value)


@pytest.mark.parametrize(
    ("row", "column"),
    [
        ("B,,0,1,100", "path"),
        ("B,  ,0,1,100", "path"),
        ("  ,b.zarr,0,1,100", "brain_id"),
        ("B,b.zarr,,1,100", "signal_channel"),
        ("B,b.zarr,0,1,", "section_spacing_um"),
    ],
)
def test_read_manifest_empty_required_value(tmp_path: Path, row: str, column: str) -> None:
    """An empty required value is an error naming the file, the line and the column."""
    manifest = _write(tmp_path / "m.csv", f"{HEADER}\nA,a.zarr,0,1,100\n{row}\n")
    with pytest.raises(ValueError) as err:
        read_manifest(manifest)
    message = str(err.value)
    assert str(manifest) in message
    assert "line 3" in message
    assert repr(column) in message


def test_read_manifest_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    """Blank lines are skipped but still counted, so errors name the real file line."""
    manifest = _write(tmp_path / "m.csv", f"{HEADER}\nA,a.zarr,0,1,100\n\n\nB,b.zarr,red,1,100\n")
    with pytest.raises(ValueError, match=r"line 5 \(brain B\)"):
        read_manifest(manifest)
    _write(manifest, f"{HEADER}\n\nA,a.zarr,0,1,100\n\nB,b.zarr,1,0,100\n\n")
    assert [s.brain_id for s in read_manifest(manifest)] == ["A", "B"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10-12,15", (10, 11, 12, 15)),
        ("10-120", tuple(range(10, 121))),
        (" 5 , 1-3 ;3", (1, 2, 3, 5)),
        ("7", (7,)),
        ("", None),
        ("  ", None),
        (None, None),
        (float("nan"), None),
    ],
)
def test_parse_sections(text, expected) -> None:
    """Inclusive ranges and lists, sorted and de-duplicated; blanks mean all sections."""
    assert parse_sections(text) == expected


@pytest.mark.parametrize("text", ["12-10", "a-b", "x", "1-", "2.5", "+3"])
def test_parse_sections_errors(text: str) -> None:
    """Backwards ranges and non-numbers raise ValueError naming the part."""
    with pytest.raises(ValueError, match=text.replace("+", r"\+")):
        parse_sections(text)


@pytest.mark.parametrize("text", ["-5", "1,-5", "3--1", "-2-4"])
def test_parse_sections_rejects_negative_indices(text: str) -> None:
    """Section indices are ≥ 0: a negative index is a clear error, not section -5."""
    with pytest.raises(ValueError, match="≥ 0"):
        parse_sections(text)


# --- OME-Zarr ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """(c, z, y, x) = (2, 3, 64, 96) uint16 with random values."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 4000, (2, 3, 64, 96)).astype(np.uint16)


@pytest.fixture(scope="module")
def zarr_path(volume: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("io") / "brain.ome.zarr"
    write_ome_zarr(
        path,
        volume,
        pixel_size_um=0.5,
        section_spacing_um=100.0,
        n_levels=3,
        chunk=32,
        channel_names=("signal", "autofluorescence"),
    )
    return path


def test_ome_zarr_round_trip(volume: np.ndarray, zarr_path: Path) -> None:
    """open_brain reads back the written volume: shapes, pixel sizes doubling per level, values."""
    brain = open_brain(zarr_path, brain_id="0012")
    assert brain.brain_id == "0012"
    assert (brain.n_channels, brain.n_sections) == (2, 3)
    assert brain.shape == (64, 96)
    assert [tuple(a.shape) for a in brain.arrays] == [
        (2, 3, 64, 96),
        (2, 3, 32, 48),
        (2, 3, 16, 24),
    ]
    assert brain.pixel_size_um == pytest.approx([0.5, 1.0, 2.0])
    assert [brain.downsampling(level) for level in range(3)] == [1.0, 2.0, 4.0]
    for z in range(3):
        for c in range(2):
            got = brain.section(z, c)
            assert got.dtype == np.uint16
            assert np.array_equal(got, volume[c, z])


def test_ome_zarr_levels_are_block_means(volume: np.ndarray, zarr_path: Path) -> None:
    """Level 1 pixel (i, j) is the mean of level-0 pixels [2i, 2i+2) × [2j, 2j+2) (to ±1)."""
    brain = open_brain(zarr_path)
    level1 = brain.section(2, 1, level=1).astype(np.float64)
    means = volume[1, 2].astype(np.float64).reshape(32, 2, 48, 2).mean(axis=(1, 3))
    assert level1.shape == (32, 48)
    assert np.abs(level1 - means).max() <= 1.0
    level2 = brain.section(2, 1, level=2).astype(np.float64)
    means2 = volume[1, 2].astype(np.float64).reshape(16, 4, 24, 4).mean(axis=(1, 3))
    assert np.abs(level2 - means2).max() <= 2.0


def test_ome_zarr_ngff_metadata(zarr_path: Path) -> None:
    """The written metadata is NGFF 0.4: axes c, z, y, x; µm units; scales per level."""
    attrs = json.loads((zarr_path / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["axes"][0]["type"] == "channel"
    assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in ms["axes"][1:])
    scales = [
        next(t["scale"] for t in d["coordinateTransformations"] if t["type"] == "scale")
        for d in ms["datasets"]
    ]
    assert scales == [
        [1.0, 100.0, 0.5, 0.5],
        [1.0, 100.0, 1.0, 1.0],
        [1.0, 100.0, 2.0, 2.0],
    ]
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["signal", "autofluorescence"]


def test_level_for(zarr_path: Path) -> None:
    """level_for picks the coarsest level whose pixels are no larger than asked (else level 0)."""
    brain = open_brain(zarr_path)
    assert brain.level_for(0.5) == 0
    assert brain.level_for(1.0) == 1
    assert brain.level_for(1.9) == 1
    assert brain.level_for(2.0) == 2
    assert brain.level_for(50.0) == 2
    assert brain.level_for(0.1) == 0


def test_open_brain_missing_and_not_ome_zarr(tmp_path: Path) -> None:
    """Missing paths, plain folders and zarr groups without multiscales are reported by brain."""
    import zarr

    with pytest.raises(FileNotFoundError, match=r"brain B1 .*missing\.zarr"):
        open_brain(tmp_path / "missing.zarr", brain_id="B1")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="brain B2"):
        open_brain(folder, brain_id="B2")
    plain = tmp_path / "plain.zarr"
    group = zarr.open_group(str(plain), mode="w", zarr_format=2)
    group.create_array("a", shape=(2, 2), dtype="u1")
    with pytest.raises(ValueError, match=r"brain B3 .*multiscales"):
        open_brain(plain, brain_id="B3")


def test_open_brain_bad_indices_name_the_brain(zarr_path: Path) -> None:
    """Out-of-range section, channel or level raise IndexError naming the brain."""
    brain = open_brain(zarr_path, brain_id="0012")
    with pytest.raises(IndexError, match=r"brain 0012.*section 3"):
        brain.section(3, 0)
    with pytest.raises(IndexError, match=r"brain 0012.*section -1"):
        brain.section(-1, 0)
    with pytest.raises(IndexError, match=r"brain 0012.*channel 2"):
        brain.section(0, 2)
    with pytest.raises(IndexError, match=r"brain 0012.*level 3"):
        brain.section(0, 0, level=3)


def _copy_with_attrs(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    attrs = json.loads((dst / ".zattrs").read_text())
    edit(attrs["multiscales"][0])
    (dst / ".zattrs").write_text(json.dumps(attrs))
    return dst


def test_open_brain_without_scales_uses_manifest_pixel_size(
    zarr_path: Path, tmp_path: Path
) -> None:
    """Without µm scales, pixel_size_um (level 0) is required and scaled by level shape."""

    def drop_scales(ms: dict) -> None:
        for d in ms["datasets"]:
            d["coordinateTransformations"] = []

    path = _copy_with_attrs(zarr_path, tmp_path / "noscale.zarr", drop_scales)
    with pytest.raises(ValueError, match="pixel_size_um"):
        open_brain(path, brain_id="B")
    brain = open_brain(path, brain_id="B", pixel_size_um=0.35)
    assert brain.pixel_size_um == pytest.approx([0.35, 0.7, 1.4])


def test_open_brain_converts_units_and_checks_axes(zarr_path: Path, tmp_path: Path) -> None:
    """Nanometre scales are converted to µm; axes other than c, z, y, x are rejected."""

    def nanometres(ms: dict) -> None:
        for a in ms["axes"][1:]:
            a["unit"] = "nanometer"
        for d in ms["datasets"]:
            for t in d["coordinateTransformations"]:
                t["scale"] = [s * 1000 if i else s for i, s in enumerate(t["scale"])]

    brain = open_brain(_copy_with_attrs(zarr_path, tmp_path / "nm.zarr", nanometres))
    assert brain.pixel_size_um == pytest.approx([0.5, 1.0, 2.0])

    def swap_axes(ms: dict) -> None:
        ms["axes"] = [ms["axes"][i] for i in (1, 0, 2, 3)]

    with pytest.raises(ValueError, match="axes"):
        open_brain(_copy_with_attrs(zarr_path, tmp_path / "zc.zarr", swap_axes), brain_id="B")


# --- level coordinates ---------------------------------------------------------------------


def test_level_coordinates_pixel_centre_convention() -> None:
    """Level pixel i covers level-0 [i·f, (i+1)·f): its centre is at (i + 0.5)·f − 0.5."""
    assert to_level0(0.0, 2) == pytest.approx(0.5)
    assert to_level0(0.0, 4) == pytest.approx(1.5)
    assert to_level0(3.0, 2) == pytest.approx(6.5)
    assert to_level0(-0.5, 2) == pytest.approx(-0.5)  # left edge stays the left edge
    assert from_level0(0.5, 2) == pytest.approx(0.0)
    assert from_level0(-0.5, 8) == pytest.approx(-0.5)
    assert to_level0(5.0, 1) == pytest.approx(5.0)


def test_level_coordinates_are_inverse() -> None:
    """from_level0 undoes to_level0 for arrays of points and any factor."""
    rng = np.random.default_rng(1)
    pts = rng.uniform(-10, 500, (50, 2))
    for factor in (1, 2, 4, 8, 2.5):
        back = from_level0(to_level0(pts, factor), factor)
        assert back.shape == pts.shape
        np.testing.assert_allclose(back, pts, atol=1e-9)
        np.testing.assert_allclose(to_level0(from_level0(pts, factor), factor), pts, atol=1e-9)


def test_level_coordinates_locate_a_feature_across_levels(tmp_path: Path) -> None:
    """A bright 4×4 block at level 0 maps to the centre of the matching level-2 pixel."""
    vol = np.zeros((1, 1, 32, 32), dtype=np.uint16)
    vol[0, 0, 8:12, 20:24] = 1000  # level-0 block centre (x, y) = (21.5, 9.5)
    path = tmp_path / "f.ome.zarr"
    write_ome_zarr(path, vol, pixel_size_um=1.0, section_spacing_um=50.0, n_levels=3)
    brain = open_brain(path)
    level2 = brain.section(0, 0, level=2)
    y, x = np.unravel_index(np.argmax(level2), level2.shape)
    assert (x, y) == (5, 2)
    factor = brain.downsampling(2)
    assert to_level0(np.array([x, y]), factor) == pytest.approx([21.5, 9.5])
    assert from_level0(np.array([21.5, 9.5]), factor) == pytest.approx([5.0, 2.0])


def test_downsampling_of_odd_sized_image(tmp_path: Path) -> None:
    """With an odd width the written levels are still exact 2× pyramids (metadata says so)."""
    vol = np.zeros((1, 1, 65, 97), dtype=np.uint16)
    vol[0, 0, 10:12, 90:92] = 1000  # level-1 pixel (45, 5), centre at level 0 (90.5, 10.5)
    path = tmp_path / "odd.ome.zarr"
    write_ome_zarr(path, vol, pixel_size_um=1.0, section_spacing_um=50.0, n_levels=2)
    brain = open_brain(path)
    assert brain.pixel_size_um == pytest.approx([1.0, 2.0])
    level1 = brain.section(0, 0, level=1)
    assert level1[5, 45] == 1000
    assert to_level0(45.0, brain.downsampling(1)) == pytest.approx(90.5)
    assert brain.downsampling(0) == 1.0
    assert brain.downsampling(1) == pytest.approx(2.0)


def test_downsampling_falls_back_to_shape_without_pixel_sizes(zarr_path: Path) -> None:
    """Without usable pixel sizes, downsampling is the level-0 / level width ratio."""
    from dataclasses import replace

    brain = open_brain(zarr_path)
    unknown = replace(brain, pixel_size_um=[float("nan")] * 3)
    assert [unknown.downsampling(level) for level in range(3)] == [1.0, 2.0, 4.0]
    short = replace(brain, pixel_size_um=[0.5])
    assert short.downsampling(2) == 4.0


def test_lower_levels_round_integer_block_means(tmp_path: Path) -> None:
    """Integer levels hold the rounded block mean of level 0 (not truncated), at every level."""
    vol = np.zeros((1, 1, 8, 8), dtype=np.uint16)
    vol[0, 0, :2, :2] = [[1, 2], [2, 2]]  # mean 1.75 → 2 (truncation gives 1)
    vol[0, 0, :2, 2:4] = [[1, 1], [1, 2]]  # mean 1.25 → 1
    vol[0, 0, 4:8, 4:8] = 3
    vol[0, 0, 4, 4] = 0  # 4×4 mean 2.8125 → 3 at level 2; level 1 holds 2.25 → 2, 3, 3, 3
    vol[0, 0, 6:8, 0:2] = 65535
    path = tmp_path / "round.ome.zarr"
    write_ome_zarr(path, vol, pixel_size_um=1.0, section_spacing_um=50.0, n_levels=3)
    brain = open_brain(path)
    level1 = brain.section(0, 0, level=1)
    level2 = brain.section(0, 0, level=2)
    expected1 = np.rint(vol[0, 0].astype(np.float64).reshape(4, 2, 4, 2).mean(axis=(1, 3)))
    expected2 = np.rint(vol[0, 0].astype(np.float64).reshape(2, 4, 2, 4).mean(axis=(1, 3)))
    assert level1.dtype == level2.dtype == np.uint16
    assert np.array_equal(level1, expected1)
    assert np.array_equal(level2, expected2)
    assert level1[0, 0] == 2 and level1[0, 1] == 1 and level1[3, 0] == 65535
    assert level2[1, 1] == 3  # from the exact means, not from the rounded level 1 (2.75 → 3)
    floats = tmp_path / "float.ome.zarr"
    write_ome_zarr(floats, vol.astype(np.float32), pixel_size_um=1.0, section_spacing_um=50.0)
    assert open_brain(floats).section(0, 0, level=1)[0, 0] == pytest.approx(1.75)
