"""Simple baselines every result is reported beside (DESIGN §5): mean profile, k-NN inverse-distance
interpolation in 3D, Gaussian-kernel smoother, linear-z interpolation between neighbouring sections.

All take training coordinates [N, 3] (µm), training expression [N, G] (log1p-normalised) and query
coordinates [Q, 3], and return predictions [Q, G] float32. Their hyper-parameters are chosen on validation
cells by :mod:`inrscrecon.evaluate.tuning`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors


def mean_profile(train_expr: np.ndarray, n_query: int) -> np.ndarray:
    """The training mean profile for every query point → [n_query, G]."""
    return np.repeat(train_expr.mean(axis=0, keepdims=True), n_query, axis=0).astype(np.float32)


def neighbours(train_xyz: np.ndarray, query_xyz: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances [Q, k], indices [Q, k]) of the k nearest training points, nearest first."""
    k = max(1, min(k, len(train_xyz)))
    return NearestNeighbors(n_neighbors=k).fit(train_xyz).kneighbors(query_xyz)


def _weighted_mean(
    w: np.ndarray, idx: np.ndarray, train_expr: np.ndarray, dense: bool | None = None, block: int = 512
) -> np.ndarray:
    """Row-normalised weights w [Q, k] on neighbours idx [Q, k] (distinct per row) → weighted means [Q, G],
    never a [Q, k, G] array. A sparse product, or (``dense``; by default when the neighbours cover ≥ 1/8 of
    the N training cells) dense [block, N] weight rows times the expression by BLAS: the same sums, about
    10× faster for wide kernels."""
    w = w / w.sum(axis=1, keepdims=True)
    q, k = idx.shape
    n = len(train_expr)
    y = np.asarray(train_expr, dtype=np.float64)
    if dense is None:
        dense = k * 8 >= n and k >= 64
    if not dense:
        mat = sp.csr_matrix((w.ravel(), idx.ravel(), np.arange(0, q * k + 1, k)), shape=(q, n))
        return np.asarray(mat @ y, dtype=np.float32)
    out = np.empty((q, y.shape[1]), dtype=np.float32)
    for s in range(0, q, block):
        rows = np.zeros((min(block, q - s), n))
        np.put_along_axis(rows, idx[s : s + block], w[s : s + block], axis=1)
        out[s : s + block] = rows @ y
    return out


def idw_from_neighbours(
    dist: np.ndarray, idx: np.ndarray, train_expr: np.ndarray, k: int, power: float = 1.0
) -> np.ndarray:
    """Inverse-distance-weighted mean over the first k columns of a precomputed neighbour list → [Q, G]."""
    d, i = dist[:, :k], idx[:, :k]
    w = 1.0 / np.maximum(d, 1e-6) ** power
    return _weighted_mean(w, i, train_expr)


def gaussian_from_neighbours(
    dist: np.ndarray, idx: np.ndarray, train_expr: np.ndarray, bandwidth: float
) -> np.ndarray:
    """Nadaraya–Watson mean with Gaussian weights exp(−d²/2h²) over a precomputed neighbour list → [Q, G]."""
    logw = -0.5 * (dist / bandwidth) ** 2
    w = np.exp(logw - logw.max(axis=1, keepdims=True))  # stable: the nearest neighbour has weight 1
    return _weighted_mean(w, idx, train_expr)


def knn_interpolate(
    train_xyz: np.ndarray, train_expr: np.ndarray, query_xyz: np.ndarray, k: int = 10, power: float = 1.0
) -> np.ndarray:
    """Inverse-distance-weighted mean of the k nearest training cells (weights 1/d^power) → [n_query, G]."""
    dist, idx = neighbours(train_xyz, query_xyz, k)
    return idw_from_neighbours(dist, idx, train_expr, k, power)


def smoother_k(bandwidth: float, spacing: float, dim: int = 2, floor: int = 64, cap: int = 5000) -> int:
    """Neighbours needed so a Gaussian of ``bandwidth`` is truncated beyond ~3 h (points ``spacing`` apart);
    at most ``cap`` (in 2D that is 3 h up to h ≈ 12 spacings, ≈ 2.2 h at 16)."""
    r = 3.0 * bandwidth / max(spacing, 1e-9)
    need = np.pi * r**2 if dim == 2 else 4.0 / 3.0 * np.pi * r**3
    return int(np.clip(1.2 * need, floor, cap))


def gaussian_smoother(
    train_xyz: np.ndarray, train_expr: np.ndarray, query_xyz: np.ndarray, bandwidth: float, k: int = 64
) -> np.ndarray:
    """Nadaraya–Watson smoother with a Gaussian kernel of ``bandwidth`` (µm), truncated to k neighbours."""
    dist, idx = neighbours(train_xyz, query_xyz, k)
    return gaussian_from_neighbours(dist, idx, train_expr, bandwidth)


def section_levels(train_xyz: np.ndarray, section: np.ndarray) -> tuple[list, np.ndarray]:
    """Training sections ordered by their median z, and those z values (µm)."""
    names = list(np.unique(section))
    z_of = {n: float(np.median(train_xyz[section == n, 2])) for n in names}
    order = sorted(names, key=lambda n: z_of[n])
    return order, np.array([z_of[n] for n in order])


def linear_z(
    train_xyz: np.ndarray, train_expr: np.ndarray, section: np.ndarray, query_xyz: np.ndarray, k: int = 6
) -> np.ndarray:
    """Interpolate in xy (k-NN, inverse distance) within the nearest training section below and above each
    query's z, then linearly in z between them (the nearest single section where the query lies outside the
    stack or on a section's own level)."""
    order, zs = section_levels(train_xyz, section)
    per = np.stack(
        [
            knn_interpolate(train_xyz[section == n, :2], train_expr[section == n], query_xyz[:, :2], k)
            for n in order
        ]
    )
    q = np.arange(len(query_xyz))
    hi = np.clip(np.searchsorted(zs, query_xyz[:, 2]), 0, len(zs) - 1)
    lo = np.clip(hi - 1, 0, len(zs) - 1)
    t = np.clip((query_xyz[:, 2] - zs[lo]) / np.maximum(zs[hi] - zs[lo], 1e-9), 0.0, 1.0)[:, None]
    return ((1 - t) * per[lo, q] + t * per[hi, q]).astype(np.float32)


def pca_axes(train_expr: np.ndarray, r_max: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean [G] and the top ``r_max`` principal axes [G, r] (orthonormal columns, r = min(r_max, N, G)) of the
    centred training profiles train_expr [N, G] (scikit-learn PCA, float64)."""
    y = np.asarray(train_expr, dtype=np.float64)
    r = int(max(1, min(r_max, *y.shape)))
    pca = PCA(n_components=r, svd_solver="full", random_state=seed).fit(y)
    return pca.mean_, pca.components_.T


def pca_project(pred: np.ndarray, mean: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """mean + (pred − mean) · V Vᵀ: predictions pred [Q, G] projected onto the span of axes V [G, r] through
    the training mean [G] → [Q, G] float32. With r = G (a full basis) it returns ``pred``."""
    c = np.asarray(pred, dtype=np.float64) - mean
    return (mean + (c @ axes) @ axes.T).astype(np.float32)
