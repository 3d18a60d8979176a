// GEMM + fused-loss sparse head, registered as torch.library ops (namespace inrscrecon) for CPU and CUDA:
//
//   gemm_sparse_head_loss(hidden, weight, bias?, indptr, indices, values, row_weight?, lambda_kl, kl_eps,
//                         grad_in_forward, chunk_rows) -> (loss, rmse, kl, rowstat [B, 2], wsum, gh, gw, gb)
//   gemm_sparse_head_loss_backward(hidden, weight, bias?, indptr, indices, values, row_weight?, rowstat, coef,
//                                  kl_eps, has_kl, chunk_rows) -> (gh [B, W], gw [M, W], gb [M])  (fp32)
//
// Rows go in chunks of C (a bounded [C, M] workspace in the GEMM dtype): logits = addmm(b, h, Wᵀ) through ATen
// (cuBLAS on CUDA, tensor cores in bf16 / TF32; MKL / oneDNN on CPU), then ONE pass over the chunk's logits
// with the batch's CSR targets (sparse_head_rows.h: a CUDA kernel with one block per row; on CPU, C++ loops over
// the non-zeros, rows in parallel, around ATen's vectorised dense sweep) writes per-row statistics and, for the gradient, dz = ∂L/∂z over the logits; then
// gh = dz·W and gW += dzᵀ·h (ATen mm), gb += Σ_rows dz. Three GEMM passes in all when the gradient is formed
// in the forward (λ_KL = 0: dz / c_r depends on no batch statistic, so the backward only scales by c_r, the
// Liger pattern); with λ_KL ≠ 0, dz needs the global c_r and c_k that only the backward knows, so the forward
// is one GEMM pass (statistics) and the backward three (logits again, gh, gW): four in all.
// Memory beyond inputs and gradients: the [C, M] workspace (64 MiB by default), [CAP] fp32 scratch, [B, 4] fp32
// row statistics; never a [B, M] tensor unless C = B.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "sparse_head_rows.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/sparse_head_kernel.cuh"
#endif

namespace inrscrecon {
namespace {

constexpr int64_t kChunkBytes = 64ll * 1024 * 1024;  // budget of the [C, M] logits / dz workspace

float softplus(float z) { return z > kSoftplusThreshold ? z : std::log1p(std::exp(z)); }
float softplus_grad(float z) { return z > kSoftplusThreshold ? 1.0f : 1.0f / (1.0f + std::exp(-z)); }

// The CPU row pass: the arithmetic of sparse_head_rows.h in three steps over the chunk. (1) and (3) walk the
// non-zeros in a C++ loop, rows in parallel (at::parallel_for, OpenMP); (2), the dense sweep over all M genes,
// runs through ATen's vectorised CPU kernels (softplus, sigmoid, log, row sums) in fp32 on the [n, M] chunk.
template <typename I>
void cpu_rows(const at::Tensor& logits, const SparseHeadRows& a) {
  const int64_t M = a.n_genes, n = a.n_rows;
  const I* idx = static_cast<const I*>(a.indices);
  const float eps = a.kl_eps;
  const float log_eps = std::log(eps);
  const float c_r = a.coef != nullptr ? a.coef[0] : 1.0f;
  const float c_k = a.coef != nullptr ? a.coef[1] : 0.0f;
  const bool kl = a.has_kl;
  const at::Tensor zf = logits.to(at::kFloat);  // the chunk itself when fp32, else an fp32 copy
  const float* zp = zf.const_data_ptr<float>();
  at::Tensor nzs = at::zeros({n, 4}, zf.options());  // Σ_nz p·t, Σ_nz t², Σ_nz t, Σ_nz q log1p(t/ε)
  float* nzp = nzs.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {  // (1) the non-zeros: read before (2) writes
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r = a.row0 + i;
      const int64_t k0 = a.indptr[r], k1 = a.indptr[r + 1];
      TORCH_CHECK_VALUE(0 <= k0 && k0 <= k1 && k1 <= a.cap, "gemm_sparse_head_loss: indptr[", r, ":", r + 2,
                        "] = (", k0, ", ", k1, ") is not a valid slot range of the ", a.cap, " CSR slots");
      double spt = 0, stt = 0, st = 0, cnz = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t g = static_cast<int64_t>(idx[k]);
        TORCH_CHECK_VALUE(0 <= g && g < M, "gemm_sparse_head_loss: indices[", k, "] = ", g,
                          " is not a gene in [0, ", M, ")");
        const float zz = zp[i * M + g];
        a.z_nz[k] = zz;
        const double p = softplus(zz), t = a.values[k];
        spt += p * t;
        stt += t * t;
        st += t;
        if (kl) cnz += (p + eps) * std::log1p(t / eps);
      }
      float* o = nzp + 4 * i;
      o[0] = static_cast<float>(spt);
      o[1] = static_cast<float>(stt);
      o[2] = static_cast<float>(st);
      o[3] = static_cast<float>(cnz);
    }
  });
  // (2) the dense sweep (target 0 everywhere), vectorised
  const at::Tensor p = at::softplus(zf, 1.0, kSoftplusThreshold);
  at::Tensor sp2, s, sql, q, lq;
  if (a.stats) sp2 = (p * p).sum(1);
  if (kl) {
    q = p + eps;
    lq = at::log(q);
    if (a.stats) {
      s = q.sum(1);
      sql = (q * lq).sum(1);
    }
  }
  at::Tensor inv_s_t, off_t;  // [n] per-row constants of the KL gradient
  if (a.grad) {
    at::Tensor d = c_r == 1.0f ? p : p * c_r;
    if (kl && !a.stats) {
      const at::Tensor rs = at::from_blob(const_cast<float*>(a.rowstat_in) + 2 * a.row0, {n, 2}, zf.options());
      inv_s_t = rs.select(1, 0).contiguous();
      off_t = rs.select(1, 1).contiguous();
      d = d + c_k * (lq - log_eps + off_t.unsqueeze(1)) * inv_s_t.unsqueeze(1);
    }
    at::Tensor dz = at::sigmoid(zf) * d;
    if (a.row_weight != nullptr) {
      dz = dz * at::from_blob(const_cast<float*>(a.row_weight) + a.row0, {n, 1}, zf.options());
    }
    logits.copy_(dz);
  }
  const float* sp2p = a.stats ? sp2.const_data_ptr<float>() : nullptr;
  const float* sp = a.stats && kl ? s.const_data_ptr<float>() : nullptr;
  const float* sqlp = a.stats && kl ? sql.const_data_ptr<float>() : nullptr;
  const float* inv_sp = inv_s_t.defined() ? inv_s_t.const_data_ptr<float>() : nullptr;
  const float* offp = off_t.defined() ? off_t.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gemm_sparse_head_rows", [&] {
    scalar_t* zo = logits.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {  // (3) statistics and the non-zeros' dz
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t r = a.row0 + i;
        const float* nz = nzp + 4 * i;
        if (a.stats) {
          float* o = a.row_out + kRowOut * r;
          o[0] = sp2p[i] - 2.0f * nz[0] + nz[1];
          if (kl) {
            const double sr = sp[i];
            const double big_s = nz[2] + static_cast<double>(M) * eps;
            const double c = sr * log_eps + nz[3];
            const double kl_r = sqlp[i] / sr - std::log(sr) - c / sr + std::log(big_s);
            o[1] = static_cast<float>(kl_r);
            o[2] = static_cast<float>(1.0 / sr);
            o[3] = static_cast<float>(std::log(big_s) - std::log(sr) - kl_r);
          } else {
            o[1] = o[2] = o[3] = 0.0f;
          }
        }
        if (!a.grad) continue;
        const float w = a.row_weight != nullptr ? a.row_weight[r] : 1.0f;
        const float inv_s = inv_sp != nullptr ? inv_sp[i] : 0.0f;
        const float off = offp != nullptr ? offp[i] : 0.0f;
        for (int64_t k = a.indptr[r]; k < a.indptr[r + 1]; ++k) {
          const int64_t g = static_cast<int64_t>(idx[k]);
          const float zz = a.z_nz[k];
          const float pk = softplus(zz), t = a.values[k];
          float d = c_r * (pk - t);
          if (kl && !a.stats) d += c_k * (std::log(pk + eps) - std::log(t + eps) + off) * inv_s;
          zo[i * M + g] = static_cast<scalar_t>(w * softplus_grad(zz) * d);
        }
      }
    });
  });
}

void run_rows(const at::Tensor& logits, const SparseHeadRows& a) {
  if (logits.is_cuda()) {
#ifdef WITH_CUDA
    cuda::DType dt = logits.scalar_type() == at::kFloat      ? cuda::DType::kFloat32
                     : logits.scalar_type() == at::kBFloat16 ? cuda::DType::kBFloat16
                                                             : cuda::DType::kFloat16;
    const cudaError_t err = cuda::sparse_head_rows(dt, a, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "gemm_sparse_head_loss: CUDA row pass failed: ", cudaGetErrorString(err));
    return;
#else
    TORCH_CHECK(false, "gemm_sparse_head_loss: inrscrecon._C was built without CUDA ops");
#endif
  }
  if (a.indices64) {
    cpu_rows<int64_t>(logits, a);
  } else {
    cpu_rows<int32_t>(logits, a);
  }
}

struct Inputs {
  at::Tensor h, w, b, indptr, indices, values, rw;
  int64_t B = 0, M = 0, W = 0, cap = 0;
};

Inputs check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                    const std::optional<at::Tensor>& row_weight) {
  const char* op = "gemm_sparse_head_loss: ";
  TORCH_CHECK_VALUE(hidden.dim() == 2, op, "hidden must be [B, W], got ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(1), op, "weight must be [M, W] with W = ",
                    hidden.size(1), ", got ", weight.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
                    "hidden must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(weight.scalar_type() == dt, op, "weight dtype ", weight.scalar_type(), " != hidden dtype ", dt);
  Inputs in;
  in.B = hidden.size(0);
  in.W = hidden.size(1);
  in.M = weight.size(0);
  const auto dev = hidden.device();
  auto same_dev = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.device() == dev, op, name, " is on ", t.device(), ", hidden on ", dev);
  };
  same_dev(weight, "weight");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == in.M, op, "bias must be [M] = [", in.M, "], got ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == dt, op, "bias dtype ", bias->scalar_type(), " != hidden dtype ", dt);
    same_dev(*bias, "bias");
    in.b = bias->contiguous();
  }
  TORCH_CHECK_VALUE(indptr.dim() == 1 && indptr.size(0) == in.B + 1 && indptr.scalar_type() == at::kLong, op,
                    "indptr must be int64 [B+1] = [", in.B + 1, "], got ", indptr.scalar_type(), " ", indptr.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 1 && (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong),
                    op, "indices must be int32/int64 [CAP], got ", indices.scalar_type(), " ", indices.sizes());
  TORCH_CHECK_VALUE(values.dim() == 1 && values.size(0) == indices.size(0) && values.scalar_type() == at::kFloat,
                    op, "values must be float32 [CAP] = [", indices.size(0), "], got ", values.scalar_type(), " ",
                    values.sizes());
  same_dev(indptr, "indptr");
  same_dev(indices, "indices");
  same_dev(values, "values");
  if (row_weight.has_value()) {
    TORCH_CHECK_VALUE(row_weight->dim() == 1 && row_weight->size(0) == in.B &&
                          row_weight->scalar_type() == at::kFloat,
                      op, "row_weight must be float32 [B] = [", in.B, "], got ", row_weight->scalar_type(), " ",
                      row_weight->sizes());
    same_dev(*row_weight, "row_weight");
    in.rw = row_weight->contiguous();
  }
  in.h = hidden.contiguous();
  in.w = weight.contiguous();
  in.indptr = indptr.contiguous();
  in.indices = indices.contiguous();
  in.values = values.contiguous();
  in.cap = indices.size(0);
  return in;
}

int64_t chunk_size(const Inputs& in, int64_t chunk_rows) {
  TORCH_CHECK_VALUE(chunk_rows >= 0, "gemm_sparse_head_loss: chunk_rows must be >= 0 (0 = auto), got ", chunk_rows);
  int64_t c = chunk_rows;
  if (c == 0) c = kChunkBytes / std::max<int64_t>(1, in.M * static_cast<int64_t>(in.h.element_size()));
  return std::max<int64_t>(1, std::min<int64_t>(c, std::max<int64_t>(in.B, 1)));
}

SparseHeadRows base_args(const Inputs& in, const at::Tensor& z_nz, float kl_eps) {
  SparseHeadRows a;
  a.n_genes = in.M;
  a.cap = in.cap;
  a.indptr = in.indptr.data_ptr<int64_t>();
  a.indices = in.indices.data_ptr();
  a.indices64 = in.indices.scalar_type() == at::kLong;
  a.values = in.values.data_ptr<float>();
  a.row_weight = in.rw.defined() ? in.rw.data_ptr<float>() : nullptr;
  a.z_nz = z_nz.data_ptr<float>();
  a.kl_eps = kl_eps;
  return a;
}

// Runs the chunks: logits GEMM, row pass, and (grad) the two gradient GEMMs into gh / gw / gb (fp32).
void chunks(const Inputs& in, SparseHeadRows a, int64_t chunk_rows, at::Tensor* gh, at::Tensor* gw, at::Tensor* gb) {
  const int64_t C = chunk_size(in, chunk_rows);
  at::Tensor ws = at::empty({std::min(C, in.B), in.M}, in.h.options());
  const at::Tensor wt = in.w.t();
  const bool f32 = in.h.scalar_type() == at::kFloat;
  for (int64_t r0 = 0; r0 < in.B; r0 += C) {
    const int64_t n = std::min(C, in.B - r0);
    at::Tensor z = ws.narrow(0, 0, n);
    const at::Tensor hc = in.h.narrow(0, r0, n);
    if (in.b.defined()) {
      at::addmm_out(z, in.b, hc, wt);
    } else {
      at::mm_out(z, hc, wt);
    }
    a.logits = z.data_ptr();
    a.n_rows = n;
    a.row0 = r0;
    run_rows(z, a);
    if (!a.grad) continue;
    at::Tensor ghc = gh->narrow(0, r0, n);
    if (f32) {
      at::mm_out(ghc, z, in.w);
      gw->addmm_(z.t(), hc);
    } else {
      ghc.copy_(at::mm(z, in.w));
      gw->add_(at::mm(z.t(), hc));
    }
    gb->add_(z.sum(0, false, at::kFloat));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gemm_sparse_head_loss(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                      const std::optional<at::Tensor>& row_weight, double lambda_kl, double kl_eps,
                      bool grad_in_forward, int64_t chunk_rows) {
  Inputs in = check_inputs(hidden, weight, bias, indptr, indices, values, row_weight);
  TORCH_CHECK_VALUE(!(grad_in_forward && lambda_kl != 0.0), "gemm_sparse_head_loss: grad_in_forward needs "
                    "lambda_kl = 0 (the KL gradient depends on upstream scalars known only in the backward), got ",
                    lambda_kl);
#ifdef WITH_CUDA
  const c10::cuda::OptionalCUDAGuard guard(hidden.is_cuda() ? std::optional<c10::Device>(hidden.device())
                                                            : std::nullopt);
#endif
  const bool has_kl = lambda_kl != 0.0;
  const auto f32 = in.h.options().dtype(at::kFloat);
  at::Tensor rows = at::zeros({in.B, kRowOut}, f32);
  at::Tensor z_nz = at::empty({in.cap}, f32);
  at::Tensor gh = at::empty({grad_in_forward ? in.B : 0, grad_in_forward ? in.W : 0}, f32);
  at::Tensor gw = at::zeros({grad_in_forward ? in.M : 0, grad_in_forward ? in.W : 0}, f32);
  at::Tensor gb = at::zeros({grad_in_forward ? in.M : 0}, f32);
  SparseHeadRows a = base_args(in, z_nz, static_cast<float>(kl_eps));
  a.row_out = rows.data_ptr<float>();
  a.stats = true;
  a.grad = grad_in_forward;
  a.has_kl = has_kl;
  chunks(in, a, chunk_rows, &gh, &gw, &gb);
  // batch statistics on the device (no host sync); the RMSE floor 1e-15 as the torch reference
  const at::Tensor w = in.rw.defined() ? in.rw : at::ones({in.B}, f32);
  const at::Tensor wsum = w.sum().clamp_min(1e-30);
  const at::Tensor rmse = at::sqrt(((w * rows.select(1, 0)).sum() / (wsum * static_cast<double>(in.M))).clamp_min(1e-30));
  const at::Tensor kl = has_kl ? (w * rows.select(1, 1)).sum() / wsum : at::zeros({}, f32);
  const at::Tensor loss = has_kl ? rmse + lambda_kl * kl : rmse.clone();
  at::Tensor rowstat = rows.narrow(1, 2, 2).contiguous();
  return {loss, rmse, kl, rowstat, wsum, gh, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_sparse_head_loss_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
    const std::optional<at::Tensor>& row_weight, const at::Tensor& rowstat, const at::Tensor& coef, double kl_eps,
    bool has_kl, int64_t chunk_rows) {
  Inputs in = check_inputs(hidden, weight, bias, indptr, indices, values, row_weight);
  TORCH_CHECK_VALUE(rowstat.dim() == 2 && rowstat.size(0) == in.B && rowstat.size(1) == 2 &&
                        rowstat.scalar_type() == at::kFloat && rowstat.device() == hidden.device(),
                    "gemm_sparse_head_loss_backward: rowstat must be float32 [B, 2] = [", in.B, ", 2] on ",
                    hidden.device(), ", got ", rowstat.scalar_type(), " ", rowstat.sizes());
  TORCH_CHECK_VALUE(coef.numel() == 2 && coef.scalar_type() == at::kFloat && coef.device() == hidden.device(),
                    "gemm_sparse_head_loss_backward: coef must be float32 [2] (c_r, c_k) on ", hidden.device());
#ifdef WITH_CUDA
  const c10::cuda::OptionalCUDAGuard guard(hidden.is_cuda() ? std::optional<c10::Device>(hidden.device())
                                                            : std::nullopt);
#endif
  const auto f32 = in.h.options().dtype(at::kFloat);
  const at::Tensor rs = rowstat.contiguous();
  const at::Tensor cf = coef.reshape({2}).contiguous();
  at::Tensor z_nz = at::empty({in.cap}, f32);
  at::Tensor gh = at::empty({in.B, in.W}, f32);
  at::Tensor gw = at::zeros({in.M, in.W}, f32);
  at::Tensor gb = at::zeros({in.M}, f32);
  SparseHeadRows a = base_args(in, z_nz, static_cast<float>(kl_eps));
  a.rowstat_in = rs.data_ptr<float>();
  a.coef = cf.data_ptr<float>();
  a.stats = false;
  a.grad = true;
  a.has_kl = has_kl;
  chunks(in, a, chunk_rows, &gh, &gw, &gb);
  return {gh, gw, gb};
}

}  // namespace
}  // namespace inrscrecon

TORCH_LIBRARY_FRAGMENT(inrscrecon, m) {
  m.def(
      "gemm_sparse_head_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor indptr, Tensor indices, "
      "Tensor values, Tensor? row_weight, float lambda_kl, float kl_eps, bool grad_in_forward, int chunk_rows) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gemm_sparse_head_loss_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor indptr, Tensor indices, "
      "Tensor values, Tensor? row_weight, Tensor rowstat, Tensor coef, float kl_eps, bool has_kl, int chunk_rows) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(inrscrecon, CPU, m) {
  m.impl("gemm_sparse_head_loss", &inrscrecon::gemm_sparse_head_loss);
  m.impl("gemm_sparse_head_loss_backward", &inrscrecon::gemm_sparse_head_loss_backward);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(inrscrecon, CUDA, m) {
  m.impl("gemm_sparse_head_loss", &inrscrecon::gemm_sparse_head_loss);
  m.impl("gemm_sparse_head_loss_backward", &inrscrecon::gemm_sparse_head_loss_backward);
}
#endif
