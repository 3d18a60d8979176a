"""Training on raw counts with the library size as offset (``--loss poisson|nb``): raw batches on every data
path, the NLL falls, early stopping follows it, resume refuses a changed loss, normalised input is refused, and
the saved count model predicts log1p-normalised expression."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # the fused count kernels run in the interpreter (small shapes)

from conftest import load_interpreted  # noqa: E402

from inrscrecon.data.device_table import DeviceTable, HostBatchFeeder
from inrscrecon.data.preprocess import select_genes
from inrscrecon.data.stack import CellTable, build_cell_table
from inrscrecon.errors import InputError
from inrscrecon.evaluate import baselines, metrics
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LossConfig, count_head_loss_reference
from inrscrecon.field.model import INRField
from inrscrecon.query.predict import predict
from inrscrecon.train.fit import TrainConfig, fit
from inrscrecon.train.objective import objective, objective_tensors

TC = TrainConfig(epochs=4, batch_size=128, progress=False, seed=1, val_fraction=0.15, patience=50)


@pytest.fixture(scope="module")
def stack(small_stack):
    """(train table of sections 0, 1, 3; held-out section 2's table; truth) on 60 genes."""
    sections, truth = small_stack
    train = [s for k, s in enumerate(sections) if k != 2]
    genes = select_genes(train, 60)
    return build_cell_table(train, genes), build_cell_table([sections[2]], genes), truth


def _fit(table, likelihood, tc=TC, **kw):
    return fit(
        table,
        EncodingConfig(n_bands=3),
        width=32,
        n_layers=2,
        loss_cfg=LossConfig(likelihood=likelihood),
        train_cfg=tc,
        **kw,
    )


def _toy_table(n: int = 200, g: int = 23, target_sum: float = 1e4) -> CellTable:
    rng = np.random.default_rng(0)
    dense = rng.poisson(2.0, size=(n, g)).astype(np.float32) * (rng.random((n, g)) < 0.4)
    dense[7] = 0  # a cell without counts: offset −inf, weight 0
    totals = dense.sum(1) + rng.integers(0, 20, n)
    totals[7] = 0
    return CellTable(
        coords=rng.normal(size=(n, 3)) * 50,
        counts=sp.csr_matrix(dense),
        totals=totals.astype(np.float32),
        genes=[f"g{i}" for i in range(g)],
        section=np.array(["s"] * n, dtype=object),
        obs_names=np.array([str(i) for i in range(n)], dtype=object),
        target_sum=target_sum,
    )


def test_raw_batches_carry_counts_and_offsets():
    table = _toy_table()
    rows = np.array([3, 7, 9, 40, 41, 150])
    dt, feeder = DeviceTable(table, "cpu", raw=True), HostBatchFeeder(table, "cpu", raw=True)
    cap = dt.capacity(np.arange(table.n_cells), len(rows))
    a = dt.gather(torch.as_tensor(rows), cap)
    b = feeder.gather_host(rows, cap)
    want = table.raw_targets(rows)
    assert want.max() > 1  # raw counts, not log1p-normalised values
    np.testing.assert_array_equal(table.raw_targets(rows), table.counts[rows].toarray())
    for batch in (a, b):
        np.testing.assert_array_equal(batch.dense(table.counts.shape[1]).numpy(), want)
        assert batch.log_offset is not None
        np.testing.assert_array_equal(batch.log_offset.numpy(), table.log_offsets(rows))
    off = table.log_offsets(rows)
    assert off[1] == -math.inf  # the cell with no counts
    np.testing.assert_allclose(off[[0, 2]], np.log(table.totals[[3, 9]] / 1e4), rtol=1e-6)
    # the normalised mode of the same table is unchanged, and can be asked for per batch
    norm = dt.gather(torch.as_tensor(rows), cap, raw=False)
    assert norm.log_offset is None
    np.testing.assert_array_equal(norm.dense(table.counts.shape[1]).numpy(), table.targets(rows))


@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_data_paths_give_the_same_first_step_loss(likelihood):
    table = _toy_table()
    torch.manual_seed(0)
    from inrscrecon.field.model import FieldConfig

    center, scale = FieldConfig.frame_for(table.coords)
    cfg = FieldConfig(
        len(table.genes), EncodingConfig(n_bands=2), 16, 2, center, scale, likelihood=likelihood
    )
    model = INRField(cfg)
    if likelihood == "nb":
        with torch.no_grad():
            model.log_theta.uniform_(0.0, 3.0)  # gene-wise dispersions that differ
    rows = np.sort(np.random.default_rng(3).choice(table.n_cells, 64, replace=False))
    rows[0] = 7  # include the empty cell
    rows = np.sort(rows)
    lc = LossConfig(likelihood=likelihood)
    dt = DeviceTable(table, "cpu", raw=True)
    cap = dt.capacity(np.arange(table.n_cells), len(rows))
    device_b = dt.gather(torch.as_tensor(rows), cap)
    host_b = HostBatchFeeder(table, "cpu", raw=True).gather_host(rows, cap)
    xyz = model.normalize(torch.as_tensor(table.coords[rows]))
    dense = torch.as_tensor(table.raw_targets(rows))
    offset = torch.as_tensor(table.log_offsets(rows))
    l_dev, p_dev = objective(model, model.normalize(device_b.coords), device_b, lc)
    l_host, _ = objective(model, model.normalize(host_b.coords), host_b, lc)
    l_dense, p_dense = objective(model, xyz, dense, lc, log_offset=offset)
    assert torch.isfinite(l_dense)
    torch.testing.assert_close(l_dev, l_dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_host, l_dense, rtol=1e-5, atol=1e-6)
    assert set(p_dense) == {"loss", "kl", "rc", "nll"} and p_dev["nll"] == pytest.approx(
        p_dense["nll"], rel=1e-5
    )
    # the empty cell has weight 0: the loss is the reference's over the other rows
    keep = rows != 7
    h = model.hidden(xyz[keep])
    theta = model.log_theta if likelihood == "nb" else None
    _, ref, _ = count_head_loss_reference(
        h, model.head.weight, model.head.bias, dense[keep], offset[keep], likelihood, theta
    )
    torch.testing.assert_close(l_dense, ref, rtol=1e-5, atol=1e-6)
    # gradients reach log_theta (NB) through every path
    if likelihood == "nb":
        loss, _ = objective_tensors(model, model.normalize(device_b.coords), device_b, lc)
        loss.backward()
        assert model.log_theta.grad is not None and model.log_theta.grad.abs().sum() > 0


@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_fits_lower_the_validation_nll_on_every_data_path(stack, likelihood):
    table = stack[0]
    runs = {d: _fit(table, likelihood, replace(TC, data=d, epochs=3)) for d in ("device", "host", "dense")}
    hist = runs["device"].history
    assert all({"val_rmse", "val_nll", "nll", "loss"} <= set(h) and "rmse" not in h for h in hist)
    assert hist[-1]["val_nll"] < hist[0]["val_nll"] - 0.01
    assert hist[-1]["nll"] < hist[0]["nll"]
    for d in ("host", "dense"):  # the same batches and arithmetic: the same run
        for a, b in zip(hist, runs[d].history):
            for k in ("loss", "val_nll", "val_rmse"):
                assert a[k] == pytest.approx(b[k], rel=1e-4), (d, k)
    assert runs["device"].model.cfg.likelihood == likelihood
    assert (runs["device"].model.log_theta is not None) == (likelihood == "nb")


def test_best_epoch_follows_the_validation_nll(stack):
    # a constant, high rate: the validation NLL and RMSE reach their best at different epochs
    res = _fit(stack[0], "poisson", replace(TC, epochs=8, lr=0.05, min_lr_ratio=1.0))
    nll = [h["val_nll"] for h in res.history]
    rmse = [h["val_rmse"] for h in res.history]
    best = int(np.argmin(nll))
    assert best != int(np.argmin(rmse)), "this setting should separate the two criteria"
    # the returned model is the best-NLL epoch's
    from inrscrecon.train.fit import _split, validation_scores

    _, val_rows = _split(stack[0].n_cells, TC.val_fraction, TC.seed)
    val_rmse, val_nll = validation_scores(res.model, stack[0], val_rows, "cpu")
    assert val_nll == pytest.approx(nll[best], rel=1e-5) and val_rmse == pytest.approx(rmse[best], rel=1e-5)


def test_count_head_starts_at_the_mean_rate(stack):
    table = stack[0]
    res = _fit(table, "poisson", replace(TC, epochs=1, lr=1e-9, min_lr_ratio=1.0))
    rows = np.arange(table.n_cells)
    rates = table.raw_targets(rows) * (1e4 / table.totals[rows])[:, None]
    start = torch.exp(res.model.head.bias).detach().numpy()
    # the bias is set from 4096 sampled training cells (all of them here): within a few % of the mean rate
    mean = rates.mean(axis=0)
    big = mean > 10
    np.testing.assert_allclose(start[big], mean[big], rtol=0.1)


def test_count_model_predicts_log1p_normalised_truth(stack, tmp_path):
    train, test, truth = stack
    res = _fit(train, "poisson", replace(TC, epochs=25))
    res.model.save(tmp_path / "p.safetensors")
    model = INRField.load(tmp_path / "p.safetensors")
    assert model.cfg.likelihood == "poisson"
    pred = predict(model, test.coords)
    true = truth.tissue.expected(test.coords)[:, [truth.tissue.gene_names.index(g) for g in test.genes]]
    mean = baselines.mean_profile(train.targets(np.arange(train.n_cells)), test.n_cells)
    assert pred.min() >= 0 and pred.shape == true.shape
    assert metrics.rmse(pred, true) < 0.8 * metrics.rmse(mean, true)
    assert np.nanmedian(metrics.pearson_per_gene(pred, true)) > 0.3


def test_nb_model_file_round_trip(stack, tmp_path):
    res = _fit(stack[0], "nb", replace(TC, epochs=2))
    theta = res.model.log_theta.detach().clone()
    assert not torch.allclose(theta, torch.full_like(theta, math.log(10.0)))  # trained
    res.model.save(tmp_path / "nb.safetensors")
    loaded = INRField.load(tmp_path / "nb.safetensors")
    assert loaded.cfg.likelihood == "nb" and loaded.cfg == res.model.cfg
    torch.testing.assert_close(loaded.log_theta, theta, rtol=0, atol=0)
    xyz = stack[1].coords[:40]
    np.testing.assert_array_equal(predict(loaded, xyz), predict(res.model, xyz))
    # the run record names the likelihood
    assert loaded.training_record["run"]["loss"]["likelihood"] == "nb"


@pytest.mark.parametrize(
    "changed, name",
    [
        (dict(likelihood="nb"), r"loss\.likelihood: 'poisson' in the checkpoint, 'nb' now"),
        (dict(z_stretch=2.0), r"z_stretch: '<absent>' in the checkpoint, 2\.0 now"),
    ],
)
def test_resume_with_a_changed_loss_or_frame_is_refused_by_name(stack, tmp_path, changed, name):
    ckpt = tmp_path / "c.ckpt"
    _fit(stack[0], "poisson", replace(TC, stop_after_steps=2), checkpoint=ckpt)
    lik = changed.pop("likelihood", "poisson")
    with pytest.raises(InputError, match=rf"another configuration \({name}\)"):
        _fit(stack[0], lik, TC, checkpoint=ckpt, resume=True, **changed)
    done = _fit(stack[0], "poisson", TC, checkpoint=ckpt, resume=True)  # unchanged: resumes
    assert len(done.history) == TC.epochs


@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_normalised_input_is_refused(likelihood):
    table = _toy_table(target_sum=0.0)
    with pytest.raises(
        InputError, match=rf"--loss {likelihood} needs raw counts; X of section 's' is normalised"
    ):
        _fit(table, likelihood)
    _fit(table, "rmse", replace(TC, epochs=1))  # the RMSE loss takes it as before


def test_cli_fit_with_count_loss(small_stack, tmp_path, capsys):
    from inrscrecon.cli import main
    from inrscrecon.data.io import write_h5ad

    files = [str(write_h5ad(s, tmp_path / f"s{k}.h5ad")) for k, s in enumerate(small_stack[0][:2])]
    model = tmp_path / "nb.safetensors"
    flags = [
        "--genes",
        "30",
        "--epochs",
        "2",
        "--width",
        "16",
        "--layers",
        "1",
        "--quiet",
        "--batch-size",
        "128",
    ]
    assert main(["fit", *files, "--out", str(model), "--loss", "nb", "--bands", "auto", *flags]) == 0
    out = capsys.readouterr().out
    assert "encoding chosen on validation NLL" in out and "val NLL" in out
    loaded = INRField.load(model)
    assert loaded.cfg.likelihood == "nb" and loaded.log_theta is not None
    # normalised input: one line naming the loss and the section, nothing written
    bad = tmp_path / "bad.safetensors"
    args = [
        "fit",
        *files,
        "--out",
        str(bad),
        "--loss",
        "poisson",
        "--input",
        "normalized",
        "--bands",
        "2",
        *flags,
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--loss poisson needs raw counts" in err[0] and not bad.exists()


def _ddp_count_runs(paths: list[str]) -> dict:
    """An NB fit from the streaming table (dense raw batches) and a Poisson fit from the in-memory table
    (device-resident raw CSR), each 2 epochs with an odd batch (unequal shards)."""
    from inrscrecon.data.streaming import open_stack

    torch.set_num_threads(1)
    tc = TrainConfig(epochs=2, batch_size=63, seed=4, progress=False, patience=50)
    with open_stack(paths, n_genes=20, chunk_rows=200, window=2, progress=False) as st:
        nb = _fit(st, "nb", tc)
        table = st.to_cell_table()
    pois = _fit(table, "poisson", replace(tc, data="device"))
    return {
        name: {
            "history": r.history,
            "state": {k: v.tolist() for k, v in r.model.state_dict().items()},
        }
        for name, r in (("nb", nb), ("poisson", pois))
    }


def _ddp_worker(rank: int, world: int, port: int, paths: list[str], out: str) -> None:
    import json
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    from inrscrecon.train import distributed

    distributed.init_from_env("cpu")
    result = _ddp_count_runs(paths)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    distributed.cleanup()


@pytest.mark.slow  # ~40 s on 2 cores: two spawned processes import torch
@pytest.mark.timeout(300)
def test_two_gloo_ranks_match_one_process_on_count_losses(small_stack, tmp_path):
    import json
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    from inrscrecon.data.io import write_h5ad

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo backend")
    paths = [str(write_h5ad(s, tmp_path / f"s{k}.h5ad")) for k, s in enumerate(small_stack[0])]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, paths, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    single = _ddp_count_runs(paths)
    for name in ("nb", "poisson"):
        assert r0[name]["history"] == r1[name]["history"]
        # 2 ranks × half batch == 1 process × global batch (row-weighted NLL), up to summation order
        for a, b in zip(single[name]["history"], r0[name]["history"]):
            for key in ("loss", "nll", "val_nll", "val_rmse"):
                assert b[key] == pytest.approx(a[key], rel=1e-4), (name, key)
        for k, v in single[name]["state"].items():
            np.testing.assert_allclose(
                np.array(r0[name]["state"][k]), np.array(v), rtol=1e-3, atol=1e-4, err_msg=f"{name} {k}"
            )


@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_count_step_compiles_fullgraph_and_matches_eager(likelihood):
    """The raw gather + count loss + Adam trace as one graph (no host sync), as the RMSE step does."""
    from inrscrecon.field.model import FieldConfig
    from inrscrecon.train.objective import PARTS
    from inrscrecon.train.step import TrainStep

    table = _toy_table()
    dt = DeviceTable(table, "cpu", raw=True)
    cap = dt.capacity(np.arange(table.n_cells), 48)
    lc = LossConfig(likelihood=likelihood, lambda_kl=0.5)
    center, scale = FieldConfig.frame_for(table.coords)

    def setup():
        torch.manual_seed(0)
        cfg = FieldConfig(
            len(table.genes), EncodingConfig(n_bands=2), 16, 2, center, scale, likelihood=likelihood
        )
        model = INRField(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)

        def loss_rows(rows):
            b = dt.gather(rows, cap)
            return objective_tensors(model, model.normalize(b.coords), b, lc)

        return model, opt, loss_rows

    rng = np.random.default_rng(0)
    batches = torch.as_tensor(np.sort(rng.choice(table.n_cells, (3, 48)), axis=1))
    batches[0, 0] = 7  # the empty cell (offset −inf, weight 0) inside the traced graph
    m_e, opt_e, f_e = setup()
    m_c, opt_c, f_c = setup()
    eager = TrainStep(f_e, opt_e, 1e-2, total=10, min_lr_ratio=0.05)
    compiled = TrainStep(f_c, opt_c, 1e-2, 10, 0.05, compile=True, compile_backend="aot_eager")
    acc_e = torch.zeros(len(PARTS), dtype=torch.float64)
    acc_c = torch.zeros(len(PARTS), dtype=torch.float64)
    for k in range(3):
        eager(acc_e, k, batches[k])
        compiled(acc_c, k, batches[k])
    torch.testing.assert_close(acc_c, acc_e, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(acc_e).all() and acc_e[PARTS.index("nll")] > 0 and acc_e[PARTS.index("rmse")] == 0
    for (name, a), b in zip(m_e.state_dict().items(), m_c.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_streaming_table_feeds_the_same_raw_counts(small_stack, tmp_path):
    from inrscrecon.data.io import write_h5ad
    from inrscrecon.data.streaming import open_stack

    paths = [write_h5ad(s, tmp_path / f"s{k}.h5ad") for k, s in enumerate(small_stack[0][:3])]
    with open_stack(paths, n_genes=25, chunk_rows=97, shuffle="global", progress=False) as st:
        mem = st.to_cell_table()
        rows = np.random.default_rng(1).permutation(st.n_cells)[:150]  # any order, across chunks and files
        np.testing.assert_array_equal(st.raw_targets(rows), mem.raw_targets(rows))
        np.testing.assert_array_equal(st.log_offsets(rows), mem.log_offsets(rows))
        tc = replace(TC, epochs=2)
        streamed = _fit(st, "poisson", tc)
    dense = _fit(mem, "poisson", replace(tc, data="dense"))
    for a, b in zip(streamed.history, dense.history):
        for k in ("loss", "val_nll", "val_rmse"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k


@pytest.mark.triton
@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_fused_backend_trains_on_the_same_loss_and_gradients(likelihood):
    """objective() routes a count likelihood to the fused Triton head + loss (sparse and dense targets):
    the same loss and gradients as the torch references, the empty cell's weight 0 included."""
    pytest.importorskip("triton")
    load_interpreted("inrscrecon.kernels.triton_count_loss", "_count_tile_kernel")
    from inrscrecon.field.model import FieldConfig

    table = _toy_table()
    center, scale = FieldConfig.frame_for(table.coords)
    torch.manual_seed(0)
    enc = EncodingConfig(kind="gaussian", n_features=8)  # the torch trunk: only the head + loss is fused
    model = INRField(FieldConfig(len(table.genes), enc, 16, 1, center, scale, likelihood=likelihood))
    rows = np.sort(np.append(np.arange(0, 40, 2), 7))  # with the empty cell
    dt = DeviceTable(table, "cpu", raw=True)
    batch = dt.gather(torch.as_tensor(rows), dt.exact_capacity(rows))
    dense, off = torch.as_tensor(table.raw_targets(rows)), torch.as_tensor(table.log_offsets(rows))
    xyz = model.normalize(batch.coords)
    lc = LossConfig(likelihood=likelihood, lambda_kl=0.5)

    def run(target, impl, log_offset=None):
        model.zero_grad(set_to_none=True)
        loss, parts = objective(model, xyz, target, lc, impl=impl, precision="fp32", log_offset=log_offset)
        loss.backward()
        return (
            loss.detach(),
            parts,
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )

    ref_loss, ref_parts, ref_grads = run(batch, "torch")
    for target, log_offset in ((batch, None), (dense, off)):
        loss, parts, grads = run(target, "triton", log_offset)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
        assert parts["nll"] == pytest.approx(ref_parts["nll"], rel=1e-4)
        assert parts["kl"] == pytest.approx(ref_parts["kl"], rel=1e-4, abs=1e-6)
        assert set(grads) == set(ref_grads) and ("log_theta" in grads) == (likelihood == "nb")
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_count_loss_with_rc_kl_and_bf16(stack):
    """RC and KL act on the normalised prediction beside the NLL; a bf16 head tracks the fp32 one."""
    table = stack[0]
    lc = LossConfig(likelihood="nb", lambda_rc=0.1, lambda_kl=0.5)
    tc = replace(TC, epochs=2)
    full = fit(table, EncodingConfig(n_bands=3), 32, 2, lc, tc)
    h = full.history
    assert all(r["rc"] > 0 and r["kl"] > 0 and r["nll"] > 0 for r in h)
    assert h[-1]["loss"] == pytest.approx(h[-1]["nll"] + 0.5 * h[-1]["kl"] + 0.1 * h[-1]["rc"], rel=1e-5)
    fp32 = _fit(table, "poisson", replace(tc, precision="fp32"))
    bf16 = _fit(table, "poisson", replace(tc, precision="bf16"))
    assert bf16.history[-1]["val_nll"] == pytest.approx(fp32.history[-1]["val_nll"], rel=0.05)
