"""Read sections (h5ad, backed or in memory; counts-CSV + coordinates-CSV) and write AnnData atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from inrscrecon.data.validate import validate_section
from inrscrecon.errors import InputError


def _section_name(adata: ad.AnnData, path: Path) -> str:
    if "section" in adata.uns and np.ndim(adata.uns["section"]) == 0:
        return str(adata.uns["section"])
    if "section" in adata.obs and adata.obs["section"].nunique() == 1:
        return str(adata.obs["section"].iloc[0])
    return path.stem


def read_section(path: str | Path, spatial_key: str = "spatial", backed: bool = False) -> ad.AnnData:
    """Read and validate one section from ``.h5ad``; ``uns['section']`` is set to its name.

    ``backed=True`` keeps X on disk (read-only); checks on X then run chunk by chunk.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .h5ad file")
    try:
        adata = ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # h5py/anndata raise many types on a non-h5ad file
        raise InputError(f"{path}: not a readable .h5ad file ({type(exc).__name__}: {exc})") from None
    name = _section_name(adata, path)
    validate_section(adata, f"{path}", spatial_key)
    adata.uns["section"] = name  # backed objects keep uns in memory too
    return adata


def read_csv_pair(counts_csv: str | Path, coords_csv: str | Path, name: str | None = None) -> ad.AnnData:
    """Read a counts CSV (rows = cells, first column = cell id, columns = genes) and a coordinates CSV
    (first column = cell id, then x, y[, z]) into one AnnData with ``obsm['spatial']``."""
    counts_csv, coords_csv = Path(counts_csv), Path(coords_csv)
    for p in (counts_csv, coords_csv):
        if not p.exists():
            raise InputError(f"{p}: file not found")
    try:
        counts = pd.read_csv(counts_csv, index_col=0)
        coords = pd.read_csv(coords_csv, index_col=0)
    except Exception as exc:
        raise InputError(f"{counts_csv} / {coords_csv}: not readable as CSV ({exc})") from None
    counts.index = counts.index.astype(str)
    coords.index = coords.index.astype(str)
    missing = counts.index.difference(coords.index)
    if len(missing):
        raise InputError(f"{coords_csv}: no coordinates for {len(missing)} cells, e.g. {missing[0]!r}")
    num = coords.loc[counts.index].select_dtypes("number")
    if num.shape[1] < 2:
        raise InputError(f"{coords_csv}: expected at least two numeric columns (x, y), found {num.shape[1]}")
    try:
        values = counts.to_numpy(dtype=np.float32)
    except ValueError:
        raise InputError(f"{counts_csv}: counts must be numeric") from None
    adata = ad.AnnData(
        X=sp.csr_matrix(values),
        obs=pd.DataFrame(index=counts.index),
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    adata.obsm["spatial"] = num.to_numpy(dtype=np.float64)[:, :3]
    adata.uns["section"] = name or counts_csv.stem
    validate_section(adata, f"{counts_csv}", "spatial")
    return adata


def read_sections(
    paths: Sequence[str | Path], spatial_key: str = "spatial", backed: bool = False
) -> list[ad.AnnData]:
    """Read several sections; names (``uns['section']``) are made unique by suffixing the index."""
    if not paths:
        raise InputError("no section files given")
    sections = [read_section(p, spatial_key, backed) for p in paths]
    names = [s.uns["section"] for s in sections]
    if len(set(names)) < len(names):
        for i, s in enumerate(sections):
            s.uns["section"] = f"{names[i]}_{i}"
    return sections


def check_writable(path: str | Path) -> Path:
    """Raise InputError unless ``path``'s folder exists (or can be made) and is writable."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create output folder {parent} ({exc.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise InputError(f"{path}: output folder {parent} is not writable")
    return path


def atomic_path(path: str | Path) -> tuple[Path, Path]:
    """(final path, temp path in the same folder): write the temp, then ``os.replace`` it onto the final."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return path, Path(tmp)


def write_h5ad(adata: ad.AnnData, path: str | Path) -> Path:
    """Write AnnData atomically (temp file + rename): a failed write leaves nothing behind."""
    path, tmp = atomic_path(path)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_coords(path: str | Path) -> tuple[np.ndarray, list[str] | None]:
    """Query coordinates [N, 3] (µm) from .csv/.tsv (columns x, y, z or the first three numeric), .npy, or .h5ad
    (``obsm['spatial_3d']``, or a 3-column ``obsm['spatial']``). Returns (coords, point ids or None)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.suffix == ".npy":
        xyz = np.load(path, allow_pickle=False)
        ids = None
    elif path.suffix in (".csv", ".tsv", ".txt"):
        df = pd.read_csv(path, sep=None, engine="python")
        cols = (
            ["x", "y", "z"]
            if {"x", "y", "z"} <= set(df.columns)
            else list(df.select_dtypes("number").columns[:3])
        )
        if len(cols) < 3:
            raise InputError(
                f"{path}: need columns x, y, z (or three numeric columns), found {list(df.columns)}"
            )
        xyz, ids = df[cols].to_numpy(np.float64), None
    elif path.suffix == ".h5ad":
        a = read_section(path, "spatial_3d" if _has_3d(path) else "spatial")
        key = "spatial_3d" if "spatial_3d" in a.obsm else "spatial"
        xyz, ids = np.asarray(a.obsm[key], np.float64), list(a.obs_names)
    else:
        raise InputError(f"{path}: coordinates must be .csv, .tsv, .npy or .h5ad, got {path.suffix!r}")
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InputError(f"{path}: coordinates must have shape (N, 3), got {xyz.shape}")
    if not np.isfinite(xyz).all():
        raise InputError(
            f"{path}: coordinates contain NaN or inf (row {int(np.flatnonzero(~np.isfinite(xyz).all(1))[0])})"
        )
    return xyz, ids


def _has_3d(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "obsm" in f and "spatial_3d" in f["obsm"]
    except OSError:
        return False
