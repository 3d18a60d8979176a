"""Predictive intervals on the count scale: quantiles against scipy, coverage on data simulated from a known
NB / Poisson, the dispersion fit, and predict / impute / render with and without --uncertainty."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import stats

from inrscrecon.cli import main
from inrscrecon.errors import InputError
from inrscrecon.field.model import FieldConfig, INRField
from inrscrecon.query import uncertainty as unc


def _simulated(n: int, k: int, seed: int = 0):
    """Means spanning 0.005–400 counts (log-normal) and gene-wise θ from 0.3 to 30; NB draws."""
    rng = np.random.default_rng(seed)
    mu = np.exp(rng.normal(-0.5, 2.0, (n, k)))
    log_theta = np.log(np.geomspace(0.3, 30.0, k))
    th = np.exp(log_theta)[None, :]
    y = rng.negative_binomial(th, th / (th + mu))
    return mu, log_theta, y


@pytest.mark.parametrize("kind", ["nb", "poisson"])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.95, 0.999])
def test_quantiles_agree_with_scipy(kind, p):
    mu, log_theta, _ = _simulated(400, 7, seed=1)
    lt = log_theta if kind == "nb" else None
    q = unc.count_quantiles(mu, lt, p)
    if kind == "nb":
        th = np.exp(log_theta)[None, :]
        d = stats.nbinom(th, th / (th + mu))
    else:
        d = stats.poisson(mu)
    k = d.ppf(p)
    # the integer part of Q* is scipy's quantile; the jittered CDF at Q* is p
    np.testing.assert_array_equal(np.ceil(q - 0.5), k)
    jittered_cdf = d.cdf(k - 1) + (q - (k - 0.5)) * d.pmf(k)
    np.testing.assert_allclose(jittered_cdf, p, atol=1e-9)
    assert np.all(np.diff(np.stack([unc.count_quantiles(mu, lt, r) for r in (0.1, 0.5, 0.9)]), axis=0) > 0)


@pytest.mark.parametrize("kind", ["nb", "poisson"])
@pytest.mark.parametrize("level", [0.9, 0.8])
def test_coverage_is_nominal_with_the_true_mean(kind, level):
    mu, log_theta, y = _simulated(6000, 10, seed=2)
    if kind == "poisson":
        y = np.random.default_rng(3).poisson(mu)
        log_theta = None
    lo, hi = unc.interval_counts(mu, log_theta, level)
    pooled = unc.coverage_fraction(y, lo, hi).mean()
    assert abs(pooled - level) < 0.015
    # and the randomized rule it is the expectation of
    v = np.random.default_rng(4).uniform(size=y.shape)
    assert abs(((lo <= y + v - 0.5) & (y + v - 0.5 <= hi)).mean() - level) < 0.015
    # plain integer quantiles over-cover the low counts: the rule is what brings coverage to nominal
    plo, phi = unc.plain_interval_counts(mu, log_theta, level)
    assert ((plo <= y) & (y <= phi)).mean() > level + 0.03


def test_dispersion_fit_recovers_theta():
    mu, log_theta, y = _simulated(20000, 6, seed=5)
    est = unc.fit_dispersion(mu, y)
    np.testing.assert_allclose(est, log_theta, atol=0.2)  # θ = 30 is the hard end (SE of log θ ≈ 0.1)
    assert unc.fit_dispersion(mu, np.zeros_like(y)).min() >= 9.0  # no counts: the Poisson end of the grid


def test_nb_nll_matches_the_count_loss():
    from inrscrecon.field.losses import count_nll

    mu, log_theta, y = _simulated(300, 5, seed=9)
    lm = torch.log(torch.as_tensor(mu))
    yt = torch.as_tensor(y, dtype=torch.float64)
    lt = torch.as_tensor(log_theta)
    ref = count_nll(lm, yt, torch.zeros(len(y)), "nb", lt).double() - torch.lgamma(yt + 1)
    torch.testing.assert_close(unc.nb_nll_by_gene(lm, yt, lt), ref.sum(dim=0), rtol=1e-5, atol=1e-2)


def test_mean_map_recovers_a_power_law():
    """Counts whose log-mean is a + b·log(rate) of the prediction's rate: the map finds (a, b), and the
    mean on those cells matches (Σμ = Σy, the Poisson score equation of a)."""
    rng = np.random.default_rng(6)
    rate = np.exp(rng.normal(0.0, 1.5, (5000, 4)))  # per 1e4 counts
    pred = np.log1p(rate)
    library = rng.uniform(1000, 5000, 5000)
    a_true, b_true = np.array([0.0, 0.5, -0.3, 1.0]), np.array([1.0, 0.5, 1.5, 0.8])
    mu = library[:, None] / 1e4 * np.exp(a_true + b_true * np.log(rate + unc.RATE_EPS))
    y = rng.poisson(mu)
    a, b = unc.fit_mean_map(pred, y, library)
    np.testing.assert_allclose(b, b_true, atol=0.05)
    np.testing.assert_allclose(a, a_true, atol=0.1)
    np.testing.assert_allclose(unc.mean_counts(pred, library, a, b).sum(0), y.sum(0), rtol=1e-6)
    a0, b0 = unc.fit_mean_map(pred, np.zeros_like(y), library)
    assert (a0 == 0).all() and (b0 == 1).all()


def test_interval_blocks_do_not_change_the_result(monkeypatch):
    mu, log_theta, _ = _simulated(50, 7, seed=12)
    pred = np.log1p(mu / 2000 * 1e4).astype(np.float32)
    lib = np.full(50, 2000.0)
    d = unc.Predictive("nb", log_theta, None, None, 2000.0, "test")
    whole = unc.interval_from_prediction(pred, d, 0.9, lib)
    monkeypatch.setattr(unc, "BLOCK_VALUES", 20)  # 2 rows per block
    blocks = unc.interval_from_prediction(pred, d, 0.9)
    for a, b in zip(whole, blocks):
        np.testing.assert_array_equal(a, b)
    empty = unc.interval_from_prediction(pred, d, 0.9, np.where(np.arange(50) == 3, 0.0, lib))
    np.testing.assert_array_equal(empty[1], whole[1])  # a spot without counts: the training median
    lo, hi = unc.interval_counts(mu, log_theta, 0.9)
    np.testing.assert_allclose(whole[1], unc.to_log1p(hi, lib), rtol=1e-5)


def test_layer_names_and_levels():
    assert unc.layer_names(0.9) == ("lower_90", "upper_90")
    assert unc.layer_names(0.975) == ("lower_97_5", "upper_97_5")
    for bad in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(InputError, match="between 0 and 1"):
            unc.check_level(bad)


def test_to_log1p_is_in_the_units_of_x():
    q = np.array([[0.0, 3.0], [-0.4, 10.0]])
    lib = np.array([2000.0, 5000.0])
    np.testing.assert_allclose(
        unc.to_log1p(q, lib), np.log1p(np.maximum(q, 0) * 1e4 / lib[:, None]), rtol=1e-6
    )


def test_predictive_sources():
    cfg = FieldConfig(3, genes=["a", "b", "c"])
    m = INRField(cfg)
    with pytest.raises(InputError, match="no uncertainty record"):
        unc.predictive(m)
    m.training_record["uncertainty"] = {"library_size_median": 1500.0, "calibration": None}
    with pytest.raises(InputError, match="RMSE model"):
        unc.predictive(m)
    cal = {"cells": 9, "log_scale": [0.1, 0.2, 0.3], "power": [1, 0.5, 2], "log_theta": [0, 1, 2]}
    m.training_record["uncertainty"]["calibration"] = cal
    d = unc.predictive(m)
    assert d.kind == "nb" and d.library_size == 1500.0 and "9 validation cells" in d.source
    one = d.genes(np.array([2]))
    np.testing.assert_array_equal(one.power, [2.0])
    pred, lib = np.array([[0.5], [2.0]]), np.array([1000.0, 3000.0])
    want = lib[:, None] / 1e4 * np.exp(0.3) * (np.expm1(pred) + unc.RATE_EPS) ** 2
    np.testing.assert_allclose(one.mean(pred, lib), want, rtol=1e-12)
    nb = INRField(FieldConfig(3, genes=["a", "b", "c"], likelihood="nb"))
    nb.training_record["uncertainty"] = {"library_size_median": 1000.0, "calibration": None}
    with torch.no_grad():
        nb.log_theta.copy_(torch.tensor([0.5, 1.0, 1.5]))  # type: ignore[union-attr]
    d = unc.predictive(nb)
    assert d.kind == "nb" and "log_theta" in d.source
    np.testing.assert_allclose(d.log_theta, [0.5, 1.0, 1.5])
    with pytest.raises(InputError, match="no validation calibration"):
        unc.predictive(nb, "calibration")
    nb.training_record["uncertainty"]["calibration"] = cal  # auto keeps the NB model's own θ
    assert "log_theta" in unc.predictive(nb).source
    np.testing.assert_array_equal(unc.predictive(nb, "calibration").log_theta, [0, 1, 2])
    po = INRField(FieldConfig(3, genes=["a", "b", "c"], likelihood="poisson"))
    po.training_record["uncertainty"] = {"library_size_median": 1000.0, "calibration": None}
    assert unc.predictive(po).kind == "poisson"
    po.training_record["uncertainty"]["calibration"] = cal  # a calibration widens Poisson to NB
    assert unc.predictive(po).kind == "nb" and unc.predictive(po, "model").kind == "poisson"
    normalised = INRField(cfg)
    normalised.training_record["uncertainty"] = {"library_size_median": None, "why": "normalised values"}
    with pytest.raises(InputError, match="normalised values"):
        unc.predictive(normalised)


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small synthetic stack at its true poses and an RMSE model fitted on it by the CLI."""
    from conftest import write_posed_sections

    from inrscrecon.data.synthetic import SynthConfig

    d = tmp_path_factory.mktemp("unc")
    cfg = SynthConfig(n_sections=3, cells_per_section=400, n_genes=40, seed=7)
    files, truth = write_posed_sections(d, cfg)
    model = d / "m.safetensors"
    flags = ["--out", str(model), "--genes", "40", "--epochs", "6", "--width", "32", "--layers", "2"]
    assert main(["fit", *files, *flags, "--bands", "2", "--spacing", "40", "--quiet"]) == 0
    return d, files, model, cfg, truth


def test_fit_stores_the_calibration(fitted):
    model = fitted[2]
    m = INRField.load(model)
    rec = m.training_record["uncertainty"]
    assert rec["library_size_median"] > 0
    cal = rec["calibration"]
    assert cal["cells"] == 120  # the fit's 10 % validation split of 1200 cells
    assert len(cal["log_theta"]) == len(cal["log_scale"]) == len(cal["power"]) == m.cfg.n_genes
    assert np.isfinite(cal["log_theta"]).all() and np.isfinite(cal["log_scale"]).all()
    assert 0 <= min(cal["power"]) and max(cal["power"]) <= 3


def test_held_out_coverage_of_a_calibrated_model(fitted):
    """Fresh spots of the same synthetic tissue (new points near the sections, new NB counts): the calibrated
    90 % interval covers close to 90 % of their counts."""
    from inrscrecon.data.synthetic import SyntheticTissue
    from inrscrecon.query.predict import predict

    model, cfg, truth = fitted[2:]
    m = INRField.load(model)
    rng = np.random.default_rng(11)
    xyz = np.concatenate([truth.xyz(k) for k in range(3)])
    xyz = xyz + np.column_stack([rng.normal(0, 10, (len(xyz), 2)), np.zeros(len(xyz))])
    counts = SyntheticTissue(cfg).sample_counts(xyz, rng)
    genes = [SyntheticTissue(cfg).gene_names.index(g) for g in m.cfg.genes]
    y = counts.toarray()[:, genes]
    library = np.asarray(counts.sum(axis=1)).ravel()
    dist = unc.predictive(m)
    mu = dist.mean(predict(m, xyz), library)
    lo, hi = unc.interval_counts(mu, dist.log_theta, 0.9)
    cov = unc.coverage_fraction(y, lo, hi).mean()
    assert 0.86 < cov < 0.94, cov


def test_predict_with_and_without_uncertainty(fitted, tmp_path):
    model = fitted[2]
    coords = tmp_path / "q.npy"
    np.save(coords, np.array([[100.0, 120.0, 0.0], [300.0, 200.0, 40.0], [500.0, 500.0, 80.0]]))
    plain, withiv = tmp_path / "p.h5ad", tmp_path / "pu.h5ad"
    assert main(["predict", str(model), str(coords), "--out", str(plain)]) == 0
    assert main(["predict", str(model), str(coords), "--out", str(withiv), "--uncertainty"]) == 0
    a, b = ad.read_h5ad(plain), ad.read_h5ad(withiv)
    assert len(a.layers) == 0 and "uncertainty" not in a.uns["inrscrecon"]
    np.testing.assert_array_equal(a.X, b.X)
    assert set(b.layers) == {"lower_90", "upper_90"}
    lo, hi = b.layers["lower_90"], b.layers["upper_90"]
    assert lo.shape == b.X.shape and (lo >= 0).all() and (lo <= hi).all() and (hi > lo).any()
    info = b.uns["inrscrecon"]["uncertainty"]
    assert info["level"] == 0.9 and "median" in info["library_size"] and "validation" in info["dispersion"]
    # the layers are the interval at the training median library size
    m = INRField.load(model)
    exp_lo, exp_hi = unc.interval_from_prediction(np.asarray(b.X), unc.predictive(m), 0.9)
    np.testing.assert_allclose(lo, exp_lo, rtol=1e-6)
    np.testing.assert_allclose(hi, exp_hi, rtol=1e-6)
    # a wider level gives a wider interval; a level of 1 is refused
    wide = tmp_path / "pw.zarr"
    assert (
        main(["predict", str(model), str(coords), "--out", str(wide), "--uncertainty", "--level", "0.99"])
        == 0
    )
    w = ad.read_zarr(wide)
    assert (w.layers["upper_99"] >= hi).all() and (w.layers["lower_99"] <= lo).all()
    assert (
        main(
            [
                "predict",
                str(model),
                str(coords),
                "--out",
                str(tmp_path / "x.h5ad"),
                "--uncertainty",
                "--level",
                "1",
            ]
        )
        == 2
    )
    assert not (tmp_path / "x.h5ad").exists()


def test_impute_uses_each_spots_library_size(fitted, tmp_path):
    files, model = fitted[1], fitted[2]
    out = tmp_path / "i.h5ad"
    assert main(["impute", str(model), files[1], "--out", str(out), "--uncertainty", "--level", "0.8"]) == 0
    a = ad.read_h5ad(out)
    assert set(a.layers) == {"lower_80", "upper_80"}
    assert a.uns["inrscrecon"]["uncertainty"]["library_size"] == unc.SPOT_RULE
    lib = np.asarray(ad.read_h5ad(files[1]).X.sum(axis=1)).ravel()
    m = INRField.load(model)
    lo, hi = unc.interval_from_prediction(np.asarray(a.X), unc.predictive(m), 0.8, lib)
    np.testing.assert_allclose(a.layers["lower_80"], lo, rtol=1e-6)
    np.testing.assert_allclose(a.layers["upper_80"], hi, rtol=1e-6)
    plain = tmp_path / "ip.h5ad"
    assert main(["impute", str(model), files[1], "--out", str(plain)]) == 0
    b = ad.read_h5ad(plain)
    assert len(b.layers) == 0 and "uncertainty" not in b.uns["inrscrecon"]
    np.testing.assert_array_equal(a.X, b.X)


def test_spot_library_sizes(small_stack):
    sections, _ = small_stack
    lib = unc.spot_library_sizes(sections[:2])
    want = np.concatenate([np.asarray(s.X.sum(axis=1)).ravel() for s in sections[:2]])
    np.testing.assert_array_equal(lib, want)
    normalised = sections[0].copy()
    normalised.uns["X_kind"] = "normalized_expression"
    assert unc.spot_library_sizes([sections[1], normalised]) is None


def test_render_writes_interval_channels(fitted, tmp_path):
    import zarr

    model = fitted[2]
    genes = INRField.load(model).cfg.genes[:2]
    out = tmp_path / "v.ome.zarr"
    flags = ["--genes", ",".join(genes), "--shape", "3", "24", "24", "--quiet", "--no-png"]
    assert main(["render", str(model), *flags, "--out", str(out), "--uncertainty"]) == 0
    root = zarr.open_group(str(out), mode="r")
    meta = root.attrs.asdict()
    names = [c["label"] for c in meta["ome"]["omero"]["channels"]]
    assert names == [*genes, *(f"{g} lower_90" for g in genes), *(f"{g} upper_90" for g in genes)]
    assert meta["inrscrecon"]["genes"] == genes and meta["inrscrecon"]["uncertainty"]["level"] == 0.9
    img = np.asarray(root[meta["ome"]["multiscales"][0]["datasets"][0]["path"]])
    assert img.shape[0] == 6
    inside = img[0] > 0
    assert inside.any()
    assert (img[2:4][:, inside] <= img[4:6][:, inside]).all() and (img[4:6][:, inside] > 0).all()
    plain = tmp_path / "p.ome.zarr"
    assert main(["render", str(model), *flags, "--out", str(plain)]) == 0
    pm = zarr.open_group(str(plain), mode="r").attrs.asdict()
    assert len(pm["ome"]["omero"]["channels"]) == 2 and "uncertainty" not in pm["inrscrecon"]
    pimg = np.asarray(
        zarr.open_group(str(plain), mode="r")[pm["ome"]["multiscales"][0]["datasets"][0]["path"]]
    )
    np.testing.assert_array_equal(pimg, img[:2])
    assert (
        main(
            [
                "render",
                str(model),
                "--domains",
                "2",
                "--shape",
                "2",
                "8",
                "8",
                "--out",
                str(tmp_path / "d.ome.zarr"),
                "--uncertainty",
                "--quiet",
            ]
        )
        == 2
    )


def test_calibration_record_of_normalised_values_says_why(fitted):
    from types import SimpleNamespace

    m = INRField.load(fitted[2])
    table = SimpleNamespace(target_sum=0.0, totals=np.ones(5))
    rec = unc.calibration_record(m, table, np.arange(5))
    assert rec["library_size_median"] is None
    m.training_record["uncertainty"] = rec
    with pytest.raises(InputError, match="normalised values"):
        unc.predictive(m)


def test_calibration_record_caps_the_cells(fitted, small_stack):
    from inrscrecon.data.stack import build_cell_table

    m = INRField.load(fitted[2])
    sections, _ = small_stack
    genes = [g for g in m.cfg.genes if g in sections[0].var_names]
    assert len(genes) == m.cfg.n_genes  # same synthetic gene names
    table = build_cell_table(sections, genes)
    rec = unc.calibration_record(m, table, np.arange(table.n_cells), max_cells=50)
    assert rec["calibration"]["cells"] == 50
    assert rec["library_size_median"] == float(np.median(table.totals))


def test_calibration_blocks_do_not_change_the_result(fitted, small_stack, monkeypatch):
    """Gene blocks of 7 (not a divisor of 40) over CSR counts gathered 13 rows at a time give the numbers of
    one block over the dense counts: every step of the calibration is per gene."""
    from inrscrecon.data.stack import build_cell_table

    m = INRField.load(fitted[2])
    sections, _ = small_stack
    table = build_cell_table(sections, [g for g in m.cfg.genes if g in sections[0].var_names])
    rows = np.arange(0, table.n_cells, 5)
    xyz, lib, dense = table.coords[rows], table.totals[rows], table.raw_targets(rows)
    csr = unc.raw_counts_csr(table, rows, block=13)
    np.testing.assert_array_equal(csr.toarray(), dense)
    monkeypatch.setattr(unc, "GENE_BLOCK", 10_000)
    whole = unc.calibration_arrays(m, xyz, dense, lib)
    monkeypatch.setattr(unc, "GENE_BLOCK", 7)
    blocks = unc.calibration_arrays(m, xyz, csr, lib)
    for w, b in zip(whole, blocks):
        assert np.isfinite(w).all() and np.ptp(w) > 0  # a real fit, not a constant
        np.testing.assert_allclose(b, w, rtol=1e-6, atol=1e-9)


def test_model_without_record_is_refused(fitted, tmp_path, capsys):
    model = fitted[2]
    m = INRField.load(model)
    m.training_record.pop("uncertainty")
    old = tmp_path / "old.safetensors"
    m.save(old)
    coords = tmp_path / "q.npy"
    np.save(coords, np.zeros((2, 3)))
    out = tmp_path / "o.h5ad"
    assert main(["predict", str(old), str(coords), "--out", str(out), "--uncertainty"]) == 2
    assert "no uncertainty record" in capsys.readouterr().err and not out.exists()
    assert json.loads(json.dumps(m.training_record))  # the record stays JSON
