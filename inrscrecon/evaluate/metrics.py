"""Metrics of DESIGN §5: per-gene Pearson, RMSE, ARI of clustered expression, SSIM of rasterised gene maps.

Protocol (fixed; ``docs`` of :mod:`inrscrecon.evaluate.tasks` repeat it):

* expression is log1p(library-size normalised, target sum 1e4) on the evaluated gene set;
* **Pearson**: per gene over the test cells, the median over genes that are not constant;
* **RMSE**: over all test cells × genes;
* **ARI**: centre genes, PCA to 15 components, then k-means (``n_init=10``) or a full-covariance Gaussian
  mixture with k = number of distinct ground-truth labels among the test cells ("unknown" dropped);
* **SSIM**: test cells projected onto their two principal axes, rasterised into square bins (mean per bin,
  about 1.5 cells per occupied bin, 8–64 bins a side), each gene scaled to [0, 1] by the true map's range,
  structural similarity (7 × 7 window) averaged over *occupied* bins only, then over the top-50 most variable
  genes of the true test expression.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

N_PCS = 15
SSIM_GENES = 50


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r per gene (column) of pred vs true [N, G]; NaN where either column is constant."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    p = pred - pred.mean(axis=0)
    t = true - true.mean(axis=0)
    den = np.sqrt((p * p).sum(axis=0) * (t * t).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12, (p * t).sum(axis=0) / np.where(den > 1e-12, den, 1), np.nan)


def median_pearson(pred: np.ndarray, true: np.ndarray) -> float:
    """Median over genes of the per-gene Pearson r (constant genes ignored; 0 when every gene is constant)."""
    r = pearson_per_gene(pred, true)
    return float(np.nanmedian(r)) if np.isfinite(r).any() else 0.0


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    """Root mean square error over all entries."""
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - true) ** 2)))


def cluster(
    expr: np.ndarray, k: int, method: str = "kmeans", n_pcs: int = N_PCS, seed: int = 0, scale: bool = False
) -> np.ndarray:
    """Cluster profiles [N, G]: centre (and with ``scale`` standardise) genes, PCA to ``n_pcs``, then k-means
    or a Gaussian mixture. Returns [N] integer labels."""
    if method not in ("kmeans", "gmm"):
        raise ValueError(f"clustering method must be 'kmeans' or 'gmm', got {method!r}")
    x = np.asarray(expr, dtype=np.float64)
    x = x - x.mean(axis=0)
    if scale:
        sd = x.std(axis=0)
        x = x / np.where(sd > 0, sd, 1)
    k = max(1, min(k, x.shape[0]))
    n_pcs = max(1, min(n_pcs, x.shape[1], x.shape[0] - 1))
    if not np.any(x):  # a constant prediction (e.g. the mean profile): one cluster
        return np.zeros(len(x), dtype=int)
    z = PCA(n_components=n_pcs, random_state=seed).fit_transform(x)
    if method == "kmeans":
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
    return GaussianMixture(
        n_components=k, covariance_type="full", reg_covar=1e-4, random_state=seed
    ).fit_predict(z)


def ari(
    expr: np.ndarray,
    labels: np.ndarray,
    method: str = "kmeans",
    seed: int = 0,
    exclude: str = "unknown",
    n_pcs: int = N_PCS,
) -> float:
    """ARI between clusters of ``expr`` (k = number of distinct labels) and ``labels``, ``exclude`` dropped."""
    keep = np.asarray(labels).astype(str) != exclude
    lab = np.asarray(labels)[keep]
    k = len(np.unique(lab))
    return float(adjusted_rand_score(lab, cluster(expr[keep], k, method, n_pcs=n_pcs, seed=seed)))


def project_2d(xyz: np.ndarray) -> np.ndarray:
    """Coordinates [N, D] → their two principal axes [N, 2] (a section's own plane; a band's main surface)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    c = xyz - xyz.mean(axis=0)
    if c.shape[1] <= 2:
        return c[:, :2]
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    return c @ vt[:2].T


def auto_bins(n: int, per_bin: float = 1.5, lo: int = 8, hi: int = 64) -> int:
    """Bins a side for ``n`` scattered points: about ``per_bin`` points per bin over a filled square."""
    return int(np.clip(round(np.sqrt(n / per_bin)), lo, hi))


def rasterize(xy: np.ndarray, values: np.ndarray, bins: int = 48) -> np.ndarray:
    """Mean of ``values`` [N, G] per square bin of the xy [N, 2] bounding box → [G, bins, bins] (0 where empty).

    Bins are square (the longer side sets their size), so maps keep their aspect ratio.
    """
    xy = np.asarray(xy, dtype=np.float64)
    lo = xy.min(axis=0)
    side = max(float((xy.max(axis=0) - lo).max()), 1e-9)
    ij = np.clip(((xy - lo) / side * bins).astype(int), 0, bins - 1)
    flat = ij[:, 0] * bins + ij[:, 1]
    count = np.bincount(flat, minlength=bins * bins).astype(np.float64)
    values = np.asarray(values, dtype=np.float64)
    out = np.stack(
        [np.bincount(flat, weights=values[:, g], minlength=bins * bins) for g in range(values.shape[1])]
    )
    return (out / np.maximum(count, 1)).reshape(-1, bins, bins)


def occupancy(xy: np.ndarray, bins: int = 48) -> np.ndarray:
    """Boolean [bins, bins] mask of bins that hold at least one point (same binning as :func:`rasterize`)."""
    return rasterize(xy, np.ones((len(xy), 1)), bins)[0] > 0


def ssim_maps(
    pred: np.ndarray, true: np.ndarray, xy: np.ndarray, bins: int | None = 48, mask_empty: bool = True
) -> float:
    """Mean SSIM over genes between rasterised predicted and true maps (each gene scaled to [0, 1] by the true
    map's range). ``bins=None`` picks :func:`auto_bins`; ``mask_empty`` averages the SSIM map over occupied bins
    only (empty bins are 0 in both maps and would inflate the score)."""
    from skimage.metrics import structural_similarity

    xy = np.asarray(xy, dtype=np.float64)
    if xy.shape[1] > 2:
        xy = project_2d(xy)
    bins = auto_bins(len(xy)) if bins is None else bins
    p, t = rasterize(xy, pred, bins), rasterize(xy, true, bins)
    mask = occupancy(xy, bins) if mask_empty else np.ones((bins, bins), bool)
    win = min(7, bins if bins % 2 else bins - 1)
    scores = []
    for g in range(t.shape[0]):
        lo, hi = t[g].min(), t[g].max()
        if hi <= lo:
            continue
        _, smap = structural_similarity(
            (t[g] - lo) / (hi - lo), (p[g] - lo) / (hi - lo), data_range=1.0, win_size=win, full=True
        )
        scores.append(float(smap[mask].mean()))
    return float(np.mean(scores)) if scores else float("nan")


def top_variable(true: np.ndarray, n: int = SSIM_GENES) -> np.ndarray:
    """Indices of the ``n`` most variable columns of ``true``."""
    return np.argsort(-np.asarray(true).var(axis=0), kind="stable")[:n]
