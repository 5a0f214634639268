"""Allen Brain Cell (ABC) Atlas loader: cells with taxonomy and CCF coordinates as one AnnData.

Reads the ``abc_atlas_access`` cache layout (contract, see DESIGN.md)::

    <abc_dir>/metadata/<dataset>/<version>/cell_metadata.csv
    <abc_dir>/metadata/<dataset>-CCF/<version>/ccf_coordinates.csv
    <abc_dir>/metadata/WMB-taxonomy/<version>/views/cluster_to_cluster_annotation_membership_pivoted.csv

The CSVs are streamed in chunks and only the needed columns are read, with narrow dtypes, so the
~4 M MERFISH cells (or ~10 M with the Zhuang datasets) fit comfortably in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

__all__ = [
    "CCF_FILE",
    "DEFAULT_DATASETS",
    "KNOWN_DATASETS",
    "METADATA_FILE",
    "TAXONOMY_FILE",
    "TAXONOMY_LEVELS",
    "read_abc",
]

TAXONOMY_LEVELS: tuple[str, ...] = ("neurotransmitter", "class", "subclass", "supertype", "cluster")
DEFAULT_DATASETS: tuple[str, ...] = ("MERFISH-C57BL6J-638850",)
KNOWN_DATASETS: tuple[str, ...] = (
    "MERFISH-C57BL6J-638850",
    "Zhuang-ABCA-1",
    "Zhuang-ABCA-2",
    "Zhuang-ABCA-3",
    "Zhuang-ABCA-4",
)
METADATA_FILE = "cell_metadata.csv"
CCF_FILE = "ccf_coordinates.csv"
TAXONOMY_DIR = "WMB-taxonomy"
TAXONOMY_FILE = "views/cluster_to_cluster_annotation_membership_pivoted.csv"

# taxonomy levels that must be present for a cell to count as "with taxonomy";
# neurotransmitter is legitimately empty for non-neuronal clusters.
_REQUIRED_LEVELS = ("class", "subclass", "supertype", "cluster")
_LABEL_SEPARATOR = ":"


def read_abc(
    abc_dir: str | Path,
    datasets: str | Iterable[str] = DEFAULT_DATASETS,
    *,
    version: str | Mapping[str, str] | None = None,
    taxonomy_version: str | None = None,
    chunksize: int = 1_000_000,
    progress: Callable[[str], None] | None = None,
) -> anndata.AnnData:
    """Read ABC Atlas cells with their taxonomy and CCF coordinates.

    Parameters
    ----------
    abc_dir
        Root of an ``abc_atlas_access`` cache (the folder that holds ``metadata/``).
    datasets
        Dataset names, e.g. ``"MERFISH-C57BL6J-638850"``, ``"Zhuang-ABCA-1"`` (a single string is
        accepted).
    version
        Pinned version directory. A string applies to every metadata directory read (each dataset
        and its ``-CCF`` directory); a mapping pins per directory name (e.g.
        ``{"MERFISH-C57BL6J-638850-CCF": "20231215"}``), unlisted directories use the latest.
        ``None``: the latest version directory (last in sorted name order) of each.
    taxonomy_version
        Pinned ``WMB-taxonomy`` version; ``None`` = latest.
    chunksize
        Rows per CSV chunk.
    progress
        Called with a short message after each chunk.

    Returns
    -------
    anndata.AnnData
        ``obs`` index = ``cell_label`` (str, unique; labels that occur in more than one dataset are
        prefixed ``"<dataset>:"``); ``obs`` columns (all categorical): ``neurotransmitter, class,
        subclass, supertype, cluster, dataset, donor`` (``donor`` = ``donor_label`` when the
        metadata has it, else the dataset name; ``neurotransmitter`` may be missing (NaN) for
        clusters without one). ``obsm['ccf']`` = float32 (n, 3) CCF µm ``(ap, dv, ml)`` (= mm ·
        1000); ``X`` = empty float32 (n, 0); ``uns['abc']`` = provenance: directory, datasets,
        versions and, per dataset, rows read and cells dropped with the reason
        (``no_ccf``: no or non-finite CCF coordinates; ``no_taxonomy``: missing or unknown
        ``cluster_alias``; ``duplicate_label``: repeated ``cell_label`` in the metadata), and
        ``ccf_without_metadata`` (CCF rows whose label the metadata does not list).

    Raises
    ------
    FileNotFoundError
        Missing ``abc_dir``, dataset, version directory or file (the message names the path).
    ValueError
        A file lacks a required column, a taxonomy alias repeats, or no cell remains.
    """
    say = progress or (lambda _msg: None)
    root = Path(abc_dir)
    meta_root = root / "metadata"
    if not root.is_dir():
        raise FileNotFoundError(f"ABC directory not found: {root}")
    if not meta_root.is_dir():
        raise FileNotFoundError(
            f"ABC directory {root} has no 'metadata' folder: expected the abc_atlas_access cache "
            f"layout {meta_root}/<dataset>/<version>/{METADATA_FILE}"
        )
    if isinstance(datasets, str):
        datasets = (datasets,)
    datasets = tuple(datasets)
    if not datasets:
        raise ValueError("no ABC dataset requested")
    if len(set(datasets)) != len(datasets):
        raise ValueError(f"ABC datasets repeat: {list(datasets)}")
    if chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize}")

    tax_version = _pick_version(meta_root / TAXONOMY_DIR, taxonomy_version, what="ABC taxonomy")
    tax_path = meta_root / TAXONOMY_DIR / tax_version / TAXONOMY_FILE
    taxonomy = _Taxonomy.read(tax_path)
    say(f"taxonomy {tax_version}: {taxonomy.n_clusters} clusters")

    versions: dict[str, str] = {TAXONOMY_DIR: tax_version}
    counts: dict[str, dict[str, int]] = {}
    parts: list[_DatasetCells] = []
    for dataset in datasets:
        meta_dir = meta_root / dataset
        ccf_dir = meta_root / f"{dataset}-CCF"
        if not meta_dir.is_dir():
            available = sorted(
                p.name for p in meta_root.iterdir() if p.is_dir() and not p.name.endswith("-CCF")
            )
            raise FileNotFoundError(
                f"ABC dataset {dataset!r} not found: expected directory {meta_dir} "
                f"(available: {', '.join(available) or 'none'})"
            )
        meta_version = _pick_version(meta_dir, _pin(version, dataset), what=f"ABC {dataset}")
        ccf_version = _pick_version(
            ccf_dir, _pin(version, f"{dataset}-CCF"), what=f"ABC {dataset} CCF coordinates"
        )
        versions[dataset] = meta_version
        versions[f"{dataset}-CCF"] = ccf_version
        part = _read_dataset(
            dataset,
            meta_dir / meta_version / METADATA_FILE,
            ccf_dir / ccf_version / CCF_FILE,
            taxonomy,
            chunksize=chunksize,
            say=say,
        )
        counts[dataset] = part.counts
        parts.append(part)

    n_relabelled = _resolve_collisions(parts)
    n_total = sum(len(p.labels) for p in parts)
    if n_total == 0:
        raise ValueError(
            f"no ABC cell with both CCF coordinates and taxonomy in {root} "
            f"for datasets {list(datasets)}: {counts}"
        )

    labels = np.concatenate([p.labels for p in parts])
    if not pd.Index(labels, dtype=object).is_unique:  # only if a prefixed label already existed
        raise ValueError("ABC cell labels are not unique even after prefixing colliding ones")
    ccf = np.concatenate([p.ccf for p in parts]).astype(np.float32, copy=False)
    tax_codes = np.concatenate([p.tax_codes for p in parts])
    obs = pd.DataFrame(index=pd.Index(labels, dtype=object, name="cell_label"))
    for level in TAXONOMY_LEVELS:
        obs[level] = taxonomy.categorical(level, tax_codes)
    obs["dataset"] = pd.Categorical.from_codes(
        np.repeat(np.arange(len(parts), dtype=np.int16), [len(p.labels) for p in parts]),
        categories=list(datasets),
    )
    donors = union_categoricals([p.donor for p in parts], ignore_order=True)
    obs["donor"] = pd.Categorical(donors).remove_unused_categories()

    adata = anndata.AnnData(
        X=np.zeros((n_total, 0), dtype=np.float32),
        obs=obs,
        obsm={"ccf": ccf},
    )
    adata.uns["abc"] = {
        "dir": str(root.resolve()),
        "datasets": list(datasets),
        "versions": versions,
        "counts": counts,
        "n_cells": int(n_total),
        "n_relabelled": int(n_relabelled),
        "label_prefix_separator": _LABEL_SEPARATOR,
        "ccf_units": "um (ap, dv, ml) = ABC mm (x, y, z) * 1000",
    }
    say(f"ABC: {n_total} cells from {len(parts)} dataset(s)")
    return adata


# --------------------------------------------------------------------------------------------


def _pin(version: str | Mapping[str, str] | None, directory: str) -> str | None:
    if version is None or isinstance(version, str):
        return version
    return version.get(directory)


def _pick_version(directory: Path, pinned: str | None, *, what: str) -> str:
    """The pinned version directory, or the latest one (last in sorted name order)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{what}: directory not found: {directory}")
    if pinned is not None:
        if not (directory / pinned).is_dir():
            raise FileNotFoundError(
                f"{what}: pinned version directory not found: {directory / pinned}"
            )
        return pinned
    names = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"{what}: no version directory in {directory}")
    return names[-1]


def _header(path: Path, required: Iterable[str], *, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    columns = [str(c).strip() for c in pd.read_csv(path, nrows=0).columns]
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"{what}: {path} lacks column(s) {missing}; expected at least {list(required)}, "
            f"found {columns}"
        )
    return columns


class _Taxonomy:
    """cluster_alias → row code, and per level the category codes of each row."""

    def __init__(self, aliases: pd.Index, levels: dict[str, pd.Categorical]) -> None:
        self.aliases = aliases
        self.levels = levels

    @property
    def n_clusters(self) -> int:
        return len(self.aliases)

    @classmethod
    def read(cls, path: Path) -> _Taxonomy:
        columns = ("cluster_alias", *TAXONOMY_LEVELS)
        _header(path, columns, what="ABC taxonomy")
        table = pd.read_csv(path, usecols=list(columns), dtype=str, keep_default_na=False)
        table = table.apply(lambda col: col.str.strip()).replace("", np.nan)
        table = table.dropna(subset=["cluster_alias", *_REQUIRED_LEVELS])
        duplicated = table["cluster_alias"].duplicated()
        if duplicated.any():
            raise ValueError(
                f"ABC taxonomy {path}: cluster_alias values repeat, e.g. "
                f"{table.loc[duplicated, 'cluster_alias'].head(5).tolist()}"
            )
        levels = {
            level: pd.Categorical(
                table[level].to_numpy(), categories=sorted(table[level].dropna().unique())
            )
            for level in TAXONOMY_LEVELS
        }
        return cls(pd.Index(table["cluster_alias"].to_numpy(), dtype=object), levels)

    def codes(self, aliases: pd.Series) -> np.ndarray:
        """Row code per cluster alias (str); -1 where missing or unknown."""
        return self.aliases.get_indexer(aliases.str.strip()).astype(np.int32)

    def categorical(self, level: str, row_codes: np.ndarray) -> pd.Categorical:
        cat = self.levels[level]
        return pd.Categorical.from_codes(
            cat.codes[row_codes], categories=cat.categories
        ).remove_unused_categories()


class _DatasetCells:
    def __init__(
        self,
        labels: np.ndarray,
        ccf: np.ndarray,
        tax_codes: np.ndarray,
        donor: pd.Categorical,
        counts: dict[str, int],
        dataset: str,
    ) -> None:
        self.labels = labels
        self.ccf = ccf
        self.tax_codes = tax_codes
        self.donor = donor
        self.counts = counts
        self.dataset = dataset


def _read_ccf(
    path: Path, dataset: str, *, chunksize: int, say: Callable[[str], None]
) -> tuple[pd.Index, np.ndarray, dict[str, int]]:
    """CCF table → (unique label index, float32 (n, 3) µm, counts)."""
    what = f"ABC {dataset} CCF coordinates"
    _header(path, ("cell_label", "x", "y", "z"), what=what)
    labels: list[np.ndarray] = []
    coords: list[np.ndarray] = []
    n_rows = 0
    reader = pd.read_csv(
        path,
        usecols=["cell_label", "x", "y", "z"],
        dtype={"cell_label": str, "x": np.float32, "y": np.float32, "z": np.float32},
        chunksize=chunksize,
    )
    with reader:
        for chunk in reader:
            n_rows += len(chunk)
            labels.append(chunk["cell_label"].to_numpy(dtype=object))
            coords.append(chunk[["x", "y", "z"]].to_numpy(dtype=np.float32))
            say(f"{dataset}: read {n_rows} CCF rows")
    label_arr = np.concatenate(labels) if labels else np.empty(0, dtype=object)
    xyz = np.concatenate(coords) if coords else np.empty((0, 3), dtype=np.float32)
    index = pd.Index(label_arr, dtype=object)
    counts = {"ccf_rows": n_rows, "ccf_duplicate_label": 0}
    if not index.is_unique:
        first = ~index.duplicated(keep="first")
        counts["ccf_duplicate_label"] = int((~first).sum())
        index = index[first]
        xyz = xyz[first]
    # mm (x=AP, y=DV, z=ML) → µm (ap, dv, ml): same axis order
    xyz *= np.float32(1000.0)
    return index, xyz, counts


def _read_dataset(
    dataset: str,
    meta_path: Path,
    ccf_path: Path,
    taxonomy: _Taxonomy,
    *,
    chunksize: int,
    say: Callable[[str], None],
) -> _DatasetCells:
    what = f"ABC {dataset} cell metadata"
    columns = _header(meta_path, ("cell_label", "cluster_alias"), what=what)
    has_donor = "donor_label" in columns
    ccf_index, ccf_xyz, counts = _read_ccf(ccf_path, dataset, chunksize=chunksize, say=say)
    ccf_finite = np.isfinite(ccf_xyz).all(axis=1)

    usecols = ["cell_label", "cluster_alias"] + (["donor_label"] if has_donor else [])
    labels: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    tax: list[np.ndarray] = []
    donors: list[pd.Categorical] = []
    seen_rows = np.zeros(len(ccf_index), dtype=bool)  # CCF rows already kept
    listed = np.zeros(len(ccf_index), dtype=bool)  # CCF rows whose label the metadata lists
    n_rows = n_no_ccf = n_no_tax = n_dup = n_no_label = 0
    reader = pd.read_csv(
        meta_path, usecols=usecols, dtype=dict.fromkeys(usecols, str), chunksize=chunksize
    )
    with reader:
        for chunk in reader:
            n_rows += len(chunk)
            label = chunk["cell_label"]
            has_label = label.notna().to_numpy()
            row = ccf_index.get_indexer(label.to_numpy(dtype=object))
            has_ccf = row >= 0
            has_ccf[has_ccf] = ccf_finite[row[has_ccf]]
            code = taxonomy.codes(chunk["cluster_alias"])
            has_tax = code >= 0
            # a label seen before (in an earlier chunk or earlier in this chunk) is a duplicate
            dup = chunk["cell_label"].duplicated(keep="first").to_numpy()
            dup[has_ccf] |= seen_rows[row[has_ccf]]
            keep = has_label & ~dup & has_ccf & has_tax
            n_no_label += int((~has_label).sum())
            n_dup += int((has_label & dup).sum())
            n_no_ccf += int((has_label & ~dup & ~has_ccf).sum())
            n_no_tax += int((has_label & ~dup & has_ccf & ~has_tax).sum())
            seen_rows[row[keep]] = True
            listed[row[row >= 0]] = True
            labels.append(label.to_numpy(dtype=object)[keep])
            rows.append(row[keep])
            tax.append(code[keep])
            if has_donor:
                donor = chunk["donor_label"].fillna(dataset).to_numpy(dtype=object)[keep]
                donors.append(pd.Categorical(donor))
            else:
                donors.append(
                    pd.Categorical.from_codes(np.zeros(int(keep.sum()), np.int8), [dataset])
                )
            say(f"{dataset}: read {n_rows} metadata rows, kept {sum(len(x) for x in labels)}")

    row_all = np.concatenate(rows) if rows else np.empty(0, dtype=np.intp)
    kept = len(row_all)
    counts.update(
        {
            "metadata_rows": n_rows,
            "kept": kept,
            "dropped_no_ccf": n_no_ccf,
            "dropped_no_taxonomy": n_no_tax,
            "dropped_duplicate_label": n_dup,
            "dropped_no_label": n_no_label,
            "ccf_without_metadata": int(len(ccf_index) - listed.sum()),
        }
    )
    donor_all = (
        union_categoricals(donors, ignore_order=True)
        if donors
        else pd.Categorical.from_codes(np.empty(0, np.int8), [dataset])
    )
    return _DatasetCells(
        labels=np.concatenate(labels) if labels else np.empty(0, dtype=object),
        ccf=ccf_xyz[row_all],
        tax_codes=np.concatenate(tax) if tax else np.empty(0, dtype=np.int32),
        donor=donor_all,
        counts=counts,
        dataset=dataset,
    )


def _resolve_collisions(parts: list[_DatasetCells]) -> int:
    """Prefix ``<dataset>:`` to labels that occur in more than one dataset; return how many."""
    if len(parts) < 2:
        return 0
    all_labels = pd.Index(np.concatenate([p.labels for p in parts]), dtype=object)
    if all_labels.is_unique:
        return 0
    colliding = pd.Index(all_labels[all_labels.duplicated(keep=False)].unique(), dtype=object)
    n = 0
    for part in parts:
        hit = colliding.get_indexer(part.labels) >= 0
        if hit.any():
            part.labels = part.labels.copy()
            part.labels[hit] = [f"{part.dataset}{_LABEL_SEPARATOR}{x}" for x in part.labels[hit]]
            n += int(hit.sum())
            part.counts["relabelled"] = int(hit.sum())
    return n
