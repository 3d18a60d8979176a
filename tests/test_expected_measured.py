"""Count models predict what is measured: the expected log1p-normalised value under the predictive
distribution (against Monte Carlo and a float64 brute-force sum), the library-size head (learns a spatial
library-size gradient, trains on detached features, round-trips in the model file, old files still load)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

from inrscrecon.data.stack import CellTable
from inrscrecon.errors import InputError
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.expectation import expected_log1p, expected_log1p_counts
from inrscrecon.field.losses import LossConfig
from inrscrecon.field.model import FieldConfig, INRField
from inrscrecon.train.fit import TrainConfig, fit
from inrscrecon.train.objective import objective_tensors


def _brute(eta: np.ndarray, lib: np.ndarray, log_theta: np.ndarray | None, k: int) -> np.ndarray:
    """float64 Σ_{y<k} p(y) log1p(1e4 y / L) with scipy's pmf."""
    mu = lib[:, None] / 1e4 * np.exp(eta)
    y = np.arange(k)
    out = np.zeros_like(mu)
    for i in range(mu.shape[0]):
        for j in range(mu.shape[1]):
            if log_theta is None:
                p = stats.poisson.pmf(y, mu[i, j])
            else:
                th = math.exp(log_theta[j])
                p = stats.nbinom.pmf(y, th, th / (th + mu[i, j]))
            assert 1 - p.sum() < 1e-12  # k is large enough for this reference
            out[i, j] = (p * np.log1p(y * 1e4 / lib[i])).sum()
    return out


@pytest.mark.parametrize("nb", [False, True])
def test_expected_log1p_matches_brute_force_sum(nb):
    rng = np.random.default_rng(0)
    eta = rng.normal(0.5, 1.5, size=(7, 13))  # rates e^η per 1e4: ~0.05 … ~150
    lib = np.exp(rng.normal(8.0, 0.6, size=7))  # L ~ 1000 … 10000 counts: μ up to ~300
    lt = rng.normal(0.5, 1.0, size=13) if nb else None  # θ from ~0.2 to ~20 (heavy NB tails included)
    got = expected_log1p_counts(
        torch.tensor(eta, dtype=torch.float32),
        torch.log(torch.tensor(lib, dtype=torch.float32)),
        None if lt is None else torch.tensor(lt, dtype=torch.float32),
    )
    assert got.dtype == torch.float32 and got.shape == (7, 13)
    ref = _brute(eta, lib, lt, 200_000 if nb else 5000)
    np.testing.assert_allclose(got.numpy(), ref, atol=2e-4, rtol=2e-5)
    # the Jensen gap: strictly below the plug-in log1p(E[normalised value]) = log1p(e^η)
    assert (got.numpy() < np.log1p(np.exp(eta))).all()


@pytest.mark.parametrize("nb", [False, True])
def test_expected_log1p_matches_monte_carlo(nb):
    g = torch.Generator().manual_seed(1)
    eta = torch.tensor([[-2.0, 0.0, 1.0, 3.0], [0.5, 2.0, -1.0, 4.0]])
    log_lib = torch.log(torch.tensor([1500.0, 6000.0]))
    lt = torch.tensor([0.0, 1.0, -0.5, 2.0]) if nb else None
    got = expected_log1p_counts(eta, log_lib, lt)
    mu = torch.exp(eta + log_lib[:, None] - math.log(1e4)).double()
    n = 200_000
    if nb:  # NB as a gamma-Poisson mixture
        th = torch.exp(lt).double()
        lam = torch._standard_gamma(th.expand(n, 2, 4).contiguous(), generator=g) * (mu / th)
    else:
        lam = mu.expand(n, 2, 4)
    y = torch.poisson(lam, generator=g)
    mc = torch.log1p(1e4 * y / torch.exp(log_lib.double())[None, :, None])
    se = mc.std(dim=0) / math.sqrt(n)
    assert ((got.double() - mc.mean(dim=0)).abs() <= 4 * se + 1e-6).all()


def test_tail_bound_extends_past_the_quantile_for_heavy_nb():
    # θ = 0.2, μ ≈ 1300: the mass beyond μ + 8σ is far above 1e-6; the geometric tail bound keeps summing
    eta, log_lib, lt = torch.tensor([[8.0]]), torch.tensor([math.log(4000.0)]), torch.tensor([math.log(0.2)])
    got = float(expected_log1p_counts(eta, log_lib, lt)[0, 0])
    mu, th = 4000.0 / 1e4 * math.exp(8.0), 0.2
    y = np.arange(400_000)
    p = stats.nbinom.pmf(y, th, th / (th + mu))
    assert 1 - p.sum() < 1e-10
    assert got == pytest.approx(float((p * np.log1p(y * 1e4 / 4000.0)).sum()), abs=5e-4)


def _gradient_table(n_side: int = 24, n_genes: int = 6) -> CellTable:
    """Two sections on a square; library size grows along x (log L from log 500 to log 8000); Poisson counts
    of genes with smooth spatial rate patterns."""
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.linspace(0, 1000, n_side), np.linspace(0, 1000, n_side))
    xy = np.column_stack([xs.ravel(), ys.ravel()])
    coords = np.vstack([np.column_stack([xy, np.full(len(xy), z)]) for z in (0.0, 20.0)])
    log_l = math.log(500.0) + (coords[:, 0] / 1000.0) * math.log(16.0)
    u, v = coords[:, 0] / 1000.0, coords[:, 1] / 1000.0
    # gene-wise rates per 1e4 counts, half varying along x, half along y (not with the library size)
    pattern = np.column_stack([np.sin(3 * u + k) if k % 2 else np.cos(3 * v + k) for k in range(n_genes)])
    rates = np.linspace(5.0, 200.0, n_genes)[None, :] * np.exp(pattern)
    counts = rng.poisson(np.exp(log_l)[:, None] / 1e4 * rates).astype(np.float32)
    # the other (unmodelled) genes make up the rest of the library size
    totals = np.exp(log_l).astype(np.float64)
    section = np.repeat(np.array(["s0", "s1"]), len(xy))
    return CellTable(
        coords.astype(np.float64),
        sp.csr_matrix(counts),
        totals,
        [f"g{k}" for k in range(n_genes)],
        section,
        np.array([f"c{k}" for k in range(len(coords))]),
    )


@pytest.fixture(scope="module")
def gradient_fit():
    table = _gradient_table()
    tc = TrainConfig(
        epochs=30, batch_size=128, lr=5e-3, progress=False, seed=0, val_fraction=0.1, patience=50
    )
    res = fit(table, EncodingConfig(n_bands=2), 32, 2, LossConfig(likelihood="poisson"), tc)
    return table, res.model


def test_library_head_learns_a_spatial_library_gradient(gradient_fit):
    table, model = gradient_fit
    assert model.cfg.library_head and model.library_head is not None
    with torch.no_grad():
        hidden = model.hidden(model.normalize(torch.as_tensor(table.coords)))
        pred = model.log_library(hidden).numpy()
    truth = np.log(table.totals)
    const = np.sqrt(np.mean((truth - truth.mean()) ** 2))  # error of a constant (the mean) library
    err = np.sqrt(np.mean((pred - truth) ** 2))
    assert err < 0.35 * const, (err, const)
    assert np.corrcoef(pred, table.coords[:, 0])[0, 1] > 0.9


def test_expected_log1p_of_a_fitted_model_follows_its_library_field(gradient_fit):
    table, model = gradient_fit
    pts = np.array([[50.0, 500.0, 0.0], [950.0, 300.0, 20.0]])
    with torch.no_grad():
        h = model.hidden(model.normalize(torch.as_tensor(pts)))
        eta = torch.nn.functional.linear(h, model.head.weight, model.head.bias)
        lib_field = torch.exp(model.log_library(h))
    # without a library: the library field's L(x), i.e. the same as passing exp(log L(x))
    torch.testing.assert_close(expected_log1p(model, pts), expected_log1p(model, pts, lib_field.numpy()))
    torch.testing.assert_close(expected_log1p(model, pts), expected_log1p_counts(eta, torch.log(lib_field)))
    # the same rate measured with 16× the library: fewer zeros, smaller Jensen gap, still below the plug-in
    # a gene subset computes those head rows only, with the same values
    sub = expected_log1p(model, pts, gene_idx=np.array([4, 1]))
    torch.testing.assert_close(sub, expected_log1p(model, pts)[:, [4, 1]])
    small = expected_log1p(model, pts, np.full(2, 500.0))
    big = expected_log1p(model, pts, np.full(2, 8000.0))
    plug = torch.nn.functional.softplus(eta)
    assert (small < big).all() and (big < plug).all()
    # measured: the mean log1p-normalised value of the gene on the right edge's cells
    right = table.coords[:, 0] > 900
    measured = table.targets(np.flatnonzero(right)).mean(axis=0)
    on_right = expected_log1p(model, table.coords[right]).mean(dim=0).numpy()
    plug_in = model(model.normalize(torch.as_tensor(table.coords[right]))).mean(dim=0).detach().numpy()
    assert np.abs(on_right - measured).mean() < np.abs(plug_in - measured).mean()


def test_detached_library_head_leaves_the_gene_field_gradient_unchanged():
    torch.manual_seed(0)
    cfg = FieldConfig(9, EncodingConfig(n_bands=2), 16, 2, likelihood="nb")
    plain = INRField(cfg)
    with_head = INRField(FieldConfig(**{**cfg.__dict__, "library_head": True, "library_mean": 7.0}))
    with_head.load_state_dict({**with_head.state_dict(), **plain.state_dict()})
    coords = torch.rand(20, 3) * 2 - 1
    counts = torch.poisson(torch.full((20, 9), 3.0))
    off = torch.log(torch.rand(20) + 0.2)
    grads = []
    for m in (plain, with_head):
        m.zero_grad()
        loss, _ = objective_tensors(m, coords, counts, LossConfig(likelihood="nb"), log_offset=off)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if not n.startswith("library_head")})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=0, atol=0)
    assert with_head.library_head.weight.grad.abs().sum() > 0
    # not detached: the library term reaches the trunk
    attached = INRField(FieldConfig(**{**with_head.cfg.__dict__, "library_detach": False}))
    attached.load_state_dict(with_head.state_dict())
    loss, _ = objective_tensors(attached, coords, counts, LossConfig(likelihood="nb"), log_offset=off)
    loss.backward()
    trunk = next(n for n in grads[0] if n.startswith("trunk"))
    assert not torch.equal(dict(attached.named_parameters())[trunk].grad, grads[0][trunk])


def test_model_round_trip_with_library_head(gradient_fit, tmp_path):
    _, model = gradient_fit
    path = tmp_path / "m.safetensors"
    model.save(path)
    back = INRField.load(path)
    assert back.cfg == model.cfg and back.library_head is not None
    xyz = np.array([[100.0, 200.0, 0.0], [800.0, 700.0, 20.0]])
    torch.testing.assert_close(expected_log1p(back, xyz), expected_log1p(model, xyz))


def test_format3_file_without_library_head_loads_and_needs_a_library(tmp_path):
    from safetensors.torch import load_file, save_file

    m = INRField(FieldConfig(5, EncodingConfig(n_bands=1), 8, 1, likelihood="poisson"))
    path = tmp_path / "old.safetensors"
    m.save(path)
    # what an older writer produced: no library_* keys in the config
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    import json

    cfg = json.loads(meta["config"])
    for k in ("library_head", "library_mean", "library_sd", "library_detach"):
        cfg.pop(k)
    save_file(load_file(str(path)), str(path), metadata={**meta, "config": json.dumps(cfg)})
    old = INRField.load(path)
    assert old.library_head is None
    with pytest.raises(InputError, match="no library-size head"):
        expected_log1p(old, np.zeros((2, 3)))
    assert expected_log1p(old, np.zeros((2, 3)), np.array([1000.0, 3000.0])).shape == (2, 5)


def test_schema_rejects_a_library_head_of_the_wrong_shape(gradient_fit, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, model = gradient_fit
    path = tmp_path / "m.safetensors"
    model.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["library_head.weight"] = torch.zeros(1, 7)
    save_file(state, str(path), metadata=meta)
    with pytest.raises(InputError, match="library_head.weight"):
        INRField.load(path)
    state.pop("library_head.weight")
    save_file(state, str(path), metadata=meta)
    with pytest.raises(InputError, match="lacks tensor 'library_head.weight'"):
        INRField.load(path)


def test_expected_log1p_rejects_bad_input(gradient_fit):
    _, model = gradient_fit
    with pytest.raises(InputError, match="library sizes must be finite and > 0"):
        expected_log1p(model, np.zeros((2, 3)), np.array([1000.0, 0.0]))
    with pytest.raises(InputError, match="shape"):
        expected_log1p(model, np.zeros((2, 2)))
    with pytest.raises(InputError, match="2 values for 3 points"):
        expected_log1p(model, np.zeros((3, 3)), np.array([1.0, 2.0]))
    with pytest.raises(InputError, match="gene_idx outside"):
        expected_log1p(model, np.zeros((1, 3)), gene_idx=np.array([99]))
    rmse_model = INRField(FieldConfig(3, EncodingConfig(n_bands=1), 8, 1))
    with pytest.raises(InputError, match="needs a count model"):
        expected_log1p(rmse_model, np.zeros((1, 3)))


def test_fit_with_detached_library_head_trains_the_same_gene_field(monkeypatch):
    import inrscrecon.train.fit as fit_mod

    table = _gradient_table(n_side=10, n_genes=4)
    tc = TrainConfig(epochs=3, batch_size=32, progress=False, seed=2, val_fraction=0.1, patience=50)
    args = (table, EncodingConfig(n_bands=2), 16, 2, LossConfig(likelihood="nb"), tc)
    with_head = fit(*args).model
    monkeypatch.setattr(fit_mod, "library_settings", lambda table, rows: {})
    without = fit(*args).model
    assert without.library_head is None and with_head.library_head is not None
    head_state = with_head.state_dict()
    for name, t in without.state_dict().items():
        torch.testing.assert_close(head_state[name], t, rtol=0, atol=0)


def test_evaluation_scores_the_measured_point_of_the_same_count_fit(small_stack):
    from dataclasses import replace

    from inrscrecon.data.preprocess import select_genes
    from inrscrecon.data.stack import build_cell_table
    from inrscrecon.evaluate.tasks import EvalConfig, inter_splits, run_split

    sections, _ = small_stack
    table = build_cell_table(sections, select_genes(sections, 20), label_keys=("domain",))
    names = sorted(table.sections())
    split = inter_splits(table, table.labels["domain"], [names[1]], [0])[0]
    cfg = EvalConfig(n_genes=20, width=16, n_layers=1, steps=8, batch_size=64, patience=3,
                     candidates=(EncodingConfig("fourier", n_bands=1),))  # fmt: skip
    cfg = replace(cfg, ablations=("inr_poisson", "inr_poisson_measured"))
    res = run_split(split, cfg)
    plug, measured = res.predictions["inr_poisson"], res.predictions["inr_poisson_measured"]
    assert measured.shape == plug.shape and np.isfinite(measured).all()
    assert (measured < plug).all()  # E[log1p] below log1p(E): the same fit, another point summary
    assert res.chosen["inr_poisson_measured"]["library_size"] == "field"
    assert res.chosen["inr_poisson_measured"]["chosen"] == res.chosen["inr_poisson"]["chosen"]
    assert {"rmse", "pearson", "ari"} <= set(res.metrics["inr_poisson_measured"])
    # one fit: the same fitting time is reported for both summaries
    assert res.metrics["inr_poisson_measured"]["wall_s"] == res.metrics["inr_poisson"]["wall_s"]


def test_a_tail_beyond_the_count_cap_is_an_error_not_a_truncation(monkeypatch):
    import inrscrecon.field.expectation as ex

    monkeypatch.setattr(ex, "MAX_COUNT", 512)
    eta, log_lib = torch.tensor([[6.0]]), torch.tensor([math.log(5000.0)])  # μ ≈ 200, NB θ = 0.5: long tail
    with pytest.raises(RuntimeError, match="tail is above"):
        ex.expected_log1p_counts(eta, log_lib, torch.tensor([math.log(0.5)]))
    assert torch.isfinite(ex.expected_log1p_counts(eta, log_lib)).all()  # Poisson(200) ends well before 512
