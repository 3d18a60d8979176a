"""Metrics of DESIGN §5: per-gene Pearson, RMSE, ARI of clustered expression, SSIM of rasterised gene maps."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r per gene (column) of pred vs true [N, G]; NaN where either column is constant."""
    p = pred - pred.mean(axis=0)
    t = true - true.mean(axis=0)
    den = np.sqrt((p * p).sum(axis=0) * (t * t).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * t).sum(axis=0) / np.where(den > 0, den, 1), np.nan)


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    """Root mean square error over all entries."""
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - true) ** 2)))


def cluster(
    expr: np.ndarray, k: int, method: str = "kmeans", n_pcs: int = 15, seed: int = 0, scale: bool = False
) -> np.ndarray:
    """Cluster profiles [N, G]: centre (and with ``scale`` standardise) genes, PCA to ``n_pcs``, then k-means
    or a Gaussian mixture."""
    x = expr - expr.mean(axis=0)
    if scale:
        sd = x.std(axis=0)
        x = x / np.where(sd > 0, sd, 1)
    n_pcs = max(1, min(n_pcs, x.shape[1], x.shape[0] - 1))
    z = PCA(n_components=n_pcs, random_state=seed).fit_transform(x)
    if method == "kmeans":
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
    if method == "gmm":
        return GaussianMixture(n_components=k, covariance_type="full", random_state=seed).fit_predict(z)
    raise ValueError(f"clustering method must be 'kmeans' or 'gmm', got {method!r}")


def ari(expr: np.ndarray, labels: np.ndarray, method: str = "kmeans", seed: int = 0, exclude: str = "unknown") -> float:
    """ARI between clusters of ``expr`` (k = number of distinct labels) and ``labels``, ``exclude`` dropped."""
    keep = np.asarray(labels).astype(str) != exclude
    lab = np.asarray(labels)[keep]
    k = len(np.unique(lab))
    return float(adjusted_rand_score(lab, cluster(expr[keep], k, method, seed=seed)))


def rasterize(xy: np.ndarray, values: np.ndarray, bins: int = 48) -> np.ndarray:
    """Mean of ``values`` [N, G] per square bin of the xy [N, 2] bounding box → [G, bins, bins] (0 where empty)."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    ij = np.clip(((xy - lo) / np.maximum(hi - lo, 1e-9) * bins).astype(int), 0, bins - 1)
    flat = ij[:, 0] * bins + ij[:, 1]
    count = np.bincount(flat, minlength=bins * bins).astype(np.float64)
    out = np.stack([np.bincount(flat, weights=values[:, g], minlength=bins * bins) for g in range(values.shape[1])])
    return (out / np.maximum(count, 1)).reshape(-1, bins, bins)


def ssim_maps(pred: np.ndarray, true: np.ndarray, xy: np.ndarray, bins: int = 48) -> float:
    """Mean SSIM over genes between rasterised predicted and true maps (each gene scaled to [0, 1] by the true map)."""
    from skimage.metrics import structural_similarity

    p, t = rasterize(xy, pred, bins), rasterize(xy, true, bins)
    scores = []
    for g in range(t.shape[0]):
        lo, hi = t[g].min(), t[g].max()
        if hi <= lo:
            continue
        scores.append(structural_similarity((t[g] - lo) / (hi - lo), (p[g] - lo) / (hi - lo), data_range=1.0))
    return float(np.mean(scores)) if scores else float("nan")


def top_variable(true: np.ndarray, n: int = 50) -> np.ndarray:
    """Indices of the ``n`` most variable columns of ``true``."""
    return np.argsort(-true.var(axis=0))[:n]
