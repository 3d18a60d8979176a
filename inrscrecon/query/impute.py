"""Impute (denoise / complete) expression at the spots of given sections with a fitted field."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from inrscrecon.data.stack import section_xyz, section_z
from inrscrecon.field.model import INRField
from inrscrecon.query.predict import predict


def impute_sections(
    model: INRField,
    sections: Sequence[ad.AnnData],
    genes: Sequence[str] | None = None,
    spacing: float | None = None,
    z_key: str | None = None,
    spatial_key: str = "spatial",
) -> ad.AnnData:
    """Predict every spot of ``sections`` (placed in 3D as for ``fit``) → one AnnData: X = imputed
    log1p-normalised expression [N, K], ``obs['section']``, ``obsm['spatial_3d']``, the input obs columns."""
    aligned = len(sections) == 1 and "spatial_3d" in sections[0].obsm
    zs = [0.0] * len(sections) if aligned else section_z(sections, spacing, z_key)
    xyz = np.concatenate([section_xyz(s, z, spatial_key) for s, z in zip(sections, zs)])
    obs = pd.concat([s.obs.assign(section=str(s.uns.get("section", i))) for i, s in enumerate(sections)])
    if aligned and "section" in sections[0].obs:
        obs["section"] = sections[0].obs["section"].astype(str).to_numpy()
    values = predict(model, xyz, genes, progress=True)
    names = list(genes) if genes is not None else list(model.cfg.genes)
    out = ad.AnnData(X=values, obs=obs.astype({"section": "category"}), var=pd.DataFrame(index=names))
    out.obs_names_make_unique()
    out.obsm["spatial_3d"] = xyz
    out.obsm["spatial"] = xyz[:, :2].copy()
    out.uns["inrscrecon"] = {
        "X": "imputed log1p(normalised expression, target_sum 1e4) from the fitted field"
    }
    return out
