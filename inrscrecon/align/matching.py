"""Cross-section matching in expression space: k-NN and mutual nearest neighbours (memory O(N · k))."""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors


def knn(query: np.ndarray, ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows of ``ref`` [m, c] for each row of ``query`` [n, c]: (distances [n, k], indices [n, k])."""
    k = min(k, len(ref))
    nn = NearestNeighbors(n_neighbors=k).fit(ref)
    dist, idx = nn.kneighbors(query)
    return dist, idx


def mutual_nn(fa: np.ndarray, fb: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual k-nearest-neighbour pairs between unit-norm features fa [n_a, c] and fb [n_b, c].

    Returns (ia, ib, similarity) with similarity = cosine similarity of the pair (1 − d²/2 for unit rows).
    """
    da, ja = knn(fa, fb, k)
    _, jb = knn(fb, fa, k)
    ia = np.repeat(np.arange(len(fa)), ja.shape[1])
    ib = ja.ravel()
    back = (jb * len(fb) + np.arange(len(fb))[:, None]).ravel()  # keys a·n_b + b, as seen from b
    mutual = np.isin(ia * len(fb) + ib, back)
    sim = 1.0 - da.ravel() ** 2 / 2
    return ia[mutual], ib[mutual], sim[mutual]
