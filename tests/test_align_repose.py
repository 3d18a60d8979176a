"""Re-pose precision on every shared section: a section against a perturbed, re-posed copy of itself.

The copy keeps 80 % of the spots, has its counts thinned binomially (p = 0.5; normalised values get
multiplicative log-normal noise), positions jittered by 0.2 % of the extent, a random rotation in [0, 360°)
(flipped in every second case) and a translation of up to two extents. Aligned with reflection allowed, the
median distance between each moved spot mapped back and its original position must be ≤ 0.5 % of the extent
(the jitter alone gives ≈ 0.24 %). Large sections are subsampled to keep each case a few seconds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import require_data

from inrscrecon.align import align
from inrscrecon.align.repose import repose_case, repose_residual

pytestmark = pytest.mark.realdata

SECTIONS = [
    "paste_bc_layer1",
    "paste_bc_layer2",
    "paste_bc_layer3",
    "paste_bc_layer4",
    "merfish_hypothalamus_bregma0.26",
    "merfish_hypothalamus_bregma0.21",
    "dlpfc_151673",
    "dlpfc_151674",
    "dlpfc_151675",
    "dlpfc_151676",
]
MAX_CELLS = 1500


@pytest.mark.parametrize("index", range(len(SECTIONS)), ids=SECTIONS)
def test_repose_median_residual_within_half_percent(index):
    import anndata as ad

    name = SECTIONS[index]
    adata = ad.read_h5ad(require_data(f"{name}.h5ad") / f"{name}.h5ad")
    adata.uns["section"] = name
    case = repose_case(adata, np.random.default_rng(index), flip=index % 2 == 1, max_cells=MAX_CELLS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = align([case.original, case.moved], spacing=10.0, allow_reflection=True, seed=0)
    moved = next(e for e in res.transforms if e["name"] == case.moved.uns["section"])
    assert moved["reflected"] == (index % 2 == 1)
    residual = repose_residual(case, res.transforms)
    assert residual <= 0.005, f"{name}: median residual {100 * residual:.2f} % of the extent"


def test_repose_residual_measures_a_wrong_pose():
    """The score is not blind: the identity transform on a re-posed copy is far off, the true pose is at the
    jitter floor."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(2.0, size=(400, 30)).astype(np.float32)))
    a.obsm["spatial"] = rng.uniform(0, 100, size=(400, 2))
    a.uns["section"] = "s"
    case = repose_case(a, rng, flip=True)
    ident = {"rotation": np.eye(2).tolist(), "translation": [0.0, 0.0], "reflected": False}
    inv = case.true_pose.inverse()
    truth = {"rotation": inv.R.tolist(), "translation": inv.t.tolist(), "reflected": inv.reflected}
    assert repose_residual(case, [dict(ident, name="s"), dict(ident, name="s_moved")]) > 0.5
    floor = repose_residual(case, [dict(ident, name="s"), dict(truth, name="s_moved")])
    assert 0.001 < floor < 0.004
