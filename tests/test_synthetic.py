import numpy as np
import scipy.sparse as sp

from inrscrecon.data.synthetic import SynthConfig, make_sections, to_common


def test_deterministic_and_shaped():
    cfg = dict(n_sections=3, cells_per_section=300, n_genes=40, seed=7, flip_prob=0.5)
    a, ta = make_sections(SynthConfig(**cfg))
    b, tb = make_sections(SynthConfig(**cfg))
    assert len(a) == 3
    for x, y in zip(a, b):
        assert sp.issparse(x.X) and x.X.dtype == np.int32
        assert (x.X != y.X).nnz == 0
        np.testing.assert_array_equal(x.obsm["spatial"], y.obsm["spatial"])
        assert {"domain", "section"} <= set(x.obs.columns)
        assert x.obs_names.is_unique
    assert ta.reflected == tb.reflected


def test_pose_convention_roundtrip():
    sections, truth = make_sections(
        SynthConfig(n_sections=4, cells_per_section=200, n_genes=20, flip_prob=0.5, seed=2)
    )
    for k, s in enumerate(sections):
        back = to_common(s.obsm["spatial"], truth.rotations[k], truth.translations[k], truth.reflected[k])
        np.testing.assert_allclose(back, truth.xy_common[k], atol=1e-8)
        r = truth.rotations[k]
        np.testing.assert_allclose(r @ r.T, np.eye(2), atol=1e-12)
        assert np.linalg.det(r) > 0


def test_domains_and_markers_are_spatial():
    sections, truth = make_sections(SynthConfig(n_sections=2, cells_per_section=800, n_genes=80, seed=1))
    s = sections[0]
    assert s.obs["domain"].nunique() >= 4
    # a domain's marker genes are more expressed inside that domain than outside
    expr = truth.tissue.expected(truth.xyz(0))
    dom = truth.tissue.domain(truth.xyz(0))
    d = int(np.bincount(dom).argmax())
    marker = int(np.argmax(truth.tissue.domain_effects[d]))
    assert expr[dom == d, marker].mean() > expr[dom != d, marker].mean() + 0.5


def test_grids_and_sizes():
    for grid in ("hex", "square", "random"):
        sections, _ = make_sections(SynthConfig(n_sections=1, cells_per_section=1000, n_genes=10, grid=grid))
        assert 800 <= sections[0].n_obs <= 1200
