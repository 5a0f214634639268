"""A phantom world with known truth: atlas, cell-type atlas and sectioned brains.

Everything is seeded and reproducible. The world is written in the same layouts the real readers
take, so the whole pipeline runs on it unchanged:

- ``atlas/``: ``annotation_{r}.nrrd``, ``average_template_{r}.nrrd``, ``structures.json``
  (a brain-shaped phantom on the CCF grid with real Allen ids, nested regions and a layered cortex);
- ``abc/``: the ABC Atlas cache layout (cell metadata, CCF coordinates in mm, taxonomy);
- ``brains/<id>.ome.zarr``: NGFF 0.4, axes ``c, z, y, x``, channel 0 signal, 1 autofluorescence;
  sections cut at an oblique plane shared by the series, with per-section in-plane affine and
  smooth nonlinear deformation, a missing and a damaged section, imaged as
  ``WorldConfig.realism`` says (:class:`Realism`: the original easy rendering, or a realistic
  slide scanner's — Poisson–Gaussian noise, textured autofluorescence bleeding into the
  signal, uneven illumination, streaks, dust, defocus);
- ``truth/``: the true anchoring (QUINT JSON; its linear part — the nonlinear residual is in
  ``cells.csv`` only), every planted cell's section pixel, CCF µm, ``snr`` and ``in_focus``,
  the specks (``artefacts.csv``, realistic worlds) and the planted mixtures;
- ``manifest.csv``.

:func:`realistic_field` renders one realistic field with its truth without a world.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .anchoring import SectionAnchor, ccf_to_quicknii, write_quint
from .atlas import CCF_EXTENT_UM, MIDLINE_UM, Atlas, Ontology, ontology_from_rows
from .io import write_ome_zarr

__all__ = [
    "PhantomBrain",
    "PhantomWorld",
    "WorldConfig",
    "evaluate_mapping",
    "make_world",
    "phantom_atlas",
    "phantom_cell_types",
    "Realism",
    "realistic_field",
]

ABC_DATASET = "MERFISH-C57BL6J-638850"
ABC_VERSION = "20231215"

# (id, acronym, name, parent id, colour): a subset of the Allen ontology.
_STRUCTURES = [
    (997, "root", "root", 0, "FFFFFF"),
    (8, "grey", "Basic cell groups and regions", 997, "BFDAE3"),
    (567, "CH", "Cerebrum", 8, "B0F0FF"),
    (688, "CTX", "Cerebral cortex", 567, "B0FFB8"),
    (695, "CTXpl", "Cortical plate", 688, "70FF70"),
    (315, "Isocortex", "Isocortex", 695, "70FF71"),
    (500, "MO", "Somatomotor areas", 315, "1F9D5A"),
    (985, "MOp", "Primary motor area", 500, "1F9D5A"),
    (320, "MOp1", "Primary motor area Layer 1", 985, "1F9D5A"),
    (943, "MOp2/3", "Primary motor area Layer 2/3", 985, "1F9D5A"),
    (648, "MOp5", "Primary motor area Layer 5", 985, "1F9D5A"),
    (844, "MOp6a", "Primary motor area Layer 6a", 985, "1F9D5A"),
    (882, "MOp6b", "Primary motor area Layer 6b", 985, "1F9D5A"),
    (453, "SS", "Somatosensory areas", 315, "188064"),
    (322, "SSp", "Primary somatosensory area", 453, "188064"),
    (329, "SSp-bfd", "Primary somatosensory area barrel field", 322, "188064"),
    (981, "SSp-bfd1", "Primary somatosensory area barrel field layer 1", 329, "188064"),
    (201, "SSp-bfd2/3", "Primary somatosensory area barrel field layer 2/3", 329, "188064"),
    (1047, "SSp-bfd4", "Primary somatosensory area barrel field layer 4", 329, "188064"),
    (1070, "SSp-bfd5", "Primary somatosensory area barrel field layer 5", 329, "188064"),
    (1038, "SSp-bfd6a", "Primary somatosensory area barrel field layer 6a", 329, "188064"),
    (1062, "SSp-bfd6b", "Primary somatosensory area barrel field layer 6b", 329, "188064"),
    (669, "VIS", "Visual areas", 315, "08858C"),
    (385, "VISp", "Primary visual area", 669, "08858C"),
    (593, "VISp1", "Primary visual area layer 1", 385, "08858C"),
    (821, "VISp2/3", "Primary visual area layer 2/3", 385, "08858C"),
    (721, "VISp4", "Primary visual area layer 4", 385, "08858C"),
    (778, "VISp5", "Primary visual area layer 5", 385, "08858C"),
    (33, "VISp6a", "Primary visual area layer 6a", 385, "08858C"),
    (305, "VISp6b", "Primary visual area layer 6b", 385, "08858C"),
    (698, "OLF", "Olfactory areas", 695, "9AD2BD"),
    (507, "MOB", "Main olfactory bulb", 698, "9AD2BD"),
    (1089, "HPF", "Hippocampal formation", 695, "7ED04B"),
    (1080, "HIP", "Hippocampal region", 1089, "7ED04B"),
    (375, "CA", "Ammon's horn", 1080, "7ED04B"),
    (382, "CA1", "Field CA1", 375, "7ED04B"),
    (726, "DG", "Dentate gyrus", 1080, "7ED04B"),
    (623, "CNU", "Cerebral nuclei", 567, "98D6F9"),
    (477, "STR", "Striatum", 623, "98D6F9"),
    (485, "STRd", "Striatum dorsal region", 477, "98D6F9"),
    (672, "CP", "Caudoputamen", 485, "98D6F9"),
    (343, "BS", "Brain stem", 8, "FF7080"),
    (1129, "IB", "Interbrain", 343, "FF7080"),
    (549, "TH", "Thalamus", 1129, "FF7080"),
    (1097, "HY", "Hypothalamus", 1129, "E64438"),
    (313, "MB", "Midbrain", 343, "FF64FF"),
    (1065, "HB", "Hindbrain", 343, "FF9B88"),
    (512, "CB", "Cerebellum", 8, "F0F080"),
    (1009, "fiber tracts", "fiber tracts", 997, "CCCCCC"),
    (73, "VS", "ventricular systems", 997, "AAAAAA"),
    (81, "VL", "lateral ventricle", 73, "AAAAAA"),
]

# Cortical layers by depth below the pial surface (µm): name, top, bottom.
_LAYERS = (
    ("1", 0, 120),
    ("2/3", 120, 400),
    ("4", 400, 550),
    ("5", 550, 850),
    ("6a", 850, 1100),
    ("6b", 1100, 1200),
)
_AREAS = (("MOp", 0, 4000), ("SSp-bfd", 4000, 6500), ("VISp", 6500, 1e9))

# Template grey values, like two-photon autofluorescence (white matter bright, ventricles dark).
_TEMPLATE_VALUE = {
    "grey": 120,
    "MOB": 95,
    "CP": 135,
    "TH": 155,
    "HY": 115,
    "MB": 165,
    "HB": 175,
    "CB": 90,
    "CA1": 75,
    "DG": 60,
    "fiber tracts": 225,
    "VL": 15,
    "1": 145,
    "2/3": 105,
    "4": 125,
    "5": 98,
    "6a": 118,
    "6b": 150,
}


def _ellipsoid(
    axes: tuple[np.ndarray, ...], center: Sequence[float], radii: Sequence[float]
) -> np.ndarray:
    return sum(((a - c) / r) ** 2 for a, c, r in zip(axes, center, radii, strict=True)) <= 1.0


def _bilateral(axes, center, radii) -> np.ndarray:
    ap, dv, ml = center
    off = ml - MIDLINE_UM
    return _ellipsoid(axes, (ap, dv, MIDLINE_UM - off), radii) | _ellipsoid(
        axes, (ap, dv, MIDLINE_UM + off), radii
    )


@dataclass
class _Anatomy:
    """Masks and depth of the phantom at one resolution (internal)."""

    annotation: np.ndarray
    depth_um: np.ndarray
    layer: np.ndarray  # index into _LAYERS + 1 inside cortex, 0 elsewhere


def _anatomy(resolution_um: float) -> _Anatomy:
    shape = tuple(round(e / resolution_um) for e in CCF_EXTENT_UM)
    axes = tuple(
        (np.arange(n) * resolution_um).reshape([-1 if i == d else 1 for i in range(3)])
        for d, n in enumerate(shape)
    )
    ap, dv, ml = axes
    fore = _ellipsoid(axes, (5200, 4100, MIDLINE_UM), (3900, 3100, 4700))
    hind = _ellipsoid(axes, (10100, 4400, MIDLINE_UM), (2400, 2900, 3400))
    bulb = _ellipsoid(axes, (1500, 4200, MIDLINE_UM), (1200, 1500, 1500))
    brain = fore | hind | bulb
    depth = ndi.distance_transform_edt(brain).astype(np.float32) * resolution_um
    ids = {acr: sid for sid, acr, *_ in _STRUCTURES}
    ann = np.zeros(shape, dtype=np.uint32)
    ann[brain] = ids["grey"]
    ann[hind & ~fore] = ids["HB"]
    ann[hind & ~fore & _ellipsoid(axes, (10500, 3200, MIDLINE_UM), (1700, 1600, 3100))] = ids["CB"]
    ann[bulb & ~fore] = ids["MOB"]
    ann[_ellipsoid(axes, (8300, 4500, MIDLINE_UM), (1100, 1400, 1900)) & brain] = ids["MB"]
    ann[_ellipsoid(axes, (6300, 4300, MIDLINE_UM), (1300, 1000, 1600))] = ids["TH"]
    ann[_ellipsoid(axes, (5400, 6100, MIDLINE_UM), (1500, 700, 900))] = ids["HY"]
    ann[_bilateral(axes, (4200, 4000, MIDLINE_UM + 2200), (1400, 1300, 1200))] = ids["CP"]
    hip = _bilateral(axes, (6800, 2800, MIDLINE_UM + 1700), (1300, 700, 1300)) & (depth > 1400)
    ann[hip] = ids["CA1"]
    ann[hip & _bilateral(axes, (6800, 2900, MIDLINE_UM + 1700), (800, 380, 800))] = ids["DG"]
    ann[_bilateral(axes, (4400, 3300, MIDLINE_UM + 1100), (900, 260, 260))] = ids["VL"]
    cortex_zone = fore & ~bulb & (ap > 1800) & (ap < 8800) & (dv < 5000)
    ann[cortex_zone & (depth >= 1200) & (depth < 1400)] = ids["fiber tracts"]
    layer = np.zeros(shape, dtype=np.int8)
    for area, ap_lo, ap_hi in _AREAS:
        in_area = cortex_zone & (ap >= ap_lo) & (ap < ap_hi)
        for i, (name, top, bottom) in enumerate(_LAYERS, start=1):
            if area == "MOp" and name == "4":
                name = "2/3"
            sel = in_area & (depth >= top) & (depth < bottom)
            ann[sel] = ids[area + name]
            layer[sel] = i
    return _Anatomy(ann, depth, layer)


def _template(anat: _Anatomy, resolution_um: float, rng: np.random.Generator) -> np.ndarray:
    by_id = {sid: acr for sid, acr, *_ in _STRUCTURES}
    values = np.zeros(max(by_id) + 1, dtype=np.float32)
    for sid, acr in by_id.items():
        values[sid] = _TEMPLATE_VALUE.get(acr, _TEMPLATE_VALUE["grey"])
    template = values[anat.annotation]
    layer_value = np.array([0] + [_TEMPLATE_VALUE[n] for n, *_ in _LAYERS], dtype=np.float32)
    in_ctx = anat.layer > 0
    template[in_ctx] = layer_value[anat.layer[in_ctx]]
    shading = 0.08 * _smooth_noise(anat.annotation.shape, resolution_um, 400.0, rng)
    texture = ndi.gaussian_filter(
        rng.standard_normal(anat.annotation.shape).astype(np.float32), 0.8
    )
    texture *= 0.05 / max(float(texture.std()), 1e-6)
    template *= 1 + shading + texture
    template[anat.annotation == 0] = 0
    return ndi.gaussian_filter(template, 0.7)


def _ontology() -> Ontology:
    return ontology_from_rows(_STRUCTURES, "phantom")


def phantom_atlas(resolution_um: float = 50.0, *, seed: int = 0) -> Atlas:
    """The phantom atlas: annotation, template and ontology on the CCF grid."""
    anat = _anatomy(resolution_um)
    template = _template(anat, resolution_um, np.random.default_rng(seed))
    return Atlas(anat.annotation, template, float(resolution_um), _ontology(), False, "phantom")


# --- cell types --------------------------------------------------------------------------

# name → (class, neurotransmitter, abundance, weights by region/layer key, extra modifier)
# keys: layer names ("1", "2/3", ...) within cortex, or structure acronyms; "*" = any grey matter.
_TYPES: dict[str, tuple[str, str, float, dict[str, float], str]] = {
    "L2/3 IT CTX Glut": ("IT-ET Glut", "Glut", 3.0, {"2/3": 1.0, "4": 0.15}, ""),
    "L4/5 IT CTX Glut": ("IT-ET Glut", "Glut", 2.5, {"4": 1.0, "5": 0.35}, "sensory"),
    "L5 IT CTX Glut": ("IT-ET Glut", "Glut", 1.5, {"5": 1.0, "4": 0.1}, ""),
    "L5 ET CTX Glut": ("IT-ET Glut", "Glut", 1.0, {"5": 1.0}, "motor"),
    "L5 NP CTX Glut": ("NP-CT-L6b Glut", "Glut", 0.5, {"5": 0.5, "6a": 0.6}, ""),
    "L6 CT CTX Glut": ("NP-CT-L6b Glut", "Glut", 2.0, {"6a": 1.0, "6b": 0.2}, ""),
    "L6 IT CTX Glut": ("IT-ET Glut", "Glut", 1.0, {"6a": 0.7, "5": 0.3}, ""),
    "L6b CTX Glut": ("NP-CT-L6b Glut", "Glut", 0.4, {"6b": 1.0}, ""),
    "CLA-EPd-CTX Car3 Glut": ("IT-ET Glut", "Glut", 0.3, {"6a": 1.0, "6b": 1.0}, "lateral"),
    "Pvalb Gaba": ("CTX-CGE GABA", "GABA", 1.0, {"2/3": 0.6, "4": 1.0, "5": 1.0, "6a": 0.6}, ""),
    "Pvalb chandelier Gaba": ("CTX-CGE GABA", "GABA", 0.15, {"2/3": 1.0}, ""),
    "Sst Gaba": ("CTX-MGE GABA", "GABA", 0.9, {"2/3": 0.3, "5": 1.0, "6a": 0.8}, ""),
    "Sst Chodl Gaba": ("CTX-MGE GABA", "GABA", 0.05, {"6b": 1.0, "fiber tracts": 0.5}, ""),
    "Vip Gaba": ("CTX-CGE GABA", "GABA", 0.7, {"1": 0.3, "2/3": 1.0, "4": 0.2}, ""),
    "Lamp5 Gaba": ("CTX-CGE GABA", "GABA", 0.5, {"1": 1.0, "2/3": 0.4}, ""),
    "Lamp5 Lhx6 Gaba": ("CTX-MGE GABA", "GABA", 0.15, {"5": 0.5, "6a": 1.0}, ""),
    "Sncg Gaba": ("CTX-CGE GABA", "GABA", 0.2, {"1": 1.0, "2/3": 0.6}, ""),
    "Astro-TE NN": ("Astro-Epen", "NN", 2.0, {"*": 1.0, "fiber tracts": 0.5}, ""),
    "Oligo NN": ("OPC-Oligo", "NN", 2.0, {"fiber tracts": 1.0, "*": 0.15}, ""),
    "OPC NN": ("OPC-Oligo", "NN", 0.6, {"*": 1.0}, ""),
    "Microglia NN": ("Immune", "NN", 0.8, {"*": 1.0}, "smooth"),
    "Endo NN": ("Vascular", "NN", 1.0, {"*": 1.0}, "vessels"),
    "Peri NN": ("Vascular", "NN", 0.3, {"*": 1.0}, "vessels"),
    "SMC NN": ("Vascular", "NN", 0.15, {"*": 1.0}, "vessels"),
    "VLMC NN": ("Vascular", "NN", 0.2, {"*": 1.0}, "surface"),
    "ABC NN": ("Vascular", "NN", 0.1, {"*": 1.0}, "surface"),
    "Lymphoid NN": ("Immune", "NN", 0.03, {"*": 1.0}, ""),
    "STR D1 Gaba": ("CNU-LGE GABA", "GABA", 2.0, {"CP": 1.0}, "medial"),
    "STR D2 Gaba": ("CNU-LGE GABA", "GABA", 2.0, {"CP": 1.0}, "lateral"),
    "TH Prkcd Grin2c Glut": ("TH Glut", "Glut", 1.5, {"TH": 1.0}, ""),
    "HY Gnrh1 Glut": ("HY Glut", "Glut", 0.6, {"HY": 1.0}, ""),
    "MB Glut": ("MB Glut", "Glut", 1.0, {"MB": 1.0}, ""),
    "CB Granule Glut": ("CB Glut", "Glut", 3.0, {"CB": 1.0}, ""),
    "DG Glut": ("DG-IMN Glut", "Glut", 1.0, {"DG": 1.0}, ""),
    "CA1-ProS Glut": ("HPF Glut", "Glut", 1.0, {"CA1": 1.0}, ""),
    "OB-in Frmd7 Gaba": ("OB-IMN GABA", "GABA", 1.5, {"MOB": 1.0}, ""),
    "HB Glut": ("HB Glut", "Glut", 1.2, {"HB": 1.0}, ""),
}


def _type_weights(
    name: str, anat: _Anatomy, resolution_um: float, rng: np.random.Generator
) -> np.ndarray:
    _, _, _, weights, modifier = _TYPES[name]
    acronyms = {sid: acr for sid, acr, *_ in _STRUCTURES}
    lut = np.zeros(max(acronyms) + 1, dtype=np.float32)
    if "*" in weights:
        lut[[sid for sid in acronyms if sid != 0]] = weights["*"]
    for key, w in weights.items():
        sid = next((s for s, a in acronyms.items() if a == key), None)
        if sid is not None:
            lut[sid] = w
    for vs in ("VL",):
        lut[next(s for s, a in acronyms.items() if a == vs)] = 0
    density = lut[anat.annotation]
    layer_lut = np.array([0.0] + [weights.get(n, 0.0) for n, *_ in _LAYERS], dtype=np.float32)
    in_ctx = anat.layer > 0
    density[in_ctx] = layer_lut[anat.layer[in_ctx]]
    shape = anat.annotation.shape
    ap = (np.arange(shape[0]) * resolution_um)[:, None, None]
    ml = (np.arange(shape[2]) * resolution_um)[None, None, :]
    lateral = np.abs(ml - MIDLINE_UM) / (CCF_EXTENT_UM[2] / 2)
    if modifier == "motor":
        density = density * np.where(ap < 4000, 2.5, 0.6)
    elif modifier == "sensory":
        density = density * np.where(ap < 4000, 0.15, 1.0)
    elif modifier == "lateral":
        density = density * lateral**3
    elif modifier == "medial":
        density = density * np.clip(1.4 - lateral * 2, 0.05, None)
    elif modifier == "surface":
        density = density * np.exp(-anat.depth_um / 150.0)
    scale = {"smooth": 600.0, "vessels": 150.0}.get(modifier, 300.0)
    density *= np.exp(0.25 * _smooth_noise(shape, resolution_um, scale, rng))
    return density.astype(np.float32)


def _smooth_noise(
    shape: tuple[int, ...], resolution_um: float, scale_um: float, rng: np.random.Generator
) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed at ``scale_um``, made on a coarse grid."""
    step = max(1, int(scale_um / resolution_um / 2))
    coarse_shape = tuple(-(-n // step) + 1 for n in shape)
    noise = ndi.gaussian_filter(rng.standard_normal(coarse_shape), scale_um / resolution_um / step)
    noise = (noise / max(float(noise.std()), 1e-9)).astype(np.float32)
    for axis, n in enumerate(shape):
        pos = np.arange(n) / step
        lo = np.floor(pos).astype(int)
        weights = np.zeros((n, noise.shape[axis]), dtype=np.float32)
        weights[np.arange(n), lo] = 1 - (pos - lo)
        weights[np.arange(n), lo + 1] += pos - lo
        noise = np.moveaxis(np.tensordot(weights, noise, axes=([1], [axis])), 0, axis)
    return noise


def _sample_points(
    density: np.ndarray, n: int, resolution_um: float, rng: np.random.Generator
) -> np.ndarray:
    cdf = np.cumsum(density.ravel(), dtype=np.float64)
    if cdf[-1] <= 0:
        raise ValueError("cannot sample from an all-zero density")
    flat = np.searchsorted(cdf, rng.uniform(0, cdf[-1], n), side="right")
    idx = np.stack(np.unravel_index(flat, density.shape), axis=1).astype(np.float64)
    return (idx + rng.uniform(-0.5, 0.5, idx.shape)) * resolution_um


@dataclass
class PhantomTypes:
    """The phantom cell-type atlas: names, taxonomy and a density sampler."""

    names: list[str]
    taxonomy: pd.DataFrame  # one row per subclass: class, neurotransmitter, subclass, ...
    densities: dict[str, np.ndarray]
    resolution_um: float

    def sample(self, name: str, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` cells of type ``name`` in CCF µm."""
        return _sample_points(self.densities[name], n, self.resolution_um, rng)


def phantom_cell_types(atlas_resolution_um: float = 50.0, *, seed: int = 0) -> PhantomTypes:
    """Spatial densities of the phantom's cell types (27 VISp subclasses + subcortical types)."""
    anat = _anatomy(atlas_resolution_um)
    rng = np.random.default_rng(seed + 1)
    names = list(_TYPES)
    densities = {n: _type_weights(n, anat, atlas_resolution_um, rng) for n in names}
    rows = []
    classes = sorted({v[0] for v in _TYPES.values()})
    for i, name in enumerate(names, start=1):
        cls, nt, *_ = _TYPES[name]
        subclass = f"{i:03d} {name}"
        rows.append(
            {
                "subclass": subclass,
                "class": f"{classes.index(cls) + 1:02d} {cls}",
                "neurotransmitter": nt,
                "supertype": f"{i:04d} {name}_1",
                "cluster": f"{i:04d} {name}_1",
                "cluster_alias": i,
            }
        )
    return PhantomTypes(names, pd.DataFrame(rows), densities, atlas_resolution_um)


def write_abc(
    directory: Path, types: PhantomTypes, *, n_cells: int, rng: np.random.Generator
) -> None:
    """Write an ABC-layout cell atlas (``abc_atlas_access`` cache layout) of the phantom types."""
    abundance = np.array([_TYPES[n][2] for n in types.names])
    counts = rng.multinomial(n_cells, abundance / abundance.sum())
    coords, alias = [], []
    for i, (name, count) in enumerate(zip(types.names, counts, strict=True)):
        coords.append(types.sample(name, int(count), rng))
        alias.append(np.full(count, types.taxonomy.loc[i, "cluster_alias"]))
    xyz = np.concatenate(coords) / 1000.0
    alias_all = np.concatenate(alias)
    labels = [f"phantom-{i:07d}" for i in range(len(xyz))]
    meta_dir = directory / "metadata" / ABC_DATASET / ABC_VERSION
    ccf_dir = directory / "metadata" / f"{ABC_DATASET}-CCF" / ABC_VERSION
    tax_dir = directory / "metadata" / "WMB-taxonomy" / ABC_VERSION / "views"
    for d in (meta_dir, ccf_dir, tax_dir):
        d.mkdir(parents=True, exist_ok=True)
    donors = np.where(rng.random(len(xyz)) < 0.5, "phantom-donor-1", "phantom-donor-2")
    pd.DataFrame({"cell_label": labels, "cluster_alias": alias_all, "donor_label": donors}).to_csv(
        meta_dir / "cell_metadata.csv", index=False
    )
    pd.DataFrame(
        {
            "cell_label": labels,
            "x": xyz[:, 0].round(5),
            "y": xyz[:, 1].round(5),
            "z": xyz[:, 2].round(5),
            "parcellation_index": 0,
        }
    ).to_csv(ccf_dir / "ccf_coordinates.csv", index=False)
    types.taxonomy[
        ["cluster_alias", "neurotransmitter", "class", "subclass", "supertype", "cluster"]
    ].to_csv(tax_dir / "cluster_to_cluster_annotation_membership_pivoted.csv", index=False)


# --- brains --------------------------------------------------------------------------------


@dataclass
class PhantomBrain:
    """How one phantom brain is cut, deformed and labeled."""

    brain_id: str
    mixture: dict[str, float]
    n_sections: int = 18
    section_spacing_um: float = 550.0
    first_ap_um: float = 1200.0
    reverse: bool = False
    angles_deg: tuple[float, float] = (0.0, 0.0)  # (about DV: AP varies with ML, about ML)
    missing: tuple[int, ...] = ()
    damaged: tuple[int, ...] = ()
    n_labeled: int = 40000
    seed: int = 0


@dataclass
class WorldConfig:
    """Everything that defines a phantom world; equal configs give identical worlds."""

    seed: int = 0
    atlas_resolution_um: float = 50.0
    pixel_size_um: float = 8.0
    n_levels: int = 4
    cell_diameter_um: float = 16.0
    section_thickness_um: float = 30.0
    n_abc_cells: int = 150_000
    frame_um: tuple[float, float, float, float] = (300.0, 11100.0, 300.0, 7700.0)
    inplane_rotation_deg: float = 4.0
    inplane_scale: float = 0.05
    inplane_shift_um: float = 250.0
    nonlinear_um: float = 40.0
    brains: list[PhantomBrain] = field(default_factory=list)
    realism: Realism = field(default_factory=lambda: Realism.easy())

    @classmethod
    def demo(
        cls, seed: int = 0, *, max_angle_deg: float = 3.0, realism: Realism | None = None
    ) -> WorldConfig:
        """Three brains: two single planted types and one mixture, cut at different angles.

        Each brain misses one section and has one damaged (torn) section. Imaged with
        ``Realism.realistic()`` unless ``realism`` says otherwise (``Realism.easy()``: the
        original bright-cells phantom).
        """
        rng = np.random.default_rng(seed + 100)

        def angles() -> tuple[float, float]:
            pair = rng.uniform(-max_angle_deg, max_angle_deg, 2)
            return tuple(float(a) for a in pair)  # type: ignore[return-value]

        return cls(
            seed=seed,
            realism=realism or Realism.realistic(),
            brains=[
                PhantomBrain(
                    "demo-1",
                    {"L6 CT CTX Glut": 1.0},
                    angles_deg=angles(),
                    missing=(7,),
                    damaged=(12,),
                    seed=seed + 1,
                ),
                PhantomBrain(
                    "demo-2",
                    {"STR D1 Gaba": 1.0},
                    angles_deg=angles(),
                    reverse=True,
                    first_ap_um=1500.0,
                    missing=(3,),
                    damaged=(10,),
                    seed=seed + 2,
                ),
                PhantomBrain(
                    "demo-3",
                    {"L2/3 IT CTX Glut": 0.7, "Sst Gaba": 0.3},
                    angles_deg=angles(),
                    missing=(14,),
                    damaged=(5,),
                    seed=seed + 3,
                ),
            ],
        )

    @classmethod
    def tiny(cls, seed: int = 0, *, realism: Realism | None = None) -> WorldConfig:
        """A small world for tests: coarse atlas and pixels, one brain with few sections.

        Imaged with ``Realism.easy()`` unless ``realism`` says otherwise.
        """
        return cls(
            seed=seed,
            realism=realism or Realism.easy(),
            atlas_resolution_um=100.0,
            pixel_size_um=20.0,
            n_levels=3,
            cell_diameter_um=45.0,
            section_thickness_um=60.0,
            n_abc_cells=60_000,
            nonlinear_um=30.0,
            brains=[
                PhantomBrain(
                    "7001",
                    {"L6 CT CTX Glut": 1.0},
                    n_sections=10,
                    section_spacing_um=800.0,
                    first_ap_um=1500.0,
                    angles_deg=(1.5, -1.0),
                    missing=(4,),
                    damaged=(7,),
                    n_labeled=12000,
                    seed=seed + 1,
                ),
            ],
        )


@dataclass
class _Section:
    anchor: SectionAnchor
    affine: np.ndarray  # 2×2, frame µm → plane µm
    shift: np.ndarray  # (2,) µm
    displacement: np.ndarray  # plane waves (n, 5): kx, ky (rad/µm), phase, amp_x, amp_y (µm)
    ap_um: float


class _Cutter:
    """Maps between a section's pixels and CCF µm for one phantom brain."""

    def __init__(self, config: WorldConfig, brain: PhantomBrain) -> None:
        self.config = config
        self.brain = brain
        ml0, ml1, dv0, dv1 = config.frame_um
        self.origin = np.array([ml0, dv0])
        self.width = int(round((ml1 - ml0) / config.pixel_size_um))
        self.height = int(round((dv1 - dv0) / config.pixel_size_um))
        self.center = np.array([self.width, self.height]) * config.pixel_size_um / 2
        self.tan = np.tan(np.radians(brain.angles_deg))
        rng = np.random.default_rng(brain.seed)
        self.sections: list[_Section] = []
        for k in range(brain.n_sections):
            step = brain.n_sections - 1 - k if brain.reverse else k
            ap = brain.first_ap_um + step * brain.section_spacing_um
            theta = np.radians(rng.uniform(-1, 1) * config.inplane_rotation_deg)
            scale = 1 + rng.uniform(-1, 1, 2) * config.inplane_scale
            rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
            affine = rot @ np.diag(scale)
            shift = rng.uniform(-1, 1, 2) * config.inplane_shift_um
            n_waves = 4
            direction = rng.uniform(0, 2 * np.pi, n_waves)
            wavenumber = 2 * np.pi / rng.uniform(3000, 8000, n_waves)
            amplitude = rng.normal(0, 1, (n_waves, 2)) * config.nonlinear_um * np.sqrt(2 / n_waves)
            coarse = np.column_stack(
                [
                    wavenumber * np.cos(direction),
                    wavenumber * np.sin(direction),
                    rng.uniform(0, 2 * np.pi, n_waves),
                    amplitude,
                ]
            )
            anchor = self._anchor(k, ap, affine, shift)
            self.sections.append(_Section(anchor, affine, shift, coarse, ap))

    def _plane_ccf(self, k_ap: float, plane_xy_um: np.ndarray) -> np.ndarray:
        ml = self.origin[0] + plane_xy_um[:, 0]
        dv = self.origin[1] + plane_xy_um[:, 1]
        ap = k_ap + self.tan[0] * (ml - MIDLINE_UM) + self.tan[1] * (dv - 4000.0)
        return np.stack([ap, dv, ml], axis=1)

    def _anchor(self, k: int, ap: float, affine: np.ndarray, shift: np.ndarray) -> SectionAnchor:
        p = self.config.pixel_size_um
        corners = np.array([[0, 0], [self.width, 0], [0, self.height]], dtype=float) * p
        plane = (corners - self.center) @ affine.T + self.center + shift
        q = ccf_to_quicknii(self._plane_ccf(ap, plane))
        o, u, v = q[0], q[1] - q[0], q[2] - q[0]
        return SectionAnchor(
            filename=f"{self.brain.brain_id}_s{k:03d}.png",
            nr=k,
            width=self.width,
            height=self.height,
            anchoring=np.concatenate([o, u, v]),
        )

    def _displacement(self, k: int, frame_um: np.ndarray) -> np.ndarray:
        """Smooth in-plane displacement (µm): a sum of long-wavelength plane waves."""
        waves = self.sections[k].displacement  # rows: kx, ky, phase, amp_x, amp_y
        phase = frame_um @ waves[:, :2].T + waves[:, 2]
        return np.sin(phase) @ waves[:, 3:5]

    def frame_to_plane(self, k: int, frame_um: np.ndarray) -> np.ndarray:
        s = self.sections[k]
        return (
            (frame_um - self.center) @ s.affine.T
            + self.center
            + s.shift
            + self._displacement(k, frame_um)
        )

    def pixels_to_ccf(self, k: int, xy_px: np.ndarray) -> np.ndarray:
        plane = self.frame_to_plane(k, np.asarray(xy_px, float) * self.config.pixel_size_um)
        return self._plane_ccf(self.sections[k].ap_um, plane)

    def ccf_to_pixels(self, k: int, ccf_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Section pixels of points and their distance (µm, along AP) from the section plane."""
        s = self.sections[k]
        ccf = np.asarray(ccf_um, float)
        plane = np.stack([ccf[:, 2] - self.origin[0], ccf[:, 1] - self.origin[1]], axis=1)
        plane_ap = self._plane_ccf(s.ap_um, plane)[:, 0]
        inv = np.linalg.inv(s.affine)
        frame = (plane - self.center - s.shift) @ inv.T + self.center
        for _ in range(30):
            frame = (
                plane - self.center - s.shift - self._displacement(k, frame)
            ) @ inv.T + self.center
        return frame / self.config.pixel_size_um, ccf[:, 0] - plane_ap


# --- realistic rendering -------------------------------------------------------------------


@dataclass(frozen=True)
class Realism:
    """How a phantom section is imaged: noise, background, illumination and artefacts.

    ``Realism.easy()`` is the original rendering (bright cells on a flat, weakly textured
    background; kept bit-identical, the other fields are then unused). ``Realism.realistic()``
    (the field defaults) imitates a 16-bit fluorescence slide scanner. All intensities are
    counts; ``I`` below is the expected value of a pixel.

    Noise (Poisson–Gaussian): ``value = offset + gain · Poisson((I − offset) / gain) +
    N(0, read_noise²)``, rounded and clipped to ``[0, saturation]``, so
    ``var = gain · (I − offset) + read_noise²``. The *noise σ* of a pixel is that at its
    background level (``I`` without cells, streaks and specks).

    Background: tissue autofluorescence ``auto_level · t · (1 + texture · T)`` (``t`` = the
    template value / 120, i.e. 1 in grey matter, ~1.9 in fibre tracts; ``T`` multi-scale smooth
    noise of unit σ at 4–600 µm, scales below half a pixel left out) plus ``glass`` everywhere;
    the signal channel gets ``bleed`` × that autofluorescence (bleed-through) plus an
    independently textured non-specific stain ``stain · t · (1 + texture · T')``. Both are
    multiplied by the illumination ``(1 + illumination · smooth noise at 2 mm) × tile
    vignetting`` (scanner tiles of ``tile_um``, ``1 − vignetting · (u² + v²) / 2`` with
    ``u, v ∈ [−1, 1]`` across a tile, each tile × N(1, ``tile_jitter``)) and by a per-section,
    per-channel gain uniform in ``[1 − section_gain, 1 + section_gain]``.

    Cells: elliptical Gaussians, σ = radius / 1.3 (diameter × lognormal(``cell_size_spread``),
    axis ratio down to ``1 − cell_elongation``), blurred by the pixel (σ² + 1/12 px²). The
    in-focus peak is ``snr₀ · noise σ`` at the cell, ``snr₀`` log-uniform in ``cell_snr``; a
    fraction ``out_of_focus`` is blurred further by σ_b = U(``defocus``) × radius (same total
    brightness, lower peak). The truth's ``snr`` is the rendered expected peak / noise σ.
    Cells show in the autofluorescence at ``crosstalk`` × their signal.

    Streaks (neurites, fibres): smooth random curves (persistence 300 µm, length log-uniform in
    ``streak_length_um``), ``streak_width_um`` FWHM, beaded (amplitude × lognormal along the
    curve at 5 µm), starting where the tissue is bright (∝ t², so mostly in fibre tracts),
    ``streaks_per_mm2`` of tissue; peak at object scale log-uniform in ``streak_snr`` noise
    units (thinner than a pixel → diluted by the pixel); ``streak_auto`` × as bright in the
    autofluorescence.

    Specks (dust, debris, lipofuscin; not cells): bright in both channels, the
    autofluorescence at log-uniform(``speck_auto_ratio``) × the signal counts; object-scale
    peak log-uniform in ``speck_snr`` noise units. ``specks_per_mm2`` = (small 0.8–3 µm
    granules in tissue, cell-sized 8–20 µm clusters of 3–10 granules in tissue, large 30–120 µm
    irregular debris of 3–8 blobs anywhere in the field).
    """

    preset: str = "realistic"
    gain: float = 2.0
    read_noise: float = 6.0
    offset: float = 100.0
    saturation: float = 65535.0
    glass: float = 20.0
    auto_level: float = 1000.0
    texture: float = 0.25
    bleed: float = 0.3
    stain: float = 80.0
    illumination: float = 0.12
    vignetting: float = 0.2
    tile_um: float = 1000.0
    tile_jitter: float = 0.03
    section_gain: float = 0.3
    cell_snr: tuple[float, float] = (3.0, 40.0)
    cell_size_spread: float = 0.15
    cell_elongation: float = 0.35
    out_of_focus: float = 0.15
    defocus: tuple[float, float] = (0.5, 1.5)
    crosstalk: float = 0.03
    streaks_per_mm2: float = 8.0
    streak_length_um: tuple[float, float] = (100.0, 800.0)
    streak_width_um: float = 2.0
    streak_snr: tuple[float, float] = (2.0, 12.0)
    streak_auto: float = 0.3
    specks_per_mm2: tuple[float, float, float] = (20.0, 4.0, 0.3)
    speck_snr: tuple[float, float] = (5.0, 80.0)
    speck_auto_ratio: tuple[float, float] = (0.7, 3.0)

    def __post_init__(self) -> None:
        if self.preset not in ("easy", "realistic"):
            raise ValueError(f"Realism.preset must be 'easy' or 'realistic', not {self.preset!r}")

    @classmethod
    def easy(cls) -> Realism:
        """The original phantom rendering (bright cells, flat background)."""
        return cls(preset="easy")

    @classmethod
    def realistic(cls) -> Realism:
        """A 16-bit slide scanner's section (the field defaults)."""
        return cls()

    @classmethod
    def flat(cls, **changes: object) -> Realism:
        """The realistic camera and background level with every spatial effect off (texture,
        illumination, vignetting, tile seams, section gain, streaks, specks), then
        ``changes``: noise and a flat background, for measuring one effect at a time."""
        off = dict(
            texture=0.0,
            illumination=0.0,
            vignetting=0.0,
            tile_jitter=0.0,
            section_gain=0.0,
            streaks_per_mm2=0.0,
            specks_per_mm2=(0.0, 0.0, 0.0),
        )
        return replace(cls.realistic(), **{**off, **changes})

    @classmethod
    def from_dict(cls, doc: Mapping) -> Realism:
        """Back from ``dataclasses.asdict`` / JSON (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})


_SPECK_KINDS = ("small", "cell", "large")


def _loguniform(rng: np.random.Generator, bounds: Sequence[float], n: int) -> np.ndarray:
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    return np.exp(rng.uniform(lo, hi, n))


def _smooth_field(
    shape: tuple[int, int], pixel_um: float, scale_um: float, rng: np.random.Generator
) -> np.ndarray:
    """2-D Gaussian-smoothed white noise of unit σ at ``scale_um`` (any scale vs the field).

    Made on a coarse grid padded by 4 σ (so fields smaller than the scale are a piece of a
    larger random field) and normalised by the kernel's exact L2 norm, not by the sample.
    """
    sigma_px = scale_um / pixel_um
    step = max(1.0, sigma_px / 2)
    sigma_c = sigma_px / step
    pad = int(np.ceil(4 * sigma_c)) + 1
    coarse = rng.standard_normal(tuple(int(np.ceil(n / step)) + 2 + 2 * pad for n in shape))
    smooth = ndi.gaussian_filter(coarse, sigma_c, truncate=4.0)
    radius = int(4.0 * sigma_c + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_c) ** 2)
    smooth /= float(np.sum((k / k.sum()) ** 2))
    if step == 1.0:
        return smooth[pad : pad + shape[0], pad : pad + shape[1]].astype(np.float32)
    for axis, n in enumerate(shape):  # separable linear interpolation
        pos = pad + np.arange(n) / step
        lo = np.floor(pos).astype(int)
        frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(2)])
        smooth = (
            np.take(smooth, lo, axis=axis) * (1 - frac) + np.take(smooth, lo + 1, axis=axis) * frac
        )
    return smooth.astype(np.float32)


def _texture(shape: tuple[int, int], pixel_um: float, rng: np.random.Generator) -> np.ndarray:
    """Multi-scale smooth noise of unit σ (4–600 µm; scales under half a pixel left out)."""
    scales = (4.0, 12.0, 40.0, 150.0, 600.0)
    weights = (0.5, 0.6, 0.7, 0.6, 0.5)
    total = np.zeros(shape, dtype=np.float32)
    power = 0.0
    for s, w in zip(scales, weights, strict=True):
        if s / pixel_um < 0.5:
            continue
        total += w * _smooth_field(shape, pixel_um, s, rng)
        power += w * w
    return total / np.float32(np.sqrt(max(power, 1e-12)))


def _illumination(
    shape: tuple[int, int], pixel_um: float, r: Realism, rng: np.random.Generator
) -> np.ndarray:
    """Smooth multiplicative field × per-tile vignetting and tile gain jitter."""
    field_ = 1 + r.illumination * _smooth_field(shape, pixel_um, 2000.0, rng)
    tile = r.tile_um / pixel_um
    y0, x0 = rng.uniform(0, tile, 2)
    yy = (np.arange(shape[0]) + y0) / tile
    xx = (np.arange(shape[1]) + x0) / tile
    ty, tx = np.floor(yy).astype(int), np.floor(xx).astype(int)
    v = 2 * (yy - ty) - 1
    u = 2 * (xx - tx) - 1
    vignette = 1 - r.vignetting * (u[None, :] ** 2 + v[:, None] ** 2) / 2
    jitter = rng.normal(1, r.tile_jitter, (ty.max() + 1, tx.max() + 1))
    return (field_ * vignette * jitter[ty][:, tx]).astype(np.float32)


def _splat(
    shape: tuple[int, int],
    xy: np.ndarray,
    cov: np.ndarray,
    weights: np.ndarray,
) -> np.ndarray:
    """Sum of Gaussians ``weights[i, c] · exp(−dᵀ cov[i]⁻¹ d / 2)`` into ``c`` images (float64).

    ``xy`` (n, 2) pixel centres (x, y); ``cov`` (n, 2, 2) in px² (x, y order). Blobs are cut
    at 3.5 σ of their widest axis; grouped by reach so each group is one array operation.
    """
    h, w = shape
    n_ch = weights.shape[1]
    out = np.zeros((n_ch, h * w))
    if len(xy) == 0:
        return out.reshape(n_ch, h, w)
    inv = np.linalg.inv(cov)
    widest = np.sqrt(np.linalg.eigvalsh(cov)[:, -1])
    reach = np.clip(np.ceil(3.5 * widest), 1, 4 * max(h, w)).astype(int)
    ix = np.round(xy[:, 0]).astype(int)
    iy = np.round(xy[:, 1]).astype(int)
    for r in np.unique(reach):
        sel = np.flatnonzero(reach == r)
        off = np.arange(-r, r + 1)
        per = len(off) ** 2
        for chunk in np.array_split(sel, max(1, len(sel) * per // 4_000_000 + 1)):
            if len(chunk) == 0:
                continue
            px = ix[chunk, None, None] + off[None, None, :]
            py = iy[chunk, None, None] + off[None, :, None]
            dx = px - xy[chunk, 0, None, None]
            dy = py - xy[chunk, 1, None, None]
            a, b, c = (inv[chunk, i, j, None, None] for i, j in ((0, 0), (0, 1), (1, 1)))
            g = np.exp(-0.5 * (a * dx * dx + 2 * b * dx * dy + c * dy * dy))
            ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
            flat = (py * w + px)[ok]
            for ch in range(n_ch):
                val = (g * weights[chunk, ch, None, None])[ok]
                out[ch] += np.bincount(flat, val, minlength=h * w)
    return out.reshape(n_ch, h, w)


def _isotropic(sigma_px: np.ndarray) -> np.ndarray:
    cov = np.zeros((len(sigma_px), 2, 2))
    cov[:, 0, 0] = cov[:, 1, 1] = np.asarray(sigma_px) ** 2
    return cov


def _streaks(t: np.ndarray, pixel_um: float, r: Realism, rng: np.random.Generator) -> np.ndarray:
    """Beaded curvilinear streaks, peak in noise units at object scale (pixel-diluted)."""
    h, w = t.shape
    area_mm2 = float((t > 0).sum()) * pixel_um**2 / 1e6
    n = rng.poisson(r.streaks_per_mm2 * area_mm2)
    out = np.zeros(t.shape)
    if n == 0:
        return out
    prob = (t.ravel().astype(np.float64)) ** 2
    start = rng.choice(t.size, n, p=prob / prob.sum())
    y0, x0 = np.divmod(start, w)
    length = _loguniform(rng, r.streak_length_um, n)
    amp = _loguniform(rng, r.streak_snr, n)
    ds_um = min(pixel_um / 2, 2.0)
    steps = int(np.ceil(length.max() / ds_um))
    heading = rng.uniform(0, 2 * np.pi, n)[:, None] + np.cumsum(
        rng.normal(0, np.sqrt(ds_um / 300.0), (n, steps)), axis=1
    )
    px = x0[:, None] + np.cumsum(np.cos(heading), axis=1) * ds_um / pixel_um
    py = y0[:, None] + np.cumsum(np.sin(heading), axis=1) * ds_um / pixel_um
    beads = ndi.gaussian_filter1d(rng.standard_normal((n, steps)), 5.0 / ds_um, axis=1)
    beads = np.exp(0.5 * beads / max(float(beads.std()), 1e-9))
    sigma_w = r.streak_width_um / 2.355 / pixel_um
    sigma_eff = np.sqrt(sigma_w**2 + 1 / 12)
    weight = amp[:, None] * beads * np.sqrt(2 * np.pi) * sigma_w * (ds_um / pixel_um)
    keep = (np.arange(steps)[None, :] * ds_um < length[:, None]) & (
        (px >= 0) & (px < w - 1) & (py >= 0) & (py < h - 1)
    )
    px, py, weight = px[keep], py[keep], weight[keep]
    jx, jy = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = px - jx, py - jy
    for ox, oy, f in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy)):
        np.add.at(out, (jy + oy, jx + ox), weight * f)
    np.add.at(out, (jy + 1, jx + 1), weight * fx * fy)
    out = ndi.gaussian_filter(out, sigma_eff)
    return out * (t > 0)


def _specks(
    t: np.ndarray, noise_sigma: np.ndarray, pixel_um: float, r: Realism, rng: np.random.Generator
) -> tuple[np.ndarray, pd.DataFrame]:
    """Dust, debris and lipofuscin bright in both channels: (2, h, w) counts and their table."""
    h, w = t.shape
    tissue_area = float((t > 0).sum()) * pixel_um**2 / 1e6
    field_area = h * w * pixel_um**2 / 1e6
    in_tissue = np.flatnonzero(t.ravel() > 0)
    rows, blobs = [], []
    for kind, density in zip(_SPECK_KINDS, r.specks_per_mm2, strict=True):
        if kind == "large":
            n = rng.poisson(density * field_area)
            x, y = rng.uniform(0, w, n), rng.uniform(0, h, n)
            diam = _loguniform(rng, (30.0, 120.0), n)
        else:
            n = rng.poisson(density * tissue_area) if len(in_tissue) else 0
            pick = rng.choice(in_tissue, n) if n else np.empty(0, int)
            y, x = np.divmod(pick, w)
            x, y = x + rng.uniform(-0.5, 0.5, n), y + rng.uniform(-0.5, 0.5, n)
            diam = _loguniform(rng, (0.8, 3.0) if kind == "small" else (8.0, 20.0), n)
        iy = np.clip(np.round(y).astype(int), 0, h - 1)
        ix = np.clip(np.round(x).astype(int), 0, w - 1)
        snr = _loguniform(rng, r.speck_snr, n)
        peak = snr * noise_sigma[iy, ix]
        ratio = _loguniform(rng, r.speck_auto_ratio, n)
        for i in range(n):
            if kind == "small":
                k, sub_sigma, sub = 1, diam[i] / 2.355, np.zeros((1, 2))
            elif kind == "cell":
                k = int(rng.integers(3, 11))
                sub_sigma = rng.uniform(1.0, 3.0, k) / 2.355
                rad = diam[i] / 2 * np.sqrt(rng.uniform(0, 1, k))
                ang = rng.uniform(0, 2 * np.pi, k)
                sub = np.column_stack([rad * np.cos(ang), rad * np.sin(ang)])
            else:
                k = int(rng.integers(3, 9))
                sub_sigma = np.full(k, diam[i] / 5)
                sub = rng.normal(0, diam[i] / 4, (k, 2))
            blobs.append(
                np.column_stack(
                    [
                        x[i] + sub[:, 0] / pixel_um,
                        y[i] + sub[:, 1] / pixel_um,
                        np.broadcast_to(sub_sigma, (k,)) / pixel_um,
                        np.full(k, peak[i]),
                        np.full(k, peak[i] * ratio[i]),
                    ]
                )
            )
        rows.append(
            pd.DataFrame(
                {
                    "x_px": x,
                    "y_px": y,
                    "kind": kind,
                    "diameter_um": diam,
                    "snr": snr,
                    "auto_ratio": ratio,
                }
            )
        )
    table = pd.concat(rows, ignore_index=True)
    if not blobs:
        return np.zeros((2, h, w)), table
    b = np.concatenate(blobs)
    sig_obj = b[:, 2]
    sig_eff = np.sqrt(sig_obj**2 + 1 / 12)
    dilution = (sig_obj / sig_eff) ** 2
    images = _splat((h, w), b[:, :2], _isotropic(sig_eff), b[:, 3:5] * dilution[:, None])
    return images, table


def _render_realistic(
    tissue: np.ndarray,
    cells_px: np.ndarray,
    *,
    pixel_size_um: float,
    cell_diameter_um: float,
    realism: Realism,
    rng: np.random.Generator,
) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Image one section under ``realism``: (2, h, w) uint16, per-cell truth, artefacts.

    ``tissue``: template-like values (grey matter ≈ 120, fibre tracts ≈ 225, 0 = no tissue);
    ``cells_px``: (n, 2) cell centres (x, y) in pixels. The per-cell table has ``snr``
    (rendered expected peak above background / noise σ there), ``in_focus``, ``diameter_um``,
    ``background`` (expected signal counts there) and ``noise_sigma``.
    """
    r, p = realism, float(pixel_size_um)
    shape = tissue.shape
    h, w = shape
    t = np.clip(tissue.astype(np.float32) / 120.0, 0, None)
    auto_t = r.auto_level * t * np.clip(1 + r.texture * _texture(shape, p, rng), 0.2, None)
    stain_t = r.stain * t * np.clip(1 + r.texture * _texture(shape, p, rng), 0.2, None)
    illum = _illumination(shape, p, r, rng)
    g_sig, g_auto = rng.uniform(1 - r.section_gain, 1 + r.section_gain, 2)
    auto = r.offset + g_auto * illum * (r.glass + auto_t)
    signal = r.offset + g_sig * illum * (r.bleed * (r.glass + auto_t) + stain_t)
    noise_sigma = np.sqrt(r.gain * (signal - r.offset) + r.read_noise**2)
    # cells
    cells_px = np.asarray(cells_px, dtype=np.float64).reshape(-1, 2)
    n = len(cells_px)
    diam = cell_diameter_um * np.exp(rng.normal(0, r.cell_size_spread, n))
    sigma = diam / 2 / 1.3 / p
    ratio = 1 - rng.uniform(0, r.cell_elongation, n)
    phi = rng.uniform(0, np.pi, n)
    in_focus = rng.random(n) >= r.out_of_focus
    blur = np.where(in_focus, 0.0, rng.uniform(*r.defocus, n) * diam / 2 / p)
    cos, sin = np.cos(phi), np.sin(phi)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    axes = np.zeros((n, 2, 2))
    axes[:, 0, 0], axes[:, 1, 1] = sigma**2 / ratio, sigma**2 * ratio
    focus_cov = rot @ axes @ np.swapaxes(rot, 1, 2) + _isotropic(np.full(n, np.sqrt(1 / 12)))
    cov = focus_cov + _isotropic(blur)
    snr0 = _loguniform(rng, r.cell_snr, n)
    ix = np.clip(np.round(cells_px[:, 0]).astype(int), 0, w - 1)
    iy = np.clip(np.round(cells_px[:, 1]).astype(int), 0, h - 1)
    peak = snr0 * noise_sigma[iy, ix] * np.sqrt(np.linalg.det(focus_cov) / np.linalg.det(cov))
    cells = _splat(shape, cells_px, cov, np.column_stack([peak, r.crosstalk * peak]))
    cell_table = pd.DataFrame(
        {
            "snr": peak / noise_sigma[iy, ix],
            "in_focus": in_focus,
            "diameter_um": diam,
            "background": signal[iy, ix],
            "noise_sigma": noise_sigma[iy, ix],
        }
    )
    # streaks and specks
    streaks = _streaks(t, p, r, rng) * noise_sigma
    specks, artefacts = _specks(t, noise_sigma, p, r, rng)
    signal = signal + cells[0] + streaks + specks[0]
    auto = auto + cells[1] + r.streak_auto * streaks + specks[1]
    out = np.empty((2, h, w), dtype=np.uint16)
    for c, mean in enumerate((signal, auto)):
        photons = rng.poisson(np.maximum(mean - r.offset, 0) / r.gain)
        value = r.offset + r.gain * photons + rng.normal(0, r.read_noise, shape)
        out[c] = np.clip(np.round(value), 0, r.saturation)
    return out, cell_table, artefacts


def _field_tissue(shape: tuple[int, int], pixel_um: float, rng: np.random.Generator) -> np.ndarray:
    """Template-like tissue for a standalone field: grey matter, a fibre tract, an edge."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) * np.float32(pixel_um)
    extent = float(np.hypot(h, w)) * pixel_um

    def line_distance(frac: float) -> np.ndarray:
        ang = rng.uniform(0, 2 * np.pi)
        proj = xx * np.cos(ang) + yy * np.sin(ang)
        proj += 0.04 * extent * _smooth_field(shape, pixel_um, 0.15 * extent, rng)
        return proj - float(np.quantile(proj[::4, ::4], frac))  # frac of the field below 0

    edge = line_distance(rng.uniform(0.75, 0.85))  # tissue where edge < 0
    tract = np.abs(line_distance(rng.uniform(0.3, 0.5)))
    half_width = rng.uniform(0.04, 0.08) * extent
    grey = 120.0 * (1 + 0.08 * _smooth_field(shape, pixel_um, 300.0, rng))
    with np.errstate(over="ignore"):  # exp → inf far from the edges gives the limit 0
        wm = 1 / (1 + np.exp((tract - half_width) / 15.0))  # soft edge over ~15 µm
        inside = 1 / (1 + np.exp(edge / 3.0))  # tissue boundary sharp to ~3 µm
    value = grey * (1 - wm) + 225.0 * wm
    return (value * inside * (inside > 0.01)).astype(np.float32)


def realistic_field(
    shape: tuple[int, int] = (1024, 1024),
    *,
    pixel_size_um: float = 1.4,
    cell_diameter_um: float = 15.0,
    cells_per_mm2: float = 100.0,
    seed: int = 0,
    realism: Realism | None = None,
    extras: bool = False,
) -> tuple:
    """One realistic 2-channel fluorescence field with its truth, without building a world.

    The field holds tissue (grey matter with a fibre tract across it) and, beyond a wavy
    edge, bare slide (15–25 % of the field); cells are placed at ``cells_per_mm2`` in grey
    matter (a fifth of that in the tract, none off tissue), no two closer than 0.7 diameters,
    then imaged with :func:`_render_realistic` — the same code that renders the world's
    sections (see :class:`Realism` for the model).

    Returns
    -------
    signal, autofluorescence
        uint16 images of ``shape``.
    truth
        One row per cell: ``x``, ``y`` (pixels, column/row), ``snr``, ``in_focus``,
        ``diameter_um``, ``background``, ``noise_sigma``.
    details
        Only with ``extras=True``, a 4th item: ``{"artefacts": DataFrame, "tissue": ndarray}``
        — the specks (not cells: ``x``, ``y``, ``kind`` small/cell/large, ``diameter_um``,
        ``snr``, ``auto_ratio``) and the bool tissue mask.
    """
    from scipy.spatial import cKDTree

    realism = realism or Realism.realistic()
    if realism.preset == "easy":
        raise ValueError("realistic_field needs a realistic Realism (the easy preset is a world's)")
    rng = np.random.default_rng(seed)
    shape = (int(shape[0]), int(shape[1]))
    tissue = _field_tissue(shape, pixel_size_um, rng)
    t = tissue / 120.0
    density = np.where(t > 1.5, 0.2, 1.0) * (t > 0.5)
    area_mm2 = shape[0] * shape[1] * pixel_size_um**2 / 1e6
    n = rng.poisson(cells_per_mm2 * area_mm2 * 1.3)
    xy = rng.uniform(0, 1, (n, 2)) * np.array([shape[1], shape[0]])
    ix, iy = xy.astype(int).T
    xy = xy[rng.random(n) < density[iy, ix]]
    min_px = 0.7 * cell_diameter_um / pixel_size_um
    drop = {j for _, j in cKDTree(xy).query_pairs(min_px)} if len(xy) else set()
    xy = xy[np.setdiff1d(np.arange(len(xy)), sorted(drop))]
    image, cells, artefacts = _render_realistic(
        tissue,
        xy,
        pixel_size_um=pixel_size_um,
        cell_diameter_um=cell_diameter_um,
        realism=realism,
        rng=rng,
    )
    truth = pd.concat([pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}), cells], axis=1)
    if not extras:
        return image[0], image[1], truth
    details = {
        "artefacts": artefacts.rename(columns={"x_px": "x", "y_px": "y"}),
        "tissue": tissue > 0,
    }
    return image[0], image[1], truth, details


def _render_section(
    cutter: _Cutter, k: int, atlas: Atlas, cells_px: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The easy preset's rendering (unchanged): the image and each cell's snr.

    Noise σ at the background is ``sqrt(30² + 4 · (3 · template + 200))`` (the additive
    N(200, 30) and the signal-dependent 2·sqrt(signal) term); a cell's snr is its amplitude
    over that.
    """
    cfg = cutter.config
    yy, xx = np.mgrid[0 : cutter.height, 0 : cutter.width]
    pix = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
    ccf = cutter.pixels_to_ccf(k, pix)
    tissue = atlas.sample_template(ccf).reshape(cutter.height, cutter.width).astype(np.float32)
    tissue_px = ndi.gaussian_filter(rng.standard_normal(tissue.shape).astype(np.float32), 1.0)
    gain = 1 + 0.15 * (xx / cutter.width - 0.5)  # uneven illumination
    auto = tissue * gain * (1 + 0.15 * tissue_px) * 20 + rng.normal(300, 40, tissue.shape)
    signal = tissue * 3 + rng.normal(200, 30, tissue.shape)
    sigma = cfg.cell_diameter_um / 2 / cfg.pixel_size_um / 1.3
    reach = int(np.ceil(3 * sigma))
    amp = rng.uniform(1500, 4000, len(cells_px))
    cx, cy = cells_px[:, 0], cells_px[:, 1]
    ix, iy = np.round(cx).astype(int), np.round(cy).astype(int)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            px, py = ix + dx, iy + dy
            ok = (px >= 0) & (px < cutter.width) & (py >= 0) & (py < cutter.height)
            val = amp * np.exp(-((px - cx) ** 2 + (py - cy) ** 2) / (2 * sigma**2))
            np.add.at(signal, (py[ok], px[ok]), val[ok])
    signal = signal + rng.normal(0, 1, signal.shape) * np.sqrt(np.maximum(signal, 1)) * 2
    iy_c, ix_c = iy.clip(0, cutter.height - 1), ix.clip(0, cutter.width - 1)
    snr = amp / np.sqrt(30.0**2 + 4 * (3 * tissue[iy_c, ix_c] + 200.0))
    return np.stack([signal, auto]).clip(0, 65535).astype(np.uint16), snr


def _section_tissue(cutter: _Cutter, k: int, atlas: Atlas) -> np.ndarray:
    """The template sampled on section ``k``'s pixels (0 off the brain)."""
    yy, xx = np.mgrid[0 : cutter.height, 0 : cutter.width]
    pix = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
    ccf = cutter.pixels_to_ccf(k, pix)
    return atlas.sample_template(ccf).reshape(cutter.height, cutter.width).astype(np.float32)


def _damage_mask(cutter: _Cutter, rng: np.random.Generator) -> np.ndarray:
    """A torn-off piece of tissue: an ellipse covering about a fifth of the frame."""
    yy, xx = np.mgrid[0 : cutter.height, 0 : cutter.width]
    cx, cy = rng.uniform(0.25, 0.75) * cutter.width, rng.uniform(0.2, 0.5) * cutter.height
    rx, ry = 0.22 * cutter.width, 0.3 * cutter.height
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


@dataclass
class PhantomWorld:
    """Paths of a written phantom world."""

    root: Path
    config: WorldConfig

    @property
    def atlas_dir(self) -> Path:
        return self.root / "atlas"

    @property
    def abc_dir(self) -> Path:
        return self.root / "abc"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    def truth_cells(self, brain_id: str) -> pd.DataFrame:
        """Planted cells: ``section, x_px, y_px, ap_um, dv_um, ml_um, type, snr, in_focus``."""
        return pd.read_csv(self.root / "truth" / brain_id / "cells.csv")

    def truth_artefacts(self, brain_id: str) -> pd.DataFrame:
        """Specks of a realistic world (not cells): ``section, x_px, y_px, kind, …``."""
        return pd.read_csv(self.root / "truth" / brain_id / "artefacts.csv")

    def truth_mixtures(self) -> pd.DataFrame:
        return pd.read_csv(self.root / "truth" / "mixtures.csv", dtype={"brain_id": str})

    def truth_anchoring(self, brain_id: str) -> Path:
        return self.root / "truth" / brain_id / "anchoring.json"

    @classmethod
    def open(cls, root: str | Path) -> PhantomWorld:
        root = Path(root)
        doc = json.loads((root / "world.json").read_text())
        brains = [
            PhantomBrain(
                **{
                    **b,
                    "angles_deg": tuple(b["angles_deg"]),
                    "missing": tuple(b["missing"]),
                    "damaged": tuple(b["damaged"]),
                }
            )
            for b in doc.pop("brains")
        ]
        doc["frame_um"] = tuple(doc["frame_um"])
        doc["realism"] = Realism.from_dict(doc.get("realism", {"preset": "easy"}))
        return cls(root, WorldConfig(**doc, brains=brains))


def make_world(
    root: str | Path,
    config: WorldConfig | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> PhantomWorld:
    """Write a phantom world under ``root`` (atomically; an existing world is reused).

    An existing world is reused when ``config`` is None or equals the one it was made with
    (its ``world.json``); a different ``config`` raises ValueError rather than silently
    handing back the old world. Without an existing world, ``config`` defaults to the demo.
    """
    root = Path(root)
    if (root / "world.json").is_file():
        if config is not None:
            _check_same_world(root, config)
        return PhantomWorld.open(root)
    config = config or WorldConfig.demo()
    say = progress or (lambda _msg: None)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    res = config.atlas_resolution_um
    say(f"phantom atlas at {res:g} µm")
    atlas = phantom_atlas(res, seed=config.seed)
    _write_atlas(tmp / "atlas", atlas)
    say(f"phantom cell-type atlas ({len(_TYPES)} types, {config.n_abc_cells} cells)")
    types = phantom_cell_types(res, seed=config.seed)
    write_abc(
        tmp / "abc", types, n_cells=config.n_abc_cells, rng=np.random.default_rng(config.seed + 2)
    )
    rows, mixtures = [], []
    for brain in config.brains:
        say(f"phantom brain {brain.brain_id} ({brain.n_sections} sections)")
        truth = _write_brain(tmp, config, brain, atlas, types)
        rows.append(
            {
                "brain_id": brain.brain_id,
                "path": f"brains/{brain.brain_id}.ome.zarr",
                "signal_channel": 0,
                "autofluorescence_channel": 1,
                "section_spacing_um": brain.section_spacing_um,
            }
        )
        share = truth["type"].value_counts(normalize=True)
        for name, fraction in brain.mixture.items():
            subclass = types.taxonomy.loc[types.names.index(name), "subclass"]
            mixtures.append(
                {
                    "brain_id": brain.brain_id,
                    "type": subclass,
                    "planted_fraction": fraction,
                    "fraction_in_sections": float(share.get(subclass, 0.0)),
                }
            )
    pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
    pd.DataFrame(mixtures).to_csv(tmp / "truth" / "mixtures.csv", index=False)
    doc = asdict(config)
    (tmp / "world.json").write_text(json.dumps(doc, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return PhantomWorld(root, config)


def _check_same_world(root: Path, config: WorldConfig) -> None:
    stored = json.loads((root / "world.json").read_text())
    wanted = json.loads(json.dumps(asdict(config)))  # tuples → lists, as stored
    if stored == wanted:
        return
    keys = sorted(set(stored) | set(wanted))
    differ = [k for k in keys if stored.get(k) != wanted.get(k)]
    raise ValueError(
        f"{root} holds a phantom world made with a different config (differs in: "
        f"{', '.join(differ)}); delete {root} to rebuild it, or use another folder"
    )


def _write_atlas(directory: Path, atlas: Atlas) -> None:
    import nrrd

    directory.mkdir(parents=True)
    res = int(atlas.resolution_um)
    header = {
        "space dimension": 3,
        "space directions": np.diag([float(res)] * 3),
        "space units": ["microns"] * 3,
    }
    nrrd.write(
        str(directory / f"annotation_{res}.nrrd"), atlas.annotation, {**header, "encoding": "gzip"}
    )
    nrrd.write(
        str(directory / f"average_template_{res}.nrrd"),
        atlas.template.astype(np.float32),
        {**header, "encoding": "gzip"},
    )
    (directory / "structures.json").write_text(
        json.dumps(atlas.ontology.to_structure_graph(), indent=1)
    )


def _write_brain(
    root: Path, config: WorldConfig, brain: PhantomBrain, atlas: Atlas, types: PhantomTypes
) -> pd.DataFrame:
    rng = np.random.default_rng(brain.seed + 1000)
    cutter = _Cutter(config, brain)
    names = list(brain.mixture)
    counts = rng.multinomial(brain.n_labeled, np.array([brain.mixture[n] for n in names]))
    cells = [types.sample(n, int(c), rng) for n, c in zip(names, counts, strict=True)]
    labels = np.concatenate([np.full(len(c), i) for i, c in enumerate(cells)])
    cells3d = np.concatenate(cells)
    volume = np.zeros((2, brain.n_sections, cutter.height, cutter.width), dtype=np.uint16)
    truth, artefacts = [], []
    for k in range(brain.n_sections):
        if k in brain.missing:
            continue
        px, off_plane = cutter.ccf_to_pixels(k, cells3d)
        inside = (
            (np.abs(off_plane) <= config.section_thickness_um / 2)
            & (px[:, 0] >= 0)
            & (px[:, 0] < cutter.width - 1)
            & (px[:, 1] >= 0)
            & (px[:, 1] < cutter.height - 1)
        )
        damage = _damage_mask(cutter, rng) if k in brain.damaged else None
        if damage is not None:
            ix, iy = np.round(px[:, 0]).astype(int), np.round(px[:, 1]).astype(int)
            inside[inside] &= ~damage[iy[inside], ix[inside]]
        if config.realism.preset == "easy":
            image, snr = _render_section(cutter, k, atlas, px[inside], rng)
            in_focus = np.ones(len(snr), dtype=bool)
            if damage is not None:
                noise = rng.normal(250, 30, (2, int(damage.sum())))
                image[:, damage] = noise.clip(0).astype(np.uint16)
        else:
            tissue = _section_tissue(cutter, k, atlas)
            if damage is not None:
                tissue[damage] = 0.0  # torn off: bare slide
            image, cell_table, specks = _render_realistic(
                tissue,
                px[inside],
                pixel_size_um=config.pixel_size_um,
                cell_diameter_um=config.cell_diameter_um,
                realism=config.realism,
                rng=rng,
            )
            snr, in_focus = cell_table["snr"].to_numpy(), cell_table["in_focus"].to_numpy()
            artefacts.append(specks.assign(section=k))
        volume[:, k] = image
        subclass = types.taxonomy.set_index(types.taxonomy.index)["subclass"]
        truth.append(
            pd.DataFrame(
                {
                    "section": k,
                    "x_px": px[inside, 0],
                    "y_px": px[inside, 1],
                    "ap_um": cells3d[inside, 0],
                    "dv_um": cells3d[inside, 1],
                    "ml_um": cells3d[inside, 2],
                    "type": [subclass[types.names.index(names[i])] for i in labels[inside]],
                    "snr": snr,
                    "in_focus": in_focus,
                }
            )
        )
    (root / "brains").mkdir(exist_ok=True)
    write_ome_zarr(
        root / "brains" / f"{brain.brain_id}.ome.zarr",
        volume,
        pixel_size_um=config.pixel_size_um,
        section_spacing_um=brain.section_spacing_um,
        n_levels=config.n_levels,
        channel_names=("signal", "autofluorescence"),
    )
    tdir = root / "truth" / brain.brain_id
    tdir.mkdir(parents=True)
    anchors = [s.anchor for k, s in enumerate(cutter.sections) if k not in brain.missing]
    write_quint(tdir / "anchoring.json", anchors)
    table = pd.concat(truth, ignore_index=True)
    table.to_csv(tdir / "cells.csv", index=False)
    if artefacts:
        specks = pd.concat(artefacts, ignore_index=True)
        specks[["section", *[c for c in specks.columns if c != "section"]]].to_csv(
            tdir / "artefacts.csv", index=False
        )
    return table


def evaluate_mapping(
    detected_xy: np.ndarray,
    detected_section: np.ndarray,
    detected_ccf: np.ndarray,
    truth: pd.DataFrame,
    *,
    max_px: float,
) -> dict[str, float]:
    """Compare mapped cells with the planted ones.

    Detected and planted cells are matched one to one within each section: among pairs at
    most ``max_px`` level-0 pixels apart, as many pairs as possible, then the shortest in
    total (Hungarian assignment per connected group of candidate pairs). A planted cell is
    found at most once, so duplicate detections lower precision and never raise recall. The
    CCF distance between matched pairs measures the mapping error.

    Returns
    -------
    dict
        ``n_detected``, ``n_true``, ``recall`` (matched planted / planted), ``precision``
        (matched detected / detected), ``median_um``, ``p95_um`` (NaN when nothing matched).
    """
    from scipy.spatial import cKDTree

    detected_xy = np.asarray(detected_xy, dtype=np.float64).reshape(-1, 2)
    detected_section = np.asarray(detected_section)
    detected_ccf = np.asarray(detected_ccf, dtype=np.float64).reshape(-1, 3)
    if not len(detected_xy) == len(detected_section) == len(detected_ccf):
        raise ValueError(
            f"detected_xy ({len(detected_xy)}), detected_section ({len(detected_section)}) and "
            f"detected_ccf ({len(detected_ccf)}) must have one row per detected cell"
        )
    errors, matched = [], 0
    for section, group in truth.groupby("section"):
        mine = np.flatnonzero(detected_section == section)
        if len(mine) == 0:
            continue
        true_xy = group[["x_px", "y_px"]].to_numpy(dtype=np.float64)
        det, tru = _match_one_to_one(cKDTree(detected_xy[mine]), cKDTree(true_xy), max_px)
        matched += len(det)
        true_ccf = group[["ap_um", "dv_um", "ml_um"]].to_numpy(dtype=np.float64)[tru]
        errors.append(np.linalg.norm(detected_ccf[mine[det]] - true_ccf, axis=1))
    err = np.concatenate(errors) if errors else np.empty(0)
    n_det, n_true = len(detected_xy), len(truth)
    return {
        "n_detected": float(n_det),
        "n_true": float(n_true),
        "recall": matched / n_true if n_true else float("nan"),
        "precision": matched / n_det if n_det else float("nan"),
        "median_um": float(np.median(err)) if err.size else float("nan"),
        "p95_um": float(np.percentile(err, 95)) if err.size else float("nan"),
    }


def _match_one_to_one(a, b, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximum one-to-one matching of two point sets (KD-trees) within ``max_dist``.

    Most pairs, then least total distance: a Hungarian assignment on each connected group of
    candidate pairs (small, so ~2,000 cells per section cost little). Returns matched indices.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = a.sparse_distance_matrix(b, max_dist, output_type="coo_matrix")  # keeps 0 distances
    if pairs.nnz == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    row, col, d = pairs.row.astype(np.int64), pairs.col.astype(np.int64), pairs.data
    n_a = a.n
    graph = coo_matrix((np.ones(row.size), (row, n_a + col)), shape=(n_a + b.n,) * 2)
    _, component = connected_components(graph, directed=False)
    pairs_in = np.bincount(component[row], minlength=component.max() + 1)
    alone = pairs_in[component[row]] == 1  # most pairs: nobody else within reach of either
    out_a, out_b = [row[alone]], [col[alone]]
    row, col, d = row[~alone], col[~alone], d[~alone]
    order = np.argsort(component[row], kind="stable")
    row, col, d = row[order], col[order], d[order]
    bounds = np.flatnonzero(np.diff(component[row])) + 1
    groups = zip(np.split(row, bounds), np.split(col, bounds), np.split(d, bounds), strict=True)
    for r, c, dd in groups if row.size else ():
        ur, ri = np.unique(r, return_inverse=True)
        uc, ci = np.unique(c, return_inverse=True)
        if len(ur) == 1 or len(uc) == 1:  # a star: the nearest partner wins
            best = int(np.argmin(dd))
            out_a.append(r[best : best + 1])
            out_b.append(c[best : best + 1])
            continue
        forbidden = 1.0 + float(dd.max()) * (len(ur) + len(uc))  # worse than any real pairs
        cost = np.full((len(ur), len(uc)), forbidden)
        cost[ri, ci] = dd
        i, j = linear_sum_assignment(cost)
        ok = cost[i, j] < forbidden
        out_a.append(ur[i[ok]])
        out_b.append(uc[j[ok]])
    return np.concatenate(out_a), np.concatenate(out_b)


def planted_mixture(mixtures: pd.DataFrame, brain_id: str) -> Mapping[str, float]:
    """Planted ``{subclass: fraction}`` of one brain, from ``truth/mixtures.csv``."""
    rows = mixtures[mixtures["brain_id"] == brain_id]
    return dict(zip(rows["type"], rows["planted_fraction"], strict=True))
