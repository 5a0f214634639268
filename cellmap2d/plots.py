"""QC figures (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SectionView", "series_overview"]


@dataclass
class SectionView:
    """One panel: a section image, the atlas regions warped onto it, and its cells."""

    section: int
    image: np.ndarray
    labels: np.ndarray | None = None  # region ids on the image grid
    cells_xy: np.ndarray | None = None  # (n, 2) in image pixels
    title: str = ""


def _boundaries(labels: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    return edge


def series_overview(views: Sequence[SectionView], *, columns: int = 6, title: str = ""):
    """A grid of sections with atlas boundaries (cyan) and mapped cells (magenta).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = max(len(views), 1)
    columns = min(columns, n)
    rows = int(np.ceil(n / columns))
    fig = Figure(figsize=(3.0 * columns, 2.3 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, view in zip(axes, views, strict=False):
        image = np.asarray(view.image, dtype=np.float32)
        hi = float(np.percentile(image, 99.5)) if image.size else 1.0
        ax.imshow(image, cmap="gray", vmin=float(np.percentile(image, 1)), vmax=hi or 1.0)
        if view.labels is not None:
            from matplotlib.colors import ListedColormap

            edge = np.ma.masked_where(~_boundaries(view.labels), np.ones(view.labels.shape))
            ax.imshow(edge, cmap=ListedColormap(["cyan"]), alpha=0.7, interpolation="nearest")
        if view.cells_xy is not None and len(view.cells_xy):
            ax.scatter(view.cells_xy[:, 0], view.cells_xy[:, 1], s=1.5, c="magenta", linewidths=0)
        ax.set_title(view.title or f"section {view.section}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
