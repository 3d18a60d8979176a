"""scverse conventions of every output with spots: predictions at query points put the query x, y in
``obsm['spatial']`` and x, y, z in ``obsm['spatial_3d']``; imputed sections keep the observed coordinates in
``obsm['spatial']``, the aligned x, y in ``obsm['spatial_aligned']`` and x, y, z in ``obsm['spatial_3d']``;
log1p outputs carry ``uns['log1p']`` (so scanpy does not log them again); obs columns are kept. Read back
from disk, checked by hand and, where scanpy is installed, with scanpy itself."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import inrscrecon as ir


@pytest.fixture(scope="module")
def stack():
    """Three unaligned synthetic sections (pixel-free µm coordinates, random poses) and a tiny fitted field."""
    import torch

    torch.set_num_threads(1)
    sections, _ = ir.make_sections(n_sections=3, cells_per_section=250, n_genes=40, seed=1)
    genes = ir.select_genes(sections, 30)
    table = ir.build_cell_table(sections, genes, spacing=40.0)
    res = ir.fit(table, ir.EncodingConfig(n_bands=2), width=16, n_layers=1,
                 train_cfg=ir.TrainConfig(epochs=1, progress=False))  # fmt: skip
    return sections, res.model


def _check_log1p(a: ad.AnnData) -> None:
    assert a.uns["log1p"] == {"base": None}  # natural log, as sc.pp.log1p writes it
    x = np.asarray(a.X)
    assert x.min() >= 0 and x.max() < np.log1p(1e4)  # log1p of normalised values, not counts


def test_predict_outputs_follow_conventions(stack, tmp_path):
    sections, model = stack
    xyz = np.array([[10.0, 20.0, 40.0], [-30.0, 5.0, 0.0], [0.0, 0.0, 80.0]])
    obs = pd.DataFrame({"cell_type": ["a", "b", "a"]}, index=["q0", "q1", "q2"])
    a = ir.predict_anndata(model, xyz, genes=model.cfg.genes[:4], obs=obs)
    np.testing.assert_array_equal(a.obsm["spatial"], xyz[:, :2])
    np.testing.assert_array_equal(a.obsm["spatial_3d"], xyz)
    assert list(a.obs_names) == ["q0", "q1", "q2"] and a.obs["cell_type"].tolist() == ["a", "b", "a"]
    _check_log1p(a)
    # the CLI: a CSV query with an extra column, and an h5ad query with obs columns; read back from disk
    from inrscrecon.cli import main

    model.save(tmp_path / "m.safetensors")
    pd.DataFrame({"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "cell_type": ["a", "b", "a"]}).to_csv(
        tmp_path / "q.csv", index=False
    )
    q = sections[0][:3].copy()  # three measured spots as the query, with their obs columns
    q.obsm["spatial_3d"] = xyz
    q.write_h5ad(tmp_path / "q.h5ad")
    for src, col, names in (
        ("q.csv", "cell_type", ["p0", "p1", "p2"]),
        ("q.h5ad", "domain", list(q.obs_names)),
    ):
        out = tmp_path / f"pred_{src}.h5ad"
        assert main(["predict", str(tmp_path / "m.safetensors"), str(tmp_path / src), "--out", str(out)]) == 0
        p = ad.read_h5ad(out)
        np.testing.assert_allclose(p.obsm["spatial"], xyz[:, :2])
        np.testing.assert_allclose(p.obsm["spatial_3d"], xyz)
        assert col in p.obs and list(p.obs_names) == names
        _check_log1p(p)


def test_impute_keeps_observed_coordinates(stack, tmp_path):
    sections, model = stack
    out = ir.impute_sections(model, sections, spacing=40.0)
    observed = np.concatenate([np.asarray(s.obsm["spatial"]) for s in sections])
    np.testing.assert_array_equal(out.obsm["spatial"], observed)  # the input's own frame (the contract)
    table = ir.build_cell_table(sections, model.cfg.genes, spacing=40.0)
    np.testing.assert_allclose(out.obsm["spatial_3d"], table.coords)
    np.testing.assert_allclose(out.obsm["spatial_aligned"], table.coords[:, :2])
    assert {"domain", "section"} <= set(out.obs) and out.n_obs == sum(s.n_obs for s in sections)
    _check_log1p(out)
    path = tmp_path / "imputed.h5ad"
    ir.write_h5ad(out, path)
    back = ad.read_h5ad(path)
    assert set(back.obsm) == {"spatial", "spatial_aligned", "spatial_3d"} and "log1p" in back.uns
    # one aligned AnnData (obsm['spatial_3d'] + the observed obsm['spatial']), as `align` writes it
    aligned = ad.concat(sections, label="section", keys=[s.uns["section"] for s in sections])
    aligned.obsm["spatial_3d"] = table.coords
    a2 = ir.impute_sections(model, [aligned])
    np.testing.assert_array_equal(a2.obsm["spatial"], observed)
    np.testing.assert_allclose(a2.obsm["spatial_aligned"], table.coords[:, :2])


@pytest.mark.slow  # scanpy's first neighbours call compiles numba kernels (~1–2 min on 2 cores)
def test_outputs_read_with_scanpy(stack, capsys):
    sc = pytest.importorskip("scanpy", reason="scanpy not installed; the same checks run by hand above")
    import matplotlib

    matplotlib.use("Agg")
    sections, model = stack
    out = ir.impute_sections(model, sections, spacing=40.0)
    before = np.asarray(out.X).copy()
    capsys.readouterr()
    sc.pp.log1p(out.copy())  # scanpy reads uns['log1p'] and says the data is already logged
    assert "already log-transformed" in capsys.readouterr().err
    sc.pp.pca(out, n_comps=5)
    sc.pp.neighbors(out, n_neighbors=8, use_rep="X_pca")
    assert out.obsp["connectivities"].shape == (out.n_obs, out.n_obs)
    np.testing.assert_array_equal(np.asarray(out.X), before)  # neighbours did not touch X
    sc.pl.embedding(out, basis="spatial_aligned", color="domain", show=False)
    sc.pl.spatial(out, color="domain", spot_size=20, show=False)  # obsm['spatial'] without an image
