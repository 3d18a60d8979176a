"""Preprocessing (DESIGN data flow): shared genes, library-size normalise + log1p, top-M variable genes.

Everything works on sparse X chunk by chunk; no whole section is densified.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp

from inrscrecon.errors import InputError

TARGET_SUM = 1e4
CHUNK = 20000


def shared_genes(sections: Sequence[ad.AnnData]) -> list[str]:
    """Genes present in every section, in the first section's order; InputError if there are none."""
    common = set(sections[0].var_names)
    for s in sections[1:]:
        common &= set(s.var_names)
    if not common:
        names = [s.uns.get("section", i) for i, s in enumerate(sections)]
        raise InputError(f"sections {names} share no gene names (var_names); nothing to train on")
    return [g for g in sections[0].var_names if g in common]


def is_counts(adata: ad.AnnData) -> bool:
    """True unless ``uns['X_kind']`` says the data are already normalised (e.g. MERFISH, ISH levels).

    Sections read with :func:`~inrscrecon.data.io.read_section` carry ``raw_counts`` or
    ``normalized_expression`` (log-normalised X is stored as expm1(X) there, see
    :func:`~inrscrecon.data.validate.resolve_input`); for AnnData built by hand, ``counts`` is a synonym."""
    return str(adata.uns.get("X_kind", "raw_counts")) in ("raw_counts", "counts")


def normalize_log1p(x, target_sum: float = TARGET_SUM, totals: np.ndarray | None = None):
    """log1p(x · target_sum / row total). Sparse in → CSR float32 out; dense in → float32 ndarray.

    ``target_sum <= 0`` skips the normalisation (log1p only). Rows with zero total stay zero.
    """
    if target_sum > 0:
        if totals is None:
            totals = np.asarray(x.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros(len(totals)), where=totals > 0)
    if sp.issparse(x):
        out = sp.csr_matrix(x, dtype=np.float32, copy=True)
        if target_sum > 0:
            out = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ out)
        out.data = np.log1p(out.data)
        return out
    out = np.asarray(x, dtype=np.float32)
    if target_sum > 0:
        out = out * scale[:, None].astype(np.float32)
    return np.log1p(out)


def gene_moments(
    sections: Sequence[ad.AnnData], genes: Sequence[str], target_sum: float = TARGET_SUM
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of log-normalised expression per gene over all cells of all sections (one pass)."""
    total = np.zeros(len(genes))
    total_sq = np.zeros(len(genes))
    n = 0
    for s in sections:
        cols = s.var_names.get_indexer(genes)
        ts = target_sum if is_counts(s) else 0.0
        for start in range(0, s.n_obs, CHUNK):
            block = s.X[start : start + CHUNK]
            block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
            totals = np.asarray(block.sum(axis=1)).ravel()
            y = normalize_log1p(block[:, cols], ts, totals)
            total += np.asarray(y.sum(axis=0)).ravel()
            total_sq += np.asarray(y.multiply(y).sum(axis=0)).ravel()
            n += block.shape[0]
    mean = total / max(n, 1)
    return mean, np.maximum(total_sq / max(n, 1) - mean**2, 0.0)


GENE_SELECTIONS = ("pooled", "batch")


def select_genes(
    sections: Sequence[ad.AnnData],
    n_genes: int = 5000,
    genes: Sequence[str] | None = None,
    method: str = "pooled",
) -> list[str]:
    """Top-``n_genes`` most variable shared genes, in shared order.

    ``method="pooled"``: variance of log-normalised expression over all cells of all sections.
    ``method="batch"``: genes variable *within* sections, chosen per section and combined
    (:func:`batch_variable_genes`, scanpy's ``highly_variable_genes(flavor="seurat_v3", batch_key=...)`` rule),
    so genes that merely differ between sections are not favoured; with one section it is that section's rule.
    Fewer shared genes than asked: warn and use all of them. ``genes`` restricts the choice to a given list.
    """
    if method not in GENE_SELECTIONS:
        raise InputError(f"gene selection must be one of {GENE_SELECTIONS}, got {method!r}")
    shared = shared_genes(sections)
    if genes is not None:
        missing = sorted(set(genes) - set(shared))
        if missing:
            raise InputError(f"requested genes not present in every section: {missing[:5]}")
        shared = [g for g in shared if g in set(genes)]
    if n_genes >= len(shared):
        if n_genes > len(shared) and genes is None:
            warnings.warn(
                f"asked for {n_genes} genes but only {len(shared)} are shared; using all {len(shared)}",
                stacklevel=2,
            )
        return shared
    if method == "batch":
        return batch_variable_genes(sections, n_genes, shared)
    _, var = gene_moments(sections, shared)
    if not np.any(var > 0):
        raise InputError("all shared genes have identical expression in every cell (zero variance)")
    keep = np.sort(np.argsort(-var, kind="stable")[:n_genes])
    return [shared[i] for i in keep]


# ---------------------------------------------------------------- batch-aware selection (Seurat v3 rule)


def _loess_fit(x: np.ndarray, y: np.ndarray, span: float = 0.3) -> np.ndarray:
    """Fitted values of a local quadratic regression of y on x (tricube weights, ``span`` of the points).

    Uses scikit-misc's ``loess`` (what scanpy calls) when it is installed, else the same estimator computed
    directly at every point (scikit-misc interpolates its surface from a k-d tree, so values differ in the
    last digits)."""
    try:
        from skmisc.loess import loess
    except ImportError:
        return _loess_direct(x, y, span)
    model = loess(x, y, span=span, degree=2)
    model.fit()
    return np.asarray(model.outputs.fitted_values, dtype=np.float64)


def _loess_direct(x: np.ndarray, y: np.ndarray, span: float = 0.3, chunk: int = 256) -> np.ndarray:
    """Direct local quadratic loess (x [n], y [n]): at each point, weighted least squares on its
    ceil(span · n) nearest points with tricube weights of distance / the largest of those distances."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    q = int(min(n, max(3, np.ceil(span * n))))
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    out = np.empty(n)
    for s in range(0, n, chunk):
        x0 = xs[s : s + chunk]
        d = np.abs(xs[None, :] - x0[:, None])  # [c, n]
        idx = np.argpartition(d, q - 1, axis=1)[:, :q]
        dq = np.take_along_axis(d, idx, axis=1)
        h = np.maximum(dq.max(axis=1, keepdims=True), 1e-12)
        w = (1 - np.clip(dq / h, 0, 1) ** 3) ** 3  # [c, q]
        u = xs[idx] - x0[:, None]
        basis = np.stack([np.ones_like(u), u, u * u], axis=2)  # [c, q, 3]
        a = np.einsum("cq,cqi,cqj->cij", w, basis, basis) + 1e-12 * np.eye(3)
        b = np.einsum("cq,cqi,cq->ci", w, basis, ys[idx])
        out[s : s + chunk] = np.linalg.solve(a, b[..., None])[:, 0, 0]  # value at u = 0
    res = np.empty(n)
    res[order] = out
    return res


def _section_columns_moments(s: ad.AnnData, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and unbiased variance (ddof 1) of the raw values of columns ``cols`` of one section."""
    total = np.zeros(len(cols))
    total_sq = np.zeros(len(cols))
    for start in range(0, s.n_obs, CHUNK):
        block = _csr(s.X[start : start + CHUNK])[:, cols]
        total += np.asarray(block.sum(axis=0), dtype=np.float64).ravel()
        total_sq += np.asarray(block.multiply(block).sum(axis=0), dtype=np.float64).ravel()
    n = s.n_obs
    mean = total / max(n, 1)
    var = np.maximum(total_sq / max(n, 1) - mean**2, 0.0) * (n / (n - 1) if n > 1 else 1.0)
    return mean, var, n


def _csr(block) -> sp.csr_matrix:
    return block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block))


def seurat_v3_norm_variance(s: ad.AnnData, cols: np.ndarray, span: float = 0.3) -> np.ndarray:
    """Seurat v3's standardised variance per gene of one section's raw counts (columns ``cols``): the
    variance of counts clipped at mean + sqrt(N)·σ_reg, divided by σ_reg², where σ_reg² is the loess trend
    of log10 variance on log10 mean across genes."""
    mean, var, n = _section_columns_moments(s, cols)
    not_const = var > 0
    trend = np.zeros(len(cols))
    if not_const.sum() >= 3:
        trend[not_const] = _loess_fit(np.log10(mean[not_const]), np.log10(var[not_const]), span)
    reg_std = np.sqrt(10**trend)
    clip = reg_std * np.sqrt(n) + mean
    csum = np.zeros(len(cols))
    csq = np.zeros(len(cols))
    for start in range(0, s.n_obs, CHUNK):
        block = _csr(s.X[start : start + CHUNK])[:, cols].tocoo()
        v = np.minimum(block.data.astype(np.float64), clip[block.col])
        csum += np.bincount(block.col, weights=v, minlength=len(cols))
        csq += np.bincount(block.col, weights=v * v, minlength=len(cols))
    return (n * mean**2 + csq - 2 * csum * mean) / ((n - 1) * reg_std**2)


def _log_variance(s: ad.AnnData, genes: Sequence[str]) -> np.ndarray:
    """Variance of the section's log(-normalised) values per gene (non-count data: no count model)."""
    return gene_moments([s], genes)[1]


def batch_variable_genes(
    sections: Sequence[ad.AnnData], n_genes: int, genes: Sequence[str] | None = None, span: float = 0.3
) -> list[str]:
    """Seurat v3's batch-aware rule (scanpy ``highly_variable_genes(flavor="seurat_v3", batch_key=...)``):
    rank the genes within each section by standardised variance of counts, keep per section its top
    ``n_genes``, and take the genes with the smallest median rank over the sections where they are among
    those (ties: in more sections first). Sections that are not counts (``uns['X_kind']``) are ranked by the
    variance of their log-normalised values instead. Returns the chosen genes in ``genes`` order (default:
    the shared genes)."""
    genes = list(genes) if genes is not None else shared_genes(sections)
    if n_genes >= len(genes):
        return genes
    norm = []
    for s in sections:
        cols = s.var_names.get_indexer(genes)
        v = seurat_v3_norm_variance(s, cols, span) if is_counts(s) else _log_variance(s, genes)
        norm.append(v)
    if not any(np.any(v > 0) for v in norm):
        raise InputError("all shared genes have identical expression in every cell (zero variance)")
    ranks = np.argsort(np.argsort(-np.stack(norm), axis=1), axis=1).astype(np.float64)  # 0 = most variable
    n_high = (ranks < n_genes).sum(axis=0)
    ranks[ranks >= n_genes] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: genes in no section's top list
        median = np.nanmedian(ranks, axis=0)
    order = np.lexsort((-n_high, np.where(np.isnan(median), np.inf, median)))
    keep = np.sort(order[:n_genes])
    return [genes[i] for i in keep]
