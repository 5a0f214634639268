"""The ``[cellmap2d]`` section of ``luigi.cfg`` and cached loaders shared by the tasks."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import luigi

from cellmap2d.atlas import Atlas, load_atlas, read_atlas_h5
from cellmap2d.identity import MIXTURES
from cellmap2d.io import BrainImage, BrainSpec, open_brain, read_manifest

ANCHORING_BACKENDS = ["search", "deepslice", "deepslice+search", "quint"]


class cellmap2d(luigi.Config):  # noqa: N801  (the section name in luigi.cfg)
    """Pipeline settings; every one can be set in ``luigi.cfg`` or on the command line."""

    store = luigi.Parameter(default="store", description="output root")
    manifest = luigi.Parameter(default="", description="brains manifest CSV")
    atlas = luigi.Parameter(default="", description="Allen atlas dir or BrainGlobe name")
    atlas_resolution = luigi.IntParameter(default=25, description="atlas voxel size (µm)")
    abc = luigi.Parameter(default="", description="ABC Atlas cache directory")
    abc_datasets = luigi.Parameter(default="MERFISH-C57BL6J-638850")
    level = luigi.Parameter(default="subclass", description="taxonomy level for identity")
    density_voxel_um = luigi.FloatParameter(default=100.0)
    density_sigma_um = luigi.FloatParameter(default=150.0)
    cell_diameter_um = luigi.FloatParameter(default=15.0)
    detection_method = luigi.Parameter(default="log")
    detection_threshold = luigi.FloatParameter(
        default=0.0,
        description="0: the method's default (log: floor of 3 local noise units under the "
        "FDR threshold; watershed/trained: 6 noise units)",
    )
    detection_fdr = luigi.FloatParameter(
        default=0.02, description="log: false-detection rate (dark blobs as the null)"
    )
    detection_max_cells_per_mm2 = luigi.FloatParameter(
        default=7500.0,
        description="flag sections with more cells per mm² of tissue (neurons per mm³ × "
        "section thickness: 1.5e5 × 0.05 mm); 0: off",
    )
    detection_model = luigi.Parameter(default="", description="model.joblib for 'trained'")
    registration_pixel_um = luigi.FloatParameter(default=50.0)
    anchoring = luigi.ChoiceParameter(choices=ANCHORING_BACKENDS, default="search")
    quint_dir = luigi.Parameter(default="", description="folder of <brain_id>.json (quint)")
    deepslice_weights = luigi.Parameter(
        default="", description="folder of DeepSlice's weight files (deepslice backends)"
    )
    syn = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    bootstrap = luigi.IntParameter(default=100)
    identity_region = luigi.Parameter(
        default="", description="compare only inside this region and its descendants, e.g. VISp"
    )
    identity_mixture = luigi.ChoiceParameter(
        choices=list(MIXTURES),
        default="emm",
        description="the mixture fit that is `fraction` (see identity.brain_identity)",
    )
    identity_background = luigi.BoolParameter(
        default=True,
        parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="fit a background component of false detections (identity.brain_identity)",
    )


def settings() -> cellmap2d:
    return cellmap2d()


def store() -> Path:
    return Path(settings().store)


@functools.lru_cache(maxsize=4)
def _manifest(path: str) -> dict[str, BrainSpec]:
    return {spec.brain_id: spec for spec in read_manifest(path)}


def manifest() -> dict[str, BrainSpec]:
    path = settings().manifest
    if not path:
        raise ValueError("no manifest configured: set [cellmap2d] manifest or pass --manifest")
    return _manifest(str(Path(path).resolve()))


def brain_spec(brain_id: str) -> BrainSpec:
    specs = manifest()
    if brain_id not in specs:
        raise KeyError(f"brain {brain_id} is not in the manifest {settings().manifest}")
    return specs[brain_id]


def brain_image(brain_id: str) -> BrainImage:
    spec = brain_spec(brain_id)
    return _open_brain(spec.path, brain_id, spec.pixel_size_um)


@functools.lru_cache(maxsize=8)
def _open_brain(path: str, brain_id: str, pixel_size_um: float | None) -> BrainImage:
    return open_brain(path, brain_id=brain_id, pixel_size_um=pixel_size_um)


def brain_sections(brain_id: str) -> list[int]:
    """The sections to process: the manifest's ``sections`` or every z of the image."""
    spec = brain_spec(brain_id)
    n = brain_image(brain_id).n_sections
    if spec.sections is None:
        return list(range(n))
    bad = [z for z in spec.sections if not 0 <= z < n]
    if bad:
        raise ValueError(f"brain {brain_id}: manifest sections {bad} outside 0..{n - 1}")
    return list(spec.sections)


def source_atlas() -> Atlas:
    """The configured atlas, read from its source (slow: NRRD or BrainGlobe)."""
    cfg = settings()
    if not cfg.atlas:
        raise ValueError("no atlas configured: set [cellmap2d] atlas or pass --atlas")
    return load_atlas(cfg.atlas, resolution_um=cfg.atlas_resolution)


def atlas_cache_name() -> str:
    """File name of the store's atlas cache, unique to the atlas source and resolution."""
    cfg = settings()
    source = str(Path(cfg.atlas).resolve()) if Path(cfg.atlas).exists() else cfg.atlas
    digest = hashlib.sha1(source.encode()).hexdigest()[:8]
    return f"atlas_{cfg.atlas_resolution}um_{digest}.h5"


@functools.lru_cache(maxsize=2)
def cached_atlas(path: str) -> Atlas:
    """The atlas from the store's cache (fast; cached per process)."""
    return read_atlas_h5(path)
