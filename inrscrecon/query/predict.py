"""Query the field anywhere: chunked prediction at physical coordinates, optionally for a subset of genes."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from inrscrecon.errors import InputError
from inrscrecon.field.model import INRField


def gene_indices(model: INRField, genes: Sequence[str] | None) -> np.ndarray | None:
    """Head rows of ``genes`` (None → all genes); InputError naming unknown genes."""
    if genes is None:
        return None
    lookup = {g: i for i, g in enumerate(model.cfg.genes)}
    unknown = [g for g in genes if g not in lookup]
    if unknown:
        raise InputError(f"genes not in the model: {unknown[:5]}{' …' if len(unknown) > 5 else ''}")
    return np.array([lookup[g] for g in genes], dtype=np.int64)


@torch.no_grad()
def predict(
    model: INRField,
    xyz: np.ndarray,
    genes: Sequence[str] | None = None,
    batch_size: int = 65536,
    progress: bool = False,
) -> np.ndarray:
    """log1p-normalised expression at physical coordinates xyz [N, 3] (µm) → [N, K] float32.

    Runs in chunks of ``batch_size`` points; with ``genes`` only those head rows are computed.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InputError(f"coordinates must have shape (N, 3), got {xyz.shape}")
    if not np.isfinite(xyz).all():
        raise InputError("coordinates contain NaN or inf")
    idx = gene_indices(model, genes)
    device = model.center.device
    gi = None if idx is None else torch.as_tensor(idx, device=device)
    out = np.empty((len(xyz), model.cfg.n_genes if idx is None else len(idx)), dtype=np.float32)
    model.eval()
    for s in tqdm(range(0, len(xyz), batch_size), desc="predict", disable=not progress):
        c = model.normalize(torch.as_tensor(xyz[s : s + batch_size], device=device))
        out[s : s + batch_size] = model.head_out(model.hidden(c), gi).float().cpu().numpy()
    return out


def predict_anndata(
    model: INRField,
    xyz: np.ndarray,
    genes: Sequence[str] | None = None,
    obs_names: Sequence[str] | None = None,
) -> ad.AnnData:
    """Prediction as AnnData: X [N, K] (log1p-normalised), ``obsm['spatial_3d']``, ``obsm['spatial']`` (x, y)."""
    values = predict(model, xyz, genes)
    names = list(genes) if genes is not None else list(model.cfg.genes)
    obs = pd.DataFrame(
        index=[str(o) for o in obs_names] if obs_names is not None else [f"p{i}" for i in range(len(xyz))]
    )
    out = ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=names))
    out.obsm["spatial_3d"] = np.asarray(xyz, dtype=np.float64)
    out.obsm["spatial"] = out.obsm["spatial_3d"][:, :2].copy()
    out.uns["inrscrecon"] = {"X": "predicted log1p(normalised expression, target_sum 1e4)"}
    return out
