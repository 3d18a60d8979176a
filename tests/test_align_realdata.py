"""Alignment on the four DLPFC sections: layer agreement must beat centroid-only alignment on every
consecutive pair, for the sections as given and after a random rotation + translation + flip of the second."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from inrscrecon.align import align
from inrscrecon.align.kabsch import rotation
from inrscrecon.align.metrics import centroid_only, layer_agreement

pytestmark = pytest.mark.realdata

DATA = Path(os.environ.get("INRSCRECON_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
IDS = ["151673", "151674", "151675", "151676"]


def _load(i: str):
    import anndata as ad

    path = DATA / f"dlpfc_{i}.h5ad"
    if not path.exists():
        pytest.skip(f"DLPFC data not found at {path} (set INRSCRECON_DATA to the shared data folder)")
    a = ad.read_h5ad(path)
    a.uns["section"] = i
    return a


def perturb(adata, rng: np.random.Generator):
    """Copy with obsm['spatial'] rotated by a random angle about its centroid, flipped and translated."""
    b = adata.copy()
    xy = b.obsm["spatial"]
    c = xy.mean(axis=0)
    moved = (xy - c) @ rotation(rng.uniform(0, 2 * np.pi)).T
    moved[:, 1] *= -1
    b.obsm["spatial"] = moved + c + rng.uniform(-3000, 3000, size=2)
    return b


@pytest.mark.parametrize("mode", ["given", "perturbed"])
@pytest.mark.parametrize("k", [0, 1, 2], ids=["73-74", "74-75", "75-76"])
def test_dlpfc_beats_centroid_only(k, mode):
    a, b = _load(IDS[k]), _load(IDS[k + 1])
    if mode == "perturbed":
        b = perturb(b, np.random.default_rng(k))
    la, lb = a.obs["layer"].astype(str).to_numpy(), b.obs["layer"].astype(str).to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = align([a, b], spacing=10.0, allow_reflection=mode == "perturbed", seed=0)
    xyz = res.aligned.obsm["spatial_3d"]
    sec = res.aligned.obs["section"].astype(str).to_numpy()
    ours = layer_agreement(xyz[sec == IDS[k], :2], la, xyz[sec == IDS[k + 1], :2], lb)
    naive = layer_agreement(centroid_only(a.obsm["spatial"]), la, centroid_only(b.obsm["spatial"]), lb)
    assert ours > naive, f"{IDS[k]}-{IDS[k + 1]} {mode}: ours {ours:.3f} ≤ centroid-only {naive:.3f}"
    assert ours > 0.8, f"{IDS[k]}-{IDS[k + 1]} {mode}: layer agreement {ours:.3f}"
