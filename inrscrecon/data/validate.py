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


def validate_section(
    adata: ad.AnnData, where: str, spatial_key: str = "spatial", counts: bool = False
) -> None:
    """Raise InputError for: empty section, no/NaN coordinates, duplicate cell ids, negative or non-finite X,
    and (``counts=True``) non-integer X."""
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
    if counts:
        check_counts(adata, where)


def check_counts(adata: ad.AnnData, where: str) -> None:
    """InputError naming the first cell whose X holds a non-integer value (X must be raw counts)."""
    for start in range(0, adata.n_obs, CHECK_CHUNK):
        bad = _first_non_integer(adata.X[start : start + CHECK_CHUNK], adata.obs_names, start)
        if bad is not None:
            raise InputError(f"{where}: X must hold integer counts but has {bad[1]:g} in cell {bad[0]!r}")


# -- what X holds, and in which units the coordinates are ------------------------------------------------------

#: ``--input`` choices → the ``uns['X_kind']`` value the rest of the pipeline reads.
INPUT_KINDS = {"counts": "raw_counts", "normalized": "normalized_expression", "lognorm": "log_normalized"}
_KIND_ALIASES = {
    "raw_counts": "raw_counts",
    "counts": "raw_counts",
    "normalized_expression": "normalized_expression",
    "normalized": "normalized_expression",
    "log_normalized": "log_normalized",
    "lognorm": "log_normalized",
    "log1p": "log_normalized",
}
SNIFF_ROWS = 2000
#: log1p of library-size-normalised data stays far below this (log1p(1e6) ≈ 13.8).
LOGNORM_MAX = 20.0


def _values(block) -> np.ndarray:
    return np.asarray(block.data if sp.issparse(block) else block).ravel()


def _first_non_integer(block, obs_names, offset: int = 0) -> tuple[str, float] | None:
    """(cell id, value) of the first non-integer entry of ``block``, or None when all are integers."""
    data = _values(block)
    bad = data != np.round(data)
    if not bad.any():
        return None
    dense = sp.csr_matrix(block)
    dense.data = (dense.data != np.round(dense.data)).astype(np.int8)
    dense.eliminate_zeros()
    row = int(np.flatnonzero(np.diff(dense.indptr))[0])
    return str(obs_names[offset + row]), float(data[np.flatnonzero(bad)[0]])


def declared_kind(adata: ad.AnnData, where: str) -> str | None:
    """Canonical ``uns['X_kind']`` (raw_counts | normalized_expression | log_normalized), or None if absent."""
    if "X_kind" not in adata.uns:
        return None
    value = str(adata.uns["X_kind"])
    if value not in _KIND_ALIASES:
        raise InputError(
            f"{where}: uns['X_kind'] = {value!r} is not one of {sorted(set(_KIND_ALIASES.values()))}"
        )
    return _KIND_ALIASES[value]


def _counts_source(adata: ad.AnnData) -> tuple[str, ad.AnnData] | None:
    """Raw counts kept beside a transformed X, as scanpy users keep them: ``layers['counts']`` or ``.raw``."""
    if "counts" in adata.layers:
        return "layers['counts']", ad.AnnData(
            X=adata.layers["counts"], obs=adata.obs, var=adata.var, obsm=dict(adata.obsm), uns=dict(adata.uns)
        )
    if adata.raw is not None:
        return ".raw", ad.AnnData(
            X=adata.raw.X, obs=adata.obs, var=adata.raw.var, obsm=dict(adata.obsm), uns=dict(adata.uns)
        )
    return None


def resolve_input(adata: ad.AnnData, where: str, input_kind: str = "auto") -> tuple[ad.AnnData, str]:
    """Decide what X holds and return (section whose X the pipeline reads, a note on the choice or "").

    ``input_kind``: ``counts`` (non-negative integers: X, else ``layers['counts']``, else ``.raw``),
    ``normalized`` (library-size normalised, log1p applied later), ``lognorm`` (already log1p-normalised:
    used as is, never logged again), or ``auto``: ``uns['X_kind']`` when declared, else integer X as counts,
    else the kept counts, else log-normalised when scanpy's ``uns['log1p']`` says so, else a
    log-normalised-looking X (values ≤ 20) with a warning. The result's ``uns['X_kind']`` is ``raw_counts`` or ``normalized_expression``; log-normalised X is
    stored as ``expm1(X)`` so that the pipeline's log1p gives back exactly the given values.
    """
    if input_kind != "auto" and input_kind not in INPUT_KINDS:
        raise InputError(f"--input must be auto or one of {list(INPUT_KINDS)}, got {input_kind!r}")
    backed = bool(getattr(adata, "isbacked", False))
    sample = adata.X[: min(adata.n_obs, SNIFF_ROWS)]
    non_int = _first_non_integer(sample, adata.obs_names)
    kind = INPUT_KINDS.get(input_kind) or declared_kind(adata, where)
    note = ""
    if kind is None:  # auto, nothing declared: look at the values
        if non_int is None:
            kind = "raw_counts"
        elif _counts_source(adata) is not None:
            kind = "raw_counts"
        elif "log1p" in adata.uns:  # scanpy's mark of sc.pp.log1p
            kind = "log_normalized"
        elif float(np.max(_values(sample), initial=0.0)) <= LOGNORM_MAX:
            kind = "log_normalized"
            note = (
                "X is not integer counts and declares no uns['X_kind']; treating it as log-normalised "
                "(pass --input counts|normalized|lognorm to choose)"
            )
        else:
            raise InputError(
                f"{where}: X holds non-integer values (e.g. {non_int[1]:g} in cell {non_int[0]!r}) above "
                f"{LOGNORM_MAX:g}, neither counts nor log-normalised; pass --input normalized, or keep raw counts "
                "in layers['counts']"
            )
    if kind == "raw_counts" and non_int is not None:
        src = None if backed else _counts_source(adata)
        if src is None:
            raise InputError(
                f"{where}: X must hold non-negative integer counts but has {non_int[1]:g} in cell "
                f"{non_int[0]!r}; keep raw counts in layers['counts'] or pass --input normalized|lognorm"
            )
        label, adata = src
        bad = _first_non_integer(adata.X[: min(adata.n_obs, SNIFF_ROWS)], adata.obs_names)
        if bad is not None:
            raise InputError(
                f"{where}: {label} must hold integer counts but has {bad[1]:g} in cell {bad[0]!r}"
            )
        note = note or f"X is transformed; reading raw counts from {label}"
    if kind == "log_normalized":
        if backed:
            raise InputError(
                f"{where}: log-normalised X cannot be read from disk in chunks; load it in memory"
            )
        x = adata.X.copy()
        if sp.issparse(x):
            x = sp.csr_matrix(x, dtype=np.float32)
            x.data = np.expm1(x.data)
        else:
            x = np.expm1(np.asarray(x, dtype=np.float32))
        adata = ad.AnnData(X=x, obs=adata.obs, var=adata.var, obsm=dict(adata.obsm), uns=dict(adata.uns))
        kind = "normalized_expression"
    adata.uns["X_kind"] = kind
    return adata, note


def microns_per_pixel(adata: ad.AnnData, where: str) -> float | None:
    """``uns['microns_per_pixel']`` as a positive finite float (None when absent); InputError otherwise."""
    if "microns_per_pixel" not in adata.uns:
        return None
    value = adata.uns["microns_per_pixel"]
    try:
        if isinstance(value, str | bytes | bool) or np.ndim(value) != 0:
            raise TypeError
        scale = float(value)
    except (TypeError, ValueError):
        scale = float("nan")
    if not np.isfinite(scale) or scale <= 0:
        raise InputError(
            f"{where}: uns['microns_per_pixel'] = {value!r} is not a positive number of µm per coordinate unit"
        )
    return scale


def pixel_like(adata: ad.AnnData, spatial_key: str = "spatial") -> str | None:
    """Why ``obsm[spatial_key]`` looks like image pixels rather than µm (None when it does not, or when a
    scale ``uns['microns_per_pixel']`` is given): ``uns['spatial_units']`` says pixels, or, with no units
    stated, every coordinate is an integer and the extent exceeds 1000 units."""
    if "microns_per_pixel" in adata.uns or spatial_key not in adata.obsm:
        return None
    units = str(adata.uns.get("spatial_units", "")).lower()
    if units:
        return (
            f"uns['spatial_units'] = {units[:40]!r}" if ("pixel" in units or " px" in f" {units}") else None
        )
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    extent = float((xy.max(axis=0) - xy.min(axis=0)).max()) if len(xy) else 0.0
    if extent > 1000 and np.all(xy == np.round(xy)):
        return f"integer coordinates spanning {extent:.0f} units"
    return None


def check_z_source(sections, spacing: float | None, z_key: str | None, spatial_key: str = "spatial") -> None:
    """InputError when sections whose coordinates already carry z (3 columns, or ``obsm['spatial_3d']``) are
    given a z rule as well (``--spacing`` / ``--z-key``): it would be ignored silently."""
    flag = "--spacing" if spacing is not None else "--z-key" if z_key is not None else None
    if flag is None:
        return
    for s in sections:
        key = "spatial_3d" if "spatial_3d" in s.obsm else spatial_key
        if key in s.obsm and np.shape(s.obsm[key])[1] == 3:
            raise InputError(
                f"section {s.uns.get('section')!r}: obsm[{key!r}] already holds z (3 columns); {flag} would "
                "be ignored — drop it, or give 2-column xy"
            )
