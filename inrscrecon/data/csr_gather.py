"""Sparse rows → dense normalised batch: CSR row gather + library-size normalisation + log1p.

This is the step that feeds training batches (DESIGN "stream"): pick B cells out of a sparse [N, G] count
matrix, map their genes onto the M model genes and normalise each cell to ``target_sum`` counts, then log1p::

    out[i, col_map[c]] = log1p(x[rows[i], c] · target_sum / total[rows[i]])

``total`` is the library size: ``row_totals`` when given, else the sum of *all* stored entries of the row (genes
dropped by ``col_map`` included). A row with total 0 gives zeros; ``target_sum <= 0`` skips normalisation.

``impl="numpy"`` is the readable, vectorised scipy reference; ``impl="cpp"`` calls the compiled
``inrscrecon._C.csr_gather`` (csrc/csr_gather.cpp, OpenMP over rows); ``"auto"`` uses the C++ op when built.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from inrscrecon._ext import has_cpu_ops, load_extension
from inrscrecon.errors import InputError

IMPLS = ("auto", "numpy", "cpp")


def row_totals(matrix: Any) -> np.ndarray:
    """Library sizes of a CSR matrix [N, G]: the sum of every stored entry per row → [N] float32.

    Accumulated in float64. Compute it once on the full gene set and pass it to :func:`gather_normalized`
    when the matrix you gather from holds only a subset of the genes (or a chunk of another matrix).
    """
    csr = _as_csr(matrix)
    owner = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
    return np.bincount(owner, weights=csr.data.astype(np.float64), minlength=csr.shape[0]).astype(np.float32)


def gather_normalized(
    matrix: Any,  # scipy.sparse CSR [N, G], non-negative counts
    rows: Any,  # [B] int, any order, repeats allowed
    col_map: Any | None = None,  # [G] int, output column of each gene or -1 to drop; None: identity
    n_out: int | None = None,  # output columns M; default max(col_map) + 1 (G without col_map)
    target_sum: float = 1e4,
    log1p: bool = True,
    row_totals: Any | None = None,  # [N] library sizes; None: sum of all stored entries per row
    impl: str = "auto",
    out: np.ndarray
    | None = None,  # [B, M] float32 C-contiguous buffer to fill and return (reuse it per batch)
) -> np.ndarray:
    """Gather ``rows`` of a CSR count matrix into a dense, normalised [B, M] float32 array (see module doc).

    Passing the previous batch's array as ``out`` skips allocating (and page-faulting) a fresh [B, M] block,
    which is most of the cost of a large batch.

    Raises :class:`~inrscrecon.errors.InputError` naming the offending row on out-of-range rows / columns,
    a broken ``indptr`` or negative / non-finite values.
    """
    if impl not in IMPLS:
        raise InputError(f"impl must be one of {IMPLS}, got {impl!r}")
    csr = _as_csr(matrix)
    n_rows, n_cols = csr.shape
    rows_arr = _as_rows(rows, n_rows)
    cmap, n_out = _as_col_map(col_map, n_out, n_cols)
    totals = None
    if row_totals is not None:
        totals = np.ascontiguousarray(np.asarray(row_totals, dtype=np.float32).reshape(-1))
        if totals.shape[0] != n_rows:
            raise InputError(f"row_totals has {totals.shape[0]} entries, expected one per row ({n_rows})")
    target = float(target_sum)
    if np.isnan(target):
        raise InputError("target_sum is NaN")
    if csr.data.dtype != np.float32:
        # The C++ op reads float32: convert only the selected rows (B rows), never the whole matrix.
        _check_indptr(csr, rows_arr)
        csr = _select(csr, rows_arr)
        csr.data = csr.data.astype(np.float32)
        if totals is not None:
            totals = np.ascontiguousarray(totals[rows_arr])
        rows_arr = np.arange(rows_arr.shape[0], dtype=np.int64)

    if out is not None and (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != (rows_arr.shape[0], n_out)
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise InputError(
            f"out must be a writeable C-contiguous float32 array of shape ({rows_arr.shape[0]}, {n_out})"
        )
    use_cpp = impl == "cpp" or (impl == "auto" and has_cpu_ops())
    if impl == "cpp" and not has_cpu_ops():
        raise InputError("impl='cpp' requested but the compiled extension inrscrecon._C is not built")
    if use_cpp:
        return _gather_cpp(csr, rows_arr, cmap, n_out, target, log1p, totals, out)
    block = _gather_numpy(csr, rows_arr, cmap, n_out, target, log1p, totals)
    if out is None:
        return block
    out[...] = block
    return out


def _gather_numpy(
    csr: Any,
    rows: np.ndarray,  # [B] int64, in range
    cmap: np.ndarray | None,  # [G] int32
    n_out: int,
    target_sum: float,
    log1p: bool,
    totals: np.ndarray | None,  # [N] float32
) -> np.ndarray:
    """Reference: scipy row selection, then per-entry scaling with no Python loop over rows."""
    _check_indptr(csr, rows)
    sub = _select(csr, rows)  # [B, G], entries of each selected row in their stored order
    n_sel = rows.shape[0]
    owner = np.repeat(np.arange(n_sel), np.diff(sub.indptr))  # batch row of each stored entry
    cols = sub.indices.astype(np.int64)
    vals = sub.data.astype(np.float64)

    def where(k: int) -> tuple[str, int]:  # "row r (rows[i])" and the entry's position in the source arrays
        i = int(owner[k])
        return f"csr_gather: row {rows[i]} (rows[{i}]): ", int(csr.indptr[rows[i]]) + k - int(sub.indptr[i])

    bad_col = (cols < 0) | (cols >= csr.shape[1])
    if bad_col.any():
        k = int(np.argmax(bad_col))
        head, pos = where(k)
        raise InputError(f"{head}column index indices[{pos}] = {cols[k]} is out of range [0, {csr.shape[1]})")
    bad_val = ~np.isfinite(vals) | (vals < 0)
    if bad_val.any():
        k = int(np.argmax(bad_val))
        head, pos = where(k)
        raise InputError(
            f"{head}value data[{pos}] = {vals[k]} (column {cols[k]}) is negative or not finite; "
            "expected non-negative counts"
        )
    if target_sum > 0:
        if totals is not None:
            tot = totals[rows].astype(np.float64)
            bad = ~np.isfinite(tot) | (tot < 0)
            if bad.any():
                i = int(np.argmax(bad))
                raise InputError(
                    f"csr_gather: row {rows[i]} (rows[{i}]): row_totals[{rows[i]}] = {tot[i]} is negative or "
                    "not finite"
                )
        else:
            tot = np.bincount(owner, weights=vals, minlength=n_sel)
        scale = np.divide(target_sum, tot, out=np.zeros(n_sel), where=tot > 0)
        vals = vals * scale[owner]
    out_cols = cols if cmap is None else cmap[cols].astype(np.int64)
    keep = out_cols >= 0
    block = sp.csr_matrix((vals[keep], (owner[keep], out_cols[keep])), shape=(n_sel, n_out))
    block.sum_duplicates()  # a non-canonical CSR may repeat a column within a row: add, as toarray() would
    if log1p:
        block.data = np.log1p(block.data)
    return block.toarray().astype(np.float32)


def _gather_cpp(
    csr: Any,
    rows: np.ndarray,
    cmap: np.ndarray | None,
    n_out: int,
    target_sum: float,
    log1p: bool,
    totals: np.ndarray | None,
    out: np.ndarray | None,
) -> np.ndarray:
    import torch

    ext = load_extension()
    assert ext is not None

    def index_array(a: np.ndarray) -> torch.Tensor:
        if a.dtype not in (np.int32, np.int64):
            a = a.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(a))

    try:
        result = ext.csr_gather(
            index_array(csr.indptr),
            index_array(csr.indices),
            torch.from_numpy(np.ascontiguousarray(csr.data)),
            torch.from_numpy(rows),
            None if cmap is None else torch.from_numpy(cmap),
            int(csr.shape[1]),
            int(n_out),
            float(target_sum),
            bool(log1p),
            None if totals is None else torch.from_numpy(totals),
            None if out is None else torch.from_numpy(out),
        )
    except ValueError as err:  # the op's input checks: re-raise as the project's input error
        raise InputError(str(err)) from None
    return result.numpy() if out is None else out


def _as_csr(matrix: Any) -> Any:
    if not sp.issparse(matrix) or matrix.format != "csr":
        kind = getattr(matrix, "format", type(matrix).__name__)
        raise InputError(f"expected a scipy.sparse CSR matrix, got {kind}; convert it with .tocsr()")
    if matrix.ndim != 2:
        raise InputError(f"expected a 2-D CSR matrix, got shape {matrix.shape}")
    return matrix


def _as_rows(rows: Any, n_rows: int) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.ndim != 1:
        raise InputError(f"rows must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"rows must be integers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    bad = (arr < 0) | (arr >= n_rows)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"csr_gather: rows[{i}] = {arr[i]} is out of range for a matrix with {n_rows} rows")
    return arr


def _as_col_map(col_map: Any | None, n_out: int | None, n_cols: int) -> tuple[np.ndarray | None, int]:
    if col_map is None:
        if n_out is not None and n_out != n_cols:
            raise InputError(
                f"without col_map n_out must equal the number of columns ({n_cols}), got {n_out}"
            )
        return None, n_cols
    cmap = np.asarray(col_map)
    if cmap.shape != (n_cols,):
        raise InputError(f"col_map must have one entry per column, shape ({n_cols},), got {cmap.shape}")
    if cmap.size and not np.issubdtype(cmap.dtype, np.integer):
        raise InputError(f"col_map must be integers, got dtype {cmap.dtype}")
    cmap = np.ascontiguousarray(cmap, dtype=np.int32)
    if n_out is None:
        n_out = int(cmap.max()) + 1 if cmap.size else 0
    bad = (cmap < -1) | (cmap >= n_out)
    if bad.any():
        j = int(np.argmax(bad))
        raise InputError(f"csr_gather: col_map[{j}] = {cmap[j]} is out of range [-1, {n_out})")
    return cmap, int(n_out)


def _check_indptr(csr: Any, rows: np.ndarray) -> None:
    """indptr must start at 0, end at nnz and be non-decreasing on the selected rows (what scipy would trust)."""
    indptr = csr.indptr
    nnz = csr.indices.shape[0]
    if indptr.shape[0] != csr.shape[0] + 1 or int(indptr[0]) != 0 or int(indptr[-1]) != nnz:
        raise InputError(
            f"csr_gather: indptr must have n_rows + 1 = {csr.shape[0] + 1} entries from 0 to nnz = {nnz}, "
            f"got {indptr.shape[0]} entries from {indptr[0] if indptr.size else None} to "
            f"{indptr[-1] if indptr.size else None}"
        )
    start = indptr[rows].astype(np.int64)
    end = indptr[rows + 1].astype(np.int64)
    bad = (start < 0) | (end < start) | (end > nnz)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"csr_gather: row {rows[i]} (rows[{i}]): indptr[{rows[i]}] = {start[i]}, indptr[{rows[i] + 1}] = "
            f"{end[i]} must be non-decreasing and within [0, nnz = {nnz}]"
        )


def _select(csr: Any, rows: np.ndarray) -> Any:
    """Rows of a CSR matrix (repeats allowed) as a new CSR matrix [B, G], by index arithmetic (no validation)."""
    indptr = csr.indptr.astype(np.int64)
    start = indptr[rows]
    counts = indptr[rows + 1] - start
    new_indptr = np.zeros(rows.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=new_indptr[1:])
    # position of every selected entry in the source arrays: start of its row + offset within the row
    offsets = np.arange(int(new_indptr[-1]), dtype=np.int64) - np.repeat(new_indptr[:-1], counts)
    src = np.repeat(start, counts) + offsets
    return sp.csr_matrix(
        (csr.data[src], csr.indices[src], new_indptr), shape=(rows.shape[0], csr.shape[1]), copy=False
    )


__all__ = ["IMPLS", "gather_normalized", "row_totals"]
