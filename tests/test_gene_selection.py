"""Gene selection: pooled variance vs the batch-aware Seurat v3 rule (checked against scanpy's own)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from inrscrecon.data import preprocess
from inrscrecon.data.preprocess import batch_variable_genes, select_genes
from inrscrecon.errors import InputError


def _sections(n_sections: int = 3, n_cells: int = 300, n_genes: int = 120, seed: int = 0) -> list[ad.AnnData]:
    """Count sections with genes of many mean levels; genes 0–9 vary *between* sections only (a batch
    effect: constant rate within each section); genes 10–29 vary within every section (a spatial pattern)."""
    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(1.5, 0.8, n_genes))  # rate per gene
    out = []
    for b in range(n_sections):
        x = rng.uniform(0, 1, n_cells)
        rate = np.tile(base, (n_cells, 1))
        rate[:, :10] *= np.exp(2.0 * b)  # batch effect
        rate[:, 10:30] *= np.exp(0.8 * np.sin(6 * x[:, None] + np.arange(20)))  # within-section signal
        counts = rng.poisson(rate).astype(np.int32)
        a = ad.AnnData(sp.csr_matrix(counts))
        a.var_names = [f"g{i:03d}" for i in range(n_genes)]
        a.obs_names = [f"s{b}_c{i}" for i in range(n_cells)]
        a.uns["section"] = f"s{b}"
        out.append(a)
    return out


def test_batch_rule_matches_scanpy_seurat_v3():
    sc = pytest.importorskip("scanpy", reason="scanpy not installed (extra 'scverse')")
    pytest.importorskip("skmisc", reason="scikit-misc not installed (scanpy's seurat_v3 needs it)")
    sections = _sections()
    sections[1] = sections[1][:, sections[1].var_names[5:]].copy()  # shared genes are a subset
    shared = preprocess.shared_genes(sections)
    ours = select_genes(sections, 40, method="batch")
    joint = ad.concat([s[:, shared] for s in sections], label="batch", keys=["s0", "s1", "s2"])
    joint.obs["batch"] = pd.Categorical(joint.obs["batch"])
    hv = sc.pp.highly_variable_genes(
        joint, flavor="seurat_v3", n_top_genes=40, batch_key="batch", inplace=False
    )
    theirs = [g for g in shared if bool(hv.loc[g, "highly_variable"])]
    assert ours == theirs


def test_direct_loess_close_to_skmisc():
    pytest.importorskip("skmisc", reason="scikit-misc not installed")
    rng = np.random.default_rng(1)
    x = np.sort(rng.uniform(-2, 2, 400))
    y = 0.5 * x**2 + np.sin(3 * x) + rng.normal(0, 0.3, 400)
    ref = preprocess._loess_fit(x, y)
    mine = preprocess._loess_direct(x, y)
    assert np.max(np.abs(ref - mine)) < 0.02 * np.ptp(ref)


def test_batch_rule_without_skmisc_keeps_the_same_genes(monkeypatch):
    sections = _sections(seed=2)
    with_skmisc = select_genes(sections, 30, method="batch")
    monkeypatch.setattr(preprocess, "_loess_fit", preprocess._loess_direct)
    direct = select_genes(sections, 30, method="batch")
    assert len(set(with_skmisc) & set(direct)) >= 28


def test_batch_rule_ignores_between_section_differences():
    sections = _sections(seed=2)
    pooled = select_genes(sections, 20, method="pooled")
    batch = select_genes(sections, 20, method="batch")
    batch_effect = {f"g{i:03d}" for i in range(10)}
    signal = {f"g{i:03d}" for i in range(10, 30)}
    assert len(batch_effect & set(pooled)) >= 3  # pooled variance rewards the batch effect
    assert not batch_effect & set(batch)
    assert len(signal & set(batch)) >= 19 and len(signal & set(pooled)) <= 12
    assert batch == sorted(batch)  # shared order (g000 … sort like the var names)


def test_single_section_and_non_counts():
    sections = _sections(n_sections=1, seed=4)
    one = batch_variable_genes(sections, 15)
    assert len(one) == 15 and set(one) <= {f"g{i:03d}" for i in range(10, 30)}
    lognorm = [s.copy() for s in _sections(seed=5)]
    for s in lognorm:
        x = s.X.toarray()
        s.X = sp.csr_matrix((x * 1e4 / x.sum(axis=1, keepdims=True)).astype(np.float32))
        s.uns["X_kind"] = "normalized_expression"
    picked = select_genes(lognorm, 20, method="batch")
    pooled = select_genes(lognorm, 20, method="pooled")
    batch_effect = {f"g{i:03d}" for i in range(10)}
    assert len(picked) == 20 and len(batch_effect & set(picked)) < len(batch_effect & set(pooled))


def test_unknown_method_is_an_input_error():
    with pytest.raises(InputError, match="gene selection"):
        select_genes(_sections(n_sections=2), 10, method="variance")


def test_fit_cli_hvg_batch(tmp_path, small_stack, capsys):
    from inrscrecon.cli import main
    from inrscrecon.data.io import write_h5ad
    from inrscrecon.field.model import INRField

    sections, _ = small_stack
    paths = [str(write_h5ad(s.copy(), tmp_path / f"{s.uns['section']}.h5ad")) for s in sections[:2]]
    out = tmp_path / "m.safetensors"
    base = ["fit", *paths, "--genes", "20", "--epochs", "1", "--bands", "1", "--quiet", "--out", str(out)]
    assert main([*base, "--hvg", "batch"]) == 0
    assert INRField.load(out).cfg.genes == select_genes(sections[:2], 20, method="batch")
    assert main([*base, "--hvg", "batch", "--stream"]) == 2  # streaming selects by pooled variance only
    assert "--hvg batch needs in-memory sections" in capsys.readouterr().err
