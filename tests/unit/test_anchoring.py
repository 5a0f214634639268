from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cellmap2d.anchoring import (
    DEFAULT_METADATA,
    QuintSeries,
    SectionAnchor,
    atlas_index,
    read_quint,
    render_atlas_map,
    write_quint,
)

REAL_JSONS = (
    "deepslice_GLTa.json",
    "quicknii_allen_ish.json",
    "visualign_nonlinear/alignment.json",
)
CCF_BOX_UM = np.array([13200.0, 8000.0, 11400.0])


def _coronal() -> SectionAnchor:
    return SectionAnchor(
        filename="brain_s007.png",
        nr=7,
        width=800,
        height=600,
        anchoring=np.array([10, 400, 300, 400, 0, 0, 0, 0, -300], dtype=float),
    )


def _canonical(path: Path) -> str:
    with open(path, encoding="utf-8") as fh:
        return json.dumps(json.load(fh), sort_keys=True)


def _read_flat(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    bpp = raw[0]
    width = int.from_bytes(raw[1:5], "big")
    height = int.from_bytes(raw[5:9], "big")
    return np.frombuffer(raw[9:], dtype=f">u{bpp}").reshape(height, width)


def _read_label_ids(path: Path) -> np.ndarray:
    ids = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(int(line.split()[0]))
    return np.asarray(ids, dtype=np.int64)


@pytest.fixture(scope="module")
def annotation(shared_data: Path) -> np.ndarray:
    nrrd = pytest.importorskip("nrrd")
    data, _ = nrrd.read(str(shared_data / "ccf" / "annotation_25.nrrd"))
    return data


# --- hand-computed geometry ----------------------------------------------------------------


def test_to_ccf_hand_computed_coronal() -> None:
    anchor = _coronal()
    got = anchor.to_ccf([0, 800, 0, 800, 400], [0, 0, 600, 600, 300], width=800, height=600)
    # q = o + x/800·u + y/600·v; AP = (527 − qy)·25, DV = (319 − qz)·25, ML = qx·25
    expected = np.array(
        [
            [3175.0, 475.0, 250.0],  # q = (10, 400, 300)
            [3175.0, 475.0, 10250.0],  # q = (410, 400, 300)
            [3175.0, 7975.0, 250.0],  # q = (10, 400, 0)
            [3175.0, 7975.0, 10250.0],  # q = (410, 400, 0)
            [3175.0, 4225.0, 5250.0],  # q = (210, 400, 150)
        ]
    )
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert got.dtype == np.float64


def test_to_ccf_scales_from_other_frames_and_scalars() -> None:
    anchor = _coronal()
    thumb = anchor.to_ccf(40, 30, width=80, height=60)
    full = anchor.to_ccf(4000, 3000, width=8000, height=6000)
    assert thumb.shape == (1, 3)
    np.testing.assert_allclose(thumb, [[3175.0, 4225.0, 5250.0]], atol=1e-9)
    np.testing.assert_allclose(full, thumb, atol=1e-9)
    np.testing.assert_allclose(
        anchor.to_quicknii(400, 300, width=800, height=600), [[210.0, 400.0, 150.0]]
    )


def test_oblique_anchor_and_properties() -> None:
    anchor = SectionAnchor(
        filename="x.png",
        nr=1,
        width=800,
        height=600,
        anchoring=[10, 400, 300, 400, 20, 0, 0, 0, -300],
    )
    np.testing.assert_array_equal(anchor.o, [10, 400, 300])
    np.testing.assert_array_equal(anchor.u, [400, 20, 0])
    np.testing.assert_array_equal(anchor.v, [0, 0, -300])
    # bottom-right corner: q = (10 + 400, 400 + 20, 300 − 300) = (410, 420, 0)
    np.testing.assert_allclose(
        anchor.to_ccf(800, 600, width=800, height=600), [[2675.0, 7975.0, 10250.0]], atol=1e-9
    )


def test_normal_and_from_plane() -> None:
    anchor = _coronal()
    # u in CCF = (0, 0, 10000) µm, v = (0, 7500, 0) µm, u × v = (−75e6, 0, 0)
    np.testing.assert_allclose(anchor.normal(), [-1.0, 0.0, 0.0], atol=1e-12)
    rebuilt = SectionAnchor.from_plane(
        (3175.0, 475.0, 250.0),
        (0.0, 0.0, 10000.0),
        (0.0, 7500.0, 0.0),
        width=800,
        height=600,
        filename="brain_s007.png",
        nr=7,
    )
    np.testing.assert_allclose(rebuilt.anchoring, anchor.anchoring, atol=1e-9)


def test_atlas_index_floor_convention() -> None:
    q = np.array([[10.7, 400.2, 300.9], [-0.5, 527.5, 319.5], [455.99, 0.0, 0.0]])
    np.testing.assert_array_equal(
        atlas_index(q), [[527 - 400, 319 - 300, 10], [0, 0, -1], [527, 319, 455]]
    )
    assert atlas_index(np.array([1.5, 2.5, 3.5])).shape == (1, 3)


def test_markers_move_destination_to_source() -> None:
    anchor = _coronal()
    anchor.markers = np.array([[400.0, 300.0, 430.0, 280.0], [200.0, 450.0, 190.0, 470.0]])
    linear = _coronal()
    for x, y, xd, yd in anchor.markers:
        np.testing.assert_allclose(
            anchor.to_ccf(xd, yd, width=800, height=600),
            linear.to_ccf(x, y, width=800, height=600),
            atol=1e-9,
        )
    # the fixed frame points 10 % outside the image corners do not move
    np.testing.assert_allclose(
        anchor.to_ccf(-80, 660, width=800, height=600),
        linear.to_ccf(-80, 660, width=800, height=600),
        atol=1e-9,
    )
    moved = anchor.to_ccf(420, 290, width=800, height=600)
    assert not np.allclose(moved, linear.to_ccf(420, 290, width=800, height=600))


# --- real QUINT files ----------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_JSONS)
def test_real_files_map_into_the_ccf(shared_data: Path, name: str) -> None:
    series = read_quint(shared_data / "anchoring" / name)
    assert isinstance(series, QuintSeries) and len(series) > 0
    assert series.metadata["target"] == "ABA_Mouse_CCFv3_2017_25um.cutlas"
    for anchor in series:
        w, h = anchor.width, anchor.height
        pts = anchor.to_ccf([0, w, 0, w, w / 2], [0, 0, h, h, h / 2], width=w, height=h)
        assert pts.shape == (5, 3) and np.isfinite(pts).all()
        # centre within 0.5 mm of the CCF box (end sections of a series may graze past it)
        assert np.all(pts[4] >= -500) and np.all(pts[4] <= CCF_BOX_UM + 500), anchor.filename
        assert np.all(pts >= -0.5 * CCF_BOX_UM) and np.all(pts <= 1.5 * CCF_BOX_UM)
        assert abs(anchor.normal()[0]) > 0.9  # coronal series


def test_deepslice_series_order_and_spacing(shared_data: Path) -> None:
    series = read_quint(shared_data / "anchoring" / "deepslice_GLTa.json")
    assert len(series) == 35
    nr = np.array([a.nr for a in series])
    ap = np.array(
        [a.to_ccf(a.width / 2, a.height / 2, width=a.width, height=a.height)[0, 0] for a in series]
    )
    order = np.argsort(nr)
    step = np.diff(ap[order])
    direction = np.sign(np.median(step))
    assert np.count_nonzero(np.sign(step) != direction) <= 2
    per_nr = np.abs(step / np.diff(nr[order]))
    assert 10.0 <= np.median(per_nr) <= 100.0  # µm per section number
    assert 0.3 * 13200 <= np.ptp(ap) <= 13200


@pytest.mark.parametrize("name", REAL_JSONS)
def test_lossless_round_trip(shared_data: Path, tmp_path: Path, name: str) -> None:
    src = shared_data / "anchoring" / name
    series = read_quint(src)
    out = tmp_path / "out.json"
    write_quint(out, series)
    assert _canonical(out) == _canonical(src)
    assert read_quint(out) == series


def test_round_trip_keeps_odd_types_and_writes_changes(tmp_path: Path) -> None:
    doc = {
        "name": "odd",
        "target": "ABA_Mouse_CCFv3_2017_25um.cutlas",
        "slices": [
            {
                "filename": "a_s001.png",
                "nr": 1.0,
                "width": "1024",
                "height": 670.0,
                "anchoring": [1, 2, 3, 4, 5, 6, 7, 8, 9],
                "markers": [],
                "note": {"k": [0.1, 2]},
            },
            {
                "filename": "a_s002.png",
                "nr": 2,
                "width": 1024,
                "height": 670,
                "anchoring": [1, 2, 3, 4, 5, 6, 7, 8, 9],
            },
        ],
    }
    src = tmp_path / "odd.json"
    src.write_text(json.dumps(doc), encoding="utf-8")
    series = read_quint(src)
    first = series[0]
    assert (first.nr, first.width, first.height) == (1, 1024, 670)
    assert first.markers is None and first.extra == {"note": {"k": [0.1, 2]}}
    assert first.anchoring.dtype == np.float64
    out = tmp_path / "out.json"
    write_quint(out, series)
    assert _canonical(out) == _canonical(src)

    series[1].anchoring = series[1].anchoring + 0.5
    series[1].markers = np.array([[1.0, 2.0, 3.0, 4.0]])
    write_quint(out, series)
    written = json.loads(out.read_text(encoding="utf-8"))["slices"]
    assert written[0] == doc["slices"][0]
    assert written[1]["anchoring"] == [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5]
    assert written[1]["markers"] == [[1.0, 2.0, 3.0, 4.0]]


def test_write_plain_list_uses_default_metadata(tmp_path: Path) -> None:
    out = tmp_path / "new.json"
    write_quint(out, [_coronal()])
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert {k: v for k, v in doc.items() if k != "slices"} == DEFAULT_METADATA
    assert doc["slices"] == [
        {
            "filename": "brain_s007.png",
            "nr": 7,
            "width": 800,
            "height": 600,
            "anchoring": [10.0, 400.0, 300.0, 400.0, 0.0, 0.0, 0.0, 0.0, -300.0],
        }
    ]
    assert read_quint(out) == [_coronal()]
    with pytest.raises(ValueError, match="no sections"):
        write_quint(tmp_path / "empty.json", [])


# --- VisuAlign nonlinear atlas maps ----------------------------------------------------------


@pytest.mark.parametrize("section", ["s001", "s002", "s003", "s004", "s005"])
def test_render_reproduces_visualign_flat(
    shared_data: Path, annotation: np.ndarray, section: str
) -> None:
    folder = shared_data / "anchoring" / "visualign_nonlinear"
    series = read_quint(folder / "alignment.json")
    anchor = next(a for a in series if a.filename == f"test_{section}.png")
    label_ids = _read_label_ids(folder / "AllenMouseBrain_Atlas_CCF_2017.label")
    expected = label_ids[_read_flat(folder / f"test_{section}_nl.flat")]
    rendered = render_atlas_map(anchor, annotation)
    assert rendered.shape == expected.shape == (321, 457)
    agreement = np.mean(rendered == expected)
    assert agreement >= 0.999, f"{section}: {agreement:.5f} of pixels agree with VisuAlign"
    if anchor.markers is not None:
        assert np.mean(render_atlas_map(anchor, annotation, nonlinear=False) == expected) < 0.9


def test_render_linear_map_matches_formula(shared_data: Path, annotation: np.ndarray) -> None:
    series = read_quint(shared_data / "anchoring" / "deepslice_GLTa.json")
    anchor = series[len(series) // 2]
    linear = render_atlas_map(anchor, annotation, nonlinear=False)
    fh, fw = linear.shape
    assert (fw, fh) == (
        int(np.linalg.norm(anchor.u)) + 1,
        int(np.linalg.norm(anchor.v)) + 1,
    )
    jj, ii = np.mgrid[0:fh, 0:fw]
    q = anchor.o + np.outer(ii.ravel() / fw, anchor.u) + np.outer(jj.ravel() / fh, anchor.v)
    idx = atlas_index(q)
    ok = np.all((idx >= 0) & (idx < annotation.shape), axis=1)
    expected = np.zeros(fw * fh, dtype=annotation.dtype)
    expected[ok] = annotation[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    assert np.mean(linear.ravel() == expected) >= 0.999
    assert np.count_nonzero(linear) > 0.2 * linear.size
    half = render_atlas_map(anchor, annotation, width=fw // 2, height=fh // 2, nonlinear=False)
    assert half.shape == (fh // 2, fw // 2)


# --- bad input -------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "series.json"
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_quint(path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("{not json", r"series\.json is not valid JSON"),
        ('{"name": ""}', r"series\.json has no 'slices'"),
        ('{"slices": [{"filename": "b_s003.png", "nr": 3, "width": 10, "height": 10}]}', None),
        (
            '{"slices": [{"filename": "b_s003.png", "nr": 3, "width": 10, "height": 10, '
            '"anchoring": [1, 2, 3, 4, 5, 6, 7, 8]}]}',
            None,
        ),
    ],
)
def test_bad_files_raise_with_file_and_slice(
    tmp_path: Path, text: str, pattern: str | None
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        read_quint(path)
    message = str(info.value)
    assert str(path) in message
    if pattern is None:
        assert "b_s003.png" in message and "nr=3" in message
        assert "anchoring" in message
    else:
        assert re.search(pattern, message)


def test_bad_width_and_markers(tmp_path: Path) -> None:
    base = {"filename": "c.png", "nr": 1, "anchoring": [1, 2, 3, 4, 5, 6, 7, 8, 9]}
    path = _write(tmp_path, json.dumps({"slices": [{**base, "height": 5}]}))
    with pytest.raises(ValueError, match="'width'"):
        read_quint(path)
    bad = {**base, "width": 5, "height": 5, "markers": [[1, 2, 3]]}
    path = _write(tmp_path, json.dumps({"slices": [bad]}))
    with pytest.raises(ValueError, match="markers"):
        read_quint(path)


# --- series search on a phantom atlas --------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_100():
    from cellmap2d.synthetic import phantom_atlas

    return phantom_atlas(100.0)


def test_moment_placement_varies_smoothly_with_the_plane(phantom_100) -> None:
    """The moment placement of a section follows the cutting angle without jumps.

    The series objective places every section by the moments of its atlas plane's brain area;
    counted on whole canvas points that area jumps as points enter and leave the brain, which
    makes the objective bumpy in the angles (measured: second differences of the placement's
    shift up to 8 µm over 0.02° steps; with partial-volume weights 0.002 µm).
    """
    from cellmap2d._plane_search import _AtlasPlanes, _prepare

    yy, xx = np.mgrid[0:80, 0:110]
    blob = (((xx - 55) / 45.0) ** 2 + ((yy - 40) / 30.0) ** 2 < 1).astype(np.float32) + 0.01
    (section,), pixel = _prepare([blob], [0], 100.0, 100.0)
    planes = _AtlasPlanes(phantom_100, pixel)
    shifts = []
    for angle in np.arange(0.0, 1.0001, 0.02):
        placement = planes.moment_inplane(section, 6000.0, np.tan(np.radians([angle, 0.0])))
        shifts.append(placement[:, 2])
    shifts = np.array(shifts)
    assert np.abs(shifts[-1] - shifts[0]).max() > 5.0  # the placement does follow the angle
    assert np.abs(np.diff(shifts, 2, axis=0)).max() < 0.5  # and smoothly


def test_search_series_recovers_oblique_cutting_angles(phantom_100) -> None:
    """Ten sections cut at ML +3°, DV −2° with in-plane rotations and shifts: the series fit
    finds the angles within 0.3° and every section's AP within 60 µm."""
    from cellmap2d._plane_search import search_series

    rng = np.random.default_rng(5)
    tans = np.tan(np.radians([3.0, -2.0]))
    h, w, pixel = 80, 116, 100.0
    yy, xx = np.mgrid[0:h, 0:w]
    frame = (np.stack([xx, yy], axis=-1) + 0.5) * pixel
    centre = np.array([w, h]) * pixel / 2
    offset = np.array([phantom_100.midline_um - centre[0], 0.0])
    thumbnails, true_ap = [], []
    for z in range(10):
        ap = 2500.0 + 800.0 * z
        theta = np.radians(rng.uniform(-3, 3))
        rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        plane = (frame - centre) @ rotation.T + centre + offset + rng.uniform(-200, 200, 2)
        ml, dv = plane[..., 0], plane[..., 1]
        ccf = np.stack(
            [ap + tans[0] * (ml - phantom_100.midline_um) + tans[1] * (dv - 4000.0), dv, ml], -1
        )
        image = phantom_100.sample_template(ccf.reshape(-1, 3)).reshape(h, w) * 1000
        thumbnails.append((image + rng.normal(100, 20, (h, w))).astype(np.float32))
        true_ap.append(ap)
    fit = search_series(
        thumbnails,
        list(range(10)),
        atlas=phantom_100,
        thumbnail_pixel_um=pixel,
        level0_shape=(h, w),
        level0_pixel_um=pixel,
        section_spacing_um=800.0,
        max_angle_deg=5.0,
    )
    assert abs(fit.params["angle_ml_deg"] - 3.0) < 0.3, fit.params
    assert abs(fit.params["angle_dv_deg"] + 2.0) < 0.3, fit.params
    # ``ap_um`` is the AP at each section's tissue centre, which sits near the pivot
    # (midline, DV 4000 µm) of the planes the sections were cut on
    assert np.abs(fit.sections["ap_um"].to_numpy() - np.array(true_ap)).max() < 60.0
    assert (fit.sections["flag"] == "").all()
