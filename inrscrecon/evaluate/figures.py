"""Figures a person would rather look at than read: true vs predicted gene maps, domain maps.

Both take planar coordinates [N, 2] (µm; image orientation: y grows downwards) and keep PNGs small
(``dpi`` 80, marker size scaled to the number of points).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 80


def save_small(fig, path: str | Path) -> Path:
    """Save ``fig`` as a palette PNG (≤ 256 colours, optimised): scatter maps of thousands of spots shrink ~3×."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    plt.close(fig)
    buf.seek(0)
    path = Path(path)
    Image.open(buf).convert("RGB").quantize(colors=256).save(path, optimize=True)
    return path


def _marker(n: int) -> float:
    return float(np.clip(12000.0 / max(n, 1), 1.0, 30.0))


def _frame(ax, title: str | None = None) -> None:
    import textwrap

    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title("\n".join(textwrap.wrap(title.replace("\n", " "), 34)), fontsize=8)


def gene_maps(
    xy: np.ndarray,
    panels: dict[str, np.ndarray],
    genes: Sequence[str],
    gene_idx: Sequence[int],
    path: str | Path,
) -> Path:
    """One row per gene, one column per panel (e.g. measured, INR, k-NN); shared colour scale per row (1st–99th
    percentile of the first panel). panels: name → [N, G]."""
    cols = list(panels)
    fig, axes = plt.subplots(
        len(gene_idx),
        len(cols),
        figsize=(2.4 * len(cols) + 0.8, 2.3 * len(gene_idx) + 0.3),
        squeeze=False,
        layout="constrained",
    )
    s = _marker(len(xy))
    for r, (g, name) in enumerate(zip(gene_idx, genes)):
        vmin, vmax = np.percentile(panels[cols[0]][:, g], [1, 99])
        for c, col in enumerate(cols):
            ax = axes[r, c]
            sc = ax.scatter(
                xy[:, 0],
                xy[:, 1],
                c=panels[col][:, g],
                s=s,
                cmap="viridis",
                vmin=vmin,
                vmax=vmax,
                linewidths=0,
            )
            _frame(ax, col if r == 0 else None)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
        cb = fig.colorbar(sc, ax=axes[r].tolist(), shrink=0.8, pad=0.02)
        cb.set_label("log1p expr.", fontsize=7)
        cb.ax.tick_params(labelsize=6)
    return save_small(fig, path)


def match_labels(reference: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rename cluster ids in ``labels`` to the reference category they overlap most (Hungarian matching), so
    that maps side by side share colours; unmatched clusters keep a distinct name."""
    from scipy.optimize import linear_sum_assignment

    ref = np.asarray(reference).astype(str)
    lab = np.asarray(labels).astype(str)
    r_names, r_idx = np.unique(ref, return_inverse=True)
    l_names, l_idx = np.unique(lab, return_inverse=True)
    overlap = np.zeros((len(l_names), len(r_names)))
    np.add.at(overlap, (l_idx, r_idx), 1)
    rows, cols = linear_sum_assignment(-overlap)
    rename = {l_names[i]: r_names[j] for i, j in zip(rows, cols)}
    return np.array([rename.get(v, f"cluster {v}") for v in lab], dtype=object)


def label_maps(xy: np.ndarray, panels: dict[str, np.ndarray], path: str | Path) -> Path:
    """Categorical maps side by side (e.g. true domains, clusters of the prediction), one colour per category
    name across all panels. A panel whose names are not the first panel's (cluster ids) is matched to it
    first (:func:`match_labels`), so that the same region has the same colour and the legend lists each
    category once."""
    first = next(iter(panels.values())) if panels else None
    if first is not None:
        ref = {str(v) for v in np.asarray(first)}
        panels = {
            k: (v if {str(x) for x in np.asarray(v)} <= ref else match_labels(np.asarray(first), v))
            for k, v in panels.items()
        }
    names = sorted({str(v) for lab in panels.values() for v in np.asarray(lab)})
    colour = {n: i for i, n in enumerate(names)}
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(
        1, len(panels), figsize=(2.6 * len(panels), 3.4), squeeze=False, layout="constrained"
    )
    s = _marker(len(xy))
    for ax, (title, lab) in zip(axes[0], panels.items()):
        codes = np.array([colour[str(v)] for v in np.asarray(lab)])
        ax.scatter(xy[:, 0], xy[:, 1], c=cmap(codes % cmap.N), s=s, linewidths=0)
        _frame(ax, title)
    handles = [Patch(color=cmap(colour[n] % cmap.N), label=n) for n in names[:20]]
    fig.legend(
        handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False
    )
    return save_small(fig, path)
