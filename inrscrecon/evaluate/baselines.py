"""Simple baselines every result is reported beside (DESIGN §5): mean profile, k-NN inverse-distance
interpolation in 3D, Gaussian-kernel smoother, linear-z interpolation between neighbouring sections."""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors


def mean_profile(train_expr: np.ndarray, n_query: int) -> np.ndarray:
    """The training mean profile for every query point → [n_query, G]."""
    return np.repeat(train_expr.mean(axis=0, keepdims=True), n_query, axis=0).astype(np.float32)


def knn_interpolate(
    train_xyz: np.ndarray, train_expr: np.ndarray, query_xyz: np.ndarray, k: int = 10, power: float = 1.0
) -> np.ndarray:
    """Inverse-distance-weighted mean of the k nearest training cells (weights 1/d^power) → [n_query, G]."""
    k = min(k, len(train_xyz))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(train_xyz).kneighbors(query_xyz)
    w = 1.0 / np.maximum(dist, 1e-6) ** power
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("qk,qkg->qg", w, train_expr[idx]).astype(np.float32)


def gaussian_smoother(
    train_xyz: np.ndarray, train_expr: np.ndarray, query_xyz: np.ndarray, bandwidth: float, k: int = 64
) -> np.ndarray:
    """Nadaraya–Watson smoother with a Gaussian kernel of ``bandwidth`` (µm), truncated to k neighbours."""
    k = min(k, len(train_xyz))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(train_xyz).kneighbors(query_xyz)
    w = np.exp(-0.5 * (dist / bandwidth) ** 2) + 1e-12
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("qk,qkg->qg", w, train_expr[idx]).astype(np.float32)


def linear_z(
    train_xyz: np.ndarray, train_expr: np.ndarray, section: np.ndarray, query_xyz: np.ndarray, k: int = 6
) -> np.ndarray:
    """Interpolate in xy within the nearest training section below and above each query's z, then linearly
    in z between them (the nearest single section where the query lies outside the stack)."""
    names = np.unique(section)
    z_of = {n: float(np.median(train_xyz[section == n, 2])) for n in names}
    order = sorted(names, key=lambda n: z_of[n])
    zs = np.array([z_of[n] for n in order])
    per = np.stack([knn_interpolate(train_xyz[section == n, :2], train_expr[section == n], query_xyz[:, :2], k) for n in order])
    q = np.arange(len(query_xyz))
    hi = np.clip(np.searchsorted(zs, query_xyz[:, 2]), 0, len(zs) - 1)
    lo = np.clip(hi - 1, 0, len(zs) - 1)
    t = np.clip((query_xyz[:, 2] - zs[lo]) / np.maximum(zs[hi] - zs[lo], 1e-9), 0.0, 1.0)[:, None]
    return ((1 - t) * per[lo, q] + t * per[hi, q]).astype(np.float32)
