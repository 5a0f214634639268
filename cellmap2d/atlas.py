"""Allen CCFv3 atlases: annotation and template volumes, the ontology, region look-up.

Volumes are in Allen native order ``(ap, dv, ml)``; a voxel index ``i`` sits at ``i × resolution``
µm (DESIGN.md). Regions of points follow QuickNII/Nutil: the voxel containing the point in
QuickNII space, i.e. ``ap = ceil(ap_um / r)``, ``dv = ceil(dv_um / r)``, ``ml = floor(ml_um / r)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

__all__ = [
    "CCF_EXTENT_UM",
    "MIDLINE_UM",
    "Atlas",
    "Ontology",
    "load_atlas",
    "ontology_from_rows",
    "read_atlas_h5",
    "write_atlas_h5",
    "pseudo_template",
    "read_atlas_h5",
    "read_ontology",
    "write_atlas_h5",
]

CCF_EXTENT_UM = (13200.0, 8000.0, 11400.0)
MIDLINE_UM = 5700.0
OUTSIDE = "outside"
_RESOLUTIONS = (10, 25, 50, 100)
_BRAINGLOBE_NAME = re.compile(r"^[a-z0-9_]+_\d+um$")


@dataclass
class Ontology:
    """The structure hierarchy: one row per structure, indexed by Allen structure id.

    Columns: ``acronym``, ``name``, ``parent_id`` (0 for the root), ``depth`` (root = 0),
    ``path`` (tuple of ids root → structure) and ``color`` (hex triplet).
    """

    table: pd.DataFrame

    def __post_init__(self) -> None:
        self._by_acronym = pd.Series(self.table.index.to_numpy(), index=self.table["acronym"])

    def __len__(self) -> int:
        return len(self.table)

    def id_of(self, region: int | str) -> int:
        """Structure id of an acronym (or check an id exists)."""
        if isinstance(region, str) and not region.isdigit():
            if region not in self._by_acronym.index:
                raise KeyError(f"unknown region acronym {region!r}")
            return int(self._by_acronym[region])
        rid = int(region)
        if rid not in self.table.index:
            raise KeyError(f"unknown structure id {rid}")
        return rid

    def acronyms(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Acronyms of ``ids``; 0 (outside the brain) and unknown ids give ``"outside"``."""
        ids = np.asarray(ids, dtype=np.int64)
        mapped = pd.Series(self.table["acronym"]).reindex(ids).to_numpy(dtype=object)
        mapped[pd.isna(mapped)] = OUTSIDE
        return mapped

    def descendants(self, region: int | str) -> np.ndarray:
        """Ids of ``region`` and every structure below it."""
        rid = self.id_of(region)
        inside = self.table["path"].map(lambda p: rid in p)
        return self.table.index[inside.to_numpy()].to_numpy(dtype=np.int64)

    def rollup(self, ids: Iterable[int] | np.ndarray, depth: int) -> np.ndarray:
        """Map ``ids`` to their ancestor at ``depth`` (ids shallower than it are kept; 0 stays 0)."""
        ids = np.asarray(ids, dtype=np.int64)
        uniq, inverse = np.unique(ids, return_inverse=True)
        paths = self.table["path"].reindex(uniq)
        up = np.array(
            [
                0 if not isinstance(p, tuple) else p[min(depth, len(p) - 1)]
                for p in paths.to_numpy()
            ],
            dtype=np.int64,
        )
        return up[inverse]

    def to_structure_graph(self) -> dict[str, Any]:
        """The ontology as an Allen structure-graph JSON document (nested ``msg``/``children``)."""
        children: dict[int, list[int]] = {}
        for sid, parent in self.table["parent_id"].items():
            children.setdefault(int(parent), []).append(int(sid))

        def node(sid: int) -> dict[str, Any]:
            row = self.table.loc[sid]
            return {
                "id": sid,
                "acronym": row["acronym"],
                "name": row["name"],
                "parent_structure_id": int(row["parent_id"]) or None,
                "structure_id_path": "/" + "/".join(map(str, row["path"])) + "/",
                "color_hex_triplet": row["color"],
                "children": [node(c) for c in children.get(sid, [])],
            }

        return {"success": True, "msg": [node(r) for r in children.get(0, [])]}


def read_ontology(path: str | Path) -> Ontology:
    """Read an Allen ontology: structure-graph JSON (``msg``/``children``) or structure-tree CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ontology file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        rows = _rows_from_graph(doc, path)
    elif path.suffix.lower() == ".csv":
        rows = _rows_from_csv(path)
    else:
        raise ValueError(f"{path}: ontology must be a structure-graph .json or structure-tree .csv")
    return ontology_from_rows(rows, str(path))


def ontology_from_rows(rows: Iterable[tuple], source: str = "") -> Ontology:
    """An ontology from ``(id, acronym, name, parent_id, colour)`` rows (parent 0 = none)."""
    table = pd.DataFrame(list(rows), columns=["id", "acronym", "name", "parent_id", "color"])
    table = table.drop_duplicates("id").set_index("id")
    table["path"] = _paths(table["parent_id"], Path(source))
    table["depth"] = table["path"].map(len) - 1
    return Ontology(table)


def _rows_from_graph(doc: Any, path: Path) -> list[tuple]:
    roots = doc.get("msg") if isinstance(doc, dict) else doc
    if not isinstance(roots, list) or not roots:
        raise ValueError(f"{path}: expected an Allen structure graph with a non-empty 'msg' list")
    rows, stack = [], [(r, 0) for r in roots]
    while stack:
        node, parent = stack.pop()
        sid = int(node["id"])
        rows.append(
            (sid, node["acronym"], node.get("name", ""), parent, node.get("color_hex_triplet", ""))
        )
        stack.extend((c, sid) for c in node.get("children", []) or [])
    return rows


def _rows_from_csv(path: Path) -> list[tuple]:
    frame = pd.read_csv(path)
    missing = {"id", "acronym", "parent_structure_id"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: structure-tree CSV lacks columns {sorted(missing)}")
    frame = frame[frame["id"] > 0]
    parent = frame["parent_structure_id"].fillna(0).astype(np.int64)
    if "color_hex_triplet" in frame:
        color = frame["color_hex_triplet"].fillna("").astype(str)
    else:
        color = pd.Series("", index=frame.index, dtype=object)
    names = frame["name"] if "name" in frame else frame["acronym"]
    return list(
        zip(frame["id"].astype(np.int64), frame["acronym"], names, parent, color, strict=True)
    )


def _paths(parent: pd.Series, source: Path) -> list[tuple[int, ...]]:
    parents = parent.to_dict()
    out = []
    for sid in parent.index:
        chain, node = [sid], parents[sid]
        while node:
            if node not in parents or len(chain) > 64:
                raise ValueError(f"{source}: structure {sid} has a broken parent chain at {node}")
            chain.append(node)
            node = parents[node]
        out.append(tuple(reversed(chain)))
    return out


@dataclass
class Atlas:
    """An atlas on the CCF grid.

    Attributes
    ----------
    annotation
        ``(ap, dv, ml)`` structure ids (uint32).
    template
        ``(ap, dv, ml)`` float32 reference image on the same grid.
    resolution_um
        Voxel size.
    ontology
        The structure hierarchy.
    template_is_pseudo
        True when the template was derived from the labels (no average template given).
    source
        Where the atlas came from.
    """

    annotation: np.ndarray
    template: np.ndarray
    resolution_um: float
    ontology: Ontology
    template_is_pseudo: bool = False
    source: str = ""
    _compact: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.annotation.shape)  # type: ignore[return-value]

    @property
    def midline_um(self) -> float:
        return self.annotation.shape[2] * self.resolution_um / 2

    def voxel_index(self, ccf_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """QuickNII/Nutil voxel of each point and whether it lies inside the volume."""
        ccf = np.atleast_2d(np.asarray(ccf_um, dtype=np.float64)) / self.resolution_um
        finite = np.isfinite(ccf).all(axis=1)
        # round finite values only (non-finite points become -1) and keep them in int64 range,
        # so NaN, inf and absurd coordinates never reach the cast (which warns and gives garbage)
        voxel = np.where(finite[:, None], ccf, -1.0)
        voxel[:, :2] = np.ceil(voxel[:, :2])
        voxel[:, 2] = np.floor(voxel[:, 2])
        idx = np.clip(voxel, -(2.0**62), 2.0**62).astype(np.int64)
        inside = finite & np.all((idx >= 0) & (idx < np.array(self.shape)), axis=1)
        return idx, inside

    def region_ids(self, ccf_um: np.ndarray) -> np.ndarray:
        """Structure id at each point (0 outside the volume)."""
        idx, inside = self.voxel_index(ccf_um)
        out = np.zeros(len(idx), dtype=np.int64)
        out[inside] = self.annotation[tuple(idx[inside].T)]
        return out

    def hemisphere(self, ccf_um: np.ndarray) -> np.ndarray:
        """``"left"`` or ``"right"`` of the midline for each point."""
        ml = np.atleast_2d(np.asarray(ccf_um, dtype=np.float64))[:, 2]
        return np.where(ml < self.midline_um, "left", "right")

    def sample_template(self, ccf_um: np.ndarray, *, order: int = 1) -> np.ndarray:
        """Template intensity at points (µm), interpolated; 0 outside."""
        coords = np.asarray(ccf_um, dtype=np.float64).reshape(-1, 3).T / self.resolution_um
        return ndi.map_coordinates(self.template, coords, order=order, cval=0.0, prefilter=False)

    def plane_image(self, ccf_um: np.ndarray, *, kind: str = "template") -> np.ndarray:
        """Sample a grid of points ``(h, w, 3)`` µm: template intensity or structure ids."""
        ccf_um = np.asarray(ccf_um)
        flat = ccf_um.reshape(-1, 3)
        if kind == "template":
            values = self.sample_template(flat)
        elif kind == "annotation":
            values = self.region_ids(flat)
        else:
            raise ValueError(f"kind must be 'template' or 'annotation', not {kind!r}")
        return values.reshape(ccf_um.shape[:-1])

    def compact_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Annotation relabelled to compact integers (safe to resample) and the id lookup table.

        Allen ids reach ~6·10⁸ and do not survive float32; ``ids[compact]`` gives them back.
        """
        if self._compact is None:
            ids, compact = np.unique(self.annotation, return_inverse=True)
            self._compact = (compact.reshape(self.shape).astype(np.int32), ids)
        return self._compact


def load_atlas(source: str | Path, *, resolution_um: int = 25) -> Atlas:
    """Load an atlas from an Allen-layout directory or a BrainGlobe atlas name.

    The directory holds ``annotation_{res}.nrrd``, optionally ``average_template_{res}.nrrd``,
    and ``structures.json`` or a structure-tree ``*.csv``. Without a template, a label-derived
    pseudo-template stands in (``template_is_pseudo``).
    """
    path = Path(source)
    if not path.exists() and _BRAINGLOBE_NAME.match(str(source)):
        return _load_brainglobe(str(source))
    if not path.is_dir():
        raise FileNotFoundError(
            f"atlas {source!r} is neither a directory nor a BrainGlobe atlas name "
            "(e.g. 'allen_mouse_25um')"
        )
    if resolution_um not in _RESOLUTIONS:
        raise ValueError(f"atlas resolution must be one of {_RESOLUTIONS} µm, not {resolution_um}")
    annotation_path = path / f"annotation_{resolution_um}.nrrd"
    if not annotation_path.is_file():
        present = sorted(p.name for p in path.glob("annotation_*.nrrd"))
        raise FileNotFoundError(
            f"{annotation_path} not found (present: {present or 'none'}); set the atlas "
            "resolution to one of those or add the file"
        )
    annotation = _read_nrrd(annotation_path).astype(np.uint32, copy=False)
    expected = tuple(round(e / resolution_um) for e in CCF_EXTENT_UM)
    if tuple(annotation.shape) != expected:
        raise ValueError(
            f"{annotation_path}: shape {annotation.shape} is not the CCF grid {expected} at "
            f"{resolution_um} µm in (ap, dv, ml) order"
        )
    ontology = read_ontology(_find_ontology(path))
    template_path = path / f"average_template_{resolution_um}.nrrd"
    if template_path.is_file():
        template = _read_nrrd(template_path).astype(np.float32)
        pseudo = False
    else:
        template = pseudo_template(annotation, ontology)
        pseudo = True
    return Atlas(annotation, template, float(resolution_um), ontology, pseudo, str(path))


def _read_nrrd(path: Path) -> np.ndarray:
    import nrrd

    try:
        data, _ = nrrd.read(str(path))
    except Exception as exc:  # pynrrd raises several types for corrupt files
        raise ValueError(f"{path}: not a readable NRRD file ({exc})") from exc
    return data


def _find_ontology(directory: Path) -> Path:
    for name in ("structures.json", "structure_tree_2017.csv"):
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(directory.glob("*.json")) + sorted(directory.glob("structure*.csv"))
    if not candidates:
        raise FileNotFoundError(
            f"no ontology in {directory}: add structures.json (Allen structure graph) or a "
            "structure-tree CSV"
        )
    return candidates[0]


def _load_brainglobe(name: str) -> Atlas:
    try:
        from brainglobe_atlasapi import BrainGlobeAtlas
    except ImportError as exc:
        raise ImportError(
            f"atlas {name!r} looks like a BrainGlobe atlas name; install brainglobe-atlasapi "
            "(pip install brainglobe-atlasapi) or give an Allen-layout directory"
        ) from exc
    try:
        bg = BrainGlobeAtlas(name)
    except Exception as exc:
        raise RuntimeError(
            f"could not load BrainGlobe atlas {name!r} ({exc}); it is downloaded on first use, "
            "so offline machines need it in ~/.brainglobe beforehand"
        ) from exc
    rows = [
        (
            s["id"],
            s["acronym"],
            s["name"],
            s["structure_id_path"][-2] if len(s["structure_id_path"]) > 1 else 0,
            "",
        )
        for s in bg.structures_list
    ]
    resolution = float(bg.resolution[0])
    return Atlas(
        np.asarray(bg.annotation, dtype=np.uint32),
        np.asarray(bg.reference, dtype=np.float32),
        resolution,
        ontology_from_rows(rows, name),
        False,
        f"brainglobe:{name}",
    )


def pseudo_template(annotation: np.ndarray, ontology: Ontology) -> np.ndarray:
    """A label-derived stand-in for the average template.

    Each structure gets a grey value from its id (fiber tracts bright, ventricles dark, like
    autofluorescence), then the volume is smoothed by one voxel.
    """
    ids, compact = np.unique(annotation, return_inverse=True)
    rng = np.random.default_rng(0)
    values = rng.uniform(80, 180, len(ids)).astype(np.float32)
    values[ids == 0] = 0
    for acronym, value in (("fiber tracts", 230.0), ("VS", 20.0)):
        if acronym in ontology._by_acronym.index:
            values[np.isin(ids, ontology.descendants(acronym))] = value
    volume = values[compact.reshape(annotation.shape)]
    return ndi.gaussian_filter(volume, 1.0)


def write_atlas_h5(path: str | Path, atlas: Atlas) -> None:
    """Cache an atlas as one uncompressed HDF5 file (fast to read back whole)."""
    import h5py

    with h5py.File(path, "w") as fh:
        fh.create_dataset("annotation", data=atlas.annotation)
        fh.create_dataset("template", data=atlas.template.astype(np.float32))
        fh.attrs["resolution_um"] = atlas.resolution_um
        fh.attrs["template_is_pseudo"] = atlas.template_is_pseudo
        fh.attrs["source"] = atlas.source
        fh.attrs["ontology"] = json.dumps(atlas.ontology.to_structure_graph())


def read_atlas_h5(path: str | Path) -> Atlas:
    """Read an atlas written by :func:`write_atlas_h5`."""
    import h5py

    with h5py.File(path, "r") as fh:
        rows = _rows_from_graph(json.loads(fh.attrs["ontology"]), Path(path))
        return Atlas(
            fh["annotation"][()],
            fh["template"][()],
            float(fh.attrs["resolution_um"]),
            ontology_from_rows(rows, str(path)),
            bool(fh.attrs["template_is_pseudo"]),
            str(fh.attrs["source"]),
        )
