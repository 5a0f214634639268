"""DeepSlice anchoring backend and QuickNII-ready section images.

`DeepSlice <https://github.com/PolarBean/DeepSlice>`_ (optional extra, GPL-3.0, pulls in
TensorFlow) predicts a QuickNII anchoring for every image in a folder. It reads its network
weights from its own package folder and downloads missing ones from EBRAINS at first use. Here it
only ever reads them from a folder the user provides: :func:`check_deepslice` fails at once,
before TensorFlow is imported, when the package or a weight file is missing, and
:func:`run_deepslice` resolves every weight DeepSlice asks for to that folder and never lets it
download.

Section images follow the QUINT naming rules so that QuickNII, VisuAlign, Nutil and DeepSlice
all read the section number from the file name: ``<stem>_s<zzzz>.png`` with exactly one ``_s``,
no ``.`` or spaces in the stem, as 24-bit (RGB) PNG, which QuickNII loads up to 16 megapixels.
QuickNII finds the images through the ``filename`` of each JSON slice (extension included), in
the JSON file's own folder.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .anchoring import QuintSeries, SectionAnchor, read_quint

__all__ = [
    "DEEPSLICE_WEIGHTS",
    "SeriesSeed",
    "check_deepslice",
    "run_deepslice",
    "section_image_name",
    "series_seed",
    "write_quicknii_folder",
    "write_section_images",
]

_PACKAGE = "DeepSlice"
_INSTALL = 'pip install "cellmap2d[deepslice]"'
_WEIGHTS_URL = "https://data-proxy.ebrains.eu/api/v1/buckets/deepslice/weights/"
# The weight files of DeepSlice 1.2.8 (DeepSlice/metadata/config.json, "weight_file_paths"):
# used when the installed package's own config cannot be read.
DEEPSLICE_WEIGHTS: dict[str, dict[str, str]] = {
    "mouse": {
        "xception_imagenet": "xception_weights_tf_dim_ordering_tf_kernels.h5",
        "primary": "Allen_Mixed_Best.h5",
        "secondary": "Synthetic_data_final.hdf5",
    },
    "rat": {
        "xception_imagenet": "xception_weights_tf_dim_ordering_tf_kernels.h5",
        "primary": "RatModelInProgress.h5",
        "secondary": "RatModelScratch.h5",
    },
}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_QUICKNII_MAX_PIXELS = 16_000_000
_SECTION_TAG = re.compile(r"_s(\d+)")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def section_image_name(brain_id: str, section: int) -> str:
    """File name of a section image (and the ``filename`` of its QUINT JSON slice).

    Parameters
    ----------
    brain_id : str
        The brain; characters QUINT tools cannot take in a name (``.``, spaces, path separators,
        anything but letters, digits, ``-`` and ``_``) become ``-``, and so does the ``_`` of
        any ``_s`` in it, so the name holds exactly one ``_s``.
    section : int
        The section's z index (≥ 0), written with at least four digits.

    Returns
    -------
    str
        ``<brain_id>_s<zzzz>.png``, e.g. ``"GLT-a_s0042.png"`` for ``("GLT.a", 42)``.
    """
    z = int(section)
    if z != section or z < 0:
        raise ValueError(
            f"brain {brain_id}: section index must be a whole number ≥ 0, got {section!r}"
        )
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", str(brain_id)) or "section"
    stem = re.sub(r"_(?=[sS])", "-", stem)
    return f"{stem}_s{z:04d}.png"


def _to_uint8(
    image: np.ndarray, low: float, high: float, *, invert: bool, where: str
) -> np.ndarray:
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError(f"{where}: the image has no finite pixel values")
    lo, hi = np.percentile(values[finite], [low, high])
    scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
    scaled[~finite] = 0.0
    if invert:
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


def write_section_images(
    images: Mapping[int, np.ndarray],
    directory: str | Path,
    *,
    brain_id: str,
    low_percentile: float = 0.5,
    high_percentile: float = 99.5,
    invert: bool = False,
    max_side: int | None = None,
) -> dict[int, Path]:
    """Write section images as 24-bit PNGs that QuickNII, VisuAlign and DeepSlice open.

    Each image is contrast-stretched between two percentiles of its own finite values (so a few
    hot pixels or a dark background do not squash the tissue), scaled to 0–255 and written as
    grey RGB under :func:`section_image_name`.

    Parameters
    ----------
    images : mapping of int to 2-D array
        Section z index → image (any numeric dtype; NaN/inf become black).
    directory : str or Path
        Output folder (created). Put the QUINT JSON in the same folder for QuickNII; give
        DeepSlice a folder holding only this series.
    brain_id : str
        Brain id, used in the file names.
    low_percentile, high_percentile : float
        Intensities at or below / at or above these percentiles map to 0 / 255.
    invert : bool
        Dark tissue on a white background (brightfield-like) instead of bright on black.
    max_side : int, optional
        Downscale (anti-aliased) so that the longer side is at most this many pixels.

    Returns
    -------
    dict of int to Path
        Section z index → written file.

    Raises
    ------
    ValueError
        If an image is not 2-D, is empty, has no finite values, or exceeds QuickNII's
        16-megapixel limit (pass ``max_side``).
    """
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise ValueError(
            f"brain {brain_id}: need 0 ≤ low_percentile < high_percentile ≤ 100, got "
            f"{low_percentile}, {high_percentile}"
        )
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    import imageio.v3 as iio
    from skimage.transform import resize

    written: dict[int, Path] = {}
    for section, image in sorted(images.items()):
        name = section_image_name(brain_id, section)
        where = f"brain {brain_id}, section {section} ({name})"
        arr = np.asarray(image)
        if arr.ndim != 2 or arr.size == 0:
            raise ValueError(f"{where}: expected a non-empty 2-D image, got shape {arr.shape}")
        if max_side is not None and max(arr.shape) > max_side:
            factor = max_side / max(arr.shape)
            shape = tuple(max(1, round(n * factor)) for n in arr.shape)
            arr = resize(arr.astype(np.float64), shape, anti_aliasing=True, preserve_range=True)
        if arr.size > _QUICKNII_MAX_PIXELS:
            raise ValueError(
                f"{where}: {arr.shape[1]}×{arr.shape[0]} pixels exceeds QuickNII's 16-megapixel "
                "limit; pass max_side (QuickNII works best near 1500×1000)"
            )
        grey = _to_uint8(arr, low_percentile, high_percentile, invert=invert, where=where)
        path = out_dir / name
        iio.imwrite(path, np.repeat(grey[:, :, None], 3, axis=2), extension=".png")
        written[int(section)] = path
    return written


def write_quicknii_folder(
    series: QuintSeries,
    images: Mapping[int, np.ndarray],
    directory: str | Path,
    *,
    brain_id: str,
) -> Path:
    """A folder that opens in QuickNII/VisuAlign: the series as ``anchoring.json`` + its images.

    Images are written by :func:`write_section_images`; every slice's ``filename`` is set to
    its image (so a series whose names lack the ``.png`` QuickNII needs is fixed on the way).

    Parameters
    ----------
    series
        The anchoring (e.g. :func:`~cellmap2d.anchoring.read_quint` of ``anchoring.json``).
    images
        Section z index (the slices' ``nr``) → image, e.g. the registration thumbnails.
    directory
        Output folder (created).
    brain_id
        Brain id, used in the file names and messages.

    Returns
    -------
    Path
        The written ``anchoring.json``.
    """
    from .anchoring import write_quint

    missing = sorted({a.nr for a in series} - set(images))
    if missing:
        raise ValueError(f"brain {brain_id}: no image for anchored sections {missing}")
    written = write_section_images(
        {a.nr: images[a.nr] for a in series}, directory, brain_id=brain_id
    )
    for anchor in series:
        anchor.filename = written[anchor.nr].name
    path = Path(directory) / "anchoring.json"
    write_quint(path, series, metadata=series.metadata)
    return path


def _package_dir() -> Path:
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the deepslice anchoring backend needs the DeepSlice package (and TensorFlow), "
            f"which is not installed; install it with: {_INSTALL}"
        )
    try:
        tensorflow = importlib.util.find_spec("tensorflow")
    except (ImportError, ValueError):
        tensorflow = None
    if tensorflow is None:
        raise ImportError(
            f"DeepSlice is installed but TensorFlow is not; install it with: {_INSTALL}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _weight_table(package_dir: Path, species: str) -> dict[str, tuple[str, str]]:
    """Role → (file name, download URL), from the installed DeepSlice's config when readable."""
    table: dict[str, tuple[str, str]] = {}
    try:
        config = json.loads((package_dir / "metadata" / "config.json").read_text())
        paths = config["weight_file_paths"]
        for role, entry in [
            ("xception_imagenet", paths["xception_imagenet"]),
            *paths[species].items(),
        ]:
            table[role] = (Path(entry["path"]).name, str(entry["url"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        table = {}
    if not table:
        if species not in DEEPSLICE_WEIGHTS:
            raise ValueError(
                f"DeepSlice species must be one of {sorted(DEEPSLICE_WEIGHTS)}, got {species!r}"
            )
        table = {
            role: (name, _WEIGHTS_URL + name) for role, name in DEEPSLICE_WEIGHTS[species].items()
        }
    return table


def check_deepslice(weights_dir: str | Path, *, species: str = "mouse") -> dict[str, Path]:
    """Check that DeepSlice can run offline from ``weights_dir``, without importing it.

    Parameters
    ----------
    weights_dir : str or Path
        Folder holding DeepSlice's weight files under their own names.
    species : str
        DeepSlice model, ``"mouse"`` or ``"rat"``.

    Returns
    -------
    dict of str to Path
        Weight role (``xception_imagenet``, ``primary``, ``secondary``) → file.

    Raises
    ------
    ImportError
        If DeepSlice or TensorFlow is not installed (names the pip command).
    FileNotFoundError
        If weight files are missing or are not HDF5 files (e.g. a failed download); the message
        lists each file, its download URL and where to put it.
    """
    package_dir = _package_dir()
    table = _weight_table(package_dir, species)
    folder = Path(weights_dir).expanduser()
    found: dict[str, Path] = {}
    problems = []
    for role, (name, url) in table.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"  {name} (missing): download {url}")
            continue
        with open(path, "rb") as fh:
            head = fh.read(len(_HDF5_SIGNATURE))
        if head != _HDF5_SIGNATURE:
            size = path.stat().st_size
            problems.append(
                f"  {name} is not an HDF5 weight file ({size} bytes; a failed download?): "
                f"download it again from {url}"
            )
            continue
        found[role] = path
    if problems:
        raise FileNotFoundError(
            f"DeepSlice ({species} model) cannot run offline: weight files are missing from "
            f"{folder.resolve()}:\n" + "\n".join(problems) + f"\nSave each file into "
            f"{folder.resolve()} under the name shown (or point weights_dir at the folder that "
            "holds them); cellmap2d never lets DeepSlice download."
        )
    return found


@contextlib.contextmanager
def _weights_from(folder: Path) -> Iterator[Any]:
    """Import DeepSlice with every weight lookup resolved to ``folder`` (never downloading)."""
    loader = importlib.import_module(f"{_PACKAGE}.metadata.metadata_loader")
    original = getattr(loader, "get_data_path", None)
    if original is None:
        raise ImportError(
            "this DeepSlice version has no metadata_loader.get_data_path, which cellmap2d uses "
            f"to point it at local weights (tested with DeepSlice 1.2.8); {_INSTALL}"
        )

    def local_weight(url_path: Any, _metadata_dir: str) -> str:
        name = Path(url_path["path"]).name
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"DeepSlice asked for {name} ({url_path.get('url', '')}), which is not in "
                f"{folder}; save it there"
            )
        return str(path)

    loader.get_data_path = local_weight
    try:
        yield importlib.import_module(_PACKAGE)
    finally:
        loader.get_data_path = original


def _series_images(directory: Path) -> dict[str, int]:
    """Image file name → section index, for every image DeepSlice will read in ``directory``."""
    if not directory.is_dir():
        raise FileNotFoundError(f"DeepSlice image folder not found: {directory}")
    names = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not names:
        raise ValueError(
            f"{directory} holds no .png/.jpg images for DeepSlice; write them with "
            "write_section_images"
        )
    sections: dict[str, int] = {}
    for name in names:
        found = _SECTION_TAG.findall(name)
        if len(found) != 1:
            raise ValueError(
                f"{directory / name}: DeepSlice needs exactly one _s<number> in an image name "
                f"(found {len(found)}); name images with section_image_name"
            )
        sections[name] = int(found[0])
    counts = Counter(sections.values())
    clash = sorted(n for n, z in sections.items() if counts[z] > 1)
    if clash:
        raise ValueError(f"{directory}: several images carry the same section number: {clash}")
    return sections


def _depth_slope(predictions: pd.DataFrame) -> float:
    """Sign (±1) of how DeepSlice's section-centre depth (QuickNII y) moves with the section number."""
    from scipy.stats import theilslopes

    depth = predictions["oy"] + (predictions["uy"] + predictions["vy"]) / 2.0
    slope = theilslopes(depth.to_numpy(float), predictions["nr"].to_numpy(float)).slope
    return -1.0 if slope < 0 else 1.0


def run_deepslice(
    image_directory: str | Path,
    *,
    weights_dir: str | Path,
    species: str = "mouse",
    ensemble: bool | None = None,
    section_spacing_um: float | None = None,
    brain_id: str = "",
    level0_shapes: Mapping[int, tuple[int, int]] | None = None,
) -> QuintSeries:
    """Anchor a section series with DeepSlice, offline, using local weights.

    Runs DeepSlice's recipe — ``predict`` (section numbers from the ``_s<z>`` names),
    ``propagate_angles``, then ``enforce_index_spacing`` with the known spacing (signed to the
    cutting direction DeepSlice predicted) or, without a spacing, ``enforce_index_order``.

    Parameters
    ----------
    image_directory : str or Path
        Folder holding only this series' images, named by :func:`section_image_name`
        (see :func:`write_section_images`).
    weights_dir : str or Path
        Folder with DeepSlice's weight files (see :func:`check_deepslice`).
    species : str
        Only ``"mouse"``: cellmap2d maps to the Allen mouse CCFv3.
    ensemble : bool, optional
        Average DeepSlice's two models; default DeepSlice's own (``True`` for mouse).
    section_spacing_um : float, optional
        Distance between consecutive section indices (the manifest's ``section_spacing_um``).
    brain_id : str
        Brain id, for messages and the series ``name``.
    level0_shapes : mapping of int to (height, width), optional
        Level-0 size of each section; sets each slice's ``width``/``height`` (DESIGN.md).
        The images must show the whole section, at any resolution. Default: the image size.

    Returns
    -------
    QuintSeries
        One anchor per image, ``nr`` = section z index, ``filename`` = the image's name, sorted
        by section; ``metadata`` is DeepSlice's (``target``, ``aligner``) with ``name`` set.

    Raises
    ------
    ImportError, FileNotFoundError
        As :func:`check_deepslice`, before TensorFlow is imported.
    ValueError
        If an image name does not carry exactly one section number, or a section lacks a
        ``level0_shapes`` entry.
    """
    where = f"brain {brain_id}: " if brain_id else ""
    if species != "mouse":
        raise ValueError(
            f"{where}DeepSlice species {species!r}: cellmap2d maps to the Allen mouse CCFv3, so "
            "only the 'mouse' model applies"
        )
    check_deepslice(weights_dir, species=species)
    directory = Path(image_directory)
    sections = _series_images(directory)
    if level0_shapes is not None:
        missing = sorted(set(sections.values()) - set(level0_shapes))
        if missing:
            raise ValueError(f"{where}level0_shapes has no size for sections {missing}")
    folder = Path(weights_dir).expanduser().resolve()
    with _weights_from(folder) as deepslice, tempfile.TemporaryDirectory() as tmp:
        model = deepslice.DSModel(species)
        model.predict(str(directory), ensemble=ensemble, section_numbers=True)
        if len(sections) > 1:
            model.propagate_angles()
            if section_spacing_um:
                direction = _depth_slope(model.predictions)
                model.enforce_index_spacing(section_thickness=direction * float(section_spacing_um))
            else:
                model.enforce_index_order()
        model.save_predictions(str(Path(tmp) / "deepslice"))
        series = read_quint(Path(tmp) / "deepslice.json")
    anchors = []
    for anchor in series:
        name = Path(anchor.filename).name
        if name not in sections:
            raise ValueError(f"{where}DeepSlice returned an unknown image {anchor.filename!r}")
        z = sections[name]
        if anchor.nr != z:
            raise ValueError(f"{where}DeepSlice read section {anchor.nr} from {name}, expected {z}")
        anchor.filename = name
        if level0_shapes is not None:
            anchor.height, anchor.width = (int(v) for v in level0_shapes[z])
        anchors.append(anchor)
    anchors.sort(key=lambda a: a.nr)
    metadata = {**series.metadata, "name": str(brain_id)}
    return QuintSeries(anchors, metadata)


@dataclass
class SeriesSeed:
    """Where a plane search can start from, summarised from a QUINT series.

    The plane model is the search's: ``ap = ap_plane + tan(angle_ml)·(ml − midline) +
    tan(angle_dv)·(dv − dv_pivot)`` in CCF µm, and ``ap_plane ≈ a0 + step·section``.

    Attributes
    ----------
    sections
        One row per slice, sorted by section: ``section`` (``nr``), ``ap_plane_um`` (AP where
        the slice's plane crosses ``ml = midline``, ``dv = dv_pivot``), ``ap_centre_um`` (AP of
        the image centre), ``angle_ml_deg``, ``angle_dv_deg`` (that slice's own angles).
    a0_um, step_um
        Robust (Theil–Sen) line ``ap_plane = a0 + step·section``; ``step_um`` is NaN for a
        single section.
    angle_ml_deg, angle_dv_deg
        Median cutting angles: AP change along ML and along DV, in degrees.
    """

    sections: pd.DataFrame
    a0_um: float
    step_um: float
    angle_ml_deg: float
    angle_dv_deg: float
    midline_um: float = 5700.0
    dv_pivot_um: float = 4000.0
    params: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.params = {
            "a0_um": self.a0_um,
            "step_um": self.step_um,
            "angle_ml_deg": self.angle_ml_deg,
            "angle_dv_deg": self.angle_dv_deg,
        }


def series_seed(
    series: list[SectionAnchor], *, midline_um: float = 5700.0, dv_pivot_um: float = 4000.0
) -> SeriesSeed:
    """Summarise a DeepSlice/QuickNII series as a starting point for the plane search.

    Parameters
    ----------
    series : list of SectionAnchor
        E.g. :func:`run_deepslice`'s result or :func:`~cellmap2d.anchoring.read_quint`.
    midline_um, dv_pivot_um : float
        ML and DV (CCF µm) at which ``ap_plane_um`` is read off each plane.

    Returns
    -------
    SeriesSeed
        Per-section AP and angles, the series line and the median angles.

    Raises
    ------
    ValueError
        If the series is empty or a slice is not roughly coronal (its plane never crosses the
        AP axis), naming the slice.
    """
    if len(series) == 0:
        raise ValueError("series_seed needs at least one slice")
    rows = []
    for anchor in series:
        n_ap, n_dv, n_ml = anchor.normal()
        if abs(n_ap) < 1e-6:
            raise ValueError(
                f"slice {anchor.filename!r} (nr={anchor.nr}) is not a coronal section: its plane "
                "is parallel to the AP axis"
            )
        tan_ml, tan_dv = -n_ml / n_ap, -n_dv / n_ap
        centre = anchor.to_ccf(
            anchor.width / 2.0, anchor.height / 2.0, width=anchor.width, height=anchor.height
        )[0]
        ap_plane = (
            centre[0] + tan_ml * (midline_um - centre[2]) + tan_dv * (dv_pivot_um - centre[1])
        )
        rows.append(
            {
                "section": anchor.nr,
                "ap_plane_um": float(ap_plane),
                "ap_centre_um": float(centre[0]),
                "angle_ml_deg": math.degrees(math.atan(tan_ml)),
                "angle_dv_deg": math.degrees(math.atan(tan_dv)),
            }
        )
    table = pd.DataFrame(rows).sort_values("section", kind="stable").reset_index(drop=True)
    z = table["section"].to_numpy(float)
    ap = table["ap_plane_um"].to_numpy(float)
    if np.ptp(z) > 0:
        from scipy.stats import theilslopes

        fit = theilslopes(ap, z)
        a0, step = float(fit.intercept), float(fit.slope)
    else:
        a0, step = float(np.median(ap)), math.nan
    return SeriesSeed(
        sections=table,
        a0_um=a0,
        step_um=step,
        angle_ml_deg=float(table["angle_ml_deg"].median()),
        angle_dv_deg=float(table["angle_dv_deg"].median()),
        midline_um=float(midline_um),
        dv_pivot_um=float(dv_pivot_um),
    )
