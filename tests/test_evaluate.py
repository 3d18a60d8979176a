"""Evaluation: metrics, tuned baselines, bandwidth selection, task splits, held-out-section (LOSO) choices for
the inter task, the paper protocol, report labels, the ``evaluate`` API / CLI on a tiny synthetic stack, and a
fast subsampled real-data run (skips without ../shared/data). The full run is benchmarks/eval_real.py and stays
out of CI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import require_data

from inrscrecon.data.preprocess import select_genes
from inrscrecon.data.stack import build_cell_table
from inrscrecon.errors import InputError
from inrscrecon.evaluate import baselines, evaluate, metrics, tuning
from inrscrecon.evaluate.tasks import (
    EvalConfig,
    band_splits,
    inter_splits,
    intra_splits,
    make_splits,
    prepare,
)
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LossConfig
from inrscrecon.train.fit import TrainConfig
from inrscrecon.train.select import select_encoding

TINY = EvalConfig(n_genes=30, width=32, n_layers=2, steps=8, batch_size=64, patience=3,
                  candidates=(EncodingConfig("fourier", n_bands=1), EncodingConfig("fourier", n_bands=2)))  # fmt: skip


@pytest.fixture(autouse=True)
def _short_rc_pretraining(monkeypatch):
    """The RC extractor's autoencoder pretraining (200 steps) dominates tiny fits; 5 steps suffice here."""
    import functools

    import inrscrecon.train.fit as fit_mod

    original = fit_mod.pretrain_extractor
    monkeypatch.setattr(fit_mod, "pretrain_extractor", functools.partial(original, steps=5))


# ---------------------------------------------------------------- metrics


def test_pearson_and_rmse():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    r = metrics.pearson_per_gene(2 * x + 1, x)
    np.testing.assert_allclose(r, 1.0, atol=1e-12)
    x[:, 0] = 3.0  # constant gene → NaN, ignored by the median
    assert np.isnan(metrics.pearson_per_gene(x, x)[0]) and metrics.median_pearson(x, x) == pytest.approx(1.0)
    assert metrics.rmse(x, x + 0.5) == pytest.approx(0.5)


def test_ssim_identical_and_masked():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 10, size=(400, 2))
    true = np.column_stack([np.sin(xy[:, 0]), xy[:, 1]])
    assert metrics.ssim_maps(true, true, xy, bins=None) == pytest.approx(1.0)
    noisy = true + rng.normal(scale=0.5, size=true.shape)
    assert metrics.ssim_maps(noisy, true, xy, bins=None) < 0.9
    # points only on the left half: empty bins are excluded, so a bad prediction stays bad
    half = xy[xy[:, 0] < 5]
    t = np.sin(half[:, :1])
    unmasked = metrics.ssim_maps(-t, t, half, bins=16, mask_empty=False)
    assert metrics.ssim_maps(-t, t, half, bins=16) < unmasked


def test_cluster_ari_and_constant_prediction():
    rng = np.random.default_rng(2)
    lab = np.repeat(np.array(["a", "b", "c"]), 40)
    expr = np.eye(3)[np.repeat(np.arange(3), 40)] * 5 + rng.normal(scale=0.1, size=(120, 3))
    for m in ("kmeans", "gmm"):
        assert metrics.ari(expr, lab, m) == pytest.approx(1.0)
    assert (metrics.cluster(np.ones((30, 5)), 3) == 0).all()
    lab_u = lab.astype(object)
    lab_u[:5] = "unknown"
    assert metrics.ari(expr, lab_u) == pytest.approx(1.0)


def test_project_2d_recovers_plane():
    rng = np.random.default_rng(3)
    xy = rng.normal(size=(100, 2)) * [10, 3]
    xyz = np.column_stack([xy, np.full(100, 7.0)])
    p = metrics.project_2d(xyz)
    assert p.shape == (100, 2)
    d = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)  # noqa: E731  (in-plane distances kept)
    np.testing.assert_allclose(d(p), d(xy), atol=1e-9)


# ---------------------------------------------------------------- baselines and tuning


def test_baselines_on_exact_fields():
    rng = np.random.default_rng(4)
    xyz = np.column_stack([rng.uniform(0, 100, (300, 2)), np.repeat([0.0, 10.0, 20.0], 100)])
    sec = np.repeat(["a", "b", "c"], 100)
    const = np.full((300, 3), 2.0)
    q = np.column_stack([rng.uniform(0, 100, (20, 2)), np.full(20, 5.0)])
    for pred in (baselines.knn_interpolate(xyz, const, q, 7), baselines.gaussian_smoother(xyz, const, q, 15.0),
                 baselines.linear_z(xyz, const, sec, q)):  # fmt: skip
        np.testing.assert_allclose(pred, 2.0, rtol=1e-5)
    zfield = xyz[:, 2:3].copy()  # expression = z: linear-z is exact between sections
    np.testing.assert_allclose(baselines.linear_z(xyz, zfield, sec, q, k=3), 5.0, rtol=1e-5)
    assert baselines.mean_profile(zfield, 4).shape == (4, 1)


def test_tuning_prefers_smoothing_on_noise():
    rng = np.random.default_rng(5)
    xyz = np.column_stack([rng.uniform(0, 100, (1200, 2)), np.zeros(1200)])
    expr = (np.sin(xyz[:, :1] / 30.0) + rng.normal(scale=1.0, size=(1200, 1))).astype(np.float32)
    fit_rows, val_rows = tuning.validation_split(1200, 0.1, 0)
    q = xyz[:5]
    knn = tuning.tune_knn(xyz[fit_rows], expr[fit_rows], xyz[val_rows], expr[val_rows], q)
    n_fit = len(fit_rows)  # the grid stops at the training cells: the cap itself is the last candidate
    assert set(knn.scores) == {str(k) for k in tuning.KNN_KS if k < n_fit} | {str(n_fit)}
    assert knn.params["k"] >= 20 and knn.params["at_cap"] == float(knn.params["k"] == n_fit)
    g = tuning.tune_gaussian(xyz[fit_rows], expr[fit_rows], xyz[val_rows], expr[val_rows], q)
    assert g.params["bandwidth_um"] > tuning.spacing(xyz[fit_rows])
    assert g.prediction.shape == (5, 1)


def test_dense_weighted_mean_equals_sparse():
    rng = np.random.default_rng(7)
    expr = rng.normal(size=(50, 3)).astype(np.float32)
    idx = np.stack([rng.permutation(50)[:20] for _ in range(9)])  # distinct neighbours per row
    w = rng.random((9, 20))
    sparse = baselines._weighted_mean(w, idx, expr, dense=False)
    dense = baselines._weighted_mean(w, idx, expr, dense=True, block=4)  # 4 + 4 + 1 rows
    np.testing.assert_allclose(dense, sparse, rtol=1e-6, atol=1e-7)
    manual = (w / w.sum(1, keepdims=True))[:, :, None] * expr[idx]
    np.testing.assert_allclose(sparse, manual.sum(1), rtol=1e-5, atol=1e-6)


def test_grid_edge_and_data_cap_are_told_apart():
    rng = np.random.default_rng(6)
    xyz = np.column_stack([rng.uniform(0, 100, (400, 2)), np.zeros(400)])
    q = xyz[:3]
    # pure noise, validated against the training mean: the more cells averaged the better, so the largest
    # candidate (all 300 fit cells) wins — a data cap, not a grid edge
    expr = rng.normal(scale=1.0, size=(400, 2)).astype(np.float32)
    expr[300:] = expr[:300].mean(axis=0)
    knn = tuning.tune_knn(xyz[:300], expr[:300], xyz[300:], expr[300:], q)
    assert max(int(k) for k in knn.scores) == 300 and str(640) not in knn.scores
    assert knn.params["k"] == 300 and knn.params["at_cap"] == 1.0 and knn.params["at_grid_edge"] == 0.0
    # a pure function of position: the smallest k wins, which is a grid edge
    smooth = np.sin(xyz[:, :1] / 3.0).astype(np.float32)
    knn = tuning.tune_knn(xyz[:300], smooth[:300], xyz[300:], smooth[300:], q, ks=(1, 2, 40))
    assert knn.params["k"] == 1 and knn.params["at_grid_edge"] == 1.0 and knn.params["at_cap"] == 0.0
    # a grid below the cap keeps its top as an edge
    knn = tuning.tune_knn(xyz[:300], expr[:300], xyz[300:], expr[300:], q, ks=(3, 10, 40))
    assert knn.params["k"] == 40 and knn.params["at_grid_edge"] == 1.0 and knn.params["at_cap"] == 0.0


def test_validation_split_matches_fit():
    from inrscrecon.train.fit import _split

    for n, frac, seed in ((100, 0.1, 0), (57, 0.2, 3)):
        a, b = tuning.validation_split(n, frac, seed)
        c, d = _split(n, frac, seed)
        assert (a == c).all() and (b == d).all()


# ---------------------------------------------------------------- selection


@pytest.fixture(scope="module")
def stack(small_stack):
    sections, _ = small_stack
    genes = select_genes(sections, 30)
    return sections, build_cell_table(sections, genes, label_keys=("domain",))


def test_select_encoding_picks_lowest_validation(stack):
    _, table = stack
    sub = table.subset(np.arange(0, table.n_cells, 4))
    cands = (EncodingConfig("fourier", n_bands=1), EncodingConfig("fourier", n_bands=6))
    sel = select_encoding(sub, cands, width=32, n_layers=2, loss_cfg=LossConfig.preset("rmse"),
                          train_cfg=TrainConfig(epochs=3, batch_size=64, progress=False))  # fmt: skip
    assert [c["name"] for c in sel.candidates] == ["fourier L=1", "fourier L=6"]
    assert sel.val_rmse == min(c["val_rmse"] for c in sel.candidates)
    with pytest.raises(ValueError):
        select_encoding(sub, cands, train_cfg=TrainConfig(epochs=1, val_fraction=0.0, progress=False))


# ---------------------------------------------------------------- splits


def test_splits(stack):
    _, table = stack
    lab = table.labels["domain"]
    names = table.sections()
    inter = inter_splits(table, lab, None, [0, 1])
    assert sorted({s.name for s in inter}) == sorted(names[1:-1]) and len(inter) == 2 * (len(names) - 2)
    s = inter[0]
    assert s.test.n_cells == int((table.section == s.name).sum()) and s.name not in set(s.train.section)
    intra = intra_splits(table, lab, [names[1]], [0])[0]
    n = int((table.section == names[1]).sum())
    assert intra.test.n_cells == round(n / 2) and intra.train.n_cells == n - round(n / 2)
    assert not set(intra.test.obs_names) & set(intra.train.obs_names)
    nb = intra_splits(table, lab, [names[1]], [0], neighbours=True)[0]
    assert (
        set(nb.train.section) == {names[0], names[1], names[2]}
        and (nb.test.obs_names == intra.test.obs_names).all()
    )
    other = intra_splits(table, lab, [names[1]], [1])[0]
    assert not (other.test.obs_names == intra.test.obs_names).all()  # seeded
    band = band_splits(table, lab, (0.4, 0.6), [0])[0]
    assert 0 < band.test.n_cells < table.n_cells
    with pytest.raises(InputError, match="unknown holdout"):
        inter_splits(table, lab, ["nope"], [0])
    with pytest.raises(InputError, match="z-band"):
        band_splits(table, lab, (0.6, 0.4), [0])


def test_prepare_errors(stack):
    sections, _ = stack
    with pytest.raises(InputError, match="no labels at obs"):
        prepare(sections, label_key="missing", cfg=TINY)
    prep = prepare(sections, cfg=replace(TINY, max_cells=100, n_domains=3))
    assert prep.table.n_cells == 400 and set(np.unique(prep.labels)) == {"0", "1", "2"}
    with pytest.raises(InputError, match="unknown task"):
        make_splits("bogus", prep, None, [0], TINY)


# ---------------------------------------------------------------- API and CLI


def test_evaluate_end_to_end(stack, tmp_path):
    sections, _ = stack
    cfg = replace(TINY, max_cells=100, intra_settings=("alone", "neighbours"))
    res = evaluate(
        sections, "intra", label_key="domain", holdout=["section_01"], seeds=1, out=tmp_path, cfg=cfg
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"intra", "intra_neighbours"} and results == res.results
    methods = results["intra_neighbours"]
    assert {
        "inr",
        "inr_no_rc",
        "inr_rmse",
        "gaussian",
        "knn",
        "linear_z",
        "mean_profile",
        "true_expression",
    } <= set(methods)
    assert "linear_z" not in results["intra"]  # one training section
    for m in ("ari", "ari_gmm", "ssim", "pearson", "rmse"):
        cell = methods["inr"][m]
        assert set(cell) == {"mean", "sd"} and np.isfinite(cell["mean"])
    md = (tmp_path / "results.md").read_text()
    assert "| INR, paper loss (RMSE + RC + KL) |" in md and "| INR, RMSE loss (fit default) |" in md
    assert "| inr |" not in md and md.count("(fit default)") == 2  # one row per task marks fit's default
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 4 and all(p.stat().st_size < 300_000 for p in pngs)
    details = json.loads((tmp_path / "details.json").read_text())
    assert details[0]["chosen"]["inr_selection"]["encoding"] in ("fourier L=1", "fourier L=2")
    assert details[0]["chosen"]["selection"]["mode"] == "spots"  # intra: random validation spots
    knn = details[0]["chosen"]["knn"]
    assert knn["params"]["k"] in tuning.KNN_KS or knn["params"]["at_cap"] == 1.0


def test_method_labels_name_the_loss_and_mark_fits_default():
    from inrscrecon.evaluate.inr import INR_METHODS
    from inrscrecon.evaluate.report import METHOD_LABELS, fit_default_method, markdown_table, method_label
    from inrscrecon.field.losses import LossConfig

    default = fit_default_method()
    assert default == "inr_rmse" and INR_METHODS[default].loss_config() == LossConfig()
    assert method_label(default).endswith("(fit default)")
    assert [m for m in METHOD_LABELS if method_label(m).endswith("(fit default)")] == [default]
    cell = {"mean": 0.5, "sd": 0.1}
    table = markdown_table({"inter": {"inr": {"pearson": cell}, "inr_rmse": {"pearson": cell}}})
    assert "| INR, paper loss (RMSE + RC + KL) | " in table and "| inr |" not in table
    assert set(INR_METHODS) <= set(METHOD_LABELS)  # every method key has a readable label


def test_report_renders_readable_names_from_saved_json(tmp_path):
    """results.md is rebuilt from results.json + run.json with labels and task titles; the JSON stay as
    they were (keys kept)."""
    from inrscrecon.evaluate.report import render_markdown, task_title, write_results

    cell = {"mean": 0.3, "sd": 0.01}
    results = {
        "inter_dlpfc": {m: {"pearson": cell, "ari": cell} for m in ("inr_nb", "inr_rmse", "gaussian")},
        "intra_paper_dlpfc": {"inr_rmse": {"ari_gmm": cell}, "true_expression": {"ari_gmm": cell}},
    }
    meta = {"command": "x", "machine": "m", "date": "d", "wall_s": 1.0, "notes": "\nNOTES"}
    write_results(tmp_path, results, [], meta, reported={"intra_paper_dlpfc": {"paper": (0.65, 0.7)}})
    before = {p: (tmp_path / p).read_text() for p in ("results.json", "run.json")}
    (tmp_path / "results.md").write_text("| inr_nb | stale |")
    md = render_markdown(tmp_path).read_text()
    assert {p: (tmp_path / p).read_text() for p in before} == before
    assert "### Inter-slice prediction (held-out section) — DLPFC (`inter_dlpfc`)" in md
    assert "paper protocol (scored on the complete section) — DLPFC" in md
    assert "| INR, negative-binomial count loss |" in md and "| inr_nb |" not in md
    assert "| Gaussian-kernel smoother (tuned bandwidth) |" in md and "0.65 (reported)" in md
    assert md.rstrip().endswith("NOTES") and "stale" not in md
    assert task_title("inter") == "Inter-slice prediction (held-out section)" and task_title("zzz") == "zzz"


def test_evaluate_3d_and_inter(stack):
    sections, _ = stack
    cfg = replace(TINY, max_cells=100, ablations=("inr_rmse",))
    res = evaluate(sections, "3d", seeds=[0], cfg=cfg)
    assert "inr_rmse" in res.results["3d"] and "inr" not in res.results["3d"]
    res = evaluate(sections, "inter", label_key="domain", holdout=["section_02"], seeds=1, cfg=cfg)
    assert res.results["inter"]["linear_z"]["pearson"]["mean"] is not None


def test_cli_evaluate(tmp_path, stack):
    from inrscrecon.cli import main
    from inrscrecon.data.io import write_h5ad

    sections, _ = stack
    paths = []
    for s in sections[:3]:
        a = s.copy()
        del a.obsm["spatial_3d"]  # not aligned: evaluate aligns them first
        paths.append(str(write_h5ad(a, tmp_path / f"{a.uns['section']}.h5ad")))
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--help"])
    assert e.value.code == 0
    out = tmp_path / "res"
    assert main(["evaluate", "--task", "inter", *paths, "--label-key", "nope", "--out", str(out)]) == 2
    assert main(["evaluate", "--task", "inter", *paths, "--holdout", "zzz", "--out", str(out)]) == 2
    assert not (out / "results.json").exists()
    argv = ["evaluate", "--task", "inter", *paths, "--label-key", "domain", "--seeds", "1", "--genes", "20",
            "--steps", "10", "--width", "16", "--layers", "1", "--bands", "1", "--ablations", "inr_rmse",
            "--max-cells", "120", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["inter"]) >= {"inr_rmse", "knn", "gaussian", "linear_z", "mean_profile"}
    run = json.loads((out / "run.json").read_text())
    assert run["alignment"]["aligned"] is True


# ---------------------------------------------------------------- real data (fast subset)


@pytest.mark.realdata
def test_real_dlpfc_fast(tmp_path):
    data = require_data("dlpfc_151673.h5ad", "dlpfc_151674.h5ad")
    cfg = replace(TINY, n_genes=50, max_cells=250, intra_settings=("alone",), ablations=("inr_rmse",))
    res = evaluate([data / "dlpfc_151673.h5ad", data / "dlpfc_151674.h5ad"], "intra", label_key="layer",
                   holdout=["151673"], seeds=1, out=tmp_path, cfg=cfg, figures=False)  # fmt: skip
    m = res.results["intra"]
    assert m["gaussian"]["pearson"]["mean"] > 0.05 and m["mean_profile"]["pearson"]["mean"] == 0.0
    assert -0.1 < m["true_expression"]["ari"]["mean"] < 1.0
    assert (tmp_path / "results.json").exists()


# ---------------------------------------------------------------- held-out-section choices (inter)


def test_fold_table_makes_fit_validate_on_the_section(stack):
    from inrscrecon.evaluate.inr import fold_table, interior_sections

    _, table = stack
    names = sorted(table.sections())
    assert interior_sections(table) == names[1:-1]
    ft, frac = fold_table(table, names[2], seed=5)
    _, val_rows = tuning.validation_split(ft.n_cells, frac, 5)
    assert set(ft.section[val_rows]) == {names[2]} and len(val_rows) == int((table.section == names[2]).sum())
    assert sorted(ft.obs_names) == sorted(table.obs_names)  # a reordering, nothing lost


def test_loso_choice_and_refit(stack):
    """Inter: candidates scored on held-out interior training sections; the lowest mean wins; the final model
    is refitted on every training cell for the chosen number of steps."""
    from inrscrecon.evaluate.inr import INR_METHODS, candidates, choose_and_fit, steps_per_epoch
    from inrscrecon.evaluate.tasks import train_config

    _, table = stack
    names = sorted(table.sections())
    tr = table.subset(table.section != names[1])  # training sections 0, 2, 3 → interior fold: 2
    cfg = replace(TINY, steps=30)
    cands = candidates(INR_METHODS["inr_rmse"], cfg.candidates, None)
    got = choose_and_fit(
        tr, INR_METHODS["inr_rmse"], cands, 16, 1, lambda n: train_config(cfg, n, 0), [names[2]]
    )
    rec = got.record
    assert rec["selection"] == "sections" and rec["folds"] == [names[2]]
    assert [c["name"] for c in rec["candidates"]] == ["fourier L=1", "fourier L=2"]
    best = min(rec["candidates"], key=lambda c: c["val_rmse"])
    assert rec["chosen"] == best["name"] and rec["val_rmse"] == best["val_rmse"]
    per = steps_per_epoch(tr.n_cells, cfg.batch_size)
    assert rec["refit_epochs"] == max(1, -(-best["best_steps"][0] // per))
    assert len(got.result.history) == rec["refit_epochs"]  # no early stop, no cells held back
    assert got.result.model.training_record["run"]["settings"]["val_fraction"] == 0.0


def test_loso_baselines_use_fold_means_then_all_cells():
    rng = np.random.default_rng(7)
    z = np.repeat([0.0, 10.0, 20.0, 30.0], 150)
    xyz = np.column_stack([rng.uniform(0, 100, (600, 2)), z])
    sec = np.repeat(["a", "b", "c", "d"], 150)
    expr = (np.sin(xyz[:, :1] / 20) + z[:, None] / 30 + rng.normal(0, 0.3, (600, 1))).astype(np.float32)
    q = np.column_stack([rng.uniform(0, 100, (30, 2)), np.full(30, 15.0)])
    out = tuning.tuned_baselines_sections(xyz, expr, sec, ["b", "c"], q)
    assert set(out) == {"mean_profile", "knn", "gaussian", "gaussian_pca", "linear_z"}
    fits = [sec != h for h in ("b", "c")]
    per_fold = [tuning.tune_knn(xyz[f], expr[f], xyz[~f], expr[~f], q[:1]).scores for f in fits]
    mean = {k: np.mean([s[k] for s in per_fold]) for k in per_fold[0]}
    k = min(mean, key=mean.get)
    assert out["knn"].params["k"] == float(k)
    np.testing.assert_allclose(
        out["knn"].prediction, baselines.knn_interpolate(xyz, expr, q, int(k)), rtol=1e-6
    )
    # linear in z between sections: linear-z with the right k beats the mean profile on the held-out folds
    assert out["linear_z"].val_rmse < out["mean_profile"].val_rmse


def _low_rank_field(n: int, g: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells [n, 3] on two z levels and expression [n, g]: 2 smooth spatial factors × loadings + noise."""
    rng = np.random.default_rng(seed)
    xyz = np.column_stack([rng.uniform(0, 100, (n, 2)), np.repeat([0.0, 10.0], n // 2)])
    factors = np.column_stack([np.sin(xyz[:, 0] / 15), np.cos(xyz[:, 1] / 20)])
    expr = factors @ rng.normal(size=(2, g)) + rng.normal(0, 0.8, (n, g))
    return xyz, expr.astype(np.float32)


def test_pca_projection_is_the_explicit_formula_and_full_rank_is_identity():
    rng = np.random.default_rng(8)
    y = rng.normal(size=(60, 7)) @ rng.normal(size=(7, 7))
    pred = rng.normal(size=(5, 7)).astype(np.float32)
    mean, axes = baselines.pca_axes(y, 3)
    mu = y.mean(axis=0)
    _, _, vt = np.linalg.svd(y - mu, full_matrices=False)
    v = vt[:3].T  # the top-3 principal axes; V Vᵀ does not depend on their signs
    np.testing.assert_allclose(mean, mu, atol=1e-12)
    np.testing.assert_allclose(axes @ axes.T, v @ v.T, atol=1e-10)
    explicit = mu + (pred - mu) @ v @ v.T
    np.testing.assert_allclose(baselines.pca_project(pred, mean, axes), explicit, rtol=1e-5, atol=1e-5)
    full_mean, full = baselines.pca_axes(y, 100)  # r capped at min(N, G) = 7: a full basis
    assert full.shape == (7, 7)
    np.testing.assert_allclose(baselines.pca_project(pred, full_mean, full), pred, rtol=1e-5, atol=1e-5)


def test_gaussian_pca_chooses_r_on_the_validation_cells():
    xyz, expr = _low_rank_field(1000, 12, 9)
    fit, val = tuning.validation_split(1000, 0.1, 0)
    q = xyz[:40] + np.array([1.0, 1.0, 0.0])
    out = tuning.tuned_baselines(xyz[fit], expr[fit], np.zeros(len(fit)), xyz[val], expr[val], q)
    g, gp = out["gaussian"], out["gaussian_pca"]
    h, kb = g.params["bandwidth_um"], int(g.params["k"])
    val_pred = baselines.gaussian_smoother(xyz[fit], expr[fit], xyz[val], h, kb)
    mean, axes = baselines.pca_axes(expr[fit], 64)  # capped at the 12 genes
    manual = {str(min(r, 12)): metrics.rmse(baselines.pca_project(val_pred, mean, axes[:, : min(r, 12)]),
                                            expr[val]) for r in tuning.PCA_RANKS}  # fmt: skip
    assert set(gp.scores) == set(manual) == {"4", "8", "12"}
    for r, v in manual.items():
        assert gp.scores[r] == pytest.approx(v, rel=1e-6)
    best = min(manual, key=manual.get)
    assert best == "4"  # two spatial factors: the fewest axes remove most noise
    assert gp.params["rank"] == 4.0 and gp.params["bandwidth_um"] == h
    assert gp.val_rmse < g.val_rmse  # the projection helps on these validation cells
    np.testing.assert_allclose(
        gp.prediction, baselines.pca_project(g.prediction, mean, axes[:, :4]), rtol=1e-5, atol=1e-6
    )
    # the choice reads the validation cells only: other query points give the same r, and r = every gene
    # (a full basis) gives the smoother's prediction back
    other = tuning.tuned_baselines(
        xyz[fit], expr[fit], np.zeros(len(fit)), xyz[val], expr[val], q[::-1] * 0.5
    )
    assert other["gaussian_pca"].params["rank"] == gp.params["rank"]
    assert other["gaussian_pca"].scores == gp.scores
    full = tuning.tune_gaussian_pca(g, xyz[fit], expr[fit], xyz[val], expr[val], ranks=(12,))
    np.testing.assert_allclose(full.prediction, g.prediction, rtol=1e-5, atol=1e-5)


def test_gaussian_pca_on_held_out_sections_uses_fold_means():
    xyz, expr = _low_rank_field(600, 10, 10)
    xyz[:, 2] = np.repeat([0.0, 10.0, 20.0, 30.0], 150)
    sec = np.repeat(["a", "b", "c", "d"], 150)
    q = np.column_stack([np.linspace(5, 95, 25), np.linspace(5, 95, 25), np.full(25, 15.0)])
    out = tuning.tuned_baselines_sections(xyz, expr, sec, ["b", "c"], q)
    f = out["gaussian"].params["factor"]
    runs = []
    for held in ("b", "c"):
        fit = sec != held
        s = tuning.spacing(xyz[fit])
        k = min(int(fit.sum()), baselines.smoother_k(f * s, s, 2))
        pred = baselines.gaussian_smoother(xyz[fit], expr[fit], xyz[~fit], f * s, k)
        runs.append(tuning.projection_scores(pred, expr[~fit], expr[fit]))
    mean = {r: np.mean([run[r] for run in runs]) for r in runs[0]}
    r = int(min(mean, key=mean.get))
    gp = out["gaussian_pca"]
    assert gp.params["rank"] == float(r) and gp.scores == pytest.approx(mean)
    mu, axes = baselines.pca_axes(expr, r)  # the final projection: PCA of every training cell
    np.testing.assert_allclose(
        gp.prediction, baselines.pca_project(out["gaussian"].prediction, mu, axes), rtol=1e-5, atol=1e-6
    )


def test_inter_split_chooses_on_training_sections_only(stack):
    from inrscrecon.evaluate.tasks import run_split

    _, table = stack
    names = sorted(table.sections())
    lab = table.labels["domain"]
    split = inter_splits(table, lab, [names[1]], [0])[0]
    cfg = replace(TINY, steps=10, ablations=("inr_rmse",), candidates=(EncodingConfig("fourier", n_bands=1),))
    res = run_split(split, cfg)
    assert res.chosen["selection"] == {"mode": "sections", "folds": [names[2]]}
    assert names[1] not in res.chosen["selection"]["folds"]
    assert res.chosen["gaussian"]["params"]["factor"] in tuning.BANDWIDTH_FACTORS
    assert np.isfinite(res.metrics["inr_rmse"]["pearson"])
    # with spots selection the old protocol is kept
    res2 = run_split(split, replace(cfg, inter_selection="spots"))
    assert res2.chosen["selection"]["mode"] == "spots"


# ---------------------------------------------------------------- paper protocol


def test_cli_paper_protocol(tmp_path, stack):
    from inrscrecon.cli import main
    from inrscrecon.data.io import write_h5ad

    sections, _ = stack
    path = str(write_h5ad(sections[0].copy(), tmp_path / "one.h5ad"))
    out = tmp_path / "paper"
    assert main(["evaluate", "--task", "inter", path, "--protocol", "paper", "--out", str(out)]) == 2
    argv = ["evaluate", "--task", "intra", path, "--protocol", "paper", "--label-key", "domain", "--seeds", "1",
            "--genes", "40", "--steps", "10", "--width", "16", "--layers", "1", "--bands", "1",
            "--ablations", "inr_rmse", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"intra_paper"}
    assert {"ari", "ari_gmm"} <= set(results["intra_paper"]["inr_rmse"])
    details = json.loads((out / "details.json").read_text())
    n_section = sections[0].n_obs
    assert details[0]["n_test"] == n_section and details[0]["n_train"] == n_section // 2  # scored on all
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert cfg["protocol"] == "paper" and cfg["n_pcs"] == 30 and cfg["n_genes"] == 40
    assert "paper protocol" in (out / "results.md").read_text()


def test_predictive_log1p_mean_matches_sampling():
    from inrscrecon.evaluate.inr import predictive_log1p_mean

    rng = np.random.default_rng(11)
    rate = np.array([[0.5, 20.0, 300.0], [5.0, 0.0, 80.0]])  # per 1e4 counts
    pred = np.log1p(rate)
    lib = 2000.0
    mu = lib / 1e4 * rate
    log_theta = np.log([0.5, 2.0, 10.0])
    for lt in (None, log_theta):
        got = predictive_log1p_mean(pred, lib, lt)
        if lt is None:
            y = rng.poisson(mu[..., None], size=(*mu.shape, 200_000))
        else:
            th = np.exp(lt)[None, :, None]
            y = rng.negative_binomial(th, th / (th + mu[..., None]), size=(*mu.shape, 200_000))
        want = np.log1p(y * 1e4 / lib).mean(axis=-1)
        np.testing.assert_allclose(got, want, atol=0.01)
        assert (got <= pred + 1e-6).all() and abs(got[1, 1]) < 1e-9  # Jensen: below the plug-in value
    big = np.log1p(np.array([[5000.0]]))  # μ = 1000 counts: e^{-μ} underflows, the sum must not
    want = np.log1p(rng.poisson(1000.0, 200_000) * 1e4 / lib).mean()
    np.testing.assert_allclose(predictive_log1p_mean(big, lib), [[want]], rtol=1e-4)


def test_prepare_gene_selection_and_protocol_errors(stack):
    sections, _ = stack
    prep = prepare(sections, cfg=replace(TINY, gene_selection="batch", max_cells=50))
    assert prep.genes == select_genes(sections, TINY.n_genes, method="batch")
    assert prep.genes != select_genes(sections, TINY.n_genes)  # the rules differ on this stack
    with pytest.raises(InputError, match="protocol paper"):
        make_splits("inter", prep, None, [0], replace(TINY, protocol="paper"))
    with pytest.raises(InputError, match="unknown protocol"):
        make_splits("intra", prep, None, [0], replace(TINY, protocol="theirs"))
    paper = make_splits("intra", prep, ["section_01"], [0], replace(TINY, protocol="paper"))
    assert [s.task for s in paper] == ["intra_paper"] and paper[0].test.n_cells == 50


# ---------------------------------------------------------------- merging part files


def _part_record(part: str, metrics: dict, chosen: dict, **extra) -> dict:
    detail = {"task": "inter", "holdout": "layer2", "seed": 0, "n_train": 10, "n_test": 5,
              "metrics": metrics, "chosen": chosen}  # fmt: skip
    return {"part": part, "results": {}, "details": [detail], "wall_s": 1.0, "task_compute_s": {"inter_breast": 1.0},
            "labels": "x", "n_genes": 3, "n_cells": 15, "alignment": {}, "figures": [], **extra}  # fmt: skip


def test_merge_prefers_rerun_rows(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "eval_real", Path(__file__).parents[1] / "benchmarks" / "eval_real.py"
    )
    eval_real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_real)
    row = lambda p: {"pearson": p, "rmse": 1.0, "ari": 0.1, "ari_gmm": 0.1, "ssim": 0.5}  # noqa: E731
    parts = tmp_path / "parts"
    parts.mkdir()
    base = _part_record(
        "inter_breast", {"inr_rmse": row(0.2), "knn": row(0.1)}, {"knn": {"params": {"k": 320.0}}}
    )
    rerun = _part_record("inter_breast", {"knn": row(0.3), "inr": row(0.15)}, {"knn": {"params": {"k": 640.0}}},
                         rerun=True)  # fmt: skip
    (parts / "inter_breast.json").write_text(json.dumps(base))
    # sorted after the base file, but its rows replace the base file's for the methods it holds
    (parts / "inter_breast.grid.rerun.json").write_text(json.dumps(rerun))
    eval_real.merge(tmp_path, "cmd", EvalConfig())
    res = json.loads((tmp_path / "results.json").read_text())["inter_breast"]
    assert res["knn"]["pearson"]["mean"] == 0.3 and res["inr"]["pearson"]["mean"] == 0.15
    assert res["inr_rmse"]["pearson"]["mean"] == 0.2  # kept from the earlier part
    (d,) = json.loads((tmp_path / "details.json").read_text())
    assert d["rerun"] == ["inr", "knn"] and d["chosen"]["knn"]["params"]["k"] == 640.0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["parts"]["inter_breast.grid.rerun"]["rerun"] and "rerun" in run["merge_rule"]
