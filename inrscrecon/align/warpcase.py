"""Known-warp pairs: two sections of one patchy tissue, the second deformed on its slide by a smooth field.

The non-rigid step can only recover displacement that expression can see. In laminar tissue (the default
synthetic generator's curved layers) expression changes across layers and hardly along them, so a shift along
a layer is invisible and no estimator recovers it from expression. This tissue has 2D structure instead: each
gene follows a few smooth random patterns (random Fourier features, length scale ``feature_um``), so every
direction of displacement changes expression somewhere.

Section A (the reference) and section B sample the tissue at independent random cell positions s with fresh
Poisson counts. B is observed at o = R (s + w(s)) + t: a smooth warp w (per axis a sum of three plane waves
of wavelength 1–2 section diameters, scaled so that the largest displacement is ``amplitude_um``) and then a
rigid motion. The truth for scoring is s.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from inrscrecon.align.kabsch import Pose, rotation


@dataclass
class WarpCase:
    """A known-warp pair: ``fixed`` (observed = true frame), ``moving`` (observed = pose(true + warp(true)))."""

    fixed: ad.AnnData
    moving: ad.AnnData
    true_xy: np.ndarray  # [n_b, 2] true positions of the moving section's cells, in the fixed frame (µm)
    spacing: float  # median cell spacing, µm


def _patterns(rng: np.random.Generator, n_fields: int, n_waves: int, scale: float) -> tuple:
    omega = rng.normal(size=(n_fields, n_waves, 2)) * (2 * np.pi / scale)
    phase = rng.uniform(0, 2 * np.pi, size=(n_fields, n_waves))
    return omega, phase


def _fields(xy: np.ndarray, omega: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Latent patterns at points [n, 2] → [n, n_fields], each of unit variance over space."""
    arg = np.einsum("nd,fwd->nfw", xy, omega) + phase[None]
    return np.cos(arg).sum(axis=2) * np.sqrt(2.0 / omega.shape[1])


def warp_case(
    seed: int = 0,
    cells: int = 3000,
    genes: int = 200,
    radius_um: float = 450.0,
    feature_um: float = 120.0,
    amplitude_um: float = 30.0,
    library_size: float = 3000.0,
    angle_deg: float | None = None,
) -> WarpCase:
    """Build a known-warp pair (``amplitude_um=0``: no warp, rigid motion only). Counts are raw (Poisson)."""
    rng = np.random.default_rng(seed)
    omega, phase = _patterns(rng, 8, 6, feature_um)
    loadings = rng.normal(0.0, 1.0, size=(8, genes))
    base = rng.normal(0.0, 0.7, size=genes)
    names = [f"gene_{i:04d}" for i in range(genes)]

    def sample(n: int, name: str) -> tuple[ad.AnnData, np.ndarray]:
        r = radius_um * np.sqrt(rng.uniform(size=n))
        a = rng.uniform(0, 2 * np.pi, size=n)
        xy = np.column_stack([r * np.cos(a), r * np.sin(a)])
        logit = base + _fields(xy, omega, phase) @ loadings
        p = np.exp(logit - logit.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        counts = rng.poisson(p * library_size).astype(np.float32)
        adata = ad.AnnData(
            X=sp.csr_matrix(counts),
            obs=pd.DataFrame(index=[f"{name}_c{i}" for i in range(n)]),
            var=pd.DataFrame(index=names),
        )
        adata.uns.update({"section": name, "X_kind": "raw_counts"})
        return adata, xy

    fixed, xy_a = sample(cells, "fixed")
    moving, s = sample(cells, "moving")
    fixed.obsm["spatial"] = xy_a
    # three plane waves per axis, wavelengths 1–2 section diameters in random directions: bends and stretches
    # at the scale of the section, as slide handling makes them
    direction = rng.uniform(0, 2 * np.pi, size=(2, 3))
    wavenumber = 2 * np.pi / (2 * radius_um * rng.uniform(1.0, 2.0, size=(2, 3)))
    k = np.stack([np.cos(direction), np.sin(direction)], -1) * wavenumber[..., None]  # [2, 3, 2]
    ph = rng.uniform(0, 2 * np.pi, size=(2, 3))
    wv = np.sin(np.einsum("nd,cwd->ncw", s, k) + ph[None]).sum(axis=2)  # [n, 2]
    wv *= amplitude_um / max(np.sqrt((wv**2).sum(1)).max(), 1e-12)  # largest displacement = amplitude_um
    ang = rng.uniform(0, 2 * np.pi) if angle_deg is None else np.radians(angle_deg)
    pose = Pose(rotation(ang), rng.uniform(-500, 500, size=2))
    moving.obsm["spatial"] = pose.apply(s + wv)
    d, _ = cKDTree(xy_a).query(xy_a, k=2)
    return WarpCase(fixed, moving, s, float(np.median(d[:, 1])))
