"""The DeepSlice backend: offline checks, QuickNII/DeepSlice-ready images, search seeds.

DeepSlice and TensorFlow are not installed here. Where a test needs "DeepSlice is installed", it
puts a throw-away package named ``DeepSlice`` on ``sys.path``: either one that fails when
imported (the checks must not import it), or, for the glue of :func:`run_deepslice`, a fake with
DeepSlice 1.2.8's API surface (``DSModel``, ``metadata.metadata_loader.get_data_path``, its
``_s<number>`` parsing and QUINT JSON output). Those tests check cellmap2d's side of the
contract; they are not a run of the real network.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import textwrap
from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from cellmap2d._deepslice import (
    check_deepslice,
    run_deepslice,
    section_image_name,
    series_seed,
    write_section_images,
)
from cellmap2d.anchoring import SectionAnchor, read_quint, write_quint

INSTALL_HINT = 'pip install "cellmap2d[deepslice]"'
MOUSE_WEIGHTS = {
    "xception_weights_tf_dim_ordering_tf_kernels.h5",
    "Allen_Mixed_Best.h5",
    "Synthetic_data_final.hdf5",
}
EBRAINS = "https://data-proxy.ebrains.eu/api/v1/buckets/deepslice/weights/"
# DeepSlice 1.2.8, DeepSlice/coord_post_processing/spacing_and_indexing.py, number_sections():
#     match = re.findall(r"\_s\d+", filename)   # must match exactly once
#     section_numbers.append(int(match[-1][2:]))
DEEPSLICE_SECTION_RE = r"\_s\d+"
CCF_AP_MAX_UM = 527 * 25.0


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def no_deepslice_modules(monkeypatch: pytest.MonkeyPatch):
    """Forget any DeepSlice/tensorflow modules imported during the test."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("DeepSlice", "tensorflow"):
            del sys.modules[name]


def _put_package(site: Path, name: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = site / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def unimportable_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_deepslice_modules):
    """DeepSlice and tensorflow 'installed', but importing either fails loudly."""
    site = tmp_path / "site"
    boom = 'raise RuntimeError("imported before the offline checks")\n'
    _put_package(site, "DeepSlice", {"__init__.py": boom})
    _put_package(site, "tensorflow", {"__init__.py": boom})
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return site


def _hdf5(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        fh["w"] = np.arange(3.0)
    return path


def _mouse_weights(folder: Path) -> Path:
    for name in MOUSE_WEIGHTS:
        _hdf5(folder / name)
    return folder


# ----------------------------------------------------------------------- missing package


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "DeepSlice", None)  # as if not installed
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        check_deepslice(_mouse_weights(tmp_path / "w"))
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        run_deepslice(tmp_path / "no-images", weights_dir=tmp_path / "w")


def test_missing_tensorflow_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unimportable_install: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match="TensorFlow") as err:
        check_deepslice(_mouse_weights(tmp_path / "w"))
    assert INSTALL_HINT in str(err.value)


# ----------------------------------------------------------------------- missing weights


def test_missing_weights_list_files_urls_and_folder(
    tmp_path: Path, unimportable_install: Path
) -> None:
    weights = tmp_path / "my weights"
    weights.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        check_deepslice(weights)
    message = str(err.value)
    for name in MOUSE_WEIGHTS:
        assert name in message
        assert EBRAINS + name in message
    assert str(weights.resolve()) in message
    assert "DeepSlice" not in sys.modules and "tensorflow" not in sys.modules


def test_weights_check_names_only_the_bad_files(tmp_path: Path, unimportable_install: Path) -> None:
    weights = tmp_path / "w"
    _hdf5(weights / "xception_weights_tf_dim_ordering_tf_kernels.h5")
    (weights / "Allen_Mixed_Best.h5").write_text("<html>502 Bad Gateway</html>")
    with pytest.raises(FileNotFoundError) as err:
        check_deepslice(weights)
    lines = str(err.value).splitlines()
    assert any("Allen_Mixed_Best.h5 is not an HDF5" in line for line in lines)
    assert any("Synthetic_data_final.hdf5 (missing)" in line for line in lines)
    assert not any("xception_weights" in line for line in lines)


def test_complete_weights_pass_without_importing(
    tmp_path: Path, unimportable_install: Path
) -> None:
    weights = _mouse_weights(tmp_path / "w")
    found = check_deepslice(weights)
    assert found == {
        "xception_imagenet": weights / "xception_weights_tf_dim_ordering_tf_kernels.h5",
        "primary": weights / "Allen_Mixed_Best.h5",
        "secondary": weights / "Synthetic_data_final.hdf5",
    }
    assert "DeepSlice" not in sys.modules


def test_installed_config_decides_which_weights(tmp_path: Path, unimportable_install: Path) -> None:
    config = {
        "weight_file_paths": {
            "mouse": {
                "primary": {"path": "weights/new_primary.h5", "url": "https://x.test/p.h5"},
                "secondary": {"path": "weights/new_secondary.h5", "url": "https://x.test/s.h5"},
            },
            "xception_imagenet": {"path": "weights/xc.h5", "url": "https://x.test/xc.h5"},
        }
    }
    meta = unimportable_install / "DeepSlice" / "metadata"
    meta.mkdir()
    (meta / "config.json").write_text(json.dumps(config))
    weights = _mouse_weights(tmp_path / "w")  # the 1.2.8 names: not what this version wants
    with pytest.raises(FileNotFoundError) as err:
        check_deepslice(weights)
    for name, url in [("new_primary.h5", "p.h5"), ("new_secondary.h5", "s.h5"), ("xc.h5", "xc.h5")]:
        assert f"{name} (missing): download https://x.test/{url}" in str(err.value)


# ------------------------------------------------------------------------ section images


@pytest.mark.parametrize("brain_id", ["GLTa", "641_2002", "brain.7 b", "mouse_s12", "M_S3"])
def test_names_follow_quint_and_deepslice_rules(brain_id: str) -> None:
    names = {z: section_image_name(brain_id, z) for z in (0, 7, 123, 4567, 12345)}
    assert len(set(names.values())) == len(names)
    for z, name in names.items():
        assert name.endswith(".png")
        stem = name[: -len(".png")]
        assert "." not in stem and " " not in stem  # QUINT: no periods or spaces
        assert stem.lower().count("_s") == 1  # Nutil: no other "_s"
        found = re.findall(DEEPSLICE_SECTION_RE, name)
        assert len(found) == 1 and int(found[-1][2:]) == z
    assert section_image_name("GLTa", 42) == "GLTa_s0042.png"


def test_negative_or_fractional_section_is_rejected() -> None:
    with pytest.raises(ValueError, match="brain b1"):
        section_image_name("b1", -1)
    with pytest.raises(ValueError, match="brain b1"):
        section_image_name("b1", 2.5)


def test_png_round_trip_names_size_and_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = {z: rng.uniform(0, 4000, size=(40 + z, 70)).astype(np.uint16) for z in (2, 5, 11)}
    paths = write_section_images(images, tmp_path / "png", brain_id="B.1")
    assert sorted(paths) == [2, 5, 11]
    for z, path in paths.items():
        assert path.name == section_image_name("B.1", z) == f"B-1_s{z:04d}.png"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB"  # 24-bit, as QuickNII wants
            assert im.size == (70, 40 + z)
        rgb = iio.imread(path)
        assert rgb.dtype == np.uint8
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    # the section number as QuickNII/Nutil/read_quint read it from the slice filename
    slices = [
        SectionAnchor(filename=p.name, nr=z, width=70, height=40 + z, anchoring=np.eye(3).ravel())
        for z, p in paths.items()
    ]
    write_quint(tmp_path / "png" / "anchoring.json", slices)
    doc = json.loads((tmp_path / "png" / "anchoring.json").read_text())
    for raw in doc["slices"]:
        assert (tmp_path / "png" / raw["filename"]).is_file()
        del raw["nr"]
    (tmp_path / "png" / "no_nr.json").write_text(json.dumps(doc))
    assert [a.nr for a in read_quint(tmp_path / "png" / "no_nr.json")] == [2, 5, 11]


def test_contrast_stretch_ignores_hot_and_cold_outliers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(100.0, 200.0, size=(60, 80))
    hot = rng.choice(image.size, 20, replace=False)
    image.flat[hot[:10]] = 1e6  # 0.2 % of pixels each side: below the percentiles
    image.flat[hot[10:]] = -1e6
    out = iio.imread(write_section_images({3: image}, tmp_path, brain_id="b")[3])[..., 0]
    assert np.all(out.flat[hot[:10]] == 255) and np.all(out.flat[hot[10:]] == 0)
    tissue = np.ones(image.size, dtype=bool)
    tissue[hot] = False
    values, grey = image.ravel()[tissue], out.ravel()[tissue].astype(float)
    # a min-max stretch would put all of these near 127
    assert grey.min() <= 5 and grey.max() >= 250
    assert np.corrcoef(values, grey)[0, 1] > 0.999
    order = np.argsort(values)
    assert np.all(np.diff(grey[order]) >= 0)


def test_invert_nan_and_flat_images(tmp_path: Path) -> None:
    image = np.linspace(0.0, 1.0, 500).reshape(20, 25)
    image[0, 0] = np.nan
    plain = iio.imread(write_section_images({1: image}, tmp_path / "a", brain_id="b")[1])[..., 0]
    inverted = iio.imread(
        write_section_images({1: image}, tmp_path / "b", brain_id="b", invert=True)[1]
    )[..., 0]
    assert plain[0, 0] == 0 and inverted[0, 0] == 255  # non-finite: background
    assert np.abs(plain[1:].astype(int) + inverted[1:].astype(int) - 255).max() <= 1
    assert plain[-1, -1] == 255 and inverted[-1, -1] == 0
    flat = iio.imread(write_section_images({2: np.full((5, 6), 7.0)}, tmp_path, brain_id="b")[2])
    assert flat.shape == (5, 6, 3) and not flat.any()


def test_max_side_downscales_and_bad_images_name_the_section(tmp_path: Path) -> None:
    path = write_section_images({4: np.ones((300, 500))}, tmp_path, brain_id="b7", max_side=100)[4]
    assert iio.imread(path).shape == (60, 100, 3)
    with pytest.raises(ValueError, match=r"brain b7, section 9 \(b7_s0009\.png\).*2-D"):
        write_section_images({9: np.zeros((4, 4, 3))}, tmp_path, brain_id="b7")
    with pytest.raises(ValueError, match=r"section 9 .*16-megapixel.*max_side"):
        write_section_images({9: np.zeros((4001, 4001), np.uint8)}, tmp_path, brain_id="b7")
    with pytest.raises(ValueError, match="no finite"):
        write_section_images({9: np.full((3, 3), np.nan)}, tmp_path, brain_id="b7")


# -------------------------------------------------------------------------- series seeds


def _plane_by_hand(anchoring: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """AP = a + g_ml·ML + g_dv·DV through the corners o, o+u, o+v (QuickNII → CCF µm by hand)."""
    o, u, v = anchoring[0:3], anchoring[3:6], anchoring[6:9]
    corners = np.array([o, o + u, o + v])
    ap = (527.0 - corners[:, 1]) * 25.0
    dv = (319.0 - corners[:, 2]) * 25.0
    ml = corners[:, 0] * 25.0
    a, g_ml, g_dv = np.linalg.solve(np.column_stack([np.ones(3), ml, dv]), ap)
    centre = o + u / 2 + v / 2
    return a, g_ml, g_dv, centre


def test_seed_from_real_deepslice_series(shared_data: Path) -> None:
    series = read_quint(shared_data / "anchoring" / "deepslice_GLTa.json")
    seed = series_seed(series)
    table = seed.sections
    assert list(table["section"]) == sorted(a.nr for a in series)
    assert np.all(np.diff(table["ap_centre_um"]) > 0)  # this series runs anterior → posterior
    assert table["ap_centre_um"].between(0, CCF_AP_MAX_UM).all()
    by_nr = {a.nr: a for a in series}
    for row in table.itertuples():
        a, g_ml, g_dv, centre = _plane_by_hand(by_nr[row.section].anchoring)
        assert row.angle_ml_deg == pytest.approx(np.degrees(np.arctan(g_ml)), abs=1e-9)
        assert row.angle_dv_deg == pytest.approx(np.degrees(np.arctan(g_dv)), abs=1e-9)
        assert row.ap_plane_um == pytest.approx(a + g_ml * 5700.0 + g_dv * 4000.0, abs=1e-6)
        assert row.ap_centre_um == pytest.approx((527.0 - centre[1]) * 25.0, abs=1e-6)
    assert abs(seed.angle_ml_deg) < 10 and abs(seed.angle_dv_deg) < 10
    assert seed.angle_ml_deg == pytest.approx(np.median(table["angle_ml_deg"]))
    # sections are 5 indices ≈ 280 µm apart (35 sections over ~11 mm)
    assert 40 < seed.step_um < 70
    line = seed.a0_um + seed.step_um * table["section"]
    assert np.abs(line - table["ap_plane_um"]).max() < 50
    assert seed.params == {
        "a0_um": seed.a0_um,
        "step_um": seed.step_um,
        "angle_ml_deg": seed.angle_ml_deg,
        "angle_dv_deg": seed.angle_dv_deg,
    }


def _tilted(z: int, ap0: float, ang_ml: float, ang_dv: float, *, mirrored: bool) -> SectionAnchor:
    t_ml, t_dv = np.tan(np.radians([ang_ml, ang_dv]))

    def ccf(ml: float, dv: float) -> np.ndarray:
        return np.array([ap0 + t_ml * (ml - 5700.0) + t_dv * (dv - 4000.0), dv, ml])

    left, right = (10500.0, 900.0) if mirrored else (900.0, 10500.0)
    origin = ccf(left, 500.0)
    return SectionAnchor.from_plane(
        origin,
        ccf(right, 500.0) - origin,
        ccf(left, 7500.0) - origin,
        width=960,
        height=700,
        filename=f"b_s{z:04d}.png",
        nr=z,
    )


def test_seed_recovers_known_planes() -> None:
    zs = [30, 10, 20, 40, 50]
    series = [
        _tilted(z, 3000.0 + 100.0 * z, 3.0, -2.0, mirrored=i % 2 == 1) for i, z in enumerate(zs)
    ]
    seed = series_seed(series)
    assert list(seed.sections["section"]) == sorted(zs)
    assert seed.angle_ml_deg == pytest.approx(3.0, abs=1e-9)
    assert seed.angle_dv_deg == pytest.approx(-2.0, abs=1e-9)
    assert seed.step_um == pytest.approx(100.0, abs=1e-6)
    assert seed.a0_um == pytest.approx(3000.0, abs=1e-6)
    expected = 3000.0 + 100.0 * seed.sections["section"]
    assert np.allclose(seed.sections["ap_plane_um"], expected, atol=1e-6)


def test_seed_rejects_non_coronal_and_empty() -> None:
    sagittal = SectionAnchor.from_plane(
        [500.0, 500.0, 4000.0], [12000.0, 0, 0], [0, 7000.0, 0], width=10, height=10,
        filename="sag_s0001.png", nr=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"sag_s0001\.png.*not a coronal"):
        series_seed([sagittal])
    with pytest.raises(ValueError, match="at least one"):
        series_seed([])


# ------------------------------------------------------------- run_deepslice glue (fake)

FAKE_MAIN = """
import glob, json, os, re
import imageio.v3 as iio
import pandas as pd
from .metadata import metadata_loader


class DSModel:
    def __init__(self, species):
        self.species = species
        self.config, self.metadata_path = metadata_loader.load_config()
        paths = self.config["weight_file_paths"]
        self.loaded = [
            metadata_loader.get_data_path(paths["xception_imagenet"], self.metadata_path),
            metadata_loader.get_data_path(paths[species]["primary"], self.metadata_path),
        ]
        self.calls = []

    def predict(self, image_directory=None, ensemble=None, section_numbers=True):
        paths = self.config["weight_file_paths"][self.species]
        self.loaded.append(metadata_loader.get_data_path(paths["secondary"], self.metadata_path))
        self.calls.append(["predict", ensemble])
        rows = []
        for path in sorted(glob.glob(image_directory + "/*")):
            name = os.path.basename(path)
            nr = int(re.findall(r"\\_s\\d+", name)[-1][2:])
            h, w = iio.imread(path).shape[:2]
            oy = 400.0 + self.config["fake_depth_per_section"] * nr
            rows.append(dict(Filenames=name, ox=450.0, oy=oy, oz=330.0, ux=-450.0, uy=0.0,
                             uz=-10.0, vx=0.0, vy=0.0, vz=-300.0, width=w, height=h, nr=nr))
        self.predictions = pd.DataFrame(rows)

    def propagate_angles(self, method="weighted_mean"):
        self.calls.append(["propagate_angles"])

    def enforce_index_order(self):
        self.calls.append(["enforce_index_order"])

    def enforce_index_spacing(self, section_thickness=None, suppress=False):
        self.calls.append(["enforce_index_spacing", section_thickness])

    def save_predictions(self, filename):
        cols = ["ox", "oy", "oz", "ux", "uy", "uz", "vx", "vy", "vz"]
        slices = [dict(filename=r.Filenames, anchoring=[float(getattr(r, c)) for c in cols],
                       height=int(r.height), width=int(r.width), nr=int(r.nr), markers=[])
                  for r in self.predictions.itertuples()]
        doc = dict(name="", target="ABA_Mouse_CCFv3_2017_25um.cutlas", aligner="fake",
                   slices=slices)
        with open(filename + ".json", "w") as fh:
            json.dump(doc, fh)
        with open(os.path.join(os.environ["FAKE_DEEPSLICE_LOG"]), "w") as fh:
            json.dump(dict(loaded=self.loaded, calls=self.calls), fh)
"""

FAKE_LOADER = """
import json, os
from pathlib import Path


def load_config():
    path = str(Path(__file__).parent) + os.sep
    with open(path + "config.json") as fh:
        return json.load(fh), path


def download_file(url, path):
    raise RuntimeError("download attempted: " + url)


def get_data_path(url_path_dict, path):
    if not os.path.exists(path + url_path_dict["path"]):
        download_file(url_path_dict["url"], path + url_path_dict["path"])
    return path + url_path_dict["path"]
"""


def _fake_deepslice(
    site: Path, monkeypatch: pytest.MonkeyPatch, depth_per_section: float, log: Path
) -> None:
    def entry(name: str) -> dict[str, str]:
        return {"path": f"weights/{name}", "url": EBRAINS + name}

    config = {
        "weight_file_paths": {
            "mouse": {
                "primary": entry("Allen_Mixed_Best.h5"),
                "secondary": entry("Synthetic_data_final.hdf5"),
            },
            "xception_imagenet": entry("xception_weights_tf_dim_ordering_tf_kernels.h5"),
        },
        "fake_depth_per_section": depth_per_section,
    }
    _put_package(
        site,
        "DeepSlice",
        {
            "__init__.py": "from .main import DSModel\n",
            "main.py": FAKE_MAIN,
            "metadata/__init__.py": "",
            "metadata/metadata_loader.py": FAKE_LOADER,
            "metadata/config.json": json.dumps(config),
        },
    )
    _put_package(site, "tensorflow", {"__init__.py": ""})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("FAKE_DEEPSLICE_LOG", str(log))
    importlib.invalidate_caches()


@pytest.mark.parametrize("depth_per_section", [-2.0, 3.0])
def test_run_deepslice_glue_with_fake_package(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_deepslice_modules,
    depth_per_section: float,
) -> None:
    log = tmp_path / "calls.json"
    _fake_deepslice(tmp_path / "site", monkeypatch, depth_per_section, log)
    weights = _mouse_weights(tmp_path / "weights")
    images = {z: np.random.default_rng(z).random((30, 40)) for z in (12, 3, 7)}
    folder = tmp_path / "brains" / "b_s1"  # an "_s<digits>" in the folder must not matter
    write_section_images(images, folder, brain_id="GLT.a")
    shapes = {z: (3000 + z, 4000) for z in images}
    series = run_deepslice(
        folder, weights_dir=weights, section_spacing_um=50.0, brain_id="GLT.a", level0_shapes=shapes
    )
    assert [a.nr for a in series] == [3, 7, 12]
    assert [a.filename for a in series] == [section_image_name("GLT.a", z) for z in (3, 7, 12)]
    assert [(a.height, a.width) for a in series] == [shapes[z] for z in (3, 7, 12)]
    assert series.metadata["name"] == "GLT.a" and series.metadata["aligner"] == "fake"
    record = json.loads(log.read_text())
    assert sorted(Path(p).name for p in record["loaded"]) == sorted(MOUSE_WEIGHTS)
    assert all(Path(p).parent == weights.resolve() for p in record["loaded"])
    signed = 50.0 if depth_per_section > 0 else -50.0  # follows the predicted cutting direction
    assert record["calls"] == [
        ["predict", None],
        ["propagate_angles"],
        ["enforce_index_spacing", signed],
    ]
    loader = importlib.import_module("DeepSlice.metadata.metadata_loader")
    assert loader.get_data_path.__module__ == "DeepSlice.metadata.metadata_loader"  # restored
    out = tmp_path / "anchoring.json"
    write_quint(out, series, metadata=series.metadata)
    again = read_quint(out)
    assert [(a.nr, a.filename, a.width) for a in again] == [
        (a.nr, a.filename, a.width) for a in series
    ]


def test_run_deepslice_without_spacing_and_bad_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_deepslice_modules
) -> None:
    log = tmp_path / "calls.json"
    _fake_deepslice(tmp_path / "site", monkeypatch, 1.0, log)
    weights = _mouse_weights(tmp_path / "weights")
    folder = tmp_path / "imgs"
    write_section_images({1: np.eye(8), 2: np.eye(8)}, folder, brain_id="b", invert=True)
    series = run_deepslice(folder, weights_dir=weights, ensemble=False)
    assert [(a.nr, a.width, a.height) for a in series] == [(1, 8, 8), (2, 8, 8)]
    calls = json.loads(log.read_text())["calls"]
    assert calls == [["predict", False], ["propagate_angles"], ["enforce_index_order"]]
    iio.imwrite(folder / "extra_s1_s2.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"extra_s1_s2\.png.*exactly one _s"):
        run_deepslice(folder, weights_dir=weights)
    with pytest.raises(ValueError, match="only the 'mouse' model"):
        run_deepslice(folder, weights_dir=weights, species="rat")
