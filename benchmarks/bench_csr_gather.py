"""CSR gather + normalise + log1p: C++ op vs the numpy/scipy reference on a training-sized batch.

A 100k × 5000 count matrix at 5 % density (25 M stored counts, ~200 MB), B = 4096 random rows mapped onto
M = 4000 of the genes (the rest dropped), target_sum 1e4 + log1p, as the batch streamer calls it; once with a
fresh output per call, once refilling the previous batch's array (``out=``).

    pytest benchmarks/bench_csr_gather.py --benchmark-only            (add --benchmark-json=... to keep results)
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from inrscrecon._ext import has_cpu_ops
from inrscrecon.data.csr_gather import gather_normalized

N_ROWS, N_COLS, DENSITY, BATCH, N_OUT = 100_000, 5000, 0.05, 4096, 4000


@pytest.fixture(scope="module")
def counts() -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    chunks = []
    for start in range(0, N_ROWS, 10_000):  # build in chunks: never a dense 100k × 5000 array
        mask = rng.random((min(10_000, N_ROWS - start), N_COLS), dtype=np.float32) < DENSITY
        dense = mask * (rng.poisson(2.0, size=mask.shape).astype(np.float32) + 1)
        chunks.append(sp.csr_matrix(dense))
    return sp.vstack(chunks, format="csr")


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    rows = rng.integers(0, N_ROWS, size=BATCH)
    col_map = np.full(N_COLS, -1, dtype=np.int32)
    col_map[rng.permutation(N_COLS)[:N_OUT]] = np.arange(N_OUT, dtype=np.int32)
    return rows, col_map


@pytest.mark.parametrize(
    "impl",
    [
        "numpy",
        pytest.param("cpp", marks=pytest.mark.skipif(not has_cpu_ops(), reason="inrscrecon._C not built")),
    ],
)
@pytest.mark.parametrize("reuse_out", [False, True], ids=["alloc", "reuse_out"])
def test_gather_normalized(benchmark, counts, batch, impl, reuse_out):
    rows, col_map = batch
    buf = np.empty((BATCH, N_OUT), dtype=np.float32) if reuse_out else None
    out = benchmark(gather_normalized, counts, rows, col_map, N_OUT, 1e4, True, None, impl, buf)
    assert out.shape == (BATCH, N_OUT)
    seconds = benchmark.stats.stats.mean
    nnz = int(np.diff(counts.indptr)[rows].sum())
    benchmark.extra_info.update(
        {
            "rows_per_s": BATCH / seconds,
            "nnz_per_s": nnz / seconds,
            "out_GB_per_s": out.nbytes / seconds / 1e9,
        }
    )
