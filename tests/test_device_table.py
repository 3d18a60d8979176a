"""The device-resident table gives the CPU table's batches: same rows for a seed, same normalised targets,
fixed capacities, padding ignored; the Triton gather (interpreter without a GPU) equals the torch gather."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from conftest import load_interpreted  # noqa: E402

from inrscrecon.data.device_table import (  # noqa: E402
    DeviceTable,
    HostBatchFeeder,
    batch_capacity,
    densify,
    device_table_or_none,
)
from inrscrecon.data.stack import CellTable  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def _table(n: int = 300, g: int = 37, seed: int = 0, target_sum: float = 1e4) -> CellTable:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.4, size=(n, g)).astype(np.float32) * (rng.random((n, g)) < 0.3)
    dense[5] = 0  # a row without non-zeros
    counts = sp.csr_matrix(dense)
    totals = dense.sum(1) + rng.integers(0, 5, n)  # library sizes over more genes than kept
    totals[7] = 0  # total 0 → zeros
    return CellTable(
        coords=rng.normal(size=(n, 3)) * 100,
        counts=counts,
        totals=totals.astype(np.float32),
        genes=[f"g{i}" for i in range(g)],
        section=np.array(["s"] * n, dtype=object),
        obs_names=np.array([str(i) for i in range(n)], dtype=object),
        target_sum=target_sum,
    )


@pytest.mark.parametrize("target_sum", [1e4, 0.0])
def test_gather_equals_cpu_table(target_sum):
    table = _table(target_sum=target_sum)
    dt = DeviceTable(table, DEV)
    rows = np.sort(np.random.default_rng(1).choice(table.n_cells, 64, replace=False))
    rows = np.concatenate([rows, [5, 7]])
    cap = dt.capacity(np.arange(table.n_cells), len(rows))
    b = dt.gather(torch.as_tensor(rows, device=DEV), cap)
    assert b.indices.shape == (cap,) and b.values.shape == (cap,) and b.indptr.shape == (len(rows) + 1,)
    ref = table.targets(rows)
    np.testing.assert_array_equal(b.dense(table.counts.shape[1]).cpu().numpy(), ref)
    np.testing.assert_array_equal(b.coords.cpu().numpy(), table.coords[rows].astype(np.float32))
    nnz = int(b.indptr[-1])
    assert nnz == table.counts[rows].nnz and nnz < cap
    assert not b.values[nnz:].any()  # padding slots are zero


def test_capacity_bounds_every_batch():
    table = _table()
    rows = np.arange(0, table.n_cells, 2)
    cap = batch_capacity(table.counts, rows, 32)
    lens = np.diff(table.counts.indptr)[rows]
    assert cap == np.sort(lens)[-32:].sum()
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert table.counts[rng.choice(rows, 32, replace=False)].nnz <= cap


def test_densify_ignores_padding():
    indptr = torch.tensor([0, 2, 2, 3])
    indices = torch.tensor([1, 3, 0, 2, 2], dtype=torch.int32)  # last two slots are padding
    values = torch.tensor([1.0, 2.0, 3.0, 9.0, 9.0])
    out = densify(indptr, indices, values, 4)
    np.testing.assert_array_equal(out.numpy(), [[0, 1, 0, 2], [0, 0, 0, 0], [3, 0, 0, 0]])


def test_host_feeder_equals_device_table():
    table = _table()
    dt, feeder = DeviceTable(table, DEV), HostBatchFeeder(table, DEV)
    rng = np.random.default_rng(2)
    batches = [np.sort(rng.choice(table.n_cells, 40, replace=False)) for _ in range(3)]
    cap = dt.capacity(np.arange(table.n_cells), 40)
    for k, rows in enumerate(batches):
        nxt = batches[k + 1] if k + 1 < len(batches) else None
        a = dt.gather(torch.as_tensor(rows, device=DEV), cap)
        b = feeder.gather_host(rows, cap, nxt)
        for x, y in ((a.indptr, b.indptr), (a.values, b.values), (a.coords, b.coords)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(a.dense(37), b.dense(37), rtol=0, atol=0)


def test_resident_bytes_reported():
    table = _table()
    dt = device_table_or_none(table, DEV)
    assert dt is not None
    nnz = table.counts.nnz
    assert dt.nbytes == 8 * (table.n_cells + 1) + 8 * nnz + 16 * table.n_cells
    assert dt.bytes_per_cell == pytest.approx(dt.nbytes / table.n_cells)


@pytest.mark.triton
@pytest.mark.parametrize("target_sum", [1e4, 0.0])
def test_triton_gather_equals_torch(target_sum):
    pytest.importorskip("triton", reason="triton is not installed")
    load_interpreted("inrscrecon.kernels.triton_csr_gather", "_csr_gather_kernel")
    table = _table(n=120, g=23, target_sum=target_sum)
    dt = DeviceTable(table, DEV)
    rows = torch.as_tensor(np.array([3, 5, 7, 8, 50, 51, 119]), device=DEV)
    cap = dt.capacity(np.arange(table.n_cells), 7) + 5
    a = dt.gather(rows, cap, impl="torch")
    b = dt.gather(rows, cap, impl="triton")
    torch.testing.assert_close(b.indices, a.indices, rtol=0, atol=0)
    torch.testing.assert_close(b.values, a.values, rtol=0, atol=0)


def test_too_large_for_the_device_falls_back_and_says_so(caplog):
    table = _table()
    with caplog.at_level("WARNING", logger="inrscrecon.data.device_table"):
        assert device_table_or_none(table, DEV, free_bytes=1000) is None
    assert len(caplog.records) == 1 and "streaming CSR batches from host memory" in caplog.text


@pytest.mark.triton
def test_csr_gather_op_passes_opcheck():
    pytest.importorskip("triton", reason="triton is not installed")
    mod = load_interpreted("inrscrecon.kernels.triton_csr_gather", "_csr_gather_kernel")
    table = _table(n=60, g=11)
    dt = DeviceTable(table, DEV)
    rows = torch.as_tensor(np.array([1, 5, 7, 20, 59]), device=DEV)
    starts = dt.indptr[rows].contiguous()
    indptr = torch.cat(
        [torch.zeros(1, dtype=torch.int64, device=DEV), torch.cumsum(dt.indptr[rows + 1] - starts, 0)]
    )
    cap = int(indptr[-1]) + 7
    row = torch.searchsorted(indptr[1:].contiguous(), torch.arange(cap, device=DEV), right=True)
    torch.library.opcheck(mod.csr_gather_op, (row, indptr, starts, dt.indices, dt.data, dt.totals[rows], 1e4))


def test_batches_arrive_with_each_rows_genes_ascending():
    """An unsorted CSR is sorted once on entry, so batches say (truly) that their genes are ascending and the
    fused loss may skip its per-row sort; targets are unchanged."""
    from inrscrecon.field.fused import sparse_head_loss

    table = _table(n=120, g=29)
    csr = table.counts.copy()
    rng = np.random.default_rng(3)
    for r in range(csr.shape[0]):  # shuffle each row's non-zeros: same matrix, unsorted indices
        lo, hi = csr.indptr[r], csr.indptr[r + 1]
        p = lo + rng.permutation(hi - lo)
        csr.indices[lo:hi], csr.data[lo:hi] = csr.indices[p].copy(), csr.data[p].copy()
    csr.has_sorted_indices = False
    shuffled = CellTable(table.coords, csr, table.totals, table.genes, table.section, table.obs_names)
    rows = np.arange(0, 120, 3)
    dt = DeviceTable(shuffled, DEV)
    b = dt.gather(torch.as_tensor(rows, device=DEV), dt.capacity(np.arange(120), len(rows)))
    assert b.indices_sorted
    ip, genes = b.indptr.cpu().numpy(), b.indices.cpu().numpy()
    for i in range(len(rows)):
        assert np.all(np.diff(genes[ip[i] : ip[i + 1]]) > 0)
    np.testing.assert_array_equal(b.dense(29).cpu().numpy(), table.targets(rows))
    g = torch.Generator().manual_seed(0)
    h, w, bias = (
        torch.randn(len(rows), 8, generator=g),
        torch.randn(29, 8, generator=g),
        torch.randn(29, generator=g),
    )
    sorted_flag = sparse_head_loss(
        h, w, bias, b.indptr, b.indices, b.values, 0.5, impl="torch", indices_sorted=True
    )
    plain = sparse_head_loss(h, w, bias, b.indptr, b.indices, b.values, 0.5, impl="torch")
    for a, c in zip(sorted_flag, plain):
        torch.testing.assert_close(a, c)


def test_squared_error_without_a_dense_target():
    from inrscrecon.data.device_table import squared_error_

    table = _table(n=90, g=31)
    dt = DeviceTable(table, DEV)
    rows = np.array([0, 5, 7, 8, 40, 41, 89])  # row 5 has no non-zeros, row 7 a library size of 0
    b = dt.gather(torch.as_tensor(rows, device=DEV), dt.exact_capacity(rows) + 9)  # padding slots too
    pred = torch.rand(len(rows), 31, generator=torch.Generator().manual_seed(0)).to(DEV) * 3
    want = ((pred.double() - b.dense(31).double()) ** 2).sum()
    got = squared_error_(pred.clone(), b)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_host_feeder_grows_a_too_small_capacity_and_sorts_unsorted_rows(caplog):
    table = _table(n=120, g=29)
    csr = table.counts.copy()
    rng = np.random.default_rng(5)
    for r in range(csr.shape[0]):  # each row's non-zeros shuffled: the feeder sorts once
        lo, hi = csr.indptr[r], csr.indptr[r + 1]
        p = lo + rng.permutation(hi - lo)
        csr.indices[lo:hi], csr.data[lo:hi] = csr.indices[p].copy(), csr.data[p].copy()
    csr.has_sorted_indices = False
    shuffled = CellTable(table.coords, csr, table.totals, table.genes, table.section, table.obs_names)
    feeder = HostBatchFeeder(shuffled, DEV)
    rows = np.arange(0, 120, 2)
    with caplog.at_level("INFO", logger="inrscrecon.data.device_table"):
        b = feeder.gather_host(rows, 8)
    assert "grown" in caplog.text and feeder.grown[8] >= table.counts[rows].nnz
    assert b.values.shape == (feeder.grown[8],) and b.indices_sorted
    ip, genes = b.indptr.cpu().numpy(), b.indices.cpu().numpy()
    for i in range(len(rows)):
        assert np.all(np.diff(genes[ip[i] : ip[i + 1]]) > 0)
    np.testing.assert_array_equal(b.dense(29).cpu().numpy(), table.targets(rows))
