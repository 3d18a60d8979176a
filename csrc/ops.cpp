// The one pybind11 module inrscrecon._C: CPU ops always, CUDA ops when compiled WITH_CUDA. The GEMM + fused-loss
// sparse head (sparse_head.cpp) registers itself with torch.library when this module loads.
//
// Bindings check dtypes / shapes / devices at the boundary and raise ValueError (std::invalid_argument) with a
// message naming the argument; the pure-C++ cores behind them check the data itself.
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "csr_gather.h"

namespace inrscrecon {
namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("csr_gather: " + msg);
}

void require_vector(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> dtypes) {
  require(t.device().is_cpu(), std::string(name) + " must be a CPU tensor");
  require(t.dim() == 1, std::string(name) + " must be 1-D, got " + std::to_string(t.dim()) + " dims");
  require(t.is_contiguous(), std::string(name) + " must be contiguous");
  bool ok = false;
  for (auto d : dtypes) ok = ok || t.scalar_type() == d;
  require(ok, std::string(name) + " has unsupported dtype " + std::string(c10::toString(t.scalar_type())));
}

template <typename IndptrT, typename IndexT>
void run_gather(CsrGatherArgs<IndptrT, IndexT> args, const at::Tensor& indptr, const at::Tensor& indices,
                float* out) {
  args.indptr = indptr.data_ptr<IndptrT>();
  args.indices = indices.numel() > 0 ? indices.data_ptr<IndexT>() : nullptr;
  const int n_threads = at::get_num_threads();
  pybind11::gil_scoped_release no_gil;
  csr_gather_normalize(args, out, n_threads);
}

// Dense [B, n_out] float32 block of normalised rows; see csr_gather.h.
at::Tensor csr_gather(const at::Tensor& indptr,                     // [n_rows + 1] int32/int64
                      const at::Tensor& indices,                    // [nnz] int32/int64
                      const at::Tensor& data,                       // [nnz] float32
                      const at::Tensor& rows,                       // [B] int64
                      const std::optional<at::Tensor>& col_map,     // [n_cols] int32
                      int64_t n_cols, int64_t n_out, double target_sum, bool log1p,
                      const std::optional<at::Tensor>& row_totals,  // [n_rows] float32
                      const std::optional<at::Tensor>& out_buffer)  // [B, n_out] float32, reused (no page faults)
{
  require_vector(indptr, "indptr", {at::kInt, at::kLong});
  require_vector(indices, "indices", {at::kInt, at::kLong});
  require_vector(data, "data", {at::kFloat});
  require_vector(rows, "rows", {at::kLong});
  require(indptr.numel() >= 1, "indptr must have n_rows + 1 >= 1 entries");
  require(indices.numel() == data.numel(), "indices (" + std::to_string(indices.numel()) + ") and data (" +
                                               std::to_string(data.numel()) + ") must have the same length");
  require(n_cols >= 0 && n_out >= 0, "n_cols and n_out must be >= 0");
  const int64_t n_rows = indptr.numel() - 1;
  const int64_t n_sel = rows.numel();

  if (col_map.has_value()) {
    require_vector(*col_map, "col_map", {at::kInt});
    require(col_map->numel() == n_cols, "col_map has " + std::to_string(col_map->numel()) +
                                            " entries, expected n_cols = " + std::to_string(n_cols));
  }
  if (row_totals.has_value()) {
    require_vector(*row_totals, "row_totals", {at::kFloat});
    require(row_totals->numel() == n_rows, "row_totals has " + std::to_string(row_totals->numel()) +
                                               " entries, expected n_rows = " + std::to_string(n_rows));
  }
  at::Tensor out;
  if (out_buffer.has_value()) {
    out = *out_buffer;
    require(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 &&
                out.size(0) == n_sel && out.size(1) == n_out,
            "out must be a contiguous float32 CPU tensor of shape [" + std::to_string(n_sel) + ", " +
                std::to_string(n_out) + "]");
  } else {
    out = at::empty({n_sel, n_out}, data.options().dtype(at::kFloat));
  }

  auto fill = [&](auto args) {  // everything but the index arrays, whose types differ per instantiation
    args.data = data.numel() > 0 ? data.data_ptr<float>() : nullptr;
    args.n_rows = n_rows;
    args.n_cols = n_cols;
    args.nnz = data.numel();
    args.rows = n_sel > 0 ? rows.data_ptr<int64_t>() : nullptr;
    args.n_sel = n_sel;
    static const int32_t kEmptyMap = -1;  // a col_map with no entries is still a map, not the identity
    args.col_map = !col_map.has_value() ? nullptr : n_cols > 0 ? col_map->data_ptr<int32_t>() : &kEmptyMap;
    args.n_out = n_out;
    args.target_sum = target_sum;
    args.log1p = log1p;
    args.row_totals = row_totals.has_value() && n_rows > 0 ? row_totals->data_ptr<float>() : nullptr;
    return args;
  };
  float* o = out.data_ptr<float>();
  const bool ip64 = indptr.scalar_type() == at::kLong;
  const bool ix64 = indices.scalar_type() == at::kLong;
  if (ip64 && ix64) {
    run_gather(fill(CsrGatherArgs<int64_t, int64_t>{}), indptr, indices, o);
  } else if (ip64) {
    run_gather(fill(CsrGatherArgs<int64_t, int32_t>{}), indptr, indices, o);
  } else if (ix64) {
    run_gather(fill(CsrGatherArgs<int32_t, int64_t>{}), indptr, indices, o);
  } else {
    run_gather(fill(CsrGatherArgs<int32_t, int32_t>{}), indptr, indices, o);
  }
  return out;
}

}  // namespace
}  // namespace inrscrecon

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "inrscrecon compiled ops (CPU; CUDA when built with it)";
  m.attr("with_cuda") =
#ifdef WITH_CUDA
      true;
#else
      false;
#endif
  m.def("csr_gather", &inrscrecon::csr_gather, "CSR row gather + library-size normalise + log1p → [B, n_out] f32",
        pybind11::arg("indptr"), pybind11::arg("indices"), pybind11::arg("data"), pybind11::arg("rows"),
        pybind11::arg("col_map"), pybind11::arg("n_cols"), pybind11::arg("n_out"), pybind11::arg("target_sum"),
        pybind11::arg("log1p"), pybind11::arg("row_totals"), pybind11::arg("out") = pybind11::none());
}
