// Per-row pass of the GEMM + fused-loss sparse head (pure C++, no torch): the arguments shared by the CPU pass
// (sparse_head.cpp) and the CUDA kernel (cuda/sparse_head_kernel.cu).
//
// For one chunk of rows the caller has written the logits z = h·Wᵀ + b into a [n_rows, M] row-major buffer
// (cuBLAS / MKL GEMM). The row pass reads them once with the row's CSR target (t_g at its non-zeros, 0
// elsewhere), p = softplus(z), q = p + ε, w = row weight, and
//   * stats (forward): row_out[r] = (SSE_r, KL_r, 1/s_r, off_r) with
//       SSE = Σ p² − 2 Σ_nz p·t + Σ_nz t²,  s = Σ q,  A = Σ q log q,  S = Σ_nz t + M ε,
//       C = s log ε + Σ_nz q log1p(t/ε),  KL = A/s − log s − C/s + log S,  off = log S − log s − KL
//     (KL, 1/s and off only when has_kl; 0 otherwise);
//   * grad: overwrites z with dz = ∂L/∂z = w · sigmoid(z) · [c_r (p − t) + c_k (log q − log(t + ε) + off)/s]
//     (the KL bracket only when has_kl; c_r = 1, c_k = 0 when coef is null: the forward's unit RMSE gradient).
// Slots of a row: [indptr[r], indptr[r+1]); genes unique within a row, any order. z_nz [CAP] keeps the logits at
// the non-zeros between the dense pass (which overwrites z) and the correction at the non-zeros.
#pragma once

#include <cstdint>

namespace inrscrecon {

struct SparseHeadRows {
  void* logits = nullptr;                // [n_rows, n_genes] chunk, dtype of the GEMM (fp32 / bf16 / fp16)
  int64_t n_rows = 0;                    // rows in the chunk
  int64_t row0 = 0;                      // global id of the chunk's first row
  int64_t n_genes = 0;                   // M
  int64_t cap = 0;                       // CSR slots (indices / values length)
  const int64_t* indptr = nullptr;       // [B+1] global row offsets
  const void* indices = nullptr;         // [CAP] int32 or int64
  bool indices64 = false;
  const float* values = nullptr;         // [CAP]
  const float* row_weight = nullptr;     // [B] or nullptr (all 1)
  const float* rowstat_in = nullptr;     // [B, 2] (1/s, off) from the forward; grad without stats only
  const float* coef = nullptr;           // [2] (c_r, c_k) or nullptr (1, 0)
  float* row_out = nullptr;              // [B, 4] (SSE, KL, 1/s, off); stats only
  float* z_nz = nullptr;                 // [CAP] scratch
  float kl_eps = 1e-2f;
  bool stats = true;                     // write row_out
  bool grad = false;                     // overwrite the logits with dz
  bool has_kl = false;                   // the KL term (statistics and gradient)
};

constexpr int kRowOut = 4;   // SSE, KL, 1/s, off
constexpr float kSoftplusThreshold = 20.0f;  // torch.nn.functional.softplus default (beta = 1)

}  // namespace inrscrecon
