"""Figures a person would rather look at than read: true vs predicted gene maps, domain maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def gene_maps(
    xy: np.ndarray, panels: dict[str, np.ndarray], genes: Sequence[str], gene_idx: Sequence[int], path: str | Path
) -> Path:
    """One row per gene, one column per panel (e.g. true, INR, k-NN); shared colour scale per row."""
    cols = list(panels)
    fig, axes = plt.subplots(len(gene_idx), len(cols), figsize=(3.0 * len(cols), 2.8 * len(gene_idx)), squeeze=False)
    for r, (g, name) in enumerate(zip(gene_idx, genes)):
        vmin, vmax = np.percentile(panels[cols[0]][:, g], [1, 99])
        for c, col in enumerate(cols):
            ax = axes[r, c]
            ax.scatter(xy[:, 0], xy[:, 1], c=panels[col][:, g], s=6, cmap="viridis", vmin=vmin, vmax=vmax, linewidths=0)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col)
            if c == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def label_maps(xy: np.ndarray, panels: dict[str, np.ndarray], path: str | Path) -> Path:
    """Categorical maps side by side (e.g. true domains, clusters of the prediction)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, lab) in zip(axes[0], panels.items()):
        codes = np.unique(np.asarray(lab).astype(str), return_inverse=True)[1]
        ax.scatter(xy[:, 0], xy[:, 1], c=codes, s=6, cmap="tab10", linewidths=0)
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
