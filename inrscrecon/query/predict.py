"""Query the field anywhere: chunked prediction at physical coordinates, optionally for a subset of genes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from inrscrecon.errors import InputError
from inrscrecon.field.model import INRField

if TYPE_CHECKING:
    from inrscrecon.query.uncertainty import Predictive


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

    Runs in chunks of ``batch_size`` points; with ``genes`` only those head rows are computed. This is the
    raw query (no out-of-domain check, so render can call it per chunk); :func:`predict_anndata`,
    ``predict_to_file`` and ``impute_sections`` check and record how many points lie outside the tissue.
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


LOG1P_UNS = {"base": None}  # scanpy's marker of log1p data (natural log): sc.pp.log1p will not log it again
X_NOTE = "predicted log1p(normalised expression, target_sum 1e4)"


def predict_anndata(
    model: INRField,
    xyz: np.ndarray,  # [N, 3] µm
    genes: Sequence[str] | None = None,
    obs_names: Sequence[str] | None = None,
    obs: pd.DataFrame | None = None,
    level: float | None = None,
) -> ad.AnnData:
    """Prediction as AnnData (scverse conventions): X [N, K] log1p-normalised (``uns['log1p']`` set),
    ``obsm['spatial']`` the query x, y, ``obsm['spatial_3d']`` x, y, z (µm), ``obs`` the query's columns
    when given; ``uns['inrscrecon']['out_of_domain']`` the fraction of points outside the training tissue
    (one :class:`~inrscrecon.query.domain_check.OutOfDomainWarning` when above zero).

    ``level`` (e.g. 0.9): also the predictive interval of each point's counts at the training median library
    size, ``layers['lower_90']`` / ``layers['upper_90']`` in the units of X and
    ``uns['inrscrecon']['uncertainty']`` (:mod:`inrscrecon.query.uncertainty`)."""
    from inrscrecon.query.domain_check import check_domain

    dist = interval_setup(model, genes, level)
    xyz = np.asarray(xyz, dtype=np.float64)
    ood = check_domain(model, xyz) if xyz.ndim == 2 and xyz.shape[-1] == 3 else None
    values = predict(model, xyz, genes)
    out = ad.AnnData(
        X=values, obs=query_obs_frame(len(xyz), obs_names, obs), var=pd.DataFrame(index=_names(model, genes))
    )
    out.obsm["spatial_3d"] = xyz
    out.obsm["spatial"] = xyz[:, :2].copy()
    out.uns["log1p"] = dict(LOG1P_UNS)
    out.uns["inrscrecon"] = {"X": X_NOTE, "out_of_domain": ood or {}}
    # which section codes the points got (one warning when interpolated in z)
    if (codes := model.code_use(xyz)) is not None:
        out.uns["inrscrecon"]["section_codes"] = codes
    if dist is not None and level is not None:
        add_interval_layers(out, values, dist, level)
    return out


def interval_setup(model: INRField, genes: Sequence[str] | None, level: float | None) -> Predictive | None:
    """The predictive distribution of ``genes`` when intervals are asked for (``level`` not None), else None;
    InputError before any work when the level or the model cannot give them."""
    if level is None:
        return None
    from inrscrecon.query.uncertainty import check_level, predictive

    check_level(level)
    return predictive(model).genes(gene_indices(model, genes))


def add_interval_layers(
    out: ad.AnnData,
    values: np.ndarray,  # [N, K] the prediction (X)
    dist: Predictive,  # of the K genes
    level: float,
    library: np.ndarray | None = None,  # [N] per-spot library sizes; None: the training median
    rule: str | None = None,  # how the library sizes were chosen (default: from ``library``)
) -> None:
    """Add ``layers['lower_<pct>']`` / ``layers['upper_<pct>']`` and ``uns['inrscrecon']['uncertainty']``."""
    from inrscrecon.query.uncertainty import (
        MEDIAN_RULE,
        SPOT_RULE,
        interval_from_prediction,
        layer_names,
        record,
    )

    lo_name, hi_name = layer_names(level)
    out.layers[lo_name], out.layers[hi_name] = interval_from_prediction(values, dist, level, library)
    rule = rule or (MEDIAN_RULE if library is None else SPOT_RULE)
    out.uns["inrscrecon"]["uncertainty"] = record(dist, level, rule)


def _names(model: INRField, genes: Sequence[str] | None) -> list[str]:
    return list(genes) if genes is not None else list(model.cfg.genes)


def query_obs_frame(
    n: int, obs_names: Sequence[str] | None = None, obs: pd.DataFrame | None = None
) -> pd.DataFrame:
    """obs of a prediction: the query's own columns (``obs``, e.g. from the query h5ad or CSV) indexed by
    ``obs_names`` (default the obs index, else p0, p1, …)."""
    if obs is not None and len(obs) != n:
        raise InputError(f"{len(obs)} obs rows for {n} query points")
    if obs_names is not None:
        index = pd.Index([str(o) for o in obs_names])
    elif obs is not None:
        index = pd.Index(obs.index.astype(str))
    else:
        index = pd.Index([f"p{i}" for i in range(n)])
    frame = obs.copy() if obs is not None else pd.DataFrame(index=index)
    frame.index = index
    return frame
