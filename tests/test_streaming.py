"""Streaming table over backed h5ad / zarr sections: same data, same fit, chunk-wise shuffling, clear errors
on bad files, incremental prediction."""

from __future__ import annotations

import sys
import warnings

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from inrscrecon.data.io import write_h5ad
from inrscrecon.data.preprocess import select_genes
from inrscrecon.data.stack import build_cell_table
from inrscrecon.data.streaming import open_stack
from inrscrecon.errors import InputError
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LossConfig
from inrscrecon.train.fit import TrainConfig, fit


@pytest.fixture(scope="module")
def stack_files(small_stack, tmp_path_factory):
    """The 4 small sections on disk: sections 0, 2, 3 as .h5ad, section 1 as AnnData .zarr."""
    sections, _ = small_stack
    d = tmp_path_factory.mktemp("stack")
    paths = []
    for k, s in enumerate(sections):
        if k == 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s.write_zarr(d / f"s{k}.zarr")
            paths.append(d / f"s{k}.zarr")
        else:
            paths.append(write_h5ad(s, d / f"s{k}.h5ad"))
    return sections, paths


def test_streaming_table_equals_cell_table(stack_files):
    sections, paths = stack_files
    genes = select_genes(sections, 40)
    mem = build_cell_table(sections, genes)
    with open_stack(paths, n_genes=40, chunk_rows=97, progress=False) as st:
        assert st.genes == genes  # variable genes from the one streaming pass = in-memory selection
        np.testing.assert_array_equal(st.coords, mem.coords)
        np.testing.assert_array_equal(st.totals, mem.totals)
        assert st.sections() == mem.sections()
        np.testing.assert_array_equal(st.obs_names, mem.obs_names)
        rows = np.random.default_rng(0).permutation(mem.n_cells)[:300]  # unsorted, crossing files and chunks
        np.testing.assert_array_equal(st.targets(rows), mem.targets(rows))
        few = np.arange(5, 1600, 150)  # sparse request over more chunks than the cache: read row by row
        reads = dict(st.stats)
        st._cache.clear()
        np.testing.assert_array_equal(st.targets(few), mem.targets(few))
        assert st.stats["chunk_reads"] == reads["chunk_reads"] and st.stats["row_reads"] == reads[
            "row_reads"
        ] + len(few)


def test_rows_come_through_anndatas_backed_sparse_dataset(stack_files):
    from anndata.abc import CSRDataset

    _, paths = stack_files  # paths[1] is a zarr store, the others h5ad
    with open_stack(paths, n_genes=20, progress=False) as st:
        assert all(isinstance(s.X, CSRDataset) for s in st.sources)
        assert {s.kind for s in st.sources} == {"h5ad", "zarr"}


def test_cache_budget_shrinks_chunks_and_bounds_the_cache(stack_files):
    sections, paths = stack_files
    genes = select_genes(sections, 40)
    mem = build_cell_table(sections, genes)
    with open_stack(paths, n_genes=40, progress=False) as st:
        row_bytes = max(s.row_bytes() for s in st.sources)  # mean CSR bytes of a row in the densest file
        assert row_bytes == pytest.approx(max(x.X.nnz / x.n_obs for x in sections) * 8)  # float32/int32
    budget_mb = 9 * 40.5 * row_bytes / 2**20  # room for the 2·window + 1 = 9 cached chunks of 40 rows
    with open_stack(paths, n_genes=40, chunk_rows=1000, window=4, cache_mb=budget_mb, progress=False) as st:
        assert st.chunk_rows == 40  # shrunk from 1000 so that 9 chunks fit the budget
        order = st.epoch_order(np.arange(st.n_cells), seed=0, epoch=0)
        peak = 0
        for b in range(0, len(order), 64):
            rows = np.sort(order[b : b + 64])
            np.testing.assert_array_equal(st.targets(rows), mem.targets(rows))
            peak = max(peak, sum(m.data.nbytes + m.indices.nbytes for m in st._cache.values()))
        assert (
            peak <= 1.25 * budget_mb * 2**20
        )  # chunks are sized on the mean row; dense ones may exceed a bit
    with open_stack(paths, n_genes=40, chunk_rows=97, progress=False) as st:
        assert st.chunk_rows == 97  # small data: the requested size stands
    with pytest.raises(InputError, match="cache_mb"):
        open_stack(paths, n_genes=40, cache_mb=0, progress=False)


def test_window_order_is_chunk_local_permutation(stack_files):
    _, paths = stack_files
    with open_stack(paths, n_genes=20, chunk_rows=50, window=3, progress=False) as st:
        rows = np.arange(0, st.n_cells, 2)
        order = st.epoch_order(rows, seed=1, epoch=0)
        assert sorted(order.tolist()) == rows.tolist()
        assert not np.array_equal(order, st.epoch_order(rows, seed=1, epoch=1))
        src, local = st.locate(order)
        chunk = st._chunk_base[src] + local // 50
        for b in range(0, len(order), 64):  # a batch touches at most two windows of 3 chunks
            assert len(np.unique(chunk[b : b + 64])) <= 6
        st.targets(np.sort(order[:64]))
        assert len(st._cache) <= 2 * 3 + 1


def _fit(table, **tc):
    cfg = dict(epochs=3, batch_size=100, progress=False, seed=2, val_fraction=0.1)
    cfg.update(tc)
    return fit(table, EncodingConfig(n_bands=3), width=24, n_layers=2, loss_cfg=LossConfig.preset("no_rc"),
               train_cfg=TrainConfig(**cfg))  # fmt: skip


def test_streaming_fit_equals_in_memory_fit(stack_files):
    torch.set_num_threads(1)
    sections, paths = stack_files
    mem = build_cell_table(sections, select_genes(sections, 30))
    ref = _fit(mem)
    with open_stack(paths, n_genes=30, chunk_rows=128, shuffle="global", progress=False) as st:
        same = _fit(st)
    for a, b in zip(ref.history, same.history):  # same seed → same batches → same loss curve
        for k in ("loss", "rmse", "kl", "val_rmse"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    with open_stack(paths, n_genes=30, chunk_rows=128, window=2, progress=False) as st:
        win = _fit(st)  # chunk-wise shuffling: a different but equally good curve
        assert st.stats["chunk_reads"] > 0
    assert win.history[-1]["val_rmse"] == pytest.approx(ref.history[-1]["val_rmse"], rel=0.1)
    assert win.history[-1]["loss"] == pytest.approx(ref.history[-1]["loss"], rel=0.1)


def _corrupt(path, tmp_path, how):
    bad = tmp_path / f"{how}.h5ad"
    data = path.read_bytes()
    if how == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        bad.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 40)
    return bad


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_broken_files_give_clear_errors(stack_files, tmp_path, how):
    _, paths = stack_files
    bad = _corrupt(paths[0], tmp_path, how)
    with pytest.raises(InputError, match=f"{bad.name}.*(readable|truncated|corrupted)"):
        open_stack([bad, paths[2]], n_genes=20, progress=False)


def test_inconsistent_or_bad_content_is_named(stack_files, tmp_path):
    sections, paths = stack_files
    # indptr that ends past the data (a truncated write)
    p = tmp_path / "short.h5ad"
    p.write_bytes(paths[0].read_bytes())
    with h5py.File(p, "r+") as f:
        data = f["X/data"][:]
        del f["X/data"]
        f["X/data"] = data[: len(data) // 2]
    with pytest.raises(InputError, match="short.h5ad.*indptr"):
        open_stack([p], n_genes=20, progress=False)
    # negative counts: the streaming pass names file and rows
    neg = sections[0].copy()
    neg.X = neg.X.astype(np.float32)
    neg.X.data[7] = -1.0
    q = write_h5ad(neg, tmp_path / "neg.h5ad")
    with pytest.raises(InputError, match=r"neg.h5ad: X has negative values in rows 0\.\.49"):
        open_stack([q], n_genes=20, chunk_rows=50, progress=False)
    # column-major X cannot be streamed by rows
    csc = ad.AnnData(X=sp.csc_matrix(sections[0].X), obs=sections[0].obs, var=sections[0].var,
                     obsm=dict(sections[0].obsm))  # fmt: skip
    r = write_h5ad(csc, tmp_path / "csc.h5ad")
    with pytest.raises(InputError, match="CSC"):
        open_stack([r], progress=False)
    # a corrupted zarr chunk of X
    z = paths[1]
    chunk = next(
        p for p in (z / "X" / "data").rglob("*") if p.is_file() and not p.name.startswith((".", "zarr"))
    )
    zc = tmp_path / "z.zarr"
    import shutil

    shutil.copytree(z, zc)
    (zc / chunk.relative_to(z)).write_bytes(b"not a compressed chunk")
    with pytest.raises(InputError, match="z.zarr.*X"):
        open_stack([zc], progress=False)
    with pytest.raises(InputError, match="file not found"):
        open_stack([tmp_path / "nope.h5ad"], progress=False)


def test_predict_to_file_streams_chunks(stack_files, tmp_path):
    from inrscrecon.query.predict import predict
    from inrscrecon.query.predict_stream import predict_to_file

    sections, paths = stack_files
    with open_stack(paths[:2], n_genes=20, progress=False) as st:
        model = _fit(st, epochs=1).model
    xyz = np.random.default_rng(0).uniform(-300, 300, size=(1000, 3))
    want = predict(model, xyz, model.cfg.genes[:5])
    for name in ("p.h5ad", "p.zarr"):
        out = predict_to_file(model, xyz, tmp_path / name, genes=model.cfg.genes[:5], batch_size=333)
        back = ad.read_h5ad(out) if name.endswith("h5ad") else ad.read_zarr(out)
        assert back.shape == (1000, 5) and list(back.var_names) == model.cfg.genes[:5]
        np.testing.assert_allclose(back.X, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(back.obsm["spatial_3d"], xyz)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    with pytest.raises(InputError, match="not in the model"):
        predict_to_file(model, xyz, tmp_path / "q.h5ad", genes=["nope"])
    assert not (tmp_path / "q.h5ad").exists()


def test_synthetic_default_chunk_is_memory_lean_and_unchanged_for_small_sections():
    from inrscrecon.data.synthetic import SynthConfig, iter_sections

    cfg = SynthConfig(n_sections=1, cells_per_section=300, n_genes=30, seed=5)
    a, _ = next(iter_sections(cfg))
    b, _ = next(iter_sections(cfg, chunk_size=20000))
    assert (a.X != b.X).nnz == 0


def test_large_blocks_are_returned_to_the_system_after_a_larger_one_was_freed():
    """Checked in a fresh interpreter: malloc serves a request from free heap space before it maps new pages,
    so in a long test process a 12 MiB block can land in the heap whatever the threshold."""
    import platform
    import subprocess

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt(M_MMAP_THRESHOLD) is a glibc setting")
    probe = """
import numpy as np
from inrscrecon.data.streaming import map_large_allocations

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

assert map_large_allocations()
big = np.ones(24 * 2**20 // 8)  # freeing it raises glibc's dynamic threshold to 24 MiB (unless fixed)
del big
block = np.ones(12 * 2**20 // 8)  # a chunk-sized block: now on its own pages
held = rss_mb()
del block
print(held - rss_mb())
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) > 8  # handed back on free, not kept as heap


def test_cli_fit_stream_and_truncated_input(stack_files, tmp_path, capsys):
    from inrscrecon.cli import main

    _, paths = stack_files
    args = ["fit", *map(str, paths[:2]), "--stream", "--genes", "20", "--epochs", "1", "--batch-size", "64",
            "--width", "16", "--layers", "2", "--lambda-rc", "0", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "saved" in capsys.readouterr().out and (tmp_path / "m.safetensors").exists()
    bad = _corrupt(paths[0], tmp_path, "truncated")
    args[1] = str(bad)
    assert main([*args, "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "truncated.h5ad" in capsys.readouterr().err and not (tmp_path / "bad.safetensors").exists()


@pytest.fixture(scope="module")
def odd_files(small_stack, tmp_path_factory):
    """Two sections whose genes do not line up: the second lists them in reverse order (its col_map is not
    monotone), each has one gene of its own (dropped, yet in the library size); rows 3 and 10 are empty and
    row 11 holds counts only on the dropped gene. The first stores X as a dense array, the second as CSR."""
    import pandas as pd

    sections, _ = small_stack
    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(4)
    paths = []
    for k, s in enumerate(sections[:2]):
        x = s.X.toarray().astype(np.float32)
        own = rng.poisson(2.0, size=(x.shape[0], 1)).astype(np.float32)
        x[[3, 10, 11]] = 0
        own[[3, 10]], own[11] = 0, 7
        names = [*s.var_names, f"only{k}"]
        x = np.hstack([x, own])
        if k == 1:
            x, names = x[:, ::-1], names[::-1]
        a = ad.AnnData(sp.csr_matrix(x) if k else np.ascontiguousarray(x), obs=s.obs.copy(), var=pd.DataFrame(index=names), obsm=dict(s.obsm),
                       uns=dict(s.uns))  # fmt: skip
        paths.append(write_h5ad(a, d / f"odd{k}.h5ad"))
    return paths


def test_csr_rows_equal_dense_rows(odd_files):
    with open_stack(odd_files, n_genes=25, chunk_rows=37, progress=False) as st:
        assert [s.sparse for s in st.sources] == [False, True]
        cm = st.col_maps[1]
        assert (cm < 0).sum() > 1 and np.any(np.diff(cm[cm >= 0]) < 0)  # genes dropped; order not monotone
        n, g = st.n_cells, len(st.genes)
        rng = np.random.default_rng(0)
        for rows in (
            np.concatenate(
                [rng.permutation(n)[:150], [3, 10, 11, 3, n - 1]]
            ),  # unsorted, repeats, empty rows
            np.array([3, 10, 11]),  # a batch with no non-zeros at all
            np.arange(5, n, 90),  # spread over more chunks than the cache: row reads
        ):
            indptr, indices, values = st.csr_rows(rows)
            assert indptr.dtype == np.int64 and indices.dtype == np.int32 and values.dtype == np.float32
            for i in range(len(rows)):
                assert np.all(np.diff(indices[indptr[i] : indptr[i + 1]]) > 0)
            dense = sp.csr_matrix((values, indices, indptr), shape=(len(rows), g)).toarray()
            np.testing.assert_array_equal(dense, st.raw_targets(rows))
        mem = st.to_cell_table()
        lens = np.diff(mem.counts.indptr)
        assert st.mean_row_nnz() >= lens.mean() - 1e-9 and (lens[[3, 10, 11]] == 0).all()
        assert st.mean_row_nnz() == pytest.approx(
            max(lens[: st.offsets[1]].mean(), lens[st.offsets[1] :].mean())
        )


def test_streamed_sparse_batches_equal_dense_batches(odd_files):
    from inrscrecon.data.device_table import HostBatchFeeder

    with open_stack(odd_files, n_genes=25, chunk_rows=37, window=2, progress=False) as st:
        g = len(st.genes)
        feeder = HostBatchFeeder(st, "cpu")
        order = st.epoch_order(np.arange(st.n_cells), seed=0, epoch=0)
        batches = [np.sort(order[b : b + 64]) for b in range(0, len(order) - 63, 64)]
        cap = feeder.capacity(np.arange(st.n_cells), 64)
        for k, rows in enumerate(batches):
            nxt = batches[k + 1] if k + 1 < len(batches) else None
            b = feeder.gather_host(rows, cap, nxt)
            assert b.values.shape == (cap,) and b.indices_sorted
            np.testing.assert_array_equal(b.dense(g).numpy(), st.targets(rows))
            np.testing.assert_array_equal(b.coords.numpy(), st.coords[rows].astype(np.float32))
            r = feeder.gather_host(rows, cap, raw=True)
            np.testing.assert_array_equal(r.dense(g).numpy(), st.raw_targets(rows))
            np.testing.assert_array_equal(r.log_offset.numpy(), st.log_offsets(rows))
        assert feeder.grown == {}  # the capacity from the nnz statistics held every windowed batch
        empty = np.array([3, 10])  # library size 0: zero targets, offset −inf
        r = feeder.gather_host(empty, feeder.exact_capacity(empty), raw=True)
        assert int(r.indptr[-1]) == 0 and np.isneginf(r.log_offset.numpy()).all()


def test_a_batch_over_its_capacity_grows_the_buffers_once(odd_files, caplog):
    from inrscrecon.data.device_table import HostBatchFeeder

    with open_stack(odd_files, n_genes=25, chunk_rows=37, progress=False) as st:
        feeder = HostBatchFeeder(st, "cpu")
        rows = np.arange(40, 80)
        nnz = int(st.csr_rows(rows)[0][-1])
        with caplog.at_level("INFO", logger="inrscrecon.data.device_table"):
            b = feeder.gather_host(rows, 10)  # far too small: grown, not truncated
            again = feeder.gather_host(rows[:30], 10)  # fits the grown buffers: shapes stay static
        assert len(caplog.records) == 1 and "grown" in caplog.text
        assert feeder.grown[10] >= nnz and b.values.shape == again.values.shape == (feeder.grown[10],)
        np.testing.assert_array_equal(b.dense(len(st.genes)).numpy(), st.targets(rows))
        np.testing.assert_array_equal(again.dense(len(st.genes)).numpy(), st.targets(rows[:30]))


def _fit_loss(table, likelihood, **tc):
    cfg = dict(epochs=3, batch_size=100, progress=False, seed=2, val_fraction=0.1)
    cfg.update(tc)
    loss = LossConfig(lambda_kl=LossConfig.preset("no_rc").lambda_kl, likelihood=likelihood)
    return fit(
        table, EncodingConfig(n_bands=3), width=24, n_layers=2, loss_cfg=loss, train_cfg=TrainConfig(**cfg)
    )


@pytest.mark.parametrize("likelihood", ["rmse", "poisson"])
def test_streaming_csr_fit_equals_dense_streaming_fit(stack_files, likelihood, caplog):
    """data="auto" on a streaming table feeds CSR batches read from the disk chunks: same window order, same
    batches, so the same loss curve, validation scores and weights as the dense reference path."""
    torch.set_num_threads(1)
    _, paths = stack_files
    with open_stack(paths, n_genes=30, chunk_rows=128, window=2, progress=False) as st:
        ref = _fit_loss(st, likelihood, data="dense")
        with caplog.at_level("INFO", logger="inrscrecon.train.fit"):
            csr = _fit_loss(st, likelihood)
    assert ref.data_info["placement"] == "dense host batches"
    assert csr.data_info["placement"] == "CSR batches streamed from disk chunks"
    assert caplog.text.count("CSR batches streamed from disk chunks") == 1
    keys = ("loss", "val_rmse") + (("val_nll", "nll") if likelihood != "rmse" else ("rmse", "kl"))
    assert len(ref.history) == len(csr.history) == 3
    for a, b in zip(ref.history, csr.history):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    for (name, a), b in zip(ref.model.state_dict().items(), csr.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_streaming_data_modes(stack_files):
    _, paths = stack_files
    with open_stack(paths[:2], n_genes=20, chunk_rows=128, progress=False) as st:
        host = _fit(st, epochs=1, data="host")
        assert host.data_info["placement"] == "CSR batches streamed from disk chunks"
        with pytest.raises(InputError, match="data='device' needs an in-memory table"):
            _fit(st, epochs=1, data="device")


def test_streaming_csr_fit_resumes_mid_epoch_to_the_same_result(stack_files, tmp_path):
    """Interrupted mid-epoch (the feeder holds a prefetched batch) and resumed: same history, same weights."""
    torch.set_num_threads(1)
    _, paths = stack_files
    ckpt = tmp_path / "fit.ckpt"

    def run(**kw):
        return fit(st, EncodingConfig(n_bands=3), width=24, n_layers=2, loss_cfg=LossConfig.preset("no_rc"),
                   train_cfg=TrainConfig(epochs=2, batch_size=100, progress=False, seed=2, val_fraction=0.1,
                                         stop_after_steps=kw.pop("stop", None)), **kw)  # fmt: skip

    with open_stack(paths[:2], n_genes=20, chunk_rows=128, window=2, progress=False) as st:
        full = run()
        cut = run(stop=9, checkpoint=ckpt)  # 7 steps an epoch: stopped in the second
        assert (
            cut.interrupted
            and len(cut.history) == 1
            and cut.data_info["placement"] == "CSR batches streamed from disk chunks"
        )
        back = run(checkpoint=ckpt, resume=True)
    assert back.history == full.history
    for a, b in zip(full.model.state_dict().values(), back.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
