"""Prediction at scale: millions of query points in chunks, written incrementally to ``.h5ad`` or AnnData
``.zarr`` so that memory is bounded by the chunk, not by N × genes (1M points × 5000 genes would be 20 GB).

The file is the same AnnData as :func:`~inrscrecon.query.predict.predict_anndata` (X [N, K] float32
log1p-normalised with ``uns['log1p']``, ``obsm['spatial_3d']``, ``obsm['spatial']`` = query x, y, the query's
obs columns, var = genes): obs/var/obsm are written first
with anndata, then X is created on disk and filled chunk by chunk. Everything goes to a temporary path that
is renamed onto ``out`` only when complete.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from inrscrecon.data.atomic import commit
from inrscrecon.data.io import check_writable
from inrscrecon.errors import InputError
from inrscrecon.field.model import INRField
from inrscrecon.query.domain_check import check_domain
from inrscrecon.query.predict import (
    LOG1P_UNS,
    X_NOTE,
    gene_indices,
    interval_setup,
    predict,
    query_obs_frame,
)
from inrscrecon.query.uncertainty import (
    MEDIAN_RULE,
    Predictive,
    interval_from_prediction,
    layer_names,
    record,
)

X_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}


def predict_to_file(
    model: INRField,
    xyz: np.ndarray,  # [N, 3] µm; may be a np.memmap
    out: str | Path,
    genes: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    batch_size: int = 65536,
    progress: bool = False,
    obs: pd.DataFrame | None = None,
    level: float | None = None,
) -> Path:
    """Predict ``genes`` (None: all) at ``xyz`` and write an AnnData ``out`` (``.h5ad`` or ``.zarr``) chunk by
    chunk. ``obs``: the query's own columns, kept (see :func:`query_obs`). Peak memory ≈ batch_size × (K +
    width) × 4 bytes plus the coordinates. Points outside the training tissue warn once and are recorded in
    ``uns['inrscrecon']['out_of_domain']``. ``level`` (e.g. 0.9): also the predictive interval of each point's
    counts at the training median library size, ``layers['lower_90']`` / ``layers['upper_90']`` (units of X),
    written chunk by chunk beside X (:mod:`inrscrecon.query.uncertainty`)."""
    out = check_writable(out)
    if out.suffix not in (".h5ad", ".zarr"):
        raise InputError(f"{out}: output must end in .h5ad or .zarr, got {out.suffix!r}")
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InputError(f"coordinates must have shape (N, 3), got {xyz.shape}")
    if ids is not None and len(ids) != len(xyz):
        raise InputError(f"{len(ids)} point ids for {len(xyz)} coordinates")
    names = list(genes) if genes is not None else list(model.cfg.genes)
    gene_indices(model, genes)  # unknown genes fail before anything is written
    dist = interval_setup(model, genes, level)  # so does a model that cannot give intervals
    n, k = len(xyz), len(names)
    ood = check_domain(model, xyz)
    shell = ad.AnnData(obs=query_obs_frame(n, ids, obs), var=pd.DataFrame(index=names))
    coords = np.asarray(xyz, dtype=np.float64)
    shell.obsm["spatial_3d"] = coords
    shell.obsm["spatial"] = coords[:, :2].copy()
    shell.uns["log1p"] = dict(LOG1P_UNS)
    shell.uns["inrscrecon"] = {"X": X_NOTE, "out_of_domain": ood or {}}
    # which section codes the points got (one warning when interpolated in z)
    if (codes := model.code_use(coords)) is not None:
        shell.uns["inrscrecon"]["section_codes"] = codes
    names_iv: tuple[str, ...] = ()
    if dist is not None and level is not None:
        names_iv = layer_names(level)
        shell.uns["inrscrecon"]["uncertainty"] = record(dist, level, MEDIAN_RULE)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)) / out.name
    rows = max(1, min(batch_size, n))
    try:
        if out.suffix == ".h5ad":
            import h5py

            shell.write_h5ad(tmp)
            with h5py.File(tmp, "r+") as f:
                x = f.create_dataset(
                    "X", shape=(n, k), dtype="float32", chunks=(min(rows, 4096), max(k, 1)) if n else None
                )
                x.attrs.update(X_ATTRS)
                layers = []
                for name in names_iv:
                    d = f["layers"].create_dataset(name, shape=(n, k), dtype="float32", chunks=x.chunks)
                    d.attrs.update(X_ATTRS)
                    layers.append(d)
                _fill(model, xyz, genes, x, batch_size, progress, layers, dist, level)
        else:
            import zarr

            with warnings.catch_warnings():  # anndata's notice about its default zarr format
                warnings.simplefilter("ignore", UserWarning)
                shell.write_zarr(tmp)
            g = zarr.open_group(str(tmp), mode="r+")
            x = g.create_array("X", shape=(n, k), dtype="float32", chunks=(min(rows, 16384), max(k, 1)))
            x.attrs.update(X_ATTRS)
            layers = []
            for name in names_iv:
                d = g.create_array(f"layers/{name}", shape=(n, k), dtype="float32", chunks=x.chunks)
                d.attrs.update(X_ATTRS)
                layers.append(d)
            _fill(model, xyz, genes, x, batch_size, progress, layers, dist, level)
            zarr.consolidate_metadata(str(tmp))  # anndata reads the consolidated listing: include X
        commit(tmp, out)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return out


def _fill(
    model: INRField,
    xyz: np.ndarray,
    genes: Sequence[str] | None,
    x,
    batch_size: int,
    progress: bool,
    layers: Sequence = (),  # (lower, upper) datasets when intervals are written
    dist: Predictive | None = None,
    level: float | None = None,
) -> None:
    for s in tqdm(range(0, len(xyz), batch_size), desc="predict", unit="chunk", disable=not progress):
        values = predict(model, np.asarray(xyz[s : s + batch_size]), genes, batch_size)
        x[s : s + batch_size] = values
        if layers and dist is not None and level is not None:
            lo, hi = interval_from_prediction(values, dist, level)
            layers[0][s : s + batch_size], layers[1][s : s + batch_size] = lo, hi


def query_obs(path: str | Path) -> pd.DataFrame | None:
    """The query's own per-point columns, kept in the prediction: ``obs`` of a query ``.h5ad``, the columns
    other than x, y, z of a ``.csv`` / ``.tsv`` (None for ``.npy``)."""
    path = Path(path)
    if path.suffix == ".h5ad":
        import h5py
        from anndata.io import read_elem

        with h5py.File(path, "r") as f:
            return read_elem(f["obs"]) if "obs" in f else None
    if path.suffix in (".csv", ".tsv", ".txt"):
        df = pd.read_csv(path, sep=None, engine="python")
        coords = (
            ["x", "y", "z"]
            if {"x", "y", "z"} <= set(df.columns)
            else list(df.select_dtypes("number").columns[:3])
        )
        rest = df.drop(columns=coords)
        rest.index = pd.Index([f"p{i}" for i in range(len(rest))])  # as predictions without ids are named
        return rest if rest.shape[1] else None
    return None


__all__ = ["predict_to_file", "query_obs"]
