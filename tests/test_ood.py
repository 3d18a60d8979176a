"""Out-of-domain queries: predict / impute / render warn once (one ``inrscrecon: warning:`` line on the
command line) and record the fraction in ``uns`` / the volume's attributes when query points lie farther than
a margin outside the training cells' tissue; queries inside the tissue stay silent."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr

import inrscrecon as ir
from inrscrecon.query.domain_check import OutOfDomainWarning, check_domain, margin_for


@pytest.fixture(scope="module")
def fitted():
    import torch

    torch.set_num_threads(1)
    sections, _ = ir.make_sections(n_sections=3, cells_per_section=250, n_genes=30, max_rotation_deg=0,
                                   max_translation=0, seed=2)  # fmt: skip
    genes = ir.select_genes(sections, 20)
    table = ir.build_cell_table(sections, genes, spacing=40.0)
    res = ir.fit(table, ir.EncodingConfig(n_bands=2), width=16, n_layers=1,
                 train_cfg=ir.TrainConfig(epochs=1, progress=False))  # fmt: skip
    return sections, table, res.model


def _far(table, n, shift=10.0):
    """``n`` training positions moved by ``shift`` × the tissue's extent in x (another organ's section)."""
    xyz = table.coords[:n].copy()
    xyz[:, 0] += shift * np.ptp(table.coords[:, 0])
    return xyz


def test_inside_is_silent_and_far_points_are_counted(fitted):
    _, table, model = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = check_domain(model, table.coords)
    assert rec is not None and rec["fraction"] == 0.0 and rec["n_checked"] == table.n_cells
    mixed = np.concatenate([table.coords[:300], _far(table, 100)])
    with pytest.warns(OutOfDomainWarning, match=r"25\.0% of query points lie more than") as w:
        rec = check_domain(model, mixed)
    assert len(w) == 1 and rec["fraction"] == pytest.approx(0.25)
    assert rec["margin_um"] == pytest.approx(margin_for(model), rel=1e-3) and rec["max_distance_um"] > 1000
    # just beyond the outline by less than the margin: still inside the domain
    edge = table.coords[np.argmax(table.coords[:, 0])].copy()
    edge[0] += 0.5 * margin_for(model)
    assert check_domain(model, edge[None], warn=False)["fraction"] == 0.0
    edge[0] += 2 * margin_for(model)
    assert check_domain(model, edge[None], warn=False)["fraction"] == 1.0
    # z beyond the stack (more than half a spacing + the margin above the top section)
    above = table.coords[:10].copy()
    above[:, 2] = table.coords[:, 2].max() + 20 + 2 * margin_for(model)
    assert check_domain(model, above, warn=False)["fraction"] == 1.0


def test_model_without_stored_tissue_is_not_checked(fitted):
    _, table, _ = fitted
    old = ir.INRField(ir.FieldConfig(3, genes=["a", "b", "c"]))
    assert check_domain(old, _far(table, 5)) is None


def test_predict_and_impute_record_the_fraction(fitted):
    sections, table, model = fitted
    with pytest.warns(OutOfDomainWarning) as w:
        a = ir.predict_anndata(model, np.concatenate([table.coords[:30], _far(table, 10)]))
    assert len(w) == 1 and a.uns["inrscrecon"]["out_of_domain"]["fraction"] == pytest.approx(0.25)
    moved = [s.copy() for s in sections]
    moved[0].obsm["spatial"] = moved[0].obsm["spatial"] + 10 * np.ptp(table.coords[:, 0])
    with pytest.warns(OutOfDomainWarning, match="of the spots"):
        out = ir.impute_sections(model, moved, spacing=40.0)
    frac = sections[0].n_obs / sum(s.n_obs for s in sections)
    assert out.uns["inrscrecon"]["out_of_domain"]["fraction"] == pytest.approx(frac, abs=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfDomainWarning)
        ok = ir.impute_sections(model, sections, spacing=40.0)
    assert ok.uns["inrscrecon"]["out_of_domain"]["fraction"] == 0.0


def test_cli_predict_and_render_warn_in_one_line(fitted, tmp_path, capsys):
    from inrscrecon.cli import main

    _, table, model = fitted
    model.save(tmp_path / "m.safetensors")
    far = _far(table, 20)
    pd.DataFrame(far, columns=["x", "y", "z"]).to_csv(tmp_path / "far.csv", index=False)
    out = tmp_path / "far.h5ad"
    assert (
        main(["predict", str(tmp_path / "m.safetensors"), str(tmp_path / "far.csv"), "--out", str(out)]) == 0
    )
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "inrscrecon: warning:" in ln]
    assert (
        len(lines) == 1 and "100.0% of query points" in lines[0] and "outside the training tissue" in lines[0]
    )
    assert ad.read_h5ad(out).uns["inrscrecon"]["out_of_domain"]["fraction"] == 1.0
    # render over a box next to the tissue, without a mask: the voxels rendered there are extrapolations
    x0, x1 = table.coords[:, 0].max() + 1000, table.coords[:, 0].max() + 2000
    vol = tmp_path / "v.ome.zarr"
    rc = main(["render", str(tmp_path / "m.safetensors"), "--genes", model.cfg.genes[0], "--mask", "none",
               "--bounds", str(x0), str(x1), "0", "500", "0", "80", "--voxel", "100", "40", "--no-png", "--quiet",
               "--out", str(vol)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0 and err.count("inrscrecon: warning:") == 1 and "of the voxels rendered" in err
    attrs = zarr.open_group(str(vol), mode="r").attrs.asdict()
    assert attrs["inrscrecon"]["out_of_domain"]["fraction"] == 1.0
