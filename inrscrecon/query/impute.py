"""Impute (denoise / complete) expression at the spots of given sections with a fitted field."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from inrscrecon.data.stack import section_xyz, section_z
from inrscrecon.field.model import INRField
from inrscrecon.query.domain_check import check_domain
from inrscrecon.query.predict import LOG1P_UNS, add_interval_layers, interval_setup, predict
from inrscrecon.query.uncertainty import MEDIAN_RULE, spot_library_sizes


def _observed(sections: Sequence[ad.AnnData], spatial_key: str, xyz: np.ndarray) -> np.ndarray:
    """The observed coordinates of every spot (``obsm[spatial_key]`` as the sections give them; the aligned
    x, y where a section has none)."""
    parts, start = [], 0
    for s in sections:
        n = s.n_obs
        obs_xy = (
            np.asarray(s.obsm[spatial_key], dtype=np.float64)
            if spatial_key in s.obsm
            else xyz[start : start + n, :2]
        )
        parts.append(obs_xy[:, :2])
        start += n
    return np.concatenate(parts)


def impute_sections(
    model: INRField,
    sections: Sequence[ad.AnnData],
    genes: Sequence[str] | None = None,
    spacing: float | None = None,
    z_key: str | None = None,
    spatial_key: str = "spatial",
    level: float | None = None,
) -> ad.AnnData:
    """Predict every spot of ``sections`` (placed in 3D as for ``fit``) → one AnnData, scverse conventions:
    X = imputed log1p-normalised expression [N, K] (``uns['log1p']`` set), the input obs columns and
    ``obs['section']``, ``obsm['spatial']`` the observed coordinates (as the input had them),
    ``obsm['spatial_aligned']`` the aligned x, y and ``obsm['spatial_3d']`` x, y, z (µm);
    ``uns['inrscrecon']['out_of_domain']`` the fraction of spots outside the training tissue.

    ``level`` (e.g. 0.9): also each spot's predictive interval of counts given its own library size (total
    counts; the training median where the sections hold no counts), ``layers['lower_90']`` /
    ``layers['upper_90']`` in the units of X, recorded in ``uns['inrscrecon']['uncertainty']``."""
    dist = interval_setup(model, genes, level)
    aligned = len(sections) == 1 and "spatial_3d" in sections[0].obsm
    zs = [0.0] * len(sections) if aligned else section_z(sections, spacing, z_key)
    xyz = np.concatenate([section_xyz(s, z, spatial_key) for s, z in zip(sections, zs)])
    obs = pd.concat([s.obs.assign(section=str(s.uns.get("section", i))) for i, s in enumerate(sections)])
    if aligned and "section" in sections[0].obs:
        obs["section"] = sections[0].obs["section"].astype(str).to_numpy()
    ood = check_domain(model, xyz, "the spots")
    values = predict(model, xyz, genes, progress=True)
    names = list(genes) if genes is not None else list(model.cfg.genes)
    out = ad.AnnData(X=values, obs=obs.astype({"section": "category"}), var=pd.DataFrame(index=names))
    out.obs_names_make_unique()
    out.obsm["spatial"] = _observed(sections, spatial_key, xyz)
    out.obsm["spatial_aligned"] = xyz[:, :2].copy()
    out.obsm["spatial_3d"] = xyz
    out.uns["log1p"] = dict(LOG1P_UNS)
    out.uns["inrscrecon"] = {
        "X": "imputed log1p(normalised expression, target_sum 1e4) from the fitted field",
        "out_of_domain": ood or {},
    }
    # which section codes the spots got (one warning when interpolated in z)
    if (codes := model.code_use(xyz)) is not None:
        out.uns["inrscrecon"]["section_codes"] = codes
    if dist is not None and level is not None:
        library = spot_library_sizes(sections)
        rule = None if library is not None else f"{MEDIAN_RULE}; the sections hold no counts"
        add_interval_layers(out, values, dist, level, library, rule)
    return out
