"""Joint low-dimensional expression space of two sections (no dense N × G matrix, no N × N matrix).

Shared genes → library-size normalise + log1p (sparse) → top variable genes (pooled over both sections) →
standardise with pooled mean / s.d. → exact PCA (scikit-learn) of the sparse matrix, centred implicitly.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from inrscrecon.data.preprocess import TARGET_SUM, is_counts, normalize_log1p, shared_genes
from inrscrecon.errors import InputError

CHUNK = 20000


def section_name(adata: ad.AnnData, default: str = "section") -> str:
    return str(adata.uns.get("section", default))


def _log_matrix(adata: ad.AnnData, genes: list[str]) -> sp.csr_matrix:
    """log1p-normalised expression of ``genes`` (normalised by the total over all genes), CSR float32 [n, g]."""
    cols = adata.var_names.get_indexer(genes)
    ts = TARGET_SUM if is_counts(adata) else 0.0
    if sp.issparse(adata.X) and not adata.isbacked:  # in memory: one sparse pass, no chunk stacking
        x = sp.csr_matrix(adata.X)
        return normalize_log1p(x[:, cols], ts, np.asarray(x.sum(axis=1)).ravel())
    blocks = []
    for start in range(0, adata.n_obs, CHUNK):
        block = adata.X[start : start + CHUNK]
        block = block.tocsr() if sp.issparse(block) else sp.csr_matrix(block)
        totals = np.asarray(block.sum(axis=1)).ravel()
        blocks.append(normalize_log1p(block[:, cols], ts, totals))
    return sp.vstack(blocks, format="csr")


def _moments(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and mean of squares over rows, [g] each."""
    n = max(x.shape[0], 1)
    return np.asarray(x.mean(axis=0)).ravel(), np.asarray(x.multiply(x).sum(axis=0)).ravel() / n


def pca_scores(
    x: sp.csr_matrix,
    mean: np.ndarray,
    n_comps: int,
    rng: np.random.Generator,
    max_fit_rows: int | None = None,
) -> np.ndarray:
    """Top principal-component scores of (x − 1 meanᵀ) [n, g] without forming it; returns [n, n_comps] float32.

    scikit-learn's exact PCA (``svd_solver="covariance_eigh"``: the g × g covariance of the sparse rows, then
    its eigenvectors; deterministic) finds the components. With ``max_fit_rows`` they are fitted on that many
    random rows, so the cost stops growing with n; every row is then projected in chunks, centred by ``mean``.
    """
    from sklearn.decomposition import PCA  # deferred: scikit-learn's import is slow

    fit = x
    if max_fit_rows is not None and x.shape[0] > max_fit_rows:
        fit = x[np.sort(rng.choice(x.shape[0], max_fit_rows, replace=False))]
    k = min(n_comps, fit.shape[1], fit.shape[0] - 1)
    comps = PCA(n_components=k, svd_solver="covariance_eigh").fit(fit).components_.T  # [g, k]
    offset = mean @ comps
    out = np.empty((x.shape[0], k), dtype=np.float32)
    for s in range(0, x.shape[0], CHUNK):
        out[s : s + CHUNK] = np.asarray(x[s : s + CHUNK] @ comps) - offset
    return out


def joint_embedding(
    a: ad.AnnData,
    b: ad.AnnData,
    n_genes: int = 2000,
    n_comps: int = 30,
    seed: int = 0,
    max_fit_rows: int | None = 50000,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """PCA scores of both sections in one space: ([n_a, c], [n_b, c], genes used).

    Raises InputError when the sections share no genes or a section's expression is identical in every cell.
    """
    genes = shared_genes([a, b])
    xa, xb = _log_matrix(a, genes), _log_matrix(b, genes)
    for adata, x in ((a, xa), (b, xb)):
        m, m2 = _moments(x)
        if not np.any(
            m2 - m**2 > 1e-5 * np.maximum(m2, 1e-12)
        ):  # relative: float32 round-off is not variance
            raise InputError(
                f"section {section_name(adata)!r}: X is identical in every cell over the {len(genes)} genes it "
                "shares with its neighbour (zero variance); cannot match cells by expression"
            )
    (ma, m2a), (mb, m2b) = _moments(xa), _moments(xb)
    wa = xa.shape[0] / (xa.shape[0] + xb.shape[0])
    mean, m2 = wa * ma + (1 - wa) * mb, wa * m2a + (1 - wa) * m2b  # pooled over both sections
    var = np.maximum(m2 - mean**2, 0.0)
    keep = np.sort(np.argsort(-var, kind="stable")[: min(n_genes, int((var > 1e-12).sum()))])
    sd = np.sqrt(var[keep])
    x = sp.vstack([xa[:, keep], xb[:, keep]], format="csr") @ sp.diags((1.0 / sd).astype(np.float32))
    x = sp.csr_matrix(x)
    scores = pca_scores(x, mean[keep] / sd, n_comps, np.random.default_rng(seed), max_fit_rows=max_fit_rows)
    return scores[: a.n_obs], scores[a.n_obs :], [genes[i] for i in keep]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def spatial_smooth(xy: np.ndarray, feat: np.ndarray, k: int = 7) -> np.ndarray:
    """Mean of ``feat`` [n, c] over each cell's k nearest cells in the same section (itself included)."""
    k = min(k, len(xy))
    if k <= 1:
        return feat.copy()
    tree = cKDTree(xy)
    out = np.empty_like(feat)
    for s in range(0, len(xy), CHUNK):
        _, idx = tree.query(xy[s : s + CHUNK], k=k)
        out[s : s + CHUNK] = feat[idx].mean(axis=1)
    return out
