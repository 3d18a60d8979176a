// Fused gene head + RMSE + KL loss: CUDA kernels (see head_loss_kernel.cuh for the contract).
//
// One simple tiling serves the three kernels: a block of 256 threads owns a BM × BN tile of (rows, genes);
// the logits tile is an h·Wᵀ product over the hidden width, staged through shared memory in BK-wide chunks, and
// each thread keeps a 2 × 2 sub-tile in registers (rows ty, ty + 16; genes tx, tx + 16).
//
// Gradients. With x = logit, pred = softplus(x), q = pred + ε, p = t + ε, per row b:
//   RMSE = sqrt(SSE / (B·M))                        ⇒ ∂RMSE/∂pred_bg = (pred_bg − t_bg) / (B·M·RMSE)
//   KL_b = A_b/s_b − log s_b − C_b/s_b + log S_b   (A = Σ q log q, s = Σ q, C = Σ q log p, S = Σ p)
//     ∂A/∂q_g = log q_g + 1, ∂s/∂q_g = 1, ∂C/∂q_g = log p_g, so
//     ∂KL_b/∂q_g = (log q_g + 1)/s − A/s² − 1/s − log p_g/s + C/s²
//               = (1/s)(log q_g − log p_g − (A − C)/s),  and (A − C)/s = KL_b + log s − log S, hence
//               = (1/s)(log q_g − log p_g + log S − log s − KL_b);  ∂q/∂pred = 1.
//   KL = mean_b KL_b  ⇒ factor 1/B.
// The host folds the upstream gradients of (loss, rmse, kl) into c_rmse = (g_loss + g_rmse)/(B·M·RMSE) and
// c_kl = (λ·g_loss + g_kl)/B, so dL/dpred = c_rmse (pred − t) + c_kl (1/s_b)(log q − log p + shift_b), and
//   softplus'(x) = sigmoid(x) (= 1 above torch's threshold 20, where softplus(x) = x)
//   D = dL/dx = dL/dpred · softplus'(x)
//   grad_h = D W      [B, W]  (kernel grad_hidden: a block owns BM rows, walks all gene tiles; no atomics)
//   grad_W = Dᵀ h     [M, W]  (kernel grad_weight: a block owns BN genes, walks all row tiles; no atomics)
//   grad_b = Σ_b D    [M]
// Deterministic: every output element is written by exactly one block.
#include "head_loss_kernel.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace inrscrecon {
namespace cuda {
namespace {

constexpr int BM = 32;  // rows per tile
constexpr int BN = 32;  // genes per tile
constexpr int BK = 32;  // hidden-width chunk
constexpr int THREADS = 256;
constexpr float SOFTPLUS_THRESHOLD = 20.0f;  // torch.nn.functional.softplus default (beta = 1)
static_assert(BM == BN && BM == 32 && THREADS == 256, "the 16 × 16 thread layout assumes 32 × 32 tiles");

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}

__device__ __forceinline__ float softplus(float x) {
  return x > SOFTPLUS_THRESHOLD ? x : log1pf(expf(x));
}
__device__ __forceinline__ float softplus_grad(float x) {
  return x > SOFTPLUS_THRESHOLD ? 1.0f : 1.0f / (1.0f + expf(-x));
}

struct TileSmem {
  float h[BM][BK + 1];  // +1: no bank conflicts on column reads
  float w[BN][BK + 1];
};

// acc[i][j] = logit(r0 + ty + 16 i, g0 + tx + 16 j); rows ≥ B or genes ≥ M read zeros. Ends with a barrier.
template <typename T>
__device__ void logits_tile(const T* __restrict__ hidden, const T* __restrict__ weight, const T* __restrict__ bias,
                            int64_t B, int64_t M, int64_t W, int64_t r0, int64_t g0, TileSmem& sm,
                            float acc[2][2]) {
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) acc[i][j] = 0.0f;
  }
  for (int64_t k0 = 0; k0 < W; k0 += BK) {
    for (int idx = tid; idx < BM * BK; idx += THREADS) {
      const int rr = idx / BK;
      const int kk = idx % BK;  // fastest: coalesced along the hidden width
      const int64_t k = k0 + kk;
      const int64_t r = r0 + rr;
      const int64_t g = g0 + rr;
      sm.h[rr][kk] = (r < B && k < W) ? to_float(hidden[r * W + k]) : 0.0f;
      sm.w[rr][kk] = (g < M && k < W) ? to_float(weight[g * W + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      const float h0 = sm.h[ty][kk];
      const float h1 = sm.h[ty + 16][kk];
      const float w0 = sm.w[tx][kk];
      const float w1 = sm.w[tx + 16][kk];
      acc[0][0] += h0 * w0;
      acc[0][1] += h0 * w1;
      acc[1][0] += h1 * w0;
      acc[1][1] += h1 * w1;
    }
    __syncthreads();
  }
  if (bias != nullptr) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t g = g0 + tx + 16 * j;
      const float b = g < M ? to_float(bias[g]) : 0.0f;
      acc[0][j] += b;
      acc[1][j] += b;
    }
  }
}

// Sum over the 16 lanes of a half-warp (the threads sharing ty hold one row's genes).
__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// dL/dlogit for one element (see the derivation at the top).
__device__ __forceinline__ float dlogit(float x, float t, float eps, float c_rmse, float c_kl, float inv_s,
                                       float shift) {
  const float pred = softplus(x);
  float dpred = c_rmse * (pred - t);
  if (c_kl != 0.0f) dpred += c_kl * inv_s * (logf(pred + eps) - logf(t + eps) + shift);
  return dpred * softplus_grad(x);
}

// grid (row tiles, gene tiles): per-row statistics of one tile, added into stats [B, 5] (fp64 atomics).
template <typename T>
__global__ void __launch_bounds__(THREADS)
    forward_kernel(const T* __restrict__ hidden, const T* __restrict__ weight, const T* __restrict__ bias,
                   const T* __restrict__ target, int64_t B, int64_t M, int64_t W, float eps,
                   double* __restrict__ stats) {
  __shared__ TileSmem sm;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t g0 = static_cast<int64_t>(blockIdx.y) * BN;
  float acc[2][2];
  logits_tile(hidden, weight, bias, B, M, W, r0, g0, sm, acc);
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t r = r0 + ty + 16 * i;
    float sse = 0.0f, s = 0.0f, a = 0.0f, c = 0.0f, big_s = 0.0f;
    if (r < B) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t g = g0 + tx + 16 * j;
        if (g < M) {
          const float pred = softplus(acc[i][j]);
          const float t = to_float(target[r * M + g]);
          const float d = pred - t;
          const float q = pred + eps;
          const float p = t + eps;
          sse += d * d;
          s += q;
          a += q * logf(q);
          c += q * logf(p);
          big_s += p;
        }
      }
    }
    sse = half_warp_sum(sse);
    s = half_warp_sum(s);
    a = half_warp_sum(a);
    c = half_warp_sum(c);
    big_s = half_warp_sum(big_s);
    if (tx == 0 && r < B) {
      double* row = stats + r * kStatsPerRow;
      atomicAdd(row + 0, static_cast<double>(sse));
      atomicAdd(row + 1, static_cast<double>(s));
      atomicAdd(row + 2, static_cast<double>(a));
      atomicAdd(row + 3, static_cast<double>(c));
      atomicAdd(row + 4, static_cast<double>(big_s));
    }
  }
}

// grid (row tiles): grad_h[r0:r0+BM, :] = Σ over gene tiles of D_tile · W_tile. grad_h zeroed by the launcher.
template <typename T>
__global__ void __launch_bounds__(THREADS)
    grad_hidden_kernel(const T* __restrict__ hidden, const T* __restrict__ weight, const T* __restrict__ bias,
                       const T* __restrict__ target, int64_t B, int64_t M, int64_t W, float eps,
                       const float* __restrict__ row_aux, const float* __restrict__ coef,
                       float* __restrict__ grad_h) {
  __shared__ TileSmem sm;
  __shared__ float d_tile[BM][BN + 1];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const float c_rmse = coef[0];
  const float c_kl = coef[1];
  float inv_s[2], shift[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t r = r0 + ty + 16 * i;
    inv_s[i] = r < B ? row_aux[r * kAuxPerRow + 0] : 0.0f;
    shift[i] = r < B ? row_aux[r * kAuxPerRow + 1] : 0.0f;
  }
  for (int64_t g0 = 0; g0 < M; g0 += BN) {
    float acc[2][2];
    logits_tile(hidden, weight, bias, B, M, W, r0, g0, sm, acc);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t r = r0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t g = g0 + tx + 16 * j;
        float d = 0.0f;
        if (r < B && g < M) {
          d = dlogit(acc[i][j], to_float(target[r * M + g]), eps, c_rmse, c_kl, inv_s[i], shift[i]);
        }
        d_tile[ty + 16 * i][tx + 16 * j] = d;
      }
    }
    // (logits_tile ended with a barrier, so nobody still reads sm.w; d_tile is published below.)
    for (int64_t k0 = 0; k0 < W; k0 += BK) {
      for (int idx = tid; idx < BN * BK; idx += THREADS) {
        const int gg = idx / BK;
        const int kk = idx % BK;
        const int64_t g = g0 + gg;
        const int64_t k = k0 + kk;
        sm.w[gg][kk] = (g < M && k < W) ? to_float(weight[g * W + k]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t r = r0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t k = k0 + tx + 16 * j;
          float sum = 0.0f;
#pragma unroll 8
          for (int gg = 0; gg < BN; ++gg) sum += d_tile[ty + 16 * i][gg] * sm.w[gg][tx + 16 * j];
          if (r < B && k < W) grad_h[r * W + k] += sum;  // this block owns these rows: no race
        }
      }
      __syncthreads();
    }
    if (W == 0) __syncthreads();  // keep d_tile writes of the next tile behind this tile's (empty) readers
  }
}

// grid (gene tiles): grad_W[g0:g0+BN, :] = Σ over row tiles of D_tileᵀ · h_tile, grad_b[g] = Σ_b D[b, g].
template <typename T>
__global__ void __launch_bounds__(THREADS)
    grad_weight_kernel(const T* __restrict__ hidden, const T* __restrict__ weight, const T* __restrict__ bias,
                       const T* __restrict__ target, int64_t B, int64_t M, int64_t W, float eps,
                       const float* __restrict__ row_aux, const float* __restrict__ coef,
                       float* __restrict__ grad_w, float* __restrict__ grad_b) {
  __shared__ TileSmem sm;
  __shared__ float d_tile[BM][BN + 1];
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const float c_rmse = coef[0];
  const float c_kl = coef[1];
  float bias_grad = 0.0f;  // thread tid < BN owns gene g0 + tid
  for (int64_t r0 = 0; r0 < B; r0 += BM) {
    float acc[2][2];
    logits_tile(hidden, weight, bias, B, M, W, r0, g0, sm, acc);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t r = r0 + ty + 16 * i;
      const float inv_s = r < B ? row_aux[r * kAuxPerRow + 0] : 0.0f;
      const float shift = r < B ? row_aux[r * kAuxPerRow + 1] : 0.0f;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t g = g0 + tx + 16 * j;
        float d = 0.0f;
        if (r < B && g < M) d = dlogit(acc[i][j], to_float(target[r * M + g]), eps, c_rmse, c_kl, inv_s, shift);
        d_tile[ty + 16 * i][tx + 16 * j] = d;
      }
    }
    __syncthreads();
    if (tid < BN) {
      for (int rr = 0; rr < BM; ++rr) bias_grad += d_tile[rr][tid];
    }
    for (int64_t k0 = 0; k0 < W; k0 += BK) {
      for (int idx = tid; idx < BM * BK; idx += THREADS) {
        const int rr = idx / BK;
        const int kk = idx % BK;
        const int64_t r = r0 + rr;
        const int64_t k = k0 + kk;
        sm.h[rr][kk] = (r < B && k < W) ? to_float(hidden[r * W + k]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t g = g0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t k = k0 + tx + 16 * j;
          float sum = 0.0f;
#pragma unroll 8
          for (int rr = 0; rr < BM; ++rr) sum += d_tile[rr][ty + 16 * i] * sm.h[rr][tx + 16 * j];
          if (g < M && k < W) grad_w[g * W + k] += sum;  // this block owns these genes: no race
        }
      }
      __syncthreads();
    }
    __syncthreads();  // bias reads of d_tile (when W == 0) finish before the next tile overwrites it
  }
  if (grad_b != nullptr && tid < BN && g0 + tid < M) grad_b[g0 + tid] = bias_grad;
}

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

constexpr int64_t MAX_GRID_X = 2147483647;
constexpr int64_t MAX_GRID_Y = 65535;

template <typename T>
cudaError_t forward_impl(const T* hidden, const T* weight, const T* bias, const T* target, int64_t B, int64_t M,
                         int64_t W, float eps, double* stats, cudaStream_t stream) {
  if (B == 0 || M == 0) return cudaSuccess;
  if ((B + BM - 1) / BM > MAX_GRID_X || (M + BN - 1) / BN > MAX_GRID_Y) return cudaErrorInvalidConfiguration;
  const dim3 grid(ceil_div(B, BM), ceil_div(M, BN));
  forward_kernel<T><<<grid, THREADS, 0, stream>>>(hidden, weight, bias, target, B, M, W, eps, stats);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const T* hidden, const T* weight, const T* bias, const T* target, int64_t B, int64_t M,
                          int64_t W, float eps, const float* row_aux, const float* coef, float* grad_h,
                          float* grad_w, float* grad_b, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (B * W > 0) err = cudaMemsetAsync(grad_h, 0, sizeof(float) * B * W, stream);
  if (err == cudaSuccess && M * W > 0) err = cudaMemsetAsync(grad_w, 0, sizeof(float) * M * W, stream);
  if (err == cudaSuccess && grad_b != nullptr && M > 0) err = cudaMemsetAsync(grad_b, 0, sizeof(float) * M, stream);
  if (err != cudaSuccess || B == 0 || M == 0) return err;
  if ((B + BM - 1) / BM > MAX_GRID_X || (M + BN - 1) / BN > MAX_GRID_X) return cudaErrorInvalidConfiguration;
  grad_hidden_kernel<T><<<ceil_div(B, BM), THREADS, 0, stream>>>(hidden, weight, bias, target, B, M, W, eps,
                                                                  row_aux, coef, grad_h);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  grad_weight_kernel<T><<<ceil_div(M, BN), THREADS, 0, stream>>>(hidden, weight, bias, target, B, M, W, eps,
                                                                  row_aux, coef, grad_w, grad_b);
  return cudaGetLastError();
}

}  // namespace

cudaError_t head_loss_forward(DType dtype, const void* hidden, const void* weight, const void* bias,
                              const void* target, int64_t B, int64_t M, int64_t W, float kl_eps, double* stats,
                              cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_impl(static_cast<const float*>(hidden), static_cast<const float*>(weight),
                          static_cast<const float*>(bias), static_cast<const float*>(target), B, M, W, kl_eps,
                          stats, stream);
    case DType::kBFloat16:
      return forward_impl(static_cast<const __nv_bfloat16*>(hidden), static_cast<const __nv_bfloat16*>(weight),
                          static_cast<const __nv_bfloat16*>(bias), static_cast<const __nv_bfloat16*>(target), B,
                          M, W, kl_eps, stats, stream);
    case DType::kFloat16:
      return forward_impl(static_cast<const __half*>(hidden), static_cast<const __half*>(weight),
                          static_cast<const __half*>(bias), static_cast<const __half*>(target), B, M, W, kl_eps,
                          stats, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t head_loss_backward(DType dtype, const void* hidden, const void* weight, const void* bias,
                               const void* target, int64_t B, int64_t M, int64_t W, float kl_eps,
                               const float* row_aux, const float* coef, float* grad_h, float* grad_w,
                               float* grad_b, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_impl(static_cast<const float*>(hidden), static_cast<const float*>(weight),
                           static_cast<const float*>(bias), static_cast<const float*>(target), B, M, W, kl_eps,
                           row_aux, coef, grad_h, grad_w, grad_b, stream);
    case DType::kBFloat16:
      return backward_impl(static_cast<const __nv_bfloat16*>(hidden), static_cast<const __nv_bfloat16*>(weight),
                           static_cast<const __nv_bfloat16*>(bias), static_cast<const __nv_bfloat16*>(target), B,
                           M, W, kl_eps, row_aux, coef, grad_h, grad_w, grad_b, stream);
    case DType::kFloat16:
      return backward_impl(static_cast<const __half*>(hidden), static_cast<const __half*>(weight),
                           static_cast<const __half*>(bias), static_cast<const __half*>(target), B, M, W, kl_eps,
                           row_aux, coef, grad_h, grad_w, grad_b, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace inrscrecon
