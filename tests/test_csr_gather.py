"""CSR gather + normalise + log1p: C++ op and numpy reference vs a dense scipy reference (and each other)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from inrscrecon._ext import has_cpu_ops, load_extension
from inrscrecon.data.csr_gather import gather_normalized, row_totals
from inrscrecon.errors import InputError

NOT_BUILT = "inrscrecon._C is not built (pip install --no-build-isolation -e .)"
CPP = pytest.param("cpp", marks=pytest.mark.skipif(not has_cpu_ops(), reason=NOT_BUILT))
IMPLS = ["numpy", CPP]
RTOL, ATOL = 1e-5, 1e-6  # float32 output; totals and scaling in float64 in all three paths


def make_counts(
    n_rows: int, n_cols: int, density: float, seed: int, index_dtype: str = "int32"
) -> sp.csr_matrix:
    """Poisson-ish counts [n_rows, n_cols] with every third row empty; index_dtype "int32" | "int64" | "mixed"."""
    rng = np.random.default_rng(seed)
    dense = rng.poisson(3.0, size=(n_rows, n_cols)).astype(np.float32) + 1
    dense *= rng.random((n_rows, n_cols)) < density
    dense[::3] = 0
    m = sp.csr_matrix(dense)
    if index_dtype in ("int64", "mixed"):
        m.indptr = m.indptr.astype(np.int64)
    if index_dtype == "int64":
        m.indices = m.indices.astype(np.int64)
    return m


def dense_reference(
    m: sp.csr_matrix,
    rows: np.ndarray,
    col_map: np.ndarray | None,
    n_out: int,
    target_sum: float,
    log1p: bool,
    totals: np.ndarray | None,
) -> np.ndarray:
    dense = m.toarray().astype(np.float64)
    x = dense[rows]
    if target_sum > 0:
        tot = dense.sum(axis=1)[rows] if totals is None else totals[rows].astype(np.float64)
        x = x * np.divide(target_sum, tot, out=np.zeros_like(tot), where=tot > 0)[:, None]
    cmap = np.arange(m.shape[1]) if col_map is None else col_map
    out = np.zeros((len(rows), n_out))
    for j, c in enumerate(cmap):  # columns, not rows: tiny test matrices
        if c >= 0:
            out[:, c] += x[:, j]
    return (np.log1p(out) if log1p else out).astype(np.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("index_dtype", ["int32", "int64", "mixed"])
@pytest.mark.parametrize(
    ("n_rows", "n_cols", "n_sel"), [(1, 1, 1), (7, 13, 20), (129, 37, 64), (300, 1000, 257)]
)
@pytest.mark.parametrize("mapped", [False, True])
def test_matches_dense_reference(impl, index_dtype, n_rows, n_cols, n_sel, mapped):
    m = make_counts(n_rows, n_cols, 0.3, seed=n_rows + n_cols, index_dtype=index_dtype)
    rng = np.random.default_rng(1)
    rows = rng.integers(0, n_rows, size=n_sel)  # repeats and empty rows included
    col_map = None
    n_out = n_cols
    if mapped:  # shuffle columns into fewer outputs and drop about a third
        n_out = max(1, (2 * n_cols) // 3)
        col_map = np.full(n_cols, -1, dtype=np.int64)
        keep = rng.permutation(n_cols)[:n_out]
        col_map[keep] = rng.permutation(n_out)
    got = gather_normalized(m, rows, col_map, n_out, impl=impl)
    assert got.dtype == np.float32 and got.shape == (n_sel, n_out)
    np.testing.assert_allclose(got, dense_reference(m, rows, col_map, n_out, 1e4, True, None), RTOL, ATOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("target_sum", [1e4, 1.0, 0.0, -1.0])
@pytest.mark.parametrize("log1p", [True, False])
@pytest.mark.parametrize("given_totals", [False, True])
def test_options(impl, target_sum, log1p, given_totals):
    m = make_counts(50, 30, 0.4, seed=3)
    rows = np.array([0, 1, 2, 2, 49, 3, 0, 48])
    totals = None
    if given_totals:
        totals = (np.arange(50, dtype=np.float32) * 7.5).astype(np.float32)  # row 0 has total 0 → zeros
    col_map = np.where(np.arange(30) % 4 == 0, -1, np.arange(30) // 2)
    n_out = 15
    got = gather_normalized(m, rows, col_map, n_out, target_sum, log1p, totals, impl=impl)
    want = dense_reference(m, rows, col_map, n_out, target_sum, log1p, totals)
    np.testing.assert_allclose(got, want, RTOL, ATOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_library_size_counts_dropped_columns(impl):
    m = sp.csr_matrix(np.array([[1.0, 3.0], [0.0, 0.0]], dtype=np.float32))
    got = gather_normalized(m, [0, 1], col_map=[0, -1], n_out=1, target_sum=4.0, log1p=False, impl=impl)
    np.testing.assert_allclose(got, [[1.0], [0.0]])  # 1 · 4 / (1 + 3): the dropped 3 counts in the total


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicate_columns_are_summed(impl):
    m = sp.csr_matrix(
        (np.array([1.0, 2.0, 5.0], np.float32), np.array([1, 1, 0]), np.array([0, 3])), shape=(1, 2)
    )
    assert not m.has_canonical_format
    got = gather_normalized(m, [0, 0], target_sum=8.0, impl=impl)
    want = np.log1p(np.array([[5.0, 3.0], [5.0, 3.0]]) * 8.0 / 8.0)
    np.testing.assert_allclose(got, want, RTOL, ATOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("data_dtype", [np.float64, np.int32])
def test_other_data_dtypes_and_csr_array(impl, data_dtype):
    m32 = make_counts(40, 17, 0.5, seed=7)
    m = sp.csr_array(m32.astype(data_dtype))
    rows = np.array([5, 1, 5, 39])
    np.testing.assert_allclose(
        gather_normalized(m, rows, impl=impl),
        dense_reference(m32, rows, None, 17, 1e4, True, None),
        RTOL,
        ATOL,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_and_empty_matrix(impl):
    m = make_counts(5, 4, 0.5, seed=0)
    assert gather_normalized(m, np.array([], dtype=np.int64), impl=impl).shape == (0, 4)
    empty = sp.csr_matrix((3, 6), dtype=np.float32)
    np.testing.assert_array_equal(gather_normalized(empty, [2, 0], impl=impl), np.zeros((2, 6), np.float32))


@pytest.mark.skipif(not has_cpu_ops(), reason=NOT_BUILT)
def test_cpp_matches_numpy_on_a_bigger_matrix():
    m = make_counts(2000, 500, 0.05, seed=11)
    rows = np.random.default_rng(0).integers(0, 2000, size=1000)
    col_map = np.where(np.arange(500) < 400, np.arange(500), -1)
    np.testing.assert_allclose(
        gather_normalized(m, rows, col_map, impl="cpp"),
        gather_normalized(m, rows, col_map, impl="numpy"),
        RTOL,
        ATOL,
    )


def test_row_totals():
    m = make_counts(20, 9, 0.5, seed=2)
    np.testing.assert_allclose(row_totals(m), m.toarray().sum(axis=1), rtol=1e-6)
    assert row_totals(m).dtype == np.float32


# ---- bad input ---------------------------------------------------------------------------------------------


def _small() -> sp.csr_matrix:
    return sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 0], [3, 4, 0], [0, 5, 0]], dtype=np.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_negative_value_names_the_row(impl):
    m = _small()
    m.data[3] = -4.0  # row 2, column 1
    with pytest.raises(InputError, match=r"row 2 .*negative"):
        gather_normalized(m, [0, 2], impl=impl)
    m.data[3] = np.nan
    with pytest.raises(InputError, match=r"row 2 .*not finite"):
        gather_normalized(m, [2], impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_indices_and_indptr(impl):
    m = _small()
    m.indices[4] = 7  # row 3 points past the 3 columns
    with pytest.raises(InputError, match=r"row 3 .*column index indices\[4\] = 7 is out of range"):
        gather_normalized(m, [3], impl=impl)
    m = _small()
    m.indptr[2] = 1
    m.indptr[1] = 3  # row 1: [3, 1) is decreasing
    with pytest.raises(InputError, match=r"row 1 .*indptr"):
        gather_normalized(m, [0, 1], impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments(impl):
    m = _small()
    with pytest.raises(InputError, match=r"rows\[1\] = 4 is out of range"):
        gather_normalized(m, [0, 4], impl=impl)
    with pytest.raises(InputError, match=r"col_map\[2\] = 5 is out of range"):
        gather_normalized(m, [0], col_map=[0, 1, 5], n_out=3, impl=impl)
    with pytest.raises(InputError, match="one entry per column"):
        gather_normalized(m, [0], col_map=[0, 1], impl=impl)
    with pytest.raises(InputError, match=r"row_totals\[0\] = -1"):
        gather_normalized(m, [0], row_totals=np.array([-1, 1, 1, 1]), impl=impl)
    with pytest.raises(InputError, match="CSR"):
        gather_normalized(m.tocsc(), [0], impl=impl)
    with pytest.raises(InputError, match="impl"):
        gather_normalized(m, [0], impl="fortran")


@pytest.mark.skipif(not has_cpu_ops(), reason=NOT_BUILT)
def test_raw_op_checks_its_arguments():
    import torch

    ext = load_extension()
    indptr = torch.tensor([0, 1, 2])
    indices = torch.tensor([0, 1], dtype=torch.int32)
    data = torch.tensor([1.0, 2.0])
    rows = torch.tensor([0, 1])
    assert ext.csr_gather(indptr, indices, data, rows, None, 2, 2, 0.0, False, None).tolist() == [
        [1, 0],
        [0, 2],
    ]
    with pytest.raises(ValueError, match="data has unsupported dtype"):
        ext.csr_gather(indptr, indices, data.double(), rows, None, 2, 2, 1.0, True, None)
    with pytest.raises(ValueError, match=r"indptr\[n_rows\] = 2 must equal nnz = 1"):
        ext.csr_gather(indptr, indices[:1], data[:1], rows, None, 2, 2, 1.0, True, None)
    with pytest.raises(ValueError, match="same length"):
        ext.csr_gather(indptr, indices, data[:1], rows, None, 2, 2, 1.0, True, None)
    with pytest.raises(ValueError, match="without col_map"):
        ext.csr_gather(indptr, indices, data, rows, None, 2, 3, 1.0, True, None)
    with pytest.raises(ValueError, match="row_totals has 1 entries"):
        ext.csr_gather(indptr, indices, data, rows, None, 2, 2, 1.0, True, torch.ones(1))


@pytest.mark.skipif(not has_cpu_ops(), reason=NOT_BUILT)
def test_cpp_is_deterministic_across_thread_counts():
    import torch

    m = make_counts(3000, 200, 0.1, seed=5)
    rows = np.random.default_rng(2).integers(0, 3000, size=2048)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gather_normalized(m, rows, impl="cpp")
        torch.set_num_threads(max(2, before))
        many = gather_normalized(m, rows, impl="cpp")
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(one, many)


def test_fallback_when_extension_missing(monkeypatch):
    import inrscrecon._ext as ext_mod

    def missing(name: str):
        raise ImportError(f"No module named {name!r}")

    ext_mod.load_extension.cache_clear()
    monkeypatch.setattr(ext_mod.importlib, "import_module", missing)
    try:
        with pytest.warns(RuntimeWarning, match="numpy/torch fallback"):
            assert ext_mod.load_extension() is None
        assert not ext_mod.has_cpu_ops() and not ext_mod.has_cuda_ops()
        m = make_counts(10, 5, 0.5, seed=0)
        np.testing.assert_allclose(
            gather_normalized(m, [1, 2]),
            dense_reference(m, np.array([1, 2]), None, 5, 1e4, True, None),
            RTOL,
            ATOL,
        )
        with pytest.raises(InputError, match="not built"):
            gather_normalized(m, [1], impl="cpp")
    finally:
        monkeypatch.undo()
        ext_mod.load_extension.cache_clear()


@pytest.mark.parametrize("impl", IMPLS)
def test_out_buffer_is_filled_and_returned(impl):
    m = make_counts(30, 12, 0.5, seed=4)
    rows = np.array([3, 7, 7, 29, 0])
    buf = np.full((5, 12), 123.0, dtype=np.float32)  # stale contents must be overwritten
    got = gather_normalized(m, rows, out=buf, impl=impl)
    assert got is buf
    np.testing.assert_allclose(buf, dense_reference(m, rows, None, 12, 1e4, True, None), RTOL, ATOL)
    with pytest.raises(InputError, match="out must be"):
        gather_normalized(m, rows, out=np.zeros((5, 11), np.float32), impl=impl)
    with pytest.raises(InputError, match="out must be"):
        gather_normalized(m, rows, out=np.zeros((5, 12), np.float64), impl=impl)
