"""Checks on one section: coordinates, ids, counts. Each failure is one InputError naming file, field, value."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from inrscrecon.errors import InputError

CHECK_CHUNK = 20000


def coordinates(adata: ad.AnnData, where: str, spatial_key: str = "spatial") -> np.ndarray:
    """Return ``obsm[spatial_key]`` as float64 [n, 2|3], or raise naming what is missing or wrong."""
    if spatial_key not in adata.obsm:
        keys = list(adata.obsm.keys())
        raise InputError(
            f"{where}: no coordinates at obsm[{spatial_key!r}] (obsm has {keys}); pass --spatial-key"
        )
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] not in (2, 3):
        raise InputError(
            f"{where}: obsm[{spatial_key!r}] has shape {xy.shape}, expected (n_cells, 2) or (n_cells, 3)"
        )
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{where}: obsm[{spatial_key!r}] has {int(bad.sum())} non-finite rows, "
            f"first at cell {adata.obs_names[i]!r} = {xy[i].tolist()}"
        )
    return xy


def _check_values(block, where: str, offset: int, obs_names) -> None:
    data = block.data if sp.issparse(block) else np.asarray(block)
    if not np.isfinite(data).all():
        raise InputError(
            f"{where}: X has non-finite values (NaN/inf) in rows {offset}..{offset + block.shape[0] - 1}"
        )
    if (data < 0).any():
        dense_bad = (block < 0) if sp.issparse(block) else (np.asarray(block) < 0)
        row = int(np.flatnonzero(np.asarray(dense_bad.sum(axis=1)).ravel())[0])
        raise InputError(f"{where}: X has negative values, first in cell {obs_names[offset + row]!r}")


def validate_section(adata: ad.AnnData, where: str, spatial_key: str = "spatial") -> None:
    """Raise InputError for: empty section, no/NaN coordinates, duplicate cell ids, negative or non-finite X."""
    if adata.n_obs == 0:
        raise InputError(f"{where}: section is empty (0 cells)")
    if adata.n_vars == 0:
        raise InputError(f"{where}: section has no genes (0 columns in X)")
    coordinates(adata, where, spatial_key)
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()][0]
        raise InputError(f"{where}: duplicate cell ids in obs_names, e.g. {dup!r}")
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][0]
        raise InputError(f"{where}: duplicate gene names in var_names, e.g. {dup!r}")
    for start in range(0, adata.n_obs, CHECK_CHUNK):
        _check_values(adata.X[start : start + CHECK_CHUNK], where, start, adata.obs_names)
