// CSR row gather + normalise + log1p: see csr_gather.h for the semantics.
//
// Rows are independent, so the batch is split over threads (OpenMP when compiled with it, std::thread
// otherwise). Data-dependent checks (indptr order, column bounds, negative values) run inside the parallel loop
// and only record a per-row status; the first bad row is then re-walked serially to build a precise message.
#include "csr_gather.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace inrscrecon {
namespace {

enum RowStatus : uint8_t { kOk = 0, kBadIndptr, kBadIndex, kBadValue, kBadTotal };

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument("csr_gather: " + msg); }

inline bool valid_value(double x) { return x >= 0.0 && x <= std::numeric_limits<double>::max(); }

// Gathers one selected row into o [n_out]; returns its status (o is garbage unless kOk).
template <typename IndptrT, typename IndexT>
RowStatus gather_row(const CsrGatherArgs<IndptrT, IndexT>& a, int64_t i, float* o) {
  const int64_t r = a.rows[i];
  const int64_t start = static_cast<int64_t>(a.indptr[r]);
  const int64_t end = static_cast<int64_t>(a.indptr[r + 1]);
  if (start < 0 || end < start || end > a.nnz) return kBadIndptr;
  std::fill(o, o + a.n_out, 0.0f);

  double scale = 1.0;
  if (a.target_sum > 0.0) {
    double total = 0.0;
    if (a.row_totals != nullptr) {
      total = static_cast<double>(a.row_totals[r]);
      if (!valid_value(total)) return kBadTotal;
    } else {
      for (int64_t k = start; k < end; ++k) total += static_cast<double>(a.data[k]);
      // A negative / non-finite entry is reported by the entry loop below; here just avoid using the total.
      if (!valid_value(total)) total = 0.0;
    }
    scale = total > 0.0 ? a.target_sum / total : 0.0;
  }

  // Pass 1: bounds + value checks, scaled accumulation (sums duplicate columns).
  for (int64_t k = start; k < end; ++k) {
    const int64_t c = static_cast<int64_t>(a.indices[k]);
    if (c < 0 || c >= a.n_cols) return kBadIndex;
    const double x = static_cast<double>(a.data[k]);
    if (!valid_value(x)) return kBadValue;
    const int64_t oc = a.col_map != nullptr ? a.col_map[c] : c;
    if (oc >= 0) o[oc] += static_cast<float>(x * scale);
  }
  if (!a.log1p) return kOk;
  // Pass 2: log1p each touched output once. A transformed cell is marked by a negative sign (all values are
  // >= 0 and log1p(v) > 0 for v > 0), so a duplicate column is not transformed twice; pass 3 clears the marks.
  for (int64_t k = start; k < end; ++k) {
    const int64_t c = static_cast<int64_t>(a.indices[k]);
    const int64_t oc = a.col_map != nullptr ? a.col_map[c] : c;
    if (oc >= 0 && o[oc] > 0.0f) o[oc] = -static_cast<float>(std::log1p(static_cast<double>(o[oc])));
  }
  for (int64_t k = start; k < end; ++k) {
    const int64_t c = static_cast<int64_t>(a.indices[k]);
    const int64_t oc = a.col_map != nullptr ? a.col_map[c] : c;
    if (oc >= 0 && o[oc] < 0.0f) o[oc] = -o[oc];
  }
  return kOk;
}

// Message for the first bad row (status != kOk), found again serially.
template <typename IndptrT, typename IndexT>
[[noreturn]] void report_row(const CsrGatherArgs<IndptrT, IndexT>& a, int64_t i, RowStatus status) {
  const int64_t r = a.rows[i];
  std::ostringstream msg;
  msg << "row " << r << " (rows[" << i << "]): ";
  const int64_t start = static_cast<int64_t>(a.indptr[r]);
  const int64_t end = static_cast<int64_t>(a.indptr[r + 1]);
  if (status == kBadIndptr) {
    msg << "indptr[" << r << "] = " << start << ", indptr[" << r + 1 << "] = " << end
        << " must be non-decreasing and within [0, nnz = " << a.nnz << "]";
  } else if (status == kBadTotal) {
    msg << "row_totals[" << r << "] = " << a.row_totals[r] << " is negative or not finite";
  } else {
    for (int64_t k = start; k < end; ++k) {
      const int64_t c = static_cast<int64_t>(a.indices[k]);
      if (c < 0 || c >= a.n_cols) {
        msg << "column index indices[" << k << "] = " << c << " is out of range [0, " << a.n_cols << ")";
        fail(msg.str());
      }
      if (!valid_value(static_cast<double>(a.data[k]))) {
        msg << "value data[" << k << "] = " << a.data[k] << " (column " << c
            << ") is negative or not finite; expected non-negative counts";
        fail(msg.str());
      }
    }
    msg << "invalid entries";
  }
  fail(msg.str());
}

// O(n_cols + n_sel) checks of everything that is not per-entry.
template <typename IndptrT, typename IndexT>
void check_args(const CsrGatherArgs<IndptrT, IndexT>& a) {
  if (a.n_rows < 0 || a.n_cols < 0 || a.nnz < 0 || a.n_sel < 0 || a.n_out < 0) fail("negative size");
  if (a.indptr == nullptr) fail("indptr is null");
  if (a.nnz > 0 && (a.indices == nullptr || a.data == nullptr)) fail("indices/data are null");
  if (a.n_sel > 0 && a.rows == nullptr) fail("rows is null");
  if (static_cast<int64_t>(a.indptr[0]) != 0) {
    fail("indptr[0] must be 0, got " + std::to_string(static_cast<int64_t>(a.indptr[0])));
  }
  if (static_cast<int64_t>(a.indptr[a.n_rows]) != a.nnz) {
    fail("indptr[n_rows] = " + std::to_string(static_cast<int64_t>(a.indptr[a.n_rows])) +
         " must equal nnz = " + std::to_string(a.nnz));
  }
  if (std::isnan(a.target_sum)) fail("target_sum is NaN");
  if (a.col_map == nullptr) {
    if (a.n_out != a.n_cols) {
      fail("without col_map n_out (" + std::to_string(a.n_out) + ") must equal n_cols (" +
           std::to_string(a.n_cols) + ")");
    }
  } else {
    for (int64_t j = 0; j < a.n_cols; ++j) {
      if (a.col_map[j] < -1 || a.col_map[j] >= a.n_out) {
        fail("col_map[" + std::to_string(j) + "] = " + std::to_string(a.col_map[j]) + " is out of range [-1, " +
             std::to_string(a.n_out) + ")");
      }
    }
  }
  for (int64_t i = 0; i < a.n_sel; ++i) {
    if (a.rows[i] < 0 || a.rows[i] >= a.n_rows) {
      fail("rows[" + std::to_string(i) + "] = " + std::to_string(a.rows[i]) +
           " is out of range for a matrix with " + std::to_string(a.n_rows) + " rows");
    }
  }
}

}  // namespace

template <typename IndptrT, typename IndexT>
void csr_gather_normalize(const CsrGatherArgs<IndptrT, IndexT>& a, float* out, int n_threads) {
  check_args(a);
  if (a.n_sel == 0) return;
  if (out == nullptr) fail("out is null");
  std::vector<uint8_t> status(static_cast<size_t>(a.n_sel), kOk);
  const int64_t n_sel = a.n_sel;
  const int64_t n_out = a.n_out;
#ifdef _OPENMP
  if (n_threads <= 0) n_threads = omp_get_max_threads();
  if (n_sel < 64) n_threads = 1;  // not worth waking the team
#pragma omp parallel for schedule(dynamic, 16) num_threads(n_threads) if (n_threads > 1)
  for (int64_t i = 0; i < n_sel; ++i) status[i] = gather_row(a, i, out + i * n_out);
#else
  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (n_sel < 64) n_threads = 1;
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) status[i] = gather_row(a, i, out + i * n_out);
  };
  if (n_threads == 1) {
    work(0, n_sel);
  } else {
    std::vector<std::thread> pool;
    const int64_t chunk = (n_sel + n_threads - 1) / n_threads;
    for (int64_t begin = 0; begin < n_sel; begin += chunk) pool.emplace_back(work, begin, std::min(n_sel, begin + chunk));
    for (auto& t : pool) t.join();
  }
#endif
  for (int64_t i = 0; i < n_sel; ++i) {
    if (status[i] != kOk) report_row(a, i, static_cast<RowStatus>(status[i]));
  }
}

template void csr_gather_normalize(const CsrGatherArgs<int32_t, int32_t>&, float*, int);
template void csr_gather_normalize(const CsrGatherArgs<int32_t, int64_t>&, float*, int);
template void csr_gather_normalize(const CsrGatherArgs<int64_t, int32_t>&, float*, int);
template void csr_gather_normalize(const CsrGatherArgs<int64_t, int64_t>&, float*, int);

}  // namespace inrscrecon
