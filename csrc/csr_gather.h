// CSR row gather + library-size normalisation + log1p into a dense float32 block (pure C++, no torch).
//
// For each selected row i (matrix row r = rows[i]) and each stored entry (c, x) of that row:
//     out[i, col_map[c]] += x * scale_i        (entries with col_map[c] == -1 are dropped)
//     scale_i = target_sum / total_r           (target_sum > 0; total_r == 0 gives a row of zeros)
//     scale_i = 1                              (target_sum <= 0: no normalisation)
// then out[i, :] = log1p(out[i, :]) when log1p is set. total_r = row_totals[r] when given, else the sum of
// ALL stored entries of row r (dropped columns included), i.e. the library size. Duplicate column indices in a
// row (non-canonical CSR) are summed before log1p, as scipy's toarray() does.
#pragma once

#include <cstdint>

namespace inrscrecon {

template <typename IndptrT, typename IndexT>
struct CsrGatherArgs {
  const IndptrT* indptr = nullptr;    // [n_rows + 1], indptr[0] == 0, indptr[n_rows] == nnz
  const IndexT* indices = nullptr;    // [nnz] column of each stored entry, in [0, n_cols)
  const float* data = nullptr;        // [nnz] non-negative, finite values (counts)
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  int64_t nnz = 0;
  const int64_t* rows = nullptr;      // [n_sel] rows to gather, any order, repeats allowed
  int64_t n_sel = 0;
  const int32_t* col_map = nullptr;   // [n_cols] output column of each input column, -1 drops it; nullptr = identity
  int64_t n_out = 0;                  // output columns (== n_cols when col_map is nullptr)
  double target_sum = 1e4;            // <= 0: no normalisation
  bool log1p = true;
  const float* row_totals = nullptr;  // [n_rows] library sizes, or nullptr to sum each row
};

// Fills out [n_sel, n_out] (row-major, float32; need not be initialised). Throws std::invalid_argument with a
// message naming the offending row / position on bad input. n_threads <= 0 uses every available thread.
template <typename IndptrT, typename IndexT>
void csr_gather_normalize(const CsrGatherArgs<IndptrT, IndexT>& args, float* out, int n_threads);

}  // namespace inrscrecon
