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


def select_genes(
    sections: Sequence[ad.AnnData], n_genes: int = 5000, genes: Sequence[str] | None = None
) -> list[str]:
    """Top-``n_genes`` most variable shared genes (variance of log-normalised expression), in shared order.

    Fewer shared genes than asked: warn and use all of them. ``genes`` restricts the choice to a given list.
    """
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
    _, var = gene_moments(sections, shared)
    if not np.any(var > 0):
        raise InputError("all shared genes have identical expression in every cell (zero variance)")
    keep = np.sort(np.argsort(-var, kind="stable")[:n_genes])
    return [shared[i] for i in keep]
