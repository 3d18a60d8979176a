// Fused gene head + RMSE + KL loss: kernel core (plain CUDA + raw pointers, no torch headers).
//
//   logit = h Wᵀ + b                       h [B, W], W [M, W], b [M]
//   pred  = softplus(logit)                [B, M], never stored
//   loss  = RMSE(pred, t) + λ · KL         t [B, M]
//
// The forward pass reduces every [B, M] tile to five per-row statistics (fp64, atomically accumulated over gene
// tiles); the host turns them into RMSE / KL (see inrscrecon/kernels/cuda_head_loss.py):
//   stats[b] = (SSE_b = Σ_g (pred − t)²,  s_b = Σ_g q,  A_b = Σ_g q log q,  C_b = Σ_g q log p,  S_b = Σ_g p)
//   with q = pred + ε, p = t + ε;   KL_b = A_b/s_b − log s_b − C_b/s_b + log S_b.
// The backward pass recomputes the logits tile by tile and forms dL/dlogit from per-row coefficients, then
// accumulates grad_h, grad_W, grad_b (fp32). Memory: O(B + M) on top of the inputs and gradients, instead of the
// [B, M] fp32 prediction (80 MB at B = 4096, M = 5000) plus its autograd saves.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace inrscrecon {
namespace cuda {

// Element type of hidden / weight / bias / target (all four share it).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kStatsPerRow = 5;  // SSE, s, A, C, S
constexpr int kAuxPerRow = 2;    // 1/s, log S − log s − KL

// stats [B, 5] fp64 must be zeroed by the caller. bias may be nullptr. All arrays contiguous, row-major.
cudaError_t head_loss_forward(DType dtype, const void* hidden /*[B, W]*/, const void* weight /*[M, W]*/,
                              const void* bias /*[M] or nullptr*/, const void* target /*[B, M]*/, int64_t B,
                              int64_t M, int64_t W, float kl_eps, double* stats /*[B, 5]*/, cudaStream_t stream);

// row_aux [B, 2] = (1/s_b, log S_b − log s_b − KL_b); coef [2] = (c_rmse, c_kl) on the device, with
//   dL/dpred[b, g] = c_rmse · (pred − t) + c_kl · (1/s_b) · (log q − log p + log S_b − log s_b − KL_b).
// grad_h [B, W], grad_w [M, W], grad_b [M] (fp32) are overwritten; grad_b may be nullptr.
cudaError_t head_loss_backward(DType dtype, const void* hidden, const void* weight, const void* bias,
                               const void* target, int64_t B, int64_t M, int64_t W, float kl_eps,
                               const float* row_aux /*[B, 2]*/, const float* coef /*[2]*/, float* grad_h,
                               float* grad_w, float* grad_b, cudaStream_t stream);

}  // namespace cuda
}  // namespace inrscrecon
