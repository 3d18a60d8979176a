"""Alignment guard: one overlay score for any pose, and the choice between the aligned, identity and centroid
poses by it.

The score of a pose (moving a → fixed b) is ``overlap × gain``:

* ``overlap`` — fraction of moving cells with a fixed cell within 1.5 spacings of where the pose puts them;
* ``gain`` — how much better than chance those cells agree with their spatially nearest fixed cell, relative to
  the best agreement expression allows: (mean cos(f_a, f_nearest) − chance) / (mean cos(f_a, f_best) − chance),
  where ``f_best`` is each cell's most similar fixed cell anywhere and ``chance`` the mean similarity of random
  pairs (features: unit rows of the spatially smoothed joint PCA).

A pose that lands the section off the other (little overlap) or on the wrong tissue (nearest cells no more
alike than random ones) scores near 0, however well the few overlapping cells happen to agree; a correct
overlay of adjacent sections scores 0.5–0.9.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from inrscrecon.align.kabsch import Pose
from inrscrecon.align.matching import knn


@dataclass
class OverlayScore:
    score: float  # overlap × gain, in [−1, 1]; ≈ 0 for a wrong overlay
    overlap: float
    gain: float


@dataclass
class ScoreContext:
    """What the score needs of a pair, computed once: features, the fixed tree, the chance and best levels."""

    xy_a: np.ndarray  # [n, 2] moving cells (µm, observed frame), a subsample
    fa: np.ndarray  # [n, c] unit features
    fb: np.ndarray  # [m, c] unit features of every fixed cell
    tree: cKDTree
    spacing: float
    chance: float
    best: float


def score_context(
    xy_a: np.ndarray,
    fa: np.ndarray,
    xy_b: np.ndarray,
    fb: np.ndarray,
    spacing: float,
    rng: np.random.Generator,
    tree: cKDTree | None = None,
    max_cells: int = 3000,
) -> ScoreContext:
    """Prepare the overlay score of poses of a onto b (xy µm [n, 2] / [m, 2], unit features [n, c] / [m, c])."""
    sa = np.sort(rng.choice(len(xy_a), min(len(xy_a), max_cells), replace=False))
    xa, ea = xy_a[sa], fa[sa]
    rand = fb[rng.integers(0, len(fb), size=len(ea))]
    chance = float(np.einsum("nc,nc->n", ea, rand).mean())
    pool = fb if len(fb) <= 10 * max_cells else fb[rng.choice(len(fb), 10 * max_cells, replace=False)]
    dist, _ = knn(ea, pool, 1)  # best match among (a sample of) the fixed cells
    best = float(np.mean(1.0 - dist[:, 0] ** 2 / 2))
    return ScoreContext(xa, ea, fb, tree if tree is not None else cKDTree(xy_b), spacing, chance, best)


def overlay_score(ctx: ScoreContext, pose: Pose) -> OverlayScore:
    """Score of one pose (see the module docstring)."""
    d, j = ctx.tree.query(pose.apply(ctx.xy_a), k=1, distance_upper_bound=1.5 * ctx.spacing)
    ok = np.isfinite(d)
    overlap = float(ok.mean())
    if not ok.any():
        return OverlayScore(0.0, 0.0, 0.0)
    near = float(np.einsum("nc,nc->n", ctx.fa[ok], ctx.fb[j[ok]]).mean())
    gain = (near - ctx.chance) / max(ctx.best - ctx.chance, 1e-6)
    return OverlayScore(overlap * gain, overlap, gain)


def centroid_pose(xy_a: np.ndarray, xy_b: np.ndarray) -> Pose:
    """The pose that only moves a's centroid onto b's."""
    return Pose(np.eye(2), xy_b.mean(axis=0) - xy_a.mean(axis=0))
