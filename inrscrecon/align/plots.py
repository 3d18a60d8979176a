"""PNG overlay of one aligned pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_pair(
    fixed: np.ndarray,
    moving: np.ndarray,
    fixed_name: str,
    moving_name: str,
    title: str,
    path: Path,
    max_points: int,
) -> None:
    """Scatter fixed [n, 2] (grey) and moving [m, 2] (orange) µm coordinates of the common frame into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    for xy, name, colour in ((fixed, fixed_name, "0.6"), (moving, moving_name, "tab:orange")):
        if len(xy) > max_points:
            xy = xy[rng.choice(len(xy), max_points, replace=False)]
        ax.scatter(xy[:, 0], xy[:, 1], s=3, c=colour, alpha=0.6, linewidths=0, label=name)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.set_title(title, fontsize=9)
    ax.legend(markerscale=4, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
