"""Reading brains: the manifest CSV and OME-Zarr (NGFF 0.4/0.5) section series.

A brain is one multiscale image with axes ``c, z, y, x`` (z = section index). Pixel sizes come
from the ``coordinateTransformations`` scales (µm), or from the manifest where metadata lacks them.
Pixel coordinates follow one convention at every level: pixel ``i`` of level ``l`` (downsampled
by ``f``) covers level-0 pixels ``[i·f, (i+1)·f)``, so its centre is at level-0 ``(i + 0.5)·f − 0.5``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "BrainImage",
    "BrainSpec",
    "open_brain",
    "parse_sections",
    "read_manifest",
    "to_level0",
    "from_level0",
    "inspect_section",
    "section_thumbnail",
    "write_ome_zarr",
]

MANIFEST_COLUMNS = (
    "brain_id",
    "path",
    "signal_channel",
    "autofluorescence_channel",
    "section_spacing_um",
)


@dataclass(frozen=True)
class BrainSpec:
    """One row of the manifest."""

    brain_id: str
    path: str
    signal_channel: int
    autofluorescence_channel: int
    section_spacing_um: float
    pixel_size_um: float | None = None
    level: int | None = None
    sections: tuple[int, ...] | None = None


def parse_sections(text: str | float | None) -> tuple[int, ...] | None:
    """Parse a section list such as ``"10-120"`` or ``"1,3,5-9"`` (inclusive ranges).

    Section indices are ≥ 0; a negative index, a backwards range or a non-number raises
    ValueError naming the offending part.
    """
    if text is None or (isinstance(text, float) and math.isnan(text)) or str(text).strip() == "":
        return None
    out: list[int] = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        match = _SECTION_PART.fullmatch(part)
        if match is None:
            if part.startswith("-") or "--" in part:
                raise ValueError(f"section {part!r}: section indices must be ≥ 0")
            raise ValueError(
                f"section {part!r} is not an index or an inclusive range like '10-120'"
            )
        lo_i = int(match["lo"])
        hi_i = lo_i if match["hi"] is None else int(match["hi"])
        if hi_i < lo_i:
            raise ValueError(f"section range {part!r} runs backwards")
        out.extend(range(lo_i, hi_i + 1))
    return tuple(sorted(set(out)))


_SECTION_PART = re.compile(r"(?P<lo>[0-9]+)(?:\s*-\s*(?P<hi>[0-9]+))?")


def _is_url(path: str) -> bool:
    return "://" in path


def read_manifest(path: str | Path) -> list[BrainSpec]:
    """Read the manifest CSV; relative image paths are resolved against its folder.

    Raises
    ------
    ValueError
        Naming the file, row and column of any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    frame = pd.read_csv(
        path, dtype={"brain_id": str, "path": str, "sections": str}, skip_blank_lines=False
    )
    # blank lines are kept while reading so that the index gives the file line (header = 1)
    frame = frame.dropna(how="all")
    lines = frame.index.to_numpy() + 2
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: manifest lacks columns {missing}; expected {', '.join(MANIFEST_COLUMNS)} "
            "and optionally pixel_size_um, level, sections"
        )
    for row_no, row in zip(lines, frame.itertuples(index=False), strict=True):
        for column in MANIFEST_COLUMNS:
            value = getattr(row, column)
            if pd.isna(value) or str(value).strip() == "":
                brain = "" if column == "brain_id" else f" (brain {str(row.brain_id).strip()})"
                raise ValueError(f"{path} line {row_no}{brain}: column {column!r} is empty")
    brain_ids = frame["brain_id"].str.strip()
    if brain_ids.duplicated().any():
        dup = sorted(set(brain_ids[brain_ids.duplicated()]))
        raise ValueError(f"{path}: brain ids appear more than once: {dup}")
    specs = []
    for row_no, row in zip(lines, frame.itertuples(index=False), strict=True):
        where = f"{path} line {row_no} (brain {str(row.brain_id).strip()})"
        try:
            image = str(row.path).strip()
            if not _is_url(image) and not Path(image).is_absolute():
                image = str((path.parent / image).resolve())
            spacing = float(row.section_spacing_um)
            if not spacing > 0:
                raise ValueError("section_spacing_um must be > 0")
            pixel = getattr(row, "pixel_size_um", None)
            level = getattr(row, "level", None)
            specs.append(
                BrainSpec(
                    brain_id=str(row.brain_id).strip(),
                    path=image,
                    signal_channel=int(row.signal_channel),
                    autofluorescence_channel=int(row.autofluorescence_channel),
                    section_spacing_um=spacing,
                    pixel_size_um=None if pd.isna(pixel) else float(pixel),
                    level=None if pd.isna(level) else int(level),
                    sections=parse_sections(getattr(row, "sections", None)),
                )
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return specs


@dataclass
class BrainImage:
    """A lazily read OME-Zarr section series.

    Attributes
    ----------
    brain_id, path
        Identity and location.
    arrays
        One zarr array per level, axes ``(c, z, y, x)``.
    pixel_size_um
        In-plane pixel size (µm) per level.
    """

    brain_id: str
    path: str
    arrays: list[Any]
    pixel_size_um: list[float]

    @property
    def n_channels(self) -> int:
        return int(self.arrays[0].shape[0])

    @property
    def n_sections(self) -> int:
        return int(self.arrays[0].shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(height, width)``."""
        return int(self.arrays[0].shape[2]), int(self.arrays[0].shape[3])

    def downsampling(self, level: int) -> float:
        """Level-0 pixels per pixel of ``level``: the ratio of the metadata pixel sizes.

        Pyramids written by :func:`write_ome_zarr` are exact 2× block means with odd sizes
        cropped, so the array width ratio is wrong for odd sizes; it is only the fallback when
        the pixel sizes are missing.
        """
        sizes = self.pixel_size_um
        if 0 <= level < len(sizes):
            base, size = float(sizes[0]), float(sizes[level])
            if math.isfinite(base) and math.isfinite(size) and base > 0 and size > 0:
                return size / base
        return self.shape[1] / self.arrays[level].shape[3]

    def section(self, z: int, channel: int, *, level: int = 0) -> np.ndarray:
        """One section plane ``(y, x)`` of one channel at one level."""
        self.check_index(z, channel, level)
        return np.asarray(self.arrays[level][channel, z])

    def level_for(self, pixel_size_um: float) -> int:
        """The coarsest level whose pixels are no larger than ``pixel_size_um``."""
        fine_enough = [i for i, p in enumerate(self.pixel_size_um) if p <= pixel_size_um * 1.001]
        return max(fine_enough) if fine_enough else 0

    def check_index(self, z: int, channel: int, level: int) -> None:
        """Raise ``IndexError`` naming the brain if section, channel or level does not exist."""
        where = f"brain {self.brain_id} ({self.path})"
        if not 0 <= level < len(self.arrays):
            raise IndexError(f"{where}: level {level} does not exist (has {len(self.arrays)})")
        if not 0 <= channel < self.n_channels:
            raise IndexError(f"{where}: channel {channel} does not exist (has {self.n_channels})")
        if not 0 <= z < self.n_sections:
            raise IndexError(f"{where}: section {z} does not exist (has {self.n_sections})")


def open_brain(
    path: str | Path,
    *,
    brain_id: str = "",
    pixel_size_um: float | None = None,
    storage_options: dict[str, Any] | None = None,
) -> BrainImage:
    """Open an OME-Zarr brain (local path or fsspec URL, e.g. anonymous ``s3://``).

    ``pixel_size_um`` (level 0) is used only when the metadata carries no µm scale.
    """
    import zarr

    path = str(path)
    where = f"brain {brain_id} ({path})" if brain_id else path
    if _is_url(path) and path.startswith("s3://") and storage_options is None:
        storage_options = {"anon": True}
    if not _is_url(path) and not Path(path).exists():
        raise FileNotFoundError(f"{where}: OME-Zarr not found")
    try:
        group = zarr.open_group(path, mode="r", storage_options=storage_options)
    except Exception as exc:
        raise ValueError(f"{where}: not a readable OME-Zarr group ({exc})") from exc
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise ValueError(f"{where}: no 'multiscales' metadata; is this an OME-Zarr image?")
    meta = multiscales[0]
    axes = [a["name"] if isinstance(a, dict) else a for a in meta.get("axes", [])]
    if axes and [a.lower() for a in axes] != ["c", "z", "y", "x"]:
        raise ValueError(f"{where}: axes are {axes}; cellmap2d reads (c, z, y, x)")
    arrays, sizes = [], []
    for ds in meta["datasets"]:
        arrays.append(group[ds["path"]])
        scale = next(
            (t["scale"] for t in ds.get("coordinateTransformations", []) if t["type"] == "scale"),
            None,
        )
        sizes.append(float(scale[-1]) if scale else math.nan)
    if any(a.ndim != 4 for a in arrays):
        raise ValueError(f"{where}: expected 4-D (c, z, y, x) arrays")
    units = {a.get("name"): a.get("unit") for a in meta.get("axes", []) if isinstance(a, dict)}
    if units.get("x") not in (None, "micrometer"):
        factor = {"nanometer": 1e-3, "millimeter": 1e3}.get(units["x"])
        if factor is None:
            raise ValueError(f"{where}: unsupported x unit {units['x']!r}")
        sizes = [s * factor for s in sizes]
    if any(math.isnan(s) for s in sizes):
        if pixel_size_um is None:
            raise ValueError(
                f"{where}: no µm scale in the metadata; give pixel_size_um in the manifest"
            )
        sizes = [pixel_size_um * arrays[0].shape[3] / a.shape[3] for a in arrays]
    return BrainImage(brain_id=brain_id, path=path, arrays=arrays, pixel_size_um=sizes)


def to_level0(coord: np.ndarray, factor: float) -> np.ndarray:
    """Level-0 coordinate of a coordinate at a level downsampled by ``factor``."""
    return (np.asarray(coord, dtype=np.float64) + 0.5) * factor - 0.5


def from_level0(coord: np.ndarray, factor: float) -> np.ndarray:
    """Coordinate at a level downsampled by ``factor`` of a level-0 coordinate."""
    return (np.asarray(coord, dtype=np.float64) + 0.5) / factor - 0.5


def write_ome_zarr(
    path: str | Path,
    volume: np.ndarray,
    *,
    pixel_size_um: float,
    section_spacing_um: float,
    n_levels: int = 3,
    chunk: int = 512,
    channel_names: Sequence[str] | None = None,
) -> None:
    """Write ``(c, z, y, x)`` as an NGFF 0.4 multiscale image with 2× in-plane levels."""
    import zarr
    from ome_zarr.format import FormatV04

    with warnings.catch_warnings():  # ome-zarr warns about its own Scaler when imported
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import write_multiscales_metadata
    from skimage.transform import downscale_local_mean

    pyramid = [volume]
    exact: np.ndarray = volume  # the unrounded block means of the previous level
    integer = np.issubdtype(volume.dtype, np.integer)
    for _ in range(1, n_levels):
        h, w = (exact.shape[2] // 2) * 2, (exact.shape[3] // 2) * 2
        exact = downscale_local_mean(exact[:, :, :h, :w], (1, 1, 2, 2))
        if integer:
            info = np.iinfo(volume.dtype)
            level = np.clip(np.rint(exact), info.min, info.max).astype(volume.dtype)
        else:
            level = exact.astype(volume.dtype)
        pyramid.append(level)
    transforms = [
        [
            {
                "type": "scale",
                "scale": [1.0, section_spacing_um, pixel_size_um * 2**i, pixel_size_um * 2**i],
            }
        ]
        for i in range(n_levels)
    ]
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    for i, level in enumerate(pyramid):
        group.create_array(str(i), data=level, chunks=(1, 1, chunk, chunk))
    datasets = [{"path": str(i), "coordinateTransformations": t} for i, t in enumerate(transforms)]
    write_multiscales_metadata(group, datasets, fmt=FormatV04(), axes=axes)
    if channel_names:
        group.attrs["omero"] = {
            "channels": [{"label": n, "active": True} for n in channel_names],
        }


def section_thumbnail(
    brain: BrainImage, z: int, channel: int, *, pixel_size_um: float
) -> tuple[np.ndarray, int]:
    """A section at the coarsest level whose pixels are no larger than ``pixel_size_um``.

    Returns the float32 image and its level.
    """
    level = brain.level_for(pixel_size_um)
    return brain.section(z, channel, level=level).astype(np.float32), level


def inspect_section(brain: BrainImage, z: int, channels: Sequence[int]) -> dict[str, Any]:
    """Check a section is usable and summarise it (from the coarsest level).

    Raises
    ------
    ValueError
        Naming brain and section, for non-numeric data, NaNs or a saturated section.
    """
    where = f"brain {brain.brain_id} section {z}"
    level = len(brain.arrays) - 1
    stats: dict[str, Any] = {
        "section": int(z),
        "level0_shape": list(brain.shape),
        "pixel_size_um": brain.pixel_size_um[0],
    }
    for c in channels:
        data = brain.section(z, c, level=level)
        if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
            raise ValueError(f"{where}: channel {c} has non-numeric dtype {data.dtype}")
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
            raise ValueError(
                f"{where}: channel {c} contains NaN/inf; fix or exclude the section "
                "with the manifest's `sections` column"
            )
        lo, hi = (float(v) for v in np.percentile(data, [1, 99.9]))
        stats[f"channel{c}_p1"], stats[f"channel{c}_p999"] = lo, hi
        if np.issubdtype(data.dtype, np.integer) and data.size:
            top = np.iinfo(data.dtype).max
            saturated = float((data >= top).mean())
            stats[f"channel{c}_saturated"] = saturated
            if saturated > 0.5:
                raise ValueError(
                    f"{where}: channel {c} is saturated on {saturated:.0%} of pixels; "
                    "exclude the section with the manifest's `sections` column"
                )
    stats["empty"] = all(stats[f"channel{c}_p999"] == stats[f"channel{c}_p1"] for c in channels)
    return stats
