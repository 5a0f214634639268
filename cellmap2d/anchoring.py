"""QUINT JSON anchoring: QuickNII, DeepSlice and VisuAlign section-to-atlas transforms.

A QUINT JSON file holds one anchoring vector ``[ox, oy, oz, ux, uy, uz, vx, vy, vz]`` per
section, in 25 µm voxels of QuickNII's RAS space (x = ML left→right, y = AP posterior→anterior,
z = DV inferior→superior). Pixel ``(x, y)`` of a ``W × H`` image sits at
``q = o + (x / W)·u + (y / H)·v``; CCF µm are ``(ap, dv, ml) = ((527 − qy)·25, (319 − qz)·25,
qx·25)``. VisuAlign adds per-section ``markers`` ``[x, y, x', y']``: the point ``(x, y)`` of the
linear atlas map is moved to ``(x', y')`` on the section image, with piecewise-affine
interpolation over a Delaunay triangulation of the moved points. The triangulation and the
atlas-map rendering here replicate VisuAlign's own arithmetic, so rendered maps equal its
``*_nl.flat`` exports pixel for pixel.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._deepslice import (
        DEEPSLICE_WEIGHTS,
        SeriesSeed,
        check_deepslice,
        run_deepslice,
        section_image_name,
        series_seed,
        write_quicknii_folder,
        write_section_images,
    )

__all__ = [
    "ATLAS_SHAPE",
    "DEEPSLICE_WEIGHTS",
    "DEFAULT_METADATA",
    "VOXEL_UM",
    "QuintSeries",
    "SectionAnchor",
    "SeriesSeed",
    "atlas_index",
    "ccf_to_quicknii",
    "check_deepslice",
    "quicknii_to_ccf",
    "read_quint",
    "render_atlas_map",
    "run_deepslice",
    "search_series",
    "section_image_name",
    "series_seed",
    "write_quicknii_folder",
    "write_quint",
    "write_section_images",
]

ATLAS_SHAPE: tuple[int, int, int] = (528, 320, 456)
VOXEL_UM = 25.0
DEFAULT_METADATA: dict[str, Any] = {
    "name": "",
    "target": "ABA_Mouse_CCFv3_2017_25um.cutlas",
    "target-resolution": [456, 528, 320],
}

_AP_MAX = ATLAS_SHAPE[0] - 1
_DV_MAX = ATLAS_SHAPE[1] - 1
_CORE_KEYS = ("filename", "nr", "width", "height", "anchoring", "markers")
_FIX = "re-align or re-export the series in QuickNII/DeepSlice/VisuAlign, or fix the entry by hand"


def quicknii_to_ccf(q: np.ndarray) -> np.ndarray:
    """Convert QuickNII voxel coordinates to CCF µm.

    Parameters
    ----------
    q : array_like, shape (..., 3)
        QuickNII coordinates ``(qx, qy, qz)`` in 25 µm voxels.

    Returns
    -------
    numpy.ndarray, shape (..., 3)
        CCF µm ``(ap, dv, ml)``.
    """
    q = np.asarray(q, dtype=np.float64)
    return np.stack(
        [(_AP_MAX - q[..., 1]) * VOXEL_UM, (_DV_MAX - q[..., 2]) * VOXEL_UM, q[..., 0] * VOXEL_UM],
        axis=-1,
    )


def ccf_to_quicknii(ccf: np.ndarray) -> np.ndarray:
    """Convert CCF µm ``(ap, dv, ml)`` to QuickNII voxel coordinates ``(qx, qy, qz)``."""
    c = np.asarray(ccf, dtype=np.float64)
    return np.stack(
        [c[..., 2] / VOXEL_UM, _AP_MAX - c[..., 0] / VOXEL_UM, _DV_MAX - c[..., 1] / VOXEL_UM],
        axis=-1,
    )


def _vec_to_ccf(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    return np.stack([-d[..., 1], -d[..., 2], d[..., 0]], axis=-1) * VOXEL_UM


def _vec_to_quicknii(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    return np.stack([d[..., 2], -d[..., 0], -d[..., 1]], axis=-1) / VOXEL_UM


def atlas_index(q: np.ndarray) -> np.ndarray:
    """Native 25 µm voxel indices of QuickNII points, by QuickNII/Nutil's region convention.

    Parameters
    ----------
    q : array_like, shape (3,) or (n, 3)
        QuickNII coordinates ``(qx, qy, qz)``.

    Returns
    -------
    numpy.ndarray, shape (n, 3), int64
        ``(527 − floor(qy), 319 − floor(qz), floor(qx))`` = ``(ap, dv, ml)`` indices into
        ``annotation_25.nrrd``; not clipped, so points outside the atlas give indices outside
        ``ATLAS_SHAPE``.
    """
    f = np.floor(np.atleast_2d(np.asarray(q, dtype=np.float64))).astype(np.int64)
    return np.stack([_AP_MAX - f[:, 1], _DV_MAX - f[:, 2], f[:, 0]], axis=1)


class _Triangle:
    """One triangle of VisuAlign's marker mesh, with VisuAlign's exact floating-point recipe."""

    def __init__(self, i: int, j: int, k: int, points: list[tuple[float, float, float, float]]):
        self.a, self.b, self.c = sorted((i, j, k))
        self.A, self.B, self.C = points[self.a], points[self.b], points[self.c]
        ax, ay = self.A[2], self.A[3]
        bx, by = self.B[2], self.B[3]
        cx, cy = self.C[2], self.C[3]
        self.bbox = (min(ax, bx, cx), min(ay, by, cy), max(ax, bx, cx), max(ay, by, cy))
        self.decomp = _inverse3(((bx - ax, by - ay, 0.0), (cx - ax, cy - ay, 0.0), (ax, ay, 1.0)))
        a2 = _d2(bx, by, cx, cy)
        b2 = _d2(ax, ay, cx, cy)
        c2 = _d2(ax, ay, bx, by)
        fa = a2 * (b2 + c2 - a2)
        fb = b2 * (c2 + a2 - b2)
        fc = c2 * (a2 + b2 - c2)
        self.den = fa + fb + fc
        self.mdenx = fa * ax + fb * bx + fc * cx
        self.mdeny = fa * ay + fb * by + fc * cy
        self.r2den = _d2(ax * self.den, ay * self.den, self.mdenx, self.mdeny)

    def incircle(self, x: float, y: float) -> bool:
        return _d2(x * self.den, y * self.den, self.mdenx, self.mdeny) < self.r2den

    def barycentric(
        self, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(u, v, inside)`` of points in the destination (section) frame."""
        m = self.decomp
        u = x * m[0][0] + y * m[1][0] + m[2][0]
        v = x * m[0][1] + y * m[1][1] + m[2][1]
        x0, y0, x1, y1 = self.bbox
        inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        inside &= (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1) & (u + v <= 1)
        return u, v, inside

    def source(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Position in the source (linear atlas map) frame of barycentric ``(u, v)``."""
        A, B, C = self.A, self.B, self.C
        return (
            A[0] + (B[0] - A[0]) * u + (C[0] - A[0]) * v,
            A[1] + (B[1] - A[1]) * u + (C[1] - A[1]) * v,
        )


def _d2(ax: float, ay: float, bx: float, by: float) -> float:
    return (ax - bx) * (ax - bx) + (ay - by) * (ay - by)


def _inverse3(m: Sequence[Sequence[float]]) -> list[list[float]] | None:
    det = (
        m[0][0] * (m[1][1] * m[2][2] - m[2][1] * m[1][2])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )
    if det == 0:
        return None
    return [
        [
            (m[1][1] * m[2][2] - m[2][1] * m[1][2]) / det,
            (m[0][2] * m[2][1] - m[0][1] * m[2][2]) / det,
            (m[0][1] * m[1][2] - m[0][2] * m[1][1]) / det,
        ],
        [
            (m[1][2] * m[2][0] - m[1][0] * m[2][2]) / det,
            (m[0][0] * m[2][2] - m[0][2] * m[2][0]) / det,
            (m[1][0] * m[0][2] - m[0][0] * m[1][2]) / det,
        ],
        [
            (m[1][0] * m[2][1] - m[2][0] * m[1][1]) / det,
            (m[2][0] * m[0][1] - m[0][0] * m[2][1]) / det,
            (m[0][0] * m[1][1] - m[1][0] * m[0][1]) / det,
        ],
    ]


class _MarkerMesh:
    """VisuAlign's incremental (Bowyer–Watson) triangulation of a section's markers.

    The mesh starts from four fixed points 10 % outside the image corners, split along the
    top-right/bottom-left diagonal; each marker whose destination lies inside the mesh is then
    inserted in file order. Markers outside it are ignored, as in VisuAlign.
    """

    def __init__(self, markers: np.ndarray, width: float, height: float):
        w, h = float(width), float(height)
        points: list[tuple[float, float, float, float]] = [
            (-w * 0.1, -h * 0.1, -w * 0.1, -h * 0.1),
            (w * 1.1, -h * 0.1, w * 1.1, -h * 0.1),
            (-w * 0.1, h * 1.1, -w * 0.1, h * 1.1),
            (w * 1.1, h * 1.1, w * 1.1, h * 1.1),
        ]
        n = len(markers) + 4
        edges = np.zeros((n, n), dtype=np.int64)
        edges[0, 1] = edges[0, 2] = edges[1, 2] = edges[1, 3] = edges[2, 3] = 2
        triangles = [_Triangle(0, 1, 2, points), _Triangle(1, 2, 3, points)]
        for marker in markers:
            m = (float(marker[0]), float(marker[1]), float(marker[2]), float(marker[3]))
            x, y = m[2], m[3]
            xa, ya = np.array([x]), np.array([y])
            if not any(t.decomp is not None and t.barycentric(xa, ya)[2][0] for t in triangles):
                continue
            removed = [t for t in triangles if t.incircle(x, y)]
            for t in removed:
                edges[t.a, t.b] -= 1
                edges[t.a, t.c] -= 1
                edges[t.b, t.c] -= 1
            gone = {id(t) for t in removed}
            triangles = [t for t in triangles if id(t) not in gone]
            points.append(m)
            new = [
                _Triangle(int(i), int(j), len(points) - 1, points)
                for i, j in np.argwhere(edges == 1)
            ]
            new = [t for t in new if t.decomp is not None]
            for t in new:
                edges[t.a, t.b] += 1
                edges[t.a, t.c] += 1
                edges[t.b, t.c] += 1
            triangles += new
        self.triangles = triangles

    def to_source(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Map section-image points to the linear atlas-map frame.

        Returns
        -------
        sx, sy : numpy.ndarray
            Source positions (unchanged where the point lies outside the mesh).
        inside : numpy.ndarray of bool
            Whether the point lies inside the mesh.
        """
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        sx, sy = x.copy(), y.copy()
        inside = np.zeros(x.shape, dtype=bool)
        todo = np.arange(x.size)
        for t in self.triangles:
            if todo.size == 0:
                break
            u, v, hit = t.barycentric(x[todo], y[todo])
            if not hit.any():
                continue
            idx = todo[hit]
            sx[idx], sy[idx] = t.source(u[hit], v[hit])
            inside[idx] = True
            todo = todo[~hit]
        return sx, sy, inside


@dataclass(eq=False)
class SectionAnchor:
    """One section of a QUINT JSON series.

    Parameters
    ----------
    filename : str
        Image file name as in the JSON.
    nr : int
        Section number (QuickNII's ``_sNNN``).
    width, height : int
        Size of the image the anchoring refers to (the JSON's frame).
    anchoring : numpy.ndarray, shape (9,)
        ``[ox, oy, oz, ux, uy, uz, vx, vy, vz]`` in QuickNII voxels.
    markers : numpy.ndarray, shape (n, 4), optional
        VisuAlign markers ``[x, y, x', y']`` in the ``width × height`` frame; ``None`` when linear.
    extra : dict
        Every other key of the JSON slice, written back unchanged.
    """

    filename: str
    nr: int
    width: int
    height: int
    anchoring: np.ndarray
    markers: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    _read: tuple[dict, dict] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.nr = int(self.nr)
        self.width = int(self.width)
        self.height = int(self.height)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"section {self.filename!r}: width and height must be positive")
        a = np.array(self.anchoring, dtype=np.float64).reshape(-1)
        if a.shape != (9,) or not np.isfinite(a).all():
            raise ValueError(
                f"section {self.filename!r}: anchoring must be 9 finite numbers, got {self.anchoring!r}"
            )
        self.anchoring = a
        if self.markers is not None:
            try:
                m = np.array(self.markers, dtype=np.float64)
            except (TypeError, ValueError):
                m = np.array([np.nan])
            if m.size == 0:
                m = None
            elif m.ndim != 2 or m.shape[1] != 4 or not np.isfinite(m).all():
                raise ValueError(
                    f"section {self.filename!r}: markers must be a list of [x, y, x', y'] numbers"
                )
            self.markers = m
        clash = set(self.extra) & set(_CORE_KEYS)
        if clash:
            raise ValueError(f"section {self.filename!r}: extra must not hold {sorted(clash)}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SectionAnchor):
            return NotImplemented
        mine, theirs = _state(self), _state(other)
        return all(_same(mine[k], theirs[k]) for k in mine) and self.extra == other.extra

    __hash__ = None

    @property
    def o(self) -> np.ndarray:
        """Origin (top-left image corner) in QuickNII voxels."""
        return self.anchoring[0:3].copy()

    @property
    def u(self) -> np.ndarray:
        """Vector across the full image width, in QuickNII voxels."""
        return self.anchoring[3:6].copy()

    @property
    def v(self) -> np.ndarray:
        """Vector down the full image height, in QuickNII voxels."""
        return self.anchoring[6:9].copy()

    def to_quicknii(
        self, x_px: np.ndarray | float, y_px: np.ndarray | float, *, width: float, height: float
    ) -> np.ndarray:
        """Map image pixels to QuickNII voxel coordinates.

        Parameters
        ----------
        x_px, y_px : array_like or float
            Column and row of points in an image of size ``width × height`` (any resolution of
            the section image, e.g. full size or a thumbnail).
        width, height : float
            Size of the frame ``x_px, y_px`` are given in.

        Returns
        -------
        numpy.ndarray, shape (n, 3)
            ``(qx, qy, qz)``. VisuAlign markers, when present, are applied; points beyond the
            marker mesh (more than 10 % outside the image) are mapped linearly.
        """
        x, y = np.broadcast_arrays(
            np.asarray(x_px, dtype=np.float64), np.asarray(y_px, dtype=np.float64)
        )
        x = x.ravel() * self.width / float(width)
        y = y.ravel() * self.height / float(height)
        if self.markers is not None:
            x, y, _ = _MarkerMesh(self.markers, self.width, self.height).to_source(x, y)
        return (
            self.anchoring[0:3]
            + np.outer(x / self.width, self.anchoring[3:6])
            + np.outer(y / self.height, self.anchoring[6:9])
        )

    def to_ccf(
        self, x_px: np.ndarray | float, y_px: np.ndarray | float, *, width: float, height: float
    ) -> np.ndarray:
        """Map image pixels to CCF µm ``(ap, dv, ml)``, shape (n, 3); see :meth:`to_quicknii`."""
        return quicknii_to_ccf(self.to_quicknii(x_px, y_px, width=width, height=height))

    def normal(self) -> np.ndarray:
        """Unit normal ``u × v`` of the section plane in CCF axes ``(ap, dv, ml)``.

        For a coronal section shown the usual way (left → right, dorsal up) it points anterior,
        i.e. along −AP.
        """
        n = np.cross(_vec_to_ccf(self.anchoring[3:6]), _vec_to_ccf(self.anchoring[6:9]))
        norm = np.linalg.norm(n)
        if norm == 0:
            raise ValueError(f"section {self.filename!r}: u and v are parallel; no plane")
        return n / norm

    @classmethod
    def from_plane(
        cls,
        origin: Sequence[float],
        u: Sequence[float],
        v: Sequence[float],
        *,
        width: int,
        height: int,
        filename: str = "",
        nr: int = 0,
    ) -> SectionAnchor:
        """Build an anchor from a plane given in CCF µm.

        Parameters
        ----------
        origin : sequence of 3 floats
            CCF µm ``(ap, dv, ml)`` of the image's top-left corner (pixel ``(0, 0)``).
        u, v : sequence of 3 floats
            CCF µm displacement across the full image width and down the full height.
        width, height : int
            Image size in pixels.
        filename, nr : optional
            Section identity.
        """
        a = np.concatenate(
            [ccf_to_quicknii(origin), _vec_to_quicknii(u), _vec_to_quicknii(v)]
        ).astype(np.float64)
        return cls(filename=filename, nr=nr, width=width, height=height, anchoring=a)


def _state(a: SectionAnchor) -> dict[str, Any]:
    return {
        "filename": a.filename,
        "nr": a.nr,
        "width": a.width,
        "height": a.height,
        "anchoring": a.anchoring.copy(),
        "markers": None if a.markers is None else a.markers.copy(),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if a is None or b is None:
            return False
        return np.array_equal(a, b)
    return a == b


class QuintSeries(list):
    """A list of :class:`SectionAnchor` with the JSON's top-level ``metadata``."""

    def __init__(
        self, anchors: Iterable[SectionAnchor] = (), metadata: dict[str, Any] | None = None
    ):
        super().__init__(anchors)
        self.metadata: dict[str, Any] = dict(DEFAULT_METADATA if metadata is None else metadata)


def _where(path: Path, i: int, raw: Any) -> str:
    if isinstance(raw, dict):
        return f"{path}: slice #{i} (filename={raw.get('filename')!r}, nr={raw.get('nr')!r})"
    return f"{path}: slice #{i}"


def _as_int(value: Any, what: str, where: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} {value!r} is not a number; {_FIX}") from None
    if not math.isfinite(f) or not f.is_integer():
        raise ValueError(f"{where}: {what} {value!r} is not a whole number; {_FIX}")
    return int(f)


def _parse_slice(path: Path, i: int, raw: Any) -> SectionAnchor:
    where = _where(path, i, raw)
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is not a JSON object; {_FIX}")
    filename = raw.get("filename")
    if filename is None and isinstance(raw.get("filenames"), list) and raw["filenames"]:
        filename = raw["filenames"][0]
    if not isinstance(filename, str):
        raise ValueError(f"{where} has no 'filename'; {_FIX}")
    if "nr" in raw:
        nr = _as_int(raw["nr"], "nr", where)
    else:
        found = re.findall(r"_s(\d+)", filename)
        nr = int(found[-1]) if found else i + 1
    for key in ("width", "height"):
        if key not in raw:
            raise ValueError(f"{where} has no '{key}' (image size in pixels); {_FIX}")
    width = _as_int(raw["width"], "width", where)
    height = _as_int(raw["height"], "height", where)
    anchoring = raw.get("anchoring")
    if not isinstance(anchoring, list) or len(anchoring) == 0:
        raise ValueError(
            f"{where} has no anchoring (the section was never aligned); align it in QuickNII or "
            "DeepSlice, or remove the slice from the file"
        )
    if len(anchoring) != 9:
        raise ValueError(
            f"{where}: anchoring has {len(anchoring)} values, expected 9 "
            f"([ox, oy, oz, ux, uy, uz, vx, vy, vz]); {_FIX}"
        )
    try:
        a = np.array(anchoring, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: anchoring {anchoring!r} is not numeric; {_FIX}") from None
    markers = raw.get("markers")
    if markers is not None and not isinstance(markers, list):
        markers = None
    try:
        anchor = SectionAnchor(
            filename=filename,
            nr=nr,
            width=width,
            height=height,
            anchoring=a,
            markers=markers,
            extra={k: v for k, v in raw.items() if k not in _CORE_KEYS},
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}; {_FIX}") from None
    anchor._read = (dict(raw), _state(anchor))
    return anchor


def read_quint(path: str | Path) -> QuintSeries:
    """Read a QuickNII / DeepSlice / VisuAlign JSON file.

    Parameters
    ----------
    path : str or Path
        The JSON file.

    Returns
    -------
    QuintSeries
        One :class:`SectionAnchor` per slice, in file order, and ``metadata`` (top-level keys
        other than ``slices``).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not QUINT JSON or a slice lacks a usable anchoring; the message names the
        file and the slice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QUINT JSON file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as fh:
            doc = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); export the series again from QuickNII, "
            "DeepSlice or VisuAlign"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("slices"), list):
        raise ValueError(
            f"{path} has no 'slices' list, so it is not a QuickNII/DeepSlice/VisuAlign JSON file"
        )
    anchors = [_parse_slice(path, i, raw) for i, raw in enumerate(doc["slices"])]
    return QuintSeries(anchors, {k: v for k, v in doc.items() if k != "slices"})


def _slice_to_json(a: SectionAnchor) -> dict[str, Any]:
    fresh: dict[str, Any] = {
        "filename": a.filename,
        "nr": a.nr,
        "width": a.width,
        "height": a.height,
        "anchoring": a.anchoring.tolist(),
    }
    if a.markers is not None:
        fresh["markers"] = a.markers.tolist()
    raw, snapshot = a._read if a._read is not None else ({}, {})
    now = _state(a)
    core: dict[str, Any] = {}
    for key in _CORE_KEYS:
        if key in snapshot and _same(snapshot[key], now[key]):
            if key in raw:
                core[key] = raw[key]
        elif key in fresh:
            core[key] = fresh[key]
    out: dict[str, Any] = {}
    for key in raw:
        if key in core:
            out[key] = core[key]
        elif key in a.extra:
            out[key] = a.extra[key]
    for key, value in [*core.items(), *a.extra.items()]:
        if key not in out:
            out[key] = value
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to QUINT JSON")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, default=_json_default)


def write_quint(
    path: str | Path, anchors: Iterable[SectionAnchor], *, metadata: dict[str, Any] | None = None
) -> None:
    """Write a QUINT JSON file that QuickNII and VisuAlign open.

    Slices read with :func:`read_quint` and not modified are written back exactly as read
    (numbers, types and extra keys), so ``write_quint(p2, read_quint(p1))`` is lossless.

    Parameters
    ----------
    path : str or Path
        Output file (overwritten).
    anchors : iterable of SectionAnchor
        The sections, written in this order.
    metadata : dict, optional
        Top-level keys; default ``anchors.metadata`` if present, else :data:`DEFAULT_METADATA`.
    """
    anchors = list(anchors) if not isinstance(anchors, list) else anchors
    if metadata is None:
        metadata = getattr(anchors, "metadata", None)
    if metadata is None:
        metadata = DEFAULT_METADATA
    if not anchors:
        raise ValueError(f"no sections to write to {path}; QuickNII needs at least one slice")
    head = [f"{_dumps(k)}: {_dumps(v)}" for k, v in metadata.items() if k != "slices"]
    slices = ",\n".join(_dumps(_slice_to_json(a)) for a in anchors)
    text = "{" + "".join(h + ", " for h in head) + '"slices": [\n' + slices + "\n]}\n"
    Path(path).write_text(text, encoding="utf-8")


def _linear_map(anchoring: np.ndarray, annotation: np.ndarray) -> np.ndarray:
    ox, oy, oz, ux, uy, uz, vx, vy, vz = (float(c) for c in anchoring)
    fw = int(math.sqrt(ux * ux + uy * uy + uz * uz)) + 1
    fh = int(math.sqrt(vx * vx + vy * vy + vz * vz)) + 1
    i = np.arange(fw, dtype=np.float64)[None, :]
    j = np.arange(fh, dtype=np.float64)[:, None]
    q = np.stack(
        np.broadcast_arrays(
            ox + vx * j / fh + ux * i / fw,
            oy + vy * j / fh + uy * i / fw,
            oz + vz * j / fh + uz * i / fw,
        ),
        axis=-1,
    ).reshape(-1, 3)
    idx = atlas_index(q)
    ok = np.all((idx >= 0) & (idx < np.array(ATLAS_SHAPE)), axis=1)
    out = np.zeros(fw * fh, dtype=annotation.dtype)
    out[ok] = annotation[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    return out.reshape(fh, fw)


def render_atlas_map(
    anchor: SectionAnchor,
    annotation: np.ndarray,
    *,
    width: int | None = None,
    height: int | None = None,
    nonlinear: bool = True,
) -> np.ndarray:
    """Render a section's atlas map the way QuickNII/VisuAlign/Nutil do.

    The linear map is sampled on a ``floor(|u|)+1 × floor(|v|)+1`` grid, pixel ``(i, j)`` at
    ``(i·W/fw, j·H/fh)`` of the anchoring frame (no half-pixel offset), nearest voxel by
    :func:`atlas_index`. With ``nonlinear`` it is then warped through VisuAlign's marker mesh
    exactly as VisuAlign's export does, so the result equals VisuAlign's ``*_nl.flat`` maps.

    Parameters
    ----------
    anchor : SectionAnchor
        The section.
    annotation : numpy.ndarray, shape (528, 320, 456)
        Allen 25 µm annotation in native order (ap, dv, ml), e.g. ``annotation_25.nrrd``.
    width, height : int, optional
        Output size; default the linear grid ``fw × fh`` (VisuAlign's export size).
    nonlinear : bool
        Warp through the marker mesh. VisuAlign does this even for sections without markers,
        where its rounding shifts some pixels by one against the plain linear map; ``False``
        gives the plain linear (QuickNII) map.

    Returns
    -------
    numpy.ndarray, shape (height, width), dtype of ``annotation``
        Annotation values; 0 outside the atlas.
    """
    annotation = np.asarray(annotation)
    if annotation.shape != ATLAS_SHAPE:
        raise ValueError(
            f"annotation must be the 25 µm Allen volume in native (ap, dv, ml) order with shape "
            f"{ATLAS_SHAPE}, got {annotation.shape}"
        )
    linear = _linear_map(anchor.anchoring, annotation)
    fh, fw = linear.shape
    ow = fw if width is None else int(width)
    oh = fh if height is None else int(height)
    if not nonlinear:
        if (ow, oh) == (fw, fh):
            return linear
        cols = np.arange(ow, dtype=np.int64) * fw // ow
        rows = np.arange(oh, dtype=np.int64) * fh // oh
        return linear[rows[:, None], cols[None, :]]
    sw, sh = float(anchor.width), float(anchor.height)
    x = np.broadcast_to(np.arange(ow, dtype=np.float64)[None, :] * sw / ow, (oh, ow)).ravel()
    y = np.broadcast_to(np.arange(oh, dtype=np.float64)[:, None] * sh / oh, (oh, ow)).ravel()
    markers = anchor.markers if anchor.markers is not None else np.zeros((0, 4))
    sx, sy, inside = _MarkerMesh(markers, sw, sh).to_source(x, y)
    xx = np.trunc(sx * fw / sw)
    yy = np.trunc(sy * fh / sh)
    ok = inside & (xx >= 0) & (yy >= 0) & (xx < fw) & (yy < fh)
    out = np.zeros(ow * oh, dtype=annotation.dtype)
    out[ok] = linear[yy[ok].astype(np.int64), xx[ok].astype(np.int64)]
    return out.reshape(oh, ow)


def search_series(thumbnails, sections, **kwargs):  # noqa: ANN001, ANN201
    """Anchor a section series by searching the atlas template; see :mod:`._plane_search`."""
    from ._plane_search import search_series as _search

    return _search(thumbnails, sections, **kwargs)


def __getattr__(name: str) -> Any:
    # The DeepSlice adapter (``._deepslice``) builds on the QUINT types above.
    from . import _deepslice

    if name in _deepslice.__all__:
        return getattr(_deepslice, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
