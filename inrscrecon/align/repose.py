"""Re-pose protocol: a section against a perturbed, re-posed copy of itself, whose true answer is known.

A copy keeps a random fraction of the spots, has its expression resampled (binomial thinning of counts, or
multiplicative log-normal noise for normalised values), its positions jittered, and is rotated (optionally
flipped) and translated. Aligning the copy onto the original and mapping the copy's spots back measures the
pipeline's precision: the median distance between each spot's aligned position and its original position, as a
fraction of the section's extent (the longer side of its coordinates' bounding box). Jitter of ``j`` · extent
per coordinate sets a floor of ≈ 1.18 ``j`` (the median of a Rayleigh distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import scipy.sparse as sp

from inrscrecon.align.kabsch import Pose, rotation
from inrscrecon.data.preprocess import is_counts


@dataclass
class ReposeCase:
    """A re-posed copy of a section and what is needed to score an alignment of it."""

    original: ad.AnnData
    moved: ad.AnnData
    source_rows: np.ndarray  # [m] row of the original each moved spot came from
    extent: float  # longer side of the original's bounding box, in its own coordinate units
    true_pose: Pose  # maps the original's observed coordinates to the moved copy's (jitter aside)


def extent_of(xy: np.ndarray) -> float:
    """Longer side of the bounding box of points [n, 2]."""
    return float(np.ptp(xy, axis=0).max())


def repose_case(
    adata: ad.AnnData,
    rng: np.random.Generator,
    *,
    flip: bool,
    keep: float = 0.8,
    jitter: float = 0.002,
    thin: float = 0.5,
    noise_sd: float = 0.3,
    max_cells: int | None = None,
    spatial_key: str = "spatial",
) -> ReposeCase:
    """Build one re-pose case from a section (coordinates ``obsm[spatial_key]`` [n, 2]).

    ``max_cells`` first subsamples the original (large sections in quick tests). The copy keeps ``keep`` of the
    spots, thins counts binomially with probability ``thin`` (``uns['X_kind'] == 'raw_counts'``) or multiplies
    normalised values by exp(N(0, noise_sd)), adds N(0, (jitter · extent)²) to each coordinate, then applies a
    rotation drawn from [0, 360°), a flip when ``flip`` and a translation of up to two extents per axis.
    """
    original = adata
    if max_cells is not None and adata.n_obs > max_cells:
        original = adata[np.sort(rng.choice(adata.n_obs, max_cells, replace=False))].copy()
    else:
        original = adata.copy()
    xy = np.asarray(original.obsm[spatial_key], dtype=np.float64)[:, :2]
    ext = extent_of(xy)
    rows = np.sort(rng.choice(original.n_obs, int(round(keep * original.n_obs)), replace=False))
    moved = original[rows].copy()
    x = sp.csr_matrix(moved.X)
    if is_counts(moved):
        data = rng.binomial(np.rint(x.data).astype(np.int64), thin).astype(x.dtype)
    else:
        data = (x.data * np.exp(rng.normal(0.0, noise_sd, size=x.data.shape))).astype(x.dtype)
    x = sp.csr_matrix((data, x.indices, x.indptr), shape=x.shape)
    x.eliminate_zeros()
    moved.X = x
    true = Pose(rotation(rng.uniform(0, 2 * np.pi)), rng.uniform(-2 * ext, 2 * ext, size=2), flip)
    moved.obsm[spatial_key] = true.apply(xy[rows] + rng.normal(0.0, jitter * ext, size=(len(rows), 2)))
    original.uns["section"] = str(original.uns.get("section", "original"))
    moved.uns["section"] = original.uns["section"] + "_moved"
    return ReposeCase(original, moved, rows, ext, true)


def repose_residual(case: ReposeCase, transforms: list[dict], spatial_key: str = "spatial") -> float:
    """Median distance, as a fraction of the extent, between the moved spots mapped into the common frame by
    ``transforms`` (the ``sections`` list of transforms.json, original first or second) and the same spots of
    the original mapped by its own transform."""
    by_name = {e["name"]: e for e in transforms}

    def pose_of(name: str) -> tuple[Pose, float]:
        e = by_name[name]
        return Pose(np.array(e["rotation"]), np.array(e["translation"]), bool(e["reflected"])), float(
            e.get("microns_per_unit", 1.0)
        )

    po, mo = pose_of(str(case.original.uns["section"]))
    pm, mm = pose_of(str(case.moved.uns["section"]))
    xo = np.asarray(case.original.obsm[spatial_key], dtype=np.float64)[case.source_rows, :2]
    xm = np.asarray(case.moved.obsm[spatial_key], dtype=np.float64)[:, :2]
    d = np.hypot(*(pm.apply(mm * xm) - po.apply(mo * xo)).T)
    return float(np.median(d) / (mo * case.extent))
